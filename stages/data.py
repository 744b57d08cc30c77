"""The data inputs of the step graph: the content digest of the training imdb (`data:train`) and of the test imdb
(`data:test`), so that editing an annotation, an image or the image set makes exactly the steps that read that
imdb stale, and the same data in another folder is the same input.

The digest covers the image-set ids in order, each annotation file's bytes, each image file's bytes, the class
list and the parse options (roidb.content), never a path. Files are hashed through a stat cache
(`<DATA_ROOT>/cache/stat_cache.json`: path, size, mtime_ns, inode -> sha256), so a `status` with nothing changed
re-hashes nothing. Each digest's listing is kept in `<DATA_ROOT>/cache/content/` so that a later change can be named
("2 annotations, 1 image, image set").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import write_guard  # noqa: F401  (roidb's writes stay inside the roots)
from roidb.content import (StatCache, content_digest, content_listing, describe_content_change, load_listing,
                           store_listing)
from roidb.factory import get_imdbs

from .engine.config import Config, data_root
from .engine.runner import DataInput

__all__ = ["ImdbContent", "imdb_content", "train_data", "test_data"]


@dataclass
class ImdbContent:
    """The content digest of one imdb (or of an 'a+b' combination) and its per-file listing."""
    digest: str
    listing: dict[str, Any]
    listings_dir: Path

    def describe_change(self, old_digest: str) -> str:
        old = load_listing(self.listings_dir, old_digest)
        if old is None:
            return "content; no record of the earlier data"
        return describe_content_change(old, self.listing)


def imdb_content(config: Config, key: str, evaluated: bool = False) -> ImdbContent:
    """The content of the imdb (or 'a+b' imdbs) named by config key `key`, hashed through the stat cache.

    `evaluated`: the imdb is evaluated on, so how its name says to score it (VOC07 11-point AP or the area under
    the curve, VOC or COCO metrics) is part of its content too."""
    root = data_root(config)
    classes = list(config.get("PIPELINE.CLASSES")) or None
    imdbs = get_imdbs(config.get(key), data_root=root, classes=classes)
    listing = content_listing(imdbs, StatCache(root / "cache" / "stat_cache.json"))
    if evaluated:
        listing["options"]["evaluation"] = [{"imdb": type(imdb).__name__,
                                             "use_07_metric": bool(getattr(imdb, "use_07_metric", False))}
                                            for imdb in imdbs]
    folder = root / "cache" / "content"
    digest = content_digest(listing)
    if not (folder / f"{digest}.json").is_file():
        try:
            store_listing(folder, listing)
        except OSError:  # a read-only data root only loses the words for a later change, never the digest
            pass
    return ImdbContent(digest, listing, folder)


def train_data(config: Config) -> DataInput:
    """`data:train`: the content of PIPELINE.TRAIN_IMDB."""
    return imdb_content(config, "PIPELINE.TRAIN_IMDB")


def test_data(config: Config) -> DataInput:
    """`data:test`: the content of PIPELINE.TEST_IMDB."""
    return imdb_content(config, "PIPELINE.TEST_IMDB", evaluated=True)
