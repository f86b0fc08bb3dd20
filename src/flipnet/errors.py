"""Error types. The CLI prints a :class:`FlipnetError` as one line, without a traceback.

Every error flipnet raises for input the user can fix derives from :class:`FlipnetError` and from
the matching built-in type (``ValueError``, ``FileNotFoundError``, ...), so callers may catch
either. They are all defined here; feature modules re-export the ones of their domain
(``flipnet.data.DataFormatError``, ``flipnet.train.TrainingDiverged``).
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "FlipnetError",
    "ConfigError",
    "DataNotFoundError",
    "DataFormatError",
    "CheckpointError",
    "ExportFormatError",
    "TrainingDiverged",
    "did_you_mean",
]


class FlipnetError(Exception):
    """Base class of errors caused by bad input that the user can fix."""


class ConfigError(FlipnetError, ValueError):
    """A recipe or command-line override is invalid (unknown key, wrong type, bad value)."""


class DataNotFoundError(FlipnetError, FileNotFoundError):
    """A data set is not where it was looked for; the message says how to get it."""


class DataFormatError(FlipnetError, ValueError):
    """A data file exists but is corrupt, truncated or of another format."""


class CheckpointError(FlipnetError, ValueError):
    """A checkpoint or run folder is missing, corrupt or of another format."""


class ExportFormatError(FlipnetError, ValueError):
    """An exported model file is malformed, truncated or of another format."""


class TrainingDiverged(FlipnetError, ArithmeticError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""


def did_you_mean(name: object, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` to ``name``, or ``""`` when none is close.

    ``cutoff`` is :func:`difflib.get_close_matches`'s similarity threshold in [0, 1].
    """
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=cutoff)
    return f"did you mean {close[0]!r}? " if close else ""
