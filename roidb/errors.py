"""Errors of the roidb layer: one-line messages that name the file, object or key at fault."""
from __future__ import annotations

import os

__all__ = ["DataError", "UnsafePickleError"]


class DataError(ValueError):
    """Bad input data. ``str(err)`` is a single line naming the file (and object index) at fault.

    A ``ValueError`` subclass, so the command line turns it into exit status 2.
    """

    def __init__(self, where: str | os.PathLike, problem: str):
        self.where = os.fspath(where)
        self.problem = " ".join(_clip(word) for word in str(problem).split())
        super().__init__(" ".join(f"{self.where}: {self.problem}".split()))


def _clip(word: str, limit: int = 200) -> str:
    """A value quoted in a message, cut to `limit` characters (a 5,000-digit coordinate gives a short line)."""
    return word if len(word) <= limit else f"{word[:limit - 20]}...({len(word)} chars)"


class UnsafePickleError(DataError):
    """A pickle asked for a global outside the allow-list; its payload was never run."""
