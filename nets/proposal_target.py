"""The proposal target layer (end-to-end mode): sample RPN proposals + GT into Fast R-CNN training RoIs.

The fg/bg sampling itself is injected (``stages`` passes ``roidb.minibatch.sample_rois``), so the rules live in one
place. Boxes are ``[x1, y1, x2, y2]`` inclusive pixels at blob scale.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from kernels.boxes import bbox_overlaps, bbox_transform

__all__ = ["proposal_target_layer", "RoISampler"]

# sampler(max_overlaps (N,) float, max_classes (N,) int, *, fg_thresh, bg_thresh_hi, bg_thresh_lo,
#         rois_per_image, fg_rois_per_image, rng) -> (keep_inds int64 (R,), labels int64 (R,))
RoISampler = Callable[..., tuple[np.ndarray, np.ndarray]]


def _per_class(values: Sequence[float] | np.ndarray | torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """(4,) or (K, 4) or (4K,) normalisation constants -> float32 (K, 4)."""
    t = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(-1)
    if t.numel() == 4:
        return t.repeat(num_classes, 1)
    if t.numel() == 4 * num_classes:
        return t.view(num_classes, 4)
    raise ValueError(f"{name} must have 4 or 4*num_classes={4 * num_classes} values, got {t.numel()}")


def proposal_target_layer(rpn_rois: torch.Tensor, gt_boxes: torch.Tensor, num_classes: int, sampler: RoISampler, *,
                          rng: np.random.Generator, batch_size: int = 128, ims_per_batch: int = 1,
                          fg_fraction: float = 0.25, fg_thresh: float = 0.5, bg_thresh_hi: float = 0.5,
                          bg_thresh_lo: float = 0.1, bbox_normalize_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                          bbox_normalize_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                          bbox_inside_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Training RoIs and targets for one image from its proposals (py-faster-rcnn's proposal_target_layer).

    GT boxes are appended to the proposals; each RoI is matched to its best GT; ``sampler`` picks
    ``rois_per_image = batch_size // ims_per_batch`` RoIs with ``round(fg_fraction * rois_per_image)`` foreground;
    targets are bbox_transform(RoI, GT), normalised as (t - mean) / std per class, expanded to the label's 4 slots.

    Args:
        rpn_rois: (R, 5) ``[0, x1, y1, x2, y2]`` proposals (the batch index column is kept).
        gt_boxes: (G, 5) ``[x1, y1, x2, y2, cls]``, G >= 1.
        num_classes: K, background included.
        sampler: see :data:`RoISampler` (``roidb.minibatch.sample_rois``).
        rng: NumPy generator handed to the sampler.
        bbox_normalize_means, bbox_normalize_stds: (4,) or (K, 4).
    Returns:
        dict of float32 ``rois`` (S, 5), int64 ``labels`` (S,), float32 ``bbox_targets``, ``bbox_inside_weights``
        and ``bbox_outside_weights`` (S, 4K) (outside = inside > 0), on the device of ``rpn_rois``.
    """
    dev = rpn_rois.device
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32, device=dev)
    if gt.dim() != 2 or gt.shape[0] == 0 or gt.shape[1] != 5:
        raise ValueError(f"proposal_target_layer needs gt_boxes of shape [G>=1, 5], got {list(gt.shape)}")
    gt_rois = torch.cat((rpn_rois.new_full((gt.shape[0], 1), float(rpn_rois[0, 0]) if rpn_rois.numel() else 0.0),
                         gt[:, :4]), dim=1)
    all_rois = torch.cat((rpn_rois.float(), gt_rois), dim=0)
    overlaps = bbox_overlaps(all_rois[:, 1:5], gt[:, :4])
    max_overlaps, gt_assignment = overlaps.max(dim=1)
    rois_per_image = batch_size // ims_per_batch
    keep, labels = sampler(max_overlaps.cpu().numpy(), gt[gt_assignment, 4].long().cpu().numpy(),
                           fg_thresh=fg_thresh, bg_thresh_hi=bg_thresh_hi, bg_thresh_lo=bg_thresh_lo,
                           rois_per_image=rois_per_image, fg_rois_per_image=int(np.round(fg_fraction * rois_per_image)),
                           rng=rng)
    keep = torch.as_tensor(np.asarray(keep, dtype=np.int64), device=dev)
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=dev)
    rois = all_rois[keep]
    targets = bbox_transform(rois[:, 1:5], gt[gt_assignment[keep], :4]).float()
    means = _per_class(bbox_normalize_means, num_classes, "bbox_normalize_means").to(dev)
    stds = _per_class(bbox_normalize_stds, num_classes, "bbox_normalize_stds").to(dev)
    targets = (targets - means[labels]) / stds[labels]
    return {"rois": rois, "labels": labels, **_expand_targets(targets, labels, num_classes, bbox_inside_weights)}


def _expand_targets(targets: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    bbox_inside_weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """(S, 4) targets -> (S, 4K) with the 4 values (and inside weights) in the label's slots; background rows 0."""
    s = labels.numel()
    out = targets.new_zeros((s, 4 * num_classes))
    inside = targets.new_zeros((s, 4 * num_classes))
    rows = torch.nonzero(labels > 0).flatten()
    cols = 4 * labels[rows, None] + torch.arange(4, device=labels.device)
    out[rows[:, None], cols] = targets[rows]
    inside[rows[:, None], cols] = torch.tensor(list(bbox_inside_weights), dtype=targets.dtype, device=targets.device)
    return {"bbox_targets": out, "bbox_inside_weights": inside, "bbox_outside_weights": (inside > 0).float()}
