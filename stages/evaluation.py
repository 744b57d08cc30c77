"""The eval step: detect with the final model M4 on the test imdb and score it with the imdb's metric (VOC or COCO).

py-faster-rcnn's ``test_net``: ``im_detect`` per image (TEST.SCALES / MAX_SIZE, the RPN at TEST.RPN_PRE_NMS_TOP_N
-> TEST.RPN_POST_NMS_TOP_N, class-specific boxes when TEST.BBOX_REG), then per class j >= 1 scores >
PIPELINE.DET_THRESH (0.05), NMS at TEST.NMS, and at most PIPELINE.MAX_PER_IMAGE (100) detections per image.
Outputs in the step folder:

    detections.pkl                      all_boxes[cls][image] float32 (N, 5) [x1, y1, x2, y2, score], protocol 2
    results/comp4_det_<set>_<cls>.txt   VOC results files (1-based coordinates)
    results/<cls>_pr.pkl                recall, precision, AP per class
    aps.json                            {"aps": {cls: ap}, "map": m, "use_07_metric": bool, "proposal_recall": {...}}

It also measures the final model's RPN on the test images at the TEST settings (the RoIs detection scores): the
recall of the non-difficult GT at IoU 0.5 and 0.7 by the top 300 proposals, metrics ``recall@0.5_top300`` and
``recall@0.7_top300`` (aps.json's ``proposal_recall``), so alt_opt and end2end models compare on one footing.

Inference runs in float32 (PIPELINE.AMP applies to training). AP uses the VOC07 11-point metric for 2007-style sets (the imdb decides); metrics: mAP and AP_<cls>.

A COCO-format imdb is scored with pycocotools' COCOeval instead (roidb.coco_eval); its files are
``results/detections_<imdb>_results.json`` (COCO's results format), ``results/coco_eval.txt`` and
``results/<cls>_pr.pkl``, and its metrics: ``mAP`` = AP50 (the mean over classes of AP at IoU 0.5, what ``mAP``
means for VOC data too), ``AP`` (IoU .50:.05:.95), ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``AR1``,
``AR10``, ``AR100`` and ``AP_<cls>`` (AP at IoU 0.5); aps.json adds the per-class AP at IoU .50:.05:.95
(``aps_coco``) and every COCOeval statistic (``coco``).
"""
from __future__ import annotations

import json
from typing import Callable, Sequence

import numpy as np
import torch

from kernels.boxes import clip_boxes
from nets import FasterRCNN, detect_blob, im_detect_blob, postprocess_detections, prep_image
from roidb.imdb import Imdb

from .engine.artifacts import atomic_write_text
from .engine.config import Config
from .engine.distributed import SINGLE, DistContext, gather_in_order, shard
from .engine.errors import ConfigError
from .engine.lock import raise_if_interrupted
from .settings import (load_imdb, load_stage_model, postprocess_settings, test_image_settings,
                       test_rpn_settings)
from .engine.progress import ProgressBar
from .proposals import RECALL_TOP_N, prepared_images, proposal_recall, read_image, write_pickle
from .engine.runner import StepContext, StepResult

__all__ = ["detect_image", "detect_prepared", "run_detector", "test_net", "test_proposal_recall", "format_ap_table", "format_coco_table", "format_results",
           "is_coco", "metric_description", "proposals_recall", "results_metrics", "aps_document", "evaluate"]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def _check_test_settings(config: Config) -> None:
    if not config.get("TEST.HAS_RPN"):
        raise ConfigError("config key TEST.HAS_RPN must be True: eval takes its RoIs from M4's RPN "
                          "(the test imdb has no precomputed proposals)")
    if config.get("TEST.SVM"):
        raise ConfigError("config key TEST.SVM must be False: the detector scores with its softmax (no SVMs)")
    if len(config.get("TEST.SCALES")) != 1:
        raise ConfigError(f"config key TEST.SCALES must hold exactly one scale with the RPN, "
                          f"got {list(config.get('TEST.SCALES'))}")


def detect_image(model: FasterRCNN, im: np.ndarray, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """Scores float32 (R, K) and boxes float32 (R, 4K) in original pixels for one BGR image (im_detect).

    Without TEST.BBOX_REG the boxes are the RPN's RoIs, repeated for every class (py-faster-rcnn's tiling).
    """
    data, scale = prep_image(im, **test_image_settings(config))
    return detect_prepared(model, data, scale, im.shape[:2], config)


def detect_prepared(model: FasterRCNN, data: torch.Tensor, scale: float, im_shape: Sequence[int], config: Config,
                    proposals_out: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`detect_image` on a blob already made by nets.prep_image (`data`, `scale`) from an image of `im_shape`
    (H, W). With `proposals_out`, also appends the RPN's first RECALL_TOP_N RoIs in original pixels (float32
    (N, 4), what :func:`test_proposal_recall` scores), so eval needs no second RPN pass for the recall."""
    rpn = test_rpn_settings(config)
    if config.TEST.BBOX_REG:
        scores, boxes, rois = im_detect_blob(model, data, scale, im_shape, **rpn)
    else:
        model.eval()
        rois, probs, _ = detect_blob(model, data.to(model.device), [data.shape[2], data.shape[3], scale], **rpn)
        tiled = clip_boxes(rois.float() / scale, im_shape[:2]).repeat(1, model.num_classes)
        scores, boxes = probs.float().cpu().numpy(), tiled.cpu().numpy().astype(np.float32)
    if proposals_out is not None:
        proposals_out.append(rois[:RECALL_TOP_N].float().cpu().numpy() / np.float32(scale))
    return scores, boxes


@torch.no_grad()
def run_detector(detect: Callable[..., tuple[np.ndarray, np.ndarray]], imdb: Imdb, config: Config,
                 label: str = "eval", indices: Sequence[int] | None = None,
                 progress: bool | None = None, prepared: bool = False) -> list[list[np.ndarray]]:
    """all_boxes[cls][n]: float32 (N, 5) for the n-th image of `indices` (default: every image of `imdb`);
    entry 0, background, empty.

    ``detect(im_bgr) -> (scores (R, K), boxes (R, 4K))`` is filtered as py-faster-rcnn's test_net:
    PIPELINE.DET_THRESH, NMS at TEST.NMS, PIPELINE.MAX_PER_IMAGE over all classes. With `prepared`,
    ``detect(blob, scale, (H, W))`` takes the image as prepared at the TEST settings, one image ahead in a
    background thread (:func:`stages.proposals.prepared_images`).
    """
    indices = range(imdb.num_images) if indices is None else indices
    all_boxes: list[list[np.ndarray]] = [[] for _ in range(imdb.num_classes)]
    bar = ProgressBar(len(indices), label, enabled=progress)
    images = (prepared_images(imdb, indices, test_image_settings(config)) if prepared
              else ((read_image(imdb.image_path_at(i)),) for i in indices))
    for n, image in enumerate(images):
        raise_if_interrupted()
        scores, boxes = detect(*image)
        dets = postprocess_detections(scores, boxes, **postprocess_settings(config))
        for j in range(imdb.num_classes):
            all_boxes[j].append(dets[j].astype(np.float32))
        bar.update(n + 1)
    bar.close()
    return all_boxes


def test_net(model: FasterRCNN, imdb: Imdb, config: Config, label: str = "eval",
             dist: DistContext = SINGLE, proposals_out: list | None = None) -> list[list[np.ndarray]] | None:
    """all_boxes[cls][image] of `model` (its RPN proposing) over every image of `imdb`.

    Under torchrun each rank detects on its block of images and rank 0 gets all_boxes in image_index order (the
    other ranks get None). With `proposals_out`, rank 0 also gets there each image's first RECALL_TOP_N RPN
    proposals in original pixels, in image_index order (:func:`proposals_recall` scores them)."""
    model.eval()
    rois = None if proposals_out is None else []
    mine = run_detector(lambda data, scale, shape: detect_prepared(model, data, scale, shape, config, rois), imdb,
                        config, label, indices=shard(imdb.num_images, dist), progress=None if dist.is_main else False,
                        prepared=True)
    parts = dist.gather((mine, rois))
    if parts is None:
        return None
    if proposals_out is not None:
        proposals_out.extend(r for _, part in parts for r in part)
    return [[dets for part, _ in parts for dets in part[j]] for j in range(imdb.num_classes)]


def proposals_recall(boxes: Sequence[np.ndarray], imdb: Imdb) -> dict[str, float]:
    """{'recall@0.5_top300', 'recall@0.7_top300'} of per-image proposals `boxes` (original pixels, best first, in
    image_index order) against the imdb's non-difficult GT boxes."""
    from roidb.imdb import object_rows
    gt = [e["boxes"][object_rows(e)] for e in imdb.gt_roidb()]
    return {f"recall@{iou}_top{RECALL_TOP_N}": round(proposal_recall(boxes, gt, iou, RECALL_TOP_N), 6)
            for iou in (0.5, 0.7)}


@torch.no_grad()
def test_proposal_recall(model: FasterRCNN, imdb: Imdb, config: Config, dist: DistContext = SINGLE
                         ) -> dict[str, float] | None:
    """{'recall@0.5_top300', 'recall@0.7_top300'}: the fraction of the test imdb's non-difficult GT boxes that one
    of the model's first 300 RPN proposals (TEST.RPN_* settings, original pixels) overlaps with IoU >= 0.5 / 0.7.
    Under torchrun each rank proposes for its block of images; rank 0 gets the dict (the others None).
    The eval step gets the same numbers from its detection pass (test_net's `proposals_out`)."""
    model.eval()
    rpn, image = test_rpn_settings(config), test_image_settings(config)
    mine = []
    for i in shard(imdb.num_images, dist):
        raise_if_interrupted()
        data, scale = prep_image(read_image(imdb.image_path_at(i)), **image)
        boxes, _ = model.propose(data.to(model.device), [data.shape[2], data.shape[3], scale], **rpn)
        mine.append(boxes[:RECALL_TOP_N].float().cpu().numpy() / np.float32(scale))
    boxes = gather_in_order(mine, dist)
    return None if boxes is None else proposals_recall(boxes, imdb)


def format_ap_table(aps: dict[str, float], mean_ap: float) -> str:
    """Per-class AP and the mean, as aligned 'class  AP' lines."""
    width = max([len(c) for c in aps] + [len("mAP")])
    lines = [f"{'class'.ljust(width)}  AP"]
    lines += [f"{cls.ljust(width)}  {ap:.4f}" for cls, ap in aps.items()]
    lines.append(f"{'mAP'.ljust(width)}  {mean_ap:.4f}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_coco_table(results: dict) -> str:
    """Per-class AP (IoU .50:.05:.95) and AP50, then COCOeval's AP/AR statistics, as aligned lines."""
    aps, aps_coco, stats = results["aps"], results["aps_coco"], results["coco"]
    width = max([len(c) for c in aps] + [len("class")])
    lines = [f"{'class'.ljust(width)}  {'AP':<6}  AP50"]
    lines += [f"{cls.ljust(width)}  {_cell(aps_coco[cls]):<6}  {_cell(ap)}" for cls, ap in aps.items()]
    lines.append(f"{'mean'.ljust(width)}  {_cell(stats['AP']):<6}  {_cell(stats['AP50'])}")
    lines.append("  ".join(f"{k} {_cell(stats[k])}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    lines.append("  ".join(f"{k} {_cell(stats[k])}" for k in ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")))
    return "\n".join(lines)


def is_coco(results: dict) -> bool:
    """Whether ``results`` (of :meth:`Imdb.evaluate_detections`) came from COCOeval."""
    return results.get("metric") == "coco"


def metric_description(imdb: Imdb, results: dict, voc_area: str = "VOC area") -> str:
    """'VOC07 11-point AP at IoU 0.5', '<voc_area> AP at IoU 0.5' or the COCOeval description."""
    if is_coco(results):
        return "COCO bbox AP (pycocotools COCOeval: IoU .50:.05:.95, 101 recall points)"
    return f"{'VOC07 11-point' if getattr(imdb, 'use_07_metric', False) else voc_area} AP at IoU 0.5"


def format_results(results: dict) -> str:
    """The table :meth:`Imdb.evaluate_detections`'s results print as (VOC or COCO)."""
    return format_coco_table(results) if is_coco(results) else format_ap_table(results["aps"], results["map"])


def results_metrics(results: dict) -> dict:
    """Manifest metrics: mAP (AP at IoU 0.5, averaged over classes), COCO's statistics, AP_<cls> at IoU 0.5."""
    def rounded(values: dict) -> dict:
        return {k: round(v, 6) for k, v in values.items() if v is not None}
    metrics = rounded({"mAP": results["map"]})
    if is_coco(results):
        metrics.update(rounded({k: results["coco"][k] for k in COCO_METRICS}))
    metrics.update(rounded({f"AP_{c}": a for c, a in results["aps"].items()}))
    return metrics


def aps_document(imdb: Imdb, results: dict, extra: dict | None = None) -> dict:
    """What aps.json holds: per-class AP, mAP, the metric; for COCO also aps_coco and every COCOeval statistic."""
    doc = {"aps": results["aps"], "map": results["map"], "use_07_metric": bool(getattr(imdb, "use_07_metric", False))}
    if is_coco(results):
        doc.update({"metric": "coco", "aps_coco": results["aps_coco"], "coco": results["coco"]})
    return {**doc, **(extra or {})}


def evaluate(ctx: StepContext) -> StepResult:
    """Detect with the final model (its first upstream step's model.pt: M4 in alt_opt) on PIPELINE.TEST_IMDB;
    write detections, the imdb's results files (comp4 or COCO JSON), APs; metrics mAP and AP_<cls> (and
    COCOeval's statistics on COCO-format data)."""
    _check_test_settings(ctx.config)
    imdb = load_imdb(ctx.config, "PIPELINE.TEST_IMDB")
    model = load_stage_model(ctx.config, ctx.input_file(ctx.step.upstream[0], "model.pt"), imdb.classes, ctx.device)
    proposals: list[np.ndarray] = []
    all_boxes = test_net(model, imdb, ctx.config, label=ctx.step.id, dist=ctx.dist, proposals_out=proposals)
    if all_boxes is None:
        return StepResult(outputs=[])
    recall = proposals_recall(proposals, imdb)
    write_pickle(ctx.step_dir / "detections.pkl", all_boxes)
    imdb.competition_mode(True)
    results = imdb.evaluate_detections(all_boxes, ctx.step_dir / "results")
    atomic_write_text(ctx.step_dir / "aps.json",
                      json.dumps(aps_document(imdb, results, {"proposal_recall": recall}), indent=1) + "\n")
    ctx.log(f"{imdb.name}: {imdb.num_images} images, {metric_description(imdb, results)}")
    ctx.log("RPN recall of the top {0} test proposals: {1:.4f} @0.5, {2:.4f} @0.7".format(
        RECALL_TOP_N, recall[f"recall@0.5_top{RECALL_TOP_N}"], recall[f"recall@0.7_top{RECALL_TOP_N}"]))
    for line in format_results(results).splitlines():
        ctx.log(line)
    outputs = ["detections.pkl", "aps.json"] + sorted(
        str(p.relative_to(ctx.step_dir)) for p in (ctx.step_dir / "results").iterdir() if p.is_file())
    metrics = {**results_metrics(results), **recall, "num_images": imdb.num_images,
               "num_detections": int(sum(len(d) for c in all_boxes[1:] for d in c))}
    return StepResult(outputs=outputs, metrics=metrics)
