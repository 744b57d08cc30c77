"""Pictures of the pipeline's outputs: recall-vs-IoU, PR and loss curves (matplotlib Agg), boxes on images (cv2).

Charts are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, no display, no global
backend switch) at a fixed size, so a chart of ``size=(w, h)`` inches at ``dpi`` is exactly ``w*dpi x h*dpi``
pixels. Every file is written to a temporary name and renamed. Boxes are ``[x1, y1, x2, y2]`` inclusive pixels.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine.artifacts import atomic_write_bytes
from ..engine.errors import PipelineError
from .inspect import ProposalStats

__all__ = ["DPI", "CURVE_PANEL_NS", "LOSS_TERMS", "save_figure", "write_image", "plot_recall_vs_iou",
           "plot_pr_curves", "plot_losses", "draw_boxes", "draw_proposals", "draw_detections"]

DPI = 100
CURVE_PANEL_NS = (300, 1000, 2000)   # the paper's fig. 4 panels
LOSS_TERMS = {"rpn_cls": "RPN cls", "rpn_bbox": "RPN box", "cls": "Fast R-CNN cls", "bbox": "Fast R-CNN box"}
GT_COLOR = (0, 200, 0)            # BGR
PROPOSAL_COLOR = (255, 128, 0)
CLASS_COLORS = [(0, 0, 255), (255, 0, 0), (0, 160, 255), (200, 0, 200), (0, 200, 200), (128, 64, 255),
                (255, 160, 0), (40, 120, 40)]


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Render ``fig`` with the Agg canvas to PNG bytes and write them atomically to ``path``."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())


def write_image(path: str | os.PathLike, image_bgr: np.ndarray) -> None:
    """Encode a BGR image by the extension of ``path`` (.png, .jpg/.jpeg) and write it atomically."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        raise PipelineError(f"{os.fspath(path)}: pictures are written as .png or .jpg, not {ext or 'no extension'!r}")
    ok, data = cv2.imencode(ext, image_bgr)
    if not ok:
        raise PipelineError(f"{os.fspath(path)}: OpenCV could not encode the image")
    atomic_write_bytes(path, data.tobytes())


def plot_recall_vs_iou(stats: Sequence[ProposalStats], labels: Sequence[str], path: str | os.PathLike,
                       panel_ns: Sequence[int] | None = None, size: tuple[float, float] | None = None) -> list[int]:
    """Recall vs IoU (0.5..1), one panel per proposal count N, one line per pickle, as the paper's fig. 4.

    ``panel_ns`` defaults to those of 300, 1000, 2000 that every ``stats`` has (else all shared top N).
    Returns the panels' N. Default size: 4.2 inches wide per panel by 4 high.
    """
    shared = sorted(set.intersection(*(set(s.top_ns) for s in stats)))
    if not shared:
        raise PipelineError("the pickles share no top N to plot; pass the same --top values")
    if panel_ns is None:
        panel_ns = [n for n in CURVE_PANEL_NS if n in shared] or shared[-3:]
    panel_ns = [int(n) for n in panel_ns]
    fig = Figure(figsize=size or (4.2 * len(panel_ns), 4.0), dpi=DPI)
    axes = fig.subplots(1, len(panel_ns), squeeze=False)[0]
    for ax, n in zip(axes, panel_ns):
        for s, label in zip(stats, labels):
            ax.plot(s.curve_ious, s.curves[n], label=label, linewidth=1.6)
        ax.set(title=f"{n} proposals", xlabel="IoU", xlim=(0.5, 1.0), ylim=(0.0, 1.0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall")
    axes[-1].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return panel_ns


def plot_pr_curves(pr: Mapping[str, tuple[np.ndarray, np.ndarray, float]], path: str | os.PathLike,
                   title: str = "", size: tuple[float, float] = (6.4, 4.8)) -> None:
    """Precision vs recall per class; ``pr[cls] = (rec, prec, ap)`` as returned by ``voc_eval``."""
    fig = Figure(figsize=size, dpi=DPI)
    ax = fig.subplots()
    for cls, (rec, prec, ap) in pr.items():
        rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
        ax.plot(rec, prec, label=f"{cls} (AP {ap:.3f})", linewidth=1.4)
    mean_ap = float(np.mean([v[2] for v in pr.values()])) if pr else 0.0
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0.0, 1.0), ylim=(0.0, 1.02),
           title=f"{title}  mAP {mean_ap:.3f}".strip())
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[:window - 1]) / np.arange(1, window)
    return np.concatenate((head, np.convolve(values, kernel, mode="valid")))


def plot_losses(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike,
                smooth: int = 0, size: tuple[float, float] | None = None) -> None:
    """Loss curves, one panel per training step: its loss terms (RPN cls/box or Fast R-CNN cls/box) against the
    iteration on the left axis, the learning rate (dashed, log scale) on the right.

    Args:
        logs: {step: records of its log.jsonl} (``iter``, ``losses`` {term: value}, ``lr``), in panel order.
        smooth: moving-average window over logged iterations (0/1: raw values).
        size: figure inches (default: panels 5.2 x 3.4 inches, two per row).
    """
    if not logs:
        raise PipelineError("no training log to plot")
    cols = min(2, len(logs))
    rows = -(-len(logs) // cols)
    fig = Figure(figsize=size or (5.2 * cols, 3.4 * rows), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(logs):]:
        ax.set_visible(False)
    for ax, (step, records) in zip(axes, logs.items()):
        iters = np.array([r["iter"] for r in records], dtype=np.float64)
        terms = [t for t in LOSS_TERMS if any(t in r.get("losses", {}) for r in records)]
        for term in terms:
            values = np.array([r["losses"].get(term, np.nan) for r in records], dtype=np.float64)
            ax.plot(iters, _smooth(values, smooth), label=LOSS_TERMS[term], linewidth=1.2)
        ax.set(title=step, xlabel="iteration", ylabel="loss")
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(iters, [r["lr"] for r in records], "--", color="0.45", linewidth=1.0, label="lr",
                   drawstyle="steps-post")
        lr_ax.set_yscale("log")
        lr_ax.set_ylabel("lr")
        lines = ax.get_lines() + lr_ax.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=7, framealpha=0.8)
    fig.tight_layout()
    save_figure(fig, path)


def draw_boxes(image_bgr: np.ndarray, boxes: np.ndarray, color: tuple[int, int, int], thickness: int = 1,
               labels: Sequence[str] | None = None) -> np.ndarray:
    """Rectangles (N, 4) ``[x1, y1, x2, y2]`` drawn on a copy of ``image_bgr``, each with an optional label."""
    out = image_bgr.copy()
    for k, box in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4)):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, lineType=cv2.LINE_8)
        if labels is not None:
            _label(out, labels[k], x1, y1, color)
    return out


def _label(image: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> int:
    """White text on a filled box whose bottom-left is (x, y), moved down or left to stay inside; its width."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.4
    (w, h), base = cv2.getTextSize(text, font, scale, 1)
    x = max(0, min(x, image.shape[1] - w - 3))
    top = y - h - base - 2 if y - h - base - 2 >= 0 else y
    cv2.rectangle(image, (x, top), (x + w + 2, top + h + base + 2), color, -1)
    cv2.putText(image, text, (x + 1, top + h + 1), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return w + 2


def draw_proposals(image_bgr: np.ndarray, proposals: np.ndarray, gt_boxes: np.ndarray, top_n: int) -> np.ndarray:
    """The first ``top_n`` proposals (thin, orange) and the GT boxes (thick, green) over the image."""
    out = draw_boxes(image_bgr, np.asarray(proposals)[:top_n], PROPOSAL_COLOR, 1)
    out = draw_boxes(out, gt_boxes, GT_COLOR, 2)
    width = _label(out, "GT", 0, 0, GT_COLOR)
    _label(out, f"top {min(top_n, len(proposals))} proposals", width + 2, 0, PROPOSAL_COLOR)
    return out


def draw_detections(image_bgr: np.ndarray, detections: Sequence[np.ndarray], classes: Sequence[str],
                    thresh: float) -> np.ndarray:
    """Detections ``detections[cls]`` (N, 5) ``[x1, y1, x2, y2, score]`` scoring >= ``thresh``, each labelled
    '<class> <score>' in its class colour (entry 0, the background, is skipped)."""
    out = image_bgr.copy()
    for j in range(1, len(classes)):
        dets = np.asarray(detections[j]).reshape(-1, 5)
        dets = dets[dets[:, 4] >= thresh]
        color = CLASS_COLORS[(j - 1) % len(CLASS_COLORS)]
        out = draw_boxes(out, dets[:, :4], color, 2, [f"{classes[j]} {s:.2f}" for s in dets[:, 4]])
    return out


def training_logs(exp_dir: Path, steps: Sequence[str], all_steps: Sequence[str]) -> dict[str, list[dict]]:
    """{step: log.jsonl records} of `steps` (default: every one of `all_steps` that has a log)."""
    from ..engine.trainer import LOG_NAME, read_log

    logs = {}
    for step in steps or all_steps:
        records = read_log(Path(exp_dir) / step / LOG_NAME)
        if records:
            logs[step] = records
        elif steps:
            raise PipelineError(f"{Path(exp_dir) / step / LOG_NAME}: no training log (run `pipeline.py run "
                                f"--until {step}` first)")
    if not logs:
        raise PipelineError(f"{exp_dir}: no training step has a {LOG_NAME} yet")
    return logs
