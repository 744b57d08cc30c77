"""The Faster R-CNN model (shared conv body, RPN head, Fast R-CNN head) and test-time detection (im_detect).

Boxes are ``[x1, y1, x2, y2]`` inclusive pixels (width = x2 - x1 + 1). Blobs follow docs/architecture.md: ``data``
float32 (B, 3, H, W) BGR minus PIXEL_MEANS, ``im_info`` (B, 3) ``[H, W, scale]``; NumPy arrays or tensors.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from kernels import nms
from kernels.boxes import bbox_transform_inv, clip_boxes
from nets.anchors import generate_anchors, shifted_anchors
from nets.backbones import PYFRCNN_PIXEL_MEANS, build_backbone, init_backbone, load_backbone_weights
from nets.losses import fast_rcnn_loss, rpn_loss
from nets.proposal_target import RoISampler, proposal_target_layer
from nets.roi_head import RoIHead
from nets.rpn import RPNHead, anchor_target_layer, proposal_layer

__all__ = ["FasterRCNN", "im_detect", "im_detect_blob", "detect_blob", "postprocess_detections", "prep_image"]


class FasterRCNN(nn.Module):
    """Backbone body + RPN head + Fast R-CNN head, always both heads (every stage's checkpoint carries both).

    Submodules: ``body`` (conv layers, Caffe names), ``rpn`` (:class:`nets.rpn.RPNHead`), ``roi_head``
    (:class:`nets.roi_head.RoIHead`, holding fc6/fc7 as ``roi_head.box_head``). Buffers ``bbox_means`` and
    ``bbox_stds`` (4K,) undo the Fast R-CNN target normalisation at test time; they start at 0 and 1.

    Args:
        net: 'vgg16', 'zf', 'tiny', 'resnet50' or 'resnet101'.
        num_classes: K, background included.
        anchor_scales, anchor_ratios: for :func:`nets.anchors.generate_anchors` (base size 16).
        pooling: 'roi_pool' or 'roi_align'; None takes the net's own (roi_align for the ResNets, else roi_pool).
        weights: ImageNet weights file for the body and fc6/fc7 (see :func:`nets.backbones.load_backbone_weights`);
            None gives a seeded random init (He-normal) and a warning when ``warn_random_init``.
        seed: seeds the ``torch.Generator`` that draws every initial weight (RNG_SEED).
        pixel_means: BGR means the blobs are centred with (folded into torchvision weights).
    """

    def __init__(self, net: str, num_classes: int, *, anchor_scales: Sequence[float] = (8, 16, 32),
                 anchor_ratios: Sequence[float] = (0.5, 1, 2), pooling: str | None = None, weights: str | None = None,
                 seed: int = 3, pixel_means: Sequence[float] = PYFRCNN_PIXEL_MEANS, warn_random_init: bool = True):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        backbone = build_backbone(net)
        generator = torch.Generator().manual_seed(int(seed))
        init_backbone(backbone, generator)
        if weights is not None:
            load_backbone_weights(backbone, weights, pixel_means)
        elif warn_random_init:
            warnings.warn(f"no pretrained weights given for {net}: M0 is a seeded random init (seed {seed})",
                          stacklevel=2)
        self.net, self.num_classes = net, num_classes
        self.anchor_scales = tuple(float(s) for s in anchor_scales)
        self.anchor_ratios = tuple(float(r) for r in anchor_ratios)
        self.feat_stride = backbone.feat_stride
        self.conv_names = backbone.conv_names
        self.always_frozen = backbone.always_frozen
        self.body = backbone.body
        base = generate_anchors(16, self.anchor_ratios, self.anchor_scales)
        self.rpn = RPNHead(backbone.out_channels, backbone.rpn_channels, base.shape[0])
        self.rpn.reset_parameters(generator)
        self.roi_head = RoIHead(backbone.box_head, backbone.out_channels, backbone.fc_dim, num_classes,
                                backbone.pool_size, 1.0 / backbone.feat_stride, pooling or backbone.pooling)
        self.roi_head.reset_predictors(generator)
        self.register_buffer("base_anchors", torch.as_tensor(base, dtype=torch.float32), persistent=False)
        self.register_buffer("bbox_means", torch.zeros(4 * num_classes))
        self.register_buffer("bbox_stds", torch.ones(4 * num_classes))

    # ---- helpers -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.bbox_means.device

    def _t(self, x, dtype=torch.float32) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, device=self.device
                               ).to(dtype)

    def set_bbox_normalization(self, means, stds) -> None:
        """Store the roidb's target means/stds: (4,), (K, 4) or (4K,) each."""
        k4 = 4 * self.num_classes
        for name, value in (("bbox_means", means), ("bbox_stds", stds)):
            t = torch.as_tensor(np.asarray(value, dtype=np.float32)).reshape(-1)
            if t.numel() == 4:
                t = t.repeat(self.num_classes)
            if t.numel() != k4:
                raise ValueError(f"{name} needs 4 or {k4} values for {self.num_classes} classes, got {t.numel()}")
            getattr(self, name).copy_(t)

    def anchors(self, height: int, width: int) -> torch.Tensor:
        """(height * width * A, 4) anchors of a feature map, (h, w, a) order."""
        return shifted_anchors(self.base_anchors, height, width, self.feat_stride, device=self.device)

    def rpn_forward(self, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, 3, H, W) blob -> features, RPN logits (N, 2), deltas (N, 4), anchors (N, 4).

        Under torch.autocast the features stay in the autocast dtype (the RoI head takes them as they are);
        logits and deltas leave in float32, so anchor targets, box decoding and the losses run in float32.
        """
        features = self.body(self._t(data))
        logits, deltas = self.rpn(features)
        return features, logits.float(), deltas.float(), self.anchors(features.shape[2], features.shape[3])

    # ---- training ------------------------------------------------------------------------------------------
    def rpn_losses(self, blobs: dict, *, generator: torch.Generator, **anchor_target_settings
                   ) -> dict[str, torch.Tensor]:
        """RPN losses on an RPN batch (keys ``data`` (1, 3, H, W), ``im_info`` (1, 3), ``gt_boxes`` (G, 5)).

        ``anchor_target_settings`` are :func:`nets.rpn.anchor_target_layer`'s keywords (rpn_positive_overlap,
        rpn_negative_overlap, rpn_clobber_positives, rpn_fg_fraction, rpn_batchsize, rpn_bbox_inside_weights,
        rpn_positive_weight). Returns ``{'rpn_cls', 'rpn_bbox'}`` scalar tensors.
        """
        _, logits, deltas, anchors = self.rpn_forward(blobs["data"])
        im_info = self._t(blobs["im_info"]).reshape(-1, 3)[0].tolist()
        targets = anchor_target_layer(anchors, self._t(blobs["gt_boxes"]), im_info, generator=generator,
                                      **anchor_target_settings)
        return rpn_loss(logits, deltas, targets)

    def frcn_losses(self, blobs: dict) -> dict[str, torch.Tensor]:
        """Fast R-CNN losses on a Fast R-CNN batch (keys ``data``, ``rois`` (R, 5), ``labels`` (R,) and, when
        BBOX_REG, ``bbox_targets``, ``bbox_inside_weights``, ``bbox_outside_weights`` (R, 4K)).

        Returns ``{'cls', 'bbox'}`` scalar tensors (bbox is 0 without targets).
        """
        features = self.body(self._t(blobs["data"]))
        cls_score, bbox_pred = self.roi_head(features, self._t(blobs["rois"]))
        extra = [self._t(blobs[k]) if k in blobs else None
                 for k in ("bbox_targets", "bbox_inside_weights", "bbox_outside_weights")]
        return fast_rcnn_loss(cls_score, bbox_pred, self._t(blobs["labels"], torch.int64), *extra)

    def e2e_losses(self, blobs: dict, *, generator: torch.Generator, rng: np.random.Generator,
                   sampler: RoISampler, proposal_settings: dict, anchor_target_settings: dict | None = None,
                   proposal_target_settings: dict | None = None) -> dict[str, torch.Tensor]:
        """All four losses on an RPN batch, training both heads at once (the end-to-end mode).

        RPN losses as in :meth:`rpn_losses`; then :func:`nets.rpn.proposal_layer` (``proposal_settings``: TRAIN
        pre_nms_top_n, post_nms_top_n, nms_thresh, min_size) on the detached RPN outputs,
        :func:`nets.proposal_target.proposal_target_layer` with ``sampler`` and ``rng``
        (``proposal_target_settings``: batch_size, fg_fraction, thresholds, bbox_normalize_means/stds) and the
        Fast R-CNN losses. Returns ``{'rpn_cls', 'rpn_bbox', 'cls', 'bbox'}``.
        """
        features, logits, deltas, anchors = self.rpn_forward(blobs["data"])
        im_info = self._t(blobs["im_info"]).reshape(-1, 3)[0].tolist()
        gt = self._t(blobs["gt_boxes"])
        targets = anchor_target_layer(anchors, gt, im_info, generator=generator, **(anchor_target_settings or {}))
        rois, _ = proposal_layer(logits.detach(), deltas.detach(), im_info, anchors, **proposal_settings)
        t = proposal_target_layer(rois, gt, self.num_classes, sampler, rng=rng, **(proposal_target_settings or {}))
        cls_score, bbox_pred = self.roi_head(features, t["rois"])
        return {**rpn_loss(logits, deltas, targets),
                **fast_rcnn_loss(cls_score, bbox_pred, t["labels"], t["bbox_targets"], t["bbox_inside_weights"],
                                 t["bbox_outside_weights"])}

    # ---- inference -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, data, im_info, *, pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
                min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
        """RPN proposals for one image blob: boxes (R, 4) in blob pixels, best first, and scores (R,)."""
        _, logits, deltas, anchors = self.rpn_forward(data)
        rois, scores = proposal_layer(logits, deltas, self._t(im_info).reshape(-1, 3)[0].tolist(), anchors,
                                      pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
                                      nms_thresh=nms_thresh, min_size=min_size)
        return rois[:, 1:5], scores


def prep_image(im_bgr: np.ndarray, *, scale: int, max_size: int,
               pixel_means: Sequence[float] = PYFRCNN_PIXEL_MEANS) -> tuple[torch.Tensor, float]:
    """A BGR uint8 (H, W, 3) image -> float32 (1, 3, H', W') blob minus ``pixel_means`` and its scale.

    py-faster-rcnn's rule: short side to ``scale`` unless round(s * long side) > ``max_size``, then
    s = max_size / long side; the float32 mean-subtracted image is resized with ``cv2.resize(INTER_LINEAR)``. The
    twin of ``roidb.blob.prep_im_for_blob`` (the training blobs), which nets may not import; a test pins the two.
    """
    if im_bgr.ndim != 3 or im_bgr.shape[2] != 3:
        raise ValueError(f"im_detect needs an (H, W, 3) BGR image, got shape {im_bgr.shape}")
    h, w = im_bgr.shape[:2]
    s = float(scale) / min(h, w)
    if np.round(s * max(h, w)) > max_size:
        s = float(max_size) / max(h, w)
    im = im_bgr.astype(np.float32) - np.asarray(pixel_means, dtype=np.float32)
    im = cv2.resize(im, None, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))[None], s


@torch.no_grad()
def detect_blob(model: FasterRCNN, data, im_info, *, boxes=None, pre_nms_top_n: int = 6000,
                post_nms_top_n: int = 300, nms_thresh: float = 0.7, min_size: float = 16
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class probabilities and un-normalised deltas for one image blob.

    Args:
        data: (1, 3, H, W) blob; im_info: ``[H, W, scale]``.
        boxes: (R, 4) RoIs in blob pixels, or None for RPN proposals at the given (TEST) settings.
    Returns:
        rois (R, 4) blob pixels, scores (R, K) softmax, deltas (R, 4K) = bbox_pred * stds + means.
    """
    features, logits, deltas, anchors = model.rpn_forward(data)
    info = model._t(im_info).reshape(-1, 3)[0].tolist()
    if boxes is None:
        rois, _ = proposal_layer(logits, deltas, info, anchors, pre_nms_top_n=pre_nms_top_n,
                                 post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh, min_size=min_size)
    else:
        b = model._t(boxes).reshape(-1, 4)
        rois = torch.cat((b.new_zeros((b.shape[0], 1)), b), dim=1)
    cls_score, bbox_pred = model.roi_head(features, rois)
    return rois[:, 1:5], torch.softmax(cls_score, dim=1), bbox_pred * model.bbox_stds + model.bbox_means


def im_detect(model: FasterRCNN, im_bgr: np.ndarray, *, scales: Sequence[int], max_size: int,
              pixel_means: Sequence[float] = PYFRCNN_PIXEL_MEANS, boxes: np.ndarray | None = None,
              pre_nms_top_n: int = 6000, post_nms_top_n: int = 300, nms_thresh: float = 0.7,
              min_size: float = 16) -> tuple[np.ndarray, np.ndarray]:
    """Detect in one image (py-faster-rcnn's ``im_detect`` with HAS_RPN, or with given ``boxes``).

    Args:
        im_bgr: uint8 (H, W, 3) BGR image as read by ``cv2.imread``.
        scales, max_size: TEST.SCALES (exactly one scale) and TEST.MAX_SIZE.
        boxes: optional (R, 4) RoIs in original pixels; None uses the RPN at TEST.RPN_* settings.
    Returns:
        scores float32 (R, K) softmax and boxes float32 (R, 4K) per-class boxes in original pixels, clipped.
    """
    if len(scales) != 1:
        raise ValueError(f"im_detect takes exactly one TEST.SCALES entry, got {list(scales)}")
    data, s = prep_image(im_bgr, scale=scales[0], max_size=max_size, pixel_means=pixel_means)
    scores, pred, _ = im_detect_blob(model, data, s, im_bgr.shape[:2], boxes=boxes, pre_nms_top_n=pre_nms_top_n,
                                     post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh, min_size=min_size)
    return scores, pred


def im_detect_blob(model: FasterRCNN, data: torch.Tensor, scale: float, im_shape: Sequence[int], *,
                   boxes: np.ndarray | None = None, pre_nms_top_n: int = 6000, post_nms_top_n: int = 300,
                   nms_thresh: float = 0.7, min_size: float = 16) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """:func:`im_detect` on a blob already made by :func:`prep_image` (``data``, ``scale``) from an image of
    ``im_shape`` (H, W): scores (R, K) and boxes (R, 4K) as im_detect returns them, plus the RoIs (R, 4) in blob
    pixels (the RPN's proposals, or ``boxes`` times ``scale``)."""
    was_training = model.training
    model.eval()
    try:
        im_info = [data.shape[2], data.shape[3], scale]
        blob_boxes = None if boxes is None else torch.as_tensor(np.asarray(boxes, np.float32)) * scale
        rois, scores, deltas = detect_blob(model, data.to(model.device), im_info, boxes=blob_boxes,
                                           pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
                                           nms_thresh=nms_thresh, min_size=min_size)
        pred = clip_boxes(bbox_transform_inv(rois / scale, deltas), im_shape[:2])
    finally:
        model.train(was_training)
    return scores.float().cpu().numpy(), pred.float().cpu().numpy(), rois


def postprocess_detections(scores, boxes, *, thresh: float = 0.05, nms_thresh: float = 0.3,
                           max_per_image: int = 100) -> list[np.ndarray]:
    """py-faster-rcnn's ``test_net`` filtering for one image.

    Per class j >= 1: keep scores > ``thresh``, NMS at ``nms_thresh`` (TEST.NMS); then across classes keep
    detections scoring >= the ``max_per_image``-th best.

    Args:
        scores: (R, K); boxes: (R, 4K), as returned by :func:`im_detect`.
    Returns:
        K float32 arrays (N_j, 5) ``[x1, y1, x2, y2, score]`` (entry 0, background, is empty): ``all_boxes[j][i]``.
    """
    scores = torch.as_tensor(np.asarray(scores, np.float32))
    boxes = torch.as_tensor(np.asarray(boxes, np.float32))
    k = scores.shape[1]
    out = [np.zeros((0, 5), np.float32)]
    for j in range(1, k):
        inds = torch.nonzero(scores[:, j] > thresh).flatten()
        dets = torch.cat((boxes[inds, 4 * j:4 * j + 4], scores[inds, j, None]), dim=1)
        keep = nms(dets[:, :4].contiguous(), dets[:, 4].contiguous(), nms_thresh)
        out.append(dets[keep].numpy().astype(np.float32))
    if max_per_image > 0:
        all_scores = np.concatenate([d[:, 4] for d in out[1:]]) if k > 1 else np.zeros(0)
        if all_scores.size > max_per_image:
            image_thresh = np.sort(all_scores)[-max_per_image]
            out = [out[0]] + [d[d[:, 4] >= image_thresh] for d in out[1:]]
    return out
