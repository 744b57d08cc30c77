"""Detections on plain image files (py-faster-rcnn's ``tools/demo.py``): boxes labelled with class name and score.

The model is stage4's ``model.pt`` (the shared model), or for stage2 M1's RPN feeding M2 (see
:func:`stages.commands.reval.step_detector`); class names come from the checkpoint, so no imdb is needed. Each image gets
``im_detect`` at the TEST settings, then per class NMS at TEST.NMS and the score threshold (``--thresh``,
py-faster-rcnn's CONF_THRESH 0.8), at most PIPELINE.MAX_PER_IMAGE boxes. Boxes are ``[x1, y1, x2, y2]`` inclusive
pixels of the original image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nets import postprocess_detections, read_checkpoint

from roidb.guard import regular_file

from ..engine.config import Config
from ..engine.errors import PipelineError
from .plots import draw_detections, write_image
from ..engine.progress import ProgressBar
from ..proposals import read_image
from .reval import step_detector, step_model_path

__all__ = ["DemoResult", "output_name", "demo", "format_detections"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


@dataclass
class DemoResult:
    """One image: where it came from and went, and its detections ``(class, score, [x1, y1, x2, y2])``."""
    image: str
    output: str
    detections: list[tuple[str, float, list[float]]]


def output_name(image_path: str | os.PathLike, out_dir: Path, ext: str | None = None) -> Path:
    """``<out_dir>/<stem>_det<ext>``: the input's extension when it is .png/.jpg/.jpeg, else .png."""
    src = Path(image_path)
    ext = ext or (src.suffix.lower() if src.suffix.lower() in IMAGE_EXTS else ".png")
    return out_dir / f"{src.stem}_det{ext}"


def demo(config: Config, images: Sequence[str | os.PathLike], out_dir: Path, *, step: str = "stage4",
         thresh: float = 0.8) -> list[DemoResult]:
    """Detect in each image file with ``step``'s model and write it with its labelled boxes to ``out_dir``."""
    if not 0.0 <= thresh <= 1.0:
        raise PipelineError(f"--thresh must lie in [0, 1], got {thresh}")
    for image in images:  # before the model loads: a FIFO would block the read, a device never ends
        regular_file(image, "image file")
    path = step_model_path(config, step)
    classes = list(read_checkpoint(path)["classes"])
    detect = step_detector(config, step, classes)
    names = [output_name(p, out_dir) for p in images]
    if len(set(names)) != len(names):
        raise PipelineError("two input images share a file name stem; their outputs would overwrite each other")
    results = []
    bar = ProgressBar(len(images), "demo")
    for k, (image, name) in enumerate(zip(images, names)):
        im = read_image(os.fspath(image))
        scores, boxes = detect(im)
        dets = postprocess_detections(scores, boxes, thresh=thresh, nms_thresh=config.get("TEST.NMS"),
                                      max_per_image=config.get("PIPELINE.MAX_PER_IMAGE"))
        write_image(name, draw_detections(im, dets, classes, thresh))
        found = [(classes[j], float(d[4]), [float(v) for v in d[:4]]) for j in range(1, len(classes))
                 for d in dets[j] if d[4] >= thresh]
        results.append(DemoResult(os.fspath(image), os.fspath(name), sorted(found, key=lambda t: -t[1])))
        bar.update(k + 1)
    bar.close()
    return results


def format_detections(results: Sequence[DemoResult]) -> str:
    """An aligned table: image, class, score, box (x1 y1 x2 y2, 0-based pixels); '-' for an image with none."""
    header = ["image", "class", "score", "box"]
    rows = []
    for r in results:
        name = Path(r.image).name
        if not r.detections:
            rows.append([name, "-", "-", "-"])
        for cls, score, box in r.detections:
            rows.append([name, cls, f"{score:.3f}", " ".join(f"{v:.1f}" for v in box)])
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows])

