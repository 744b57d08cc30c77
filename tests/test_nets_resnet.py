"""ResNet-50/101 (C4): layout, frozen BatchNorm, torchvision weights against a hand-written torchvision forward."""
import numpy as np
import pytest
import torch

from nets import FasterRCNN, WeightsError, build_backbone, load_backbone_weights
from nets.backbones import TORCHVISION_MEAN, init_backbone
from nets.freezing import set_trainable
from nets.resnet import FrozenBatchNorm2d
from weights_helpers import (RESNET_BLOCKS, reference_resnet_res4, reference_vgg16_conv5_3, torchvision_input,
                             torchvision_resnet_state, torchvision_vgg16_state)

PIXEL_MEANS = (102.9801, 115.9465, 122.7717)
# Pixel means (BGR) equal to torchvision's mean * 255: the folded mean offset is 0, so the zero padding means the
# same on both sides and the features agree everywhere, not only away from the padding band.
TV_PIXEL_MEANS = tuple(255.0 * m for m in reversed(TORCHVISION_MEAN))

try:
    import torchvision
except ImportError:   # not a dependency: the hand-built key layout below stands in for it
    torchvision = None


def _image(h=64, w=96, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (h, w, 3)).astype(np.float32)


def _ours(b, im_bgr, pixel_means):
    x = torch.from_numpy((im_bgr - np.asarray(pixel_means, np.float32)).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        return b(x)


@pytest.mark.parametrize("net", ["resnet50", "resnet101"])
def test_c4_layout(net):
    b = build_backbone(net)
    res4_blocks = RESNET_BLOCKS[net][2]
    assert b.conv_names == ["conv1", "res2", "res3", "res4"] and b.always_frozen == ("conv1", "res2")
    assert len(b.body.res4) == res4_blocks and len(b.box_head.res5) == 3
    assert (b.out_channels, b.rpn_channels, b.pool_size, b.fc_dim, b.pooling) == (1024, 512, 14, 2048, "roi_align")
    # No trainable BatchNorm anywhere: every norm is a FrozenBatchNorm2d holding buffers only.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    assert all(not list(m.parameters()) for m in b.modules() if isinstance(m, FrozenBatchNorm2d))
    init_backbone(b, torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = b(torch.randn(1, 3, 65, 97) * 60)
        assert feats.shape == (1, 1024, 5, 7)                     # ceil(65/16), ceil(97/16): stride 16
        assert 0.05 < feats.std().item() < 20                     # random init stays O(1) through res4
        assert b.head(torch.randn(3, 1024, 14, 14)).shape == (3, 2048)   # res5 /2 -> 7x7 -> average pool


@pytest.mark.parametrize("net", ["resnet50"])   # resnet101 differs in res4's block count only (layout test)
def test_torchvision_weights_give_torchvisions_res4_features(tmp_path, net):
    state = torchvision_resnet_state(net, seed=1)
    path = tmp_path / f"{net}.pth"
    torch.save(state, path)
    im = _image()
    ref = reference_resnet_res4(state, torchvision_input(im), RESNET_BLOCKS[net][:3])
    # 1. With pixel means = 255 * torchvision's mean, the fold is exact everywhere.
    b = build_backbone(net)
    assert load_backbone_weights(b, path, TV_PIXEL_MEANS) == "torchvision"
    got = _ours(b, im, TV_PIXEL_MEANS)
    assert got.shape == ref.shape == (1, 1024, 4, 6)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # 2. py-faster-rcnn's means: equal up to the band where conv1's 7x7 window meets the zero padding.
    b = build_backbone(net)
    load_backbone_weights(b, path, PIXEL_MEANS)
    got = _ours(b, im, PIXEL_MEANS)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"{net} res4 relative difference with py-faster-rcnn's pixel means: {rel:.2e}")
    assert rel < 5e-3, rel   # measured 9.6e-4 at 64x96
    # ... and the conv1+bn1 output is exact away from conv1's padding band (2 output rows/cols on each side).
    from weights_helpers import _bn_eval
    import torch.nn.functional as F
    with torch.no_grad():
        x = torch.from_numpy((im - np.asarray(PIXEL_MEANS, np.float32)).transpose(2, 0, 1).copy())[None]
        ours1 = b.body.bn1(b.body.conv1(x))
        ref1 = _bn_eval(F.conv2d(torchvision_input(im), state["conv1.weight"], stride=2, padding=3), state, "bn1.")
    torch.testing.assert_close(ours1[..., 2:-2, 2:-2], ref1[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-3)
    # res5 (layer4) lands in the box head, fc is ignored.
    assert torch.equal(b.box_head.res5[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert torch.equal(b.box_head.res5[0].downsample[1].running_var, state["layer4.0.downsample.1.running_var"])


@pytest.mark.skipif(torchvision is None, reason="torchvision not installed")
@pytest.mark.parametrize("net", ["resnet50", "resnet101"])
def test_against_torchvisions_own_resnet(tmp_path, net):
    tv = getattr(torchvision.models, net)().eval()
    hand = torchvision_resnet_state(net)
    assert {k: tuple(v.shape) for k, v in tv.state_dict().items()} == {k: tuple(v.shape) for k, v in hand.items()}
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    b = build_backbone(net)
    load_backbone_weights(b, tmp_path / "tv.pth", TV_PIXEL_MEANS)
    im = _image()
    with torch.no_grad():
        x = torchvision_input(im)
        ref = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))))
    torch.testing.assert_close(_ours(b, im, TV_PIXEL_MEANS), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_vgg16_torchvision_layout_gives_torchvisions_conv5_3(tmp_path):
    """The VGG16 loader on a state dict in torchvision's vgg16 layout: conv5_3 features equal torchvision's own
    forward (written out by hand; torchvision's module when installed), exactly with 255*mean pixel means and up
    to the padding band with py-faster-rcnn's."""
    state = torchvision_vgg16_state(seed=2)
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    im = _image(64, 96, seed=3)
    x = torchvision_input(im)
    ref = reference_vgg16_conv5_3(state, x)
    if torchvision is not None:
        tv = torchvision.models.vgg16().eval()
        tv.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(tv.features[:30](x), ref)
    for means, tol in ((TV_PIXEL_MEANS, 1e-4), (PIXEL_MEANS, 1e-3)):   # measured 1.6e-6 and 2.0e-4
        b = build_backbone("vgg16")
        load_backbone_weights(b, tmp_path / "vgg16-397923af.pth", means)
        got = _ours(b, im, means)
        assert got.shape == ref.shape == (1, 512, 4, 6)
        rel = ((got - ref).norm() / ref.norm()).item()
        print(f"vgg16 conv5_3 relative difference, pixel means {means}: {rel:.2e}")
        assert rel < tol, (means, rel)


def test_wrong_resnet_files_name_the_layer(tmp_path):
    b = build_backbone("resnet101")
    torch.save(torchvision_resnet_state("resnet50"), tmp_path / "r50.pth")
    with pytest.raises(WeightsError, match=r"r50.pth: no 'layer3.6.conv1.weight' for resnet101's body.res4.6.conv1"):
        load_backbone_weights(b, tmp_path / "r50.pth")
    b = build_backbone("resnet50")
    torch.save(torchvision_resnet_state("resnet101"), tmp_path / "r101.pth")
    with pytest.raises(WeightsError, match=r"unexpected layer 'layer3.6.conv1.weight' for resnet50 \(more res4"):
        load_backbone_weights(b, tmp_path / "r101.pth")
    state = torchvision_resnet_state("resnet50")
    state["layer2.1.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"bad.pth: 'layer2.1.conv2.weight' has shape \[128, 128, 1, 1\], "
                                           r"resnet50's body.res3.1.conv2.weight needs \[128, 128, 3, 3\]"):
        load_backbone_weights(b, tmp_path / "bad.pth")
    torch.save(torchvision_vgg16_state(fc=False), tmp_path / "vgg.pth")
    with pytest.raises(WeightsError, match=r"vgg.pth: not a torchvision ResNet state dict"):
        load_backbone_weights(b, tmp_path / "vgg.pth")


def test_resnet_freezing_per_stage():
    """conv1, res2 and every BatchNorm never train; res3/res4 train in stage1/2; res5 is the Fast R-CNN head."""
    model = FasterRCNN("resnet50", 3, warn_random_init=False)
    trained = {s: set(set_trainable(model, s)) for s in ("stage1", "stage2", "stage3", "stage4")}
    units = lambda names: {n.split(".")[1] if n.startswith(("body.", "roi_head.")) else n.split(".")[0]
                           for n in names}
    assert units(trained["stage1"]) == {"res3", "res4", "rpn"}
    assert units(trained["stage2"]) == {"res3", "res4", "box_head", "cls_score", "bbox_pred"}
    assert units(trained["stage3"]) == {"rpn"}
    assert units(trained["stage4"]) == {"box_head", "cls_score", "bbox_pred"}
    assert not any(n.startswith(("body.conv1", "body.res2")) for s in trained.values() for n in s)
    assert not any("bn" in n or "downsample.1" in n for s in trained.values() for n in s)
