"""im_detect and the test_net post-processing (thresh, per-class NMS, max_per_image)."""
import warnings

import numpy as np
import pytest
import torch

from nets import FasterRCNN, bbox_transform_inv, detect_blob, im_detect, postprocess_detections


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FasterRCNN("tiny", 3, seed=3)
    model.set_bbox_normalization([0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.2, 0.2])
    return model


def test_im_detect_shapes_and_clipping():
    im = np.random.default_rng(0).integers(0, 255, (150, 200, 3)).astype(np.uint8)
    model = _model()
    scores, boxes = im_detect(model, im, scales=[300], max_size=500, pre_nms_top_n=600, post_nms_top_n=50)
    assert scores.dtype == np.float32 and boxes.dtype == np.float32
    assert scores.shape[1] == 3 and boxes.shape == (scores.shape[0], 12) and 0 < scores.shape[0] <= 50
    np.testing.assert_allclose(scores.sum(1), 1.0, rtol=1e-5)
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 199
    assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 149
    assert model.training   # im_detect restores the mode


def test_given_boxes_are_scaled_and_deltas_unnormalised():
    im = np.full((100, 120, 3), 128, np.uint8)
    model = _model()
    with torch.no_grad():
        model.roi_head.bbox_pred.weight.zero_()
        model.roi_head.bbox_pred.bias.copy_(torch.tensor([0.0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0, 0, 0]))
    given = np.array([[10, 20, 49, 59], [0, 0, 119, 99]], np.float32)
    scores, boxes = im_detect(model, im, scales=[200], max_size=1000, boxes=given)
    assert scores.shape == (2, 3)
    # Class 0 deltas are 0: boxes come back as given (the coding round-trips exactly). Class 1 has dx = 1 * 0.1
    # (std) -> shift by 0.1 * width, clipped to the image.
    np.testing.assert_allclose(boxes[:, 0:4], given, atol=1e-3)
    np.testing.assert_allclose(boxes[0, 4:8], [14, 20, 53, 59], atol=1e-3)
    np.testing.assert_allclose(boxes[1, 4:8], [12, 0, 119, 99], atol=1e-3)


def test_detect_blob_matches_im_detect_inputs():
    model = _model().eval()
    data = torch.randn(1, 3, 160, 224) * 40
    rois, scores, deltas = detect_blob(model, data, [160, 224, 1.0], pre_nms_top_n=300, post_nms_top_n=20)
    assert rois.shape[0] == scores.shape[0] == deltas.shape[0] <= 20
    pred = bbox_transform_inv(rois, deltas)
    assert pred.shape == (rois.shape[0], 12)


def test_postprocess_thresh_nms_and_cap():
    # 4 boxes x 3 classes; class 1: boxes 0 and 1 overlap (IoU 0.82 > 0.3) -> box 1 suppressed; box 3 < 0.05.
    b = np.array([[0, 0, 99, 99], [10, 0, 109, 99], [200, 200, 250, 250], [300, 300, 320, 320]], np.float32)
    boxes = np.tile(b, (1, 3))
    scores = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.1, 0.6], [0.96, 0.01, 0.03]], np.float32)
    out = postprocess_detections(scores, boxes, thresh=0.05, nms_thresh=0.3, max_per_image=100)
    assert len(out) == 3 and out[0].shape == (0, 5)
    np.testing.assert_allclose(out[1], [[0, 0, 99, 99, 0.9], [200, 200, 250, 250, 0.1]])
    np.testing.assert_allclose(out[2], [[200, 200, 250, 250, 0.6]])
    assert all(d.dtype == np.float32 for d in out)
    # max_per_image 2 keeps scores >= the 2nd best over all classes (0.6).
    out = postprocess_detections(scores, boxes, max_per_image=2)
    assert [len(d) for d in out] == [0, 1, 1]


@pytest.mark.parametrize("scales", [[], [300, 400]])
def test_im_detect_wants_one_scale(scales):
    with pytest.raises(ValueError, match="exactly one TEST.SCALES"):
        im_detect(_model(), np.zeros((10, 10, 3), np.uint8), scales=scales, max_size=100)
