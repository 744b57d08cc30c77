"""The training roidb: header-only image sizes, prepare, bbox-regression targets and their normalisation, filter."""
import math

import cv2
import numpy as np
import pytest

from kernels.boxes import bbox_overlaps
from roidb.errors import DataError
from roidb.training import (add_bbox_regression_targets, combined_roidb, compute_bbox_targets, filter_roidb,
                            get_training_roidb, prepare_roidb)
from roidb.imdb import read_image_size


def write(path, h, w, params=()):
    im = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), im, list(params))
    return str(path)


@pytest.mark.parametrize("name,params", [("a.jpg", ()), ("p.jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
                                         ("a.png", ()), ("a.bmp", ())])
def test_image_size_matches_decoded_shape(tmp_path, name, params):
    path = write(tmp_path / name, 37, 53, params)
    assert read_image_size(path) == (37, 53)


def test_image_size_skips_exif_segments(tmp_path):
    # An APP1 segment containing 0xFF bytes and a fake SOF pattern must be skipped by its length.
    path = write(tmp_path / "a.jpg", 21, 34)
    data = open(path, "rb").read()
    payload = b"Exif\x00\x00" + b"\xff\xc0\x00\x11\x08\x01\x02\x03\x04" * 5
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    patched = tmp_path / "exif.jpg"
    patched.write_bytes(data[:2] + app1 + data[2:])
    assert cv2.imread(str(patched)).shape[:2] == (21, 34)
    assert read_image_size(patched) == (21, 34)


def test_image_size_bad_files(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="junk.jpg: not a readable image"):
        read_image_size(tmp_path / "junk.jpg")
    with pytest.raises(DataError, match="missing.jpg: image file not found"):
        read_image_size(tmp_path / "missing.jpg")


def entry(boxes, gt_classes, overlaps):
    return {"boxes": np.array(boxes, np.float32), "gt_classes": np.array(gt_classes, np.int32),
            "gt_overlaps": np.array(overlaps, np.float32), "flipped": False}


def test_prepare_roidb_list(tmp_path):
    path = write(tmp_path / "a.jpg", 30, 40)
    e = entry([[0, 0, 9, 9], [0, 0, 9, 19], [20, 20, 25, 25]], [2, 0, 0],
              [[0, 0, 1], [0, 0, 0.5], [0, 0, 0]])
    out = prepare_roidb([e], [path])
    assert out[0] is e and e["image"] == path and (e["width"], e["height"]) == (40, 30)
    np.testing.assert_array_equal(e["max_classes"], [2, 2, 0])
    np.testing.assert_array_equal(e["max_overlaps"], [1, 0.5, 0])
    prepare_roidb([e], [path], sizes=[(7, 8)])
    assert (e["width"], e["height"]) == (7, 8)


def test_prepare_roidb_errors(tmp_path):
    e = entry([[0, 0, 9, 9]], [1], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="background"):
        prepare_roidb([e], ["x.jpg"], sizes=[(10, 10)])
    with pytest.raises(ValueError, match="image paths"):
        prepare_roidb([e], ["a", "b"], sizes=[(1, 1), (1, 1)])
    with pytest.raises(ValueError, match="needs image_paths"):
        prepare_roidb([e])
    bad = entry([[0, 0, 9, 9]], [1], [[0, 1]])
    with pytest.raises(ValueError, match="nope.jpg"):
        prepare_roidb([bad], [str(tmp_path / "nope.jpg")])


class FolderImdb:
    """A minimal imdb over real image files, with py-faster-rcnn's flipping rule, to exercise duck typing."""

    def __init__(self, paths, roidb):
        self.name, self._paths, self._roidb = "folder", list(paths), roidb
        self.classes = ("__background__", "a", "b")
        self.num_classes = 3

    @property
    def roidb(self):
        return self._roidb

    @property
    def num_images(self):
        return len(self._roidb)

    @property
    def image_index(self):
        return [str(i) for i in range(self.num_images)]

    def image_path_at(self, i):
        return self._paths[i % len(self._paths)]

    def append_flipped_images(self):
        flipped = []
        for i, e in enumerate(self._roidb):
            w = cv2.imread(self.image_path_at(i)).shape[1]
            boxes = e["boxes"].copy()
            boxes[:, 0], boxes[:, 2] = w - e["boxes"][:, 2] - 1, w - e["boxes"][:, 0] - 1
            flipped.append(dict(e, boxes=boxes, flipped=True))
        self._roidb = self._roidb + flipped


def test_get_training_roidb_flips_then_prepares(tmp_path):
    paths = [write(tmp_path / "a.jpg", 30, 40), write(tmp_path / "b.jpg", 50, 20)]
    imdb = FolderImdb(paths, [entry([[0, 0, 9, 9]], [1], [[0, 1, 0]]), entry([[2, 3, 4, 5]], [2], [[0, 0, 1]])])
    roidb = get_training_roidb(imdb, use_flipped=True)
    assert len(roidb) == 4 and [e["flipped"] for e in roidb] == [False, False, True, True]
    assert [(e["width"], e["height"]) for e in roidb] == [(40, 30), (20, 50), (40, 30), (20, 50)]
    assert [e["image"] for e in roidb] == paths + paths
    np.testing.assert_array_equal(roidb[2]["boxes"], [[30, 0, 39, 9]])
    np.testing.assert_array_equal(roidb[3]["max_classes"], [2])
    imdb2 = FolderImdb(paths[:1], [entry([[0, 0, 9, 9]], [1], [[0, 1, 0]])])
    both = combined_roidb([FolderImdb(paths, [entry([[0, 0, 9, 9]], [1], [[0, 1, 0]])] * 2), imdb2],
                          use_flipped=False)
    assert len(both) == 3 and all("max_overlaps" in e for e in both)


def prepared(boxes, gt_classes, overlaps):
    e = entry(boxes, gt_classes, overlaps)
    return prepare_roidb([e], ["unused.jpg"], sizes=[(100, 100)])[0]


def test_compute_targets_hand_case():
    # GT (cls 1) [0,0,9,9]: w = h = 10, centre (5, 5). RoI [0,0,9,19]: w 10, h 20, centre (5, 10), IoU 0.5.
    # dx = 0, dy = (5 - 10) / 20 = -0.25, dw = log(10/10) = 0, dh = log(10/20).
    e = prepared([[0, 0, 9, 9], [0, 0, 9, 19], [50, 50, 60, 60]], [1, 0, 0], [[0, 1], [0, 0.5], [0, 0]])
    t = compute_bbox_targets(e["boxes"], e["max_overlaps"], e["max_classes"], bbox_thresh=0.5)
    assert t.dtype == np.float32
    np.testing.assert_allclose(t, [[1, 0, 0, 0, 0], [1, 0, -0.25, 0, math.log(0.5)], [0, 0, 0, 0, 0]],
                               atol=1e-7)
    # an image without GT rows gets all-zero targets
    assert not compute_bbox_targets(e["boxes"][1:], e["max_overlaps"][1:], e["max_classes"][1:], 0.5).any()


def test_targets_go_to_the_most_overlapping_gt():
    # Two GT boxes; the RoI [8,0,21,9] overlaps the first by 20/220 and the second by 100/140, so it regresses to
    # the second: RoI w 14, centre 15; GT w 10, centre 17: dx = 2 / 14, dw = log(10 / 14).
    gts = [[0, 0, 9, 9], [12, 0, 21, 9]]
    e = prepared(gts + [[8, 0, 21, 9]], [1, 1, 0], [[0, 1], [0, 1], [0, 100 / 140]])
    t = compute_bbox_targets(e["boxes"], e["max_overlaps"], e["max_classes"], bbox_thresh=0.5)
    np.testing.assert_allclose(t[2], [1, 2 / 14, 0, math.log(10 / 14), 0], atol=1e-7)


def random_roidb(rng, n_images=6, num_classes=4):
    roidb = []
    for _ in range(n_images):
        g = rng.integers(1, 4)
        xy = rng.uniform(0, 200, (g, 2))
        gt = np.hstack([xy, xy + rng.uniform(20, 80, (g, 2))])
        props = np.repeat(gt, 6, axis=0) + rng.normal(0, 6, (6 * g, 4))
        props[:, 2:] = np.maximum(props[:, 2:], props[:, :2] + 1)
        boxes = np.vstack([gt, props]).astype(np.float32)
        cls = rng.integers(1, num_classes, g)
        ov = bbox_overlaps(boxes.astype(np.float64), gt.astype(np.float32).astype(np.float64))
        overlaps = np.zeros((len(boxes), num_classes), np.float32)
        best = ov.argmax(axis=1)
        overlaps[np.arange(len(boxes)), cls[best]] = ov.max(axis=1)
        overlaps[np.arange(g), cls] = 1
        roidb.append(prepared(boxes, np.concatenate([cls, np.zeros(6 * g)]).astype(np.int32), overlaps))
    return roidb


def test_normalisation_from_data_matches_naive_stats():
    rng = np.random.default_rng(0)
    roidb = random_roidb(rng)
    raw = [compute_bbox_targets(e["boxes"], e["max_overlaps"], e["max_classes"], 0.5) for e in roidb]
    means, stds = add_bbox_regression_targets(roidb, 4, bbox_thresh=0.5, normalize_targets=True,
                                              precomputed=False)
    assert means.shape == (16,) and stds.shape == (16,)
    assert (means[:4] == 0).all() and (stds[:4] == 0).all()
    allt = np.vstack(raw)
    for c in range(1, 4):
        rows = allt[allt[:, 0] == c, 1:].astype(np.float64)
        if len(rows) == 0:
            continue
        np.testing.assert_allclose(means[4 * c:4 * c + 4], rows.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(stds[4 * c:4 * c + 4], rows.std(axis=0), atol=1e-7)
    for e, r in zip(roidb, raw):
        c = r[:, 0].astype(int)
        fg = c > 0
        want = (r[fg, 1:] - means.reshape(-1, 4)[c[fg]]) / stds.reshape(-1, 4)[c[fg]]
        np.testing.assert_allclose(e["bbox_targets"][fg, 1:], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(e["bbox_targets"][:, 0], r[:, 0])
        assert not e["bbox_targets"][~fg].any()


def test_normalisation_precomputed_and_off():
    rng = np.random.default_rng(1)
    roidb = random_roidb(rng)
    raw = [compute_bbox_targets(e["boxes"], e["max_overlaps"], e["max_classes"], 0.5) for e in roidb]
    means, stds = add_bbox_regression_targets(roidb, 4, precomputed=True)
    np.testing.assert_array_equal(means, [0.0] * 16)
    np.testing.assert_allclose(stds, [0.1, 0.1, 0.2, 0.2] * 4)
    for e, r in zip(roidb, raw):
        fg = r[:, 0] > 0
        np.testing.assert_allclose(e["bbox_targets"][fg, 1:], r[fg, 1:] / [0.1, 0.1, 0.2, 0.2], rtol=1e-5,
                                   atol=1e-6)
    roidb = random_roidb(np.random.default_rng(1))
    add_bbox_regression_targets(roidb, 4, normalize_targets=False)
    for e, r in zip(roidb, raw):
        np.testing.assert_array_equal(e["bbox_targets"], r)


def test_zero_std_class_gives_no_nan():
    # a class with one target: its std is 0; py-faster-rcnn divided by it, we do not.
    e = prepared([[0, 0, 9, 9]], [1], [[0, 1, 0]])
    _, stds = add_bbox_regression_targets([e], 3)
    assert (stds[4:8] == 0).all() and np.isfinite(e["bbox_targets"]).all()


def test_filter_roidb():
    keep_fg = prepared([[0, 0, 9, 9]], [1], [[0, 1]])
    keep_bg = prepared([[0, 0, 9, 9], [0, 0, 9, 9]], [0, 0], [[0, 0.3], [0, 0]])
    only_low = prepared([[0, 0, 9, 9]], [0], [[0, 0.05]])
    empty = prepared(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 2)))
    roidb = [keep_fg, keep_bg, only_low, empty]
    assert filter_roidb(roidb, fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=0.1) == [keep_fg, keep_bg]
    assert filter_roidb(roidb, fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=0.0) == [keep_fg, keep_bg, only_low]
