"""The crop classifier that pretrains a backbone (the tiny body's ImageNet analog, see ``stages/pretrain.py``).

A crop (B, 3, S, S) runs through the body; its (B, C, ceil(S/16), ceil(S/16)) features are max-pooled to the box
head's P x P input as RoI pooling pools a box covering the whole crop, then fc6, fc7 and a ``cls_score`` layer give
(B, num_classes) logits (class 0: background). ``export_weights`` writes the body convs and fc6/fc7 under their own
names, a state dict that :func:`nets.backbones.load_backbone_weights` takes like a Caffe-converted ImageNet file.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from nets.backbones import Backbone

__all__ = ["CropClassifier"]


class CropClassifier(nn.Module):
    """`backbone`'s body and box head plus a linear classifier over `num_classes` (background first). The layers
    the backbone always freezes (``always_frozen``) keep their init here as well."""

    def __init__(self, backbone: Backbone, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.backbone = backbone
        self.cls_score = nn.Linear(backbone.fc_dim, num_classes)
        with torch.no_grad():
            self.cls_score.weight.normal_(0.0, 0.01, generator=generator)
            self.cls_score.bias.zero_()
        for name in backbone.always_frozen:  # frozen in every detection stage too (tiny: conv1, a random filter bank)
            getattr(backbone.body, name).requires_grad_(False)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) crop blob -> (B, num_classes) logits."""
        features = self.backbone(crops)
        pooled = F.adaptive_max_pool2d(features, self.backbone.pool_size)
        return self.cls_score(self.backbone.head(pooled))

    def export_weights(self) -> "OrderedDict[str, torch.Tensor]":
        """The body's conv weights and fc6/fc7, named ``<layer>.weight`` / ``<layer>.bias`` (cls_score left out)."""
        state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name in self.backbone.conv_names:
            layer = getattr(self.backbone.body, name)
            state[f"{name}.weight"], state[f"{name}.bias"] = layer.weight.detach().clone(), layer.bias.detach().clone()
        for name in ("fc6", "fc7"):
            layer = getattr(self.backbone.box_head, name)
            state[f"{name}.weight"], state[f"{name}.bias"] = layer.weight.detach().clone(), layer.bias.detach().clone()
        return state
