"""Losses with py-faster-rcnn's normalisation: softmax cross-entropy and Caffe's weighted smooth L1."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["smooth_l1_loss", "rpn_loss", "fast_rcnn_loss"]


def smooth_l1_loss(pred: torch.Tensor, targets: torch.Tensor, inside_weights: torch.Tensor,
                   outside_weights: torch.Tensor, sigma: float, normalizer: float = 1.0) -> torch.Tensor:
    """Caffe's SmoothL1Loss (Fast R-CNN fork): sum(w_out * f(w_in * (pred - targets))) / normalizer.

    f(x) = 0.5 sigma^2 x^2 if |x| < 1/sigma^2 else |x| - 0.5/sigma^2. All inputs have one shape, e.g. (N, 4K).
    """
    x = inside_weights * (pred - targets)
    s2 = sigma * sigma
    ax = x.abs()
    f = torch.where(ax < 1.0 / s2, 0.5 * s2 * x * x, ax - 0.5 / s2)
    return (outside_weights * f).sum() / normalizer


def rpn_loss(logits: torch.Tensor, deltas: torch.Tensor, targets: dict[str, torch.Tensor],
             sigma: float = 3.0) -> dict[str, torch.Tensor]:
    """RPN losses for one image.

    Args:
        logits: (N, 2) ``[bg, fg]`` per anchor; deltas: (N, 4).
        targets: :func:`nets.rpn.anchor_target_layer`'s dict.
    Returns:
        ``rpn_cls``: softmax cross-entropy averaged over anchors with label != -1 (0 when none);
        ``rpn_bbox``: smooth L1 (sigma 3) summed; the outside weights 1/#sampled make it ~ sum_fg / 256.
    """
    labels = targets["labels"]
    keep = labels != -1
    if bool(keep.any()):
        cls = F.cross_entropy(logits[keep], labels[keep])
    else:
        cls = logits.sum() * 0.0
    bbox = smooth_l1_loss(deltas, targets["bbox_targets"], targets["bbox_inside_weights"],
                          targets["bbox_outside_weights"], sigma)
    return {"rpn_cls": cls, "rpn_bbox": bbox}


def fast_rcnn_loss(cls_score: torch.Tensor, bbox_pred: torch.Tensor, labels: torch.Tensor,
                   bbox_targets: torch.Tensor | None = None, bbox_inside_weights: torch.Tensor | None = None,
                   bbox_outside_weights: torch.Tensor | None = None, sigma: float = 1.0
                   ) -> dict[str, torch.Tensor]:
    """Fast R-CNN losses over R RoIs.

    Args:
        cls_score: (R, K) logits; bbox_pred: (R, 4K).
        labels: int64 (R,); bbox_targets / inside / outside weights: (R, 4K) (weights non-zero only on the GT
            class's 4 slots). Without targets (BBOX_REG off) the bbox loss is 0.
    Returns:
        ``cls``: cross-entropy averaged over the R RoIs; ``bbox``: smooth L1 (sigma 1) summed and divided by R.
    """
    num_rois = max(labels.numel(), 1)
    if labels.numel() == 0:
        cls = cls_score.sum() * 0.0
    else:
        cls = F.cross_entropy(cls_score, labels)
    if bbox_targets is None:
        bbox = bbox_pred.sum() * 0.0
    else:
        bbox = smooth_l1_loss(bbox_pred, bbox_targets, bbox_inside_weights, bbox_outside_weights, sigma,
                              normalizer=num_rois)
    return {"cls": cls, "bbox": bbox}
