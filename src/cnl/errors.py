"""The one exception family the CLI turns into a clean message (no traceback)."""


class CnlError(Exception):
    """Base class of every user-facing error of cnl: bad input, missing files, bad options."""


class ConfigError(CnlError, ValueError):
    """An option, preset or config file holds a value that cannot be used."""


class Terminated(BaseException):
    """SIGTERM (``timeout``, a scheduler, ``docker stop``) or SIGHUP (a closed terminal) arrived; handled like
    Ctrl-C (exit status 128 + the signal's number: 143, 129). The message is the signal's name."""


class OutputError(CnlError, OSError):
    """An output directory cannot be used: not writable, full, or held by another cnl process."""
