"""Per training iteration: backbone + head math vs the rest (anchor target, proposal layer, sampling, RoI pooling,
losses), for VGG16 at 600x1000 and the tiny net at its demo scale, on the CPU.

Three iteration kinds, each timed as a whole (forward, backward, SGD step), and each 'rest' component timed alone on
the same inputs (forward + backward where it has one), in turn within every repeat so all see the same machine load;
medians over repeats; math = step - rest:

- rpn  (stage1 / stage3 step): body, RPN head | anchors, anchor_target_layer, RPN loss;
- frcn (stage2 / stage4 step, 2 images, 128 RoIs): body, fc6/fc7, predictors | roi_pool, Fast R-CNN loss;
- e2e  (one image, both heads, the end-to-end mode): the above plus proposal_layer (TRAIN 12000 -> 2000) and
  proposal_target_layer with roidb's sampler.

Usage::

    python bench/bench_iteration.py [--nets vgg16,tiny] [--repeats 3] [--tiny-size 300x400] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels import roi_pool  # noqa: E402
from nets import (FasterRCNN, anchor_target_layer, fast_rcnn_loss, param_groups, proposal_layer,  # noqa: E402
                  proposal_target_layer, rpn_loss, set_trainable)
from roidb.minibatch import sample_rois  # noqa: E402

NUM_CLASSES = 21


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - t0)


def interleaved(step: Callable[[], None], parts: dict, repeats: int) -> tuple[float, dict]:
    """Median ms of the step and of each part, timed in turn within every repeat (so all see the same load)."""
    step()
    for fn in parts.values():
        fn()
    times = {"step": [], **{k: [] for k in parts}}
    for _ in range(repeats):
        times["step"].append(_ms(step))
        for k, fn in parts.items():
            times[k].append(_ms(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    return med.pop("step"), med


def scene(h: int, w: int, n_images: int, seed: int = 0) -> dict:
    """Random blob data, 4 GT boxes per image and 64 RoIs per image around them (fg and bg)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 50, (n_images, 3, h, w)).astype(np.float32)
    xy = rng.uniform(0, [w * 0.6, h * 0.6], (4, 2))
    gt = np.hstack([xy, xy + rng.uniform(0.15, 0.4, (4, 2)) * [w, h], rng.integers(1, NUM_CLASSES, (4, 1))])
    gt = gt.astype(np.float32)
    rois = []
    for i in range(n_images):
        centre = gt[rng.integers(0, 4, 64), :4] + rng.normal(0, 0.05 * h, (64, 4))
        boxes = np.clip(centre, 0, [w - 1, h - 1, w - 1, h - 1])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 8)
        rois.append(np.hstack([np.full((64, 1), i), boxes]))
    rois = np.vstack(rois).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, rois.shape[0])
    targets = rng.normal(0, 1, (rois.shape[0], 4 * NUM_CLASSES)).astype(np.float32)
    inside = np.zeros_like(targets)
    for r, c in enumerate(labels):
        if c > 0:
            inside[r, 4 * c:4 * c + 4] = 1.0
    return {"data": data, "im_info": np.array([[h, w, 1.0]] * n_images, np.float32), "gt_boxes": gt,
            "rois": rois, "labels": labels, "bbox_targets": targets, "bbox_inside_weights": inside,
            "bbox_outside_weights": inside.copy()}


def _step(model: FasterRCNN, stage: str, loss_fn: Callable[[], dict]) -> Callable[[], None]:
    set_trainable(model, stage)
    opt = torch.optim.SGD(param_groups(model, 1e-3, 5e-4), momentum=0.9)

    def run() -> None:
        opt.zero_grad()
        sum(loss_fn().values()).backward()
        opt.step()
    return run


def rpn_rows(model: FasterRCNN, s: dict, repeats: int) -> tuple[float, dict]:
    blobs = {k: s[k][:1] if k in ("data", "im_info") else s[k] for k in ("data", "im_info", "gt_boxes")}
    gen = torch.Generator().manual_seed(3)
    step = _step(model, "stage1", lambda: model.rpn_losses(blobs, generator=gen))
    with torch.no_grad():
        feats, logits, deltas, anchors = model.rpn_forward(blobs["data"])
    gt = torch.from_numpy(s["gt_boxes"])
    info = s["im_info"][0].tolist()
    targets = anchor_target_layer(anchors, gt, info, generator=gen)
    leaf_l, leaf_d = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    rest = {
        "anchors": lambda: model.anchors(feats.shape[2], feats.shape[3]),
        "anchor target": lambda: anchor_target_layer(anchors, gt, info, generator=gen),
        "RPN loss f+b": lambda: sum(rpn_loss(leaf_l, leaf_d, targets).values()).backward(),
    }
    return interleaved(step, rest, repeats)


def frcn_rows(model: FasterRCNN, s: dict, repeats: int) -> tuple[float, dict]:
    step = _step(model, "stage2", lambda: model.frcn_losses(s))
    with torch.no_grad():
        feats = model.body(torch.from_numpy(s["data"]))
    leaf = feats.clone().requires_grad_()
    rois = torch.from_numpy(s["rois"])
    size, scale = model.roi_head.pool_size, model.roi_head.spatial_scale
    with torch.no_grad():
        cls, bbox = model.roi_head(feats, rois)
    cls, bbox = cls.clone().requires_grad_(), bbox.clone().requires_grad_()
    t = {k: torch.from_numpy(np.asarray(s[k])) for k in ("labels", "bbox_targets", "bbox_inside_weights",
                                                          "bbox_outside_weights")}
    rest = {
        "roi_pool f+b": lambda: roi_pool(leaf, rois, size, scale).sum().backward(),
        "FRCN loss f+b": lambda: sum(fast_rcnn_loss(cls, bbox, t["labels"], t["bbox_targets"],
                                                    t["bbox_inside_weights"], t["bbox_outside_weights"]).values()
                                     ).backward(),
    }
    return interleaved(step, rest, repeats)


def e2e_rows(model: FasterRCNN, s: dict, repeats: int) -> tuple[float, dict]:
    data, info = s["data"][:1], s["im_info"][0].tolist()
    gt = torch.from_numpy(s["gt_boxes"])
    gen, rng = torch.Generator().manual_seed(3), np.random.default_rng(3)
    settings = dict(pre_nms_top_n=12000, post_nms_top_n=2000, nms_thresh=0.7, min_size=16)

    blobs = {"data": data, "im_info": s["im_info"][:1], "gt_boxes": s["gt_boxes"]}

    def losses() -> dict:
        return model.e2e_losses(blobs, generator=gen, rng=rng, sampler=sample_rois, proposal_settings=settings)

    set_trainable(model, "stage1")
    for p in model.roi_head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(param_groups(model, 1e-3, 5e-4), momentum=0.9)

    def run() -> None:
        opt.zero_grad()
        sum(losses().values()).backward()
        opt.step()
    step = run
    with torch.no_grad():
        feats, logits, deltas, anchors = model.rpn_forward(data)
    rois, _ = proposal_layer(logits, deltas, info, anchors, **settings)
    t = proposal_target_layer(rois, gt, NUM_CLASSES, sample_rois, rng=rng)
    leaf = feats.clone().requires_grad_()
    size, scale = model.roi_head.pool_size, model.roi_head.spatial_scale
    with torch.no_grad():
        cls, bbox = model.roi_head(feats, t["rois"])
    cls, bbox = cls.clone().requires_grad_(), bbox.clone().requires_grad_()
    leaf_l, leaf_d = logits.clone().requires_grad_(), deltas.clone().requires_grad_()
    targets = anchor_target_layer(anchors, gt, info, generator=gen)
    rest = {
        "anchors": lambda: model.anchors(feats.shape[2], feats.shape[3]),
        "anchor target": lambda: anchor_target_layer(anchors, gt, info, generator=gen),
        "proposal layer": lambda: proposal_layer(logits, deltas, info, anchors, **settings),
        "proposal target+sampling": lambda: proposal_target_layer(rois, gt, NUM_CLASSES, sample_rois, rng=rng),
        "roi_pool f+b": lambda: roi_pool(leaf, t["rois"], size, scale).sum().backward(),
        "losses f+b": lambda: (sum(rpn_loss(leaf_l, leaf_d, targets).values()) + sum(fast_rcnn_loss(
            cls, bbox, t["labels"], t["bbox_targets"], t["bbox_inside_weights"],
            t["bbox_outside_weights"]).values())).backward(),
    }
    return interleaved(step, rest, repeats)


def print_table(net: str, size: tuple[int, int], kind: str, step: float, rest: dict) -> None:
    total_rest = sum(rest.values())
    print(f"\n{net} {size[0]}x{size[1]}  {kind} step")
    print(f"  {'part':<28}{'ms':>10}{'%':>8}")
    print(f"  {'backbone + head math':<28}{step - total_rest:>10.1f}{100 * (step - total_rest) / step:>8.1f}")
    for name, ms in rest.items():
        print(f"    {name:<26}{ms:>10.1f}{100 * ms / step:>8.1f}")
    print(f"  {'rest (sum)':<28}{total_rest:>10.1f}{100 * total_rest / step:>8.1f}")
    print(f"  {'whole step':<28}{step:>10.1f}{100.0:>8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="vgg16,tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny-size", default="300x400", help="HxW of the tiny net's blob")
    ap.add_argument("--vgg-size", default="600x1000", help="HxW of the vgg16/zf blob")
    ap.add_argument("--kinds", default="rpn,frcn,e2e")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats")
    for net in args.nets.split(","):
        size = tuple(int(v) for v in (args.tiny_size if net == "tiny" else args.vgg_size).split("x"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = FasterRCNN(net, NUM_CLASSES, seed=3)
        s = scene(size[0], size[1], 2)
        for kind in args.kinds.split(","):
            fn = {"rpn": rpn_rows, "frcn": frcn_rows, "e2e": e2e_rows}[kind]
            step, rest = fn(model, s, args.repeats)
            print_table(net, size, kind, step, rest)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
