"""AP of an eval step's detections by GT box size: VOC07 11-point AP at IoU 0.5 per size band of sqrt(w * h) in
original pixels, the GT boxes outside the band (and the difficult ones) ignored as VOC ignores difficult boxes,
and the unmatched detections outside about the same band (0.8x its low edge to 1.25x its high edge) not counted as
false positives. A diagnostic for where AP is lost, not a benchmark metric.

    python3 bench/ap_by_size.py output/shapes_tiny_alt_opt data/shapes/VOC2007
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roidb.synthetic import SHAPE_CLASSES  # noqa: E402
from roidb.voc_eval import parse_rec, voc_ap  # noqa: E402

BANDS = ((0, 32), (32, 64), (64, float("inf")))


def _iou(box: np.ndarray, gt: np.ndarray) -> np.ndarray:
    ix = np.maximum(np.minimum(gt[:, 2], box[2]) - np.maximum(gt[:, 0], box[0]) + 1, 0)
    iy = np.maximum(np.minimum(gt[:, 3], box[3]) - np.maximum(gt[:, 1], box[1]) + 1, 0)
    inter = ix * iy
    union = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
             + (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1) - inter)
    return inter / union


def _side(b: np.ndarray) -> np.ndarray:
    return np.sqrt((b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1))


def band_ap(dets, ids, recs, cls_index: int, cls: str, lo: float, hi: float) -> float:
    gts = {}
    npos = 0
    for i in ids:
        objs = [r for r in recs[i] if r["name"] == cls]
        boxes = np.array([r["bbox"] for r in objs], float).reshape(-1, 4)
        side = _side(boxes)
        ignore = np.array([bool(r["difficult"]) for r in objs], bool) | (side < lo) | (side >= hi)
        npos += int((~ignore).sum())
        gts[i] = (boxes, ignore, np.zeros(len(objs), bool))
    found = sorted(((d[4], i, d[:4]) for k, i in enumerate(ids) for d in dets[cls_index][k]), key=lambda t: -t[0])
    tp, fp = [], []
    for _, i, box in found:
        boxes, ignore, used = gts[i]
        overlaps = _iou(box, boxes) if len(boxes) else np.zeros(0)
        j = int(overlaps.argmax()) if len(overlaps) else -1
        if j >= 0 and overlaps[j] > 0.5:
            if ignore[j]:
                continue
            tp.append(0 if used[j] else 1)
            fp.append(1 if used[j] else 0)
            used[j] = True
        elif lo * 0.8 <= _side(np.asarray(box)) < hi * 1.25:
            tp.append(0)
            fp.append(1)
    tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
    return voc_ap(tp_c / max(npos, 1), tp_c / np.maximum(tp_c + fp_c, 1e-9), use_07_metric=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="output/<EXP_DIR> holding eval/detections.pkl")
    parser.add_argument("voc_dir", help="the VOC2007 folder of the test imdb (Annotations, ImageSets/Main/test.txt)")
    opts = parser.parse_args()
    dets = pickle.load(open(Path(opts.experiment) / "eval" / "detections.pkl", "rb"))
    voc = Path(opts.voc_dir)
    ids = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()
    recs = {i: parse_rec(str(voc / "Annotations" / f"{i}.xml")) for i in ids}
    print("| GT size (px) | " + " | ".join(SHAPE_CLASSES) + " | mean |")
    print("|---|" + "---|" * (len(SHAPE_CLASSES) + 1))
    for lo, hi in BANDS:
        aps = [band_ap(dets, ids, recs, c, cls, lo, hi) for c, cls in enumerate(SHAPE_CLASSES, start=1)]
        label = f"{lo}-{hi:g}" if hi != float("inf") else f">= {lo}"
        print(f"| {label} | " + " | ".join(f"{a:.3f}" for a in aps) + f" | {np.mean(aps):.3f} |")


if __name__ == "__main__":
    main()
