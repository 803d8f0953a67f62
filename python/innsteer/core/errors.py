"""The project's error types. The CLI reports these as one-line user errors; anything else is a bug
and keeps its traceback."""


class InnsteerError(Exception):
    """Base of every error innsteer raises for bad input, files or settings."""


class ConfigError(InnsteerError, ValueError):
    """An invalid setting: a layer out of range, an unknown method, a non-finite alpha, ..."""


class SteerFileError(InnsteerError, ValueError):
    """A steer file that is corrupted, of another format version, or for another model."""


class MissingFileError(InnsteerError, FileNotFoundError):
    """A file the user named does not exist."""
