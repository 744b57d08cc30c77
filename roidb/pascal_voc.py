"""PASCAL VOC (and any VOC-format folder) as an imdb: py-faster-rcnn's ``datasets.pascal_voc``.

Layout: ``<devkit>/VOC<year>/{JPEGImages/<id>.jpg, Annotations/<id>.xml, ImageSets/Main/<split>.txt}``.
Annotation rules: XML parsed with lxml; 1-based XML coordinates become 0-based roidb coordinates (-1); objects
with ``<difficult>1`` are dropped unless ``use_diff`` (a missing ``<difficult>`` is 0); class names are compared
after ``strip().lower()``. Bad data raises :class:`~roidb.errors.DataError`, one line naming the file and the
object index (0-based, in document order). A 0 coordinate in the XML (-1 after the shift) is clamped to 0 with a
warning that counts such boxes; nothing wraps around.
"""
from __future__ import annotations

import os
import pickle
import uuid
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from roidb.guard import makedirs, plain_name, regular_file
from roidb.xmlsafe import parse_xml
from roidb.content import StatCache
from roidb.errors import DataError
from roidb.imdb import Imdb, atomic_write_bytes, default_data_root, read_image_size

__all__ = ["PascalVoc", "pascal_voc", "VOC_CLASSES", "parse_voc_annotation", "normalize_classes"]

VOC_CLASSES = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
PARSER_VERSION = 1


def normalize_classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    """``'__background__'`` followed by the given names (stripped, lower-cased); VOC's 20 when ``None``."""
    if classes is None:
        return VOC_CLASSES
    names = [str(c).strip().lower() for c in classes]
    names = [c for c in names if c != "__background__"]
    if not names or any(not c for c in names):
        raise DataError("classes", f"need at least one non-empty class name, got {list(classes)}")
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise DataError("classes", f"duplicate class names {dupes}")
    return ("__background__", *names)


def _text(node, tag: str, path: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(path, f"{where}: missing <{tag}>")
    return child.text.strip()


def _number(node, tag: str, path: str, where: str) -> float:
    text = _text(node, tag, path, where)
    try:
        value = float(text)
    except ValueError:
        raise DataError(path, f"{where}: <{tag}> is not a number: '{text}'") from None
    if not np.isfinite(value):
        raise DataError(path, f"{where}: <{tag}> is not finite: '{text}'")
    return value


def _xml_size(root, path: str) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None:
        return None
    w, h = _number(size, "width", path, "<size>"), _number(size, "height", path, "<size>")
    if w <= 0 or h <= 0 or w != int(w) or h != int(h):
        raise DataError(path, f"<size>: width and height must be positive integers, got {w:g}x{h:g}")
    return int(h), int(w)


def parse_voc_annotation(data: bytes, path: str, class_to_ind: dict[str, int], use_diff: bool,
                         image_size: tuple[int, int] | None = None):
    """Parse one VOC XML document.

    Args:
        data: the XML bytes; ``path`` names the file in errors.
        class_to_ind: class name -> index (names stripped and lower-cased).
        use_diff: keep ``difficult`` objects.
        image_size: (height, width) from the image header, checked against ``<size>``; used when it is absent.
    Returns:
        ``(boxes float32 (N, 4) 0-based, gt_classes int32 (N,), (height, width), number of clamped boxes)``.
    """
    root = parse_xml(data, path)
    size = _xml_size(root, path)
    if size is not None and image_size is not None and tuple(size) != tuple(image_size):
        raise DataError(path, f"<size> says {size[1]}x{size[0]} but the image is {image_size[1]}x{image_size[0]}")
    size = size or image_size
    boxes, classes, clamped = [], [], 0
    for ix, obj in enumerate(root.findall("object")):
        where = f"object[{ix}]"
        diff_node = obj.find("difficult")
        diff_text = diff_node.text.strip() if diff_node is not None and diff_node.text else ""
        if diff_text not in ("", "0", "1"):
            raise DataError(path, f"{where}: <difficult> must be 0 or 1, got '{diff_text}'")
        if diff_text == "1" and not use_diff:
            continue
        name = _text(obj, "name", path, where).lower()
        if name not in class_to_ind:
            known = ", ".join(c for c in class_to_ind if c != "__background__")
            raise DataError(path, f"{where}: unknown class '{name}' (known: {known})")
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(path, f"{where}: missing <bndbox>")
        x1, y1, x2, y2 = (_number(bb, t, path, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise DataError(path, f"{where} ({name}): xmax < xmin or ymax < ymin in ({x1:g}, {y1:g}, {x2:g}, {y2:g})")
        if size is not None and (x1 < 0 or y1 < 0 or x2 > size[1] or y2 > size[0]):
            raise DataError(path, f"{where} ({name}): box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
                                  f"{size[1]}x{size[0]} image (1-based coordinates must be in 1..width, 1..height)")
        box = np.array([x1, y1, x2, y2], dtype=np.float64) - 1.0
        if (box < 0).any():
            clamped += 1
            box = np.maximum(box, 0.0)
        boxes.append(box)
        classes.append(class_to_ind[name])
    return (np.array(boxes, dtype=np.float32).reshape(-1, 4), np.array(classes, dtype=np.int32), size, clamped)


def _escape_format(path: str | os.PathLike) -> str:
    return os.fspath(path).replace("{", "{{").replace("}", "}}")


class PascalVoc(Imdb):
    """A VOC-format split as an imdb (name ``voc_<year>_<image_set>`` unless ``name`` is given).

    Args:
        image_set: the split, i.e. ``ImageSets/Main/<image_set>.txt``.
        year: '2007', '2012', ...; selects ``VOC<year>`` and, below 2010, the VOC07 11-point metric.
        devkit_path: the VOCdevkit folder (default ``<repo>/data/VOCdevkit<year>``).
        classes: class names for non-VOC data (default the 20 VOC classes); ``__background__`` is prepended.
        use_diff: keep objects marked difficult.
        cache_dir: the gt cache folder (default ``<repo>/data/cache``).
        data_path: the folder holding JPEGImages/Annotations/ImageSets (default ``<devkit_path>/VOC<year>``).
        name: the imdb name (default ``voc_<year>_<image_set>``).
        use_07_metric: force the VOC07 metric on or off (default: year < 2010).
        stat_cache: the file-hash cache for the content digest (default ``<cache_dir>/stat_cache.json``).
    """

    def __init__(self, image_set: str, year: str | int, devkit_path: str | os.PathLike | None = None, *,
                 classes: Sequence[str] | None = None, use_diff: bool = False,
                 cache_dir: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None,
                 name: str | None = None, use_07_metric: bool | None = None, stat_cache: StatCache | None = None):
        self._year = str(year)
        self._image_set = image_set
        super().__init__(name or f"voc_{self._year}_{image_set}", normalize_classes(classes), cache_dir,
                         stat_cache=stat_cache)
        self._devkit_path = Path(devkit_path) if devkit_path is not None else default_data_root() / f"VOCdevkit{year}"
        self._data_path = Path(data_path) if data_path is not None else self._devkit_path / f"VOC{self._year}"
        self._class_to_ind = {c: i for i, c in enumerate(self.classes)}
        self._image_ext = ".jpg"
        self._use_07_metric = use_07_metric
        self._salt = str(uuid.uuid4())
        self._comp_id = "comp4"
        self.config.update({"cleanup": True, "use_salt": True, "use_diff": bool(use_diff)})
        self._check_layout()
        self._image_index = self._load_image_set_index()
        self._image_set_ids = tuple(self._image_index)

    @property
    def data_path(self) -> Path:
        return self._data_path

    @property
    def year(self) -> str:
        return self._year

    @property
    def image_set(self) -> str:
        return self._image_set

    @property
    def use_07_metric(self) -> bool:
        if self._use_07_metric is not None:
            return bool(self._use_07_metric)
        return self._year.isdigit() and int(self._year) < 2010

    def _check_layout(self) -> None:
        if not self._data_path.is_dir():
            raise DataError(self._data_path, f"VOC data folder not found (needed by {self.name})")
        for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
            if not (self._data_path / sub).is_dir():
                raise DataError(self._data_path / sub, f"folder not found (VOC layout needs it for {self.name})")

    def image_set_file(self) -> Path:
        return self._data_path / "ImageSets" / "Main" / f"{self._image_set}.txt"

    def _load_image_set_index(self) -> list[str]:
        path = self.image_set_file()
        if path.exists():
            regular_file(path, "image set file")  # a FIFO would block the read
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(path, f"image set file not found (split '{self._image_set}' of {self.name})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(path, f"cannot read image set file ({exc})") from None
        index = [line.strip() for line in text.splitlines() if line.strip()]
        if not index:
            raise DataError(path, "image set file is empty (no image ids)")
        for image_id in index:
            plain_name(path, "image id", image_id)
        return index

    def image_path_from_index(self, index: str) -> str:
        path = self._data_path / "JPEGImages" / f"{index}{self._image_ext}"
        if not path.is_file():
            raise DataError(path, f"image file not found (listed in {self.image_set_file()})")
        return str(path)

    def annotation_path(self, index: str) -> Path:
        return self._data_path / "Annotations" / f"{index}.xml"

    def has_annotations(self) -> bool:
        return self.annotation_path(self._image_index[0]).is_file()

    # ------------------------------------------------------------------ gt roidb
    def _read_annotations(self) -> list[bytes]:
        out = []
        folder = os.fspath(self._data_path / "Annotations")
        for index in self._image_index:
            path = os.path.join(folder, index + ".xml")
            if os.path.lexists(path):
                regular_file(path, "annotation file")  # a FIFO would block, a directory is no annotation
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                raise DataError(path, f"annotation file not found (listed in {self.image_set_file()})") from None
            except OSError as exc:
                raise DataError(path, f"cannot read annotation file ({exc.strerror or exc})") from None
        return out

    def content_source(self) -> str:
        return str(self.image_set_file())

    def content_files(self) -> tuple[dict, list[tuple[str, str, str]]]:
        """Options (classes, use_diff, parser version) and, per image-set id, its XML (if the split has
        annotations) and its JPEG. The gt roidb is the parse of exactly these bytes under these options."""
        options = {"format": "pascal_voc", "parser_version": PARSER_VERSION, "classes": list(self.classes),
                   "use_diff": bool(self.config["use_diff"])}
        base = os.path.abspath(self._data_path)
        xml_dir, jpeg_dir = os.path.join(base, "Annotations", ""), os.path.join(base, "JPEGImages", "")
        with_xml = self.annotation_path(self._image_set_ids[0]).is_file()
        entries = []
        for index in self._image_set_ids:
            if with_xml:
                entries.append(("annotation", index, f"{xml_dir}{index}.xml"))
            entries.append(("image", index, f"{jpeg_dir}{index}{self._image_ext}"))
        return options, entries

    def _load_gt_roidb(self) -> tuple[list[dict], np.ndarray]:
        xml = self._read_annotations()
        roidb, sizes, clamped = [], [], 0
        use_diff = self.config["use_diff"]
        for index, data in zip(self._image_index, xml):
            image_size = read_image_size(self.image_path_from_index(index))
            boxes, gt_classes, size, n = parse_voc_annotation(data, str(self.annotation_path(index)),
                                                              self._class_to_ind, use_diff, image_size)
            roidb.append(self.gt_entry(boxes, gt_classes, self.num_classes))
            sizes.append(size)
            clamped += n
        if clamped:
            warnings.warn(f"{self.name}: {clamped} boxes had a 0 coordinate in the XML (-1 after the 1-based "
                          f"shift); clamped to 0", stacklevel=3)
        return roidb, np.array(sizes, dtype=np.int32).reshape(-1, 2)

    # ------------------------------------------------------------------ evaluation
    def _get_comp_id(self) -> str:
        return f"{self._comp_id}_{self._salt}" if self.config["use_salt"] else self._comp_id

    def competition_mode(self, on: bool) -> None:
        """On: result files are named ``comp4_det_...`` and kept; off (default): salted names, removed after eval."""
        self.config["use_salt"] = not on
        self.config["cleanup"] = not on

    def evaluate_detections(self, all_boxes: list, output_dir: str | os.PathLike) -> dict:
        """Write comp4 result files to ``output_dir`` and score them with ``voc_eval`` at IoU 0.5.

        Args:
            all_boxes: ``all_boxes[cls][i]`` float (N, 5) ``[x1, y1, x2, y2, score]`` for image ``i``, 0-based.
        Returns:
            ``{'aps': {class: ap}, 'map': mean AP}``; also writes ``<class>_pr.pkl`` (rec, prec, ap) per class.
        """
        from roidb.voc_eval import voc_eval, write_voc_results_files

        if len(all_boxes) != self.num_classes:
            raise DataError(self.name, f"all_boxes has {len(all_boxes)} classes, the imdb {self.num_classes}")
        output_dir = Path(output_dir)
        makedirs(output_dir)
        salt = self._salt if self.config["use_salt"] else ""
        files = write_voc_results_files(all_boxes, self._image_index, self.classes, str(output_dir),
                                        self._image_set, salt=salt)
        annopath = os.path.join(_escape_format(self._data_path / "Annotations"), "{:s}.xml")
        cachedir = str(self.cache_path / "annotations_cache" / self.name)
        aps = {}
        try:
            for cls in self.classes[1:]:
                detpath = _escape_format(files[cls]) if cls in files else os.devnull
                rec, prec, ap = voc_eval(detpath, annopath, str(self.image_set_file()), cls, cachedir,
                                         ovthresh=0.5, use_07_metric=self.use_07_metric)
                aps[cls] = float(ap)
                atomic_write_bytes(output_dir / f"{cls}_pr.pkl",
                                   pickle.dumps({"rec": rec, "prec": prec, "ap": ap}, protocol=2))
        finally:
            if self.config["cleanup"]:
                for path in files.values():
                    if os.path.exists(path):
                        os.remove(path)
        return {"aps": aps, "map": float(np.mean(list(aps.values()))) if aps else 0.0}


pascal_voc = PascalVoc
