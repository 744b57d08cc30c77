"""The imdb factory: ``get_imdb(name)`` by name, like py-faster-rcnn's ``datasets.factory``.

Known names:
    ``voc_<year>_<split>``     year 2007 or 2012, split train/val/trainval/test; devkit ``<data_root>/VOCdevkit<year>``
    ``shapes_<split>``         trainval/test of the synthetic demo set, generated on first use under
                               ``<data_root>/shapes`` (VOC2007 layout, so the VOC07 metric)
    ``vocfmt:<path>:<split>``  any VOC-format folder (the one holding JPEGImages, Annotations, ImageSets)
    ``a+b``                    several of the above for a combined training roidb: :func:`get_imdbs`
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

from roidb.content import StatCache
from roidb.errors import DataError
from roidb.imdb import Imdb, default_data_root
from roidb.pascal_voc import PascalVoc
from roidb.synthetic import SHAPE_CLASSES, ensure_shapes_dataset

__all__ = ["get_imdb", "get_imdbs", "list_imdbs"]

_VOC_YEARS = ("2007", "2012")
_VOC_SPLITS = ("train", "val", "trainval", "test")
_SHAPES_SPLITS = ("trainval", "test")


def list_imdbs() -> list[str]:
    """The fixed names :func:`get_imdb` knows (plus the ``vocfmt:<path>:<split>`` pattern)."""
    names = [f"voc_{y}_{s}" for y in _VOC_YEARS for s in _VOC_SPLITS]
    names += [f"shapes_{s}" for s in _SHAPES_SPLITS]
    return names + ["vocfmt:<path>:<split>"]


def _vocfmt_name(path: Path, split: str) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.resolve().name) or "root"
    return f"vocfmt_{stem}_{digest}_{split}"


def get_imdb(name: str, *, data_root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
             use_diff: bool = False, classes: Sequence[str] | None = None, use_07_metric: bool | None = None,
             shapes_seed: int | None = None, n_jobs: int = 2, stat_cache: StatCache | None = None) -> Imdb:
    """The imdb called ``name`` (see the module docstring).

    Args:
        data_root: the data folder (default ``<repo>/data``); caches go to ``<data_root>/cache``
            unless ``cache_dir`` is given.
        use_diff: keep difficult objects in the gt roidb.
        classes: class names for ``vocfmt:`` data (default the 20 VOC classes); not allowed for the others.
        use_07_metric: force the VOC07 metric (default: year < 2010; ``vocfmt:`` data uses area under the curve).
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
        path = Path(path_text).expanduser()
        return PascalVoc(split, "", data_path=path, name=_vocfmt_name(path, split), classes=classes,
                         devkit_path=path.parent, **common)
    if classes is not None:
        raise DataError(name, "a class list is only accepted for vocfmt:<path>:<split> imdbs")
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
