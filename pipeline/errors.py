"""Errors a user can fix: the CLI prints them as one line (no traceback) and exits 2."""


class ConfigError(ValueError):
    """A setting, file or directory given by the user is wrong; the message names it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact. The CLI
    prints it as one line naming the file and exits 1."""


class TrainingDiverged(RuntimeError):
    """The weights stopped being finite; nothing after the last finite state was saved. The CLI prints it as
    one line and exits 1 (a restart from ``last.ckpt`` with the same settings would diverge again)."""
