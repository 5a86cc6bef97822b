"""Every error trajlab raises on purpose, under one base class.

Catch :class:`TrajlabError` to handle any of them; each subclass names one kind of problem and
its message names the fix. The command line prints these as one line (``--debug`` for the
traceback).
"""

from __future__ import annotations


class TrajlabError(Exception):
    """Base class of trajlab's own errors."""


class StoreError(TrajlabError):
    """A run or analysis store cannot be used as asked."""


class StoreExistsError(StoreError, FileExistsError):
    """The target already exists and overwriting was not requested (or is not allowed)."""


class StoreLockedError(StoreError):
    """Another live writer (recorder or analysis) holds the store's lock."""


class StoreCorruptError(StoreError):
    """Stored bytes fail their checksum, a chunk inside the committed rows is missing, or the
    store's metadata contradicts its arrays. The message names the array, chunk and steps."""


class RecorderError(TrajlabError, RuntimeError):
    """The recorder cannot record this model or loop as set up."""


class SelfCheckError(RecorderError):
    """The recorded per-sample information does not reproduce the gradient the optimizer sees."""


__all__ = [
    "RecorderError",
    "SelfCheckError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreLockedError",
    "TrajlabError",
]


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` call made in the caller's frame that attributes
    the warning to the first frame outside trajlab and torch (the user's line that called
    ``optimizer.step()`` or ``backward()``), however deep in hooks it is raised."""
    import sys

    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (module == "trajlab" or module.startswith(("trajlab.", "torch"))):
            return level
        frame = frame.f_back
        level += 1
    return 1
