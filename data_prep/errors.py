"""The one exception type the CLI turns into a one-line message and exit status 2."""


class PrepError(Exception):
    """A user-facing problem with the inputs or settings (missing SRC, bad option, mismatch...)."""
