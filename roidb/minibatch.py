"""Training minibatch blobs from roidb entries: RPN batches (image + GT boxes) and Fast R-CNN batches (sampled RoIs).

The blob dict is the one in docs/architecture.md. All randomness (the scale choice and the fg/bg sampling) comes
from the NumPy ``Generator`` passed in, never from the global ``np.random``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from roidb.blob import im_list_to_blob, prep_im_for_blob
from roidb.imdb import decode_image

__all__ = ["get_minibatch", "sample_rois", "expand_bbox_targets", "load_image"]


def load_image(entry: dict) -> np.ndarray:
    """Read ``entry['image']`` as a BGR uint8 (H, W, 3) array, mirrored left-right when ``entry['flipped']``."""
    path = entry["image"]
    expected = (entry["height"], entry["width"]) if "height" in entry and "width" in entry else None
    im = decode_image(path, expected)
    if entry.get("flipped", False):
        im = im[:, ::-1, :]
    return im


def sample_rois(max_overlaps: np.ndarray, max_classes: np.ndarray, *, fg_thresh: float, bg_thresh_hi: float,
                bg_thresh_lo: float, rois_per_image: int, fg_rois_per_image: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The Fast R-CNN fg/bg RoI sampler (py-faster-rcnn's ``_sample_rois``).

    Foreground: RoIs with ``max_overlaps >= fg_thresh``; ``min(fg_rois_per_image, #fg)`` of them are drawn
    without replacement. Background: RoIs with ``bg_thresh_lo <= max_overlaps < bg_thresh_hi``; the rest of
    ``rois_per_image`` (or all of them when there are fewer) drawn without replacement; a row with overlap -1 (a
    COCO crowd box, or a proposal inside one) is never drawn. Nothing is padded, so
    fewer than ``rois_per_image`` RoIs come back when an image is short of candidates.

    Args:
        max_overlaps: float (N,) each RoI's best IoU with any GT box.
        max_classes: int (N,) the class of that GT box (0 when the overlap is 0).
        fg_thresh, bg_thresh_hi, bg_thresh_lo: TRAIN.FG_THRESH, TRAIN.BG_THRESH_HI, TRAIN.BG_THRESH_LO.
        rois_per_image: RoIs wanted from this image (TRAIN.BATCH_SIZE // IMS_PER_BATCH).
        fg_rois_per_image: foreground quota (round(TRAIN.FG_FRACTION * rois_per_image)).
        rng: the generator that draws the samples.
    Returns:
        (keep_inds, labels): int64 (R,) indices into the N RoIs, foreground first then background, and int64 (R,)
        their labels: ``max_classes`` for the foreground, 0 for the background.
    """
    max_overlaps = np.asarray(max_overlaps)
    max_classes = np.asarray(max_classes)
    if max_overlaps.shape != max_classes.shape or max_overlaps.ndim != 1:
        raise ValueError(f"sample_rois: max_overlaps {max_overlaps.shape} and max_classes {max_classes.shape} "
                         "must be matching 1-D arrays")
    fg_inds = np.flatnonzero(max_overlaps >= fg_thresh)
    num_fg = int(min(fg_rois_per_image, fg_inds.size))
    if num_fg < fg_inds.size:
        fg_inds = rng.choice(fg_inds, size=num_fg, replace=False)
    # Rows of -1 (COCO crowd boxes and the proposals inside them) are never background, whatever BG_THRESH_LO.
    bg_inds = np.flatnonzero((max_overlaps < bg_thresh_hi) & (max_overlaps >= bg_thresh_lo) & (max_overlaps >= 0))
    num_bg = int(max(0, min(rois_per_image - num_fg, bg_inds.size)))
    if num_bg < bg_inds.size:
        bg_inds = rng.choice(bg_inds, size=num_bg, replace=False)
    keep = np.concatenate([fg_inds, bg_inds]).astype(np.int64)
    labels = max_classes[keep].astype(np.int64)
    labels[num_fg:] = 0
    return keep, labels


def expand_bbox_targets(bbox_target_data: np.ndarray, num_classes: int,
                        bbox_inside_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Expand compact targets (R, 5) ``[cls, dx, dy, dw, dh]`` to (R, 4K) targets and inside weights.

    Row r gets its 4 deltas and ``bbox_inside_weights`` in columns ``4*cls .. 4*cls+3``; rows with cls 0 stay zero.
    """
    clss = bbox_target_data[:, 0].astype(np.int64)
    targets = np.zeros((clss.size, 4 * num_classes), dtype=np.float32)
    inside = np.zeros_like(targets)
    rows = np.flatnonzero(clss > 0)
    if rows.size and clss[rows].max() >= num_classes:
        raise ValueError(f"bbox target class {clss[rows].max()} is out of range for num_classes={num_classes}")
    cols = 4 * clss[rows, None] + np.arange(4)
    targets[rows[:, None], cols] = bbox_target_data[rows, 1:]
    inside[rows[:, None], cols] = np.asarray(bbox_inside_weights, dtype=np.float32)
    return targets, inside


def _image_blob(entries: Sequence[dict], rng: np.random.Generator, scales: Sequence[int], max_size: int,
                pixel_means: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Returns the blob, im_info (B, 3) (each image's own scaled ``[H, W, scale]``) and the exact scales."""
    scale_inds = rng.integers(0, len(scales), size=len(entries))
    ims, im_info = [], []
    for entry, s in zip(entries, scale_inds):
        im, im_scale = prep_im_for_blob(load_image(entry), pixel_means, scales[s], max_size)
        ims.append(im)
        im_info.append((im.shape[0], im.shape[1], im_scale))
    return im_list_to_blob(ims), np.array(im_info, dtype=np.float32).reshape(-1, 3), [t[2] for t in im_info]


def _rpn_blobs(entry: dict, im_blob: np.ndarray, im_scale: float) -> dict:
    gt_inds = np.flatnonzero(entry["gt_classes"] != 0)
    gt_boxes = np.empty((gt_inds.size, 5), dtype=np.float32)
    gt_boxes[:, :4] = entry["boxes"][gt_inds, :] * im_scale
    gt_boxes[:, 4] = entry["gt_classes"][gt_inds]
    im_info = np.array([[im_blob.shape[2], im_blob.shape[3], im_scale]], dtype=np.float32)
    return {"data": im_blob, "im_info": im_info, "gt_boxes": gt_boxes}


def get_minibatch(roidb_entries: Sequence[dict], num_classes: int, rng: np.random.Generator, *,
                  scales: Sequence[int], max_size: int, pixel_means, has_rpn: bool, batch_size: int = 128,
                  fg_fraction: float = 0.25, fg_thresh: float = 0.5, bg_thresh_hi: float = 0.5,
                  bg_thresh_lo: float = 0.1, bbox_reg: bool = True,
                  bbox_inside_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> dict:
    """Build one training minibatch (py-faster-rcnn's ``get_minibatch``).

    Each image is read with OpenCV (mirrored when the entry is flipped; its boxes already are), scaled to a
    random entry of ``scales`` (long side <= ``max_size``), and stacked into ``data`` (B, 3, H, W) float32 BGR minus
    ``pixel_means``, zero-padded.

    RPN batch (``has_rpn``, exactly one entry): ``data``, ``im_info`` (1, 3) ``[H, W, scale]`` and ``gt_boxes`` (G, 5)
    ``[x1, y1, x2, y2, cls]`` at blob scale from the rows with ``gt_classes != 0``.

    Fast R-CNN batch: ``batch_size // B`` RoIs per image drawn by :func:`sample_rois`; ``rois`` (R, 5)
    ``[batch_idx, x1, y1, x2, y2]`` at blob scale, ``labels`` int64 (R,), ``im_info`` (B, 3) with each image's own
    scaled ``[H, W, scale]``; with ``bbox_reg`` also ``bbox_targets``, ``bbox_inside_weights`` and
    ``bbox_outside_weights`` (R, 4K) from the entries' ``bbox_targets`` (see :func:`expand_bbox_targets`;
    outside = inside > 0). As in py-faster-rcnn the regression class comes from ``bbox_targets[:, 0]``, which
    is 0 for every background RoI whenever BBOX_THRESH >= BG_THRESH_HI (the defaults).
    """
    if len(roidb_entries) == 0:
        raise ValueError("get_minibatch needs at least one roidb entry")
    if not scales:
        raise ValueError("get_minibatch: scales (TRAIN.SCALES) is empty")
    if has_rpn and len(roidb_entries) != 1:
        raise ValueError(f"an RPN minibatch takes exactly 1 image (IMS_PER_BATCH), got {len(roidb_entries)}")
    im_blob, im_info, im_scales = _image_blob(roidb_entries, rng, scales, max_size, pixel_means)
    if has_rpn:
        return _rpn_blobs(roidb_entries[0], im_blob, im_scales[0])
    return _frcn_blobs(roidb_entries, num_classes, rng, im_blob, im_info, im_scales, batch_size=batch_size,
                       fg_fraction=fg_fraction, fg_thresh=fg_thresh, bg_thresh_hi=bg_thresh_hi,
                       bg_thresh_lo=bg_thresh_lo, bbox_reg=bbox_reg, bbox_inside_weights=bbox_inside_weights)


def _frcn_blobs(entries: Sequence[dict], num_classes: int, rng: np.random.Generator, im_blob: np.ndarray,
                im_info: np.ndarray, im_scales: list[float], *, batch_size: int, fg_fraction: float, fg_thresh: float,
                bg_thresh_hi: float, bg_thresh_lo: float, bbox_reg: bool,
                bbox_inside_weights: Sequence[float]) -> dict:
    n = len(entries)
    if batch_size % n != 0:
        raise ValueError(f"IMS_PER_BATCH ({n}) must divide TRAIN.BATCH_SIZE ({batch_size})")
    rois_per_image = batch_size // n
    fg_rois_per_image = int(np.round(fg_fraction * rois_per_image))
    rois, labels, targets, inside = [], [], [], []
    for i, entry in enumerate(entries):
        keep, lab = sample_rois(entry["max_overlaps"], entry["max_classes"], fg_thresh=fg_thresh,
                                bg_thresh_hi=bg_thresh_hi, bg_thresh_lo=bg_thresh_lo,
                                rois_per_image=rois_per_image, fg_rois_per_image=fg_rois_per_image, rng=rng)
        im_rois = entry["boxes"][keep] * im_scales[i]
        rois.append(np.hstack([np.full((keep.size, 1), i, np.float32), im_rois]))
        labels.append(lab)
        if bbox_reg:
            if "bbox_targets" not in entry:
                raise ValueError(f"roidb entry {entry.get('image', '?')} has no 'bbox_targets' "
                                 "(run add_bbox_regression_targets first, or pass bbox_reg=False)")
            t, w = expand_bbox_targets(entry["bbox_targets"][keep], num_classes, bbox_inside_weights)
            targets.append(t)
            inside.append(w)
    blobs = {"data": im_blob,
             "im_info": im_info,
             "rois": np.concatenate(rois).astype(np.float32).reshape(-1, 5),
             "labels": np.concatenate(labels).astype(np.int64)}
    if bbox_reg:
        blobs["bbox_targets"] = np.concatenate(targets).reshape(-1, 4 * num_classes)
        blobs["bbox_inside_weights"] = np.concatenate(inside).reshape(-1, 4 * num_classes)
        blobs["bbox_outside_weights"] = (blobs["bbox_inside_weights"] > 0).astype(np.float32)
    return blobs
