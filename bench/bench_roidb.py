"""Benchmark gt_roidb on a generated VOC-format folder (cold parse, cache load) and the shapes-set generation.

    python3 bench/bench_roidb.py [--images 5000] [--repeats 3] [--no-shapes]

Writes ``--images`` annotation files (1-6 VOC objects each) and small JPEGs into a temporary VOC folder,
then times ``PascalVoc.gt_roidb()`` with an empty cache folder (cold: read, digest, parse, header checks,
cache write) and again with the cache in place (warm: digest + cache load). Prints the median of the repeats.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roidb.pascal_voc import VOC_CLASSES, PascalVoc  # noqa: E402
from roidb.synthetic import NUM_TEST, NUM_TRAINVAL, ensure_shapes_dataset  # noqa: E402

SIZES = [(375, 500), (333, 500), (500, 375), (480, 640), (281, 500)]


def _xml(image_id: str, h: int, w: int, rng: np.random.Generator) -> str:
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        x1, y1 = int(rng.integers(1, w - 20)), int(rng.integers(1, h - 20))
        x2, y2 = int(rng.integers(x1 + 5, w + 1)), int(rng.integers(y1 + 5, h + 1))
        name = VOC_CLASSES[int(rng.integers(1, len(VOC_CLASSES)))]
        objects.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                       f"<difficult>{int(rng.random() < 0.1)}</difficult><bndbox><xmin>{x1}</xmin>"
                       f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{''.join(objects)}</annotation>")


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    voc = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    jpegs = {s: cv2.imencode(".jpg", np.full((*s, 3), 128, np.uint8))[1].tobytes() for s in SIZES}
    ids = [f"{i:06d}" for i in range(1, n + 1)]
    for image_id in ids:
        h, w = SIZES[int(rng.integers(len(SIZES)))]
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpegs[(h, w)])
        (voc / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, h, w, rng))
    (voc / "ImageSets/Main/trainval.txt").write_text("\n".join(ids) + "\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-shapes", action="store_true", help="skip timing the shapes-set generation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        devkit = make_folder(Path(tmp) / "devkit", args.images)
        cold, warm = [], []
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}"
            t0 = time.perf_counter()
            roidb = PascalVoc("trainval", 2007, devkit, cache_dir=cache).gt_roidb()
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = PascalVoc("trainval", 2007, devkit, cache_dir=cache).gt_roidb()
            warm.append(time.perf_counter() - t0)
            assert len(roidb) == len(again) == args.images
        boxes = sum(len(e["boxes"]) for e in roidb)
        rows = [("cold (parse + cache)", cold, 10.0), ("warm (from cache)", warm, 0.5)]
        if not args.no_shapes:
            t0 = time.perf_counter()
            ensure_shapes_dataset(Path(tmp) / "shapes", n_jobs=2)
            rows.append((f"shapes set, {NUM_TRAINVAL + NUM_TEST} images", [time.perf_counter() - t0], 30.0))
    print(f"gt_roidb on {args.images} VOC annotation files ({boxes} boxes), {os.cpu_count()} cores, "
          f"median of {args.repeats}")
    print(f"| {'case':<26} | {'median s':>9} | {'min s':>7} | {'target s':>8} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 9}|{'-' * 10}|")
    for name, times, target in rows:
        print(f"| {name:<26} | {statistics.median(times):>9.3f} | {min(times):>7.3f} | {target:>8.1f} |")


if __name__ == "__main__":
    main()
