"""Argument checks shared by every kernels backend: one clear error naming the bad argument."""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["KernelInputError", "check_nms_args", "check_nms_values", "check_batched_nms_args", "check_roi_args",
           "check_roi_values", "pair", "HALF_DTYPES", "compute_dtype"]

# Autocast's reduced-precision dtypes: accepted at the ops' boundary and computed in float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)


class KernelInputError(ValueError):
    """A kernels op was given an argument of the wrong shape, dtype, device or value."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32 for float16/bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _check_float(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64) + HALF_DTYPES:
        raise KernelInputError(f"{name} must be float32 or float64 (float16/bfloat16 are computed in float32), "
                               f"got {t.dtype}")


def check_nms_args(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                   max_keep: int | None = None) -> None:
    """Check ``boxes`` [N, 4] float, ``scores`` [N] float of the same dtype/device (metadata only), and
    ``max_keep`` None or an int.

    The value checks (:func:`check_nms_values`) touch the data; the C++ kernels do them in their own loop,
    because a parallel torch op just before the single-threaded NMS costs more than the NMS on a busy machine.
    """
    _check_float("boxes", boxes)
    _check_float("scores", scores)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise KernelInputError(f"boxes must have shape [N, 4], got {list(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise KernelInputError(f"scores must have shape [N] = [{boxes.shape[0]}], got {list(scores.shape)}")
    if scores.dtype != boxes.dtype:
        raise KernelInputError(f"scores must have the dtype of boxes ({boxes.dtype}), got {scores.dtype}")
    if scores.device != boxes.device:
        raise KernelInputError(f"scores must be on the device of boxes ({boxes.device}), got {scores.device}")
    if not isinstance(iou_threshold, (int, float)) or math.isnan(iou_threshold):
        raise KernelInputError(f"iou_threshold must be a number, got {iou_threshold!r}")
    if max_keep is not None and (isinstance(max_keep, bool) or not isinstance(max_keep, int)):
        raise KernelInputError(f"max_keep must be an int or None, got {max_keep!r}")


def check_nms_values(boxes: torch.Tensor, scores: torch.Tensor) -> None:
    """Finite box coordinates and no NaN score (the C++ kernels check the same)."""
    if boxes.numel() and not bool(torch.isfinite(boxes).all()):
        raise KernelInputError("boxes contain NaN or infinite coordinates")
    if scores.numel() and bool(torch.isnan(scores).any()):
        raise KernelInputError("scores contain NaN")


def check_batched_nms_args(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                           iou_threshold: float) -> None:
    """As :func:`check_nms_args`, plus ``idxs`` [N] integer class ids."""
    check_nms_args(boxes, scores, iou_threshold)
    if not isinstance(idxs, torch.Tensor):
        raise KernelInputError(f"idxs must be a torch.Tensor, got {type(idxs).__name__}")
    if idxs.dtype.is_floating_point or idxs.dtype.is_complex or idxs.dtype == torch.bool:
        raise KernelInputError(f"idxs must be an integer tensor, got {idxs.dtype}")
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise KernelInputError(f"idxs must have shape [N] = [{boxes.shape[0]}], got {list(idxs.shape)}")


def pair(name: str, size: int | Sequence[int]) -> tuple[int, int]:
    """``output_size`` as ``(h, w)`` positive ints."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)  # type: ignore[union-attr]
        ok = len(tuple(size)) == 2 and h > 0 and w > 0 and all(int(s) == s for s in size)  # type: ignore
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise KernelInputError(f"{name} must be a positive int or a pair (h, w) of positive ints, got {size!r}")
    return h, w


def check_roi_args(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int],
                   spatial_scale: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """Check ``features`` [B, C, H, W] and ``rois`` [R, 5] (metadata only); return rois in the dtype the op
    computes in (the features' dtype; float32 for float16/bfloat16 features, whose few mantissa bits would move
    RoI corners by whole pixels) and (h, w). :func:`check_roi_values` checks the values (the C++ kernels do it
    themselves)."""
    _check_float("features", features)
    _check_float("rois", rois)
    if features.dim() != 4:
        raise KernelInputError(f"features must have shape [B, C, H, W], got {list(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise KernelInputError(f"rois must have shape [R, 5] (batch_idx, x1, y1, x2, y2), got {list(rois.shape)}")
    if rois.device != features.device:
        raise KernelInputError(f"rois must be on the device of features ({features.device}), got {rois.device}")
    if not isinstance(spatial_scale, (int, float)) or not spatial_scale > 0 or math.isinf(spatial_scale):
        raise KernelInputError(f"spatial_scale must be a positive number, got {spatial_scale!r}")
    size = pair("output_size", output_size)
    return rois.to(compute_dtype(features.dtype)), size


def check_roi_values(features: torch.Tensor, rois: torch.Tensor) -> None:
    """Finite RoIs whose batch index is an integer in [0, B)."""
    if rois.shape[0]:
        if not bool(torch.isfinite(rois).all()):
            raise KernelInputError("rois contain NaN or infinite values")
        b = rois[:, 0]
        if bool((b != b.floor()).any()) or bool((b < 0).any()) or bool((b >= features.shape[0]).any()):
            raise KernelInputError(
                f"rois[:, 0] must hold integer batch indices in [0, {features.shape[0]}), got "
                f"{sorted(set(b.tolist()))[:5]}")
