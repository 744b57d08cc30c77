"""The tiny net overfits one synthetic image: RPN and Fast R-CNN losses each fall by >= 90% on the CPU."""
import warnings

import cv2
import numpy as np
import torch

from nets import FasterRCNN, param_groups, proposal_target_layer, set_trainable
from nets.backbones import PYFRCNN_PIXEL_MEANS

NUM_CLASSES = 4  # background, rectangle, circle, triangle


def synthetic_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy 240x320 BGR image with a filled rectangle, circle and triangle; GT (3, 5) [x1, y1, x2, y2, cls]."""
    rng = np.random.default_rng(seed)
    im = rng.integers(60, 120, size=(240, 320, 3)).astype(np.uint8)
    cv2.rectangle(im, (20, 30), (109, 129), (40, 200, 40), thickness=-1)
    cv2.circle(im, (180, 80), 45, (200, 40, 40), thickness=-1)
    tri = np.array([[230, 220], [310, 220], [270, 140]], np.int32)
    cv2.fillPoly(im, [tri], (40, 40, 220))
    gt = np.array([[20, 30, 109, 129, 1], [135, 35, 225, 125, 2], [230, 140, 310, 220, 3]], np.float32)
    return im, gt


def simple_sampler(max_overlaps, max_classes, *, fg_thresh, bg_thresh_hi, bg_thresh_lo, rois_per_image,
                   fg_rois_per_image, rng):
    """A minimal fg/bg sampler with roidb.minibatch.sample_rois' signature (fg first, then bg)."""
    fg = np.flatnonzero(max_overlaps >= fg_thresh)
    fg = rng.permutation(fg)[:fg_rois_per_image]
    bg = np.flatnonzero((max_overlaps < bg_thresh_hi) & (max_overlaps >= bg_thresh_lo))
    bg = rng.permutation(bg)[:rois_per_image - fg.size]
    keep = np.concatenate([fg, bg]).astype(np.int64)
    labels = np.asarray(max_classes)[keep].astype(np.int64)
    labels[fg.size:] = 0
    return keep, labels


def _blob(im: np.ndarray) -> np.ndarray:
    return (im.astype(np.float32) - np.array(PYFRCNN_PIXEL_MEANS, np.float32)).transpose(2, 0, 1)[None].copy()


def _proposals(gt: np.ndarray, rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """Jittered GT boxes and random boxes, (n, 5) with batch index 0."""
    centre = gt[rng.integers(0, len(gt), n // 2), :4] + rng.normal(0, 8, (n // 2, 4))
    xy = rng.uniform(0, 260, (n - n // 2, 2))
    rand = np.hstack([xy, xy + rng.uniform(20, 120, (n - n // 2, 2))])
    boxes = np.clip(np.vstack([centre, rand]), 0, [319, 239, 319, 239])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 4)
    return np.hstack([np.zeros((n, 1)), boxes]).astype(np.float32)


def _train(model, stage, loss_fn, steps, lr):
    set_trainable(model, stage)
    opt = torch.optim.SGD(param_groups(model, lr, 0.0005), momentum=0.9)
    history = []
    for _ in range(steps):
        losses = loss_fn()
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    return history


def _fell_by_90(history, k=5):
    return np.mean(history[-k:]) <= 0.1 * np.mean(history[:k])


def test_tiny_overfits_one_image():
    torch.manual_seed(0)
    im, gt = synthetic_image()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FasterRCNN("tiny", NUM_CLASSES, seed=3)
    data = _blob(im)
    im_info = np.array([[240, 320, 1.0]], np.float32)
    gen = torch.Generator().manual_seed(3)
    rpn_blobs = {"data": data, "im_info": im_info, "gt_boxes": gt}
    rpn_hist = _train(model, "stage1", lambda: model.rpn_losses(rpn_blobs, generator=gen), steps=40, lr=0.01)
    assert _fell_by_90(rpn_hist), (rpn_hist[:5], rpn_hist[-5:])

    rng = np.random.default_rng(3)
    proposals = torch.from_numpy(_proposals(gt, rng))
    stds = (0.1, 0.1, 0.2, 0.2)

    def frcn_loss():
        t = proposal_target_layer(proposals, torch.from_numpy(gt), NUM_CLASSES, simple_sampler, rng=rng,
                                  batch_size=64, bbox_normalize_stds=stds)
        return model.frcn_losses({"data": data, **t})

    frcn_hist = _train(model, "stage2", frcn_loss, steps=80, lr=0.02)
    assert _fell_by_90(frcn_hist), (frcn_hist[:5], frcn_hist[-5:])
