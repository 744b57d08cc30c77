"""Box math: IoU, box coding and clipping, the one place the +1 pixel convention lives.

Boxes are ``[x1, y1, x2, y2]`` in pixels, **inclusive**: width = x2 - x1 + 1, as in py-faster-rcnn.
Every function takes torch tensors on any device, or NumPy arrays (converted in and back out), so
``roidb`` (NumPy) and ``nets`` (torch) share the same code. ``nets`` re-exports these names.

One deliberate difference from py-faster-rcnn: ``bbox_transform_inv`` subtracts 1 from x2 and y2, the
Detectron fix, so ``bbox_transform_inv(ex, bbox_transform(ex, gt)) == gt`` exactly (py-faster-rcnn returned
x2 + 1 and y2 + 1).
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = ["bbox_overlaps", "bbox_transform", "bbox_transform_inv", "clip_boxes", "box_areas"]

# Deltas above log(1000/16) would overflow exp() for no benefit (Detectron's clamp).
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def _numpy_friendly(fn):
    """Let ``fn`` take NumPy arrays: convert array arguments to tensors and the result back."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        is_np = any(type(a).__module__ == "numpy" and hasattr(a, "shape") for a in args)
        if not is_np:
            return fn(*args, **kwargs)
        conv = [torch.from_numpy(a) if type(a).__module__ == "numpy" and hasattr(a, "shape") else a for a in args]
        return fn(*conv, **kwargs).numpy()

    return wrapper


def _check_boxes(name: str, boxes: torch.Tensor, multiple_of_4: bool = False) -> None:
    if boxes.dim() != 2 or (boxes.shape[1] % 4 != 0 if multiple_of_4 else boxes.shape[1] != 4):
        want = "[N, 4K]" if multiple_of_4 else "[N, 4]"
        raise ValueError(f"{name} must have shape {want}, got {list(boxes.shape)}")


@_numpy_friendly
def box_areas(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``boxes`` [N, 4] (inclusive pixels) -> [N]."""
    _check_boxes("boxes", boxes)
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


@_numpy_friendly
def bbox_overlaps(boxes: torch.Tensor, query_boxes: torch.Tensor) -> torch.Tensor:
    """IoU of every box with every query box, +1 convention.

    Args:
        boxes: [N, 4] inclusive ``[x1, y1, x2, y2]``.
        query_boxes: [K, 4] same convention.
    Returns:
        [N, K] IoU in the dtype of ``boxes`` (float64 for integer input). Boxes that do not
        intersect give 0.
    """
    _check_boxes("boxes", boxes)
    _check_boxes("query_boxes", query_boxes)
    if not boxes.is_floating_point():
        boxes = boxes.double()
    query_boxes = query_boxes.to(boxes.dtype)
    iw = (torch.minimum(boxes[:, None, 2], query_boxes[None, :, 2])
          - torch.maximum(boxes[:, None, 0], query_boxes[None, :, 0]) + 1).clamp(min=0)
    ih = (torch.minimum(boxes[:, None, 3], query_boxes[None, :, 3])
          - torch.maximum(boxes[:, None, 1], query_boxes[None, :, 1]) + 1).clamp(min=0)
    inter = iw * ih
    union = box_areas(boxes)[:, None] + box_areas(query_boxes)[None, :] - inter
    return torch.where(inter > 0, inter / union.clamp(min=1e-14), torch.zeros_like(inter))


@_numpy_friendly
def bbox_transform(ex_rois: torch.Tensor, gt_rois: torch.Tensor) -> torch.Tensor:
    """Regression targets that move ``ex_rois`` onto ``gt_rois`` (py-faster-rcnn's coding).

    w = x2 - x1 + 1, ctr = x1 + 0.5 w; dx = (gx - ex) / ew, dw = log(gw / ew), same for y/h.

    Args:
        ex_rois: [N, 4] example boxes, inclusive pixels.
        gt_rois: [N, 4] matched ground-truth boxes.
    Returns:
        [N, 4] deltas ``(dx, dy, dw, dh)``.
    """
    _check_boxes("ex_rois", ex_rois)
    _check_boxes("gt_rois", gt_rois)
    if not ex_rois.is_floating_point():
        ex_rois = ex_rois.double()
    gt_rois = gt_rois.to(ex_rois.dtype)
    ew = ex_rois[:, 2] - ex_rois[:, 0] + 1.0
    eh = ex_rois[:, 3] - ex_rois[:, 1] + 1.0
    ex = ex_rois[:, 0] + 0.5 * ew
    ey = ex_rois[:, 1] + 0.5 * eh
    gw = gt_rois[:, 2] - gt_rois[:, 0] + 1.0
    gh = gt_rois[:, 3] - gt_rois[:, 1] + 1.0
    gx = gt_rois[:, 0] + 0.5 * gw
    gy = gt_rois[:, 1] + 0.5 * gh
    return torch.stack(((gx - ex) / ew, (gy - ey) / eh, torch.log(gw / ew), torch.log(gh / eh)), dim=1)


@_numpy_friendly
def bbox_transform_inv(boxes: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Apply ``deltas`` [N, 4K] (K classes of ``dx, dy, dw, dh``) to ``boxes`` [N, 4] -> [N, 4K].

    x2 = ctr + 0.5 w - 1 (Detectron's fix), so this exactly inverts :func:`bbox_transform`.
    dw and dh are clamped at log(1000/16) to keep exp() finite.
    """
    _check_boxes("boxes", boxes)
    _check_boxes("deltas", deltas, multiple_of_4=True)
    if boxes.shape[0] != deltas.shape[0]:
        raise ValueError(f"boxes and deltas must have the same N, got {boxes.shape[0]} and {deltas.shape[0]}")
    if not deltas.is_floating_point():
        deltas = deltas.double()
    boxes = boxes.to(deltas.dtype)
    if boxes.shape[0] == 0:
        return deltas.clone()
    w = (boxes[:, 2] - boxes[:, 0] + 1.0)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + 1.0)[:, None]
    cx = boxes[:, 0, None] + 0.5 * w
    cy = boxes[:, 1, None] + 0.5 * h
    dx, dy = deltas[:, 0::4], deltas[:, 1::4]
    dw = deltas[:, 2::4].clamp(max=BBOX_XFORM_CLIP)
    dh = deltas[:, 3::4].clamp(max=BBOX_XFORM_CLIP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
    out = torch.empty_like(deltas)
    out[:, 0::4] = pcx - 0.5 * pw
    out[:, 1::4] = pcy - 0.5 * ph
    out[:, 2::4] = pcx + 0.5 * pw - 1.0
    out[:, 3::4] = pcy + 0.5 * ph - 1.0
    return out


@_numpy_friendly
def clip_boxes(boxes: torch.Tensor, im_shape) -> torch.Tensor:
    """Clip ``boxes`` [N, 4K] to the image: 0 <= x <= W - 1, 0 <= y <= H - 1.

    ``im_shape`` is ``(H, W)`` (anything indexable, e.g. ``im_info[:2]``). Returns a new array.
    """
    _check_boxes("boxes", boxes, multiple_of_4=True)
    h, w = float(im_shape[0]), float(im_shape[1])
    out = boxes.clone()
    out[:, 0::4] = boxes[:, 0::4].clamp(0, w - 1)
    out[:, 1::4] = boxes[:, 1::4].clamp(0, h - 1)
    out[:, 2::4] = boxes[:, 2::4].clamp(0, w - 1)
    out[:, 3::4] = boxes[:, 3::4].clamp(0, h - 1)
    return out
