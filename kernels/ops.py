"""The public ops: argument checks, then the compiled kernels (autograd Functions) or the reference.

Boxes and RoIs are ``[x1, y1, x2, y2]`` in pixels, inclusive (width = x2 - x1 + 1), as in py-faster-rcnn.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from . import reference
from ._validate import (KernelInputError, check_batched_nms_args, check_nms_args, check_nms_values, check_roi_args,
                        check_roi_values)
from .build import backend

__all__ = ["nms", "batched_nms", "roi_pool", "roi_align"]


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """Turn the C++ kernels' ValueError (bad values) into KernelInputError with its first line."""
    try:
        yield
    except KernelInputError:
        raise
    except ValueError as exc:
        raise KernelInputError(str(exc).strip().splitlines()[0]) from None


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (py-faster-rcnn's py_cpu_nms / GPU kernel semantics).

    Args:
        boxes: [N, 4] float32/float64, inclusive ``[x1, y1, x2, y2]``; areas use the +1 convention.
        scores: [N], same dtype and device.
        iou_threshold: a box is suppressed when its IoU with a higher-scoring kept box is > this (strict).
    Returns:
        int64 [K] indices of the kept boxes in decreasing score order; equal scores: lower index first.
    Raises:
        KernelInputError (a ValueError) naming the argument for a wrong shape, dtype or value.
    """
    check_nms_args(boxes, scores, iou_threshold)
    ext = backend(boxes.device)
    if ext is None or boxes.device.type != "cpu":
        check_nms_values(boxes, scores)
    if ext is None:
        return reference.nms(boxes, scores, float(iou_threshold))
    with _input_errors():
        return ext.nms(boxes.contiguous(), scores.contiguous(), float(iou_threshold))


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each class: boxes [N, 4], scores [N], idxs [N] integer class ids.

    Returns int64 [K] kept indices in decreasing score order (ties: lower index first); exactly the union
    of :func:`nms` run on each class separately.
    """
    check_batched_nms_args(boxes, scores, idxs, iou_threshold)
    ext = backend(boxes.device)
    if ext is None or boxes.device.type != "cpu":
        check_nms_values(boxes, scores)
    if ext is None:
        return reference.batched_nms(boxes, scores, idxs, float(iou_threshold))
    with _input_errors():
        return reference.batched_nms(boxes.contiguous(), scores.contiguous(), idxs, float(iou_threshold),
                                     nms_fn=ext.nms)


class _RoIPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, ext, pooled_h, pooled_w, spatial_scale):
        out, argmax = ext.roi_pool_forward(features, rois, pooled_h, pooled_w, spatial_scale)
        ctx.save_for_backward(rois, argmax)
        ctx.ext = ext
        ctx.feature_shape = features.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        rois, argmax = ctx.saved_tensors
        B, C, H, W = ctx.feature_shape
        grad = ctx.ext.roi_pool_backward(grad_out.contiguous(), rois, argmax, B, C, H, W)
        return grad, None, None, None, None, None


class _RoIAlignFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, ext, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
        out = ext.roi_align_forward(features, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
        ctx.save_for_backward(rois)
        ctx.args = (ext, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned)
        ctx.feature_shape = features.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        ext, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned = ctx.args
        B, C, H, W = ctx.feature_shape
        grad = ext.roi_align_backward(grad_out.contiguous(), rois, B, C, H, W, pooled_h, pooled_w,
                                      spatial_scale, sampling_ratio, aligned)
        return grad, None, None, None, None, None, None, None


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int],
             spatial_scale: float) -> torch.Tensor:
    """Caffe ROIPooling (max), as in py-faster-rcnn.

    Args:
        features: [B, C, H, W] float32/float64.
        rois: [R, 5] ``(batch_idx, x1, y1, x2, y2)`` in image pixels, inclusive; cast to the features' dtype.
        output_size: pooled ``h = w`` (int) or ``(h, w)``.
        spatial_scale: image -> feature map scale, e.g. 1/16.
    Returns:
        [R, C, h, w]. start/end = round(x * scale) (half away from zero); roi w/h = max(end - start + 1, 1);
        cells [floor(p * bin), ceil((p + 1) * bin)) + start clipped to the map; an empty cell gives 0.
        The gradient goes to the first maximum (row-major) of each cell.
    """
    rois, (ph, pw) = check_roi_args(features, rois, output_size, spatial_scale)
    ext = backend(features.device)
    if ext is None or features.device.type != "cpu":
        check_roi_values(features, rois)
    if ext is None:
        return reference.roi_pool(features, rois, (ph, pw), float(spatial_scale))
    with _input_errors():
        return _RoIPoolFunction.apply(features.contiguous(), rois.contiguous(), ext, ph, pw, float(spatial_scale))


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int], spatial_scale: float,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoIAlign with torchvision's semantics (average of bilinear samples per bin).

    Args:
        features: [B, C, H, W] float32/float64.
        rois: [R, 5] ``(batch_idx, x1, y1, x2, y2)``; unlike :func:`roi_pool` the coordinates are continuous
            (no +1): the roi spans x1 * scale to x2 * scale (minus 0.5 when ``aligned``).
        output_size: ``h = w`` (int) or ``(h, w)``.
        spatial_scale: image -> feature map scale.
        sampling_ratio: samples per bin side; <= 0 means ceil(roi_size / output_size) (adaptive).
        aligned: torchvision's half-pixel shift; when False the roi size is clamped to at least 1.
    Returns:
        [R, C, h, w].
    """
    rois, (ph, pw) = check_roi_args(features, rois, output_size, spatial_scale)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise KernelInputError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    ext = backend(features.device)
    if ext is None or features.device.type != "cpu":
        check_roi_values(features, rois)
    if ext is None:
        return reference.roi_align(features, rois, (ph, pw), float(spatial_scale), sampling_ratio, bool(aligned))
    with _input_errors():
        return _RoIAlignFunction.apply(features.contiguous(), rois.contiguous(), ext, ph, pw, float(spatial_scale),
                                       int(sampling_ratio), bool(aligned))
