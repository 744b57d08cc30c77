"""Backbones (vgg16, zf, tiny; resnet50/101 in nets.resnet): a stride-16 conv body and a box head (RoI features ->
fc7 or res5 + average pool), plus weight loading.

Every backbone takes the py-faster-rcnn image blob: float32 (B, 3, H, W), BGR, 0-255 minus PIXEL_MEANS, and gives a
(B, C, ~H/16, ~W/16) feature map with Caffe's ceil-mode pooling arithmetic (vgg16 and tiny: ceil(H/16); zf at 600
gives 39, as in Caffe). Layers carry Caffe's names (conv1_1, fc6, ...)
so freezing and weight loading can address them.
"""
from __future__ import annotations

import math
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Backbone", "LRNWithinChannel", "build_backbone", "body_memory_format", "vgg16", "zf", "tiny",
           "init_backbone", "load_backbone_weights", "WeightsError", "NETS", "RESNETS", "NET_NAMES",
           "TORCHVISION_MEAN", "TORCHVISION_STD"]

# torchvision's ImageNet normalisation (RGB, 0-1 scale), folded into conv1_1 when loading its weights.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
PYFRCNN_PIXEL_MEANS = (102.9801, 115.9465, 122.7717)


class WeightsError(ValueError):
    """A pretrained-weights file that does not fit the backbone (the message names the file and the layer)."""


class LRNWithinChannel(nn.Module):
    """Caffe's LRN with ``norm_region: WITHIN_CHANNEL`` (ZF's norm1/norm2).

    out = x / (1 + alpha / n^2 * sum_{n x n window} x^2) ^ beta, the window zero-padded (Caffe pads the square).
    """

    def __init__(self, local_size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        self.local_size, self.alpha, self.beta = local_size, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = F.avg_pool2d(x * x, self.local_size, stride=1, padding=self.local_size // 2,
                               count_include_pad=True)
        return x * (1.0 + self.alpha * mean_sq).pow(-self.beta)


class Backbone(nn.Module):
    """A conv body (image -> stride-16 features) and a box head (pooled RoI features -> fc7).

    Attributes:
        name: 'vgg16', 'zf', 'tiny' or 'tiny_s8'.
        feat_stride: image pixels per feature cell (16; tiny_s8: 8).
        body: ``nn.Sequential`` of named layers; ``forward`` runs it.
        box_head: ``nn.Sequential`` flatten, fc6, relu6, [drop6], fc7, relu7, [drop7] on (R, C, P, P) input.
        out_channels: C of the feature map; rpn_channels: width of the RPN's 3x3 conv.
        pool_size: RoI pooling output P (7 for vgg16 and tiny, 6 for zf); fc_dim: width of fc7.
        always_frozen: conv layer names never trained (vgg16: conv1_x, conv2_x; tiny: conv1).
        pooling: the RoI pooling the net is built with by default ('roi_pool'; the ResNets use 'roi_align').
    """

    feat_stride = 16
    pooling = "roi_pool"

    def __init__(self, name: str, body: "OrderedDict[str, nn.Module]", out_channels: int, rpn_channels: int,
                 pool_size: int, fc_dim: int, dropout: bool, always_frozen: Sequence[str] = (), feat_stride: int = 16):
        super().__init__()
        self.name = name
        self.feat_stride = feat_stride
        self.body = nn.Sequential(body)
        self.out_channels, self.rpn_channels = out_channels, rpn_channels
        self.pool_size, self.fc_dim = pool_size, fc_dim
        self.always_frozen = tuple(always_frozen)
        head: "OrderedDict[str, nn.Module]" = OrderedDict()
        head["flatten"] = nn.Flatten(1)
        head["fc6"] = nn.Linear(out_channels * pool_size * pool_size, fc_dim)
        head["relu6"] = nn.ReLU(inplace=True)
        if dropout:
            head["drop6"] = nn.Dropout(0.5)
        head["fc7"] = nn.Linear(fc_dim, fc_dim)
        head["relu7"] = nn.ReLU(inplace=True)
        if dropout:
            head["drop7"] = nn.Dropout(0.5)
        self.box_head = nn.Sequential(head)

    @property
    def conv_names(self) -> list[str]:
        """Names of the body's layers that hold parameters, input to output: the units freezing addresses (the
        conv layers of vgg16/zf/tiny; conv1, res2, res3, res4 of a ResNet)."""
        return [n for n, m in self.body.named_children() if any(True for _ in m.parameters())]

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image blob -> (B, out_channels, ~H/16, ~W/16) contiguous features (Caffe's ceil-mode pools).

        The body runs in the memory format of :func:`body_memory_format`. Values are the same up to float rounding.
        """
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.body.parameters())
        features = self.body(data.contiguous(memory_format=body_memory_format(data.device, trains)))
        return features.contiguous()

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """(R, C, P, P) pooled RoI features -> (R, fc_dim) fc7 activations."""
        return self.box_head(pooled)


_SLOW_NHWC_BACKWARD = torch.backends.cpu.get_cpu_capability() != "AVX512"


def body_memory_format(device: torch.device, trains_body: bool) -> torch.memory_format:
    """channels_last, except NCHW when the body trains on a CPU without AVX512.

    On the CPU oneDNN's convolutions and max pooling run faster in channels_last than in NCHW (max pooling up to
    10x), but without AVX512 its NHWC backward convolutions fall back to a slow kernel (3-4x the NCHW one, which
    reorders to a blocked layout): there a training step of the tiny body is 10-16% faster in NCHW
    (bench/bench_steps.py). The choice depends only on the machine and on what trains, so a run stays bit for bit
    reproducible on one machine.
    """
    if device.type == "cpu" and trains_body and _SLOW_NHWC_BACKWARD:
        return torch.contiguous_format
    return torch.channels_last


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def _pool(k: int = 2, stride: int = 2, padding: int = 0) -> nn.MaxPool2d:
    return nn.MaxPool2d(k, stride=stride, padding=padding, ceil_mode=True)


def _vgg_body(blocks: Sequence[Sequence[int]], in_channels: int = 3) -> tuple["OrderedDict[str, nn.Module]", int]:
    """Blocks of 3x3 convs named conv{b}_{i} (or conv{b} when a block has one conv), 2x2 pools between blocks."""
    layers: "OrderedDict[str, nn.Module]" = OrderedDict()
    cin = in_channels
    for b, widths in enumerate(blocks, start=1):
        for i, cout in enumerate(widths, start=1):
            suffix = f"{b}_{i}" if len(widths) > 1 else f"{b}"
            layers[f"conv{suffix}"] = _conv(cin, cout)
            layers[f"relu{suffix}"] = nn.ReLU(inplace=True)
            cin = cout
        if b < len(blocks):
            layers[f"pool{b}"] = _pool()
    return layers, cin


def vgg16() -> Backbone:
    """VGG16 (conv1_1..conv5_3, no pool5; fc6/fc7 4096 with dropout; RoI pool 7x7; RPN conv 512)."""
    body, c = _vgg_body([[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]])
    return Backbone("vgg16", body, c, rpn_channels=512, pool_size=7, fc_dim=4096, dropout=True,
                    always_frozen=("conv1_1", "conv1_2", "conv2_1", "conv2_2"))


def zf() -> Backbone:
    """ZF as in the paper: conv1 7x7/2 96, LRN, pool, conv2 5x5/2 256, LRN, pool, conv3-5 (384/384/256).

    RoI pool 6x6, fc6/fc7 4096 with dropout, RPN conv 256.
    """
    body: "OrderedDict[str, nn.Module]" = OrderedDict()
    body["conv1"], body["relu1"] = _conv(3, 96, 7, 2), nn.ReLU(inplace=True)
    body["norm1"], body["pool1"] = LRNWithinChannel(), _pool(3, 2, 1)
    body["conv2"], body["relu2"] = _conv(96, 256, 5, 2), nn.ReLU(inplace=True)
    body["norm2"], body["pool2"] = LRNWithinChannel(), _pool(3, 2, 1)
    for name, cin, cout in (("3", 256, 384), ("4", 384, 384), ("5", 384, 256)):
        body[f"conv{name}"], body[f"relu{name}"] = _conv(cin, cout), nn.ReLU(inplace=True)
    return Backbone("zf", body, 256, rpn_channels=256, pool_size=6, fc_dim=4096, dropout=True)


def tiny(feat_stride: int = 16) -> Backbone:
    """A small VGG-style body for CPU work: conv1 3x3/2 (32), then 3x3 convs 64/128/256 each followed by a 2x2
    ceil-mode pool (stride 16, features ceil(H/16) x ceil(W/16) as with four pools).

    conv1 strides by 2 instead of running at full resolution and pooling: on the CPU a full-resolution conv on 3
    channels plus its pool cost more than the three other convs together. Box head: RoI pool 7x7, fc6/fc7 of 512
    without dropout (it trains from scratch in a few hundred steps; fc 256 gave a lower demo mAP); RPN conv 256.
    conv1 is always frozen, like VGG16's conv1/conv2: a random (or pretrained, see stages/pretrain.py) 3x3 filter
    bank on raw pixels keeps the image content, and no gradient is computed at high resolution.

    ``feat_stride=8`` (the net ``tiny_s8``) leaves out the last pool: the same layers and weights, features
    ceil(H/8) x ceil(W/8), so a 24-pixel object covers 3 x 3 cells instead of 1.5 x 1.5; its RPN conv is 128 wide,
    which keeps the RPN's cost at 4x the positions about that of the stride-16 net.
    """
    if feat_stride not in (8, 16):
        raise ValueError(f"tiny: feat_stride must be 8 or 16, got {feat_stride}")
    body: "OrderedDict[str, nn.Module]" = OrderedDict()
    body["conv1"], body["relu1"] = _conv(3, 32, stride=2), nn.ReLU(inplace=True)
    for b, cin, cout in ((2, 32, 64), (3, 64, 128), (4, 128, 256)):
        body[f"conv{b}"], body[f"relu{b}"] = _conv(cin, cout), nn.ReLU(inplace=True)
        if b < 4 or feat_stride == 16:
            body[f"pool{b}"] = _pool()
    return Backbone("tiny" if feat_stride == 16 else "tiny_s8", body, 256,
                    rpn_channels=256 if feat_stride == 16 else 128, pool_size=7, fc_dim=512, dropout=False,
                    always_frozen=("conv1",), feat_stride=feat_stride)


NETS = {"vgg16": vgg16, "zf": zf, "tiny": tiny, "tiny_s8": lambda: tiny(8)}
# ResNets in the C4 layout live in nets.resnet (imported on use: it builds on this module).
RESNETS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
NET_NAMES = tuple(sorted((*NETS, *RESNETS)))


def build_backbone(net: str) -> Backbone:
    """The backbone called ``net`` (one of :data:`NET_NAMES`), randomly initialised by PyTorch's defaults."""
    if net in RESNETS:
        from nets.resnet import resnet
        return resnet(net)
    if net not in NETS:
        raise ValueError(f"unknown net '{net}' (known: {', '.join(NET_NAMES)})")
    return NETS[net]()


# Typical std of a BGR 0-255 image minus its pixel means; the first conv divides it out at init.
INPUT_PIXEL_STD = 64.0


def init_backbone(backbone: Backbone, generator: torch.Generator) -> None:
    """Seeded random init of every conv and fc: He-normal weights (fan-in, ReLU gain), zero biases.

    The first conv's std is further divided by :data:`INPUT_PIXEL_STD`, so features come out O(1) on 0-255 input
    and the RPN/predictor inits (N(0, 0.01)) start with small logits, as with ImageNet weights. A ResNet's frozen
    BatchNorms are then set by its ``reset_norms`` (identity, residual branches scaled down).
    """
    layers = [m for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for i, m in enumerate(layers):
        fan_in = m.weight[0].numel()
        std = math.sqrt(2.0 / fan_in) / (INPUT_PIXEL_STD if i == 0 else 1.0)
        with torch.no_grad():
            m.weight.normal_(0.0, std, generator=generator)
            if m.bias is not None:
                m.bias.zero_()
    reset_norms = getattr(backbone, "reset_norms", None)
    if reset_norms is not None:
        reset_norms()


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _source_layers(state: dict, path: Path) -> tuple[list[str], list[str]]:
    """Prefixes of the conv (4-D) and fc (2-D) weights in ``state``, in layer order (natural sort of the names)."""
    convs, fcs = [], []
    for key in sorted(state, key=_natural_key):
        if not key.endswith("weight"):
            continue
        prefix = key[: -len("weight")]
        if prefix + "bias" not in state:
            raise WeightsError(f"{path}: '{key}' has no matching '{prefix}bias'")
        (convs if state[key].dim() == 4 else fcs if state[key].dim() == 2 else []).append(prefix)
    return convs, fcs


def _fold_torchvision_input(weight: torch.Tensor, bias: torch.Tensor, pixel_means: Sequence[float]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite a first conv trained on RGB (x/255 - mean)/std so it takes BGR 0-255 minus ``pixel_means``.

    The channel flip and the 1/(255 std) scale are exact; the mean offset goes into the bias, exact except where
    the 3x3 window overlaps the zero padding.
    """
    mean = torch.tensor(TORCHVISION_MEAN, dtype=torch.float64)
    std = torch.tensor(TORCHVISION_STD, dtype=torch.float64)
    pm_rgb = torch.tensor(list(pixel_means), dtype=torch.float64).flip(0)
    w = weight.double() / (255.0 * std)[None, :, None, None]
    b = bias.double() + (w * (pm_rgb - 255.0 * mean)[None, :, None, None]).sum(dim=(1, 2, 3))
    return w.flip(1).to(weight.dtype), b.to(bias.dtype)


def read_state_dict(path: Path) -> dict:
    """The state dict in ``path`` (``torch.load(weights_only=True)``; a ``{'state_dict': ...}`` wrapper is opened);
    WeightsError naming the file when it cannot be read or is not a dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"{path}: cannot load weights ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state.get("state_dict", state)


def load_backbone_weights(backbone: Backbone, path: str | Path,
                          pixel_means: Sequence[float] = PYFRCNN_PIXEL_MEANS) -> str:
    """Load ImageNet weights into the body convs and fc6/fc7, matching layers by order.

    Accepts a torchvision state dict (``features.N.weight``, ``classifier.N.weight``: RGB input normalised by
    ImageNet mean/std, folded into the first conv so the net still takes BGR 0-255 minus ``pixel_means``) or a
    Caffe-converted one (``conv1_1.weight``, ``fc6.weight``: BGR 0-255, used as is). Convs map one to one in order;
    the first two fc layers become fc6 and fc7 (fc8 is ignored).

    A ResNet takes a torchvision ResNet state dict instead (:func:`nets.resnet.load_resnet_weights`).

    Returns:
        'torchvision' or 'caffe', the format detected.
    Raises:
        WeightsError: naming the file and the layer when a count or shape does not match.
    """
    path = Path(path)
    state = read_state_dict(path)
    if backbone.name in RESNETS:
        from nets.resnet import load_resnet_weights
        return load_resnet_weights(backbone, state, path, pixel_means)
    fmt = "torchvision" if any(k.startswith("features.") for k in state) else "caffe"
    src_convs, src_fcs = _source_layers(state, path)
    dst_convs = [getattr(backbone.body, n) for n in backbone.conv_names]
    if len(src_convs) != len(dst_convs):
        raise WeightsError(f"{path}: {len(src_convs)} conv layers, {backbone.name} has {len(dst_convs)}")
    if len(src_fcs) < 2:
        raise WeightsError(f"{path}: needs at least 2 fc layers for fc6/fc7, found {len(src_fcs)}")
    pairs = list(zip(src_convs, dst_convs, backbone.conv_names))
    pairs += [(src_fcs[0], backbone.box_head.fc6, "fc6"), (src_fcs[1], backbone.box_head.fc7, "fc7")]
    with torch.no_grad():
        for i, (src, dst, name) in enumerate(pairs):
            w, b = state[src + "weight"], state[src + "bias"]
            if w.shape != dst.weight.shape or b.shape != dst.bias.shape:
                raise WeightsError(f"{path}: '{src}weight' has shape {list(w.shape)}, {name} needs "
                                   f"{list(dst.weight.shape)}")
            if i == 0 and fmt == "torchvision":
                w, b = _fold_torchvision_input(w, b, pixel_means)
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    return fmt

