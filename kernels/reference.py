"""Pure-torch reference implementations of nms, batched_nms, roi_pool and roi_align.

Plain and slow on purpose: the tests use these as ground truth for the C++ and CUDA kernels, and
``FRCNN_KERNELS=reference`` selects them everywhere. Inputs are assumed already validated (see
:mod:`kernels._validate`); the public, checked entry points live in :mod:`kernels`.

Boxes are ``[x1, y1, x2, y2]`` in pixels, inclusive (width = x2 - x1 + 1), as in py-faster-rcnn.
Gradients of ``roi_pool`` and ``roi_align`` come from autograd through these torch ops.
"""
from __future__ import annotations

import math

import numpy as np

import torch

__all__ = ["nms", "batched_nms", "argsort_desc", "roi_pool", "roi_align", "caffe_round", "py_cpu_nms"]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int = -1) -> torch.Tensor:
    """Greedy NMS, py_cpu_nms style.

    Args:
        boxes: [N, 4] float, inclusive ``[x1, y1, x2, y2]``; areas use the +1 convention.
        scores: [N] same dtype.
        iou_threshold: a box is suppressed when its IoU with a kept box is > this (strict).
        max_keep: > 0 stops once that many boxes are kept (the full answer's first ``max_keep``).
    Returns:
        int64 [K] kept indices in decreasing score order; equal scores: the higher index first, as
        py-faster-rcnn's ``scores.argsort()[::-1]`` (see :func:`argsort_desc`).
    """
    order = argsort_desc(scores)
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    thr = torch.tensor(iou_threshold, dtype=boxes.dtype)
    keep = []
    while order.numel() > 0:
        i = order[0]
        keep.append(int(i))
        if len(keep) == max_keep:
            break
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[~(ovr > thr)]
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float,
                nms_fn=None) -> torch.Tensor:
    """NMS within each class id of ``idxs`` [N]; int64 [K] kept indices in decreasing score order.

    Boxes of different classes never suppress each other. ``nms_fn`` (default :func:`nms`) runs each class.
    """
    nms_fn = nms if nms_fn is None else nms_fn
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = []
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        kept.append(members[nms_fn(boxes[members], scores[members], iou_threshold)])
    keep = torch.sort(torch.cat(kept)).values
    return keep[argsort_desc(scores[keep])]


def argsort_desc(scores: torch.Tensor) -> torch.Tensor:
    """Indices by decreasing score, equal scores by decreasing index: py-faster-rcnn's ``argsort()[::-1]`` with
    a stable increasing sort (NumPy's default quicksort leaves the order of ties unspecified beyond 16 items)."""
    return torch.flip(torch.sort(scores, stable=True).indices, [0])


def caffe_round(x: torch.Tensor) -> torch.Tensor:
    """C ``round()``: halves go away from zero (torch.round goes to even)."""
    t = torch.trunc(x)
    frac = x - t
    return t + torch.where(frac.abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
             spatial_scale: float) -> torch.Tensor:
    """Caffe ROIPooling (max) of ``rois`` [R, 5] ``(batch_idx, x1, y1, x2, y2)`` over ``features`` [B, C, H, W].

    start/end = round(x * spatial_scale) (half away from zero); roi w/h = max(end - start + 1, 1);
    bin = roi / pooled; cell [floor(p * bin), ceil((p + 1) * bin)) + start, clipped to the map; an empty
    cell gives 0. Returns [R, C, h, w]; the gradient goes to the first maximum of each cell.
    """
    ph_n, pw_n = output_size
    _, C, H, W = features.shape
    scale = torch.tensor(spatial_scale, dtype=rois.dtype)
    out = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        start = caffe_round(rois[r, 1:3] * scale)
        end = caffe_round(rois[r, 3:5] * scale)
        sw, sh = int(start[0]), int(start[1])
        roi_w = torch.clamp(end[0] - start[0] + 1, min=1)
        roi_h = torch.clamp(end[1] - start[1] + 1, min=1)
        bin_w = roi_w / pw_n
        bin_h = roi_h / ph_n
        cells = []
        for ph in range(ph_n):
            hs = min(max(int(torch.floor(ph * bin_h)) + sh, 0), H)
            he = min(max(int(torch.ceil((ph + 1) * bin_h)) + sh, 0), H)
            for pw in range(pw_n):
                ws = min(max(int(torch.floor(pw * bin_w)) + sw, 0), W)
                we = min(max(int(torch.ceil((pw + 1) * bin_w)) + sw, 0), W)
                if he <= hs or we <= ws:
                    cells.append(features.new_zeros(C))
                else:
                    cells.append(features[b, :, hs:he, ws:we].reshape(C, -1).max(dim=1).values)
        out.append(torch.stack(cells, dim=1).reshape(C, ph_n, pw_n))
    if not out:
        return features.new_zeros((0, C, ph_n, pw_n))
    return torch.stack(out)


def _bilinear(plane: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torchvision's bilinear sample of ``plane`` [C, H, W] at points ``y``, ``x`` [P] -> [C, P]."""
    H, W = plane.shape[-2:]
    valid = ~((y < -1.0) | (y > H) | (x < -1.0) | (x > W))
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y_low = y.floor().long()
    x_low = x.floor().long()
    y_top = y_low >= H - 1
    x_top = x_low >= W - 1
    y_low = torch.where(y_top, torch.full_like(y_low, H - 1), y_low)
    x_low = torch.where(x_top, torch.full_like(x_low, W - 1), x_low)
    y_high = torch.where(y_top, y_low, y_low + 1)
    x_high = torch.where(x_top, x_low, x_low + 1)
    y = torch.where(y_top, y_low.to(y.dtype), y)
    x = torch.where(x_top, x_low.to(x.dtype), x)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    v = (hy * hx * plane[:, y_low, x_low] + hy * lx * plane[:, y_low, x_high]
         + ly * hx * plane[:, y_high, x_low] + ly * lx * plane[:, y_high, x_high])
    return v * valid.to(v.dtype)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoIAlign with torchvision's semantics: ``features`` [B, C, H, W], ``rois`` [R, 5] -> [R, C, h, w].

    Continuous coordinates (no +1): roi start = x1 * scale (- 0.5 if ``aligned``); without ``aligned``
    the roi size is at least 1. Each bin averages a grid of bilinear samples, ``sampling_ratio`` per side,
    or ceil(roi_size / pooled) when ``sampling_ratio`` <= 0.
    """
    ph_n, pw_n = output_size
    _, C, H, W = features.shape
    dt = features.dtype
    offset = 0.5 if aligned else 0.0
    out = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        x1, y1, x2, y2 = (float(v) * spatial_scale - offset for v in rois[r, 1:5])
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pw_n)
        count = max(gh * gw, 1)
        if gh <= 0 or gw <= 0:
            out.append(features.new_zeros((C, ph_n, pw_n)))
            continue
        iy = (torch.arange(gh, dtype=torch.float64) + 0.5) * bin_h / gh
        ix = (torch.arange(gw, dtype=torch.float64) + 0.5) * bin_w / gw
        ys = (y1 + torch.arange(ph_n, dtype=torch.float64)[:, None] * bin_h + iy[None, :]).flatten()
        xs = (x1 + torch.arange(pw_n, dtype=torch.float64)[:, None] * bin_w + ix[None, :]).flatten()
        yy = ys[:, None].expand(-1, xs.numel()).flatten().to(dt)
        xx = xs[None, :].expand(ys.numel(), -1).flatten().to(dt)
        v = _bilinear(features[b], yy, xx).reshape(C, ph_n, gh, pw_n, gw)
        out.append(v.sum(dim=(2, 4)) / count)
    if not out:
        return features.new_zeros((0, C, ph_n, pw_n))
    return torch.stack(out)


def py_cpu_nms(dets: np.ndarray, thresh: float, sort_kind: str = "quicksort") -> list[int]:
    """py-faster-rcnn's NumPy greedy loop (lib/nms/py_cpu_nms.py), as an independent reference and a timing
    baseline. dets: [N, 5] (x1, y1, x2, y2, score), inclusive +1 pixel boxes; returns kept indices, best first.
    ``sort_kind="stable"`` gives the tie order of the NumPy 1.x of its day (insertion sort up to 16 items); NumPy
    >= 1.25 on AVX-512 sorts float32 with an unstable SIMD sort."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(kind=sort_kind)[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep
