"""Write containment: every path the pipeline writes is proven inside one of the run's roots before it is written.

The roots are PIPELINE.OUTPUT_ROOT and the data root (PIPELINE.DATA_ROOT, default DATA_DIR), plus the folder a
command's explicit `--out` names; `set_write_roots` installs them for the process (the CLI does, the runner does,
and an isolated step's child process does again). `contained(path)` returns the path when its absolute, normalised
form ('..' collapsed) lies inside a root, or when its fully resolved form (symlinks followed) lies inside a resolved
root, and raises PathEscapeError (one line, exit 2) otherwise. With no roots installed (library use, unit tests)
nothing is checked. The engine's atomic writes, step folders, lock and run cache call it; roidb's writers call it
through the guard that stages/settings.py installs (roidb.guard), since roidb may not import the engine.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from .errors import PipelineError

_ROOTS: tuple[Path, ...] = ()


class PathEscapeError(PipelineError):
    """A name from the config or the data (class, split, image id, EXP_DIR) would make a write leave the roots."""


def set_write_roots(roots: Iterable[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """Install the folders writes must stay inside (absolute, normalised); returns the previous roots."""
    global _ROOTS
    previous = _ROOTS
    _ROOTS = tuple(dict.fromkeys(Path(os.path.abspath(os.path.expanduser(r))) for r in roots))
    return previous


def add_write_root(root: str | os.PathLike[str]) -> None:
    """Also allow writes below `root` (a command's explicit --out folder)."""
    if _ROOTS:
        set_write_roots([*_ROOTS, root])


def write_roots() -> tuple[Path, ...]:
    return _ROOTS


def roots_for(config: Any) -> list[Path]:
    """The output root and the data root of `config`."""
    from .config import data_root, resolve_path
    output = resolve_path(config, "PIPELINE.OUTPUT_ROOT", os.path.join(config.get("ROOT_DIR"), "output"))
    return [output, data_root(config)]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def contained(path: str | os.PathLike[str]) -> Path:
    """`path` itself when it lies inside a write root (or no roots are installed); PathEscapeError otherwise."""
    target = Path(path)
    if not _ROOTS:
        return target
    plain = Path(os.path.abspath(target))
    if any(_inside(plain, root) for root in _ROOTS):
        return target
    resolved = target.resolve()
    if any(_inside(resolved, root.resolve()) for root in _ROOTS):
        return target
    roots = " or ".join(str(r) for r in _ROOTS)
    raise PathEscapeError(f"{_short(str(path))}: refused to write outside {roots} (a name in the config or the "
                          "data leads out of the output and data roots)")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else f"{text[:limit - 20]}...({len(text)} chars)"
