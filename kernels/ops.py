"""The public ops: argument checks, then the compiled kernels (autograd Functions) or the reference.

Boxes and RoIs are ``[x1, y1, x2, y2]`` in pixels, inclusive (width = x2 - x1 + 1), as in py-faster-rcnn.

The kernels compute in float32 or float64. float16/bfloat16 inputs (training under torch.autocast) are computed in
float32: the RoI ops return their output in the features' dtype, and autograd runs back through the casts.
Under ``torch.use_deterministic_algorithms(True)`` the CUDA backward of the RoI ops uses a deterministic kernel
(one writer per feature plane, the CPU kernels' summation order) instead of atomicAdd; the CPU kernels are always
deterministic.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from . import reference
from ._validate import (HALF_DTYPES, KernelInputError, check_batched_nms_args, check_nms_args, check_nms_values,
                        check_roi_args, check_roi_values)
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


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (differentiable); float32/float64 unchanged."""
    return t.float() if t.dtype in HALF_DTYPES else t


def _backward_options(grad: torch.Tensor) -> dict:
    """Keywords of the compiled backward: on CUDA, the deterministic kernel when torch asks for determinism
    (read at backward time). The CPU backward takes none: it is always deterministic."""
    return {"deterministic": torch.are_deterministic_algorithms_enabled()} if grad.is_cuda else {}


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy non-maximum suppression (py-faster-rcnn's py_cpu_nms / GPU kernel semantics).

    Args:
        boxes: [N, 4] float32/float64, or float16/bfloat16 computed in float32; inclusive ``[x1, y1, x2, y2]``;
            areas use the +1 convention.
        scores: [N], same dtype and device.
        iou_threshold: a box is suppressed when its IoU with a higher-scoring kept box is > this (strict).
        max_keep: None or <= 0 keeps every survivor; else only the first ``max_keep`` kept indices, found by
            stopping the greedy scan there: the same indices as ``nms(...)[:max_keep]`` without the cost of the
            rest (the proposal layer's post-NMS top N).
    Returns:
        int64 [K] indices of the kept boxes in decreasing score order; equal scores: the higher index first
        (py-faster-rcnn's ``scores.argsort()[::-1]``).
    Raises:
        KernelInputError (a ValueError) naming the argument for a wrong shape, dtype or value.
    """
    check_nms_args(boxes, scores, iou_threshold, max_keep)
    limit = -1 if max_keep is None or max_keep <= 0 else int(max_keep)
    boxes, scores = _upcast(boxes), _upcast(scores)
    ext = backend(boxes.device)
    if ext is None or boxes.device.type != "cpu":
        check_nms_values(boxes, scores)
    if ext is None:
        return reference.nms(boxes, scores, float(iou_threshold), limit)
    with _input_errors():
        return ext.nms(boxes.contiguous(), scores.contiguous(), float(iou_threshold), limit)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each class: boxes [N, 4], scores [N] (dtypes as in :func:`nms`), idxs [N] integer class ids.

    Returns int64 [K] kept indices in decreasing score order (ties: higher index first); exactly the union
    of :func:`nms` run on each class separately.
    """
    check_batched_nms_args(boxes, scores, idxs, iou_threshold)
    boxes, scores = _upcast(boxes), _upcast(scores)
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
        grad = ctx.ext.roi_pool_backward(grad_out.contiguous(), rois, argmax, B, C, H, W,
                                         **_backward_options(grad_out))
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
                                      spatial_scale, sampling_ratio, aligned, **_backward_options(grad_out))
        return grad, None, None, None, None, None, None, None


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int],
             spatial_scale: float) -> torch.Tensor:
    """Caffe ROIPooling (max), as in py-faster-rcnn.

    Args:
        features: [B, C, H, W] float32/float64, or float16/bfloat16 computed in float32 (``features.float()``).
        rois: [R, 5] ``(batch_idx, x1, y1, x2, y2)`` in image pixels, inclusive; any float dtype, cast to the
            dtype computed in (float32 for half features: never rounded to the half dtype).
        output_size: pooled ``h = w`` (int) or ``(h, w)``.
        spatial_scale: image -> feature map scale, e.g. 1/16.
    Returns:
        [R, C, h, w] in the features' dtype. start/end = round(x * scale) (half away from zero); roi w/h =
        max(end - start + 1, 1); cells [floor(p * bin), ceil((p + 1) * bin)) + start clipped to the map; an empty
        cell gives 0. The gradient goes to the first maximum (row-major) of each cell; on CUDA it is summed by
        atomicAdd, or in a fixed order when ``torch.are_deterministic_algorithms_enabled()`` at backward time.
    """
    rois, (ph, pw) = check_roi_args(features, rois, output_size, spatial_scale)
    x = _upcast(features)
    ext = backend(x.device)
    if ext is None or x.device.type != "cpu":
        check_roi_values(x, rois)
    if ext is None:
        out = reference.roi_pool(x, rois, (ph, pw), float(spatial_scale))
    else:
        with _input_errors():
            out = _RoIPoolFunction.apply(x.contiguous(), rois.contiguous(), ext, ph, pw, float(spatial_scale))
    return out.to(features.dtype)


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int | Sequence[int], spatial_scale: float,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoIAlign with torchvision's semantics (average of bilinear samples per bin).

    Args:
        features: [B, C, H, W] float32/float64, or float16/bfloat16 computed in float32 (``features.float()``).
        rois: [R, 5] ``(batch_idx, x1, y1, x2, y2)``, cast as in :func:`roi_pool`; unlike :func:`roi_pool` the
            coordinates are continuous (no +1): the roi spans x1 * scale to x2 * scale (minus 0.5 when ``aligned``).
        output_size: ``h = w`` (int) or ``(h, w)``.
        spatial_scale: image -> feature map scale.
        sampling_ratio: samples per bin side; <= 0 means ceil(roi_size / output_size) (adaptive).
        aligned: torchvision's half-pixel shift; when False the roi size is clamped to at least 1.
    Returns:
        [R, C, h, w] in the features' dtype. The backward scatters each bin's gradient to its bilinear taps; on
        CUDA by atomicAdd, or in a fixed order when ``torch.are_deterministic_algorithms_enabled()`` at backward
        time.
    """
    rois, (ph, pw) = check_roi_args(features, rois, output_size, spatial_scale)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise KernelInputError(f"sampling_ratio must be an int, got {sampling_ratio!r}")
    x = _upcast(features)
    ext = backend(x.device)
    if ext is None or x.device.type != "cpu":
        check_roi_values(x, rois)
    if ext is None:
        out = reference.roi_align(x, rois, (ph, pw), float(spatial_scale), sampling_ratio, bool(aligned))
    else:
        with _input_errors():
            out = _RoIAlignFunction.apply(x.contiguous(), rois.contiguous(), ext, ph, pw, float(spatial_scale),
                                          int(sampling_ratio), bool(aligned))
    return out.to(features.dtype)
