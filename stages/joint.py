"""The end2end mode's training step `e2e`: py-faster-rcnn's approximate joint training (faster_rcnn_end2end.sh).

One net, one solver (PIPELINE.E2E_ITERS / E2E_LR / E2E_STEPSIZE), initialised from M0, on the flipped gt roidb
(images without a GT box dropped), one image per batch (py-faster-rcnn's IMS_PER_BATCH 1 with HAS_RPN), whatever
TRAIN.IMS_PER_BATCH / HAS_RPN / PROPOSAL_METHOD say. Each batch (FasterRCNN.e2e_losses):

    anchor target layer (TRAIN.RPN_*)       -> rpn_cls + rpn_bbox
    proposal layer on the detached RPN outputs (TRAIN.RPN_PRE_NMS_TOP_N -> NMS TRAIN.RPN_NMS_THRESH ->
        TRAIN.RPN_POST_NMS_TOP_N, TRAIN.RPN_MIN_SIZE): no gradient through the proposal coordinates
    proposal target layer: proposals + GT boxes, TRAIN.BATCH_SIZE RoIs (FG_FRACTION fg at IoU >= FG_THRESH, bg in
        [BG_THRESH_LO, BG_THRESH_HI)), targets normalised with TRAIN.BBOX_NORMALIZE_MEANS / STDS
    Fast R-CNN head                         -> cls + bbox
    loss = rpn_cls + rpn_bbox + cls + bbox (each weight 1)

Trained: every conv but the net's always-frozen ones (VGG16 conv1_1..conv2_2), the RPN head, fc6..bbox_pred.
The final weights (``model.pt``) carry the means/stds, so eval undoes the normalisation. Every random draw (scale,
anchor sampling, RoI sampling) comes from the batch's seeds, a function of RNG_SEED and the batch number, so a
resumed run ends bit-identical and torchrun's ranks draw what one process would.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import numpy as np
import torch

from roidb.loader import RoIDataLoader
from roidb.minibatch import get_minibatch, sample_rois

from .engine.config import Config
from .engine.runner import StepContext, StepResult
from .settings import (anchor_target_settings, bbox_normalization, blob_settings, build_model, loader_settings,
                       proposal_target_settings, train_proposal_settings)
from .training import LossFn, _train, _training_imdb, rpn_roidb_for_training

__all__ = ["E2E_IMS_PER_BATCH", "e2e_blobs", "make_e2e_loader", "e2e_loss_fn", "e2e"]

E2E_IMS_PER_BATCH = 1
_SEED_BOUND = 2 ** 62


def e2e_blobs(entries: list[dict], *, rng: np.random.Generator, **minibatch_args: Any) -> dict:
    """An RPN batch (data, im_info, gt_boxes) plus the seeds of its anchor sampling and its RoI sampling."""
    blobs = get_minibatch(entries, rng=rng, has_rpn=True, **minibatch_args)
    blobs["anchor_seed"] = int(rng.integers(_SEED_BOUND))
    blobs["roi_seed"] = int(rng.integers(_SEED_BOUND))
    return blobs


def make_e2e_loader(config: Config, roidb: list[dict], num_classes: int, rank: int = 0,
                    world_size: int = 1) -> RoIDataLoader:
    """Batches of one image (PIPELINE.ITER_SIZE per solver step); under torchrun rank `rank`'s shard."""
    blob_fn = functools.partial(e2e_blobs, **blob_settings(config, num_classes))
    return RoIDataLoader(roidb, blob_fn, ims_per_batch=E2E_IMS_PER_BATCH, rank=rank, world_size=world_size,
                         **loader_settings(config))


def e2e_loss_fn(config: Config) -> LossFn:
    """loss_fn(model, blobs) -> {'rpn_cls', 'rpn_bbox', 'cls', 'bbox'} (FasterRCNN.e2e_losses)."""
    anchors, proposals, targets = (anchor_target_settings(config), train_proposal_settings(config),
                                   proposal_target_settings(config))

    def loss_fn(model: torch.nn.Module, blobs: Mapping[str, Any]) -> dict:
        return model.e2e_losses(blobs, generator=torch.Generator().manual_seed(blobs["anchor_seed"]),
                                rng=np.random.default_rng(blobs["roi_seed"]), sampler=sample_rois,
                                proposal_settings=proposals, anchor_target_settings=anchors,
                                proposal_target_settings=targets)

    return loss_fn


def e2e(ctx: StepContext) -> StepResult:
    """Train RPN and Fast R-CNN jointly from M0 (the end2end mode's final model)."""
    imdb = _training_imdb(ctx)
    model = build_model(ctx.config, imdb.num_classes, ctx.weights, echo=ctx.log)
    means, stds = bbox_normalization(ctx.config)
    model.set_bbox_normalization(means, stds)
    loader = make_e2e_loader(ctx.config, rpn_roidb_for_training(ctx.config, imdb), imdb.num_classes,
                             rank=ctx.dist.rank, world_size=ctx.dist.world_size)
    return _train(ctx, model.to(ctx.device), e2e_loss_fn(ctx.config), loader, imdb.classes)
