"""The one exception the launcher raises for bad input, so the CLI can print it without a traceback."""


class LaunchError(Exception):
    """A user-facing error: the message names the setting or file that is wrong."""
