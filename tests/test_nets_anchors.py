"""Anchors: py-faster-rcnn's 9 reference anchors and the (h, w, a) shift order."""
import numpy as np
import torch

from nets import generate_anchors, shifted_anchors

# The table in shared/PYFRCNN_FACTS.md.
PYFRCNN_ANCHORS = np.array([
    [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359]], dtype=np.float64)


def test_default_anchors_equal_pyfrcnn_table():
    np.testing.assert_array_equal(generate_anchors(), PYFRCNN_ANCHORS)
    np.testing.assert_array_equal(generate_anchors(16, (0.5, 1, 2), (8, 16, 32)), PYFRCNN_ANCHORS)


def test_anchor_sizes_follow_round_half_even():
    # Ratio 0.5 on a 16x16 base: w = round(sqrt(512)) = 23, h = round(23 * 0.5) = round(11.5) = 12 (half-even).
    a = generate_anchors(16, (0.5,), (1,))
    np.testing.assert_array_equal(a[0, 2:] - a[0, :2] + 1, [23, 12])


def test_shifted_anchors_are_ordered_h_w_a():
    base = generate_anchors()
    out = shifted_anchors(base, 3, 5, 16)
    assert out.shape == (3 * 5 * 9, 4) and out.dtype == torch.float32
    for h in range(3):
        for w in range(5):
            for a in range(9):
                expect = base[a] + np.array([16 * w, 16 * h, 16 * w, 16 * h])
                np.testing.assert_array_equal(out[(h * 5 + w) * 9 + a].numpy(), expect)
