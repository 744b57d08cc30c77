"""Losses against hand-computed numbers (py-faster-rcnn's SmoothL1Loss and softmax normalisation)."""
import math

import torch

from nets import fast_rcnn_loss, rpn_loss, smooth_l1_loss


def test_smooth_l1_hand_values_sigma_1_and_3():
    pred = torch.tensor([[0.5, 2.0, -0.1, 0.0]])
    zero = torch.zeros(1, 4)
    ones = torch.ones(1, 4)
    # sigma 1: |x| < 1 -> 0.5 x^2, else |x| - 0.5: 0.125 + 1.5 + 0.005 + 0.
    torch.testing.assert_close(smooth_l1_loss(pred, zero, ones, ones, sigma=1.0), torch.tensor(1.63))
    # sigma 3: |x| < 1/9 -> 4.5 x^2, else |x| - 1/18: (0.5 - 1/18) + (2 - 1/18) + 4.5 * 0.01 + 0.
    expect = (0.5 - 1 / 18) + (2 - 1 / 18) + 0.045
    torch.testing.assert_close(smooth_l1_loss(pred, zero, ones, ones, sigma=3.0), torch.tensor(expect))


def test_smooth_l1_weights_and_normalizer():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    inside = torch.tensor([[0.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    outside = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    # row 0: x = 0.5 -> 0.125; row 1: x = 2 -> 1.5 times 0.25 = 0.375; sum 0.5, / 2 RoIs = 0.25.
    got = smooth_l1_loss(pred, target, inside, outside, sigma=1.0, normalizer=2)
    torch.testing.assert_close(got, torch.tensor(0.25))


def test_rpn_loss_ignores_minus_one_and_sums_bbox():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0], [5.0, -5.0]])
    targets = {"labels": torch.tensor([1, 0, -1]),
               "bbox_targets": torch.tensor([[0.05, 0.0, 0.0, 0.0], [0.0] * 4, [9.0] * 4]),
               "bbox_inside_weights": torch.tensor([[1.0] * 4, [0.0] * 4, [0.0] * 4]),
               "bbox_outside_weights": torch.tensor([[0.5] * 4, [0.5] * 4, [0.0] * 4])}
    out = rpn_loss(logits, torch.zeros(3, 4), targets)
    # Both sampled anchors have p(true class) = 3/4; the ignored one (a huge error) does not count.
    torch.testing.assert_close(out["rpn_cls"], torch.tensor(-math.log(0.75)))
    # Only the fg anchor has inside weights: x = 0.05 < 1/9 -> 4.5 * 0.0025, times outside 0.5.
    torch.testing.assert_close(out["rpn_bbox"], torch.tensor(4.5 * 0.0025 * 0.5))


def test_fast_rcnn_loss_hand_values():
    cls_score = torch.tensor([[0.0, math.log(2.0), 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0])
    bbox_pred = torch.zeros(2, 12)
    targets = torch.zeros(2, 12)
    targets[0, 4:8] = torch.tensor([0.5, -2.0, 0.0, 0.0])
    inside = torch.zeros(2, 12)
    inside[0, 4:8] = 1.0
    out = fast_rcnn_loss(cls_score, bbox_pred, labels, targets, inside, inside.clone())
    # row 0: p = 2/4; row 1: p = 1/3.
    torch.testing.assert_close(out["cls"], torch.tensor((-math.log(0.5) - math.log(1 / 3)) / 2))
    # 0.5 * 0.25 + (2 - 0.5) = 1.625 over 2 RoIs.
    torch.testing.assert_close(out["bbox"], torch.tensor(1.625 / 2))


def test_fast_rcnn_loss_without_targets_and_gradients_flow():
    cls_score = torch.randn(4, 3, requires_grad=True)
    bbox_pred = torch.randn(4, 12, requires_grad=True)
    out = fast_rcnn_loss(cls_score, bbox_pred, torch.tensor([0, 1, 2, 0]))
    assert out["bbox"].item() == 0.0
    (out["cls"] + out["bbox"]).backward()
    assert cls_score.grad.abs().sum() > 0
