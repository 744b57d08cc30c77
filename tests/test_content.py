"""roidb.content: the stat cache, path-free content listings and digests, and how a change is described."""
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import roidb.content as content
from roidb.content import (StatCache, content_digest, content_listing, describe_content_change, load_listing,
                           store_listing)
from roidb.errors import DataError
from roidb.factory import get_imdb, get_imdbs
from roidb.pascal_voc import PARSER_VERSION, PascalVoc
from roidb.synthetic import SHAPE_CLASSES, ensure_shapes_dataset
from vocfmt_helpers import CLASSES, make_voc

IDS = ["im1", "im2", "im3", "im4"]
OLD = time.time() - 3600  # files older than the racy window, as real datasets are


def _age(root: Path, when: float = OLD) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (when, when))


@pytest.fixture
def voc(tmp_path) -> Path:
    """Four images: im1/im2 from vocfmt_helpers, im3 and im4 copies of them with other ids."""
    root = make_voc(tmp_path / "set", split="trainval")
    for new, old in (("im3", "im1"), ("im4", "im2")):
        shutil.copy(root / "JPEGImages" / f"{old}.jpg", root / "JPEGImages" / f"{new}.jpg")
        (root / "Annotations" / f"{new}.xml").write_text(
            (root / "Annotations" / f"{old}.xml").read_text().replace(f"{old}.jpg", f"{new}.jpg"))
    (root / "ImageSets/Main/trainval.txt").write_text("\n".join(IDS) + "\n")
    _age(root)
    return root


def _imdb(root: Path, tmp_path: Path, **kw) -> PascalVoc:
    kw.setdefault("classes", CLASSES)
    return PascalVoc("trainval", "", data_path=root, devkit_path=root.parent, name="set_trainval",
                     cache_dir=tmp_path / "cache", **kw)


def _listing(root: Path, tmp_path: Path, **kw) -> dict:
    return content_listing(_imdb(root, tmp_path, **kw), StatCache(tmp_path / "cache" / "stat_cache.json"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- the listing itself
def test_listing_is_the_files_sha256_and_the_options(voc, tmp_path):
    listing = _listing(voc, tmp_path)
    assert listing == {
        "options": {"format": "pascal_voc", "parser_version": PARSER_VERSION,
                    "classes": ["__background__", "cat", "dog"], "use_diff": False},
        "ids": IDS,
        "annotations": {i: _sha(voc / "Annotations" / f"{i}.xml") for i in IDS},
        "images": {i: _sha(voc / "JPEGImages" / f"{i}.jpg") for i in IDS}}
    assert str(voc) not in json.dumps(listing)
    canonical = json.dumps(listing, sort_keys=True, separators=(",", ":")).encode()
    assert content_digest(listing) == hashlib.sha256(b"frcnn-data-content/1\n" + canonical).hexdigest()
    assert _imdb(voc, tmp_path).gt_cache_key() == content_digest(listing)


def _edit_box(voc):
    xml = voc / "Annotations/im1.xml"
    xml.write_text(xml.read_text().replace("<xmin>11</xmin>", "<xmin>12</xmin>", 1))


def _swap_class(voc):
    xml = voc / "Annotations/im2.xml"
    xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>dog</name>"))


def _invert(voc, image_id="im1"):
    path = str(voc / "JPEGImages" / f"{image_id}.jpg")
    cv2.imwrite(path, 255 - cv2.imread(path))


def _drop(voc, image_id="im4"):
    (voc / "ImageSets/Main/trainval.txt").write_text("\n".join(i for i in IDS if i != image_id) + "\n")


def _reorder(voc):
    (voc / "ImageSets/Main/trainval.txt").write_text("\n".join(reversed(IDS)) + "\n")


def _everything(voc):
    _edit_box(voc)
    xml = voc / "Annotations/im3.xml"
    xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>cat</name>"))
    _invert(voc, "im2")
    _drop(voc, "im4")


@pytest.mark.parametrize("change, expected", [
    (_edit_box, "1 annotation"),
    (_swap_class, "1 annotation"),
    (_invert, "1 image"),
    (_drop, "image set"),
    (_reorder, "image set"),
    (_everything, "2 annotations, 1 image, image set"),
])
def test_each_change_changes_the_digest_and_is_named(voc, tmp_path, change, expected):
    before = _listing(voc, tmp_path)
    change(voc)
    after = _listing(voc, tmp_path)  # the same stat cache file, warm for the unchanged files
    assert content_digest(after) != content_digest(before)
    assert describe_content_change(before, after) == expected
    assert describe_content_change(before, before) == ""


def test_options_are_content(voc, tmp_path):
    base = _listing(voc, tmp_path)
    more_classes = _listing(voc, tmp_path, classes=[*CLASSES, "bird"])
    with_diff = _listing(voc, tmp_path, use_diff=True)
    assert len({content_digest(x) for x in (base, more_classes, with_diff)}) == 3
    assert describe_content_change(base, more_classes) == "class list"
    assert describe_content_change(base, with_diff) == "parse options"


def test_plurals_and_unknown_listings():
    old = {"options": {"classes": ["a"]}, "ids": ["1", "2", "3"], "annotations": {"1": "x", "2": "y", "3": "z"},
           "images": {"1": "p", "2": "q", "3": "r"}}
    new = json.loads(json.dumps(old))
    new["annotations"].update({"1": "X", "2": "Y"})
    new["images"].update({"1": "P", "2": "Q", "3": "R"})
    assert describe_content_change(old, new) == "2 annotations, 3 images"
    new["ids"].append("4")  # an added id is the image set, not one more image
    new["images"]["4"] = "s"
    assert describe_content_change(old, new) == "2 annotations, 3 images, image set"
    assert describe_content_change(None, new) == "content"
    assert describe_content_change({"something": "else"}, new) == "content"


def test_copy_elsewhere_gives_the_same_digest(voc, tmp_path):
    copy = tmp_path / "elsewhere" / "deeper" / "copy"
    shutil.copytree(voc, copy, copy_function=shutil.copyfile)  # new inodes and mtimes
    a = get_imdb(f"vocfmt:{voc}:trainval", classes=CLASSES, cache_dir=tmp_path / "cache")
    b = get_imdb(f"vocfmt:{copy}:trainval", classes=CLASSES, cache_dir=tmp_path / "cache")
    assert a.name != b.name
    assert content_digest(a.content_listing()) == content_digest(b.content_listing())
    assert a.gt_cache_key() == b.gt_cache_key()


# ---------------------------------------------------------------------- the stat cache
@pytest.fixture
def counted(monkeypatch):
    """Wraps roidb.content.hash_file (the only place a file's bytes are read) to record the paths it reads."""
    reads = []
    real = content.hash_file

    def counting(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(content, "hash_file", counting)
    return reads


def test_warm_cache_reads_nothing(voc, tmp_path, counted):
    cold = _listing(voc, tmp_path)
    assert sorted(counted) == sorted([f"{i}.xml" for i in IDS] + [f"{i}.jpg" for i in IDS])
    counted.clear()
    cache = StatCache(tmp_path / "cache" / "stat_cache.json")  # a new process: the cache comes from the file
    warm = content_listing(_imdb(voc, tmp_path), cache)
    assert counted == [] and warm == cold
    assert cache.files_hashed == 0 and cache.files_statted == 8
    assert not cache.save()  # nothing changed, nothing written


def test_touch_rehashes_only_that_file_and_keeps_the_digest(voc, tmp_path, counted):
    before = _listing(voc, tmp_path)
    counted.clear()
    os.utime(voc / "JPEGImages/im2.jpg", (OLD + 60, OLD + 60))
    after = _listing(voc, tmp_path)
    assert counted == ["im2.jpg"] and after == before
    counted.clear()
    assert _listing(voc, tmp_path) == before and counted == []  # the new stat was saved


def test_a_replaced_file_with_the_same_size_and_mtime_is_found_by_its_inode(voc, tmp_path, counted):
    before = _listing(voc, tmp_path)
    xml = voc / "Annotations/im1.xml"
    edited = xml.read_text().replace("<xmin>11</xmin>", "<xmin>12</xmin>", 1).encode()
    tmp = xml.with_suffix(".new")
    tmp.write_bytes(edited)
    os.utime(tmp, ns=(xml.stat().st_atime_ns, xml.stat().st_mtime_ns))
    os.replace(tmp, xml)  # how editors save: same size, same mtime here, another inode
    counted.clear()
    assert describe_content_change(before, _listing(voc, tmp_path)) == "1 annotation"
    assert counted == ["im1.xml"]


def test_an_in_place_edit_that_restores_the_mtime_is_found_by_its_ctime(voc, tmp_path, counted):
    before = _listing(voc, tmp_path)
    xml = voc / "Annotations/im1.xml"
    edited = xml.read_text().replace("<xmin>11</xmin>", "<xmin>12</xmin>", 1).encode()
    stat = xml.stat()
    with open(xml, "r+b") as f:  # same inode, same size
        f.write(edited)
    os.utime(xml, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # rsync -t, tar -x, cp -p all restore it
    assert xml.stat().st_ino == stat.st_ino and xml.stat().st_size == stat.st_size
    counted.clear()
    assert describe_content_change(before, _listing(voc, tmp_path)) == "1 annotation"
    assert counted == ["im1.xml"]


def test_a_file_hashed_right_after_a_write_is_not_trusted(tmp_path, counted):
    """git's racy-clean case: a second same-size write in the same timestamp tick must not be missed."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    cache = StatCache(tmp_path / "stat.json")
    assert cache.sha256(path) == hashlib.sha256(b"a" * 100).hexdigest()
    stat = path.stat()
    path.write_bytes(b"b" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the coarse clock did not move
    assert cache.sha256(path) == hashlib.sha256(b"b" * 100).hexdigest()
    assert counted == ["f.bin", "f.bin"]


@pytest.mark.parametrize("damage", [
    b"\x00\xffnot json at all",
    b'{"format": "frcnn-stat-cache", "version": 1, "entries": {',  # cut short by a crash
    b'["a", "foreign", "json", "file"]',
    b'{"format": "frcnn-stat-cache", "version": 99, "entries": {}}',
    b'{"format": "frcnn-stat-cache", "version": 1, "entries": {"/x": [1, 2, "3", 4, "nothex"], "/y": 7}}',
])
def test_a_damaged_cache_file_is_ignored_and_rebuilt(voc, tmp_path, counted, damage):
    expected = _listing(voc, tmp_path)
    path = tmp_path / "cache" / "stat_cache.json"
    path.write_bytes(damage)
    counted.clear()
    assert _listing(voc, tmp_path) == expected and len(counted) == 8
    doc = json.loads(path.read_bytes())
    assert doc["format"] == "frcnn-stat-cache" and len(doc["entries"]) == 8


def test_a_poisoned_entry_is_not_believed_when_the_stat_differs(voc, tmp_path):
    expected = _listing(voc, tmp_path)
    path = tmp_path / "cache" / "stat_cache.json"
    doc = json.loads(path.read_bytes())
    key = next(k for k in doc["entries"] if k.endswith("im1.jpg"))
    doc["entries"][key] = [doc["entries"][key][0] + 1, *doc["entries"][key][1:4], "0" * 64]
    path.write_text(json.dumps(doc))
    assert _listing(voc, tmp_path) == expected


def test_an_unwritable_cache_folder_is_not_an_error(voc, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    cache = StatCache(blocker / "stat_cache.json")
    listing = content_listing(_imdb(voc, tmp_path), cache)
    assert listing == _listing(voc, tmp_path) and cache.save() is False


def test_the_cache_is_bounded_and_keeps_what_was_used_last(tmp_path):
    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * 10)
    _age(tmp_path)
    first = StatCache(tmp_path / "c.json", max_entries=3)
    first.sha256_many(files[:4])
    assert first.save() and len(StatCache(tmp_path / "c.json")) == 3
    second = StatCache(tmp_path / "c.json", max_entries=3)
    second.sha256(files[4])
    assert second.save()
    kept = json.loads((tmp_path / "c.json").read_bytes())["entries"]
    assert sorted(Path(k).name for k in kept) == ["2.bin", "3.bin", "4.bin"]


def test_large_files_and_threads_agree_with_hashlib(tmp_path):
    rng = np.random.default_rng(0)
    big = tmp_path / "big.bin"
    big.write_bytes(rng.integers(0, 256, (1 << 24) + 12345, dtype=np.uint8).tobytes())  # the chunked path
    small = []
    for i in range(40):
        small.append(tmp_path / f"s{i}.bin")
        small[-1].write_bytes(rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8).tobytes())
    paths = [big, *small]
    for threads in (1, 4):
        assert StatCache(tmp_path / f"c{threads}.json", n_threads=threads).sha256_many(paths) == [
            _sha(p) for p in paths]


def test_symlinked_folders_share_entries(voc, tmp_path, counted):
    link = tmp_path / "link"
    link.symlink_to(voc, target_is_directory=True)
    first = _listing(voc, tmp_path)
    counted.clear()
    assert _listing(link, tmp_path) == first and counted == []


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("missing, needles", [
    ("JPEGImages/im3.jpg", ["JPEGImages/im3.jpg", "image file not found", "'im3'", "trainval.txt"]),
    ("Annotations/im2.xml", ["Annotations/im2.xml", "annotation file not found", "'im2'", "trainval.txt"]),
])
def test_a_missing_file_is_a_one_line_data_error(voc, tmp_path, missing, needles):
    (voc / missing).unlink()
    with pytest.raises(DataError) as err:
        _listing(voc, tmp_path)
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_an_unreadable_file_is_a_data_error(voc, tmp_path):
    (voc / "JPEGImages/im2.jpg").unlink()
    (voc / "JPEGImages/im2.jpg").mkdir()
    with pytest.raises(DataError, match="im2.jpg: image file is a directory, not a regular file"):
        _listing(voc, tmp_path)
    (voc / "JPEGImages/im2.jpg").rmdir()
    (voc / "JPEGImages/im2.jpg").write_bytes(b"x")
    (voc / "JPEGImages/im2.jpg").chmod(0)
    if os.access(voc / "JPEGImages/im2.jpg", os.R_OK):
        return  # root reads anything
    with pytest.raises(DataError, match="im2.jpg: cannot read image file"):
        _listing(voc, tmp_path)


# ---------------------------------------------------------------------- imdbs
def test_building_the_imdb_and_its_listing_parses_and_decodes_nothing(voc, tmp_path, monkeypatch):
    name = f"vocfmt:{voc}:trainval"
    expected = get_imdb(name, classes=CLASSES, cache_dir=tmp_path / "cache").content_listing()

    def forbidden(*args, **kwargs):
        raise AssertionError("read while only the listing was asked for")

    import roidb.pascal_voc as pascal_voc
    monkeypatch.setattr(pascal_voc, "parse_voc_annotation", forbidden)
    monkeypatch.setattr(pascal_voc, "read_image_size", forbidden)
    monkeypatch.setattr(cv2, "imread", forbidden)
    monkeypatch.setattr(content, "hash_file", forbidden)
    assert get_imdb(name, classes=CLASSES, cache_dir=tmp_path / "cache").content_listing() == expected


def test_gt_cache_hit_reads_no_annotation(voc, tmp_path, monkeypatch):
    roidb = _imdb(voc, tmp_path).gt_roidb()

    def forbidden(self):
        raise AssertionError("annotations read although the gt cache and the stat cache are warm")

    monkeypatch.setattr(PascalVoc, "_read_annotations", forbidden)
    monkeypatch.setattr(content, "hash_file", forbidden)
    again = _imdb(voc, tmp_path).gt_roidb()
    assert [e["boxes"].tolist() for e in again] == [e["boxes"].tolist() for e in roidb]


def test_flipping_does_not_change_the_listing(voc, tmp_path):
    imdb = _imdb(voc, tmp_path)
    before = imdb.content_listing()
    imdb.append_flipped_images()
    assert imdb.num_images == 8 and imdb.content_listing() == before


def test_combined_imdbs(voc, tmp_path):
    (voc / "ImageSets/Main/extra.txt").write_text("im2\nim1\n")
    opts = dict(classes=CLASSES, cache_dir=tmp_path / "cache")
    imdbs = get_imdbs(f"vocfmt:{voc}:trainval+vocfmt:{voc}:extra", **opts)
    assert imdbs[1].stat_cache is imdbs[0].stat_cache
    listing = content_listing(imdbs)
    assert listing["ids"] == [f"0:{i}" for i in IDS] + ["1:im2", "1:im1"]
    assert listing["images"]["1:im2"] == listing["images"]["0:im2"]
    assert listing["options"]["classes"] == ["__background__", "cat", "dog"]
    assert len(listing["options"]["parts"]) == 2
    assert content_listing(imdbs[:1]) == content_listing(imdbs[0])
    _invert(voc, "im2")
    after = content_listing(get_imdbs(f"vocfmt:{voc}:trainval+vocfmt:{voc}:extra", **opts))
    assert describe_content_change(listing, after) == "2 images"


def test_the_shapes_set_is_a_folder_like_any_other(tmp_path):
    small = dict(num_trainval=4, num_test=2, n_jobs=1)
    devkit = ensure_shapes_dataset(tmp_path / "shapes", seed=7, **small)
    shapes = PascalVoc("trainval", "2007", devkit, name="shapes_trainval", classes=SHAPE_CLASSES,
                       cache_dir=tmp_path / "cache")
    listing = shapes.content_listing()
    assert listing["ids"] == ["000001", "000002", "000003", "000004"]
    copy = shutil.copytree(devkit / "VOC2007", tmp_path / "mine")
    mine = get_imdb(f"vocfmt:{copy}:trainval", classes=SHAPE_CLASSES, cache_dir=tmp_path / "cache")
    assert content_digest(mine.content_listing()) == content_digest(listing)
    other = ensure_shapes_dataset(tmp_path / "other", seed=8, **small)
    reseeded = PascalVoc("trainval", "2007", other, name="shapes_trainval", classes=SHAPE_CLASSES,
                         cache_dir=tmp_path / "cache").content_listing()
    assert describe_content_change(listing, reseeded) == "4 annotations, 4 images"


# ---------------------------------------------------------------------- stored listings
def test_stored_listings_round_trip_and_are_bounded(voc, tmp_path):
    folder = tmp_path / "listings"
    first = _listing(voc, tmp_path)
    digest = store_listing(folder, first, keep=2)
    assert digest == content_digest(first) and load_listing(folder, digest) == first
    _invert(voc)
    second = _listing(voc, tmp_path)
    _drop(voc)
    third = _listing(voc, tmp_path)
    time.sleep(0.01)
    store_listing(folder, second, keep=2)
    time.sleep(0.01)
    store_listing(folder, third, keep=2)
    assert load_listing(folder, digest) is None
    assert load_listing(folder, content_digest(third)) == third
    (folder / f"{content_digest(third)}.json").write_text('{"ids": []}')  # damaged: not that listing
    assert load_listing(folder, content_digest(third)) is None
    assert load_listing(folder, "../../etc/passwd") is None
