"""What every step body builds first: its imdb, its model (M0 or a stage's checkpoint), seeded generators.

Only this module turns config keys into the explicit arguments of `roidb` and `nets`:
PIPELINE.TRAIN_IMDB / TEST_IMDB / CLASSES / DATA_ROOT select the imdb, PIPELINE.NET / ANCHOR_SCALES /
ANCHOR_RATIOS / RNG_SEED build the model, PIXEL_MEANS centres the image blobs (BGR).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from nets import FasterRCNN, load_weights_into
from roidb.factory import get_imdb
from roidb.imdb import Imdb

from .engine.config import Config, data_root
from .engine.errors import ConfigError

__all__ = ["pixel_means", "load_imdb", "build_model", "load_stage_model", "torch_generator"]


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
