"""Statistics of a proposal pickle against its imdb's GT: counts, score range, recall, average recall, curves.

Works on any pickle in py-faster-rcnn's format (a list with one float32 (N, 4) ``[x1, y1, x2, y2]`` array per image
of ``imdb.image_index``, original-image pixels, inclusive, best first), loaded through :mod:`roidb.safe_pickle`;
the RPN scores are read from a pickle beside it when there is one (see :func:`find_scores_file`).

Recall counts the imdb's GT boxes (difficult ones excluded, as in the gt roidb) whose best IoU with the first N
proposals of their image is >= the threshold (``kernels.boxes.bbox_overlaps``, +1 areas). Average recall is the mean
recall over IoU 0.5, 0.55, ..., 0.95; mean best overlap is the mean over GT boxes of that best IoU (0 for an image
without proposals). Pure NumPy.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from kernels.boxes import bbox_overlaps
from .. import write_guard  # noqa: F401  (roidb's writes stay inside the roots)
from roidb.errors import DataError
from roidb.imdb import Imdb, object_rows
from roidb.safe_pickle import safe_load

from ..engine.config import Config, experiment_dir
from ..engine.errors import PipelineError
from ..engine.progress import ProgressBar

__all__ = ["PROPOSAL_STEPS", "TOP_NS", "AR_IOUS", "CURVE_IOUS", "SCHEMA", "ProposalStats", "resolve_proposal_file",
           "find_scores_file", "load_scores",
           "check_boxes_in_images", "best_overlaps", "proposal_stats", "inspect_pickle", "stats_to_json",
           "validate_stats_json", "format_stats_table"]

TOP_NS = (50, 100, 300, 1000, 2000)
AR_IOUS = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))      # 0.5:0.05:0.95
CURVE_IOUS = tuple(round(0.5 + 0.025 * k, 3) for k in range(21))  # 0.5:0.025:1.0, the x axis of the paper's fig. 4
SCHEMA = "proposal-stats/1"
PROPOSAL_STEPS = ("p1", "p2")
BOUNDS_SLACK = 0.02  # a box may pass the image border by 2% of its side (+1 px): rounding of the test scale


@dataclass
class ProposalStats:
    """The figures of one proposal pickle; ``recall[iou][k]`` and the other lists follow ``top_ns``."""
    source: str
    scores_file: str | None
    imdb: str
    num_images: int
    num_gt: int
    per_image: dict[str, float]
    score_range: tuple[float, float] | None
    top_ns: list[int]
    recall: dict[str, list[float]]
    average_recall: list[float]
    mean_best_overlap: list[float]
    curve_ious: list[float] = field(default_factory=lambda: list(CURVE_IOUS))
    curves: dict[int, list[float]] = field(default_factory=dict)


def resolve_proposal_file(config: Config, target: str) -> tuple[Path, str]:
    """``p1``/``p2`` -> ``output/<EXP_DIR>/<step>/proposals.pkl`` (label the step); else ``target`` is a pickle path
    (label its file name)."""
    if target in PROPOSAL_STEPS:
        path = experiment_dir(config) / target / "proposals.pkl"
        if not path.is_file():
            raise PipelineError(f"{path} not found: make it with `pipeline.py run --until {target}`")
        return path, target
    path = Path(target)
    if not path.is_file():
        raise PipelineError(f"{target}: neither a proposal step ({', '.join(PROPOSAL_STEPS)}) nor a pickle file")
    return path, path.parent.name if path.name == "proposals.pkl" else path.name


def find_scores_file(proposal_file: str | os.PathLike) -> Path | None:
    """The scores pickle beside ``proposal_file``: ``scores.pkl`` next to a ``proposals.pkl`` (this pipeline's p1/p2),
    else ``<stem>_scores.pkl``; None when there is none (py-faster-rcnn's pickles carry no scores)."""
    path = Path(proposal_file)
    candidates = [path.with_name(f"{path.stem}_scores.pkl")]
    if path.name == "proposals.pkl":
        candidates.insert(0, path.with_name("scores.pkl"))
    return next((c for c in candidates if c.is_file()), None)


def load_scores(path: str | os.PathLike, boxes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """float32 (N_i,) scores per image from ``path``, checked row for row against ``boxes``."""
    where = os.fspath(path)
    scores = safe_load(where)
    if not isinstance(scores, (list, tuple)) or len(scores) != len(boxes):
        count = len(scores) if isinstance(scores, (list, tuple)) else type(scores).__name__
        raise DataError(where, f"scores pickle must hold {len(boxes)} arrays (one per image), got {count}")
    out = []
    for i, (s, b) in enumerate(zip(scores, boxes)):
        s = np.asarray(s)
        if s.dtype.kind not in "fiu" or s.reshape(-1).shape[0] != len(b) or s.ndim > 2:
            raise DataError(where, f"image {i}: {s.shape} scores for {len(b)} proposals")
        out.append(s.reshape(-1).astype(np.float32))
    return out


def check_boxes_in_images(boxes: Sequence[np.ndarray], sizes: np.ndarray, source: str,
                          image_index: Sequence[str]) -> None:
    """Refuse proposals that lie outside their image (a pickle made for another imdb); ``sizes`` is (n, 2) [H, W]."""
    for i, (b, (h, w)) in enumerate(zip(boxes, sizes)):
        if not len(b):
            continue
        limit_x, limit_y = (w - 1) + BOUNDS_SLACK * w + 1, (h - 1) + BOUNDS_SLACK * h + 1
        if b[:, :2].min() < -1 or b[:, 2].max() > limit_x or b[:, 3].max() > limit_y:
            raise DataError(source, f"image {i} ({image_index[i]}): proposals reach "
                                    f"({b[:, 2].max():.0f}, {b[:, 3].max():.0f}) but the image is {w}x{h} "
                                    f"(was this pickle made for another imdb?)")


def best_overlaps(boxes: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], top_ns: Sequence[int],
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """float64 (G, len(top_ns)): each GT box's best IoU with the first N proposals of its image, for each N.

    ``progress(k)`` is called as the k-th image (1-based) is taken up."""
    top_ns = [int(n) for n in top_ns]
    rows = []
    for i, (props, gt) in enumerate(zip(boxes, gt_boxes)):
        if progress is not None:
            progress(i + 1)
        if not len(gt):
            continue
        best = np.zeros((len(gt), len(top_ns)))
        if len(props):
            props = np.asarray(props[:max(top_ns)], np.float64)
            running = np.maximum.accumulate(bbox_overlaps(props, np.asarray(gt, np.float64)), axis=0)
            for k, n in enumerate(top_ns):
                best[:, k] = running[min(n, len(props)) - 1]
        rows.append(best)
    return np.concatenate(rows) if rows else np.zeros((0, len(top_ns)))


def _recall(best: np.ndarray, iou: float) -> np.ndarray:
    return (best >= iou).mean(axis=0) if len(best) else np.zeros(best.shape[1])


def proposal_stats(boxes: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], *, source: str, imdb_name: str,
                   scores: Sequence[np.ndarray] | None = None, scores_file: str | None = None,
                   top_ns: Sequence[int] = TOP_NS, progress: Callable[[int], None] | None = None) -> ProposalStats:
    """The figures of ``boxes`` (one (N_i, 4) array per image, best first) against ``gt_boxes`` ((G_i, 4) each)."""
    top_ns = sorted({int(n) for n in top_ns})
    if not top_ns or top_ns[0] < 1:
        raise PipelineError(f"--top values must be positive integers, got {top_ns}")
    best = best_overlaps(boxes, gt_boxes, top_ns, progress)
    counts = np.array([len(b) for b in boxes], dtype=np.int64)
    per_image = ({"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max()),
                  "mean": float(counts.mean())} if len(counts) else {"min": 0, "median": 0.0, "max": 0, "mean": 0.0})
    flat = np.concatenate([np.asarray(s, np.float32).reshape(-1) for s in scores]) if scores else np.zeros(0)
    return ProposalStats(
        source=source, scores_file=scores_file, imdb=imdb_name, num_images=len(boxes), num_gt=int(len(best)),
        per_image=per_image,
        score_range=(float(flat.min()), float(flat.max())) if flat.size else None,
        top_ns=top_ns,
        recall={f"{iou}": [float(r) for r in _recall(best, iou)] for iou in (0.5, 0.7)},
        average_recall=[float(v) for v in np.mean([_recall(best, t) for t in AR_IOUS], axis=0)],
        mean_best_overlap=[float(v) for v in (best.mean(axis=0) if len(best) else np.zeros(len(top_ns)))],
        curves={n: [float(_recall(best[:, [k]], t)[0]) for t in CURVE_IOUS] for k, n in enumerate(top_ns)})


def inspect_pickle(proposal_file: str | os.PathLike, imdb: Imdb, top_ns: Sequence[int] = TOP_NS,
                   label: str = "inspect") -> ProposalStats:
    """Load ``proposal_file`` (checked against ``imdb``: image count, (N, 4) arrays, boxes inside the images),
    its scores when beside it, and compute :func:`proposal_stats` with the imdb's non-difficult GT boxes (a
    progress bar named ``label`` on a TTY)."""
    path = os.fspath(proposal_file)
    boxes = imdb.load_proposals(path)
    check_boxes_in_images(boxes, imdb.image_sizes(), path, imdb.image_index)
    scores_path = find_scores_file(path)
    scores = load_scores(scores_path, boxes) if scores_path is not None else None
    gt = [e["boxes"][object_rows(e)] for e in imdb.gt_roidb()]
    bar = ProgressBar(len(boxes), label)
    stats = proposal_stats(boxes, gt, source=path, imdb_name=imdb.name, scores=scores,
                           scores_file=None if scores_path is None else str(scores_path), top_ns=top_ns,
                           progress=bar.update)
    bar.close()
    return stats


def stats_to_json(stats: ProposalStats) -> dict[str, Any]:
    """The JSON form (schema ``proposal-stats/1``, checked by :func:`validate_stats_json`)::

        {"schema": "proposal-stats/1", "source": str, "scores_file": str | null, "imdb": str,
         "num_images": int, "num_gt": int,
         "proposals_per_image": {"min": int, "median": float, "max": int, "mean": float},
         "score_range": {"min": float, "max": float} | null,
         "top_n": [{"n": int, "recall@0.5": float, "recall@0.7": float, "average_recall": float,
                    "mean_best_overlap": float}, ...],            # increasing n
         "recall_vs_iou": {"iou": [float, ...], "recall": {"<n>": [float, ...], ...}}}
    """
    rows = [{"n": n, "recall@0.5": stats.recall["0.5"][k], "recall@0.7": stats.recall["0.7"][k],
             "average_recall": stats.average_recall[k], "mean_best_overlap": stats.mean_best_overlap[k]}
            for k, n in enumerate(stats.top_ns)]
    return {"schema": SCHEMA, "source": stats.source, "scores_file": stats.scores_file, "imdb": stats.imdb,
            "num_images": stats.num_images, "num_gt": stats.num_gt, "proposals_per_image": dict(stats.per_image),
            "score_range": (None if stats.score_range is None
                            else {"min": stats.score_range[0], "max": stats.score_range[1]}),
            "top_n": rows,
            "recall_vs_iou": {"iou": list(stats.curve_ious), "recall": {str(n): c for n, c in stats.curves.items()}}}


def _require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise PipelineError(f"proposal-stats JSON: {where} {what}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_fraction(x: Any) -> bool:
    return _is_number(x) and 0.0 <= x <= 1.0


def validate_stats_json(obj: Any) -> None:
    """Raise ValueError naming the first key that breaks the ``proposal-stats/1`` schema (see :func:`stats_to_json`)."""
    _require(isinstance(obj, dict), "document", "must be an object")
    _require(obj.get("schema") == SCHEMA, "schema", f"must be {SCHEMA!r}")
    for key, kind in (("source", str), ("imdb", str), ("num_images", int), ("num_gt", int)):
        _require(isinstance(obj.get(key), kind) and not isinstance(obj.get(key), bool), key, f"must be {kind.__name__}")
    _require(obj.get("scores_file") is None or isinstance(obj["scores_file"], str), "scores_file", "must be str/null")
    ppi = obj.get("proposals_per_image")
    _require(isinstance(ppi, dict) and set(ppi) == {"min", "median", "max", "mean"}, "proposals_per_image",
             "must have min, median, max, mean")
    _require(all(_is_number(v) for v in ppi.values()) and ppi["min"] <= ppi["median"] <= ppi["max"],
             "proposals_per_image", "must be numbers with min <= median <= max")
    sr = obj.get("score_range")
    _require(sr is None or (isinstance(sr, dict) and set(sr) == {"min", "max"} and _is_number(sr["min"])
                            and _is_number(sr["max"]) and sr["min"] <= sr["max"]), "score_range",
             "must be null or {min, max} with min <= max")
    rows = obj.get("top_n")
    _require(isinstance(rows, list) and rows, "top_n", "must be a non-empty list")
    keys = {"n", "recall@0.5", "recall@0.7", "average_recall", "mean_best_overlap"}
    for k, row in enumerate(rows):
        _require(isinstance(row, dict) and set(row) == keys, f"top_n[{k}]", f"must have keys {sorted(keys)}")
        _require(isinstance(row["n"], int) and row["n"] > 0, f"top_n[{k}].n", "must be a positive int")
        _require(all(_is_fraction(row[c]) for c in keys - {"n"}), f"top_n[{k}]", "figures must lie in [0, 1]")
        _require(row["recall@0.7"] <= row["recall@0.5"], f"top_n[{k}]", "recall@0.7 must not exceed recall@0.5")
    _require([r["n"] for r in rows] == sorted({r["n"] for r in rows}), "top_n", "n must increase")
    curve = obj.get("recall_vs_iou")
    _require(isinstance(curve, dict) and isinstance(curve.get("iou"), list) and isinstance(curve.get("recall"), dict),
             "recall_vs_iou", "must have iou (list) and recall (object)")
    _require(set(curve["recall"]) == {str(r["n"]) for r in rows}, "recall_vs_iou.recall", "must have one curve per n")
    for n, values in curve["recall"].items():
        _require(isinstance(values, list) and len(values) == len(curve["iou"]) and all(map(_is_fraction, values)),
                 f"recall_vs_iou.recall[{n}]", "must hold one recall in [0, 1] per iou")


def format_stats_table(stats: ProposalStats) -> str:
    """The figures as aligned text: a header block, then one row per top N."""
    p = stats.per_image
    head = [("source", stats.source), ("imdb", stats.imdb),
            ("images", f"{stats.num_images} ({stats.num_gt} GT boxes, difficult excluded)"),
            ("proposals/image", f"min {p['min']}  median {p['median']:g}  max {p['max']}  mean {p['mean']:.1f}"),
            ("scores", "absent (no scores pickle beside it)" if stats.score_range is None
             else f"{stats.score_range[0]:.4f} .. {stats.score_range[1]:.4f}  ({stats.scores_file})")]
    width = max(len(k) for k, _ in head)
    lines = [f"{k.ljust(width)}  {v}" for k, v in head]
    header = ["top N", "recall@0.5", "recall@0.7", "AR@0.5:0.95", "mean best IoU"]
    rows = [[str(n), f"{stats.recall['0.5'][k]:.4f}", f"{stats.recall['0.7'][k]:.4f}",
             f"{stats.average_recall[k]:.4f}", f"{stats.mean_best_overlap[k]:.4f}"] for k, n in enumerate(stats.top_ns)]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines.append("")
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in [header, *rows]]
    return "\n".join(lines)


def draw_proposal_picture(imdb: Any, proposal_file: Path, image_id: str, top_n: int, target: str) -> None:
    """Draw image `image_id`'s top `top_n` proposals of `proposal_file` (thin) and its GT boxes (thick) to `target`."""
    from ..proposals import read_image
    from .plots import draw_proposals, write_image

    i = imdb.image_index.index(image_id)
    gt = imdb.gt_roidb()[i]
    picture = draw_proposals(read_image(imdb.image_path_at(i)), imdb.load_proposals(proposal_file)[i],
                             gt["boxes"][gt["gt_classes"] > 0], top_n)
    write_image(target, picture)
