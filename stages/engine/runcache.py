"""The run cache: earlier versions of each step's folder, kept by fingerprint (DVC's run-cache is the model).

    output/<EXP_DIR>/.cache/<step>/<fingerprint>/   a step folder as it was: manifest.json, outputs, snapshots

When a step must run with a fingerprint other than the one its folder holds, the folder is moved here (a rename:
no copy, whatever the size of the model) before the new run starts; a fingerprint seen before is moved back
instead of recomputed. A finished version therefore survives any later re-run that is killed, interrupted or
fails, and a partial one (with its snapshots) resumes when its config comes back. At most
PIPELINE.RUN_CACHE_VERSIONS versions per step are kept (the least recently used go first); `clean --cache` empties
it.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import contained
from .artifacts import read_manifest, stale_reason

CACHE_DIR = ".cache"


@dataclass(frozen=True)
class CachedVersion:
    """One cached step folder."""
    step: str
    fingerprint: str
    dir: Path
    manifest: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.manifest.get("status") == "done"


class RunCache:
    """The cached versions of the steps of one experiment folder. Callers hold the experiment's lock for every
    method that moves or deletes (stash, restore, prune, drop); `lookup` and `usage` only read."""

    def __init__(self, exp_dir: Path, versions: int):
        self.root = Path(exp_dir) / CACHE_DIR
        self.versions = int(versions)

    def _dir(self, step: str, fingerprint: str) -> Path:
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"run cache: bad fingerprint {fingerprint!r} for {step}")
        return self.root / step / fingerprint

    def lookup(self, step: str, fingerprint: str, verify_hashes: bool = True) -> CachedVersion | None:
        """The cached version of `step` with `fingerprint` whose outputs are intact (done), or its partial run;
        None when there is none."""
        folder = self._dir(step, fingerprint)
        manifest = read_manifest(folder)
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            return None
        if manifest.get("status") == "done" and stale_reason(folder, fingerprint, None, verify_hashes) is not None:
            return None
        return CachedVersion(step, fingerprint, folder, manifest)

    def stash(self, step: str, folder: Path) -> str | None:
        """Move the step folder `folder` into the cache under the fingerprint its manifest records; returns that
        fingerprint, or None when the folder held nothing worth keeping (no manifest: it is removed)."""
        if not folder.exists():
            return None
        manifest = read_manifest(folder)
        fingerprint = manifest.get("fingerprint") if manifest else None
        if not isinstance(fingerprint, str) or not fingerprint:
            shutil.rmtree(folder)
            return None
        target = self._dir(step, fingerprint)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)
        _touch(target)
        return fingerprint

    def restore(self, step: str, fingerprint: str, folder: Path) -> None:
        """Move the cached version back to `folder` (which must not exist)."""
        source = self._dir(step, fingerprint)
        contained(folder).parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, folder)

    def drop(self, step: str, fingerprint: str | None = None) -> None:
        """Delete the cached version of `step` with `fingerprint` (every version of `step` when None)."""
        target = self.root / step if fingerprint is None else self._dir(step, fingerprint)
        shutil.rmtree(target, ignore_errors=True)

    def entries(self, step: str | None = None) -> list[CachedVersion]:
        """Every cached version (of `step`), most recently used first."""
        found = []
        steps = [step] if step is not None else sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        for name in steps:
            folder = self.root / name
            if not folder.is_dir():
                continue
            for version in folder.iterdir():
                manifest = read_manifest(version) if version.is_dir() else None
                found.append(CachedVersion(name, version.name, version, manifest or {}))
        return sorted(found, key=lambda v: _mtime(v.dir), reverse=True)

    def prune(self, step: str) -> list[CachedVersion]:
        """Keep the `versions` most recently used versions of `step`; returns the ones deleted."""
        removed = self.entries(step)[self.versions:]
        for version in removed:
            shutil.rmtree(version.dir, ignore_errors=True)
        return removed

    def usage(self) -> tuple[int, int]:
        """(number of cached versions, their total size in bytes)."""
        versions = self.entries()
        size = sum(p.stat().st_size for v in versions for p in v.dir.rglob("*") if p.is_file())
        return len(versions), size


def _touch(path: Path) -> None:
    now = time.time()
    os.utime(path, (now, now))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
