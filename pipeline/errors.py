"""Errors the CLI turns into one-line messages and a non-zero exit."""


class PipelineError(Exception):
    """A problem the user can fix; its message names the file, line or parameter."""


class ConfigError(PipelineError, ValueError):
    """A bad parameter."""


class DataError(PipelineError):
    """A missing, unreadable or malformed data file."""


class NonFiniteLossError(PipelineError):
    """A task loss became NaN or infinite."""
