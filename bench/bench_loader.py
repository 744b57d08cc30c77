"""Benchmark the training data loader against a simulated compute step; prints a table.

Writes ~400x300 JPEGs to a temporary folder, builds a roidb over them (GT boxes plus jittered proposals), and
runs RoIDataLoader for RPN batches (1 image) and Fast R-CNN batches (2 images, 128 RoIs) while the "training
step" either sleeps (an accelerator doing the work) or keeps torch busy on the CPU for the same time (so the
loader competes for the cores). Per configuration: the median over repeats of the per-step mean data wait, its
share of the step, the worst per-step wait seen, and batches/s.

    python3 bench/bench_loader.py [--step-ms 150] [--steps 20] [--repeats 3] [--images 48]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from roidb.loader import RoIDataLoader  # noqa: E402
from roidb.minibatch import get_minibatch  # noqa: E402

PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])
NUM_CLASSES = 6


def make_roidb(folder: str, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    roidb = []
    for i in range(n):
        w, h = (400, 300) if i % 4 else (300, 400)
        im = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        path = os.path.join(folder, f"{i:05d}.jpg")
        cv2.imwrite(path, im, [cv2.IMWRITE_JPEG_QUALITY, 90])
        g = int(rng.integers(1, 5))
        xy = rng.uniform(0, min(w, h) / 2, (g, 2))
        gt = np.hstack([xy, xy + rng.uniform(16, min(w, h) / 2, (g, 2))])
        props = np.repeat(gt, 500, axis=0) + rng.normal(0, 30, (500 * g, 4))
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 4)
        boxes = np.clip(np.vstack([gt, props]), 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
        ov = np.concatenate([np.ones(g), rng.uniform(0, 0.9, 500 * g)]).astype(np.float32)
        cls = np.concatenate([rng.integers(1, NUM_CLASSES, g), np.zeros(500 * g)]).astype(np.int32)
        mc = np.where(ov > 0, np.maximum(cls, 1), 0).astype(np.int32)
        targets = np.zeros((len(boxes), 5), np.float32)
        targets[ov >= 0.5, 0] = mc[ov >= 0.5]
        targets[ov >= 0.5, 1:] = rng.normal(0, 1, ((ov >= 0.5).sum(), 4))
        roidb.append({"image": path, "flipped": bool(i % 2), "width": w, "height": h, "boxes": boxes,
                      "gt_classes": cls, "max_overlaps": ov, "max_classes": mc, "bbox_targets": targets})
    return roidb


def simulated_step(ms: float, kind: str, a: torch.Tensor) -> None:
    end = time.perf_counter() + ms / 1000.0
    if kind == "sleep":
        time.sleep(ms / 1000.0)
        return
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def run(roidb, mode: str, workers: int, step_ms: float, kind: str, steps: int, seed: int) -> dict:
    has_rpn = mode == "rpn"
    blob_fn = functools.partial(get_minibatch, num_classes=NUM_CLASSES, scales=[600], max_size=1000,
                                pixel_means=PIXEL_MEANS, has_rpn=has_rpn, batch_size=128)
    a = torch.randn(384, 384) / 20
    with RoIDataLoader(roidb, blob_fn, ims_per_batch=1 if has_rpn else 2, seed=seed, num_workers=workers,
                       prefetch=4) as loader:
        next(loader)                                     # warm-up: the first batch has nothing to hide behind
        simulated_step(step_ms, kind, a)
        t0 = time.perf_counter()
        waits = []
        for _ in range(steps):
            next(loader)
            waits.append(loader.last_wait_s)
            simulated_step(step_ms, kind, a)
        elapsed = time.perf_counter() - t0
    return {"wait": statistics.mean(waits), "max": max(waits), "rate": steps / elapsed}


def build_ms(roidb, mode: str, repeats: int = 10) -> float:
    has_rpn = mode == "rpn"
    n = 1 if has_rpn else 2
    times = []
    for i in range(-1, repeats):
        t0 = time.perf_counter()
        entries = [roidb[(i * n + j) % len(roidb)] for j in range(n)]
        get_minibatch(entries, NUM_CLASSES, np.random.default_rng(i + 1), scales=[600],
                      max_size=1000, pixel_means=PIXEL_MEANS, has_rpn=has_rpn, batch_size=128)
        if i >= 0:                                       # i = -1 warms up cv2
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step-ms", type=float, default=150.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        roidb = make_roidb(folder, args.images)
        print(f"torch threads {torch.get_num_threads()}, cv2 threads {cv2.getNumThreads()}, cpus {os.cpu_count()}; "
              f"scale 600 / max 1000 (400x300 -> 800x600 blobs); step {args.step_ms:.0f} ms; "
              f"{args.steps} steps x {args.repeats} repeats, median of repeats")
        for mode in ("rpn", "frcn"):
            print(f"{mode}: building one batch alone takes {build_ms(roidb, mode):.1f} ms (median of 10)")
        print()
        print("| batch | step | workers | wait/step ms | wait % of step | worst wait ms | batches/s |")
        print("|---|---|---|---|---|---|---|")
        for mode in ("rpn", "frcn"):
            for kind in ("sleep", "torch"):
                for workers in args.workers:
                    runs = [run(roidb, mode, workers, args.step_ms, kind, args.steps, seed=r)
                            for r in range(args.repeats)]
                    wait = statistics.median(r["wait"] for r in runs)
                    print(f"| {mode} | {kind} {args.step_ms:.0f} ms | {workers} | {1000 * wait:.2f} | "
                          f"{100 * wait / (args.step_ms / 1000):.1f}% | {1000 * max(r['max'] for r in runs):.1f} | "
                          f"{statistics.median(r['rate'] for r in runs):.2f} |", flush=True)


if __name__ == "__main__":
    main()
