"""The imdb factory: ``get_imdb(name)`` by name, like py-faster-rcnn's ``datasets.factory``.

Known names:
    ``voc_<year>_<split>``     year 2007 or 2012, split train/val/trainval/test; devkit ``<data_root>/VOCdevkit<year>``
    ``shapes_<split>``         trainval/test of the synthetic demo set, generated on first use under
                               ``<data_root>/shapes`` (VOC2007 layout, so the VOC07 metric)
    ``vocfmt:<path>:<split>``  any VOC-format folder (the one holding JPEGImages, Annotations, ImageSets)
    ``coco_<year>_<split>``    py-faster-rcnn's COCO names: 2014 train/val/minival/valminusminival, 2017 train/val;
                               ``<data_root>/coco/annotations/instances_<split><year>.json``, images in
                               ``<data_root>/coco/images/<split><year>/`` (minival2014 and valminusminival2014 are
                               views of val2014: their images are in ``images/val2014/``)
    ``shapes_coco_<split>``    trainval/test: the COCO-format copy of the shapes set (same images), under
                               ``<data_root>/shapes/coco``
    ``cocofmt:<annotations.json>:<image_dir>``  any COCO instances file and the folder its file names are in
    ``a+b``                    several of the above for a combined training roidb: :func:`get_imdbs`
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

from roidb.coco import CocoImdb
from roidb.content import StatCache
from roidb.errors import DataError
from roidb.guard import plain_name
from roidb.imdb import Imdb, default_data_root
from roidb.pascal_voc import PascalVoc
from roidb.synthetic import SHAPE_CLASSES, ensure_shapes_coco, ensure_shapes_dataset, shapes_coco_paths

__all__ = ["get_imdb", "get_imdbs", "list_imdbs"]

_VOC_YEARS = ("2007", "2012")
_VOC_SPLITS = ("train", "val", "trainval", "test")
_SHAPES_SPLITS = ("trainval", "test")
_COCO_SPLITS = {"2014": ("train", "val", "minival", "valminusminival"), "2017": ("train", "val")}
_COCO_VIEWS = {"minival2014": "val2014", "valminusminival2014": "val2014"}  # py-faster-rcnn's view map


def list_imdbs() -> list[str]:
    """The fixed names :func:`get_imdb` knows (plus the ``vocfmt:`` and ``cocofmt:`` patterns)."""
    names = [f"voc_{y}_{s}" for y in _VOC_YEARS for s in _VOC_SPLITS]
    names += [f"shapes_{s}" for s in _SHAPES_SPLITS]
    names += [f"coco_{y}_{s}" for y, splits in _COCO_SPLITS.items() for s in splits]
    names += [f"shapes_coco_{s}" for s in _SHAPES_SPLITS]
    return names + ["vocfmt:<path>:<split>", "cocofmt:<annotations.json>:<image_dir>"]


def _vocfmt_name(path: Path, split: str) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.resolve().name) or "root"
    return f"vocfmt_{stem}_{digest}_{split}"


def _cocofmt_name(annotations: Path, image_dir: Path) -> str:
    digest = hashlib.sha256(f"{annotations.resolve()}\0{image_dir.resolve()}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", annotations.stem) or "annotations"
    return f"cocofmt_{stem}_{digest}"


def _coco_imdb(name: str, root: Path, cache: Path, classes: Sequence[str] | None, use_07_metric: bool | None,
               shapes: dict, stat_cache: StatCache | None = None) -> Imdb | None:
    """The COCO-format imdb called ``name``, or None when ``name`` is no COCO name."""
    if not name.startswith(("cocofmt:", "coco_", "shapes_coco_")):
        return None
    if use_07_metric is not None:
        raise DataError(name, "the VOC07 metric choice applies to VOC-format imdbs; COCO-format data is scored "
                              "with COCOeval")
    if name.startswith("cocofmt:"):
        annotations, sep, image_dir = name[len("cocofmt:"):].partition(".json:")
        if not sep or not annotations or not image_dir:
            raise DataError(name, "expected cocofmt:<annotations.json>:<image_dir>, e.g. "
                                  "cocofmt:/data/instances_train.json:/data/images")
        ann, images = Path(annotations + ".json").expanduser(), Path(image_dir).expanduser()
        return CocoImdb(ann, images, name=_cocofmt_name(ann, images), classes=classes, cache_dir=cache, stat_cache=stat_cache)
    match = re.fullmatch(r"coco_(\d{4})_(\w+)", name)
    if match and match.group(2) in _COCO_SPLITS.get(match.group(1), ()):
        year, split = match.groups()
        folder = root / "coco"
        return CocoImdb(folder / "annotations" / f"instances_{split}{year}.json",
                        folder / "images" / _COCO_VIEWS.get(split + year, split + year), name=name,
                        classes=classes, cache_dir=cache, stat_cache=stat_cache)
    match = re.fullmatch(r"shapes_coco_(\w+)", name)
    if match and match.group(1) in _SHAPES_SPLITS:
        ensure_shapes_coco(ensure_shapes_dataset(root / "shapes", **shapes))
        annotations, images = shapes_coco_paths(root / "shapes", match.group(1))
        return CocoImdb(annotations, images, name=name, classes=classes, cache_dir=cache, stat_cache=stat_cache)
    return None


def get_imdb(name: str, *, data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
             use_diff: bool = False, classes: Sequence[str] | None = None, use_07_metric: bool | None = None,
             shapes_seed: int | None = None, n_jobs: int = 2, stat_cache: StatCache | None = None) -> Imdb:
    """The imdb called ``name`` (see the module docstring).

    Args:
        data_root: the data folder (default ``<repo>/data``); caches go to ``<data_root>/cache``
            unless ``cache_dir`` is given.
        use_diff: keep difficult objects in the gt roidb.
        classes: class names for ``vocfmt:`` data (default the 20 VOC classes); for COCO-format data a check (it
            must equal the file's category names, in order); not allowed for the other names.
        use_07_metric: force the VOC07 metric (default: year < 2010; ``vocfmt:`` data uses area under the curve);
            VOC-format data only.
        shapes_seed, n_jobs: seed and worker count for generating the shapes set (defaults: its standard seed).
        stat_cache: the file-hash cache of the imdb's content digest (default ``<cache>/stat_cache.json``).
    Raises:
        DataError: unknown name (the message lists the known ones) or missing data.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    cache = Path(cache_dir) if cache_dir is not None else root / "cache"
    common = dict(use_diff=use_diff, cache_dir=cache, use_07_metric=use_07_metric, stat_cache=stat_cache)
    if name.startswith("vocfmt:"):
        path_text, sep, split = name[len("vocfmt:"):].rpartition(":")
        if not sep or not path_text or not split:
            raise DataError(name, "expected vocfmt:<path>:<split>, e.g. vocfmt:/data/myset:trainval")
        plain_name(name, "split", split)
        path = Path(path_text).expanduser()
        return PascalVoc(split, "", data_path=path, name=_vocfmt_name(path, split), classes=classes,
                         devkit_path=path.parent, **common)
    shapes = {"n_jobs": n_jobs, **({} if shapes_seed is None else {"seed": shapes_seed})}
    coco_imdb = _coco_imdb(name, root, cache, classes, use_07_metric, shapes, stat_cache)
    if coco_imdb is not None:
        return coco_imdb
    if classes is not None:
        raise DataError(name, "a class list is only accepted for vocfmt: and COCO-format imdbs")
    match = re.fullmatch(r"voc_(\d{4})_(\w+)", name)
    if match and match.group(1) in _VOC_YEARS and match.group(2) in _VOC_SPLITS:
        year, split = match.groups()
        return PascalVoc(split, year, root / f"VOCdevkit{year}", **common)
    match = re.fullmatch(r"shapes_(\w+)", name)
    if match and match.group(1) in _SHAPES_SPLITS:
        seed_kw = {} if shapes_seed is None else {"seed": shapes_seed}
        devkit = ensure_shapes_dataset(root / "shapes", n_jobs=n_jobs, **seed_kw)
        return PascalVoc(match.group(1), "2007", devkit, name=name, classes=SHAPE_CLASSES, **common)
    raise DataError(name, f"unknown imdb name (known: {', '.join(list_imdbs())}; join several with '+')")


def get_imdbs(names: str, **options) -> list[Imdb]:
    """The imdbs of a ``'a+b'`` name, in order, for a combined roidb; they must share one class list.

    They share one stat cache (``options['stat_cache']`` or ``<cache>/stat_cache.json``), so
    ``roidb.content.content_listing(imdbs)`` gives the combined content.
    """
    parts = [p for p in names.split("+")]
    if any(not p for p in parts):
        raise DataError(names, "empty imdb name in a '+' list")
    imdbs = [get_imdb(parts[0], **options)]
    options = {**options, "stat_cache": imdbs[0].stat_cache}
    imdbs += [get_imdb(p, **options) for p in parts[1:]]
    for other in imdbs[1:]:
        if other.classes != imdbs[0].classes:
            raise DataError(names, f"{other.name} and {imdbs[0].name} have different class lists; "
                                   "they cannot be combined")
    return imdbs
