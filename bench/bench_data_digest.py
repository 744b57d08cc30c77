"""Benchmark the data content digest (roidb.content) on a generated VOC-format folder; prints a table.

    python3 bench/bench_data_digest.py [--images 5000] [--repeats 3] [--threads N] [--keep DIR]

Writes ``--images`` JPEGs (VOC-like sizes: 500 px on the long side, 50-120 KB each, every file distinct) and VOC
annotation XMLs into a temporary VOC folder, sets every mtime an hour back (a dataset is not written the second
before it is used), then times:

- reading every file once (``readall`` per file: the bytes a digest must at least read; one thread, and as many
  threads as the digest uses), with the page cache as generation left it (the files are cached), and, when this
  process may write ``/proc/sys/vm/drop_caches`` (root; it empties the page cache of the whole machine; skip it
  with ``--no-drop``), again from the disk;
- the cold digest: build the imdb, stat and sha256 every file (no stat cache), write the stat cache;
- the warm digest: a new StatCache read from its file and a new imdb (what ``pipeline.py status`` does in a
  new process, less the interpreter start and imports), nothing changed; the median of ``--repeats``;
- the warm digest after touching 10 files (their mtime is now, so they are re-hashed).

Targets (issue 13): warm <= 1 s, cold <= 1.5x read-once.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roidb.content import StatCache, content_digest, content_listing  # noqa: E402
from roidb.factory import get_imdb  # noqa: E402
from roidb.pascal_voc import VOC_CLASSES  # noqa: E402

SIZES = [(375, 500), (333, 500), (500, 375), (500, 333), (375, 500), (281, 500)]
POOL = 48
AGE_S = 3600


def _jpeg_pool(rng: np.random.Generator) -> list[bytes]:
    """POOL textured JPEGs (quality 90) of 40-130 KB; each file gets a unique comment segment on top."""
    pool = []
    for k in range(POOL):
        h, w = SIZES[k % len(SIZES)]
        noise = rng.normal(0, 1, (h // 4, w // 4, 3)).astype(np.float32)
        base = cv2.resize(cv2.GaussianBlur(noise, (0, 0), rng.uniform(1, 3)), (w, h), interpolation=cv2.INTER_CUBIC)
        detail = rng.normal(0, rng.uniform(7, 22), (h, w, 3)).astype(np.float32)
        image = np.clip(128 + 60 * base / base.std() + detail, 0, 255).astype(np.uint8)
        pool.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return pool


def _unique(jpeg: bytes, image_id: str) -> bytes:
    """The JPEG with a COM segment naming ``image_id`` after SOI: still a valid JPEG, distinct bytes."""
    comment = f"bench image {image_id}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def _xml(image_id: str, h: int, w: int, rng: np.random.Generator) -> str:
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        x1, y1 = int(rng.integers(1, w - 20)), int(rng.integers(1, h - 20))
        x2, y2 = int(rng.integers(x1 + 5, w + 1)), int(rng.integers(y1 + 5, h + 1))
        name = VOC_CLASSES[int(rng.integers(1, len(VOC_CLASSES)))]
        objects.append(f"\n\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
                       f"\t\t<truncated>{int(rng.random() < 0.3)}</truncated>\n"
                       f"\t\t<difficult>{int(rng.random() < 0.1)}</difficult>\n\t\t<bndbox>\n"
                       f"\t\t\t<xmin>{x1}</xmin>\n\t\t\t<ymin>{y1}</ymin>\n\t\t\t<xmax>{x2}</xmax>\n"
                       f"\t\t\t<ymax>{y2}</ymax>\n\t\t</bndbox>\n\t</object>")
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{image_id}.jpg</filename>\n\t<source>\n"
            f"\t\t<database>The VOC2007 Database</database>\n\t\t<annotation>PASCAL VOC2007</annotation>\n"
            f"\t\t<image>flickr</image>\n\t\t<flickrid>{int(rng.integers(1e8, 1e9))}</flickrid>\n\t</source>\n"
            f"\t<owner>\n\t\t<flickrid>bench</flickrid>\n\t\t<name>?</name>\n\t</owner>\n\t<size>\n"
            f"\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>{''.join(objects)}\n</annotation>\n")


def make_folder(voc: Path, n: int, seed: int = 0) -> tuple[int, int]:
    """Write a VOC2007-layout folder with ``n`` images; returns (total JPEG bytes, total XML bytes)."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    pool = _jpeg_pool(rng)
    ids = [f"{i:06d}" for i in range(1, n + 1)]
    jpeg_bytes = xml_bytes = 0
    for image_id in ids:
        k = int(rng.integers(POOL))
        h, w = SIZES[k % len(SIZES)]
        data = _unique(pool[k], image_id)
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(data)
        xml = _xml(image_id, h, w, rng).encode()
        (voc / "Annotations" / f"{image_id}.xml").write_bytes(xml)
        jpeg_bytes, xml_bytes = jpeg_bytes + len(data), xml_bytes + len(xml)
    (voc / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    old = time.time() - AGE_S
    for p in voc.rglob("*"):
        os.utime(p, (old, old))
    return jpeg_bytes, xml_bytes


def _read(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            f.readall()


def read_once(paths: list[str], threads: int = 1) -> tuple[float, float]:
    """(wall s, CPU s) to read every file once, in ``threads`` threads."""
    t0, c0 = time.perf_counter(), time.process_time()
    if threads == 1:
        _read(paths)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(_read, [paths[i:i + 16] for i in range(0, len(paths), 16)]))
    return time.perf_counter() - t0, time.process_time() - c0


def drop_caches() -> str | None:
    """Flush the page cache; None when done, else why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def digest(name: str, cache_file: Path, cache_dir: Path, threads: int | None):
    """((wall s, CPU s), the StatCache, the digest) of building the imdb, listing it and saving the cache."""
    t0, c0 = time.perf_counter(), time.process_time()
    imdb = get_imdb(name, cache_dir=cache_dir)
    cache = StatCache(cache_file, n_threads=threads)
    value = content_digest(content_listing(imdb, cache))
    return (time.perf_counter() - t0, time.process_time() - c0), cache, value


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="hashing threads (default: StatCache's)")
    parser.add_argument("--no-drop", action="store_true", help="do not try to drop the page cache")
    parser.add_argument("--keep", type=Path, default=None, help="generate into (or reuse) this folder and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_digest_") as tmp:
        voc = (args.keep or Path(tmp) / "data") / "VOC2007"
        if not (voc / "ImageSets/Main/trainval.txt").is_file():
            t0 = time.perf_counter()
            jpeg_bytes, xml_bytes = make_folder(voc, args.images)
            print(f"generated {args.images} images in {time.perf_counter() - t0:.1f} s: {voc}")
        name = f"vocfmt:{voc}:trainval"
        imdb = get_imdb(name, cache_dir=Path(tmp) / "c0")
        paths = [p for _, _, p in imdb.content_files()[1]]
        jpeg_bytes = sum(os.path.getsize(p) for p in paths if p.endswith(".jpg"))
        xml_bytes = sum(os.path.getsize(p) for p in paths if p.endswith(".xml"))
        threads = args.threads if args.threads is not None else StatCache(Path(tmp) / "x").n_threads
        rows = []

        read_s = read_once(paths)
        cache_file = Path(tmp) / "c1" / "stat_cache.json"
        cold_s, cache, cold_digest = digest(name, cache_file, Path(tmp) / "c1", args.threads)
        one_s, one, _ = digest(name, Path(tmp) / "c1t" / "stat_cache.json", Path(tmp) / "c1t", 1)
        rows += [("read every file once, 1 thread (page cache warm)", read_s, len(paths), ""),
                 (f"read every file once, {threads} threads (page cache warm)", read_once(paths, threads),
                  len(paths), ""),
                 (f"cold digest, {threads} threads (page cache warm)", cold_s, cache.files_hashed,
                  f"{cold_s[0] / read_s[0]:.2f}x read-once (target <= 1.5x)"),
                 ("cold digest, 1 thread (page cache warm)", one_s, one.files_hashed,
                  f"{one_s[0] / read_s[0]:.2f}x read-once")]

        warm = []
        for _ in range(args.repeats):
            warm_s, cache, warm_digest = digest(name, cache_file, Path(tmp) / "c1", args.threads)
            assert warm_digest == cold_digest and cache.files_hashed == 0
            warm.append(warm_s)
        rows.append((f"warm digest, nothing changed (median of {args.repeats})",
                     tuple(statistics.median(w[k] for w in warm) for k in (0, 1)), 0, "target <= 1 s"))
        for p in paths[1::len(paths) // 10][:10]:
            os.utime(p)
        touched_s, cache, touched_digest = digest(name, cache_file, Path(tmp) / "c1", args.threads)
        assert touched_digest == cold_digest
        rows.append(("warm digest after touching 10 files", touched_s, cache.files_hashed, ""))

        why = None if args.no_drop else drop_caches()
        if why is None and not args.no_drop:
            disk_read_s = read_once(paths)
            drop_caches()
            disk_cold_s, cache, _ = digest(name, Path(tmp) / "c2" / "stat_cache.json", Path(tmp) / "c2",
                                           args.threads)
            rows += [("read every file once, 1 thread (caches dropped)", disk_read_s, len(paths), ""),
                     (f"cold digest, {threads} threads (caches dropped)", disk_cold_s, cache.files_hashed,
                      f"{disk_cold_s[0] / disk_read_s[0]:.2f}x read-once (target <= 1.5x)")]
        fresh = subprocess.run(
            [sys.executable, "-c", "import sys, time; t = time.perf_counter(); sys.path.insert(0, sys.argv[1]);"
             "from roidb.factory import get_imdb; from roidb.content import *;"
             "imdb = get_imdb(sys.argv[2], cache_dir=sys.argv[3]); content_digest(content_listing(imdb, "
             "StatCache(sys.argv[4]))); print(time.perf_counter() - t, time.process_time())",
             str(Path(__file__).resolve().parents[1]), name, str(Path(tmp) / "c1"), str(cache_file)],
            capture_output=True, text=True, check=True)
        rows.append(("warm digest in a new process, imports included", tuple(map(float, fresh.stdout.split())),
                     0, ""))
        status = [sys.executable, str(Path(__file__).resolve().parents[1] / "pipeline.py"), "status",
                  "--set", "PIPELINE.DATA_ROOT", str(Path(tmp) / "root"), "--set", "PIPELINE.OUTPUT_ROOT",
                  str(Path(tmp) / "out"), "--set", "PIPELINE.CLASSES", "[]", "--set", "PIPELINE.TRAIN_IMDB", name,
                  "--set", "PIPELINE.TEST_IMDB", name]
        subprocess.run(status, capture_output=True, text=True, check=True)  # fills the root's stat cache
        times = []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), _children_cpu()
            subprocess.run(status, capture_output=True, text=True, check=True)
            times.append((time.perf_counter() - t0, _children_cpu() - c0))
        rows.append((f"`pipeline.py status`, warm stat cache (median of {args.repeats})",
                     tuple(statistics.median(t[k] for t in times) for k in (0, 1)), 0,
                     "whole process; target <= 1 s"))

    print(f"\n{args.images} images: {jpeg_bytes / 1e6:.0f} MB of JPEG (mean {jpeg_bytes / args.images / 1e3:.0f} KB), "
          f"{xml_bytes / 1e6:.1f} MB of XML; {len(paths)} files; stat cache {cache_file.name}")
    print(f"| {'case':<56} | {'wall s':>7} | {'CPU s':>7} | {'files read':>10} | {'':<40} |")
    print(f"|{'-' * 58}|{'-' * 9}|{'-' * 9}|{'-' * 12}|{'-' * 42}|")
    for case, (wall, cpu), hashed, note in rows:
        print(f"| {case:<56} | {wall:>7.3f} | {cpu:>7.3f} | {hashed:>10} | {note:<40} |")
    if args.no_drop:
        print("(--no-drop: every row ran with the files in the page cache)")
    elif why is not None:
        print(f"(could not drop the page cache: writing /proc/sys/vm/drop_caches failed: {why}; every row ran "
              f"with the files in the page cache)")
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; one run each unless a median "
          f"is stated; CPU s = this process's user+system time, all threads (a child's for `pipeline.py status`)")


if __name__ == "__main__":
    main()
