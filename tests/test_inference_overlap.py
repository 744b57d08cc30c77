"""The fast inference paths of p1/p2 and eval give the bytes of the plain ones.

- prepared_images (decode + prep one image ahead in a thread) yields exactly the blobs of a sequential loop, in
  order, and raises a bad image's DataError in its turn;
- imdb_proposals (prefetch, NMS stopping at post_nms_top_n) pickles to the bytes of a naive per-image loop that runs
  the full NMS and truncates;
- test_net's detections equal run_detector's on decoded images, and the recall eval takes from test_net's RoIs equals
  test_proposal_recall's second RPN pass.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kernels
from kernels.boxes import bbox_transform_inv, clip_boxes
from kernels.reference import argsort_desc
from nets import FasterRCNN, prep_image
from roidb.errors import DataError
from roidb.synthetic import ensure_shapes_dataset
from stages.engine.config import load_config
from stages import evaluation
from stages.evaluation import detect_image, proposals_recall, run_detector
from stages.proposals import imdb_proposals, prepared_images, py2_compatible_pickle, read_image
from stages import settings
from stages.settings import load_imdb, proposal_dump_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_root = tmp_path_factory.mktemp("data")
    ensure_shapes_dataset(data_root / "shapes", num_trainval=6, num_test=5, n_jobs=1)
    voc = data_root / "shapes" / "VOC2007"
    config = load_config(ROOT / "configs" / "default.yml", overrides=[
        ("PIPELINE.DATA_ROOT", str(data_root)), ("PIPELINE.TRAIN_IMDB", f"vocfmt:{voc}:trainval"),
        ("PIPELINE.TEST_IMDB", f"vocfmt:{voc}:test"),
        ("PIPELINE.CLASSES", "['ellipse', 'rectangle', 'triangle', 'star', 'cross', 'ring']")])
    train, test = load_imdb(config, "PIPELINE.TRAIN_IMDB"), load_imdb(config, "PIPELINE.TEST_IMDB")
    model = FasterRCNN("tiny", train.num_classes, anchor_scales=tuple(config.get("PIPELINE.ANCHOR_SCALES")),
                       warn_random_init=False).eval()
    with torch.no_grad():  # spread the random init's scores so thresholds, NMS and top-N all bite
        model.rpn.rpn_cls_score.weight.mul_(300.0)
        model.roi_head.cls_score.weight.mul_(300.0)
        model.roi_head.bbox_pred.weight.mul_(30.0)
    return config, train, test, model


def test_prepared_images_are_the_sequential_blobs_in_order(setup):
    config, train, _, _ = setup
    image = settings.test_image_settings(config)
    indices = [3, 0, 5, 1, 1, 4]
    got = list(prepared_images(train, indices, image))
    assert len(got) == len(indices)
    for (data, scale, shape), i in zip(got, indices):
        im = read_image(train.image_path_at(i))
        want, want_scale = prep_image(im, **image)
        assert torch.equal(data, want) and scale == want_scale and tuple(shape) == im.shape[:2]
    assert list(prepared_images(train, [], image)) == []


class _Paths:
    def __init__(self, paths):
        self.paths = paths

    def image_path_at(self, i):
        return str(self.paths[i])


def test_prepared_images_raise_a_bad_image_in_its_turn(setup, tmp_path):
    config, train, _, _ = setup
    paths = [Path(train.image_path_at(i)) for i in range(4)]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(paths[2].read_bytes()[:200])  # truncated JPEG
    seen = []
    with pytest.raises(DataError, match="bad.jpg"):
        for data, _, _ in prepared_images(_Paths([paths[0], paths[1], bad, paths[3]]), range(4),
                                          settings.test_image_settings(config)):
            seen.append(data)
    assert len(seen) == 2


def _naive_proposals(model, imdb, config):
    """p1 as a plain loop: decode, prep, body + RPN, proposal layer with the FULL NMS, then the first 2000."""
    dump = proposal_dump_settings(config)
    assert dump["pre_nms_top_n"] <= 0 and dump["post_nms_top_n"] == 2000
    boxes_out, scores_out = [], []
    with torch.no_grad():
        for i in range(imdb.num_images):
            data, scale = prep_image(read_image(imdb.image_path_at(i)), **settings.test_image_settings(config))
            _, logits, deltas, anchors = model.rpn_forward(data)
            fg = torch.softmax(logits, dim=1)[:, 1]
            boxes = clip_boxes(bbox_transform_inv(anchors, deltas), (data.shape[2], data.shape[3]))
            min_px = float(dump["min_size"]) * scale
            keep = torch.nonzero((boxes[:, 2] - boxes[:, 0] + 1 >= min_px)
                                 & (boxes[:, 3] - boxes[:, 1] + 1 >= min_px)).flatten()
            order = argsort_desc(fg[keep])
            boxes, fg = boxes[keep][order].contiguous(), fg[keep][order].contiguous()
            kept = kernels.nms(boxes, fg, dump["nms_thresh"])[:dump["post_nms_top_n"]]
            boxes_out.append((boxes[kept].numpy() / np.float32(scale)).astype(np.float32))
            scores_out.append(fg[kept].numpy().astype(np.float32))
    return boxes_out, scores_out


def test_imdb_proposals_are_the_bytes_of_a_naive_loop_with_full_nms(setup):
    config, train, _, model = setup
    boxes, scores = imdb_proposals(model, train, config, progress=False)
    want_boxes, want_scores = _naive_proposals(model, train, config)
    assert max(len(b) for b in boxes) == 2000, "the post-NMS cap must bite for the early exit to be tested"
    assert py2_compatible_pickle(boxes) == py2_compatible_pickle(want_boxes)
    assert py2_compatible_pickle(scores) == py2_compatible_pickle(want_scores)


def test_eval_pass_matches_the_plain_detector_and_the_recall_pass(setup):
    config, _, test, model = setup
    proposals = []
    all_boxes = evaluation.test_net(model, test, config, label="t", proposals_out=proposals)
    plain = run_detector(lambda im: detect_image(model, im, config), test, config, progress=False)
    assert py2_compatible_pickle(all_boxes) == py2_compatible_pickle(plain)
    assert sum(len(d) for c in all_boxes[1:] for d in c) > 0, "some detections, so the comparison means something"
    assert len(proposals) == test.num_images and all(len(p) == 300 for p in proposals)
    assert proposals_recall(proposals, test) == evaluation.test_proposal_recall(model, test, config)
    assert py2_compatible_pickle(evaluation.test_net(model, test, config, label="t")) == py2_compatible_pickle(all_boxes)
