"""ResNet-50/101 in the C4 layout (tf-faster-rcnn, detectron2): conv1..res4 body, res5 box head, frozen BatchNorm.

Body: conv1 7x7/2 (64), bn1, relu, maxpool 3x3/2, res2 (stride 1), res3 (/2), res4 (/2): stride 16, 1024 channels,
ceil(H/16) x ceil(W/16) features. Box head: RoI align to 14x14 on res4, res5 (first block stride 2) -> 7x7 x 2048,
global average pool -> (R, 2048). Bottlenecks as torchvision's (stride on the 3x3 conv, "v1.5"); every BatchNorm is
a :class:`FrozenBatchNorm2d` (statistics and affine are buffers, never trained). conv1 and res2 are always frozen
(tf-faster-rcnn's ``RESNET.FIXED_BLOCKS`` 1); res3/res4 are the shared body that alt-opt trains in stage1/2, res5
is the "fc6/fc7" of the design table. Module names follow torchvision's below the stage (``res4.5.conv2``,
``res2.0.downsample.0``), so a torchvision state dict maps by renaming ``layerN`` to ``res{N+1}``.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from nets.backbones import RESNETS, Backbone, WeightsError, _fold_torchvision_input

__all__ = ["FrozenBatchNorm2d", "Bottleneck", "ResNetBackbone", "resnet", "load_resnet_weights",
           "STAGE_OF_LAYER"]

# torchvision's stage names -> ours (layer4 is the box head's res5).
STAGE_OF_LAYER = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine (all buffers): y = (x - mean) / sqrt(var + eps) * weight + bias.

    Buffer names are torchvision's BatchNorm2d's, so its state dicts load; ``num_batches_tracked`` is not kept.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype)[None, :, None, None] + shift.to(x.dtype)[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 (width), 3x3 (width, ``stride``), 1x1 (4 width), each with a frozen BN;
    a 1x1 projection (``downsample``) on the shortcut when the shape changes; relu after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 1, bias=False), FrozenBatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), FrozenBatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                            FrozenBatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_channels, width, stride)]
    layers += [Bottleneck(width * Bottleneck.expansion, width) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetBackbone(Backbone):
    """A C4 ResNet as a :class:`nets.backbones.Backbone`: ``body`` conv1..res4 (1024 channels, stride 16),
    ``box_head`` res5 + global average pool + flatten on 14x14 RoI features (fc_dim 2048), RPN conv 512 wide
    (tf-faster-rcnn's RPN_CHANNELS), RoI align by default."""

    pooling = "roi_align"

    def __init__(self, name: str, blocks: Sequence[int]):
        nn.Module.__init__(self)
        self.name, self.blocks = name, tuple(blocks)
        body: "OrderedDict[str, nn.Module]" = OrderedDict()
        body["conv1"] = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        body["bn1"], body["relu"] = FrozenBatchNorm2d(64), nn.ReLU(inplace=True)
        body["maxpool"] = nn.MaxPool2d(3, stride=2, padding=1)
        body["res2"] = _stage(64, 64, blocks[0], 1)
        body["res3"] = _stage(256, 128, blocks[1], 2)
        body["res4"] = _stage(512, 256, blocks[2], 2)
        self.body = nn.Sequential(body)
        self.box_head = nn.Sequential(OrderedDict(
            [("res5", _stage(1024, 512, blocks[3], 2)), ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1))]))
        self.out_channels, self.rpn_channels = 1024, 512
        self.pool_size, self.fc_dim = 14, 2048
        self.always_frozen = ("conv1", "res2")

    def reset_norms(self) -> None:
        """Random-init norms: every frozen BN the identity, except each block's last (bn3) at 1/sqrt(#blocks), so
        the sum of residual branches keeps the features O(1) through the 16 or 33 blocks."""
        gamma = 1.0 / math.sqrt(sum(self.blocks))
        for name, m in self.named_modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.fill_(gamma if name.endswith("bn3") else 1.0)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0 - m.eps)


def resnet(name: str) -> ResNetBackbone:
    """'resnet50' (blocks 3, 4, 6, 3) or 'resnet101' (3, 4, 23, 3), randomly initialised by PyTorch's defaults."""
    return ResNetBackbone(name, RESNETS[name])


def _torchvision_key(key: str) -> str:
    """Our body/box-head state key -> torchvision's (``res4.5.conv2.weight`` -> ``layer3.5.conv2.weight``)."""
    stage, _, rest = key.partition(".")
    layer = {v: k for k, v in STAGE_OF_LAYER.items()}.get(stage)
    return f"{layer}.{rest}" if layer else key


def load_resnet_weights(backbone: ResNetBackbone, state: dict, path: Path,
                        pixel_means: Sequence[float]) -> str:
    """Copy a torchvision ResNet state dict (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight`` ... ``fc.*``)
    into ``backbone``: layer1..3 -> res2..res4 of the body, layer4 -> res5 of the box head; ``fc`` and
    ``num_batches_tracked`` are ignored.

    torchvision's input normalisation (RGB, (x/255 - mean)/std) is folded into conv1, so the net takes BGR 0-255
    minus ``pixel_means``: the channel flip and 1/(255 std) go into conv1's weight, the mean offset (conv1 has no
    bias) into bn1's running mean. Exact except where conv1's 7x7 window overlaps the zero padding.

    Returns 'torchvision'. Raises WeightsError naming the file and the layer: a missing or extra key (e.g. a
    resnet50 file for resnet101), a shape that differs, or a file that is not a ResNet state dict at all.
    """
    if "layer1.0.conv1.weight" not in state or "conv1.weight" not in state:
        raise WeightsError(f"{path}: not a torchvision ResNet state dict (no 'conv1.weight' / 'layer1.0.conv1.weight')"
                           f" for {backbone.name}")
    targets = {f"body.{k}": v for k, v in backbone.body.state_dict(keep_vars=True).items()}
    targets.update({f"box_head.{k}": v for k, v in backbone.box_head.state_dict(keep_vars=True).items()})
    wanted = {_torchvision_key(k.partition(".")[2]): k for k in targets}
    for key in state:
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key not in wanted:
            stage = re.match(r"layer(\d)\.", key)
            where = f" (more {STAGE_OF_LAYER[stage.group(0)[:-1]]} blocks than {backbone.name} has)" if stage else ""
            raise WeightsError(f"{path}: unexpected layer '{key}' for {backbone.name}{where}")
    for src, dst in wanted.items():
        if src not in state:
            raise WeightsError(f"{path}: no '{src}' for {backbone.name}'s {dst}")
        if state[src].shape != targets[dst].shape:
            raise WeightsError(f"{path}: '{src}' has shape {list(state[src].shape)}, {backbone.name}'s {dst} needs "
                               f"{list(targets[dst].shape)}")
    with torch.no_grad():
        for src, dst in wanted.items():
            targets[dst].copy_(state[src])
        conv1, bn1 = backbone.body.conv1, backbone.body.bn1
        w, offset = _fold_torchvision_input(state["conv1.weight"], torch.zeros(conv1.out_channels), pixel_means)
        conv1.weight.copy_(w)
        bn1.running_mean.sub_(offset.to(bn1.running_mean.dtype))
    return "torchvision"
