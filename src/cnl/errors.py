"""The one exception family the CLI turns into a clean message (no traceback)."""


class CnlError(Exception):
    """Base class of every user-facing error of cnl: bad input, missing files, bad options."""


class ConfigError(CnlError, ValueError):
    """An option, preset or config file holds a value that cannot be used."""
