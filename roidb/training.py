"""The training roidb: prepare entries (image path, size, max overlaps), bbox-regression targets, filtering.

py-faster-rcnn's ``lib/roi_data_layer/roidb.py`` and the roidb helpers of ``tools/train_net.py``, on dense
NumPy entries (docs/architecture.md). The imdb is duck-typed: anything with ``roidb``, ``num_images``,
``image_path_at(i)`` and ``append_flipped_images()`` works.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from kernels.boxes import bbox_overlaps, bbox_transform
from roidb.imdb import read_image_size

__all__ = ["prepare_roidb", "add_bbox_regression_targets", "compute_bbox_targets",
           "filter_roidb", "get_training_roidb", "combined_roidb"]

def _max_overlaps(entry: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    overlaps = entry["gt_overlaps"]
    overlaps = np.asarray(overlaps.toarray() if hasattr(overlaps, "toarray") else overlaps, dtype=np.float32)
    if overlaps.ndim != 2 or overlaps.shape[0] != len(entry["boxes"]):
        raise ValueError(f"{where}: gt_overlaps has shape {overlaps.shape}, expected ({len(entry['boxes'])}, K)")
    if overlaps.shape[0] == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    max_overlaps = overlaps.max(axis=1)
    max_classes = overlaps.argmax(axis=1).astype(np.int32)
    if np.any(max_classes[max_overlaps == 0] != 0) or np.any(max_classes[max_overlaps > 0] == 0):
        raise ValueError(f"{where}: gt_overlaps puts overlap on the background column")
    return max_classes, max_overlaps


def prepare_roidb(imdb_or_roidb: Any, image_paths: Sequence[str] | None = None,
                  sizes: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """Add ``image``, ``width``, ``height``, ``max_classes`` and ``max_overlaps`` to every roidb entry, in place.

    Args:
        imdb_or_roidb: an imdb (its ``roidb`` and ``image_path_at(i)`` are used) or a list of entries.
        image_paths: one path per entry; required for a plain list, defaults to ``imdb.image_path_at(i)``.
        sizes: one ``(width, height)`` per entry; when omitted they come from ``imdb.image_sizes()`` (the gt
            cache) or, for a plain list, from the image headers once per distinct path.
    Returns:
        The roidb list (the same dicts, updated).
    """
    if isinstance(imdb_or_roidb, list):
        roidb = imdb_or_roidb
        if image_paths is None:
            raise ValueError("prepare_roidb: a plain roidb list needs image_paths")
    else:
        roidb = imdb_or_roidb.roidb
        if sizes is None and hasattr(imdb_or_roidb, "image_sizes"):
            sizes = [(int(w), int(h)) for h, w in imdb_or_roidb.image_sizes()]
        if image_paths is None:
            image_paths = [imdb_or_roidb.image_path_at(i) for i in range(len(roidb))]
    if len(image_paths) != len(roidb) or (sizes is not None and len(sizes) != len(roidb)):
        raise ValueError(f"prepare_roidb: {len(roidb)} roidb entries but {len(image_paths)} image paths"
                         + ("" if sizes is None else f" and {len(sizes)} sizes"))
    known: dict[str, tuple[int, int]] = {}
    for i, (entry, path) in enumerate(zip(roidb, image_paths)):
        if sizes is not None:
            width, height = sizes[i]
        else:
            if str(path) not in known:
                known[str(path)] = read_image_size(path)
            height, width = known[str(path)]
        entry["image"] = str(path)
        entry["width"], entry["height"] = int(width), int(height)
        entry["max_classes"], entry["max_overlaps"] = _max_overlaps(entry, f"roidb entry {i} ({path})")
    return roidb


def compute_bbox_targets(rois: np.ndarray, max_overlaps: np.ndarray, max_classes: np.ndarray,
                         bbox_thresh: float) -> np.ndarray:
    """Compact regression targets for one image: float32 (N, 5) ``[label, dx, dy, dw, dh]``.

    Rows with ``max_overlaps >= bbox_thresh`` are regressed (``kernels.boxes.bbox_transform``) onto the GT box
    (the rows with overlap 1) they overlap most; other rows, and every row of an image without GT, are zero.
    """
    targets = np.zeros((rois.shape[0], 5), dtype=np.float32)
    gt_inds = np.flatnonzero(max_overlaps == 1)
    if gt_inds.size == 0:
        return targets
    ex_inds = np.flatnonzero(max_overlaps >= bbox_thresh)
    rois64 = np.asarray(rois, dtype=np.float64)
    ex_gt = bbox_overlaps(rois64[ex_inds], rois64[gt_inds])
    gt_rois = rois64[gt_inds[ex_gt.argmax(axis=1)]]
    targets[ex_inds, 0] = max_classes[ex_inds]
    targets[ex_inds, 1:] = bbox_transform(rois64[ex_inds], gt_rois)
    return targets


def _class_stats(roidb: Sequence[dict], num_classes: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    counts = np.zeros((num_classes, 1)) + eps
    sums = np.zeros((num_classes, 4))
    squared = np.zeros((num_classes, 4))
    for entry in roidb:
        targets = entry["bbox_targets"]
        cls = targets[:, 0].astype(np.int64)
        fg = cls > 0
        np.add.at(counts[:, 0], cls[fg], 1)
        np.add.at(sums, cls[fg], targets[fg, 1:].astype(np.float64))
        np.add.at(squared, cls[fg], targets[fg, 1:].astype(np.float64) ** 2)
    means = sums / counts
    stds = np.sqrt(np.maximum(squared / counts - means ** 2, 0.0))
    return means, stds


def add_bbox_regression_targets(roidb: Sequence[dict], num_classes: int, bbox_thresh: float = 0.5,
                                normalize_targets: bool = True, precomputed: bool = False,
                                means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                                stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                                eps: float = 1e-14) -> tuple[np.ndarray, np.ndarray]:
    """Add ``bbox_targets`` (N, 5) to every prepared entry and normalise them in place per class.

    Args:
        roidb: entries with ``boxes``, ``max_overlaps`` and ``max_classes`` (see :func:`prepare_roidb`).
        num_classes: K, background included.
        bbox_thresh: TRAIN.BBOX_THRESH.
        normalize_targets: TRAIN.BBOX_NORMALIZE_TARGETS: subtract the means and divide by the stds.
        precomputed: TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED: use ``means``/``stds`` (4 values, tiled to every
            class) instead of per-class statistics of the data.
        eps: cfg.EPS, added to the per-class counts as py-faster-rcnn does.
    Returns:
        (means, stds), float64 (4K,) each, class-major (``means[4*c:4*c+4]``). With data statistics the background
        slots are 0, as are those of classes without targets. A std of exactly 0 (one distinct target) is kept in
        the returned stds but the targets are divided by 1 there, so no NaN appears (py-faster-rcnn divided by 0).
    """
    for entry in roidb:
        entry["bbox_targets"] = compute_bbox_targets(entry["boxes"], entry["max_overlaps"],
                                                     entry["max_classes"], bbox_thresh)
    if precomputed:
        class_means = np.tile(np.asarray(means, dtype=np.float64), (num_classes, 1))
        class_stds = np.tile(np.asarray(stds, dtype=np.float64), (num_classes, 1))
    else:
        class_means, class_stds = _class_stats(roidb, num_classes, eps)
    if normalize_targets:
        divisor = np.where(class_stds > 0, class_stds, 1.0)
        for entry in roidb:
            targets = entry["bbox_targets"]
            cls = targets[:, 0].astype(np.int64)
            fg = np.flatnonzero(cls > 0)
            targets[fg, 1:] = (targets[fg, 1:] - class_means[cls[fg]]) / divisor[cls[fg]]
    return class_means.ravel(), class_stds.ravel()


def filter_roidb(roidb: Iterable[dict], fg_thresh: float = 0.5, bg_thresh_hi: float = 0.5,
                 bg_thresh_lo: float = 0.1) -> list[dict]:
    """Keep the entries with at least one foreground (>= fg_thresh) or background ([lo, hi)) RoI.

    Rows of -1 (COCO crowd boxes and the proposals inside them) count as neither.
    """
    def usable(entry: dict) -> bool:
        ov = entry["max_overlaps"]
        return bool(np.any(ov >= fg_thresh) or np.any((ov < bg_thresh_hi) & (ov >= bg_thresh_lo) & (ov >= 0)))
    return [entry for entry in roidb if usable(entry)]


def get_training_roidb(imdb: Any, use_flipped: bool = True) -> list[dict]:
    """The imdb's roidb ready for training: flipped copies appended when ``use_flipped``, then prepared."""
    if use_flipped:
        imdb.append_flipped_images()
    return prepare_roidb(imdb)


def combined_roidb(imdbs: Sequence[Any], use_flipped: bool = True) -> list[dict]:
    """One training roidb from several imdbs (``voc_2007_trainval+voc_2012_trainval``): each prepared, then joined."""
    if len(imdbs) == 0:
        raise ValueError("combined_roidb needs at least one imdb")
    roidb: list[dict] = []
    for imdb in imdbs:
        roidb.extend(get_training_roidb(imdb, use_flipped))
    return roidb
