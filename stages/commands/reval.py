"""Evaluate any trained Fast R-CNN step on an imdb (stage4: the unified model; stage2: M1's RPN + M2), or re-score
saved detections (py-faster-rcnn's ``reval.py``).

Outputs, in the chosen folder (``output/<EXP_DIR>/eval_<step>_<imdb>/`` by default)::

    detections.pkl                      all_boxes[cls][image] float32 (N, 5) [x1, y1, x2, y2, score] (not by reval)
    results/comp4_det_<set>_<cls>.txt   VOC results files (1-based coordinates)
    results/<cls>_pr.pkl                {'rec', 'prec', 'ap'} per class
    aps.json                            {"aps": {cls: ap}, "map": m, "use_07_metric": bool, "step": ..., "imdb": ...}

On a COCO-format imdb the results files are COCO's (results/detections_<imdb>_results.json, coco_eval.txt) and
aps.json adds the COCOeval statistics (see stages.evaluation).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from nets import FasterRCNN, im_detect, prep_image
from roidb.errors import DataError
from roidb.factory import get_imdb
from roidb.imdb import Imdb
from roidb.safe_pickle import safe_load

from ..engine.artifacts import atomic_write_text
from ..engine.config import Config, data_root, experiment_dir
from ..engine.errors import PipelineError
from ..evaluation import _check_test_settings, aps_document, detect_image, run_detector, test_proposal_recall
from ..settings import load_stage_model, pixel_means
from ..proposals import write_pickle

__all__ = ["EVAL_STEPS", "default_step", "EvalResult", "eval_imdb", "resolve_device", "step_model_path", "default_out_dir",
           "unshared_detect_image", "step_detector", "run_detector", "evaluate_step", "load_detections", "reval",
           "read_pr"]

EVAL_STEPS = ("stage4", "stage2", "e2e")
DetectFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class EvalResult:
    """Per-class AP ({class: ap}), mAP, the metric used, the folder holding the files and the imdb's full results
    (for COCO: every COCOeval statistic)."""
    aps: dict[str, float]
    map: float
    use_07_metric: bool
    out_dir: Path
    results: dict | None = None


def eval_imdb(config: Config, name: str | None = None, use_07_metric: bool | None = None) -> Imdb:
    """The imdb ``name`` (default PIPELINE.TEST_IMDB) from PIPELINE.DATA_ROOT, optionally forcing the VOC07 metric."""
    classes = list(config.get("PIPELINE.CLASSES")) or None
    name = name or config.get("PIPELINE.TEST_IMDB")
    return get_imdb(name, data_root=data_root(config), classes=classes if name.startswith("vocfmt:") else None,
                    use_07_metric=use_07_metric)


def resolve_device(config: Config) -> torch.device:
    """PIPELINE.DEVICE with 'auto' resolved (CUDA when available)."""
    wanted = config.get("PIPELINE.DEVICE")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise PipelineError("PIPELINE.DEVICE is cuda but no CUDA device is available")
    return torch.device("cuda" if wanted == "auto" and torch.cuda.is_available() else
                        "cpu" if wanted == "auto" else wanted)


def step_model_path(config: Config, step: str) -> Path:
    """``output/<EXP_DIR>/<step>/model.pt``, or a one-line error saying which step to run first."""
    path = experiment_dir(config) / step / "model.pt"
    if not path.is_file():
        raise PipelineError(f"{path} not found: train it first with `pipeline.py run --until {step}`")
    return path


def default_out_dir(config: Config, step: str, imdb: Imdb) -> Path:
    return experiment_dir(config) / f"eval_{step}_{imdb.name}"


def unshared_detect_image(rpn_model: FasterRCNN, det_model: FasterRCNN, im: np.ndarray, config: Config
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The paper's unshared test: ``rpn_model`` (M1) proposes at the TEST.RPN_* settings on its own conv layers,
    ``det_model`` (M2) scores those boxes. Scores (R, K) and boxes (R, 4K) in original pixels."""
    t = config.TEST
    means = tuple(float(v) for v in pixel_means(config).ravel())
    data, scale = prep_image(im, scale=t.SCALES[0], max_size=t.MAX_SIZE, pixel_means=means)
    rois, _ = rpn_model.propose(data.to(rpn_model.device), [data.shape[2], data.shape[3], scale],
                                pre_nms_top_n=t.RPN_PRE_NMS_TOP_N, post_nms_top_n=t.RPN_POST_NMS_TOP_N,
                                nms_thresh=t.RPN_NMS_THRESH, min_size=t.RPN_MIN_SIZE)
    boxes = rois.float().cpu().numpy() / np.float32(scale)
    scores, pred = im_detect(det_model, im, scales=list(t.SCALES), max_size=t.MAX_SIZE, pixel_means=means,
                             boxes=boxes)
    if not t.BBOX_REG:
        pred = np.tile(boxes, (1, det_model.num_classes)).astype(np.float32)
    return scores, pred


def _score(all_boxes: list, imdb: Imdb, out_dir: Path, extra: dict) -> EvalResult:
    imdb.competition_mode(True)
    results = imdb.evaluate_detections(all_boxes, out_dir / "results")
    document = aps_document(imdb, results, {"imdb": imdb.name, **extra})
    atomic_write_text(out_dir / "aps.json", json.dumps(document, indent=1) + "\n")
    return EvalResult(aps=results["aps"], map=results["map"], use_07_metric=document["use_07_metric"],
                      out_dir=out_dir, results=results)


def default_step(config: Config) -> str:
    """The final model's step: stage4 (M4) in alt_opt, e2e in end2end."""
    return "e2e" if config.get("PIPELINE.MODE") == "end2end" else "stage4"


def step_detector(config: Config, step: str, classes: tuple[str, ...] | list[str]) -> DetectFn:
    """``detect(im) -> (scores (R, K), boxes (R, 4K))`` of ``step``: stage4 is M4 with its own RPN (the shared
    model); stage2 is M1's RPN feeding M2's detector (unshared); e2e is the end2end mode's joint model."""
    if step not in EVAL_STEPS:
        raise PipelineError(f"--step must be one of {', '.join(EVAL_STEPS)}, got {step!r}")
    _check_test_settings(config)
    device = resolve_device(config)
    det_model = load_stage_model(config, step_model_path(config, step), classes, device).eval()
    if step in ("stage4", "e2e"):
        return lambda im: detect_image(det_model, im, config)
    rpn_model = load_stage_model(config, step_model_path(config, "stage1"), classes, device).eval()
    return lambda im: unshared_detect_image(rpn_model, det_model, im, config)


def evaluate_step(config: Config, step: str, imdb: Imdb, out_dir: Path | None = None) -> EvalResult:
    """Detect on every image of ``imdb`` with :func:`step_detector`, write detections.pkl, comp4 files, PR pickles
    and aps.json to ``out_dir`` (default ``output/<EXP_DIR>/eval_<step>_<imdb>``)."""
    detect = step_detector(config, step, imdb.classes)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config, step, imdb)
    all_boxes = run_detector(detect, imdb, config, label=f"eval {step}")
    write_pickle(out_dir / "detections.pkl", all_boxes)
    # the RPN that proposed: M1's for the unshared detector, the step's own otherwise
    rpn = load_stage_model(config, step_model_path(config, "stage1" if step == "stage2" else step), imdb.classes,
                           resolve_device(config))
    recall = test_proposal_recall(rpn, imdb, config)
    return _score(all_boxes, imdb, out_dir, {"step": step, "proposal_recall": recall})


def load_detections(path: str | os.PathLike, imdb: Imdb) -> list[list[np.ndarray]]:
    """A detections.pkl (``all_boxes[cls][image]`` (N, 5)) checked against ``imdb``'s classes and images."""
    where = os.fspath(path)
    all_boxes = safe_load(where)
    if not isinstance(all_boxes, (list, tuple)) or len(all_boxes) != imdb.num_classes:
        count = len(all_boxes) if isinstance(all_boxes, (list, tuple)) else type(all_boxes).__name__
        raise DataError(where, f"detections pickle must hold {imdb.num_classes} class lists for {imdb.name}, "
                               f"got {count}")
    out = []
    for j, per_image in enumerate(all_boxes):
        if not isinstance(per_image, (list, tuple)) or (j > 0 and len(per_image) != imdb.num_images):
            n = len(per_image) if isinstance(per_image, (list, tuple)) else type(per_image).__name__
            raise DataError(where, f"class {j} ({imdb.classes[j]}): expected {imdb.num_images} images "
                                   f"({imdb.name}), got {n}")
        checked = []
        for i, dets in enumerate(per_image):
            dets = np.asarray(dets, dtype=np.float32) if len(dets) else np.zeros((0, 5), np.float32)
            if dets.ndim != 2 or dets.shape[1] != 5 or not np.isfinite(dets).all():
                raise DataError(where, f"class {j} ({imdb.classes[j]}), image {i}: detections must be finite "
                                       f"(N, 5) [x1, y1, x2, y2, score], got shape {dets.shape}")
            checked.append(dets)
        out.append(checked if j > 0 else [np.zeros((0, 5), np.float32)] * imdb.num_images)
    return out


def reval(detections_file: str | os.PathLike, imdb: Imdb, out_dir: Path | None = None) -> EvalResult:
    """Re-score a saved detections.pkl on ``imdb`` (default folder: ``<its folder>/reval_<imdb>``)."""
    all_boxes = load_detections(detections_file, imdb)
    out_dir = Path(out_dir) if out_dir is not None else Path(detections_file).parent / f"reval_{imdb.name}"
    return _score(all_boxes, imdb, out_dir, {"detections": os.fspath(detections_file)})


def read_pr(results_dir: Path, classes: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """{class: (rec, prec, ap)} from the ``<cls>_pr.pkl`` files written by the evaluation."""
    out = {}
    for cls in classes[1:]:
        pr = safe_load(results_dir / f"{cls}_pr.pkl")
        out[cls] = (np.asarray(pr["rec"]), np.asarray(pr["prec"]), float(pr["ap"]))
    return out
