"""COCO detection evaluation with pycocotools' COCOeval (bbox), as py-faster-rcnn's ``coco.evaluate_detections``.

Detections ``all_boxes[cls][image]`` ((N, 5) ``[x1, y1, x2, y2, score]``, inclusive pixels) are written as COCO's
results JSON, one ``{"image_id", "category_id", "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "score"}`` per
detection, classes outer and images inner, then scored against the checked annotations (crowd and zero-area ones
included, as COCOeval sees the original file).

Metrics (COCOeval's ``stats``): AP (IoU .50:.05:.95), AP50, AP75, APs, APm, APl (area < 32², 32²..96², > 96²),
AR1, AR10, AR100, ARs, ARm, ARl; per class, AP and AP50 from ``eval['precision'][iou, :, k, area all, 100 dets]``
(mean over the 101 recall points and the IoUs; k is the class's position in COCOeval's *sorted* category ids). A
class without any (non-crowd) GT has no AP (None), and is left out of the means, as in COCOeval.

Two facts make COCO's AP50 comparable with the VOC evaluation of the same boxes: the results' ``w = x2 - x1 + 1``
turns COCO's continuous IoU (no +1) into exactly VOC's inclusive-pixel IoU (+1), and COCO's 101-point AP of a
precision/recall curve lies within 1/101 of the area under VOC's precision envelope (see
tests/test_coco_eval.py). The remaining differences are the matching rules: COCO matches IoU >= 0.5 (VOC > 0.5),
lets a detection fall through to the next-best unmatched GT (VOC's best GT, if taken, makes a false positive),
ignores detections on crowd boxes by intersection over the detection's area (VOC ignores difficult boxes by IoU),
and keeps 100 detections per image and class.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from roidb.guard import makedirs
from roidb.coco import CocoData
from roidb.errors import DataError
from roidb.imdb import atomic_write_bytes

__all__ = ["coco_results", "write_coco_results", "evaluate_coco", "COCO_STATS", "ap_from_precision"]

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_results(all_boxes: Sequence[Sequence[np.ndarray]], image_ids: Sequence[int],
                 category_ids: Sequence[int]) -> list[dict]:
    """COCO results records from ``all_boxes[cls][image]`` (class 0, the background, skipped).

    ``category_ids[k - 1]`` is class k's COCO id and ``image_ids[i]`` image i's COCO id.
    """
    if len(all_boxes) != len(category_ids) + 1:
        raise ValueError(f"all_boxes has {len(all_boxes)} classes, expected {len(category_ids) + 1}")
    results = []
    for cat_id, per_image in zip(category_ids, all_boxes[1:]):
        if len(per_image) != len(image_ids):
            raise ValueError(f"all_boxes for category {cat_id} has {len(per_image)} images, expected "
                             f"{len(image_ids)}")
        for image_id, dets in zip(image_ids, per_image):
            dets = np.asarray(dets, dtype=np.float64).reshape(-1, 5)
            for x1, y1, x2, y2, score in dets.tolist():
                results.append({"image_id": image_id, "category_id": cat_id,
                                "bbox": [x1, y1, x2 - x1 + 1.0, y2 - y1 + 1.0], "score": score})
    return results


def write_coco_results(all_boxes: Sequence[Sequence[np.ndarray]], image_ids: Sequence[int],
                       category_ids: Sequence[int], path: str | os.PathLike) -> list[dict]:
    """Write :func:`coco_results` as a JSON list to ``path`` (atomically); returns the records."""
    results = coco_results(all_boxes, image_ids, category_ids)
    atomic_write_bytes(path, json.dumps(results).encode())
    return results


def ap_from_precision(precision: np.ndarray) -> float | None:
    """COCOeval's mean over the entries > -1 of a precision slice; None when there are none (no GT)."""
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else None


def _run_cocoeval(gt: dict, results_file: Path, n_results: int):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if n_results:
            coco_dt = coco_gt.loadRes(str(results_file))
        else:  # loadRes cannot take an empty list; an empty result set scores 0 for every class with GT
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    return coco_eval, summary.getvalue()


def _class_file(output_dir: Path, cls: str) -> Path:
    path = output_dir / f"{cls}_pr.pkl"
    if path.resolve().parent != output_dir.resolve():
        raise DataError(cls, f"class name would write outside {output_dir}")
    return path


def evaluate_coco(all_boxes: Sequence[Sequence[np.ndarray]], data: CocoData, results_file: str | os.PathLike,
                  output_dir: str | os.PathLike) -> dict:
    """Write the results JSON to ``results_file``, score it with COCOeval (bbox) against ``data``.

    Also writes to ``output_dir``: ``coco_eval.txt`` (COCOeval's 12-line summary) and ``<class>_pr.pkl`` per class
    (``rec``: the 101 recall thresholds, ``prec``: the interpolated precision at IoU 0.5 (0 where the class has
    no GT), ``ap``: AP50 (0 without GT)), the files ``eval --pr-plot`` draws.

    Returns:
        ``{"metric": "coco", "map": AP50, "aps": {class: AP50}, "aps_coco": {class: AP at IoU .50:.95},
        "coco": {"AP": ..., "AP50": ..., ..., "ARl": ...}, "summary": COCOeval's summary text}``; a metric with
        nothing to average (no GT) is None.
    """
    output_dir = Path(output_dir)
    makedirs(output_dir)
    classes = [name for _, name in data.categories]
    cat_ids = [cid for cid, _ in data.categories]
    image_ids = [im.id for im in data.images]
    results = write_coco_results(all_boxes, image_ids, cat_ids, results_file)
    coco_eval, summary = _run_cocoeval(data.to_pycocotools(), Path(results_file), len(results))
    precision = coco_eval.eval["precision"]  # (T iou, R recall, K classes, A areas, M max dets)
    iou50 = int(np.flatnonzero(np.isclose(coco_eval.params.iouThrs, 0.5))[0])
    sorted_ids = list(coco_eval.params.catIds)
    aps, aps_coco = {}, {}
    for cls, cid in zip(classes, cat_ids):
        k = sorted_ids.index(cid)
        aps[cls] = ap_from_precision(precision[iou50, :, k, 0, 2])
        aps_coco[cls] = ap_from_precision(precision[:, :, k, 0, 2])
        curve = np.maximum(precision[iou50, :, k, 0, 2], 0.0)
        atomic_write_bytes(_class_file(output_dir, cls), pickle.dumps(
            {"rec": np.asarray(coco_eval.params.recThrs, dtype=np.float64), "prec": curve.astype(np.float64),
             "ap": float(aps[cls] or 0.0)}, protocol=2))
    stats = {k: (None if v < 0 else float(v)) for k, v in zip(COCO_STATS, coco_eval.stats)}
    atomic_write_bytes(output_dir / "coco_eval.txt", summary.encode())
    return {"metric": "coco", "map": stats["AP50"], "aps": aps, "aps_coco": aps_coco, "coco": stats,
            "summary": summary}
