"""Per-stage training surface: which parameters each alt-opt stage trains, optimiser groups, head re-inits.

| stage  | kind | trains (everything else frozen)                                        |
|--------|------|------------------------------------------------------------------------|
| stage1 | rpn  | body convs except the net's ``always_frozen`` ones + RPN head          |
| stage2 | frcn | body convs except ``always_frozen`` + fc6, fc7, cls_score, bbox_pred    |
| stage3 | rpn  | RPN head only                                                          |
| stage4 | frcn | fc6, fc7, cls_score, bbox_pred                                         |
| e2e    | both | body convs except ``always_frozen`` + RPN head + fc6..bbox_pred (end2end mode) |

``always_frozen``: vgg16 conv1_1..conv2_2 (as py-faster-rcnn); zf none (stages 1-2 train every conv); tiny conv1;
resnet50/101 conv1 and res2 (their body units are conv1, res2, res3, res4; res5 is the box head, "fc6/fc7" above,
and every BatchNorm is frozen, a buffer).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["STAGES", "STAGE_KINDS", "set_trainable", "trainable_groups", "param_groups", "reinit_rpn_head",
           "reinit_predictors"]

STAGE_KINDS = {"stage1": "rpn", "stage2": "frcn", "stage3": "rpn", "stage4": "frcn", "e2e": "both"}
STAGES = tuple(STAGE_KINDS)


def trainable_groups(model: nn.Module, stage: str) -> tuple[list[str], bool, bool]:
    """(trained conv layer names, trains the RPN head, trains the Fast R-CNN head) for ``stage``."""
    if stage not in STAGE_KINDS:
        raise ValueError(f"unknown stage '{stage}' (known: {', '.join(STAGES)})")
    shared = stage in ("stage1", "stage2", "e2e")
    convs = [n for n in model.conv_names if n not in model.always_frozen] if shared else []
    kind = STAGE_KINDS[stage]
    return convs, kind in ("rpn", "both"), kind in ("frcn", "both")


def set_trainable(model: nn.Module, stage: str) -> list[str]:
    """Freeze ``model`` (a :class:`nets.FasterRCNN`) for ``stage`` and put it in training mode.

    Trained parameters get ``requires_grad=True``, all others False. Dropout (fc6/fc7) runs in train mode only when
    the Fast R-CNN head is trained; otherwise the head is in eval mode. Returns the trained parameter names.
    """
    convs, rpn, frcn = trainable_groups(model, stage)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = [getattr(model.body, n) for n in convs]
    if rpn:
        modules.append(model.rpn)
    if frcn:
        modules.append(model.roi_head)
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
    model.train()
    if not frcn:
        model.roi_head.eval()
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """SGD parameter groups with Caffe's multipliers for the trainable parameters only.

    Weights: lr, ``weight_decay``; biases: 2 * lr, no weight decay (lr_mult 2, decay_mult 0). Frozen parameters
    are left out, so they take neither a step nor decay. Each group also carries Caffe's ``lr_mult`` and
    ``decay_mult`` (for optimiser builders and schedulers that scale a base lr / decay).
    """
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0, "decay_mult": 1.0},
              {"params": biases, "lr": 2.0 * lr, "weight_decay": 0.0, "lr_mult": 2.0, "decay_mult": 0.0}]
    return [g for g in groups if g["params"]]


def reinit_rpn_head(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh RPN head (N(0, 0.01) weights, zero biases): stage3 starts from M2, whose RPN head never trained."""
    model.rpn.reset_parameters(generator)


def reinit_predictors(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh cls_score (N(0, 0.01)) and bbox_pred (N(0, 0.001)): stage4 starts from M3 with these re-initialised."""
    model.roi_head.reset_predictors(generator)
