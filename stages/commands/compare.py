"""`pipeline.py compare EXP_DIR...`: finished experiments side by side (alt_opt vs end2end, the paper's comparison).

Every number is read, never recomputed: mAP and per-class AP from ``eval/aps.json`` (what the experiment's eval
wrote), the RPN's recall of the test GT by its top 300 proposals from the same file (eval's ``proposal_recall``;
the eval manifest's metrics for an eval that predates it: then "-"), the wall time of every step from its
manifest, and the training speed (images per second) from the training steps' iterations, images per iteration
and loop seconds. An alt_opt experiment also gives the paper's unshared detector (M1's RPN proposes, M2 detects)
when ``pipeline.py eval --step stage2`` has written ``eval_stage2_<imdb>/aps.json``; its training time is
stage1 + p1 + stage2.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..engine.artifacts import read_manifest
from ..engine.config import read_yaml
from ..engine.errors import PipelineError
from ..engine.graph import GRAPHS

__all__ = ["Detector", "load_experiment", "compare", "format_comparison", "comparison_json", "plot_comparison"]

RECALL_KEYS = ("recall@0.5_top300", "recall@0.7_top300")
# Images per iteration of each training step when its manifest predates the images_per_iter metric
# (times PIPELINE.ITER_SIZE): RPN steps and e2e take one image, Fast R-CNN steps two.
_IMS_PER_BATCH = {"stage1": 1, "stage2": 2, "stage3": 1, "stage4": 2, "e2e": 1}
UNSHARED_STEPS = ("stage1", "p1", "stage2")


@dataclass
class Detector:
    """One column of the table: a finished experiment's final detector, or its unshared detector."""
    label: str
    exp_dir: str
    mode: str
    net: str
    detector: str
    map: float
    aps: dict[str, float]
    recall: dict[str, float | None]
    step_seconds: dict[str, float]
    train_seconds: float
    images_per_second: float | None
    results_dir: str
    extra: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise PipelineError(f"{path}: cannot read: {err}") from None
    if not isinstance(data, dict) or "aps" not in data or "map" not in data:
        raise PipelineError(f"{path}: not an eval aps.json (no 'aps' / 'map')")
    return data


def _speed(manifests: dict[str, dict], steps: Sequence[str], iter_size: int) -> float | None:
    """Training images per second over the training steps among `steps` (their loop seconds)."""
    images = seconds = 0.0
    for step in steps:
        metrics = manifests[step].get("metrics") or {}
        if "iters" not in metrics or "train_seconds" not in metrics:
            continue
        per_iter = metrics.get("images_per_iter", _IMS_PER_BATCH.get(step, 1) * iter_size)
        images += metrics["iters"] * per_iter
        seconds += metrics["train_seconds"]
    return round(images / seconds, 3) if seconds > 0 else None


def load_experiment(exp_dir: str | os.PathLike) -> tuple[list[Detector], str | None]:
    """The detectors of a finished experiment folder (output/<EXP_DIR>), or ([], why it is not finished).

    A folder without config.yml is bad input (PipelineError)."""
    exp = Path(exp_dir)
    if not (exp / "config.yml").is_file():
        raise PipelineError(f"{exp}: not an experiment folder (no config.yml; give output/<EXP_DIR>)")
    config = read_yaml(exp / "config.yml")
    pipeline = config.get("PIPELINE") or {}
    mode = pipeline.get("MODE", "alt_opt")
    if mode not in GRAPHS:
        raise PipelineError(f"{exp / 'config.yml'}: unknown PIPELINE.MODE {mode!r}")
    graph = GRAPHS[mode]
    manifests = {s: read_manifest(exp / s) or {} for s in graph.order}
    unfinished = [s for s in graph.order if manifests[s].get("status") != "done"]
    if unfinished:
        return [], f"{', '.join(unfinished)} not done (run `pipeline.py run` on it first)"
    net, iter_size = pipeline.get("NET", "?"), int(pipeline.get("ITER_SIZE", 1))
    seconds = {s: float((manifests[s].get("timings") or {}).get("seconds", 0.0)) for s in graph.order}
    trained = [s for s in graph.order if s != "eval"]
    aps = _read_json(exp / "eval" / "aps.json")
    eval_metrics = manifests["eval"].get("metrics") or {}
    recall = {k: (aps.get("proposal_recall") or {}).get(k, eval_metrics.get(k)) for k in RECALL_KEYS}
    final = "M4 (shared convs)" if mode == "alt_opt" else "joint model"
    detectors = [Detector(label=exp.name, exp_dir=str(exp), mode=mode, net=net, detector=final,
                          map=float(aps["map"]), aps={k: float(v) for k, v in aps["aps"].items()}, recall=recall,
                          step_seconds={s: round(seconds[s], 3) for s in graph.order},
                          train_seconds=round(sum(seconds[s] for s in trained), 3),
                          images_per_second=_speed(manifests, trained, iter_size),
                          results_dir=str(exp / "eval" / "results"))]
    unshared = _unshared_file(exp, pipeline.get("TEST_IMDB", "")) if mode == "alt_opt" else None
    if unshared is not None:
        doc = _read_json(unshared)
        detectors.append(Detector(
            label=f"{exp.name} unshared", exp_dir=str(exp), mode=mode, net=net, detector="M1 RPN + M2 (unshared)",
            map=float(doc["map"]), aps={k: float(v) for k, v in doc["aps"].items()},
            recall={k: (doc.get("proposal_recall") or {}).get(k) for k in RECALL_KEYS},
            step_seconds={s: round(seconds[s], 3) for s in UNSHARED_STEPS},
            train_seconds=round(sum(seconds[s] for s in UNSHARED_STEPS), 3),
            images_per_second=_speed(manifests, UNSHARED_STEPS, iter_size),
            results_dir=str(unshared.parent / "results")))
    return detectors, None


def _unshared_file(exp: Path, test_imdb: str) -> Path | None:
    """eval_stage2_<TEST_IMDB>/aps.json, else the only eval_stage2_*/aps.json, else None."""
    preferred = exp / f"eval_stage2_{test_imdb}" / "aps.json"
    if preferred.is_file():
        return preferred
    found = sorted(exp.glob("eval_stage2_*/aps.json"))
    return found[0] if len(found) == 1 else None


def compare(exp_dirs: Sequence[str | os.PathLike]) -> tuple[list[Detector], list[str]]:
    """(detectors of every finished experiment, notes on the others); PipelineError when none is finished."""
    detectors: list[Detector] = []
    notes: list[str] = []
    for exp in exp_dirs:
        found, why = load_experiment(exp)
        detectors.extend(found)
        if why:
            notes.append(f"{exp}: skipped, {why}")
        elif found[0].mode == "alt_opt" and len(found) == 1:
            notes.append(f"{exp}: no unshared detector yet (`pipeline.py eval --step stage2` with its config "
                         "writes eval_stage2_<imdb>/)")
    if not detectors:
        raise PipelineError("compare: no finished experiment among " + ", ".join(map(str, exp_dirs))
                            + ("; " + "; ".join(notes) if notes else ""))
    return detectors, notes


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_comparison(detectors: Sequence[Detector]) -> str:
    """The side-by-side table: one column per detector, one row per quantity."""
    classes: list[str] = []
    for d in detectors:
        classes += [c for c in d.aps if c not in classes]
    steps: list[str] = []
    for d in detectors:
        steps += [s for s in d.step_seconds if s not in steps]
    rows: list[list[str]] = [
        ["mode"] + [d.mode for d in detectors],
        ["net"] + [d.net for d in detectors],
        ["detector"] + [d.detector for d in detectors],
        ["mAP"] + [_cell(d.map) for d in detectors],
        *[[f"AP {c}"] + [_cell(d.aps.get(c)) for d in detectors] for c in classes],
        *[[f"RPN {k}"] + [_cell(d.recall.get(k)) for d in detectors] for k in RECALL_KEYS],
        *[[f"time {s} (s)"] + [_cell(d.step_seconds.get(s), 1) for d in detectors] for s in steps],
        ["train time total (s)"] + [_cell(d.train_seconds, 1) for d in detectors],
        ["train images/s"] + [_cell(d.images_per_second, 2) for d in detectors],
    ]
    header = [""] + [d.label for d in detectors]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def comparison_json(detectors: Sequence[Detector]) -> list[dict[str, Any]]:
    """The table as a list of plain dicts (one per detector), for --json."""
    return [{k: v for k, v in asdict(d).items() if k != "extra"} for d in detectors]


def plot_comparison(detectors: Sequence[Detector], path: str | os.PathLike) -> None:
    """Every detector's PR curves on one figure: one panel per class, one line per detector (its AP in the
    legend), read from the eval's results/<cls>_pr.pkl."""
    from matplotlib.figure import Figure

    from .plots import DPI, save_figure
    from .reval import read_pr

    classes: list[str] = []
    for d in detectors:
        classes += [c for c in d.aps if c not in classes]
    curves = []
    for d in detectors:
        try:
            curves.append(read_pr(Path(d.results_dir), ("__background__", *[c for c in classes if c in d.aps])))
        except (OSError, ValueError, KeyError) as err:
            raise PipelineError(f"{d.results_dir}: cannot read the PR curves: {err}") from None
    cols = min(3, max(1, len(classes)))
    rows = int(np.ceil(len(classes) / cols))
    fig = Figure(figsize=(4.0 * cols, 3.2 * rows), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, cls in zip(axes, classes):
        for d, pr in zip(detectors, curves):
            if cls in pr:
                rec, prec, ap = pr[cls]
                ax.plot(rec, prec, linewidth=1.3, label=f"{d.label} (AP {ap:.3f})")
        ax.set(title=cls, xlabel="Recall", ylabel="Precision", xlim=(0.0, 1.0), ylim=(0.0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    for ax in axes[len(classes):]:
        ax.set_visible(False)
    fig.suptitle("  ".join(f"{d.label}: mAP {d.map:.3f}" for d in detectors), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
