"""Backbones: stride-16 (and tiny_s8's stride-8) shapes, ZF's LRN, and ImageNet weight loading (torchvision and Caffe layouts)."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nets import WeightsError, build_backbone, load_backbone_weights
from nets.backbones import TORCHVISION_MEAN, TORCHVISION_STD, LRNWithinChannel, init_backbone
from nets.detector import prep_image
from roidb.blob import prep_im_for_blob

PIXEL_MEANS = (102.9801, 115.9465, 122.7717)


@pytest.mark.parametrize("net,channels,expect_hw", [("tiny", 256, (4, 6)), ("tiny_s8", 256, (8, 12)),
                                                    ("zf", 256, (5, 7))])
def test_feature_shapes(net, channels, expect_hw):
    b = build_backbone(net)
    out = b(torch.randn(1, 3, 64, 96))
    # tiny: a stride-2 conv1 and three ceil-mode 2x2 pools -> ceil(64/16) x ceil(96/16); tiny_s8: two pools, /8. zf (Caffe arithmetic): 64 -> conv1 32 ->
    # pool1 ceil(31/2)+1 = 17 -> conv2 9 -> pool2 ceil(8/2)+1 = 5; 96 -> 48 -> 25 -> 13 -> 7.
    assert out.shape == (1, channels, *expect_hw)
    pooled = torch.randn(3, channels, b.pool_size, b.pool_size)
    assert b.head(pooled).shape == (3, b.fc_dim)


def test_tiny_s8_is_tiny_without_its_last_pool():
    """Same layers and parameter shapes (the same weights files load into both), stride 8, a narrower RPN conv;
    the detector takes the stride for its anchors and RoI pooling."""
    from nets import FasterRCNN
    a, b = build_backbone("tiny"), build_backbone("tiny_s8")
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    assert (a.feat_stride, b.feat_stride, a.rpn_channels, b.rpn_channels) == (16, 8, 256, 128)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(F.max_pool2d(b(x), 2, ceil_mode=True), a(x), atol=1e-6)
    model = FasterRCNN("tiny_s8", 3, anchor_scales=(1, 2), anchor_ratios=(1.0,), warn_random_init=False)
    anchors = model.anchors(8, 12)
    assert anchors.shape == (8 * 12 * 2, 4)
    assert torch.equal(anchors[2, :2] - anchors[0, :2], torch.tensor([8.0, 0.0]))  # the next cell is 8 px right
    assert model.roi_head.spatial_scale == 1.0 / 8


def test_body_memory_format_follows_the_cpu_and_what_trains(monkeypatch):
    import nets.backbones as backbones
    assert backbones._SLOW_NHWC_BACKWARD == (torch.backends.cpu.get_cpu_capability() != "AVX512")
    cpu = torch.device("cpu")
    for slow_nhwc_backward, training_format in ((True, torch.contiguous_format), (False, torch.channels_last)):
        monkeypatch.setattr(backbones, "_SLOW_NHWC_BACKWARD", slow_nhwc_backward)
        assert backbones.body_memory_format(cpu, trains_body=True) == training_format
        assert backbones.body_memory_format(cpu, trains_body=False) == torch.channels_last
        assert backbones.body_memory_format(torch.device("cuda"), trains_body=True) == torch.channels_last


def test_training_and_inference_layouts_give_the_same_features(monkeypatch):
    import nets.backbones as backbones
    monkeypatch.setattr(backbones, "_SLOW_NHWC_BACKWARD", True)
    b = build_backbone("tiny")
    init_backbone(b, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 80, 112) * 50
    trained = b(x)  # NCHW: the convs take gradients
    with torch.no_grad():
        inferred = b(x)  # channels_last
    assert trained.is_contiguous() and inferred.is_contiguous()
    torch.testing.assert_close(trained.detach(), inferred, rtol=1e-4, atol=1e-4)


def test_vgg16_layout():
    b = build_backbone("vgg16")
    blocks = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    assert b.conv_names == [f"conv{i}_{j}" for i, n in blocks for j in range(1, n + 1)]
    assert b.pool_size == 7 and b.box_head.fc6.in_features == 512 * 49 and b.rpn_channels == 512
    assert b.always_frozen == ("conv1_1", "conv1_2", "conv2_1", "conv2_2")
    assert isinstance(b.box_head.drop6, torch.nn.Dropout) and isinstance(b.box_head.drop7, torch.nn.Dropout)
    with torch.no_grad():
        assert b(torch.zeros(1, 3, 600 // 4, 1000 // 4)).shape == (1, 512, 10, 16)   # ceil(150/16), ceil(250/16)


def test_lrn_within_channel_matches_naive():
    x = torch.randn(1, 2, 5, 6) * 30
    lrn = LRNWithinChannel(3, 5e-5, 0.75)
    padded = F.pad(x * x, (1, 1, 1, 1))
    expect = torch.empty_like(x)
    for c in range(2):
        for i in range(5):
            for j in range(6):
                s = padded[0, c, i:i + 3, j:j + 3].sum()
                expect[0, c, i, j] = x[0, c, i, j] / (1 + 5e-5 / 9 * s) ** 0.75
    torch.testing.assert_close(lrn(x), expect)


def test_seeded_init_is_reproducible_and_scaled():
    a, b = build_backbone("tiny"), build_backbone("tiny")
    init_backbone(a, torch.Generator().manual_seed(3))
    init_backbone(b, torch.Generator().manual_seed(3))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    with torch.no_grad():
        feats = a(torch.randn(1, 3, 128, 128) * 64)
    assert 0.05 < feats.std().item() < 20   # O(1) features on 0-255 input


def _tiny_state(style: str, b) -> dict:
    """A state dict in torchvision (features.N / classifier.N) or Caffe (conv1 / fc6) naming for tiny's layers."""
    g = torch.Generator().manual_seed(1)
    convs = [getattr(b.body, n) for n in b.conv_names]
    fcs = [b.box_head.fc6, b.box_head.fc7, torch.nn.Linear(b.fc_dim, 10)]
    state = {}
    for i, m in enumerate(convs):
        key = f"features.{3 * i}." if style == "torchvision" else f"conv{i + 1}."
        state[key + "weight"] = torch.randn(m.weight.shape, generator=g)
        state[key + "bias"] = torch.randn(m.bias.shape, generator=g)
    for i, m in enumerate(fcs):
        key = f"classifier.{3 * i}." if style == "torchvision" else f"fc{i + 6}."
        state[key + "weight"] = torch.randn(m.weight.shape, generator=g)
        state[key + "bias"] = torch.randn(m.bias.shape, generator=g)
    return state


def test_load_caffe_style_weights_by_layer_order(tmp_path):
    b = build_backbone("tiny")
    state = _tiny_state("caffe", b)
    # Shuffle insertion order: the loader orders layers by name, not by dict order.
    shuffled = dict(reversed(list(state.items())))
    torch.save(shuffled, tmp_path / "caffe.pth")
    assert load_backbone_weights(b, tmp_path / "caffe.pth") == "caffe"
    for i, name in enumerate(b.conv_names):
        assert torch.equal(getattr(b.body, name).weight, state[f"conv{i + 1}.weight"])
    assert torch.equal(b.box_head.fc6.weight, state["fc6.weight"])
    assert torch.equal(b.box_head.fc7.bias, state["fc7.bias"])


def test_load_torchvision_weights_folds_rgb_normalisation(tmp_path):
    b = build_backbone("tiny")
    state = _tiny_state("torchvision", b)
    torch.save(state, tmp_path / "tv.pth")
    assert load_backbone_weights(b, tmp_path / "tv.pth", PIXEL_MEANS) == "torchvision"
    assert torch.equal(b.body.conv2.weight, state["features.3.weight"])
    assert torch.equal(b.box_head.fc6.weight, state["classifier.0.weight"])
    # conv1 on our BGR 0-255 minus PIXEL_MEANS blob == torchvision's conv1 on (RGB/255 - mean)/std (interior).
    rng = np.random.default_rng(0)
    im_bgr = rng.uniform(0, 255, (12, 14, 3)).astype(np.float32)
    ours = torch.from_numpy((im_bgr - np.array(PIXEL_MEANS, np.float32)).transpose(2, 0, 1))[None]
    rgb = im_bgr[:, :, ::-1] / 255.0
    tv = torch.from_numpy(((rgb - TORCHVISION_MEAN) / TORCHVISION_STD).astype(np.float32).transpose(2, 0, 1))[None]
    got = F.conv2d(ours, b.body.conv1.weight, b.body.conv1.bias, padding=1)
    expect = F.conv2d(tv, state["features.0.weight"], state["features.0.bias"], padding=1)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expect[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-3)


def test_load_vgg16_torchvision_names(tmp_path):
    b = build_backbone("vgg16")
    g = torch.Generator().manual_seed(0)
    state, idx = {}, 0
    for name in b.conv_names:
        conv = getattr(b.body, name)
        while idx in (4, 9, 16, 23):   # torchvision's pool/relu slots: convs sit at 0,2,5,7,10,12,14,17,...
            idx += 1
        state[f"features.{idx}.weight"] = torch.randn(conv.weight.shape, generator=g) * 0.01
        state[f"features.{idx}.bias"] = torch.randn(conv.bias.shape, generator=g)
        idx += 2 if idx not in (2, 7, 14, 21, 28) else 3
    # fc layers stored as stride-0 views so the file stays small; the values only need to land in fc6/fc7.
    for i, (o, n) in enumerate(((4096, 25088), (4096, 4096), (1000, 4096))):
        state[f"classifier.{3 * i}.weight"] = torch.full((1,), float(i + 1)).expand(o, n)
        state[f"classifier.{3 * i}.bias"] = torch.full((o,), float(i + 1))
    torch.save(state, tmp_path / "vgg16-397923af.pth")
    load_backbone_weights(b, tmp_path / "vgg16-397923af.pth")
    assert torch.equal(b.body.conv5_3.weight, state["features.28.weight"])
    assert torch.equal(b.body.conv3_1.bias, state["features.10.bias"])
    assert b.box_head.fc6.weight[0, 0].item() == 1.0 and b.box_head.fc7.bias[0].item() == 2.0


def test_bad_weights_files_name_the_file(tmp_path):
    b = build_backbone("tiny")
    state = _tiny_state("caffe", b)
    state["conv2.weight"] = torch.zeros(64, 32, 5, 5)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"wrong\.pth.*conv2\.weight.*conv2"):
        load_backbone_weights(b, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match=r"zf\.pth: 5 conv layers, tiny has 4"):
        torch.save({k: v for k, v in _tiny_state("caffe", b).items()} | {"conv5.weight": torch.zeros(1, 1, 1, 1),
                                                                         "conv5.bias": torch.zeros(1)},
                   tmp_path / "zf.pth")
        load_backbone_weights(b, tmp_path / "zf.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth: cannot load"):
        load_backbone_weights(b, tmp_path / "junk.pth")


def test_prep_image_matches_cv2_resize():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, (123, 171, 3)).astype(np.uint8)
    for scale, max_size in ((200, 1000), (100, 130), (60, 1000)):
        blob, s = prep_image(im, scale=scale, max_size=max_size, pixel_means=PIXEL_MEANS)
        ref = im.astype(np.float32) - np.array(PIXEL_MEANS, np.float32)
        expect_s = scale / 123 if round(scale / 123 * 171) <= max_size else max_size / 171
        assert s == pytest.approx(expect_s)
        ref = cv2.resize(ref, None, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
        assert blob.shape == (1, 3, ref.shape[0], ref.shape[1])
        np.testing.assert_array_equal(blob[0].numpy().transpose(1, 2, 0), ref)
        # nets may not import roidb, so prep_image is roidb.blob.prep_im_for_blob's twin: they must agree exactly
        train_im, train_s = prep_im_for_blob(im, np.array(PIXEL_MEANS, np.float32), scale, max_size)
        assert train_s == s
        np.testing.assert_array_equal(blob[0].numpy().transpose(1, 2, 0), train_im)
