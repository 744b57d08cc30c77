"""Artefacts on disk: atomic writes, sha256 digests, and the per-step manifest.json with its done/stale check.

A manifest is JSON:
    {"step": "stage2", "status": "running" | "done", "fingerprint": "<sha256>",
     "fingerprint_parts": {"version": ..., "keys": {key: value}, "inputs": {name: sha256}, "extra": ...},
     "inputs": {name: sha256}, "outputs": {relpath: sha256}, "timings": {...}, "metrics": {...},
     "progress": {"iteration": k, "total": N}}
Every file is written to a temporary name in its own folder, fsynced and renamed into place, so a crash never
leaves a half-written file under a final name; a failed write removes the temporary and keeps the old file.

Fault injection (tests and bench/kill_campaign.py only): FRCNN_FAULT="<action>:<pattern>:<n>" makes the n-th atomic
write (in this process) whose path ends with the glob <pattern> ("stage2/manifest.json", "snapshots/iter_*.pt",
"model.pt") fail after its temporary is written and before the rename: action "kill" truncates the temporary to
half and SIGKILLs the process, "enospc" raises OSError(ENOSPC), "sigint"/"sigterm" send that signal to the
process. "nan:<step>:<k>" is read by the training loop: iteration k of step <step> gets a NaN loss.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .paths import contained

MANIFEST = "manifest.json"
FINAL_MODEL = "model.pt"  # a training step's final weights
SNAPSHOT_DIR = "snapshots"  # a training step's resumable snapshots
FAULT_ENV = "FRCNN_FAULT"
_fault_counts: dict[str, int] = {}
_CHUNK = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and os.replace it onto `path`, else remove it."""
    final = contained(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; artefacts get the usual permissions
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        if FAULT_ENV in os.environ:
            inject_write_fault(final, tmp)
        os.replace(tmp, final)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename is None:
            raise OSError(err.errno, f"{err.strerror or err} while writing", str(final)) from err
        raise
    _fsync_dir(final.parent)


def parse_fault(spec: str) -> tuple[str, str, int]:
    """(action, pattern, n) of an FRCNN_FAULT value; ValueError naming the variable when malformed."""
    action, _, rest = spec.partition(":")
    pattern, _, count = rest.rpartition(":")
    if action not in ("kill", "enospc", "sigint", "sigterm", "nan") or not pattern or not count.isdigit():
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected <kill|enospc|sigint|sigterm|nan>:<pattern>:<n>")
    return action, pattern, int(count)


def inject_write_fault(final: Path, tmp: Path) -> None:
    """Act on FRCNN_FAULT when `final` is the n-th matching write of this process (see the module docstring)."""
    action, pattern, n = parse_fault(os.environ[FAULT_ENV])
    if action == "nan" or not fnmatch.fnmatch(final.as_posix(), "*/" + pattern.lstrip("/")):
        return
    _fault_counts[pattern] = _fault_counts.get(pattern, 0) + 1
    if _fault_counts[pattern] != n:
        return
    if action == "kill":
        os.truncate(tmp, tmp.stat().st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically (the previous file survives any failure)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_digests: dict[tuple[str, int, int, int], str] = {}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (remembered per (path, inode, size, mtime) within this process)."""
    stat = os.stat(path)
    key = (os.fspath(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def outputs_digest(outputs: dict[str, str]) -> str:
    """One sha256 standing for a step's outputs {relpath: sha256}: what downstream fingerprints consume."""
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(step_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The step's manifest, or None when it is absent or unreadable: a torn file, or a hand-edited one whose
    fields have the wrong types (never raises; the step then reads as not done)."""
    try:
        with open(Path(step_dir) / MANIFEST, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and manifest_problem(data) is None else None


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def manifest_problem(data: dict[str, Any]) -> str | None:
    """None when every field a manifest may have has its type (see the module docstring), else the first field
    that does not: a manifest edited by hand must not reach the engine as an AttributeError."""
    for key in ("step", "status", "fingerprint"):
        if key in data and not isinstance(data[key], str):
            return key
    fingerprint = data.get("fingerprint")
    if fingerprint is not None and not all(c in "0123456789abcdef" for c in fingerprint):
        return "fingerprint"
    for key in ("fingerprint_parts", "timings", "metrics"):
        if key in data and data[key] is not None and not isinstance(data[key], dict):
            return key
    for key in ("inputs", "outputs"):
        if key in data and data[key] is not None and not _str_map(data[key]):
            return key
    for rel in (data.get("outputs") or {}):
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts:
            return "outputs"
    progress = data.get("progress")
    if progress is not None and not (isinstance(progress, dict) and all(
            isinstance(progress.get(k), int) and not isinstance(progress.get(k), bool)
            for k in ("iteration", "total") if k in progress)):
        return "progress"
    timings = data.get("timings") or {}
    if "seconds" in timings and not _number(timings["seconds"]):
        return "timings"
    if "world_size" in data and not (isinstance(data["world_size"], int) and not isinstance(data["world_size"], bool)):
        return "world_size"
    return None


def write_manifest(step_dir: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    atomic_write_json(Path(step_dir) / MANIFEST, manifest)


def update_manifest(step_dir: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Read, update the given top-level fields, and write the manifest back atomically."""
    manifest = read_manifest(step_dir) or {}
    manifest.update(fields)
    write_manifest(step_dir, manifest)
    return manifest


def hash_outputs(step_dir: str | os.PathLike[str], relpaths: list[str]) -> dict[str, str]:
    """{relpath: sha256} for the files a step produced; a missing one raises FileNotFoundError naming it."""
    root = Path(step_dir)
    result = {}
    for rel in relpaths:
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"output {rel} of {root.name} does not exist ({path})")
        result[rel] = sha256_file(path)
    return result


def stale_reason(step_dir: str | os.PathLike[str], fingerprint: str,
                 parts: dict[str, Any] | None = None, verify_hashes: bool = True) -> str | None:
    """None when the step is done and current, else why not: 'missing', 'partial at iteration k/N',
    'fingerprint changed: TEST.NMS', 'output model.pt missing', 'output model.pt sha256 mismatch', ..."""
    manifest = read_manifest(step_dir)
    if manifest is None:
        return "missing" if not (Path(step_dir) / MANIFEST).exists() else "manifest unreadable"
    if manifest.get("status") != "done":
        progress = manifest.get("progress") or {}
        if "iteration" in progress and "total" in progress:
            return f"partial at iteration {progress['iteration']}/{progress['total']}"
        return "partial (interrupted)"
    if manifest.get("fingerprint") != fingerprint:
        return "fingerprint changed: " + describe_change(manifest.get("fingerprint_parts") or {}, parts or {})
    for rel, recorded in (manifest.get("outputs") or {}).items():
        path = Path(step_dir) / rel
        if not path.is_file():
            return f"output {rel} missing"
        if verify_hashes and sha256_file(path) != recorded:
            return f"output {rel} sha256 mismatch"
    return None


def describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Names what differs between two fingerprint_parts: config keys, inputs, code version."""
    changed: list[str] = []
    old_keys, new_keys = old.get("keys") or {}, new.get("keys") or {}
    changed += sorted(k for k in set(old_keys) | set(new_keys) if old_keys.get(k, ...) != new_keys.get(k, ...))
    old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
    changed += [f"input {k}" for k in sorted(set(old_in) | set(new_in)) if old_in.get(k) != new_in.get(k)]
    if old.get("version") != new.get("version"):
        changed.append("step code version")
    if old.get("extra") != new.get("extra"):
        changed.append("extra")
    return ", ".join(changed) if changed else "unknown (no recorded parts)"
