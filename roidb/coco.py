"""COCO-format data as an imdb: py-faster-rcnn's ``datasets.coco`` for any instances JSON.

Used for the official splits (``coco_<year>_<split>``, see :mod:`roidb.factory`) and for any file
(``cocofmt:<annotations.json>:<image_dir>``). Semantics follow py-faster-rcnn's ``lib/datasets/coco.py``:

- classes: ``__background__`` then the JSON's category names in the order of its ``categories`` list
  (pycocotools' ``getCatIds()`` order); category ids map to these contiguous indices.
- images: in the order of the JSON's ``images`` list (``getImgIds()``); the image index holds ``str(id)``.
- boxes: ``[x, y, w, h]`` becomes inclusive ``[x1, y1, x2, y2]`` with ``x1 = max(0, x)``,
  ``x2 = min(W - 1, x1 + max(0, w - 1))`` (and the same for y); an annotation is kept only when its ``area``
  is > 0 and ``x2 >= x1`` and ``y2 >= y1``. Coordinates stay float32 (py-faster-rcnn floored them to uint16).
- crowd annotations (``iscrowd`` 1) stay in the roidb with their class in ``gt_classes`` and -1 at every class in
  ``gt_overlaps``: ``max_overlaps`` -1, so the Fast R-CNN sampler takes them neither as foreground nor as
  background; the RPN steps, which read ``gt_classes``, take them as GT boxes, as py-faster-rcnn's do.
- ``seg_areas`` is the annotation's ``area`` (``w * h`` when the JSON has none).
- :meth:`CocoImdb.rpn_roidb` marks proposals that lie inside a crowd box (intersection over the proposal's area
  > ``crowd_thresh``, 0.7) with overlap -1 too (py-faster-rcnn's ``_filter_crowd_proposals``).

The JSON is untrusted: its size is bounded, and anything that is not a COCO instances file raises a one-line
:class:`~roidb.errors.DataError` naming the file and the image, category or annotation id at fault.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from roidb.content import StatCache
from roidb.errors import DataError
from roidb.imdb import Imdb, file_digest_update, is_crowd, read_image_size

__all__ = ["CocoImdb", "coco", "CocoImage", "CocoAnnotation", "CocoData", "read_coco_json", "parse_coco",
           "coco_box_to_xyxy", "filter_crowd_proposals", "proposal_crowd_overlaps", "COCO_PARSER_VERSION",
           "DEFAULT_MAX_JSON_BYTES", "CROWD_THRESH"]

COCO_PARSER_VERSION = 1
DEFAULT_MAX_JSON_BYTES = 2 * 1024 ** 3  # instances_train2017.json is 448 MB
CROWD_THRESH = 0.7  # py-faster-rcnn's config['crowd_thresh']
_BAD_NAME_CHARS = ("/", "\\", "\0")


class CocoImage(NamedTuple):
    """One entry of ``images``: its id, ``file_name`` (relative to the image folder) and size in pixels."""
    id: int
    file_name: str
    width: int
    height: int


class CocoAnnotation(NamedTuple):
    """One entry of ``annotations``, checked: ``bbox`` is ``[x, y, w, h]`` with w, h >= 0."""
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    area: float
    iscrowd: int


class CocoData(NamedTuple):
    """A checked COCO instances file: categories ``[(id, name)]`` and images in file order, annotations per image."""
    categories: list[tuple[int, str]]
    images: list[CocoImage]
    annotations: dict[int, list[CocoAnnotation]]

    def to_pycocotools(self) -> dict:
        """The dataset dict pycocotools' ``COCO`` indexes (only the checked fields)."""
        anns = [{"id": a.id, "image_id": a.image_id, "category_id": a.category_id, "bbox": list(a.bbox),
                 "area": a.area, "iscrowd": a.iscrowd} for im in self.images for a in self.annotations[im.id]]
        return {"images": [im._asdict() for im in self.images],
                "categories": [{"id": i, "name": n} for i, n in self.categories], "annotations": anns}


# ---------------------------------------------------------------------- reading and checking
def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_coco_json(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_JSON_BYTES) -> tuple[Any, str]:
    """Parse the JSON file at ``path`` (at most ``max_bytes``): (the decoded document, sha256 hex of its bytes)."""
    where = os.fspath(path)
    try:
        size = os.stat(where).st_size
        if size > max_bytes:
            raise DataError(where, f"annotation file is {size} bytes, over the limit of {max_bytes}")
        with open(where, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise DataError(where, "annotation file not found") from None
    except IsADirectoryError:
        raise DataError(where, "is a folder, not a COCO annotation file") from None
    except OSError as exc:
        raise DataError(where, f"cannot read annotation file ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise DataError(where, f"annotation file grew over the limit of {max_bytes} bytes while being read")
    digest = hashlib.sha256(data).hexdigest()
    try:
        return json.loads(data, parse_constant=_reject_constant), digest
    except json.JSONDecodeError as exc:
        raise DataError(where, f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise DataError(where, "not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise DataError(where, "not valid JSON for COCO (nested too deeply)") from None
    except ValueError as exc:  # NaN / Infinity, refused by _reject_constant
        raise DataError(where, f"not valid JSON ({exc})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _list_field(doc: dict, key: str, where: str) -> list:
    value = doc.get(key)
    if not isinstance(value, list):
        found = "missing" if key not in doc else f"a {type(value).__name__}"
        raise DataError(where, f"not a COCO instances file: '{key}' must be a list ({found})")
    return value


def _record(item: Any, what: str, index: int, where: str) -> dict:
    if not isinstance(item, dict):
        raise DataError(where, f"{what}[{index}] is a {type(item).__name__}, not an object")
    if not _is_int(item.get("id")):
        raise DataError(where, f"{what}[{index}]: 'id' must be an integer, got {item.get('id')!r}")
    return item


def _categories(items: list, where: str) -> list[tuple[int, str]]:
    cats: list[tuple[int, str]] = []
    ids: set[int] = set()
    names: set[str] = set()
    for i, item in enumerate(items):
        cat = _record(item, "categories", i, where)
        cid, name = cat["id"], cat.get("name")
        if cid in ids:
            raise DataError(where, f"category id {cid} appears twice in 'categories'")
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise DataError(where, f"category id {cid}: 'name' must be a non-empty string without surrounding "
                                   f"blanks, got {name!r}")
        if any(c in name for c in _BAD_NAME_CHARS) or name in (".", "..", "__background__"):
            raise DataError(where, f"category id {cid}: name {name!r} cannot be a class name (no '/', '\\', "
                                   "NUL, '.', '..' or '__background__')")
        if name in names:
            raise DataError(where, f"category id {cid}: name {name!r} is used by two categories")
        ids.add(cid)
        names.add(name)
        cats.append((cid, name))
    if not cats:
        raise DataError(where, "'categories' is empty (a COCO instances file lists its classes there)")
    return cats


def _dimension(value: Any) -> int | None:
    if _is_number(value) and value == int(value) and value > 0:
        return int(value)
    return None


def _images(items: list, where: str) -> list[CocoImage]:
    images: list[CocoImage] = []
    seen: set[int] = set()
    for i, item in enumerate(items):
        im = _record(item, "images", i, where)
        iid = im["id"]
        if iid in seen:
            raise DataError(where, f"image id {iid} appears twice in 'images'")
        seen.add(iid)
        name = im.get("file_name")
        if not isinstance(name, str) or not name or "\0" in name:
            raise DataError(where, f"image id {iid}: 'file_name' must be a non-empty string, got {name!r}")
        width, height = _dimension(im.get("width")), _dimension(im.get("height"))
        if width is None or height is None:
            raise DataError(where, f"image id {iid}: 'width' and 'height' must be positive integers, got "
                                   f"{im.get('width')!r} x {im.get('height')!r}")
        images.append(CocoImage(iid, name, width, height))
    if not images:
        raise DataError(where, "'images' is empty (no image to train or test on)")
    return images


def _annotation(item: Any, index: int, where: str, image_ids: set[int], cat_ids: dict[int, str]) -> CocoAnnotation:
    ann = _record(item, "annotations", index, where)
    aid = ann["id"]
    who = f"annotation id {aid}"
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
        raise DataError(where, f"{who}: image_id {ann.get('image_id')!r} is not in 'images'")
    cid = ann.get("category_id")
    if not _is_int(cid) or cid not in cat_ids:
        known = ", ".join(str(c) for c in list(cat_ids)[:20]) + (", ..." if len(cat_ids) > 20 else "")
        raise DataError(where, f"{who}: unknown category_id {cid!r} (known: {known})")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DataError(where, f"{who}: 'bbox' must be [x, y, width, height], four finite numbers, got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise DataError(where, f"{who}: bbox {bbox} has a negative width or height")
    area = ann.get("area", float(bbox[2]) * float(bbox[3]))
    if not _is_number(area) or area < 0:
        raise DataError(where, f"{who}: 'area' must be a finite number >= 0, got {area!r}")
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):
        raise DataError(where, f"{who}: 'iscrowd' must be 0 or 1, got {crowd!r}")
    return CocoAnnotation(aid, ann["image_id"], cid, tuple(float(v) for v in bbox), float(area), int(crowd))


def parse_coco(doc: Any, path: str | os.PathLike) -> CocoData:
    """Check a decoded COCO instances document and index it (``path`` names the file in errors).

    Raises:
        DataError: not a COCO instances file (no ``images``/``annotations``/``categories`` lists), an id that is
            not an integer, an image id listed twice, an annotation id used twice, an annotation whose image or
            category id is unknown, a bbox that is not four finite numbers or has a negative width or height,
            a bad ``area``/``iscrowd``, a category name that cannot be a class name.
    """
    where = os.fspath(path)
    if not isinstance(doc, dict):
        raise DataError(where, f"not a COCO instances file (the top level is a {type(doc).__name__}, not an object)")
    raw_anns = _list_field(doc, "annotations", where)
    raw_images = _list_field(doc, "images", where)
    categories = _categories(_list_field(doc, "categories", where), where)
    images = _images(raw_images, where)
    image_ids = {im.id for im in images}
    cat_ids = dict(categories)
    per_image: dict[int, list[CocoAnnotation]] = {im.id: [] for im in images}
    seen: set[int] = set()
    for i, item in enumerate(raw_anns):
        ann = _annotation(item, i, where, image_ids, cat_ids)
        if ann.id in seen:
            raise DataError(where, f"annotation id {ann.id} appears twice in 'annotations'")
        seen.add(ann.id)
        per_image[ann.image_id].append(ann)
    return CocoData(categories, images, per_image)


# ---------------------------------------------------------------------- boxes
def coco_box_to_xyxy(bbox: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """py-faster-rcnn's conversion of a COCO ``[x, y, w, h]`` to an inclusive ``[x1, y1, x2, y2]`` in a W x H image.

    ``x1 = max(0, x)``, ``x2 = min(W - 1, x1 + max(0, w - 1))``; y likewise. A pixel-aligned box covering pixels
    a..b (``x = a``, ``w = b - a + 1``) comes back as exactly ``[a, b]``. The caller drops the box when
    ``x2 < x1`` or ``y2 < y1`` (it started right of or below the image).
    """
    x, y, w, h = (float(v) for v in bbox)
    x1, y1 = max(0.0, x), max(0.0, y)
    return x1, y1, min(width - 1.0, x1 + max(0.0, w - 1.0)), min(height - 1.0, y1 + max(0.0, h - 1.0))


def proposal_crowd_overlaps(proposals: np.ndarray, crowd_boxes: np.ndarray) -> np.ndarray:
    """float64 (N, C): the intersection of each proposal with each crowd box over the proposal's area.

    Inclusive pixels (+1 widths), which equals pycocotools' ``mask.iou(dt, gt, iscrowd=1)`` on the boxes written
    as ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]`` (py-faster-rcnn's ``xyxy_to_xywh``).
    """
    p = np.asarray(proposals, dtype=np.float64).reshape(-1, 4)
    c = np.asarray(crowd_boxes, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(p[:, None, 2], c[None, :, 2]) - np.maximum(p[:, None, 0], c[None, :, 0]) + 1.0
    ih = np.minimum(p[:, None, 3], c[None, :, 3]) - np.maximum(p[:, None, 1], c[None, :, 1]) + 1.0
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area = ((p[:, 2] - p[:, 0] + 1.0) * (p[:, 3] - p[:, 1] + 1.0))[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def filter_crowd_proposals(roidb: list[dict], crowd_thresh: float = CROWD_THRESH) -> list[dict]:
    """Set every class of a proposal row (``gt_classes`` 0) to -1 where it lies inside a crowd box: intersection
    over the proposal's area > ``crowd_thresh``. In place; returns ``roidb`` (py-faster-rcnn's
    ``_filter_crowd_proposals``)."""
    for entry in roidb:
        overlaps = entry["gt_overlaps"]
        crowd = np.flatnonzero((entry["gt_classes"] > 0) & is_crowd(entry))
        proposals = np.flatnonzero(entry["gt_classes"] == 0)
        if crowd.size == 0 or proposals.size == 0:
            continue
        ioa = proposal_crowd_overlaps(entry["boxes"][proposals], entry["boxes"][crowd])
        overlaps[proposals[ioa.max(axis=1) > crowd_thresh], :] = -1.0
    return roidb


# ---------------------------------------------------------------------- the imdb
class CocoImdb(Imdb):
    """A COCO instances JSON and its image folder as an imdb.

    Args:
        annotation_file: the instances JSON.
        image_dir: the folder its ``file_name`` entries are relative to.
        name: the imdb name (it also names the cache files).
        classes: when given, must equal the JSON's category names in order (a check, e.g. PIPELINE.CLASSES).
        cache_dir: the gt cache folder (default ``<repo>/data/cache``).
        max_json_bytes: refuse larger annotation files.
    """

    def __init__(self, annotation_file: str | os.PathLike, image_dir: str | os.PathLike, *, name: str,
                 classes: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
                 max_json_bytes: int = DEFAULT_MAX_JSON_BYTES, stat_cache: StatCache | None = None):
        self._annotation_file = Path(annotation_file).expanduser().resolve()
        self._image_dir = Path(image_dir).expanduser().resolve()
        doc, self._json_digest = read_coco_json(self._annotation_file, max_json_bytes)
        data = parse_coco(doc, self._annotation_file)
        del doc
        names = [n for _, n in data.categories]
        if classes is not None and [c for c in classes if c != "__background__"] != names:
            raise DataError(self._annotation_file, f"its categories {names} differ from the configured class list "
                                                   f"{list(classes)} (PIPELINE.CLASSES; leave it empty to use the "
                                                   "file's)")
        super().__init__(name, ("__background__", *names), cache_dir, stat_cache=stat_cache)
        if not self._image_dir.is_dir():
            raise DataError(self._image_dir, f"image folder not found (needed by {name})")
        self._category_ids = tuple(cid for cid, _ in data.categories)
        self._class_of = {cid: k for k, cid in enumerate(self._category_ids, start=1)}
        self._images = data.images
        self._annotations = data.annotations
        self._image_index = [str(im.id) for im in data.images]
        self._position = {idx: i for i, idx in enumerate(self._image_index)}
        self._image_sizes = np.array([[im.height, im.width] for im in data.images], dtype=np.int32).reshape(-1, 2)
        self._salt = str(uuid.uuid4())
        self.config.update({"cleanup": True, "use_salt": True, "crowd_thresh": CROWD_THRESH})

    # ------------------------------------------------------------------ identity
    @property
    def annotation_file(self) -> Path:
        return self._annotation_file

    @property
    def image_dir(self) -> Path:
        return self._image_dir

    @property
    def category_ids(self) -> tuple[int, ...]:
        """The COCO category id of each class after the background (``classes[1:]``)."""
        return self._category_ids

    @property
    def coco_image_ids(self) -> list[int]:
        """The COCO image id of each image of :attr:`image_index`, unflipped."""
        return [im.id for im in self._images]

    def coco_data(self) -> CocoData:
        """The checked annotations (what evaluation compares against, crowd and zero-area ones included)."""
        return CocoData(list(zip(self._category_ids, self.classes[1:])), self._images, self._annotations)

    def _image(self, index: str) -> CocoImage:
        try:
            return self._images[self._position[index]]
        except KeyError:
            raise DataError(self._annotation_file, f"image id {index} is not in this file") from None

    def _path_of(self, image: CocoImage) -> str:
        path = os.path.normpath(os.path.join(self._image_dir, image.file_name))
        if os.path.isabs(image.file_name) or not path.startswith(os.path.join(self._image_dir, "")):
            raise DataError(self._annotation_file, f"image id {image.id}: file_name {image.file_name!r} leaves "
                                                   f"the image folder {self._image_dir}")
        return path

    def image_path_from_index(self, index: str) -> str:
        image = self._image(index)
        path = self._path_of(image)
        if not os.path.isfile(path):
            raise DataError(path, f"image file not found (image id {image.id} of {self._annotation_file})")
        return path

    def content_files(self) -> tuple[dict, list[tuple[str, str, str]]]:
        """What this imdb's data is: (options, [(kind, image id, absolute path)]).

        Options (no paths): the format, parser version, class list, category ids and crowd threshold. Entries:
        the annotation file, then one image per entry of :attr:`image_index`, in order.
        """
        options = {"format": "coco", "parser_version": COCO_PARSER_VERSION, "classes": list(self.classes),
                   "category_ids": list(self._category_ids), "crowd_thresh": float(self.config["crowd_thresh"])}
        entries = [("annotation", "", str(self._annotation_file))]
        entries += [("image", str(im.id), self._path_of(im)) for im in self._images]
        return options, entries

    # ------------------------------------------------------------------ gt roidb
    def gt_cache_key(self) -> str:
        """sha256 of the parser version, name, classes, the JSON's bytes and every image's size and mtime."""
        h = hashlib.sha256()
        file_digest_update(h, "options", repr((COCO_PARSER_VERSION, self.name, self.classes,
                                               self._category_ids)).encode())
        file_digest_update(h, "json", self._json_digest.encode())
        for image in self._images:
            path = self._path_of(image)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise DataError(path, f"image file not found (image id {image.id} of {self._annotation_file})"
                                ) from None
            if st.st_size == 0:
                raise DataError(path, f"empty image file (0 bytes; image id {image.id})")
            file_digest_update(h, image.file_name, f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def _entry(self, image: CocoImage) -> dict:
        boxes, classes, crowd, areas = [], [], [], []
        for ann in self._annotations[image.id]:
            x1, y1, x2, y2 = coco_box_to_xyxy(ann.bbox, image.width, image.height)
            if ann.area > 0 and x2 >= x1 and y2 >= y1:
                boxes.append((x1, y1, x2, y2))
                classes.append(self._class_of[ann.category_id])
                crowd.append(bool(ann.iscrowd))
                areas.append(ann.area)
        entry = self.gt_entry(np.array(boxes, dtype=np.float64), np.array(classes, dtype=np.int32),
                              self.num_classes)
        entry["gt_overlaps"][np.array(crowd, dtype=bool)] = -1.0
        entry["seg_areas"] = np.array(areas, dtype=np.float32)
        return entry

    def _load_gt_roidb(self) -> tuple[list[dict], np.ndarray]:
        roidb = []
        for image in self._images:
            path = self.image_path_from_index(str(image.id))
            actual = read_image_size(path)
            if actual != (image.height, image.width):
                raise DataError(self._annotation_file, f"image id {image.id}: the file says {image.width}x"
                                                       f"{image.height} but {path} is {actual[1]}x{actual[0]}")
            roidb.append(self._entry(image))
        return roidb, self._image_sizes.copy()

    # ------------------------------------------------------------------ proposals
    def rpn_roidb(self, proposal_file: str | os.PathLike | None = None) -> list[dict]:
        """GT boxes followed by the proposals (see :meth:`Imdb.rpn_roidb`), then proposals inside a crowd box
        marked -1 (:func:`filter_crowd_proposals`, ``config['crowd_thresh']``)."""
        return filter_crowd_proposals(super().rpn_roidb(proposal_file), self.config["crowd_thresh"])

    # ------------------------------------------------------------------ evaluation
    def competition_mode(self, on: bool) -> None:
        """On: the results JSON is named without a salt and kept; off (default): salted name, removed after eval."""
        self.config["use_salt"] = not on
        self.config["cleanup"] = not on

    def results_file_name(self) -> str:
        salt = f"_{self._salt}" if self.config["use_salt"] else ""
        return f"detections_{self.name}_results{salt}.json"

    def evaluate_detections(self, all_boxes: list, output_dir: str | os.PathLike) -> dict:
        """Write the results JSON and score it with pycocotools' COCOeval (bbox): see
        :func:`roidb.coco_eval.evaluate_coco` for what comes back and what is written to ``output_dir``."""
        from roidb.coco_eval import evaluate_coco

        if len(all_boxes) != self.num_classes:
            raise DataError(self.name, f"all_boxes has {len(all_boxes)} classes, the imdb {self.num_classes}")
        output_dir = Path(output_dir)
        results_file = output_dir / self.results_file_name()
        try:
            return evaluate_coco(all_boxes, self.coco_data(), results_file, output_dir)
        finally:
            if self.config["cleanup"] and results_file.exists():
                results_file.unlink()


coco = CocoImdb
