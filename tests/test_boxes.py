"""Box math against hand-computed cases and a naive reference."""
import numpy as np
import pytest
import torch

from kernels.boxes import bbox_overlaps, bbox_transform, bbox_transform_inv, clip_boxes


def naive_iou(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter)


def test_overlaps_hand_computed():
    a = np.array([[0, 0, 9, 9]], np.float32)
    b = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [10, 10, 20, 20], [9, 9, 9, 9]], np.float32)
    got = bbox_overlaps(a, b)
    # 10x10 boxes overlapping by 5 columns: 50 / (100 + 100 - 50); a touching pixel gives 1 / 100.
    np.testing.assert_allclose(got, [[1.0, 50 / 150, 0.0, 1 / 100]], rtol=1e-6)
    assert isinstance(got, np.ndarray)


def test_overlaps_match_naive_on_random_boxes():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (40, 2))
    a = np.hstack([xy, xy + rng.uniform(0, 50, (40, 2))])
    xy = rng.uniform(0, 100, (30, 2))
    b = np.hstack([xy, xy + rng.uniform(0, 50, (30, 2))])
    got = bbox_overlaps(a, b)
    want = np.array([[naive_iou(p, q) for q in b] for p in a])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_overlaps_empty():
    assert bbox_overlaps(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)


def test_transform_hand_computed():
    ex = torch.tensor([[0.0, 0.0, 9.0, 19.0]])
    gt = torch.tensor([[5.0, 0.0, 24.0, 19.0]])
    d = bbox_transform(ex, gt)
    # ex: w=10, ctr x=5; gt: w=20, ctr x=15 -> dx = 1, dw = log 2.
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.0, float(np.log(2.0)), 0.0]]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transform_round_trips_exactly(dtype):
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, (200, 2))
    ex = np.hstack([xy, xy + rng.uniform(10, 200, (200, 2))]).astype(dtype)
    xy = rng.uniform(0, 500, (200, 2))
    gt = np.hstack([xy, xy + rng.uniform(10, 200, (200, 2))]).astype(dtype)
    back = bbox_transform_inv(ex, bbox_transform(ex, gt))
    tol = 1e-3 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(back, gt, atol=tol)


def test_transform_inv_many_classes_and_clip():
    boxes = torch.tensor([[10.0, 10.0, 29.0, 29.0]])
    deltas = torch.zeros(1, 8)
    deltas[0, 4:] = torch.tensor([0.0, 0.0, float(np.log(4.0)), 0.0])
    out = bbox_transform_inv(boxes, deltas)
    torch.testing.assert_close(out[0, :4], boxes[0])
    torch.testing.assert_close(out[0, 4:], torch.tensor([-20.0, 10.0, 59.0, 29.0]))
    clipped = clip_boxes(out, (25, 50))
    torch.testing.assert_close(clipped[0, 4:], torch.tensor([0.0, 10.0, 49.0, 24.0]))


def test_bad_shapes_name_the_argument():
    with pytest.raises(ValueError, match="query_boxes"):
        bbox_overlaps(np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="deltas"):
        bbox_transform_inv(np.zeros((2, 4)), np.zeros((2, 6)))
