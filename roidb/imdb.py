"""The imdb base class: an image database and its roidb (py-faster-rcnn's ``datasets.imdb``).

A roidb is a list with one dict per image (see docs/architecture.md)::

    boxes        float32 (N, 4)  [x1, y1, x2, y2], 0-based inclusive pixels (width = x2 - x1 + 1);
                                 ground truth first, then proposals
    gt_classes   int32 (N,)      class index of each GT box, 0 for proposals
    gt_overlaps  float32 (N, K)  dense: 1.0 at a GT box's class; for a proposal, its best IoU with a GT box
                                 of class k at column k
    seg_areas    float32 (N,)    (x2 - x1 + 1) * (y2 - y1 + 1) for GT boxes, 0 for proposals
    flipped      bool

Unlike py-faster-rcnn, the gt cache is keyed by the imdb's content digest (:mod:`roidb.content`: image-set ids,
annotation and image bytes, class list and parse options; so no stale caches), boxes are never uint16 (no 65535
wrap-around), and proposal pickles load through :mod:`roidb.safe_pickle`.
"""
from __future__ import annotations

import abc
import hashlib
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from roidb.guard import checked_write_path, regular_file
from roidb.content import StatCache, content_digest, content_listing
from roidb.errors import DataError
from roidb.safe_pickle import safe_load

__all__ = ["Imdb", "imdb", "read_image_size", "decode_image", "check_image_file", "atomic_write_bytes", "default_data_root", "file_digest_update",
           "is_crowd", "object_rows", "GT_CACHE_VERSION"]

GT_CACHE_VERSION = 2
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def default_data_root() -> Path:
    """``<repo>/data``, py-faster-rcnn's ``cfg.DATA_DIR``."""
    return Path(__file__).resolve().parents[1] / "data"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = checked_write_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jpeg_size(f, path: str) -> tuple[int, int]:
    """(height, width) from the SOF segment of a JPEG whose first two bytes were consumed."""
    while True:
        byte = f.read(1)
        while byte == b"\xff":
            marker = f.read(1)
            if marker != b"\xff":
                break
        else:
            if not byte:
                raise DataError(path, "truncated JPEG header (no frame header before the end of the file)")
            raise DataError(path, "corrupt JPEG header (marker expected)")
        if not marker:
            raise DataError(path, "truncated JPEG header")
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD9:
            continue
        raw = f.read(2)
        if len(raw) < 2:
            raise DataError(path, "truncated JPEG header")
        length = struct.unpack(">H", raw)[0]
        if code in _SOF_MARKERS:
            seg = f.read(5)
            if len(seg) < 5:
                raise DataError(path, "truncated JPEG header")
            height, width = struct.unpack(">HH", seg[1:5])
            if height == 0 or width == 0:
                raise DataError(path, f"JPEG header gives an empty image ({width}x{height})")
            return height, width
        if length < 2:
            raise DataError(path, "corrupt JPEG header (segment length < 2)")
        f.seek(length - 2, os.SEEK_CUR)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image, from the JPEG or PNG header without decoding the pixels.

    Other formats are decoded with OpenCV. A missing, empty or unreadable file raises :class:`DataError`.
    """
    path = os.fspath(path)
    regular_file(path, "image file")  # a FIFO would block the read; a directory or device is named as such
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if not head:
                raise DataError(path, "empty image file (0 bytes)")
            if head == b"\xff\xd8":
                return _bounded(path, *_jpeg_size(f, path))
            head += f.read(22)
            if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                return _bounded(path, height, width)
    except FileNotFoundError:
        raise DataError(path, "image file not found") from None
    except OSError as exc:
        raise DataError(path, f"cannot read image ({exc.strerror or exc})") from None
    import cv2

    im = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if im is None:
        raise DataError(path, "not a readable image (neither JPEG, PNG nor any format OpenCV decodes)")
    return int(im.shape[0]), int(im.shape[1])


MAX_IMAGE_PIXELS = 100_000_000  # 10,000 x 10,000; a header claiming more is corrupt or hostile here


def _bounded(path: str, height: int, width: int) -> tuple[int, int]:
    if height <= 0 or width <= 0:
        raise DataError(path, f"image header gives an empty image ({width}x{height})")
    if height * width > MAX_IMAGE_PIXELS:
        raise DataError(path, f"image header claims {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel "
                              "limit (a corrupt or hostile header); refused before decoding")
    return height, width


def check_image_file(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(height, width) of the image at ``path`` after the checks that need no decoding: a regular file, a header
    within MAX_IMAGE_PIXELS and equal to ``expected_size`` when given, and for a JPEG the end-of-image marker (a
    truncated JPEG decodes with only a libjpeg warning). DataError naming the file otherwise."""
    path = os.fspath(path)
    size = read_image_size(path)
    if expected_size is not None and tuple(size) != tuple(expected_size):
        raise DataError(path, f"image is {size[1]}x{size[0]} but its annotation says "
                              f"{expected_size[1]}x{expected_size[0]}")
    with open(path, "rb") as f:
        if f.read(2) == b"\xff\xd8":
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
            if not f.read().rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9"):  # EOI, then at most padding
                raise DataError(path, "truncated JPEG (no end-of-image marker): the file was cut short")
    return size


def decode_image(path: str | os.PathLike, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """The image at ``path`` as BGR uint8 (H, W, 3), or DataError naming the file: not a regular file, a header
    over MAX_IMAGE_PIXELS or (``expected_size``, (height, width) from the annotation) of another size, a truncated
    JPEG (no end-of-image marker: libjpeg would only warn and fill the rest grey), a failed decode, or decoded
    pixels whose size differs from the header. The header is checked before any pixel is decoded."""
    import cv2

    path = os.fspath(path)
    size = check_image_file(path, expected_size)
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        raise DataError(path, "cannot decode image (corrupt data)")
    if tuple(im.shape[:2]) != tuple(size):
        raise DataError(path, f"decoded image is {im.shape[1]}x{im.shape[0]} but its header says {size[1]}x{size[0]}")
    return im


def file_digest_update(h: "hashlib._Hash", label: str, data: bytes) -> None:
    """Feed ``label`` and ``data`` into ``h`` with length prefixes, so no two sequences collide."""
    encoded = label.encode("utf-8", "surrogateescape")
    h.update(struct.pack("<QQ", len(encoded), len(data)))
    h.update(encoded)
    h.update(data)


def is_crowd(entry: dict) -> np.ndarray:
    """bool (N,): the rows of a roidb entry whose ``gt_overlaps`` are -1 at every class (COCO crowd boxes, and
    proposals inside one): neither foreground nor background."""
    overlaps = np.asarray(entry["gt_overlaps"])
    return (overlaps < 0).all(axis=1) if overlaps.shape[1:] != (0,) else np.zeros(len(overlaps), dtype=bool)


def object_rows(entry: dict) -> np.ndarray:
    """bool (N,): the GT rows that are objects to find (``gt_classes`` > 0, not crowd)."""
    return (np.asarray(entry["gt_classes"]) > 0) & ~is_crowd(entry)


def _pack_roidb(roidb: list[dict]) -> dict:
    """A roidb as a few concatenated arrays (one per key) plus per-image box counts: fast to (un)pickle."""
    counts = np.array([len(e["boxes"]) for e in roidb], dtype=np.int64)
    keys = sorted(roidb[0]) if roidb else []
    arrays = {k: np.concatenate([e[k] for e in roidb]) for k in keys if isinstance(roidb[0][k], np.ndarray)}
    scalars = {k: [e[k] for e in roidb] for k in keys if k not in arrays}
    return {"counts": counts, "arrays": arrays, "scalars": scalars}


def _unpack_roidb(packed: dict) -> list[dict]:
    splits = np.cumsum(packed["counts"])[:-1]
    columns = {k: np.split(v, splits) for k, v in packed["arrays"].items()}
    columns.update(packed["scalars"])
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


class Imdb(abc.ABC):
    """An image database: class list, image index, lazily built roidb.

    Subclasses implement :meth:`image_path_from_index`, :meth:`content_files` and :meth:`_load_gt_roidb`
    (plus evaluation); the base class caches the gt roidb (keyed by the content digest), flips, loads
    proposals and merges roidbs.

    Args:
        name: the imdb's name, e.g. ``voc_2007_trainval``; also names its cache files.
        classes: class names, ``'__background__'`` first.
        cache_dir: where the gt roidb cache lives (default ``<repo>/data/cache``).
        stat_cache: the file-hash cache for :meth:`content_listing` (default ``<cache_dir>/stat_cache.json``).
    """

    def __init__(self, name: str, classes: Sequence[str], cache_dir: str | os.PathLike | None = None, *,
                 stat_cache: StatCache | None = None):
        self._name = name
        self._classes = tuple(classes)
        self._image_index: list[str] = []
        self._image_sizes: np.ndarray | None = None
        self._roidb: list[dict] | None = None
        self._roidb_handler: Callable[[], list[dict]] = self.gt_roidb
        self._cache_dir = Path(cache_dir) if cache_dir is not None else default_data_root() / "cache"
        self._stat_cache = stat_cache
        self.config: dict = {"rpn_file": None}

    # ------------------------------------------------------------------ identity
    @property
    def name(self) -> str:
        return self._name

    @property
    def classes(self) -> tuple[str, ...]:
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def image_index(self) -> list[str]:
        return self._image_index

    @property
    def num_images(self) -> int:
        return len(self._image_index)

    @property
    def cache_path(self) -> Path:
        """The gt cache folder (py-faster-rcnn's ``imdb.cache_path``)."""
        return self._cache_dir

    def image_path_at(self, i: int) -> str:
        """Path of image ``i`` of :attr:`image_index` (flipped copies share their original's path)."""
        return self.image_path_from_index(self._image_index[i])

    @abc.abstractmethod
    def image_path_from_index(self, index: str) -> str:
        """Path of the image whose id is ``index``."""

    # ------------------------------------------------------------------ sizes
    def image_sizes(self) -> np.ndarray:
        """int32 (num_images, 2) ``[height, width]`` per image, read from image headers if no gt roidb did."""
        if self._image_sizes is None or len(self._image_sizes) != self.num_images:
            self._image_sizes = np.array([read_image_size(self.image_path_at(i)) for i in range(self.num_images)],
                                         dtype=np.int32).reshape(-1, 2)
        return self._image_sizes

    def image_size_at(self, i: int) -> tuple[int, int]:
        """(height, width) of image ``i``."""
        h, w = self.image_sizes()[i]
        return int(h), int(w)

    def _get_widths(self) -> np.ndarray:
        return self.image_sizes()[:, 1]

    # ------------------------------------------------------------------ roidb
    @property
    def roidb_handler(self) -> Callable[[], list[dict]]:
        return self._roidb_handler

    @roidb_handler.setter
    def roidb_handler(self, handler: Callable[[], list[dict]]) -> None:
        self._roidb_handler = handler
        self._roidb = None

    def set_proposal_method(self, method: str) -> None:
        """Choose the roidb: ``'gt'`` (ground truth only) or ``'rpn'`` (GT plus ``config['rpn_file']``)."""
        handlers = {"gt": self.gt_roidb, "rpn": self.rpn_roidb}
        if method not in handlers:
            raise DataError(self.name, f"unknown proposal method '{method}' (known: {', '.join(handlers)})")
        self.roidb_handler = handlers[method]

    @property
    def roidb(self) -> list[dict]:
        """The roidb, built on first access by :attr:`roidb_handler`."""
        if self._roidb is None:
            self._roidb = self.roidb_handler()
        return self._roidb

    # ------------------------------------------------------------------ content
    @property
    def stat_cache(self) -> StatCache:
        """The :class:`~roidb.content.StatCache` used for this imdb's file hashes (``<cache_dir>/stat_cache.json``)."""
        if self._stat_cache is None:
            self._stat_cache = StatCache(self._cache_dir / "stat_cache.json")
        return self._stat_cache

    def content_files(self) -> tuple[dict, list[tuple[str, str, str]]]:
        """What the roidb and the images are made of: ``(options, entries)``.

        ``options``: a JSON-able dict of everything other than file bytes that changes the roidb: ``classes``
        (required) and the parse options (e.g. ``use_diff``, the parser version); never a path, nor a name
        that embeds one. ``entries``: ``(kind, image_id, absolute_path)`` in image-set order, ``kind`` being
        ``"annotation"`` or ``"image"``; one ``"image"`` entry per image (an un-flipped image set), annotation
        entries per image or one dataset-wide entry with image id ``""`` (a COCO JSON). Nothing is opened.
        """
        raise NotImplementedError(f"{type(self).__name__} does not list its content files")

    def content_source(self) -> str:
        """Where the image ids come from, for error messages (the image-set file of a VOC split)."""
        return f"the image set of {self.name}"

    def content_listing(self, stat_cache: StatCache | None = None) -> dict:
        """:func:`roidb.content.content_listing` of this imdb (ids, per-file sha256, options; no path)."""
        return content_listing(self, stat_cache if stat_cache is not None else self.stat_cache)

    def gt_cache_key(self) -> str:
        """The content digest (image-set ids, annotation and image bytes, classes, parse options): the gt cache key.

        With a warm stat cache this stats every listed file and reads none.
        """
        return content_digest(self.content_listing())

    @abc.abstractmethod
    def _load_gt_roidb(self) -> tuple[list[dict], np.ndarray]:
        """Parse the annotations: (gt roidb, int32 (num_images, 2) [height, width])."""

    def gt_cache_file(self, key: str | None = None) -> Path:
        """The cache file for ``key`` (default: the current annotations and options)."""
        return self._cache_dir / f"{self.name}_gt_roidb_{(key or self.gt_cache_key())[:20]}.pkl"

    def gt_roidb(self) -> list[dict]:
        """Ground-truth roidb, from the cache when its key (annotation digest + options) matches."""
        key = self.gt_cache_key()
        path = self.gt_cache_file(key)
        if path.is_file():
            try:
                cached = safe_load(path)
            except DataError:
                cached = None
            if (isinstance(cached, dict) and cached.get("version") == GT_CACHE_VERSION and cached.get("key") == key
                    and len(cached.get("counts", ())) == self.num_images):
                self._image_sizes = np.asarray(cached["sizes"], dtype=np.int32).reshape(-1, 2)
                return _unpack_roidb(cached)
        roidb, sizes = self._load_gt_roidb()
        self._image_sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
        payload = {"version": GT_CACHE_VERSION, "key": key, "name": self.name, "sizes": self._image_sizes,
                   **_pack_roidb(roidb)}
        atomic_write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        return roidb

    @staticmethod
    def gt_entry(boxes: np.ndarray, gt_classes: np.ndarray, num_classes: int) -> dict:
        """A GT roidb entry from float (N, 4) 0-based ``boxes`` and int (N,) ``gt_classes``."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        gt_classes = np.asarray(gt_classes, dtype=np.int32).reshape(-1)
        overlaps = np.zeros((len(boxes), num_classes), dtype=np.float32)
        overlaps[np.arange(len(boxes)), gt_classes] = 1.0
        seg_areas = ((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)).astype(np.float32)
        return {"boxes": boxes, "gt_classes": gt_classes, "gt_overlaps": overlaps, "seg_areas": seg_areas,
                "flipped": False}

    def append_flipped_images(self) -> None:
        """Append a horizontally flipped copy of every entry: x1' = W - x2 - 1, x2' = W - x1 - 1.

        Doubles :attr:`image_index` (and the image sizes); flipped entries have ``flipped=True``.
        """
        num_images = self.num_images
        widths = self._get_widths().astype(np.float32)
        roidb = self.roidb
        for i in range(num_images):
            entry = roidb[i]
            boxes = entry["boxes"].copy()
            old_x1, old_x2 = boxes[:, 0].copy(), boxes[:, 2].copy()
            boxes[:, 0] = widths[i] - old_x2 - 1
            boxes[:, 2] = widths[i] - old_x1 - 1
            if not (boxes[:, 2] >= boxes[:, 0]).all():
                raise DataError(self.image_path_at(i), "a box has x2 < x1 after flipping (corrupt roidb entry)")
            flipped = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
            flipped["boxes"] = boxes
            flipped["flipped"] = True
            roidb.append(flipped)
        self._image_index = self._image_index * 2
        self._image_sizes = np.concatenate([self.image_sizes()[:num_images]] * 2)

    # ------------------------------------------------------------------ proposals
    def create_roidb_from_box_list(self, box_list: Sequence[np.ndarray], gt_roidb: list[dict] | None) -> list[dict]:
        """Proposal entries from one (N, 4) array per image; overlaps with ``gt_roidb``'s boxes if given.

        A proposal's row holds its best IoU at the class of the GT box it overlaps most; crowd boxes (rows of -1)
        take no part (as in Detectron: a proposal is never given a crowd box's class).
        """
        if len(box_list) != self.num_images:
            raise DataError(self.name, f"box list has {len(box_list)} entries but the imdb has "
                                       f"{self.num_images} images")
        roidb = []
        for i, boxes in enumerate(box_list):
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            overlaps = np.zeros((len(boxes), self.num_classes), dtype=np.float32)
            objects = object_rows(gt_roidb[i]) if gt_roidb is not None else np.zeros(0, dtype=bool)
            if objects.any() and len(boxes) > 0:
                gt_boxes = gt_roidb[i]["boxes"][objects].astype(np.float64)
                gt_classes = gt_roidb[i]["gt_classes"][objects]
                from kernels.boxes import bbox_overlaps  # here, so that digesting an imdb needs no torch
                iou = bbox_overlaps(boxes.astype(np.float64), gt_boxes)
                argmaxes = iou.argmax(axis=1)
                maxes = iou.max(axis=1)
                hit = np.where(maxes > 0)[0]
                overlaps[hit, gt_classes[argmaxes[hit]]] = maxes[hit]
            roidb.append({"boxes": boxes, "gt_classes": np.zeros(len(boxes), dtype=np.int32),
                          "gt_overlaps": overlaps, "seg_areas": np.zeros(len(boxes), dtype=np.float32),
                          "flipped": False})
        return roidb

    @staticmethod
    def merge_roidbs(a: list[dict], b: list[dict]) -> list[dict]:
        """Append ``b[i]``'s boxes after ``a[i]``'s, image by image (``a`` is updated in place and returned)."""
        if len(a) != len(b):
            raise ValueError(f"cannot merge roidbs of {len(a)} and {len(b)} images")
        for ea, eb in zip(a, b):
            ea["boxes"] = np.vstack((ea["boxes"], eb["boxes"])).astype(np.float32)
            ea["gt_classes"] = np.hstack((ea["gt_classes"], eb["gt_classes"])).astype(np.int32)
            ea["gt_overlaps"] = np.vstack((ea["gt_overlaps"], eb["gt_overlaps"])).astype(np.float32)
            ea["seg_areas"] = np.hstack((ea["seg_areas"], eb["seg_areas"])).astype(np.float32)
        return a

    def has_annotations(self) -> bool:
        """Whether GT exists for this split (py-faster-rcnn merged GT into rpn roidbs only then)."""
        return True

    def rpn_roidb(self, proposal_file: str | os.PathLike | None = None) -> list[dict]:
        """GT boxes followed by the proposals of ``proposal_file`` (default ``config['rpn_file']``).

        The pickle is py-faster-rcnn's format: a list with one (N, 4) array per image, in :attr:`image_index`
        order, in original-image pixels. GT boxes stay RoIs; each proposal's ``gt_overlaps`` row holds its
        best IoU at the class of that GT box.
        """
        proposal_file = proposal_file if proposal_file is not None else self.config.get("rpn_file")
        if not proposal_file:
            raise DataError(self.name, "rpn roidb needs a proposal file (set config['rpn_file'])")
        gt_roidb = self.gt_roidb() if self.has_annotations() else None
        box_list = self.load_proposals(proposal_file)
        rpn_roidb = self.create_roidb_from_box_list(box_list, gt_roidb)
        if gt_roidb is None:
            return rpn_roidb
        gt_copy = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in e.items()} for e in gt_roidb]
        return self.merge_roidbs(gt_copy, rpn_roidb)

    def load_proposals(self, proposal_file: str | os.PathLike) -> list[np.ndarray]:
        """Load and check a proposal pickle: one finite float32 (N, 4) array with x2 >= x1, y2 >= y1 per image."""
        path = os.fspath(proposal_file)
        box_list = safe_load(path)
        if not isinstance(box_list, (list, tuple)):
            raise DataError(path, f"proposal pickle must hold a list of (N, 4) arrays, got {type(box_list).__name__}")
        if len(box_list) != self.num_images:
            raise DataError(path, f"proposal pickle has {len(box_list)} images but {self.name} has "
                                  f"{self.num_images}")
        checked = []
        for i, boxes in enumerate(box_list):
            where = f"image {i} ({self._image_index[i]})"
            if not isinstance(boxes, np.ndarray) or boxes.ndim != 2 or boxes.shape[1] != 4:
                shape = getattr(boxes, "shape", type(boxes).__name__)
                raise DataError(path, f"{where}: proposals must be an (N, 4) array, got {shape}")
            if not np.issubdtype(boxes.dtype, np.number):
                raise DataError(path, f"{where}: proposals have non-numeric dtype {boxes.dtype}")
            boxes = boxes.astype(np.float32)
            if not np.isfinite(boxes).all():
                raise DataError(path, f"{where}: proposals contain NaN or infinite coordinates")
            if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
                raise DataError(path, f"{where}: a proposal has x2 < x1 or y2 < y1")
            checked.append(boxes)
        return checked

    # ------------------------------------------------------------------ evaluation
    @abc.abstractmethod
    def evaluate_detections(self, all_boxes: list, output_dir: str | os.PathLike) -> dict:
        """Score ``all_boxes[cls][image]`` ((N, 5) ``[x1, y1, x2, y2, score]``): ``{'aps': {...}, 'map': m}``.

        ``aps`` holds each class's AP at IoU 0.5 and ``map`` their mean. A COCO-format imdb adds ``'metric':
        'coco'``, ``'aps_coco'`` (per-class AP at IoU .50:.05:.95) and ``'coco'`` (COCOeval's statistics).
        """

    @abc.abstractmethod
    def competition_mode(self, on: bool) -> None:
        """Competition mode: stable result-file names that are kept (no salt, no cleanup)."""


imdb = Imdb
