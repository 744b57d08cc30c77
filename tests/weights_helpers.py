"""Pretrained-weights files in their real key layouts, with seeded random values, built by hand (no torchvision).

- :func:`torchvision_resnet_state`: torchvision's ``resnet50-0676ba61.pth`` / ``resnet101-63fe2227.pth`` layout.
- :func:`torchvision_vgg16_state`: ``vgg16-397923af.pth`` (``features.{0,2,5,...,28}``, ``classifier.{0,3,6}``).
- :func:`caffe_zf_state`: a Caffe-converted ZF (``conv1`` .. ``conv5``, ``fc6``, ``fc7``, ``fc8``).
And a functional forward of torchvision's ResNet / VGG16 on torchvision's own input, the independent reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
VGG16_CONV_SLOTS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)   # torchvision's vgg16().features indices
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _he(g: torch.Generator, *shape: int, gain: float = 1.0) -> torch.Tensor:
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape, generator=g) * (gain * math.sqrt(2.0 / fan_in))


def _bn(state: dict, prefix: str, c: int, g: torch.Generator, gamma: float = 1.0) -> None:
    state[prefix + "weight"] = gamma * (0.5 + torch.rand(c, generator=g))
    state[prefix + "bias"] = 0.1 * torch.randn(c, generator=g)
    state[prefix + "running_mean"] = 0.1 * torch.randn(c, generator=g)
    state[prefix + "running_var"] = 0.5 + torch.rand(c, generator=g)
    state[prefix + "num_batches_tracked"] = torch.tensor(0)


def torchvision_resnet_state(net: str = "resnet50", seed: int = 0, num_blocks=None) -> dict:
    """torchvision's ResNet state dict keys and shapes (``conv1.weight``, ``bn1.*``, ``layerS.B.convK.weight``,
    ``layerS.B.bnK.*``, ``layerS.0.downsample.{0,1}.*``, ``fc.*``), He-normal convs and BN statistics near 1,
    each block's last BN scaled by 1/sqrt(#blocks) so the features stay O(1)."""
    blocks = num_blocks or RESNET_BLOCKS[net]
    g = torch.Generator().manual_seed(seed)
    gamma3 = 1.0 / math.sqrt(sum(blocks))
    state = {"conv1.weight": _he(g, 64, 3, 7, 7)}
    _bn(state, "bn1.", 64, g)
    cin = 64
    for s, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{s}.{b}."
            state[p + "conv1.weight"] = _he(g, width, cin, 1, 1)
            _bn(state, p + "bn1.", width, g)
            state[p + "conv2.weight"] = _he(g, width, width, 3, 3)
            _bn(state, p + "bn2.", width, g)
            state[p + "conv3.weight"] = _he(g, 4 * width, width, 1, 1)
            _bn(state, p + "bn3.", 4 * width, g, gamma3)
            if b == 0:
                state[p + "downsample.0.weight"] = _he(g, 4 * width, cin, 1, 1)
                _bn(state, p + "downsample.1.", 4 * width, g)
            cin = 4 * width
    state["fc.weight"] = 0.01 * torch.randn(1000, 2048, generator=g)
    state["fc.bias"] = torch.zeros(1000)
    return state


def torchvision_vgg16_state(seed: int = 0, fc: bool = True) -> dict:
    """torchvision's vgg16 state dict keys and shapes; the fc layers are stride-0 views (small files)."""
    g = torch.Generator().manual_seed(seed)
    state, cin = {}, 3
    for slot, cout in zip(VGG16_CONV_SLOTS, VGG16_WIDTHS):
        state[f"features.{slot}.weight"] = _he(g, cout, cin, 3, 3)
        state[f"features.{slot}.bias"] = 0.01 * torch.randn(cout, generator=g)
        cin = cout
    if fc:
        for i, (o, n) in enumerate(((4096, 25088), (4096, 4096), (1000, 4096))):
            state[f"classifier.{3 * i}.weight"] = (torch.randn(1, n, generator=g) * math.sqrt(1.0 / n)).expand(o, n)
            state[f"classifier.{3 * i}.bias"] = torch.zeros(o)
    return state


def caffe_zf_state(seed: int = 0) -> dict:
    """A Caffe-converted ZF state dict (BGR 0-255 input, used as is): conv1..conv5, fc6, fc7, fc8."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in (("conv1", (96, 3, 7, 7)), ("conv2", (256, 96, 5, 5)), ("conv3", (384, 256, 3, 3)),
                        ("conv4", (384, 384, 3, 3)), ("conv5", (256, 384, 3, 3))):
        state[f"{name}.weight"] = _he(g, *shape, gain=1.0 / 64 if name == "conv1" else 1.0)
        state[f"{name}.bias"] = torch.zeros(shape[0])
    for name, (o, n) in (("fc6", (4096, 256 * 36)), ("fc7", (4096, 4096)), ("fc8", (1000, 4096))):
        state[f"{name}.weight"] = (torch.randn(1, n, generator=g) * math.sqrt(1.0 / n)).expand(o, n)
        state[f"{name}.bias"] = torch.zeros(o)
    return state


def torchvision_input(im_bgr: np.ndarray) -> torch.Tensor:
    """torchvision's input for a BGR 0-255 (H, W, 3) image: RGB, (x/255 - mean)/std, (1, 3, H, W)."""
    rgb = im_bgr[:, :, ::-1].astype(np.float64) / 255.0
    return torch.from_numpy(((rgb - TV_MEAN) / TV_STD).astype(np.float32).transpose(2, 0, 1).copy())[None]


def _bn_eval(x: torch.Tensor, state: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, state[p + "running_mean"], state[p + "running_var"], state[p + "weight"],
                        state[p + "bias"], training=False, eps=1e-5)


def reference_resnet_res4(state: dict, x: torch.Tensor, blocks=(3, 4, 6)) -> torch.Tensor:
    """torchvision's ResNet forward up to layer3 (= res4), written out with torch.nn.functional from ``state``."""
    y = F.relu(_bn_eval(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1."))
    y = F.max_pool2d(y, 3, stride=2, padding=1)
    for s, n in enumerate(blocks, start=1):
        for b in range(n):
            p = f"layer{s}.{b}."
            stride = 2 if (b == 0 and s > 1) else 1
            out = F.relu(_bn_eval(F.conv2d(y, state[p + "conv1.weight"]), state, p + "bn1."))
            out = F.relu(_bn_eval(F.conv2d(out, state[p + "conv2.weight"], stride=stride, padding=1), state, p + "bn2."))
            out = _bn_eval(F.conv2d(out, state[p + "conv3.weight"]), state, p + "bn3.")
            short = y if b else _bn_eval(F.conv2d(y, state[p + "downsample.0.weight"], stride=stride), state,
                                         p + "downsample.1.")
            y = F.relu(out + short)
    return y


def reference_vgg16_conv5_3(state: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's vgg16().features[:30] (through relu5_3, before pool5) written out with functional ops."""
    y = x
    for i, slot in enumerate(VGG16_CONV_SLOTS):
        y = F.relu(F.conv2d(y, state[f"features.{slot}.weight"], state[f"features.{slot}.bias"], padding=1))
        if i in (1, 3, 6, 9):
            y = F.max_pool2d(y, 2, 2)
    return y
