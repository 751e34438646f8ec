"""Errors a user can fix: the CLI prints them as one line (no traceback) and exits 2."""


class ConfigError(ValueError):
    """A setting, file or directory given by the user is wrong; the message names it."""
