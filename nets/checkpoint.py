"""Model checkpoints: a plain dict of tensors and Python values that loads with ``torch.load(weights_only=True)``.

Keys: ``state_dict`` (body, RPN head, Fast R-CNN head, ``bbox_means``/``bbox_stds`` buffers), ``bbox_means`` and
``bbox_stds`` (4K,) again for readers that only want them, ``net``, ``num_classes``, ``classes``, ``anchor_scales``,
``anchor_ratios``, ``pooling``, ``format`` and any caller extras (iteration, stage, ...).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Sequence

import torch

from nets.detector import FasterRCNN

__all__ = ["CheckpointError", "checkpoint_dict", "save_checkpoint", "read_checkpoint", "load_checkpoint",
           "load_weights_into"]

FORMAT = "frcnn-altopt-model-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit (the message names the file and the mismatch)."""


def checkpoint_dict(model: FasterRCNN, classes: Sequence[str], **extra) -> dict:
    """The checkpoint dict of ``model`` (tensors cloned to the CPU) with ``classes`` and ``extra`` metadata."""
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} classes")
    return {"format": FORMAT, "net": model.net, "num_classes": model.num_classes, "classes": list(classes),
            "anchor_scales": list(model.anchor_scales), "anchor_ratios": list(model.anchor_ratios),
            "pooling": model.roi_head.pooling,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "bbox_means": model.bbox_means.detach().cpu().clone(), "bbox_stds": model.bbox_stds.detach().cpu().clone(),
            **extra}


def save_checkpoint(path: str | Path, model: FasterRCNN, classes: Sequence[str], **extra) -> Path:
    """Write :func:`checkpoint_dict` to ``path`` via a temporary name and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(checkpoint_dict(model, classes, **extra), tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint dict safely (``weights_only=True``); CheckpointError on a bad or foreign file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a model checkpoint (format {FORMAT} expected)")
    return ckpt


def _check_fits(path: Path, ckpt: dict, net: str | None, classes: Sequence[str] | None) -> None:
    if net is not None and ckpt["net"] != net:
        raise CheckpointError(f"{path}: checkpoint is for net '{ckpt['net']}', expected '{net}'")
    if classes is not None and list(ckpt["classes"]) != list(classes):
        raise CheckpointError(f"{path}: checkpoint classes {ckpt['classes']} differ from expected {list(classes)}")


def load_checkpoint(path: str | Path, *, net: str | None = None, classes: Sequence[str] | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[FasterRCNN, dict]:
    """Rebuild the model stored in ``path``; ``net`` / ``classes``, when given, must match the checkpoint's.

    Returns (model, checkpoint dict). Raises CheckpointError naming the file and the mismatch.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    _check_fits(path, ckpt, net, classes)
    model = FasterRCNN(ckpt["net"], int(ckpt["num_classes"]), anchor_scales=ckpt["anchor_scales"],
                       anchor_ratios=ckpt["anchor_ratios"], pooling=ckpt["pooling"], warn_random_init=False)
    _load_state(path, model, ckpt)
    return model.to(map_location), ckpt


def load_weights_into(model: FasterRCNN, path: str | Path, classes: Sequence[str]) -> dict:
    """Copy a checkpoint's weights into an existing ``model`` (stage init: M0 -> M2, M2 -> M3, M3 -> M4).

    The checkpoint must be for the same net, classes and anchors. Returns the checkpoint dict.
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    _check_fits(path, ckpt, model.net, classes)
    anchors = (list(model.anchor_scales), list(model.anchor_ratios))
    if (list(ckpt["anchor_scales"]), list(ckpt["anchor_ratios"])) != anchors:
        raise CheckpointError(f"{path}: checkpoint anchors scales={ckpt['anchor_scales']} "
                              f"ratios={ckpt['anchor_ratios']} differ from the model's {anchors[0]} {anchors[1]}")
    _load_state(path, model, ckpt)
    return ckpt


def _load_state(path: Path, model: FasterRCNN, ckpt: dict) -> None:
    state = ckpt["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: state_dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{path}: '{k}' has shape {list(v.shape)}, the model needs {list(own[k].shape)}")
    model.load_state_dict(state)
