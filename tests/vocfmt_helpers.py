"""A tiny hand-made VOC-format folder for the inspect / eval / plots tests (boxes chosen so IoUs are exact)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

IMAGE_H, IMAGE_W = 80, 100

# Objects per image: (name, [x1, y1, x2, y2] 0-based inclusive, difficult). The XML holds 1-based coordinates.
OBJECTS = {
    "im1": [("cat", [10, 10, 29, 29], 0), ("dog", [50, 20, 69, 39], 0), ("cat", [70, 50, 89, 69], 1)],
    "im2": [("cat", [0, 0, 39, 19], 0)],
}


def _xml(name: str, objects: Sequence[tuple[str, list[int], int]]) -> str:
    body = "".join(
        f"<object><name>{cls}</name><difficult>{diff}</difficult><bndbox><xmin>{b[0] + 1}</xmin>"
        f"<ymin>{b[1] + 1}</ymin><xmax>{b[2] + 1}</xmax><ymax>{b[3] + 1}</ymax></bndbox></object>"
        for cls, b, diff in objects)
    return (f"<annotation><filename>{name}.jpg</filename><size><width>{IMAGE_W}</width><height>{IMAGE_H}</height>"
            f"<depth>3</depth></size>{body}</annotation>")


def make_voc(root: Path, split: str = "test") -> Path:
    """Write JPEGImages/, Annotations/, ImageSets/Main/<split>.txt for OBJECTS under ``root``; returns ``root``."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, objects in OBJECTS.items():
        cv2.imwrite(str(root / "JPEGImages" / f"{name}.jpg"),
                    rng.integers(0, 255, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8))
        (root / "Annotations" / f"{name}.xml").write_text(_xml(name, objects))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(OBJECTS) + "\n")
    return root


# Proposals, best first, with their IoU against the non-difficult GT (20x20 boxes unless noted):
#   im1: [10,10,29,49] IoU(cat) 400/800 = 0.5; [50,20,69,34] IoU(dog) 300/400 = 0.75; [10,10,29,29] IoU(cat) 1.0
#   im2: [0,0,39,29] IoU(cat 40x20) 800/1200 = 2/3; [60,60,70,70] overlaps nothing
PROPOSALS = [np.array([[10, 10, 29, 49], [50, 20, 69, 34], [10, 10, 29, 29]], np.float32),
             np.array([[0, 0, 39, 29], [60, 60, 70, 70]], np.float32)]
SCORES = [np.array([0.9, 0.8, 0.7], np.float32), np.array([0.95, 0.1], np.float32)]
CLASSES = ["cat", "dog"]


def data_overrides(root: Path) -> list[tuple[str, str]]:
    """--set pairs pointing TRAIN_IMDB and TEST_IMDB at the hand-made folder under ``root`` (made once), for tests
    whose step bodies are toys but whose runner digests the data like any other."""
    voc = root / "voc"
    if not (voc / "ImageSets" / "Main" / "test.txt").is_file():
        make_voc(voc, "test")
        (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(OBJECTS) + "\n")
    return [("PIPELINE.DATA_ROOT", str(root)), ("PIPELINE.CLASSES", str(CLASSES)),
            ("PIPELINE.TRAIN_IMDB", f"vocfmt:{voc}:trainval"), ("PIPELINE.TEST_IMDB", f"vocfmt:{voc}:test")]
