"""COCO evaluation: the results JSON, hand-computed COCOeval numbers, and the relationship with the VOC evaluation
of the same detections on the shapes set.

The relationship relied on (roidb/coco_eval.py): with results written as ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]``,
COCO's continuous IoU (no +1) equals VOC's inclusive-pixel IoU (+1), so where the matching rules agree (no IoU at
exactly 0.5, no detection with IoU >= 0.5 against two GT boxes, no detection that a crowd/difficult box would make
one evaluator ignore and the other count) both produce the same precision/recall curve. COCO's AP50 is then that
curve's interpolated precision sampled at the 101 recalls 0, 0.01, ..., 1 and averaged, and VOC's area-under-
envelope AP (use_07_metric=False) is its integral; for a non-increasing envelope p on [0, 1] that gives
``100/101 * AP_voc <= AP50_coco <= (100 * AP_voc + p(0)) / 101``, so they differ by at most 1/101.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from kernels.boxes import bbox_overlaps
from roidb.coco import CocoImdb
from roidb.coco_eval import coco_results, evaluate_coco
from roidb.factory import get_imdb
from roidb.synthetic import SHAPE_CLASSES, ensure_shapes_coco, ensure_shapes_dataset, shapes_coco_paths


def write_set(tmp_path: Path, annotations: list, categories: list, size=(100, 100)) -> CocoImdb:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    cv2.imwrite(str(image_dir / "1.jpg"), np.zeros((size[1], size[0], 3), np.uint8))
    doc = {"images": [{"id": 1, "file_name": "1.jpg", "width": size[0], "height": size[1]}],
           "annotations": annotations, "categories": categories}
    (tmp_path / "gt.json").write_text(json.dumps(doc))
    return CocoImdb(tmp_path / "gt.json", image_dir, name="hand", cache_dir=tmp_path / "cache")


def ann(i: int, cat: int, x1: int, y1: int, x2: int, y2: int, crowd: int = 0) -> dict:
    w, h = x2 - x1 + 1, y2 - y1 + 1
    return {"id": i, "image_id": 1, "category_id": cat, "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": crowd}


def dets(*rows) -> np.ndarray:
    return np.array(rows, np.float32).reshape(-1, 5)


def test_hand_case_and_results_json(tmp_path):
    # classes: 'b' (id 5) then 'a' (id 2): COCOeval's class axis is sorted by id, ours follows the file.
    imdb = write_set(tmp_path, [ann(1, 5, 0, 0, 9, 9), ann(2, 5, 50, 50, 69, 69), ann(3, 2, 20, 20, 39, 39)],
                     [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}])
    assert imdb.classes == ("__background__", "b", "a")
    all_boxes = [[dets()], [dets([0, 0, 9, 9, 0.9], [80, 80, 89, 89, 0.8], [50, 50, 69, 69, 0.7])], [dets()]]
    imdb.competition_mode(True)
    out = tmp_path / "out"
    results = imdb.evaluate_detections(all_boxes, out)
    # TP, FP, TP of 2 GT: precision envelope 1 up to recall 0.5 (51 of the 101 points), 2/3 above (50 points)
    ap_b = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert results["aps"] == {"b": pytest.approx(ap_b, abs=1e-12), "a": 0.0}
    assert results["aps_coco"]["b"] == pytest.approx(ap_b, abs=1e-12)  # the boxes are exact: the same at every IoU
    assert results["map"] == pytest.approx(ap_b / 2, abs=1e-12) == results["coco"]["AP50"]
    assert results["coco"]["AP"] == pytest.approx(ap_b / 2, abs=1e-12)
    assert results["coco"]["APl"] is None  # no GT above 96^2 pixels
    written = json.loads((out / "detections_hand_results.json").read_text())
    assert written == [{"image_id": 1, "category_id": 5, "bbox": [0, 0, 10, 10], "score": pytest.approx(0.9)},
                       {"image_id": 1, "category_id": 5, "bbox": [80, 80, 10, 10], "score": pytest.approx(0.8)},
                       {"image_id": 1, "category_id": 5, "bbox": [50, 50, 20, 20], "score": pytest.approx(0.7)}]
    pr = pickle.loads((out / "b_pr.pkl").read_bytes())
    assert len(pr["rec"]) == 101 and pr["prec"][:51] == pytest.approx([1.0] * 51) and pr["ap"] == pytest.approx(ap_b)
    assert "Average Precision" in (out / "coco_eval.txt").read_text()
    # VOC's area under the envelope of the same curve: 0.5 * 1 + 0.5 * 2/3, within 1/101 of COCO's
    assert abs(ap_b - (0.5 + 0.5 * 2 / 3)) <= 1 / 101


def test_salted_results_are_removed_unless_competition_mode(tmp_path):
    imdb = write_set(tmp_path, [ann(1, 1, 0, 0, 9, 9)], [{"id": 1, "name": "a"}])
    imdb.evaluate_detections([[dets()], [dets([0, 0, 9, 9, 0.5])]], tmp_path / "out")
    assert not list((tmp_path / "out").glob("detections_*.json"))


def test_no_detections_and_classes_without_gt(tmp_path):
    imdb = write_set(tmp_path, [ann(1, 1, 0, 0, 9, 9)], [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    results = imdb.evaluate_detections([[dets()], [dets()], [dets()]], tmp_path / "out")
    assert results["aps"] == {"a": 0.0, "b": None} and results["map"] == 0.0
    results = imdb.evaluate_detections([[dets()], [dets([0, 0, 9, 9, 0.5])], [dets([5, 5, 9, 9, 0.5])]],
                                       tmp_path / "out2")
    assert results["aps"] == {"a": pytest.approx(1.0), "b": None}
    assert results["map"] == pytest.approx(1.0)  # b is left out of the mean


def test_crowd_gt_ignores_detections_inside_it(tmp_path):
    imdb = write_set(tmp_path, [ann(1, 1, 0, 0, 9, 9), ann(2, 1, 40, 40, 79, 79, crowd=1)], [{"id": 1, "name": "a"}])
    # inside the crowd box (IoA 1, IoU 0.25): ignored, so the one TP gives AP 1
    results = imdb.evaluate_detections([[dets()], [dets([0, 0, 9, 9, 0.5], [50, 50, 69, 69, 0.9])]], tmp_path / "o")
    assert results["aps"]["a"] == pytest.approx(1.0)


def test_known_matching_difference_falls_through_to_the_next_gt(tmp_path):
    """A detection whose best GT is taken: VOC counts a false positive, COCO matches the next-best free GT."""
    imdb = write_set(tmp_path, [ann(1, 1, 0, 0, 19, 19), ann(2, 1, 0, 2, 19, 21)], [{"id": 1, "name": "a"}])
    all_boxes = [[dets()], [dets([0, 0, 19, 19, 0.9], [0, 0, 19, 20, 0.8])]]
    assert bbox_overlaps(np.array([[0, 0, 19, 20.]]), np.array([[0, 0, 19, 19], [0, 2, 19, 21.]])).tolist() == \
        [[pytest.approx(400 / 420), pytest.approx(380 / 440)]]
    assert imdb.evaluate_detections(all_boxes, tmp_path / "out")["aps"]["a"] == pytest.approx(1.0)  # TP, TP
    # VOC: TP, then FP (its best GT is taken): recall 0.5 at precision 1, so AP 0.5 -- see test_voc_eval


def test_coco_iou_of_plus_one_boxes_is_voc_iou():
    rng = np.random.default_rng(0)
    for integer in (True, False):
        a = rng.uniform(0, 80, (50, 2))
        b = rng.uniform(0, 80, (60, 2))
        a = np.hstack([a, a + rng.uniform(0, 40, (50, 2))])
        b = np.hstack([b, b + rng.uniform(0, 40, (60, 2))])
        if integer:
            a, b = np.round(a), np.round(b)
        xywh = lambda x: np.hstack([x[:, :2], x[:, 2:] - x[:, :2] + 1])  # noqa: E731
        np.testing.assert_allclose(coco_mask.iou(xywh(a), xywh(b), [0] * len(b)), bbox_overlaps(a, b), atol=1e-12)


def test_coco_results_records():
    all_boxes = [[dets(), dets()], [dets([1, 2, 3, 4, 0.5]), dets()], [dets(), dets([0, 0, 0, 0, 0.25])]]
    assert coco_results(all_boxes, [10, 20], [7, 3]) == [
        {"image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 3], "score": 0.5},
        {"image_id": 20, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.25}]


# ---------------------------------------------------------------------- COCO vs VOC on the shapes set
def _voc_101(rec: np.ndarray, prec: np.ndarray) -> float:
    """COCO's 101-point interpolated AP computed naively from a VOC precision/recall curve."""
    return float(np.mean([prec[rec >= r].max() if (rec >= r).any() else 0.0 for r in np.linspace(0, 1, 101)]))


def _iou_ioa(box: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iw = np.minimum(gt[:, 2], box[2]) - np.maximum(gt[:, 0], box[0]) + 1
    ih = np.minimum(gt[:, 3], box[3]) - np.maximum(gt[:, 1], box[1]) + 1
    inter = np.maximum(iw, 0) * np.maximum(ih, 0)
    area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
    gt_area = (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
    return inter / (area + gt_area - inter), inter / area


def _agree(box: np.ndarray, gt: np.ndarray, difficult: np.ndarray, eps: float = 1e-6) -> bool:
    """Whether both evaluators must judge a detection of ``box`` the same way (see the module docstring)."""
    if len(gt) == 0:
        return True
    iou, ioa = _iou_ioa(box, gt)
    if np.any(np.abs(iou - 0.5) < eps) or np.any(np.abs(ioa - 0.5) < eps):
        return False
    hits = np.flatnonzero(iou > 0.5)
    if len(hits) > 1:
        return False
    if len(hits) == 1 and difficult[hits[0]]:
        return True  # both ignore it (VOC: best GT difficult; COCO: crowd with IoA >= IoU > 0.5)
    return not np.any(difficult & (ioa > 0.5))  # else COCO would ignore it where VOC counts it


def _detections(imdb_voc, gt_all, rng) -> tuple[list, dict]:
    """Jittered copies of every GT box (difficult ones too), duplicates and random boxes, kept where the two
    evaluators agree; scores distinct on a 0.001 grid and coordinates on a 0.1 grid (the comp4 files' precision)."""
    K = imdb_voc.num_classes
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in range(imdb_voc.num_images)] for _ in range(K)]
    scores = iter(rng.permutation(np.arange(1, 1000)) / 1000.0)
    kinds = {"jitter": 0, "duplicate": 0, "random": 0, "near_difficult": 0, "dropped": 0}
    h_w = imdb_voc.image_sizes()
    for i, entry in enumerate(gt_all):
        height, width = h_w[i]
        candidates = []
        for box, cls in zip(entry["boxes"], entry["gt_classes"]):
            w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
            for copy in range(1 + int(rng.random() < 0.35)):
                if rng.random() < 0.85:
                    jitter = rng.uniform(-0.2, 0.2, 4) * [w, h, w, h]
                    candidates.append((cls, box + jitter, "duplicate" if copy else "jitter"))
        for _ in range(int(rng.integers(1, 4))):
            x1, y1 = rng.uniform(0, width - 20), rng.uniform(0, height - 20)
            size = rng.uniform(10, 80, 2)
            candidates.append((int(rng.integers(1, K)), np.array([x1, y1, x1 + size[0], y1 + size[1]]), "random"))
        per_class: dict[int, list] = {}
        for cls, box, kind in candidates:
            box = np.round(np.clip(box, 0, [width - 1, height - 1, width - 1, height - 1]), 1)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            same = entry["gt_classes"] == cls
            if not _agree(box, entry["boxes"][same].astype(np.float64), entry["difficult"][same]):
                kinds["dropped"] += 1
                continue
            iou = _iou_ioa(box, entry["boxes"][same].astype(np.float64))[0] if same.any() else np.zeros(0)
            kinds["near_difficult" if np.any(entry["difficult"][same] & (iou > 0.5)) else kind] += 1
            per_class.setdefault(cls, []).append([*box, next(scores)])
        for cls, rows in per_class.items():
            all_boxes[cls][i] = np.array(rows, np.float32)
    return all_boxes, kinds


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    ensure_shapes_dataset(root, num_trainval=2, num_test=40, n_jobs=1)
    ensure_shapes_coco(root)
    return root


def test_same_detections_same_ap50_through_both_evaluators(shapes, tmp_path):
    voc = get_imdb(f"vocfmt:{shapes / 'VOC2007'}:test", data_root=tmp_path, classes=SHAPE_CLASSES)
    annotations, images = shapes_coco_paths(shapes, "test")
    coco = get_imdb(f"cocofmt:{annotations}:{images}", data_root=tmp_path)
    assert not voc.use_07_metric and coco.classes == voc.classes
    with_difficult = get_imdb(f"vocfmt:{shapes / 'VOC2007'}:test", data_root=tmp_path, classes=SHAPE_CLASSES,
                              use_diff=True, cache_dir=tmp_path / "cache_diff")
    gt_all = [dict(e, difficult=(c["gt_overlaps"] < 0).all(axis=1))
              for e, c in zip(with_difficult.gt_roidb(), coco.gt_roidb())]
    all_boxes, kinds = _detections(voc, gt_all, np.random.default_rng(2015))
    assert all(kinds[k] > 0 for k in ("jitter", "duplicate", "random", "near_difficult")), kinds
    assert kinds["dropped"] < 0.1 * sum(kinds.values()), kinds
    voc.competition_mode(True)
    voc_results = voc.evaluate_detections(all_boxes, tmp_path / "voc")
    coco_results_ = coco.evaluate_detections(all_boxes, tmp_path / "coco")
    for cls in SHAPE_CLASSES:
        pr = pickle.loads((tmp_path / "voc" / f"{cls}_pr.pkl").read_bytes())
        ap_voc, ap_coco = voc_results["aps"][cls], coco_results_["aps"][cls]
        # the same curve: COCO's AP50 is exactly the 101-point resampling of VOC's precision/recall curve
        assert ap_coco == pytest.approx(_voc_101(pr["rec"], pr["prec"]), abs=1e-9), cls
        # and within the interpolation bound of VOC's area under the envelope
        assert 100 / 101 * ap_voc - 1e-9 <= ap_coco <= (100 * ap_voc + pr["prec"].max()) / 101 + 1e-9, cls
        assert 0.3 < ap_voc < 0.99, (cls, ap_voc)  # a curve with both hits and misses, not a trivial 0 or 1
    assert abs(coco_results_["map"] - voc_results["map"]) <= 1 / 101


def test_shapes_coco_copy_is_content_keyed(shapes):
    coco_dir = ensure_shapes_coco(shapes)
    manifest = json.loads((coco_dir / "manifest.json").read_text())
    stamp = (coco_dir / "instances_test.json").stat().st_mtime_ns
    assert ensure_shapes_coco(shapes) == coco_dir  # complete: reused
    assert (coco_dir / "instances_test.json").stat().st_mtime_ns == stamp
    (coco_dir / "instances_test.json").write_text("{}")  # damaged: rewritten
    ensure_shapes_coco(shapes)
    assert json.loads((coco_dir / "manifest.json").read_text()) == manifest
    assert len(json.loads((coco_dir / "instances_test.json").read_text())["images"]) == 40
    doc = json.loads((coco_dir / "instances_trainval.json").read_text())
    assert [im["file_name"] for im in doc["images"]] == ["000001.jpg", "000002.jpg"]
    assert [im["id"] for im in doc["images"]] == [1, 2]
    assert not list(coco_dir.glob("*.jpg"))  # no pixels of its own: the images are the VOC set's
