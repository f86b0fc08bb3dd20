"""Error types. The CLI prints a :class:`FlipnetError` as one line, without a traceback."""

from __future__ import annotations

__all__ = ["FlipnetError", "ConfigError", "DataNotFoundError", "CheckpointError", "ExportFormatError"]


class FlipnetError(Exception):
    """Base class of errors caused by bad input that the user can fix."""


class ConfigError(FlipnetError, ValueError):
    """A recipe or command-line override is invalid (unknown key, wrong type, bad value)."""


class DataNotFoundError(FlipnetError, FileNotFoundError):
    """A data set is not where it was looked for; the message says how to get it."""


class CheckpointError(FlipnetError, ValueError):
    """A checkpoint or run folder is missing, corrupt or of another format."""


class ExportFormatError(FlipnetError, ValueError):
    """An exported model file is malformed, truncated or of another format."""
