"""Data identity: a stat cache of file sha256s and the path-free content listing and digest of an imdb.

An imdb's *content* is what changes its roidb or its images: the image-set ids in order, the sha256 of every
annotation file's bytes, the sha256 of every image file's bytes, and the options that change how they are read
(class list, parse options, parser version). Paths are not content: the same files in another folder give the
same :func:`content_digest`.

Hashing every image on every ``status`` is too slow for VOC-sized data, so sha256s go through a
:class:`StatCache` (DVC's "state"): a file whose (size, mtime_ns, inode, ctime_ns) match the cached entry for its
resolved path is not read again (the ctime catches an in-place edit that restored the mtime). A file modified
less than ``racy_window_ns`` before it was hashed is not cached (git's "racily clean" problem: a second write
in the same timestamp tick would keep size and mtime), so it is hashed again next time.

Typical use (what ``status`` does)::

    cache = StatCache(data_root / "cache" / "stat_cache.json")
    listing = content_listing(imdb, cache)          # stats every file, hashes only the changed ones, saves
    digest = content_digest(listing)                # 64 hex chars; equal listings <=> equal digests
    describe_content_change(old_listing, listing)   # e.g. "2 annotations, 1 image, image set"
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from roidb.guard import checked_write_path, file_kind
from roidb.errors import DataError

__all__ = ["StatCache", "hash_file", "content_listing", "content_digest", "describe_content_change",
           "store_listing", "load_listing", "CONTENT_KINDS"]

CONTENT_KINDS = ("annotation", "image")
_CACHE_FORMAT = "frcnn-stat-cache"
_CACHE_VERSION = 1
_DIGEST_PREFIX = b"frcnn-data-content/1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WHOLE_READ = 1 << 24          # files under 16 MiB are read in one call; larger ones in 4 MiB chunks
_CHUNK = 1 << 22
_BATCH = 16                    # files per thread-pool task (one future per file costs more than a small hash)


def hash_file(path: str) -> tuple[str, os.stat_result]:
    """sha256 hex digest of the file at ``path`` and its ``fstat`` taken before reading.

    Raises OSError (FileNotFoundError, IsADirectoryError, PermissionError, ...) as ``open`` does.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        h = hashlib.sha256()
        want = st.st_size + 1 if st.st_size < _WHOLE_READ else _CHUNK
        while True:
            data = os.read(fd, want)  # a short read of a regular file is its end
            h.update(data)
            if len(data) < want:
                break
            want = _CHUNK
    finally:
        os.close(fd)
    return h.hexdigest(), st


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _atomic_write(path: Path, data: bytes) -> None:
    path = checked_write_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class StatCache:
    """A persistent map (resolved path, size, mtime_ns, inode, ctime_ns) -> sha256, kept in one JSON file.

    The file is read on first use and written by :meth:`save` only when an entry was added or changed, to a
    temporary name renamed into place. A missing, damaged or foreign file is ignored (the cache starts empty);
    a cache folder that cannot be written leaves the cache unsaved, never an error. At most ``max_entries``
    entries are kept: those used by this object first, then the most recently written.

    Args:
        path: the cache file, e.g. ``<data_root>/cache/stat_cache.json``.
        max_entries: the bound on the number of files remembered.
        racy_window_ns: files modified less than this before they were hashed are hashed again next time.
        n_threads: threads hashing changed files (default: twice the CPUs, at most 8; hashlib and file reads
            release the GIL).
    Attributes:
        files_hashed: how many files this object has read and hashed (cache misses).
        files_statted: how many files it has looked up.
    """

    def __init__(self, path: str | os.PathLike, *, max_entries: int = 300_000,
                 racy_window_ns: int = 2_000_000_000, n_threads: int | None = None):
        self.path = Path(path)
        self.max_entries = int(max_entries)
        self.racy_window_ns = int(racy_window_ns)
        self.n_threads = n_threads if n_threads is not None else min(8, 2 * _usable_cpus())
        self.files_hashed = 0
        self.files_statted = 0
        self._entries: dict[str, tuple[int, int, int, int, str]] | None = None
        self._used: set[str] = set()
        self._dirty = False

    # ------------------------------------------------------------------ persistence
    def _load(self) -> dict[str, tuple[int, int, int, int, str]]:
        if self._entries is None:
            self._entries = self._read_file()
        return self._entries

    def _read_file(self) -> dict[str, tuple[int, int, int, int, str]]:
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return {}
        if not (isinstance(doc, dict) and doc.get("format") == _CACHE_FORMAT and doc.get("version") == _CACHE_VERSION
                and isinstance(doc.get("entries"), dict)):
            return {}
        entries = {}
        for key, value in doc["entries"].items():
            if (isinstance(value, list) and len(value) == 5 and all(type(v) is int for v in value[:4])
                    and isinstance(value[4], str) and _HEX64.fullmatch(value[4])):
                entries[key] = tuple(value)
        return entries

    def save(self) -> bool:
        """Write the cache if an entry changed since it was read; True when it was written."""
        if not self._dirty or self._entries is None:
            return False
        entries = self._entries
        if len(entries) > self.max_entries:
            keys = [k for k in entries if k not in self._used] + [k for k in entries if k in self._used]
            entries = self._entries = {k: entries[k] for k in keys[len(keys) - self.max_entries:]}
        doc = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "entries": entries}
        try:
            _atomic_write(self.path, json.dumps(doc, separators=(",", ":")).encode())
        except OSError:
            return False
        self._dirty = False
        return True

    def __len__(self) -> int:
        return len(self._load())

    # ------------------------------------------------------------------ lookups
    def sha256(self, path: str | os.PathLike, label: str | tuple[str, str] = "file") -> str:
        """sha256 hex digest of one file (see :meth:`sha256_many`)."""
        return self.sha256_many([path], [label])[0]

    def sha256_many(self, paths: Sequence[str | os.PathLike],
                    labels: Sequence[str | tuple[str, str]] | None = None) -> list[str]:
        """sha256 hex digests of ``paths``, in order; only files whose stat changed are read.

        Args:
            labels: what each file is, for error messages (default "file"): a string ("annotation file") or
                (what, context), giving e.g. ``<path>: image file not found (image '12', listed in <txt>)``.
        Raises:
            DataError: a file is missing or unreadable; the message names it.
        """
        entries = self._load()
        now = time.time_ns()
        dirs: dict[str, str] = {}
        keys, digests, todo = [], [], []
        for i, path in enumerate(paths):
            path = os.fspath(path)
            head, _, tail = (path if os.path.isabs(path) else os.path.abspath(path)).rpartition(os.sep)
            real = dirs.get(head)
            if real is None:
                real = dirs[head] = os.path.join(os.path.realpath(head or os.sep), "")
            key = real + tail
            keys.append(key)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise self._error(path, labels, i, exc) from None
            if not stat.S_ISREG(st.st_mode):
                raise self._error(path, labels, i, None, file_kind(st.st_mode))
            entry = entries.get(key)
            if entry is not None and entry[:4] == (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns):
                digests.append(entry[4])
            else:
                digests.append(None)
                todo.append(i)
        self.files_statted += len(keys)
        self._used.update(keys)
        for i, (digest, st) in zip(todo, self._hash_all([os.fspath(paths[i]) for i in todo], labels, todo)):
            digests[i] = digest
            stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, digest)
            if st.st_mtime_ns < now - self.racy_window_ns:
                if entries.get(keys[i]) != stamp:
                    entries[keys[i]] = stamp
                    self._dirty = True
            elif entries.pop(keys[i], None) is not None:
                self._dirty = True
        return digests

    def _hash_all(self, paths: list[str], labels, positions: list[int]) -> list[tuple[str, os.stat_result]]:
        def run(batch: list[int]) -> list:
            out = []
            for j in batch:
                try:
                    out.append(hash_file(paths[j]))
                except OSError as exc:
                    out.append(self._error(paths[j], labels, positions[j], exc))
            return out

        batches = [list(range(s, min(s + _BATCH, len(paths)))) for s in range(0, len(paths), _BATCH)]
        if self.n_threads > 1 and len(batches) > 1:
            with ThreadPoolExecutor(max_workers=self.n_threads) as pool:
                results = [r for chunk in pool.map(run, batches) for r in chunk]
        else:
            results = [r for b in batches for r in run(b)]
        for r in results:
            if isinstance(r, DataError):
                raise r
        self.files_hashed += len(results)
        return results

    @staticmethod
    def _error(path: str, labels, i: int, exc: OSError | None, kind: str = "") -> DataError:
        label = labels[i] if labels is not None else "file"
        what, context = (label, "") if isinstance(label, str) else (label[0], f" ({label[1]})")
        if exc is None:
            return DataError(path, f"{what} is {kind}, not a regular file{context}"
                             if kind else f"{what} is not a regular file{context}")
        if isinstance(exc, FileNotFoundError):
            return DataError(path, f"{what} not found{context}")
        return DataError(path, f"cannot read {what} ({exc.strerror or exc}){context}")


# ---------------------------------------------------------------------- listings
def _imdb_listing(imdb, stat_cache: StatCache) -> dict:
    options, entries = imdb.content_files()
    if not isinstance(options, dict) or "classes" not in options:
        raise TypeError(f"{type(imdb).__name__}.content_files() must return an options dict with 'classes'")
    for kind, _, _ in entries:
        if kind not in CONTENT_KINDS:
            raise TypeError(f"{type(imdb).__name__}.content_files(): unknown entry kind '{kind}'")
    source = imdb.content_source()
    labels = [(f"{kind} file", f"image '{image_id}', listed in {source}" if image_id else f"of {imdb.name}")
              for kind, image_id, _ in entries]
    digests = stat_cache.sha256_many([path for _, _, path in entries], labels)
    listing = {"options": json.loads(json.dumps(options)), "ids": [],
               "annotations": {}, "images": {}}
    for (kind, image_id, _), digest in zip(entries, digests):
        if kind == "image":
            listing["ids"].append(image_id)
            listing["images"][image_id] = digest
        else:
            listing["annotations"][image_id] = digest
    return listing


def content_listing(imdb, stat_cache: StatCache | None = None, *, save: bool = True) -> dict:
    """The path-free content of an imdb (or of the imdbs of an ``'a+b'`` name, given as a list).

    Returns::

        {"options": {...},                 # imdb.content_files()'s options: "classes" and the parse options
         "ids": [image id, ...],           # the image set, in order
         "annotations": {id: sha256},      # per image; a dataset-wide annotation file (COCO JSON) under ""
         "images": {id: sha256}}

    For several imdbs, ids are prefixed with the imdb's position (``"0:000001"``, ``"1:000001"``) and
    ``options`` is ``{"classes": [...], "parts": [each imdb's other options]}``.

    Args:
        stat_cache: defaults to ``imdb.stat_cache`` (``<cache_dir>/stat_cache.json``).
        save: write the stat cache afterwards (only if an entry changed).
    Raises:
        DataError: a listed file is missing or unreadable (one line naming the file), or the imdbs of a
            combined list have different class lists.
    """
    imdbs = list(imdb) if isinstance(imdb, (list, tuple)) else [imdb]
    if not imdbs:
        raise DataError("imdb", "content_listing needs at least one imdb")
    cache = stat_cache if stat_cache is not None else imdbs[0].stat_cache
    try:
        parts = [_imdb_listing(one, cache) for one in imdbs]
    finally:
        if save:
            cache.save()
    if len(parts) == 1:
        return parts[0]
    classes = parts[0]["options"]["classes"]
    for one, part in zip(imdbs[1:], parts[1:]):
        if part["options"]["classes"] != classes:
            raise DataError(one.name, f"class list differs from {imdbs[0].name}'s; they cannot be combined")
    combined = {"options": {"classes": classes,
                            "parts": [{k: v for k, v in p["options"].items() if k != "classes"} for p in parts]},
                "ids": [], "annotations": {}, "images": {}}
    for k, part in enumerate(parts):
        combined["ids"] += [f"{k}:{i}" for i in part["ids"]]
        for field in ("annotations", "images"):
            combined[field].update({f"{k}:{i}": d for i, d in part[field].items()})
    return combined


def _canonical(listing: dict) -> bytes:
    return json.dumps(listing, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def content_digest(listing: dict) -> str:
    """sha256 hex digest of a listing's canonical JSON (sorted keys; ids keep their order)."""
    return hashlib.sha256(_DIGEST_PREFIX + _canonical(listing)).hexdigest()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_content_change(old: dict | None, new: dict) -> str:
    """What differs between two listings, e.g. ``"2 annotations, 1 image, image set"``; ``""`` if nothing.

    Counted: annotations and images whose bytes changed for ids in both image sets (a dataset-wide annotation
    file counts as one annotation). ``image set``: ids added, removed or reordered. ``class list`` and
    ``parse options``: the options differ. ``content`` when the listings differ in some other way (e.g. an
    old listing of another format); ``"content"`` too when ``old`` is None or not a listing.
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "content"
    if _canonical(old) == _canonical(new):
        return ""
    try:
        old_ids, new_ids = list(old["ids"]), list(new["ids"])
        both = set(old_ids) & set(new_ids)
        everywhere = set(old_ids) | set(new_ids)
        out = []
        for field, word in (("annotations", "annotation"), ("images", "image")):
            a, b = dict(old[field]), dict(new[field])
            n = sum(a.get(k) != b.get(k) for k in set(a) | set(b) if k in both or k not in everywhere)
            if n:
                out.append(_plural(n, word))
        if old_ids != new_ids:
            out.append("image set")
        old_opts, new_opts = dict(old["options"]), dict(new["options"])
        if old_opts.get("classes") != new_opts.get("classes"):
            out.append("class list")
        old_opts.pop("classes", None)
        new_opts.pop("classes", None)
        if old_opts != new_opts:
            out.append("parse options")
    except (KeyError, TypeError, ValueError):
        return "content"
    return ", ".join(out) or "content"


# ---------------------------------------------------------------------- stored listings
def store_listing(folder: str | os.PathLike, listing: dict, *, keep: int = 32) -> str:
    """Write ``listing`` to ``<folder>/<digest>.json`` (atomically) and return its digest.

    Keeps the ``keep`` most recently stored listings of the folder, so :func:`describe_content_change` can be
    given the listing a finished step saw. Files other than ``<64 hex>.json`` are never touched.
    """
    folder = Path(folder)
    digest = content_digest(listing)
    path = folder / f"{digest}.json"
    if path.is_file():
        os.utime(path)
    else:
        _atomic_write(path, _canonical(listing))
    stored = []
    for p in folder.iterdir():
        if p.suffix == ".json" and _HEX64.fullmatch(p.stem) and p != path:
            try:
                stored.append((p.stat().st_mtime_ns, p))
            except OSError:
                continue
    for _, old in sorted(stored)[:max(0, len(stored) + 1 - keep)]:
        old.unlink(missing_ok=True)
    return digest


def load_listing(folder: str | os.PathLike, digest: str) -> dict | None:
    """The listing stored under ``digest`` by :func:`store_listing`, or None if absent, damaged or not it."""
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        return None
    try:
        listing = json.loads(Path(folder, f"{digest}.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(listing, dict) or content_digest(listing) != digest:
        return None
    return listing
