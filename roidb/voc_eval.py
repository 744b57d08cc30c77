"""PASCAL VOC detection evaluation (py-faster-rcnn's ``voc_eval``) and the comp4 results files it reads.

Boxes in the XML annotations and the results files are 1-based inclusive pixels, as in the VOC devkit; IoU uses
the +1 convention. Differences from py-faster-rcnn, all failure fixes: an empty detection file gives AP 0 instead
of an IndexError; a class without non-difficult GT gives recall 0 and AP 0 instead of NaN; the annotation cache is
keyed by a digest of the image-set file (plus the annotation path template and the annotation files' sizes and
mtimes) instead of a fixed ``annots.pkl`` that
goes stale, stored as JSON (nothing executable) and written atomically; bad files raise ``DataError`` (a
``ValueError``) naming them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Sequence

import numpy as np

from roidb.guard import makedirs
from roidb.xmlsafe import read_xml
from roidb.errors import DataError
from roidb.imdb import atomic_write_bytes

__all__ = ["parse_rec", "voc_ap", "voc_eval", "write_voc_results_files", "results_file_name"]


def _text(node, tag: str, filename: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise DataError(filename, f"{where} has no <{tag}>")
    return child.text.strip()


def parse_rec(filename: str) -> list[dict]:
    """The objects of one VOC XML annotation: ``name``, ``difficult`` (int, missing = 0) and ``bbox``.

    ``bbox`` is ``[xmin, ymin, xmax, ymax]`` as written in the file (1-based).
    """
    tree = read_xml(filename)
    objects = []
    for i, obj in enumerate(tree.findall("object")):
        where = f"object {i}"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(filename, f"{where} has no <bndbox>")
        diff = obj.find("difficult")
        try:
            bbox = [float(_text(bndbox, k, filename, where)) for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = int(diff.text) if diff is not None and diff.text and diff.text.strip() else 0
        except DataError:
            raise
        except ValueError:
            raise DataError(filename, f"{where} has a non-numeric coordinate or difficult flag") from None
        objects.append({"name": _text(obj, "name", filename, where), "difficult": difficult, "bbox": bbox})
    return objects


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """Average precision from a recall/precision curve.

    VOC07 (``use_07_metric``): the mean over t in ``np.arange(0., 1.1, 0.1)`` of the best precision at recall >= t
    (0 when no recall reaches t). Otherwise the area under the monotone (right-to-left max) precision envelope.
    """
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            reached = rec >= t
            ap += (np.max(prec[reached]) if reached.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _file_signature(path: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(path, "annotation file not found") from None
    return f"{st.st_size}:{st.st_mtime_ns};".encode()


def _valid_recs(recs: object, imagenames: list[str]) -> bool:
    """Whether a parsed-annotation cache has the shape parse_rec gives for every image: {id: [{"name": str,
    "difficult": int, "bbox": [4 numbers]}, ...]} (anything else is rebuilt, never trusted)."""
    if not isinstance(recs, dict):
        return False
    for name in imagenames:
        objects = recs.get(name)
        if not isinstance(objects, list):
            return False
        for obj in objects:
            if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                    and type(obj.get("difficult")) is int and isinstance(obj.get("bbox"), list)
                    and len(obj["bbox"]) == 4
                    and all(type(v) in (int, float) and math.isfinite(v) for v in obj["bbox"])):
                return False
    return True


def _load_annotations(annopath: str, imagesetfile: str, cachedir: str) -> tuple[list[str], dict]:
    try:
        with open(imagesetfile, "rb") as f:
            content = f.read()
    except OSError as e:
        raise DataError(imagesetfile, f"cannot read image-set file ({e.strerror})") from None
    imagenames = [x.strip() for x in content.decode("utf-8").splitlines() if x.strip()]
    key = hashlib.sha256(content + b"\0" + annopath.encode("utf-8"))
    for name in imagenames:
        key.update(_file_signature(annopath.format(name)))
    digest = key.hexdigest()[:20]
    makedirs(cachedir)
    cachefile = os.path.join(cachedir, f"annots_{digest}.json")
    if os.path.isfile(cachefile):
        try:
            with open(cachefile) as f:
                recs = json.load(f)
            if _valid_recs(recs, imagenames):
                return imagenames, recs
        except (OSError, ValueError, RecursionError):
            pass  # a torn or hand-edited cache is rebuilt from the XML files
    recs = {name: parse_rec(annopath.format(name)) for name in imagenames}
    atomic_write_bytes(cachefile, json.dumps(recs).encode())
    return imagenames, recs


def _read_detections(detfile: str, known: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    try:
        with open(detfile) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(detfile, f"cannot read detection file ({e.strerror})") from None
    image_ids, confidence, boxes = [], [], []
    for n, line in enumerate(lines, 1):
        parts = line.strip().split()
        if not parts:
            continue
        if len(parts) != 6:
            raise DataError(f"{detfile}:{n}", f"expected '<id> <score> <x1> <y1> <x2> <y2>', got {line!r}")
        if parts[0] not in known:
            raise DataError(f"{detfile}:{n}", f"image id {parts[0]!r} is not in the image set")
        try:
            values = [float(z) for z in parts[1:]]
        except ValueError:
            raise DataError(f"{detfile}:{n}", f"non-numeric score or coordinate in {line!r}") from None
        image_ids.append(parts[0])
        confidence.append(values[0])
        boxes.append(values[1:])
    return image_ids, np.array(confidence, dtype=np.float64), np.array(boxes, dtype=np.float64).reshape(-1, 4)


def _best_overlap(bb: np.ndarray, gt: np.ndarray) -> tuple[float, int]:
    if gt.size == 0:
        return -np.inf, -1
    iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
    inters = iw * ih
    uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
           + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inters)
    overlaps = inters / uni
    j = int(np.argmax(overlaps))
    return float(overlaps[j]), j


def voc_eval(detpath: str, annopath: str, imagesetfile: str, classname: str, cachedir: str,
             ovthresh: float = 0.5, use_07_metric: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Evaluate one class's detections against VOC annotations (py-faster-rcnn's signature and algorithm).

    Args:
        detpath: format string; ``detpath.format(classname)`` is the results file, one ``<id> <score> <x1> <y1>
            <x2> <y2>`` line per detection (1-based pixels).
        annopath: format string; ``annopath.format(image_id)`` is an image's XML annotation.
        imagesetfile: text file with one image id per line.
        classname: the class to evaluate, compared with the annotations' ``<name>`` after strip and lower-case
            (the imdb's parsing rule; py-faster-rcnn compared them as written, the same for VOC's lower-case names).
        cachedir: folder for the parsed-annotation cache.
        ovthresh: a detection matches a GT box when their IoU is strictly greater than this.
        use_07_metric: the VOC07 11-point AP instead of the area under the curve.
    Returns:
        (rec, prec, ap): float64 (D,) cumulative recall and precision over the D detections sorted by decreasing
        score, and the AP. A detection whose best-IoU GT is difficult counts as neither TP nor FP; a second
        detection of an already-matched GT is a FP.
    """
    imagenames, recs = _load_annotations(annopath, imagesetfile, cachedir)
    wanted = classname.strip().lower()
    class_recs, npos = {}, 0
    for name in imagenames:
        objs = [o for o in recs[name] if o["name"].strip().lower() == wanted]
        difficult = np.array([bool(o["difficult"]) for o in objs], dtype=bool)
        class_recs[name] = {"bbox": np.array([o["bbox"] for o in objs], dtype=np.float64).reshape(-1, 4),
                            "difficult": difficult, "det": np.zeros(len(objs), dtype=bool)}
        npos += int((~difficult).sum())
    image_ids, confidence, boxes = _read_detections(detpath.format(classname), class_recs)
    order = np.argsort(-confidence)
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, k in enumerate(order):
        rec = class_recs[image_ids[k]]
        ovmax, jmax = _best_overlap(boxes[k], rec["bbox"])
        if ovmax <= ovthresh:
            fp[d] = 1.0
        elif not rec["difficult"][jmax]:
            if rec["det"][jmax]:
                fp[d] = 1.0
            else:
                tp[d] = 1.0
                rec["det"][jmax] = True
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos) if npos > 0 else np.zeros_like(tp)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = voc_ap(rec, prec, use_07_metric) if len(order) and npos > 0 else 0.0
    return rec, prec, ap


def results_file_name(image_set: str, cls: str, salt: str = "") -> str:
    """``comp4[_salt]_det_<image_set>_<cls>.txt``, py-faster-rcnn's results-file name."""
    comp_id = "comp4" + (f"_{salt}" if salt else "")
    return f"{comp_id}_det_{image_set}_{cls}.txt"


def write_voc_results_files(all_boxes: Sequence[Sequence[np.ndarray]], image_index: Sequence[str],
                            classes: Sequence[str], output_dir: str, image_set: str,
                            salt: str = "") -> dict[str, str]:
    """Write one comp4 results file per foreground class (class 0, the background, is skipped).

    Args:
        all_boxes: ``all_boxes[cls][img]`` float (N, 5) ``[x1, y1, x2, y2, score]``, 0-based pixels (an empty list
            or a (0, 5) array for no detections).
        image_index: the image ids, in the order of ``all_boxes[cls]``.
        classes: class names, ``classes[0]`` the background.
        output_dir: where the files go (created if missing).
        image_set: the split name in the file name.
        salt: the competition-mode salt ('' for none).
    Returns:
        {class name: path}. Each line is ``'{:s} {:.3f} {:.1f} {:.1f} {:.1f} {:.1f}'`` (id, score, x1+1, y1+1,
        x2+1, y2+1); files are written to a temporary name and renamed.
    """
    if len(all_boxes) != len(classes):
        raise ValueError(f"all_boxes has {len(all_boxes)} classes but classes lists {len(classes)}")
    makedirs(output_dir)
    paths = {}
    for cls_ind, cls in enumerate(classes):
        if cls_ind == 0:
            continue
        if len(all_boxes[cls_ind]) != len(image_index):
            raise ValueError(f"all_boxes[{cls_ind}] ({cls}) has {len(all_boxes[cls_ind])} images, "
                             f"image_index has {len(image_index)}")
        lines = []
        for index, dets in zip(image_index, all_boxes[cls_ind]):
            dets = np.asarray(dets)
            dets = dets.reshape(-1, 5) if dets.dtype.kind == "f" else dets.astype(np.float64).reshape(-1, 5)
            # x + 1 in the array's own dtype, as py-faster-rcnn does, so the rounding to .1f is identical.
            coords = dets[:, :4] + dets.dtype.type(1)
            for (x1, y1, x2, y2), score in zip(coords, dets[:, 4]):
                lines.append("{:s} {:.3f} {:.1f} {:.1f} {:.1f} {:.1f}\n".format(index, score, x1, y1, x2, y2))
        path = os.path.join(output_dir, results_file_name(image_set, cls, salt))
        atomic_write_bytes(path, "".join(lines).encode())
        paths[cls] = path
    return paths
