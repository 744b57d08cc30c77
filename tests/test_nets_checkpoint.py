"""Checkpoints: round trip through torch.load(weights_only=True), and one-line errors on mismatches."""
import warnings

import numpy as np
import pytest
import torch

from nets import CheckpointError, FasterRCNN, load_checkpoint, load_weights_into, read_checkpoint, save_checkpoint

CLASSES = ("__background__", "circle", "square")


def _model(net="tiny", k=3, seed=3, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FasterRCNN(net, k, seed=seed, **kw)


def test_round_trip_keeps_both_heads_stats_and_metadata(tmp_path):
    model = _model(anchor_scales=(4, 8, 16))
    model.set_bbox_normalization(np.zeros(4), [0.1, 0.1, 0.2, 0.2])
    path = save_checkpoint(tmp_path / "model.pt", model, CLASSES, iteration=120, stage="stage2")
    raw = torch.load(path, weights_only=True)
    assert raw["net"] == "tiny" and raw["classes"] == list(CLASSES) and raw["iteration"] == 120
    assert raw["anchor_scales"] == [4.0, 8.0, 16.0] and raw["anchor_ratios"] == [0.5, 1.0, 2.0]
    torch.testing.assert_close(raw["bbox_stds"], torch.tensor([0.1, 0.1, 0.2, 0.2] * 3))
    assert any(k.startswith("rpn.") for k in raw["state_dict"]) and "roi_head.bbox_pred.weight" in raw["state_dict"]
    loaded, meta = load_checkpoint(path, net="tiny", classes=CLASSES)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert loaded.anchor_scales == (4.0, 8.0, 16.0) and meta["stage"] == "stage2"
    assert not list(tmp_path.glob(".*tmp*"))   # the temporary file was renamed away


def test_mismatches_name_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "m2.pt", _model(), CLASSES)
    with pytest.raises(CheckpointError, match=r"m2\.pt: checkpoint is for net 'tiny', expected 'zf'"):
        load_checkpoint(path, net="zf")
    with pytest.raises(CheckpointError, match=r"m2\.pt: checkpoint classes .* differ"):
        load_checkpoint(path, classes=("__background__", "dog", "cat"))
    with pytest.raises(CheckpointError, match=r"m2\.pt: checkpoint anchors"):
        load_weights_into(_model(anchor_scales=(2, 4)), path, CLASSES)
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot read checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: not a model checkpoint"):
        read_checkpoint(tmp_path / "other.pt")


def test_load_weights_into_existing_model(tmp_path):
    src = _model(seed=1)
    dst = _model(seed=2)
    assert not torch.equal(src.rpn.rpn_conv.weight, dst.rpn.rpn_conv.weight)
    load_weights_into(dst, save_checkpoint(tmp_path / "m.pt", src, CLASSES), CLASSES)
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), n
