"""Anchors: py-faster-rcnn's reference anchors and their shifts over a feature map.

Boxes are ``[x1, y1, x2, y2]`` inclusive pixels (width = x2 - x1 + 1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["generate_anchors", "shifted_anchors"]


def _whctrs(anchor: np.ndarray) -> tuple[float, float, float, float]:
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws: np.ndarray, hs: np.ndarray, x_ctr: float, y_ctr: float) -> np.ndarray:
    ws, hs = ws[:, None], hs[:, None]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))


def generate_anchors(base_size: int = 16, ratios: Sequence[float] = (0.5, 1, 2),
                     scales: Sequence[float] = (8, 16, 32)) -> np.ndarray:
    """py-faster-rcnn's reference anchors around the base box ``[0, 0, base_size-1, base_size-1]``.

    Ratio-major order: for each ratio (h/w) the base area is kept with widths ``round(sqrt(area / ratio))``
    (NumPy's round-half-even) and heights ``round(w * ratio)``; each is then multiplied by every scale.

    Returns:
        float64 (len(ratios) * len(scales), 4); the defaults give the 9 anchors of the facts file, row 0 being
        ``[-84, -40, 99, 55]``.
    """
    base = np.array([1, 1, base_size, base_size], dtype=np.float64) - 1
    w, h, x_ctr, y_ctr = _whctrs(base)
    size_ratios = (w * h) / np.asarray(ratios, dtype=np.float64)
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * np.asarray(ratios, dtype=np.float64))
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    scales = np.asarray(scales, dtype=np.float64)
    out = []
    for anchor in ratio_anchors:
        aw, ah, ax, ay = _whctrs(anchor)
        out.append(_mkanchors(aw * scales, ah * scales, ax, ay))
    return np.vstack(out)


def shifted_anchors(base_anchors: torch.Tensor | np.ndarray, height: int, width: int, feat_stride: int = 16,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """All anchors of an ``height`` x ``width`` feature map, ordered (h, w, a) like the RPN's outputs.

    Args:
        base_anchors: (A, 4) reference anchors (:func:`generate_anchors`).
        height, width: the feature map size.
        feat_stride: pixels per feature cell (16 for every backbone here).
    Returns:
        float32 (height * width * A, 4); row ``(h * width + w) * A + a`` is anchor ``a`` shifted by
        ``(w * feat_stride, h * feat_stride)``.
    """
    base = torch.as_tensor(base_anchors, dtype=torch.float32, device=device)
    sx = torch.arange(width, dtype=torch.float32, device=base.device) * feat_stride
    sy = torch.arange(height, dtype=torch.float32, device=base.device) * feat_stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)
    return (shifts + base[None, :, :]).reshape(-1, 4)
