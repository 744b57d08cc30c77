"""Image blob helpers: scale one image for the network and stack several into a zero-padded NCHW blob."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

__all__ = ["prep_im_for_blob", "im_list_to_blob", "blob_scale"]


def blob_scale(height: int, width: int, target_size: int, max_size: int) -> float:
    """py-faster-rcnn's scale rule: short side to ``target_size`` unless the long side would exceed ``max_size``.

    scale = target / short; if round(scale * long) > max_size then scale = max_size / long.
    """
    short, long_ = float(min(height, width)), float(max(height, width))
    scale = float(target_size) / short
    if np.round(scale * long_) > max_size:
        scale = float(max_size) / long_
    return scale


def prep_im_for_blob(im: np.ndarray, pixel_means: np.ndarray, target_size: int,
                     max_size: int) -> tuple[np.ndarray, float]:
    """Subtract the pixel means from a BGR image and rescale it as py-faster-rcnn does.

    Args:
        im: (H, W, 3) BGR image, any numeric dtype (uint8 from ``cv2.imread``). Not modified.
        pixel_means: broadcastable to (H, W, 3), BGR (py-faster-rcnn's PIXEL_MEANS, shape (1, 1, 3)).
        target_size: length of the short side after scaling (a TRAIN/TEST scale).
        max_size: the long side is at most this (MAX_SIZE).
    Returns:
        (im, scale): float32 (H', W', 3) mean-subtracted image resized with ``cv2.INTER_LINEAR`` by ``scale``
        (H' = round(H * scale), W' = round(W * scale)), and the scale.
    """
    if im.ndim != 3 or im.shape[2] != 3:
        raise ValueError(f"prep_im_for_blob needs an (H, W, 3) image, got shape {im.shape}")
    out = im.astype(np.float32)
    out -= np.asarray(pixel_means, dtype=np.float32)
    scale = blob_scale(im.shape[0], im.shape[1], target_size, max_size)
    out = cv2.resize(out, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return out, scale


def im_list_to_blob(ims: Sequence[np.ndarray]) -> np.ndarray:
    """Stack (H_i, W_i, 3) images into a float32 (B, 3, H, W) blob, H/W the largest, zero-padded right/bottom.

    Channels stay in the images' order (BGR).
    """
    if len(ims) == 0:
        raise ValueError("im_list_to_blob needs at least one image")
    max_h = max(im.shape[0] for im in ims)
    max_w = max(im.shape[1] for im in ims)
    blob = np.zeros((len(ims), 3, max_h, max_w), dtype=np.float32)
    for i, im in enumerate(ims):
        blob[i, :, : im.shape[0], : im.shape[1]] = im.transpose(2, 0, 1)
    return blob
