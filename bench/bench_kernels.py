"""Benchmark the kernels: NMS, roi_pool and roi_align (ours vs NumPy / reference / torchvision), build times.

Prints one table of medians over repeated runs in this process, then the JIT build time (fresh
TORCH_EXTENSIONS_DIR, in a subprocess) and the cached import + first-call time (another subprocess).
torchvision is timed on the same inputs when it imports (it does not beside the CPU torch 2.13 here: run this
file with a venv that has torch + torchvision to get that column). Usage::

    python bench/bench_kernels.py [--repeats 7] [--no-build]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from kernels import build, reference  # noqa: E402
from kernels.reference import py_cpu_nms  # noqa: E402

try:
    import torchvision.ops as tv_ops
except Exception:  # torchvision missing or not importable beside this torch
    tv_ops = None

IMAGE_W, IMAGE_H = 800, 600


def rpn_like_boxes(n: int, seed: int, clustered: float = 0.95, num_objects: int = 20
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float32 boxes [n, 4] and scores [n] shaped like RPN output on an 800x600 image.

    A fraction ``clustered`` are jittered copies of ``num_objects`` object boxes (24 to 400 px; centre noise
    0.15 of the size, log-size noise 0.2) with higher scores; the rest are scattered boxes of 16 to 400 px.
    With the defaults, NMS at 0.7 keeps about 2,000 of 12,000.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    obj_c = torch.rand(num_objects, 2, **f64) * torch.tensor([IMAGE_W, IMAGE_H])
    obj_wh = torch.exp(torch.rand(num_objects, 2, **f64) * math.log(400 / 24) + math.log(24))
    nc = int(n * clustered)
    k = torch.randint(0, num_objects, (nc,), generator=g)
    wh_c = obj_wh[k] * torch.exp(torch.randn(nc, 2, **f64) * 0.2)
    c_c = obj_c[k] + torch.randn(nc, 2, **f64) * 0.15 * obj_wh[k]
    ns = n - nc
    c_s = torch.rand(ns, 2, **f64) * torch.tensor([IMAGE_W, IMAGE_H])
    wh_s = torch.exp(torch.rand(ns, 2, **f64) * math.log(400 / 16) + math.log(16))
    c, wh = torch.cat((c_c, c_s)), torch.cat((wh_c, wh_s))
    score = torch.cat((0.5 + 0.5 * torch.rand(nc, **f64), 0.6 * torch.rand(ns, **f64)))
    boxes = torch.cat((c - wh / 2, c + wh / 2), 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, IMAGE_W - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, IMAGE_H - 1)
    perm = torch.randperm(n, generator=g)
    return boxes[perm].float().contiguous(), score[perm].float().contiguous()


def random_rois(r: int, seed: int) -> torch.Tensor:
    """``r`` RoIs [r, 5] on image 0, 16 to 500 px, inside the 800x600 image."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.rand(r, 2, generator=g) * math.log(500 / 16) + math.log(16))
    x1 = torch.rand(r, generator=g) * (IMAGE_W - wh[:, 0])
    y1 = torch.rand(r, generator=g) * (IMAGE_H - wh[:, 1])
    return torch.stack((torch.zeros(r), x1, y1, x1 + wh[:, 0] - 1, y1 + wh[:, 1] - 1), 1).contiguous()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def fwd_bwd(op: Callable, feats: torch.Tensor, rois: torch.Tensor, grad: torch.Tensor, **kw) -> Callable[[], None]:
    def run() -> None:
        f = feats.detach().requires_grad_(True)
        op(f, rois, **kw).backward(grad)
    return run


def fmt(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:9.1f}"


def speedup(ours: float, other: float | None) -> str:
    return "—" if other is None else f"{other / ours:6.1f}x"


def nms_rows(repeats: int) -> list[tuple]:
    rows = []
    # train-time RPN (12000 -> ~2000 kept) and a test-time-like set concentrated on 4 objects (6000 boxes,
    # of which the proposal layer would use the top 300 kept)
    for n, thr, shape in ((12000, 0.7, {}), (6000, 0.7, dict(clustered=0.99, num_objects=4))):
        boxes, scores = rpn_like_boxes(n, seed=0, **shape)
        dets = torch.cat((boxes, scores[:, None]), 1).numpy()
        kept = len(kernels.nms(boxes, scores, thr))
        ours = median_ms(lambda: kernels.nms(boxes, scores, thr), repeats)
        numpy_ms = median_ms(lambda: py_cpu_nms(dets, thr), max(3, repeats // 2))
        ref_ms = median_ms(lambda: reference.nms(boxes, scores, thr), 3)
        tv = None if tv_ops is None else median_ms(lambda: tv_ops.nms(boxes, scores, thr), repeats)
        rows.append((f"nms {n} -> {kept} kept @ {thr}", ours, numpy_ms, ref_ms, tv))
    return rows


def roi_rows(repeats: int) -> list[tuple]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 512, 38, 50, generator=g)
    rows = []
    for r in (128, 2000):
        rois = random_rois(r, seed=r)
        grad = torch.randn(r, 512, 7, 7, generator=g)
        reps = repeats if r <= 128 else max(3, repeats // 2)
        pool_kw = dict(output_size=7, spatial_scale=1 / 16)
        align_kw = dict(output_size=7, spatial_scale=1 / 16, sampling_ratio=2)
        # the Python-loop reference takes minutes here (76 s for roi_pool at 128 RoIs): not timed
        ours = median_ms(fwd_bwd(kernels.roi_pool, feats, rois, grad, **pool_kw), reps)
        tv = None if tv_ops is None else median_ms(fwd_bwd(tv_ops.roi_pool, feats, rois, grad, **pool_kw), reps)
        rows.append((f"roi_pool fwd+bwd {r} RoIs", ours, None, None, tv))
        ours = median_ms(fwd_bwd(kernels.roi_align, feats, rois, grad, **align_kw), reps)
        tv = None if tv_ops is None else median_ms(fwd_bwd(tv_ops.roi_align, feats, rois, grad, **align_kw), reps)
        rows.append((f"roi_align fwd+bwd {r} RoIs (sr 2)", ours, None, None, tv))
    return rows


_CHILD = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
sys.path.insert(0, {root!r})
import kernels
t2 = time.perf_counter()
kernels.nms(torch.tensor([[0., 0., 9., 9.]]), torch.tensor([1.]), 0.7)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def child_times(ext_dir: str) -> tuple[float, float, float]:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext_dir)
    env.pop("FRCNN_KERNELS", None)
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT))], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-build", action="store_true", help="skip the fresh-build and cached-import timings")
    args = ap.parse_args()
    if build.cpu_extension() is None:
        sys.exit("the C++ extension did not build; nothing to benchmark")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}, torchvision "
          f"{'not importable' if tv_ops is None else __import__('torchvision').__version__}; "
          f"median of {args.repeats} runs (fewer for the slow columns), ms")
    header = ("case", "ours C++", "NumPy loop", "reference", "torchvision", "vs tv", "vs NumPy")
    print(f"| {' | '.join(header)} |")
    print("|" + "---|" * len(header))
    for name, ours, np_ms, ref_ms, tv in nms_rows(args.repeats) + roi_rows(args.repeats):
        print(f"| {name} | {fmt(ours)} | {fmt(np_ms)} | {fmt(ref_ms)} | {fmt(tv)} | {speedup(ours, tv)} | "
              f"{speedup(ours, np_ms)} |")
    if args.no_build:
        return
    with tempfile.TemporaryDirectory(prefix="frcnn_ext_") as tmp:
        _, _, first = child_times(tmp)
        t_torch, t_import, t_call = child_times(tmp)
    print(f"\nfirst build (fresh TORCH_EXTENSIONS_DIR, import kernels + first nms): {first:.1f} s")
    print(f"cached: import kernels {t_import * 1000:.0f} ms + first nms call (loads the cached build) "
          f"{t_call * 1000:.0f} ms = {(t_import + t_call) * 1000:.0f} ms (import torch itself: {t_torch:.2f} s)")


if __name__ == "__main__":
    main()
