"""Per-stage freezing: one SGD step (momentum, weight decay) moves every trained tensor and no frozen one."""
import warnings

import numpy as np
import pytest
import torch

from roidb.minibatch import sample_rois
from nets import FasterRCNN, STAGES, param_groups, reinit_predictors, reinit_rpn_head, set_trainable


def _model(net="tiny", num_classes=3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FasterRCNN(net, num_classes, seed=3)


def _blobs():
    rng = np.random.default_rng(0)
    data = rng.normal(0, 50, (1, 3, 192, 256)).astype(np.float32)
    gt = np.array([[10, 10, 110, 150, 1], [140, 40, 240, 180, 2]], np.float32)
    rpn = {"data": data, "im_info": np.array([[192, 256, 1.0]], np.float32), "gt_boxes": gt}
    rois = np.array([[0, 10, 10, 60, 70], [0, 72, 22, 118, 88], [0, 0, 0, 40, 40], [0, 50, 50, 90, 95]], np.float32)
    targets = np.zeros((4, 12), np.float32)
    inside = np.zeros((4, 12), np.float32)
    targets[0, 4:8] = [0.1, -0.2, 0.3, 0.1]
    targets[1, 8:12] = [-0.1, 0.2, 0.1, -0.3]
    inside[0, 4:8] = inside[1, 8:12] = 1
    frcn = {"data": data, "rois": rois, "labels": np.array([1, 2, 0, 0]), "bbox_targets": targets,
            "bbox_inside_weights": inside, "bbox_outside_weights": inside.copy()}
    return rpn, frcn


EXPECTED_TINY = {
    "stage1": {"conv2", "conv3", "conv4", "rpn"},
    "stage2": {"conv2", "conv3", "conv4", "fc6", "fc7", "cls_score", "bbox_pred"},
    "stage3": {"rpn"},
    "stage4": {"fc6", "fc7", "cls_score", "bbox_pred"},
    "e2e": {"conv2", "conv3", "conv4", "rpn", "fc6", "fc7", "cls_score", "bbox_pred"},
}


def _layer(name: str) -> str:
    parts = name.split(".")
    return "rpn" if parts[0] == "rpn" else parts[-2]


@pytest.mark.parametrize("stage", STAGES)
def test_one_step_moves_trained_and_keeps_frozen(stage):
    model = _model()
    trained = set(set_trainable(model, stage))
    assert {_layer(n) for n in trained} == EXPECTED_TINY[stage]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(param_groups(model, 0.01, 0.0005), momentum=0.9)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(trained)
    rpn, frcn = _blobs()
    for _ in range(2):   # two steps so momentum is exercised
        if stage == "e2e":
            losses = model.e2e_losses(rpn, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0),
                                      sampler=sample_rois, proposal_settings=dict(
                                          pre_nms_top_n=12000, post_nms_top_n=2000, nms_thresh=0.7, min_size=16))
        elif stage in ("stage1", "stage3"):
            losses = model.rpn_losses(rpn, generator=torch.Generator().manual_seed(0))
        else:
            losses = model.frcn_losses(frcn)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), f"{stage}: trainable {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"{stage}: frozen {n} changed"
            assert not p.requires_grad and p.grad is None


def test_param_groups_bias_lr_and_decay():
    model = _model()
    set_trainable(model, "stage4")
    weights, biases = param_groups(model, 0.001, 0.0005)
    assert weights["lr"] == 0.001 and weights["weight_decay"] == 0.0005
    assert biases["lr"] == 0.002 and biases["weight_decay"] == 0.0 and biases["lr_mult"] == 2.0
    assert biases["decay_mult"] == 0.0 and weights["decay_mult"] == 1.0 and weights["lr_mult"] == 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") for p in weights["params"])
    assert all(names[id(p)].endswith("bias") for p in biases["params"])
    assert len(weights["params"]) == 4 and len(biases["params"]) == 4


@pytest.mark.parametrize("stage,expect_convs", [("stage1", [f"conv{i}_{j}" for i, n in ((3, 3), (4, 3), (5, 3))
                                                            for j in range(1, n + 1)]), ("stage3", [])])
def test_vgg16_stage_table(stage, expect_convs):
    model = _model("vgg16", 21)
    trained = set_trainable(model, stage)
    convs = sorted({n.split(".")[1] for n in trained if n.startswith("body.")})
    assert convs == sorted(expect_convs)
    assert any(n.startswith("rpn.") for n in trained) and not any(n.startswith("roi_head.") for n in trained)
    assert not model.roi_head.box_head.drop6.training   # the untrained head's dropout is off


def test_zf_stages_and_dropout_modes():
    model = _model("zf", 21)
    trained = set_trainable(model, "stage2")
    assert {n.split(".")[1] for n in trained if n.startswith("body.")} == {f"conv{i}" for i in range(1, 6)}
    assert model.roi_head.box_head.drop6.training and model.roi_head.box_head.drop7.training
    trained = set_trainable(model, "stage4")
    assert not any(n.startswith("body.") for n in trained)
    assert model.roi_head.box_head.drop6.training
    set_trainable(model, "stage3")
    assert not model.roi_head.box_head.drop6.training and model.rpn.training


def test_unknown_stage():
    with pytest.raises(ValueError, match="unknown stage 'stage5'"):
        set_trainable(_model(), "stage5")


def test_reinit_helpers_touch_only_their_heads():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    reinit_rpn_head(model, torch.Generator().manual_seed(5))
    reinit_predictors(model, torch.Generator().manual_seed(6))
    for n, p in model.named_parameters():
        if n.startswith("rpn.") or ".cls_score." in n or ".bbox_pred." in n:
            if n.endswith("bias"):
                assert p.abs().max() == 0
            else:
                std = 0.001 if ".bbox_pred." in n else 0.01
                assert abs(p.std().item() - std) < 0.2 * std, n
        else:
            assert torch.equal(p, before[n] + 1.0), n


def test_vgg16_end2end_freezes_conv1_and_conv2_only():
    """py-faster-rcnn's VGG16 end2end train.prototxt: conv1_1..conv2_2 lr_mult 0; every other conv, the RPN head
    and fc6..bbox_pred train, with the detector head's dropout on."""
    model = _model("vgg16", 21)
    trained = set_trainable(model, "e2e")
    convs = sorted({n.split(".")[1] for n in trained if n.startswith("body.")})
    assert convs == sorted(f"conv{i}_{j}" for i, n in ((3, 3), (4, 3), (5, 3)) for j in range(1, n + 1))
    assert any(n.startswith("rpn.") for n in trained)
    assert {n.split(".")[-2] for n in trained if n.startswith("roi_head.")} == {"fc6", "fc7", "cls_score",
                                                                                 "bbox_pred"}
    assert model.roi_head.box_head.drop6.training
