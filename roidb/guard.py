"""The write guard: roidb's writers (gt-roidb caches, the stat cache, eval result files) pass every path they are
about to write through `checked_write_path`. The orchestrator installs its containment check with
`set_write_guard` (stages/settings.py: the path must lie inside the output or data root); without one, paths are
not checked (library use)."""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Callable

from roidb.errors import DataError

_GUARD: Callable[[str | os.PathLike], Path] | None = None


def set_write_guard(guard: Callable[[str | os.PathLike], Path] | None) -> None:
    global _GUARD
    _GUARD = guard


def checked_write_path(path: str | os.PathLike) -> Path:
    """`path` as a Path after the installed guard accepted it (it raises when the path leaves the roots)."""
    if _GUARD is not None:
        _GUARD(path)
    return Path(path)


def makedirs(path: str | os.PathLike) -> Path:
    """mkdir -p of a checked path."""
    folder = checked_write_path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


_NAME_RE = re.compile(r"[^/\\\x00]{1,200}")


def plain_name(source: object, what: str, name: str) -> str:
    """`name` (a split, an image id) as one path component, or DataError naming `source`: it becomes a file name,
    so it may not hold '/', '\\' or NUL, be '.' or '..', or be longer than 200 characters."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        shown = name if len(name) <= 60 else f"{name[:45]}...({len(name)} chars)"
        raise DataError(source, f"{what} {shown!r} is not a plain name (no '/', '\\', '..' or NUL; it becomes a "
                                "file name)")
    return name


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a stat mode."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """stat of `path` when it is a regular file; DataError naming it and saying what it is otherwise (a FIFO
    would block the reader, a device never ends, a directory is no file): 'not found' only when it is absent."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(path, f"{what} not found") from None
    except OSError as exc:
        raise DataError(path, f"cannot read {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(path, f"{what} is {file_kind(info.st_mode)}, not a regular file")
    return info
