"""The Region Proposal Network: its head, py-faster-rcnn's anchor_target_layer and proposal_layer.

Per-anchor tensors are flat in (h, w, a) order, the order of :func:`nets.anchors.shifted_anchors`. Boxes are
``[x1, y1, x2, y2]`` inclusive pixels at blob scale (width = x2 - x1 + 1).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kernels import nms
from kernels.reference import argsort_desc
from kernels.boxes import bbox_overlaps, bbox_transform, bbox_transform_inv, clip_boxes

__all__ = ["RPNHead", "anchor_target_layer", "proposal_layer"]


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs ``rpn_cls_score`` (2A channels) and ``rpn_bbox_pred`` (4A channels).

    Channel layout is py-faster-rcnn's: ``rpn_cls_score`` channels 0..A-1 are the background logits of anchors
    0..A-1 and channels A..2A-1 their foreground logits (the (N, 2, A*H, W) reshape); ``rpn_bbox_pred`` channel
    4a + k is delta k (dx, dy, dw, dh) of anchor a.
    """

    def __init__(self, in_channels: int, mid_channels: int, num_anchors: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.rpn_cls_score = nn.Conv2d(mid_channels, 2 * num_anchors, 1)
        self.rpn_bbox_pred = nn.Conv2d(mid_channels, 4 * num_anchors, 1)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """py-faster-rcnn's init: every weight N(0, 0.01), biases 0."""
        with torch.no_grad():
            for conv in (self.rpn_conv, self.rpn_cls_score, self.rpn_bbox_pred):
                conv.weight.normal_(0.0, 0.01, generator=generator)
                conv.bias.zero_()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, C, H, W) features -> logits (H*W*A, 2) ``[bg, fg]`` and deltas (H*W*A, 4), (h, w, a) order."""
        if features.shape[0] != 1:
            raise ValueError(f"the RPN takes one image at a time (IMS_PER_BATCH=1), got a batch of {features.shape[0]}")
        x = torch.relu(self.rpn_conv(features))
        a = self.num_anchors
        _, _, h, w = x.shape
        logits = self.rpn_cls_score(x).view(2, a, h, w).permute(2, 3, 1, 0).reshape(-1, 2)
        deltas = self.rpn_bbox_pred(x).view(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        return logits, deltas


def _disable_surplus(labels: torch.Tensor, value: int, keep: int, generator: torch.Generator) -> None:
    """Set all but ``keep`` randomly chosen entries equal to ``value`` to -1, in place."""
    inds = torch.nonzero(labels == value).flatten()
    if inds.numel() > keep:
        drop = inds[torch.randperm(inds.numel(), generator=generator, device="cpu").to(inds.device)[keep:]]
        labels[drop] = -1


def anchor_target_layer(anchors: torch.Tensor, gt_boxes: torch.Tensor, im_info: Sequence[float], *,
                        generator: torch.Generator, rpn_positive_overlap: float = 0.7,
                        rpn_negative_overlap: float = 0.3, rpn_clobber_positives: bool = False,
                        rpn_fg_fraction: float = 0.5, rpn_batchsize: int = 256,
                        rpn_bbox_inside_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                        rpn_positive_weight: float = -1.0, allowed_border: float = 0.0
                        ) -> dict[str, torch.Tensor]:
    """RPN training targets, py-faster-rcnn's rules, vectorised.

    Anchors not fully inside the image (allowed_border 0) get label -1 and zero targets/weights. Among the rest,
    labels start at -1; IoU < ``rpn_negative_overlap`` -> 0 (after the positives when ``rpn_clobber_positives``);
    every anchor attaining some GT's max IoU (ties included) -> 1; IoU >= ``rpn_positive_overlap`` -> 1. Then at
    most ``int(rpn_fg_fraction * rpn_batchsize)`` positives and ``rpn_batchsize - #positives`` negatives are kept,
    drawn with ``generator``; the surplus becomes -1. One guard beyond py-faster-rcnn: a GT whose best IoU is 0
    marks no anchor positive (it would otherwise mark every zero-overlap anchor).

    Args:
        anchors: (N, 4) all anchors, (h, w, a) order.
        gt_boxes: (G, 4+) GT boxes at blob scale (extra columns such as the class are ignored); G may be 0.
        im_info: ``[H, W, scale]`` of the blob.
        generator: CPU ``torch.Generator`` for the subsampling.
    Returns:
        dict of ``labels`` int64 (N,) in {-1, 0, 1}, ``bbox_targets`` float32 (N, 4) = bbox_transform(anchor,
        best GT) (not normalised), ``bbox_inside_weights`` (N, 4) (``rpn_bbox_inside_weights`` on positives) and
        ``bbox_outside_weights`` (N, 4): 1/#(labels >= 0) on sampled anchors when ``rpn_positive_weight`` < 0,
        else ``p/#pos`` on positives and ``(1-p)/#neg`` on negatives.
    """
    n = anchors.shape[0]
    dev = anchors.device
    height, width = float(im_info[0]), float(im_info[1])
    gt = _as_gt(gt_boxes, dev)
    inside = torch.nonzero((anchors[:, 0] >= -allowed_border) & (anchors[:, 1] >= -allowed_border)
                           & (anchors[:, 2] < width + allowed_border)
                           & (anchors[:, 3] < height + allowed_border)).flatten()
    ex = anchors[inside]
    labels = torch.full((inside.numel(),), -1, dtype=torch.int64, device=dev)
    if gt.shape[0] > 0 and inside.numel() > 0:
        overlaps = bbox_overlaps(ex, gt)
        max_overlaps, argmax = overlaps.max(dim=1)
        gt_max = overlaps.max(dim=0).values
        attains_gt_max = ((overlaps == gt_max[None, :]) & (gt_max[None, :] > 0)).any(dim=1)
        targets = bbox_transform(ex, gt[argmax]).float()
    else:
        max_overlaps = torch.zeros(inside.numel(), device=dev)
        attains_gt_max = torch.zeros(inside.numel(), dtype=torch.bool, device=dev)
        targets = torch.zeros((inside.numel(), 4), device=dev)
    if not rpn_clobber_positives:
        labels[max_overlaps < rpn_negative_overlap] = 0
    labels[attains_gt_max] = 1
    labels[max_overlaps >= rpn_positive_overlap] = 1
    if rpn_clobber_positives:
        labels[max_overlaps < rpn_negative_overlap] = 0
    num_fg = int(rpn_fg_fraction * rpn_batchsize)
    _disable_surplus(labels, 1, num_fg, generator)
    _disable_surplus(labels, 0, rpn_batchsize - int((labels == 1).sum()), generator)
    inside_w = torch.zeros((inside.numel(), 4), device=dev)
    inside_w[labels == 1] = torch.tensor(list(rpn_bbox_inside_weights), dtype=torch.float32, device=dev)
    outside_w = _outside_weights(labels, rpn_positive_weight)
    return {"labels": _unmap(labels, n, inside, -1), "bbox_targets": _unmap(targets, n, inside, 0),
            "bbox_inside_weights": _unmap(inside_w, n, inside, 0),
            "bbox_outside_weights": _unmap(outside_w, n, inside, 0)}


def _as_gt(gt_boxes, device: torch.device) -> torch.Tensor:
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32, device=device)
    if gt.numel() == 0:
        return gt.new_zeros((0, 4))
    if gt.dim() != 2 or gt.shape[1] < 4:
        raise ValueError(f"gt_boxes must have shape [G, 4] or [G, 5], got {list(gt.shape)}")
    return gt[:, :4]


def _outside_weights(labels: torch.Tensor, rpn_positive_weight: float) -> torch.Tensor:
    pos, neg = labels == 1, labels == 0
    if rpn_positive_weight < 0:
        num_examples = max(int((labels >= 0).sum()), 1)
        w_pos = w_neg = 1.0 / num_examples
    else:
        if not 0.0 < rpn_positive_weight < 1.0:
            raise ValueError(f"rpn_positive_weight must be < 0 or in (0, 1), got {rpn_positive_weight}")
        w_pos = rpn_positive_weight / max(int(pos.sum()), 1)
        w_neg = (1.0 - rpn_positive_weight) / max(int(neg.sum()), 1)
    out = torch.zeros((labels.numel(), 4), device=labels.device)
    out[pos] = w_pos
    out[neg] = w_neg
    return out


def _unmap(data: torch.Tensor, count: int, inds: torch.Tensor, fill: float) -> torch.Tensor:
    out = torch.full((count,) + tuple(data.shape[1:]), fill, dtype=data.dtype, device=data.device)
    out[inds] = data
    return out


def proposal_layer(scores: torch.Tensor, deltas: torch.Tensor, im_info: Sequence[float], anchors: torch.Tensor, *,
                   pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float, min_size: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """RPN proposals for one image (py-faster-rcnn's proposal_layer).

    Foreground scores, decode the deltas on the anchors, clip to [0, W-1] x [0, H-1], drop boxes with
    w or h < ``min_size * im_info[2]`` (w = x2 - x1 + 1), sort by score, keep the top ``pre_nms_top_n``
    (<= 0: no cap), NMS at ``nms_thresh`` (``kernels.nms``), keep the top ``post_nms_top_n`` (<= 0: no cap).

    Args:
        scores: (N, 2) logits ``[bg, fg]`` or (N,) foreground probabilities, (h, w, a) order.
        deltas: (N, 4) predicted deltas.
        im_info: ``[H, W, scale]`` of the blob.
        anchors: (N, 4) anchors.
    Returns:
        rois (R, 5) float32 ``[0, x1, y1, x2, y2]`` at blob scale, best first, and their fg scores (R,).
    """
    with torch.no_grad():
        fg = torch.softmax(scores, dim=1)[:, 1] if scores.dim() == 2 else scores
        boxes = clip_boxes(bbox_transform_inv(anchors, deltas.to(anchors.dtype)), (im_info[0], im_info[1]))
        min_px = float(min_size) * float(im_info[2])
        keep = torch.nonzero((boxes[:, 2] - boxes[:, 0] + 1 >= min_px)
                             & (boxes[:, 3] - boxes[:, 1] + 1 >= min_px)).flatten()
        boxes, fg = boxes[keep], fg[keep]
        order = argsort_desc(fg)   # py-faster-rcnn's scores.ravel().argsort()[::-1]: ties by decreasing index
        if pre_nms_top_n > 0:
            order = order[:pre_nms_top_n]
        boxes, fg = boxes[order].float().contiguous(), fg[order].float().contiguous()
        # Greedy NMS stops once post_nms_top_n boxes are kept: the first post_nms_top_n of the full answer.
        keep = nms(boxes, fg, nms_thresh, max_keep=post_nms_top_n if post_nms_top_n > 0 else None)
        boxes, fg = boxes[keep], fg[keep]
        rois = torch.cat((boxes.new_zeros((boxes.shape[0], 1)), boxes), dim=1)
    return rois, fg
