"""The four training steps of alternating training: stage1 and stage3 train the RPN, stage2 and stage4 Fast R-CNN.

| step   | initialised from                       | roidb (with flipped copies)       | batch                | trains         |
|--------|----------------------------------------|-----------------------------------|----------------------|----------------|
| stage1 | M0 (PIPELINE.WEIGHTS or seeded random) | gt                                | 1 image, its anchors | convs + RPN    |
| stage2 | M0 again (not M1)                      | GT + P1, bbox targets normalised  | 2 images, BATCH_SIZE | convs + head   |
| stage3 | M2, RPN head re-initialised            | gt                                | 1 image, its anchors | RPN head       |
| stage4 | M3, cls_score/bbox_pred re-initialised | GT + P2, bbox targets normalised  | 2 images, BATCH_SIZE | fc6..bbox_pred |

These are py-faster-rcnn's per-stage overrides (IMS_PER_BATCH 1/2, HAS_RPN, PROPOSAL_METHOD gt/rpn, BBOX_REG on),
applied whatever TRAIN.IMS_PER_BATCH / HAS_RPN / BBOX_REG / PROPOSAL_METHOD say. "convs" excludes the net's
always-frozen layers (nets.freezing). Each step writes ``model.pt`` (the nets checkpoint format, plus ``stage``
and ``iteration``; Fast R-CNN steps store their target means/stds in it) through `StepContext.train`, which
snapshots and resumes. Every random draw of a batch (scale, RoI sampling, and the RPN's anchor sampling through
the batch's ``anchor_seed``) comes from the loader's per-batch generator, a function of RNG_SEED and the batch
number, and the loader's state goes into the snapshots, so a resumed step ends with bit-identical weights.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from nets import FasterRCNN, param_groups, reinit_predictors, reinit_rpn_head, set_trainable
from nets.checkpoint import checkpoint_dict
from roidb.errors import DataError
from roidb.imdb import Imdb, check_image_file
from roidb.loader import RoIDataLoader
from roidb.minibatch import get_minibatch
from roidb.training import add_bbox_regression_targets, filter_roidb, get_training_roidb

from .engine.config import Config
from .engine.errors import StepFailedError
from .settings import (anchor_target_settings, bbox_target_settings, blob_settings, build_model, filter_settings,
                       frcn_sampling_settings, load_imdb, load_stage_model, loader_settings, torch_generator)
from .engine.runner import StepContext, StepResult
from .engine.trainer import LOG_NAME, read_log

__all__ = ["rpn_roidb_for_training", "frcn_roidb_for_training", "make_loader", "rpn_loss_fn", "frcn_loss_fn",
           "stage1", "stage2", "stage3", "stage4"]

RPN_IMS_PER_BATCH = 1
FRCN_IMS_PER_BATCH = 2
_SEED_BOUND = 2 ** 62


def _filter(config: Config, roidb: list[dict]) -> list[dict]:
    return filter_roidb(roidb, **filter_settings(config))


def rpn_roidb_for_training(config: Config, imdb: Imdb) -> list[dict]:
    """The gt roidb with flipped copies (TRAIN.USE_FLIPPED), prepared, without the images that have no GT box.

    On a gt roidb (every overlap is 1) that is what py-faster-rcnn's filter_roidb keeps for any FG_THRESH <= 1,
    so the RPN steps need not read the Fast R-CNN thresholds.
    """
    imdb.set_proposal_method("gt")
    roidb = get_training_roidb(imdb, use_flipped=config.get("TRAIN.USE_FLIPPED"))
    kept = [entry for entry in roidb if np.any(entry["gt_classes"] > 0)]
    if not kept:
        raise DataError(imdb.name, f"the training set has no objects: none of its {imdb.num_images} images has a "
                                   "ground-truth box (check the annotations, the class list and difficult flags)")
    return _checked_images(kept)


def _checked_images(roidb: list[dict]) -> list[dict]:
    """Every training image checked before the first iteration (a regular file, its header's size equal to the
    roidb's, a JPEG not truncated; no decoding), so that bad data stops a step before it trains, not midway."""
    seen: set[str] = set()
    for entry in roidb:
        if entry["image"] not in seen:
            seen.add(entry["image"])
            check_image_file(entry["image"], (entry["height"], entry["width"]))
    return roidb


def frcn_roidb_for_training(config: Config, imdb: Imdb, proposal_file: Path
                            ) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """GT + the proposals of `proposal_file` (flipped copies mirror the boxes), filtered, with bbox targets.

    Returns (roidb, means, stds), means/stds float64 (4K,): what the targets were normalised with (0 and 1 when
    TRAIN.BBOX_NORMALIZE_TARGETS is off, so test time undoes nothing).
    """
    imdb.config["rpn_file"] = str(proposal_file)
    imdb.set_proposal_method("rpn")
    roidb = _filter(config, get_training_roidb(imdb, use_flipped=config.get("TRAIN.USE_FLIPPED")))
    if not roidb:
        raise DataError(imdb.name, "no training image has a foreground or background RoI under TRAIN.FG_THRESH / "
                                   "BG_THRESH_HI / BG_THRESH_LO (or the training set has no objects)")
    _checked_images(roidb)
    targets = bbox_target_settings(config)
    means, stds = add_bbox_regression_targets(roidb, imdb.num_classes, **targets)
    if not targets["normalize_targets"]:
        means, stds = np.zeros_like(means), np.ones_like(stds)
    return roidb, means, stds


def _rpn_blobs(entries: list[dict], *, rng: np.random.Generator, **minibatch_args: Any) -> dict:
    blobs = get_minibatch(entries, rng=rng, has_rpn=True, **minibatch_args)
    # The anchor sampling of this batch draws from its own seed, so it too depends only on the batch number.
    blobs["anchor_seed"] = int(rng.integers(_SEED_BOUND))
    return blobs


def make_loader(config: Config, roidb: list[dict], num_classes: int, has_rpn: bool, rank: int = 0,
                world_size: int = 1) -> RoIDataLoader:
    """RoIDataLoader over `roidb`: RPN batches (1 image) or Fast R-CNN batches (2 images, TRAIN.BATCH_SIZE RoIs),
    PIPELINE.ITER_SIZE of them per solver step; under torchrun rank `rank`'s shard of each global batch."""
    common = blob_settings(config, num_classes)
    if has_rpn:
        blob_fn = functools.partial(_rpn_blobs, **common)
    else:
        blob_fn = functools.partial(get_minibatch, has_rpn=False, **frcn_sampling_settings(config), **common)
    ims = RPN_IMS_PER_BATCH if has_rpn else FRCN_IMS_PER_BATCH
    return RoIDataLoader(roidb, blob_fn, ims_per_batch=ims, rank=rank, world_size=world_size,
                         **loader_settings(config))


LossFn = Callable[[torch.nn.Module, Mapping[str, Any]], dict]


def rpn_loss_fn(config: Config) -> LossFn:
    """loss_fn(model, blobs) -> {'rpn_cls', 'rpn_bbox'} with the TRAIN.RPN_* anchor-target settings."""
    settings = anchor_target_settings(config)

    def loss_fn(model: torch.nn.Module, blobs: Mapping[str, Any]) -> dict:
        generator = torch.Generator().manual_seed(blobs["anchor_seed"])
        return model.rpn_losses(blobs, generator=generator, **settings)

    return loss_fn


def frcn_loss_fn() -> LossFn:
    """loss_fn(model, blobs) -> {'cls', 'bbox'} on a Fast R-CNN batch."""

    def loss_fn(model: torch.nn.Module, blobs: Mapping[str, Any]) -> dict:
        return model.frcn_losses(blobs)

    return loss_fn


def _caffe_multipliers(groups: list[dict]) -> list[dict]:
    """nets.param_groups' groups (absolute lr / weight_decay, plus lr_mult) as train_loop's multipliers:
    weights lr_mult 1, decay_mult 1; biases lr_mult 2, decay_mult 0 (py-faster-rcnn's prototxts)."""
    return [{"params": g["params"], "lr_mult": g["lr_mult"], "decay_mult": 0.0 if g["weight_decay"] == 0 else 1.0}
            for g in groups]


def _train(ctx: StepContext, model: FasterRCNN, loss_fn: LossFn, loader: RoIDataLoader, classes: tuple[str, ...],
           **extra: Any) -> StepResult:
    """set_trainable for this stage, then train_loop with Caffe's lr/decay multipliers; model.pt as a checkpoint."""
    solver = ctx.solver
    set_trainable(model, ctx.step.id)
    groups = _caffe_multipliers(param_groups(model, solver.lr, solver.weight_decay))
    ctx.log(f"{len(loader.roidb)} roidb entries, {solver.iters} iterations, lr {solver.lr:g} "
            f"(x{solver.gamma:g} every {solver.stepsize}), snapshot every {solver.snapshot_iters}, "
            f"{loader.ims_per_batch * loader.iter_size * loader.world_size} images per iteration "
            f"({loader.world_size} process(es) x ITER_SIZE {loader.iter_size} x {loader.ims_per_batch})")
    try:
        result = ctx.train(model, loss_fn, loader, param_groups=groups,
                           checkpoint_fn=lambda m: checkpoint_dict(m, classes, stage=ctx.step.id, **extra))
    finally:
        loader.close()
    metrics = _train_metrics(ctx.step_dir, result.seconds) if ctx.dist.is_main else {}
    if metrics:
        metrics["images_per_iter"] = loader.ims_per_batch * loader.iter_size * loader.world_size
    return StepResult(outputs=["model.pt"], metrics=metrics)


def _train_metrics(step_dir: Path, seconds: float) -> dict[str, float]:
    """Mean total loss and per-term losses over the last 20 logged iterations, and the speed of this run."""
    records = read_log(step_dir / LOG_NAME)[-20:]
    metrics: dict[str, float] = {}
    if records:
        metrics["loss"] = round(float(np.mean([r["loss"] for r in records])), 6)
        for key in records[-1]["losses"]:
            metrics[key] = round(float(np.mean([r["losses"][key] for r in records])), 6)
        metrics["iters"] = int(records[-1]["iter"])
    metrics["train_seconds"] = round(float(seconds), 3)
    return metrics


def _training_imdb(ctx: StepContext) -> Imdb:
    imdb = load_imdb(ctx.config, "PIPELINE.TRAIN_IMDB")
    if imdb.num_images == 0:
        raise StepFailedError(f"{ctx.step.id}: training imdb {imdb.name} has no images")
    return imdb


def _loader(ctx: StepContext, roidb: list[dict], num_classes: int, has_rpn: bool) -> RoIDataLoader:
    """This rank's loader (rank 0 of 1 without torchrun)."""
    return make_loader(ctx.config, roidb, num_classes, has_rpn, rank=ctx.dist.rank, world_size=ctx.dist.world_size)


def stage1(ctx: StepContext) -> StepResult:
    """Train the RPN (M1) from M0 on the flipped gt roidb."""
    imdb = _training_imdb(ctx)
    model = build_model(ctx.config, imdb.num_classes, ctx.weights, echo=ctx.log).to(ctx.device)
    loader = _loader(ctx, rpn_roidb_for_training(ctx.config, imdb), imdb.num_classes, has_rpn=True)
    return _train(ctx, model, rpn_loss_fn(ctx.config), loader, imdb.classes)


def stage2(ctx: StepContext) -> StepResult:
    """Train Fast R-CNN (M2) from M0 (not M1) on GT + P1."""
    imdb = _training_imdb(ctx)
    roidb, means, stds = frcn_roidb_for_training(ctx.config, imdb, ctx.input_file("p1", "proposals.pkl"))
    model = build_model(ctx.config, imdb.num_classes, ctx.weights, echo=ctx.log)
    model.set_bbox_normalization(means, stds)
    loader = _loader(ctx, roidb, imdb.num_classes, has_rpn=False)
    return _train(ctx, model.to(ctx.device), frcn_loss_fn(), loader, imdb.classes)


def stage3(ctx: StepContext) -> StepResult:
    """Fine-tune the RPN (M3) from M2 with the shared convs frozen; M2's RPN head never trained, so it is reset."""
    imdb = _training_imdb(ctx)
    model = load_stage_model(ctx.config, ctx.input_file("stage2", "model.pt"), imdb.classes, torch.device("cpu"))
    reinit_rpn_head(model, torch_generator(ctx.config))
    loader = _loader(ctx, rpn_roidb_for_training(ctx.config, imdb), imdb.num_classes, has_rpn=True)
    return _train(ctx, model.to(ctx.device), rpn_loss_fn(ctx.config), loader, imdb.classes)


def stage4(ctx: StepContext) -> StepResult:
    """Fine-tune Fast R-CNN (M4) from M3 on GT + P2 with the shared convs frozen; cls_score and bbox_pred reset.

    M4 is the final detector: the shared convs (M2's), M3's RPN head and this step's detector head.
    """
    imdb = _training_imdb(ctx)
    roidb, means, stds = frcn_roidb_for_training(ctx.config, imdb, ctx.input_file("p2", "proposals.pkl"))
    model = load_stage_model(ctx.config, ctx.input_file("stage3", "model.pt"), imdb.classes, torch.device("cpu"))
    reinit_predictors(model, torch_generator(ctx.config))
    model.set_bbox_normalization(means, stds)
    loader = _loader(ctx, roidb, imdb.num_classes, has_rpn=False)
    return _train(ctx, model.to(ctx.device), frcn_loss_fn(), loader, imdb.classes)
