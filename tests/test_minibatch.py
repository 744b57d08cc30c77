"""Minibatch blobs: the scale rule, fg/bg sampling counts, target expansion, RPN and Fast R-CNN batches."""
import cv2
import numpy as np
import pytest

from roidb.blob import blob_scale, im_list_to_blob, prep_im_for_blob
from roidb.errors import DataError
from roidb.minibatch import expand_bbox_targets, get_minibatch, sample_rois

PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])


def test_scale_rule_short_side():
    # 500x375 (W x H) at scale 600, max 1000: 600 / 375 = 1.6 and the long side 800 fits.
    im = np.full((375, 500, 3), 128, np.uint8)
    out, scale = prep_im_for_blob(im, PIXEL_MEANS, 600, 1000)
    assert scale == pytest.approx(1.6, abs=1e-12)
    assert out.shape == (600, 800, 3) and out.dtype == np.float32


def test_scale_rule_max_size():
    # 2000x100: 600 / 100 = 6 would make the long side 12000 > 1000, so scale = 1000 / 2000.
    im = np.zeros((100, 2000, 3), np.uint8)
    out, scale = prep_im_for_blob(im, PIXEL_MEANS, 600, 1000)
    assert scale == 0.5
    assert out.shape == (50, 1000, 3)


def test_scale_rule_rounds_long_side():
    # round(scale * long) decides: 1.5 * 666 = 999 fits, 1.5 * 668 = 1002 does not.
    assert blob_scale(400, 666, 600, 1000) == 1.5
    assert blob_scale(400, 667, 600, 1000) == 1.5  # 1000.5 rounds (half to even) to 1000
    assert blob_scale(400, 668, 600, 1000) == 1000 / 668


def test_prep_subtracts_means_and_leaves_input_alone():
    im = np.full((10, 20, 3), 200, np.float32)
    out, scale = prep_im_for_blob(im, PIXEL_MEANS, 10, 1000)
    assert scale == 1.0
    np.testing.assert_allclose(out, np.broadcast_to(200 - PIXEL_MEANS, (10, 20, 3)), rtol=0, atol=1e-4)
    assert (im == 200).all()


def test_im_list_to_blob_pads_with_zeros_nchw():
    a = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3) + 1
    b = np.ones((4, 1, 3), np.float32) * 7
    blob = im_list_to_blob([a, b])
    assert blob.shape == (2, 3, 4, 3) and blob.dtype == np.float32
    np.testing.assert_array_equal(blob[0, :, :2, :], a.transpose(2, 0, 1))
    assert (blob[0, :, 2:, :] == 0).all()
    assert (blob[1, :, :, :1] == 7).all() and (blob[1, :, :, 1:] == 0).all()


def crafted_overlaps():
    # 10 fg (>= 0.5, including exactly 0.5), 100 bg in [0.1, 0.5) (including exactly 0.1), 5 below 0.1.
    fg = np.concatenate([[0.5], np.linspace(0.55, 1.0, 9)])
    bg = np.concatenate([[0.1], np.linspace(0.11, 0.4999, 99)])
    low = np.array([0.0, 0.0, 0.05, 0.0999, 0.09])
    ov = np.concatenate([fg, bg, low]).astype(np.float32)
    cls = np.where(ov > 0, 3, 0).astype(np.int32)
    cls[:10] = np.arange(1, 11) % 4 + 1
    return ov, cls


def sample(ov, cls, rois_per_image, fg_per_image, seed=0, lo=0.1):
    return sample_rois(ov, cls, fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=lo, rois_per_image=rois_per_image,
                       fg_rois_per_image=fg_per_image, rng=np.random.default_rng(seed))


def test_sample_rois_counts_when_fg_is_short():
    ov, cls = crafted_overlaps()
    keep, labels = sample(ov, cls, 64, 16)
    assert keep.size == 64 and len(set(keep.tolist())) == 64
    fg, bg = keep[:10], keep[10:]
    assert sorted(fg.tolist()) == list(range(10))          # all 10 fg, the one at exactly 0.5 included
    assert ((ov[bg] >= 0.1) & (ov[bg] < 0.5)).all()          # 54 bg from [0.1, 0.5)
    np.testing.assert_array_equal(labels[:10], cls[fg])
    assert (labels[10:] == 0).all() and labels.dtype == np.int64


def test_sample_rois_counts_when_both_plentiful():
    rng = np.random.default_rng(1)
    ov = np.concatenate([rng.uniform(0.5, 1, 40), rng.uniform(0.1, 0.5, 200)]).astype(np.float32)
    cls = np.where(ov >= 0.5, 2, 0)
    keep, labels = sample(ov, cls, 64, 16)
    assert keep.size == 64 and (ov[keep[:16]] >= 0.5).all() and (ov[keep[16:]] < 0.5).all()
    assert (labels[:16] == 2).all() and (labels[16:] == 0).all()
    assert len(set(keep.tolist())) == 64


def test_sample_rois_short_image_is_not_padded():
    ov = np.array([0.9, 0.7, 0.6, 0.3, 0.2, 0.45, 0.15, 0.12, 0.05], np.float32)
    keep, labels = sample(ov, np.where(ov >= 0.5, 1, 0), 64, 16)
    assert sorted(keep.tolist()) == list(range(8))           # 3 fg + 5 bg, the 0.05 RoI never
    assert labels.tolist()[:3] == [1, 1, 1] and labels.tolist()[3:] == [0] * 5


def test_sample_rois_bg_thresh_lo_zero_takes_everything_below_hi():
    ov, cls = crafted_overlaps()
    keep, _ = sample(ov, cls, 200, 50, lo=0.0)
    assert keep.size == 115


def test_sample_rois_is_seeded():
    ov, cls = crafted_overlaps()
    a, _ = sample(ov, cls, 32, 8, seed=5)
    b, _ = sample(ov, cls, 32, 8, seed=5)
    c, _ = sample(ov, cls, 32, 8, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_expand_bbox_targets():
    data = np.array([[2, 0.1, 0.2, 0.3, 0.4], [0, 9, 9, 9, 9], [1, -1, -2, -3, -4]], np.float32)
    t, w = expand_bbox_targets(data, 3)
    want = np.zeros((3, 12), np.float32)
    want[0, 8:12] = [0.1, 0.2, 0.3, 0.4]
    want[2, 4:8] = [-1, -2, -3, -4]
    np.testing.assert_array_equal(t, want)
    want_w = np.zeros((3, 12), np.float32)
    want_w[0, 8:12] = 1
    want_w[2, 4:8] = 1
    np.testing.assert_array_equal(w, want_w)
    with pytest.raises(ValueError, match="out of range"):
        expand_bbox_targets(data, 2)


def write_image(path, h, w, seed=0):
    im = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), im)
    return im


def rpn_entry(path, flipped=False, w=80):
    boxes = np.array([[5, 6, 30, 40], [10, 10, 50, 30], [0, 0, 79, 59]], np.float32)
    if flipped:
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]] - 1
    return {"image": str(path), "flipped": flipped, "width": w, "height": 60, "boxes": boxes,
            "gt_classes": np.array([3, 1, 0], np.int32)}


def test_rpn_batch(tmp_path):
    im = write_image(tmp_path / "a.png", 60, 80)
    blobs = get_minibatch([rpn_entry(tmp_path / "a.png")], 4, np.random.default_rng(0), scales=[120],
                          max_size=1000, pixel_means=PIXEL_MEANS, has_rpn=True)
    assert set(blobs) == {"data", "im_info", "gt_boxes"}
    assert blobs["data"].shape == (1, 3, 120, 160) and blobs["data"].dtype == np.float32
    np.testing.assert_allclose(blobs["im_info"], [[120, 160, 2.0]])
    np.testing.assert_allclose(blobs["gt_boxes"], [[10, 12, 60, 80, 3], [20, 20, 100, 60, 1]])
    assert blobs["gt_boxes"].dtype == np.float32
    # the scale-1 path reproduces the pixels exactly
    blobs = get_minibatch([rpn_entry(tmp_path / "a.png")], 4, np.random.default_rng(0), scales=[60],
                          max_size=1000, pixel_means=PIXEL_MEANS, has_rpn=True)
    np.testing.assert_allclose(blobs["data"][0], (im - PIXEL_MEANS).astype(np.float32).transpose(2, 0, 1),
                               atol=1e-4)


def test_flipped_entry_mirrors_pixels(tmp_path):
    write_image(tmp_path / "a.png", 60, 80)
    kw = dict(scales=[60], max_size=1000, pixel_means=PIXEL_MEANS, has_rpn=True)
    plain = get_minibatch([rpn_entry(tmp_path / "a.png")], 4, np.random.default_rng(0), **kw)
    flip = get_minibatch([rpn_entry(tmp_path / "a.png", flipped=True)], 4, np.random.default_rng(0), **kw)
    np.testing.assert_array_equal(flip["data"], plain["data"][..., ::-1])
    # the flipped boxes in the roidb are passed through unchanged (x1' = W - x2 - 1)
    np.testing.assert_allclose(flip["gt_boxes"][0], [80 - 30 - 1, 6, 80 - 5 - 1, 40, 3])


def frcn_entry(path, w, h):
    boxes = np.array([[0, 0, 19, 19], [0, 0, 19, 9], [2, 2, 21, 21], [30, 30, 39, 39], [0, 0, 9, 9],
                      [25, 0, 39, 14]], np.float32)
    max_overlaps = np.array([1.0, 0.5, 0.67, 0.0, 0.25, 0.3], np.float32)
    max_classes = np.array([2, 2, 2, 0, 2, 2], np.int32)
    targets = np.zeros((6, 5), np.float32)
    targets[:3, 0] = 2
    targets[1, 1:] = [0.0, 0.5, 0.0, -0.69]
    targets[2, 1:] = [-0.1, -0.1, 0.0, 0.0]
    return {"image": str(path), "flipped": False, "width": w, "height": h, "boxes": boxes,
            "gt_classes": np.array([2, 0, 0, 0, 0, 0], np.int32), "max_overlaps": max_overlaps,
            "max_classes": max_classes, "bbox_targets": targets}


def test_fast_rcnn_batch(tmp_path):
    write_image(tmp_path / "a.jpg", 40, 60)      # scale 80 / 40 = 2
    write_image(tmp_path / "b.jpg", 80, 40)      # scale 80 / 40 = 2, portrait
    entries = [frcn_entry(tmp_path / "a.jpg", 60, 40), frcn_entry(tmp_path / "b.jpg", 40, 80)]
    blobs = get_minibatch(entries, 3, np.random.default_rng(0), scales=[80], max_size=1000,
                          pixel_means=PIXEL_MEANS, has_rpn=False, batch_size=8, fg_fraction=0.25,
                          fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=0.1, bbox_reg=True)
    assert blobs["data"].shape == (2, 3, 160, 120)             # padded to the largest of 80x120 and 160x80
    assert (blobs["data"][0, :, 80:, :] == 0).all() and (blobs["data"][1, :, :, 80:] == 0).all()
    np.testing.assert_allclose(blobs["im_info"], [[80, 120, 2], [160, 80, 2]])
    rois, labels = blobs["rois"], blobs["labels"]
    # 4 RoIs per image, round(0.25 * 4) = 1 fg, 3 bg from the 2 RoIs in [0.1, 0.5): so 3 per image
    assert rois.shape == (6, 5) and labels.shape == (6,) and labels.dtype == np.int64
    np.testing.assert_array_equal(rois[:, 0], [0, 0, 0, 1, 1, 1])
    boxes = entries[0]["boxes"] * 2
    for r, lab in zip(rois, labels):
        match = np.flatnonzero((boxes == r[1:]).all(axis=1))
        assert match.size == 1
        i = match[0]
        assert (lab == 2) == (i in (0, 1, 2)) and i in (0, 1, 2, 4, 5)
        if lab:
            t = blobs["bbox_targets"][rois.tolist().index(r.tolist())]
            np.testing.assert_allclose(t[8:12], entries[0]["bbox_targets"][i, 1:])
            assert (t[:8] == 0).all()
    assert (labels > 0).sum() == 2
    assert blobs["bbox_targets"].shape == (6, 12)
    w = blobs["bbox_inside_weights"]
    np.testing.assert_array_equal(w[labels > 0][:, 8:12], 1)
    assert w[labels > 0][:, :8].sum() == 0 and w[labels == 0].sum() == 0
    np.testing.assert_array_equal(blobs["bbox_outside_weights"], (w > 0).astype(np.float32))


def test_fast_rcnn_batch_without_bbox_reg(tmp_path):
    write_image(tmp_path / "a.jpg", 40, 60)
    entry = frcn_entry(tmp_path / "a.jpg", 60, 40)
    del entry["bbox_targets"]
    blobs = get_minibatch([entry], 3, np.random.default_rng(0), scales=[40], max_size=1000,
                          pixel_means=PIXEL_MEANS, has_rpn=False, batch_size=4, bbox_reg=False)
    assert set(blobs) == {"data", "im_info", "rois", "labels"}


def test_minibatch_errors(tmp_path):
    write_image(tmp_path / "a.jpg", 40, 60)
    e = frcn_entry(tmp_path / "a.jpg", 60, 40)
    kw = dict(scales=[40], max_size=1000, pixel_means=PIXEL_MEANS)
    with pytest.raises(ValueError, match="must divide"):
        get_minibatch([e, e], 3, np.random.default_rng(0), has_rpn=False, batch_size=5, **kw)
    with pytest.raises(ValueError, match="exactly 1 image"):
        get_minibatch([e, e], 3, np.random.default_rng(0), has_rpn=True, **kw)
    missing = dict(e, image=str(tmp_path / "nope.jpg"))
    with pytest.raises(DataError, match="nope.jpg: image file not found"):
        get_minibatch([missing], 3, np.random.default_rng(0), has_rpn=True, **kw)
    no_targets = {k: v for k, v in e.items() if k != "bbox_targets"}
    with pytest.raises(ValueError, match="bbox_targets"):
        get_minibatch([no_targets], 3, np.random.default_rng(0), has_rpn=False, batch_size=4, **kw)
