"""The one place where config keys become the explicit keyword arguments of `roidb` and `nets`: every step body
builds its imdb, its model (M0 or a stage's checkpoint), its seeded generators and its layer settings here.

PIPELINE.TRAIN_IMDB / TEST_IMDB / CLASSES / DATA_ROOT select the imdb, PIPELINE.NET / ANCHOR_SCALES /
ANCHOR_RATIOS / RNG_SEED build the model, PIXEL_MEANS centres the image blobs (BGR).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nets import FasterRCNN, load_weights_into
from . import write_guard  # noqa: F401  (roidb's writes stay inside the roots)
from roidb.factory import get_imdb
from roidb.imdb import Imdb

from .engine.config import Config, data_root
from .engine.errors import ConfigError

__all__ = ["pixel_means", "load_imdb", "build_model", "load_stage_model", "torch_generator",
           "anchor_target_settings", "blob_settings", "frcn_sampling_settings", "filter_settings",
           "bbox_target_settings", "loader_settings", "test_image_settings", "proposal_dump_settings",
           "test_rpn_settings", "postprocess_settings", "train_proposal_settings", "proposal_target_settings"]


def pixel_means(config: Config) -> np.ndarray:
    """PIXEL_MEANS as float32 (1, 1, 3), BGR (py-faster-rcnn's [[[102.98, 115.95, 122.77]]])."""
    means = np.asarray(config.get("PIXEL_MEANS"), dtype=np.float32)
    if means.size != 3:
        raise ConfigError(f"config key PIXEL_MEANS needs 3 values (B, G, R), got {means.size}")
    return means.reshape(1, 1, 3)


def load_imdb(config: Config, key: str = "PIPELINE.TRAIN_IMDB") -> Imdb:
    """The imdb named by config key `key`, from PIPELINE.DATA_ROOT (the shapes demo is generated on first use).

    PIPELINE.CLASSES (when not empty) is the class list of a ``vocfmt:<path>:<split>`` imdb.
    """
    classes = list(config.get("PIPELINE.CLASSES")) or None
    return get_imdb(config.get(key), data_root=data_root(config), classes=classes)


def _model_settings(config: Config) -> dict:
    return {"anchor_scales": tuple(config.get("PIPELINE.ANCHOR_SCALES")),
            "anchor_ratios": tuple(config.get("PIPELINE.ANCHOR_RATIOS")),
            "seed": int(config.get("RNG_SEED")),
            "pixel_means": tuple(float(v) for v in pixel_means(config).ravel())}


def build_model(config: Config, num_classes: int, weights: Path | None = None,
                echo: Callable[[str], None] | None = None) -> FasterRCNN:
    """M0: PIPELINE.NET with ImageNet `weights` (a file) or, when None, a random init seeded with RNG_SEED.

    The same config always gives the same M0, so stage2 starting "from M0 again" gets stage1's initial weights.
    """
    if weights is None and echo is not None:
        echo(f"warning: PIPELINE.WEIGHTS is empty, so M0 is a seeded random init of {config.get('PIPELINE.NET')} "
             f"(RNG_SEED {config.get('RNG_SEED')}), not ImageNet weights")
    return FasterRCNN(config.get("PIPELINE.NET"), num_classes, weights=None if weights is None else str(weights),
                      warn_random_init=False, **_model_settings(config))


def load_stage_model(config: Config, path: Path, classes: Sequence[str], device: torch.device) -> FasterRCNN:
    """The model of an upstream step's ``model.pt`` (M1, M2, M3 or M4), checked against this config's net,
    classes and anchors, on `device`."""
    model = FasterRCNN(config.get("PIPELINE.NET"), len(classes), warn_random_init=False, **_model_settings(config))
    load_weights_into(model, path, classes)
    return model.to(device)


def torch_generator(config: Config) -> torch.Generator:
    """A CPU torch generator seeded with RNG_SEED (head re-initialisation)."""
    return torch.Generator().manual_seed(int(config.get("RNG_SEED")))


# ---------------------------------------------------------------------------------------------------------------
# Config -> the keyword arguments of roidb and nets (detectron2's `from_config`): every step body gets its
# settings here, so the config keys a step depends on are read in one place.

def anchor_target_settings(config: Config) -> dict[str, Any]:
    """The RPN anchor-target layer's TRAIN.RPN_* keywords (FasterRCNN.rpn_losses)."""
    t = config.TRAIN
    return {"rpn_positive_overlap": t.RPN_POSITIVE_OVERLAP, "rpn_negative_overlap": t.RPN_NEGATIVE_OVERLAP,
            "rpn_clobber_positives": t.RPN_CLOBBER_POSITIVES, "rpn_fg_fraction": t.RPN_FG_FRACTION,
            "rpn_batchsize": t.RPN_BATCHSIZE, "rpn_bbox_inside_weights": tuple(t.RPN_BBOX_INSIDE_WEIGHTS),
            "rpn_positive_weight": t.RPN_POSITIVE_WEIGHT}


def blob_settings(config: Config, num_classes: int) -> dict[str, Any]:
    """What every training minibatch needs (roidb.minibatch.get_minibatch): scales, MAX_SIZE, PIXEL_MEANS."""
    t = config.TRAIN
    return {"num_classes": num_classes, "scales": list(t.SCALES), "max_size": t.MAX_SIZE,
            "pixel_means": pixel_means(config)}


def frcn_sampling_settings(config: Config) -> dict[str, Any]:
    """The Fast R-CNN RoI sampler's keywords (roidb.minibatch.get_minibatch with has_rpn=False)."""
    t = config.TRAIN
    return {"batch_size": t.BATCH_SIZE, "fg_fraction": t.FG_FRACTION, "fg_thresh": t.FG_THRESH,
            "bg_thresh_hi": t.BG_THRESH_HI, "bg_thresh_lo": t.BG_THRESH_LO, "bbox_reg": True,
            "bbox_inside_weights": tuple(t.BBOX_INSIDE_WEIGHTS)}


def filter_settings(config: Config) -> dict[str, Any]:
    """roidb.training.filter_roidb's thresholds."""
    t = config.TRAIN
    return {"fg_thresh": t.FG_THRESH, "bg_thresh_hi": t.BG_THRESH_HI, "bg_thresh_lo": t.BG_THRESH_LO}


def bbox_target_settings(config: Config) -> dict[str, Any]:
    """roidb.training.add_bbox_regression_targets' keywords."""
    t = config.TRAIN
    return {"bbox_thresh": t.BBOX_THRESH, "normalize_targets": t.BBOX_NORMALIZE_TARGETS,
            "precomputed": t.BBOX_NORMALIZE_TARGETS_PRECOMPUTED, "means": t.BBOX_NORMALIZE_MEANS,
            "stds": t.BBOX_NORMALIZE_STDS}


def loader_settings(config: Config) -> dict[str, Any]:
    """roidb.loader.RoIDataLoader's keywords besides the roidb, the batch function and the batch size."""
    workers = int(config.get("PIPELINE.WORKERS"))
    return {"aspect_grouping": config.TRAIN.ASPECT_GROUPING, "seed": int(config.get("RNG_SEED")),
            "num_workers": workers, "prefetch": max(2, 2 * workers),
            "iter_size": int(config.get("PIPELINE.ITER_SIZE"))}


def test_image_settings(config: Config) -> dict[str, Any]:
    """One test scale: `scale`, `max_size` and `pixel_means` for nets.prep_image (TEST.SCALES must hold one)."""
    t = config.TEST
    if len(t.SCALES) != 1:
        raise ConfigError(f"config key TEST.SCALES must hold exactly one scale, got {list(t.SCALES)}")
    return {"scale": t.SCALES[0], "max_size": t.MAX_SIZE,
            "pixel_means": tuple(float(v) for v in pixel_means(config).ravel())}


def proposal_dump_settings(config: Config) -> dict[str, Any]:
    """py-faster-rcnn's rpn_generate overrides for the proposal dumps: no pre-NMS cap, 2000 kept, with TEST's
    RPN_NMS_THRESH and RPN_MIN_SIZE (FasterRCNN.propose keywords)."""
    t = config.TEST
    return {"pre_nms_top_n": -1, "post_nms_top_n": 2000, "nms_thresh": t.RPN_NMS_THRESH, "min_size": t.RPN_MIN_SIZE}


def test_rpn_settings(config: Config) -> dict[str, Any]:
    """The RPN at test time (im_detect): TEST.RPN_PRE_NMS_TOP_N, RPN_POST_NMS_TOP_N, RPN_NMS_THRESH, RPN_MIN_SIZE."""
    t = config.TEST
    return {"pre_nms_top_n": t.RPN_PRE_NMS_TOP_N, "post_nms_top_n": t.RPN_POST_NMS_TOP_N,
            "nms_thresh": t.RPN_NMS_THRESH, "min_size": t.RPN_MIN_SIZE}


def postprocess_settings(config: Config) -> dict[str, Any]:
    """test_net's filtering (nets.postprocess_detections): PIPELINE.DET_THRESH, TEST.NMS, PIPELINE.MAX_PER_IMAGE."""
    return {"thresh": config.get("PIPELINE.DET_THRESH"), "nms_thresh": config.get("TEST.NMS"),
            "max_per_image": config.get("PIPELINE.MAX_PER_IMAGE")}


def train_proposal_settings(config: Config) -> dict[str, Any]:
    """The proposal layer inside the end2end training net (py-faster-rcnn's cfg.TRAIN.RPN_*: 12000 -> NMS 0.7 ->
    2000, min size 16): FasterRCNN.e2e_losses' ``proposal_settings``."""
    t = config.TRAIN
    return {"pre_nms_top_n": t.RPN_PRE_NMS_TOP_N, "post_nms_top_n": t.RPN_POST_NMS_TOP_N,
            "nms_thresh": t.RPN_NMS_THRESH, "min_size": t.RPN_MIN_SIZE}


def bbox_normalization(config: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(means, stds) (4,) the end2end targets are normalised with: TRAIN.BBOX_NORMALIZE_MEANS/STDS when
    TRAIN.BBOX_NORMALIZE_TARGETS (always the precomputed ones: py-faster-rcnn asserts PRECOMPUTED with HAS_RPN,
    as there are no proposals to compute statistics from beforehand), else 0 and 1."""
    t = config.TRAIN
    if not t.BBOX_NORMALIZE_TARGETS:
        return (0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0)
    means, stds = tuple(float(v) for v in t.BBOX_NORMALIZE_MEANS), tuple(float(v) for v in t.BBOX_NORMALIZE_STDS)
    if len(means) != 4 or len(stds) != 4 or min(stds) <= 0:
        raise ConfigError(f"config keys TRAIN.BBOX_NORMALIZE_MEANS/STDS need 4 values each (stds > 0), got "
                          f"{list(means)} and {list(stds)}")
    return means, stds


def proposal_target_settings(config: Config) -> dict[str, Any]:
    """nets.proposal_target_layer's keywords (end2end): TRAIN.BATCH_SIZE RoIs from one image, FG_FRACTION,
    FG_THRESH / BG_THRESH_HI / BG_THRESH_LO, the target normalisation and TRAIN.BBOX_INSIDE_WEIGHTS."""
    t = config.TRAIN
    means, stds = bbox_normalization(config)
    return {"batch_size": t.BATCH_SIZE, "ims_per_batch": 1, "fg_fraction": t.FG_FRACTION, "fg_thresh": t.FG_THRESH,
            "bg_thresh_hi": t.BG_THRESH_HI, "bg_thresh_lo": t.BG_THRESH_LO, "bbox_normalize_means": means,
            "bbox_normalize_stds": stds, "bbox_inside_weights": tuple(t.BBOX_INSIDE_WEIGHTS)}
