"""Errors a user can fix: the CLI prints them as one line (no traceback), with an exit status per kind: 2 for
a setting (not retried by the Slurm script), 1 for a failed save or a diverged run, 0 for a complete one."""


class ConfigError(ValueError):
    """A setting, file or directory given by the user is wrong; the message names it."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact. The CLI
    prints it as one line naming the file and exits 1."""


class DiskFullError(OSError):
    """The run directory's file system (or the temp directory a logger stages files in) is full or over
    quota, outside a checkpoint save (``CheckpointWriteError``): a logger's file, the run's config, W&B's
    offline run. The CLI prints it as one line naming the file where known and the run directory, exit 1."""


class TrainingDiverged(RuntimeError):
    """The weights stopped being finite; nothing after the last finite state was saved. The CLI prints it as
    one line and exits 1 (a restart from ``last.ckpt`` with the same settings would diverge again)."""


def require(ok: bool, key: str, rule: str, value: object) -> None:
    """Refuse a setting at start, before anything runs on it: ``KEY must be RULE, got VALUE``. Left to torch,
    DALI or the DataLoader, a bad number fails later, as a traceback that does not name the setting."""
    if not ok:
        raise ConfigError(f"{key} must be {rule}, got {value!r}")


class RunComplete(Exception):
    """``fit`` of a run whose checkpoint already reached ``trainer.max_steps``: nothing to do (exit 0), said
    before a W&B run or anything else starts."""
