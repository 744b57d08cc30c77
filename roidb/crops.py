"""Object and background crops of synthetic shapes scenes: the classification task that pretrains the tiny body
(the ImageNet analog of the embedded demo, see ``stages/pretrain.py``).

The scenes come from :func:`roidb.synthetic.render_image` with a seed of their own (never the demo set's seed, so no
test image, and no training image, is ever seen): scene ``n`` is ``render_image(default_rng([seed, n]))``, rendered
in memory, never written. A crop is a square window resized to ``crop_size`` x ``crop_size``:

- an object crop (label 1..6, the index in :data:`roidb.synthetic.SHAPE_CLASSES` plus one) is centred on a
  non-difficult object's box (jittered by up to ``jitter`` of its size), with a side of ``context`` times the box's
  long side, ``context`` drawn uniformly from ``context_range``;
- a background crop (label 0) is a window of side ``bg_side_range`` pixels that covers at most ``bg_max_cover`` of
  any object's box area.

Windows reaching past the image border are padded with the image's mean colour. Half the crops are mirrored.
Blobs are py-faster-rcnn's: float32 (B, 3, S, S), BGR minus ``pixel_means``.
"""
from __future__ import annotations

from typing import Any, Sequence

import cv2
import numpy as np

from roidb.synthetic import SHAPE_CLASSES, render_image

__all__ = ["CropLoader", "render_scenes", "scene_boxes"]

_MAX_BACKGROUND_DRAWS = 10000


def render_scenes(seed: int, num_images: int, n_jobs: int = 2) -> list[tuple[np.ndarray, list[dict]]]:
    """Scenes 1..num_images of `seed`: (BGR uint8 (H, W, 3), objects as render_image gives them)."""
    numbers = list(range(1, num_images + 1))
    if n_jobs > 1 and num_images > 1:
        from joblib import Parallel, delayed
        chunks = [numbers[i::n_jobs] for i in range(n_jobs)]
        parts = Parallel(n_jobs=n_jobs)(delayed(_render_chunk)(seed, c) for c in chunks)
        # joblib keeps its worker processes for reuse; the caller trains for minutes next, and a worker surviving
        # a kill of this process would hold its stdout open
        from joblib.externals.loky import get_reusable_executor
        get_reusable_executor().shutdown(wait=True)
        by_number = {n: scene for part in parts for n, scene in part}
        return [by_number[n] for n in numbers]
    return [scene for _, scene in _render_chunk(seed, numbers)]


def _render_chunk(seed: int, numbers: Sequence[int]) -> list[tuple[int, tuple[np.ndarray, list[dict]]]]:
    cv2.setNumThreads(1)
    out = []
    for n in numbers:
        img, objects = render_image(np.random.default_rng([seed, n]))
        out.append((n, (img, [{"name": o["name"], "box": o["box"], "difficult": o["difficult"]} for o in objects])))
    return out


def scene_boxes(objects: Sequence[dict]) -> np.ndarray:
    """(K, 4) float64 [x1, y1, x2, y2] inclusive boxes of every object of a scene."""
    return np.array([o["box"] for o in objects], np.float64).reshape(-1, 4)


class CropLoader:
    """An endless loader of labelled crops for :func:`stages.engine.trainer.train_loop`.

    ``next(loader)`` -> (blob float32 (B, 3, S, S), labels int64 (B,)), ``round(fg_fraction * B)`` object crops
    then background crops. Deterministic for a given `seed`; ``state_dict``/``load_state_dict`` carry the NumPy
    generator, so a resumed run draws the same crops.
    """

    def __init__(self, scenes: Sequence[tuple[np.ndarray, list[dict]]], *, crop_size: int, batch_size: int,
                 fg_fraction: float, pixel_means: Sequence[float], seed: int,
                 context_range: tuple[float, float] = (1.1, 2.2), jitter: float = 0.15,
                 bg_side_range: tuple[int, int] = (24, 160), bg_max_cover: float = 0.2):
        self.scenes = list(scenes)
        self.crop_size, self.batch_size = int(crop_size), int(batch_size)
        self.num_fg = int(round(fg_fraction * batch_size))
        self.pixel_means = np.asarray(pixel_means, np.float32).reshape(1, 1, 3)
        self.context_range, self.jitter = context_range, jitter
        self.bg_side_range, self.bg_max_cover = bg_side_range, bg_max_cover
        self.rng = np.random.default_rng(seed)
        self.objects = [(i, k) for i, (_, objs) in enumerate(self.scenes) for k, o in enumerate(objs)
                        if not o["difficult"]]
        if not self.objects:
            raise ValueError("no non-difficult object in the pretraining scenes")
        self.boxes = [scene_boxes(objs) for _, objs in self.scenes]
        self.borders = [tuple(float(v) for v in img.reshape(-1, 3).mean(0)) for img, _ in self.scenes]
        self.class_index = {c: i + 1 for i, c in enumerate(SHAPE_CLASSES)}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        s = self.crop_size
        blob = np.empty((self.batch_size, s, s, 3), np.float32)
        labels = np.zeros(self.batch_size, np.int64)
        for b in range(self.batch_size):
            if b < self.num_fg:
                i, window, labels[b] = self._object_window()
            else:
                i, window = self._background_window()
            crop = _crop(self.scenes[i][0], window, s, self.borders[i])
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            blob[b] = crop
        blob -= self.pixel_means
        return np.ascontiguousarray(blob.transpose(0, 3, 1, 2)), labels

    def _object_window(self) -> tuple[int, np.ndarray, int]:
        i, k = self.objects[int(self.rng.integers(len(self.objects)))]
        obj = self.scenes[i][1][k]
        x1, y1, x2, y2 = (float(v) for v in obj["box"])
        w, h = x2 - x1 + 1, y2 - y1 + 1
        side = max(w, h) * self.rng.uniform(*self.context_range)
        cx = (x1 + x2) / 2 + self.rng.uniform(-self.jitter, self.jitter) * w
        cy = (y1 + y2) / 2 + self.rng.uniform(-self.jitter, self.jitter) * h
        window = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
        return i, window, self.class_index[obj["name"]]

    def _background_window(self) -> tuple[int, np.ndarray]:
        for _ in range(_MAX_BACKGROUND_DRAWS):
            i = int(self.rng.integers(len(self.scenes)))
            img = self.scenes[i][0]
            h, w = img.shape[:2]
            side = self.rng.uniform(*self.bg_side_range)
            x1, y1 = self.rng.uniform(0, max(w - side, 1)), self.rng.uniform(0, max(h - side, 1))
            window = np.array([x1, y1, x1 + side, y1 + side])
            boxes = self.boxes[i]
            if not len(boxes):
                return i, window
            ix = np.clip(np.minimum(window[2], boxes[:, 2] + 1) - np.maximum(window[0], boxes[:, 0]), 0, None)
            iy = np.clip(np.minimum(window[3], boxes[:, 3] + 1) - np.maximum(window[1], boxes[:, 1]), 0, None)
            area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
            if float((ix * iy / area).max()) <= self.bg_max_cover:
                return i, window
        raise ValueError(f"no background window covering at most {self.bg_max_cover} of every object in "
                         f"{_MAX_BACKGROUND_DRAWS} draws: the scenes are covered by objects")


def _crop(img: np.ndarray, window: np.ndarray, size: int, border: tuple[float, ...]) -> np.ndarray:
    """The square `window` [x1, y1, x2, y2) of `img` (continuous pixel coordinates) resized to size x size (float32,
    bilinear), padded with the colour `border` where it leaves the image."""
    x1, y1, x2, y2 = window
    scale = size / (x2 - x1)
    m = np.array([[scale, 0.0, -x1 * scale], [0.0, scale, -y1 * scale]], np.float64)
    out = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=border)
    return out.astype(np.float32)
