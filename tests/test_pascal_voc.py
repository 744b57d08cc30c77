"""pascal_voc: py-faster-rcnn's parse rules, one-line errors for every kind of bad data, the keyed gt cache, eval."""
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from roidb.errors import DataError
from roidb.pascal_voc import VOC_CLASSES, PascalVoc
from roidb.safe_pickle import safe_load


def voc_xml(w, h, objects, size=True):
    """A VOC annotation; objects are (name, xmin, ymin, xmax, ymax, difficult or None), 1-based."""
    parts = ["<annotation><folder>VOC2007</folder>"]
    if size:
        parts.append(f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>")
    for name, x1, y1, x2, y2, diff in objects:
        d = "" if diff is None else f"<difficult>{diff}</difficult>"
        parts.append(f"<object><name>{name}</name>{d}<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    return "".join(parts) + "</annotation>"


def make_voc(root, images, split="trainval", year="2007"):
    """Write a VOCdevkit under ``root``: images maps id -> (width, height, objects); returns the devkit path."""
    voc = Path(root) / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (w, h, objects) in images.items():
        cv2.imwrite(str(voc / "JPEGImages" / f"{image_id}.jpg"), np.full((h, w, 3), 100, np.uint8))
        (voc / "Annotations" / f"{image_id}.xml").write_text(voc_xml(w, h, objects))
    (voc / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
    return Path(root)


BASIC = {
    "000001": (100, 80, [("dog", 10, 20, 30, 40, 0), ("  Person ", 1, 1, 100, 80, None), ("cat", 5, 5, 9, 9, 1)]),
    "000002": (60, 50, [("car", 2, 3, 4, 5, "0")]),
    "000003": (30, 20, [("bird", 2, 3, 4, 5, 1)]),  # only a difficult object: an empty entry
}


@pytest.fixture
def basic(tmp_path):
    return make_voc(tmp_path / "devkit", BASIC), tmp_path / "cache"


def test_parse_rules_match_py_faster_rcnn(basic):
    devkit, cache = basic
    imdb = PascalVoc("trainval", 2007, devkit, cache_dir=cache)
    assert imdb.name == "voc_2007_trainval" and imdb.num_classes == 21 and imdb.classes == VOC_CLASSES
    assert imdb.image_index == ["000001", "000002", "000003"] and imdb.use_07_metric
    roidb = imdb.gt_roidb()
    e = roidb[0]
    # 1-based XML -> 0-based; the difficult cat is dropped; a missing <difficult> is 0; names stripped + lowered.
    np.testing.assert_array_equal(e["boxes"], [[9, 19, 29, 39], [0, 0, 99, 79]])
    assert e["boxes"].dtype == np.float32 and e["gt_classes"].dtype == np.int32
    np.testing.assert_array_equal(e["gt_classes"], [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")])
    assert e["gt_overlaps"].dtype == np.float32 and e["gt_overlaps"].shape == (2, 21)
    np.testing.assert_array_equal(e["gt_overlaps"].sum(1), [1, 1])
    assert e["gt_overlaps"][0, VOC_CLASSES.index("dog")] == 1.0
    np.testing.assert_array_equal(e["seg_areas"], [21 * 21, 100 * 80])
    assert e["flipped"] is False
    np.testing.assert_array_equal(imdb.image_sizes(), [[80, 100], [50, 60], [20, 30]])
    empty = roidb[2]
    assert empty["boxes"].shape == (0, 4) and empty["gt_overlaps"].shape == (0, 21)
    assert empty["boxes"].dtype == np.float32 and empty["gt_classes"].dtype == np.int32
    with_diff = PascalVoc("trainval", 2007, devkit, cache_dir=cache, use_diff=True).gt_roidb()
    np.testing.assert_array_equal(with_diff[0]["gt_classes"][-1], VOC_CLASSES.index("cat"))


def test_custom_class_list_and_2012_metric(tmp_path):
    devkit = make_voc(tmp_path, {"a": (40, 40, [("Widget", 1, 1, 10, 10, 0)])}, year="2012")
    imdb = PascalVoc("trainval", "2012", devkit, classes=["widget", "gadget"], cache_dir=tmp_path / "c")
    assert imdb.classes == ("__background__", "widget", "gadget") and not imdb.use_07_metric
    assert imdb.gt_roidb()[0]["gt_classes"].tolist() == [1]
    with pytest.raises(DataError, match="duplicate"):
        PascalVoc("trainval", "2012", devkit, classes=["widget", "Widget "])


def _one_line(err, *needles):
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, (needle, message)


def _broken(tmp_path, objects, w=50, h=40):
    return make_voc(tmp_path / "devkit", {"000007": (w, h, objects)})


@pytest.mark.parametrize("objects, needles", [
    ([("dog", 1, 1, 5, 5, 0), ("dgo", 1, 1, 5, 5, 0)], ["object[1]", "unknown class 'dgo'", "aeroplane"]),
    ([("dog", 20, 5, 10, 9, 0)], ["object[0]", "xmax < xmin"]),
    ([("dog", 1, 9, 5, 3, 0)], ["object[0]", "ymax < ymin"]),
    ([("dog", 1, 1, 51, 10, 0)], ["object[0]", "outside", "50x40"]),
    ([("dog", 1, 1, 10, 41, 0)], ["object[0]", "outside"]),
    ([("dog", -3, 1, 10, 10, 0)], ["object[0]", "outside"]),
    ([("dog", "abc", 1, 10, 10, 0)], ["object[0]", "not a number"]),
    ([("dog", 1, 1, 5, 5, "maybe")], ["object[0]", "<difficult>"]),
])
def test_bad_objects_name_file_and_object(tmp_path, objects, needles):
    imdb = PascalVoc("trainval", 2007, _broken(tmp_path, objects), cache_dir=tmp_path / "c")
    with pytest.raises(DataError) as err:
        imdb.gt_roidb()
    _one_line(err, imdb.annotation_path("000007"), *needles)


def test_malformed_xml(tmp_path):
    devkit = _broken(tmp_path, [("dog", 1, 1, 5, 5, 0)])
    xml = devkit / "VOC2007/Annotations/000007.xml"
    xml.write_text("<annotation><object><name>dog</name></annotation>")
    with pytest.raises(DataError) as err:
        PascalVoc("trainval", 2007, devkit, cache_dir=tmp_path / "c").gt_roidb()
    _one_line(err, xml, "malformed XML")


def test_size_disagreeing_with_jpeg(tmp_path):
    devkit = _broken(tmp_path, [("dog", 1, 1, 5, 5, 0)])
    xml = devkit / "VOC2007/Annotations/000007.xml"
    xml.write_text(voc_xml(64, 40, [("dog", 1, 1, 5, 5, 0)]))
    with pytest.raises(DataError) as err:
        PascalVoc("trainval", 2007, devkit, cache_dir=tmp_path / "c").gt_roidb()
    _one_line(err, xml, "64x40", "50x40")


def test_missing_size_uses_the_jpeg_header(tmp_path):
    devkit = _broken(tmp_path, [])
    (devkit / "VOC2007/Annotations/000007.xml").write_text(voc_xml(0, 0, [("dog", 1, 1, 50, 40, 0)], size=False))
    imdb = PascalVoc("trainval", 2007, devkit, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(imdb.gt_roidb()[0]["boxes"], [[0, 0, 49, 39]])
    np.testing.assert_array_equal(imdb.image_sizes(), [[40, 50]])


@pytest.mark.parametrize("damage, needles", [
    (lambda voc: (voc / "JPEGImages/000007.jpg").unlink(), ["JPEGImages", "not found", "trainval.txt"]),
    (lambda voc: (voc / "JPEGImages/000007.jpg").write_bytes(b""), ["JPEGImages", "0 bytes"]),
    (lambda voc: (voc / "JPEGImages/000007.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF"),
     ["JPEGImages", "truncated JPEG"]),
    (lambda voc: (voc / "JPEGImages/000007.jpg").write_bytes(b"GIF89a nonsense"), ["JPEGImages", "not a readable"]),
    (lambda voc: (voc / "Annotations/000007.xml").unlink(), ["000007.xml", "annotation file not found"]),
])
def test_missing_or_unreadable_files(tmp_path, damage, needles):
    devkit = _broken(tmp_path, [("dog", 1, 1, 5, 5, 0)])
    damage(devkit / "VOC2007")
    with pytest.raises(DataError) as err:
        PascalVoc("trainval", 2007, devkit, cache_dir=tmp_path / "c").gt_roidb()
    _one_line(err, *needles)


def test_missing_folders_and_image_sets(tmp_path):
    with pytest.raises(DataError) as err:
        PascalVoc("trainval", 2007, tmp_path / "nowhere")
    _one_line(err, tmp_path / "nowhere" / "VOC2007", "not found")
    devkit = _broken(tmp_path, [("dog", 1, 1, 5, 5, 0)])
    with pytest.raises(DataError) as err:
        PascalVoc("test", 2007, devkit)
    _one_line(err, "test.txt", "not found")
    (devkit / "VOC2007/ImageSets/Main/trainval.txt").write_text("\n  \n")
    with pytest.raises(DataError) as err:
        PascalVoc("trainval", 2007, devkit)
    _one_line(err, "trainval.txt", "empty")
    os.rename(devkit / "VOC2007/Annotations", devkit / "VOC2007/Anno")
    with pytest.raises(DataError) as err:
        PascalVoc("trainval", 2007, devkit)
    _one_line(err, devkit / "VOC2007/Annotations", "folder not found")


def test_zero_coordinates_clamp_with_a_counting_warning(tmp_path):
    devkit = _broken(tmp_path, [("dog", 0, 0, 10, 10, 0), ("cat", 0, 5, 20, 30, 0), ("car", 3, 3, 9, 9, 0)])
    imdb = PascalVoc("trainval", 2007, devkit, cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="2 boxes had a 0 coordinate"):
        roidb = imdb.gt_roidb()
    np.testing.assert_array_equal(roidb[0]["boxes"][:, :2], [[0, 0], [0, 4], [2, 2]])
    imdb.append_flipped_images()  # x1 = 0 flips to x2' = W - 1, never to 65535
    np.testing.assert_array_equal(imdb.roidb[1]["boxes"][:, [0, 2]], [[40, 49], [30, 49], [41, 47]])


def test_coordinates_beyond_uint16_never_wrap(tmp_path):
    devkit = _broken(tmp_path, [])
    w = 70000  # a PNG header may claim it; the parser only reads the header
    png = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + w.to_bytes(4, "big") + (20).to_bytes(4, "big") + b"\x08\x02"
    (devkit / "VOC2007/JPEGImages/000007.jpg").write_bytes(png)
    (devkit / "VOC2007/Annotations/000007.xml").write_text(voc_xml(w, 20, [("dog", 66000, 1, 70000, 20, 0)]))
    imdb = PascalVoc("trainval", 2007, devkit, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(imdb.gt_roidb()[0]["boxes"], [[65999, 0, 69999, 19]])
    imdb.append_flipped_images()
    np.testing.assert_array_equal(imdb.roidb[1]["boxes"], [[0, 0, 4000, 19]])


def test_cache_is_reused_then_invalidated_by_an_edit(basic, monkeypatch):
    devkit, cache = basic
    first = PascalVoc("trainval", 2007, devkit, cache_dir=cache)
    parsed = first.gt_roidb()
    files = sorted(cache.glob("voc_2007_trainval_gt_roidb_*.pkl"))
    assert len(files) == 1 and not list(cache.glob(".*tmp"))

    def no_parse(self):
        raise AssertionError("parsed although the cache matches")

    monkeypatch.setattr(PascalVoc, "_load_gt_roidb", no_parse)
    cached = PascalVoc("trainval", 2007, devkit, cache_dir=cache)
    loaded = cached.gt_roidb()
    assert loaded[0]["boxes"].tolist() == [[9, 19, 29, 39], [0, 0, 99, 79]]
    for want, have in zip(parsed, loaded):
        assert sorted(want) == sorted(have) and have["flipped"] is False
        for k, v in want.items():
            if isinstance(v, np.ndarray):
                assert have[k].dtype == v.dtype and have[k].shape == v.shape
                np.testing.assert_array_equal(have[k], v)
    np.testing.assert_array_equal(cached.image_sizes(), [[80, 100], [50, 60], [20, 30]])
    monkeypatch.undo()

    xml = devkit / "VOC2007/Annotations/000001.xml"
    xml.write_text(xml.read_text().replace("<name>dog</name>", "<name>horse</name>").replace(">30<", ">31<"))
    edited = PascalVoc("trainval", 2007, devkit, cache_dir=cache).gt_roidb()
    assert edited[0]["gt_classes"][0] == VOC_CLASSES.index("horse")
    assert edited[0]["boxes"][0].tolist() == [9, 19, 30, 39]
    assert len(list(cache.glob("voc_2007_trainval_gt_roidb_*.pkl"))) == 2
    # Parse options are part of the key as well.
    keys = {PascalVoc("trainval", 2007, devkit, cache_dir=cache, use_diff=d).gt_cache_key() for d in (False, True)}
    assert len(keys) == 2


def _perfect(imdb):
    roidb = imdb.gt_roidb()
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in roidb] for _ in imdb.classes]
    for i, e in enumerate(roidb):
        for box, cls in zip(e["boxes"], e["gt_classes"]):
            all_boxes[cls][i] = np.vstack([all_boxes[cls][i], np.r_[box, 0.9][None]]).astype(np.float32)
    return all_boxes


EVAL_SET = {
    "000001": (100, 80, [("dog", 10, 20, 30, 40, 0), ("dog", 50, 10, 90, 70, 0), ("cat", 1, 1, 20, 20, 0)]),
    "000002": (60, 50, [("cat", 2, 3, 40, 45, 0), ("dog", 5, 5, 9, 9, 1)]),
}


@pytest.mark.parametrize("use_07, dog_ap", [(True, 6 / 11), (False, 0.5)])
def test_evaluate_detections_by_hand(tmp_path, use_07, dog_ap):
    devkit = make_voc(tmp_path / "devkit", EVAL_SET, split="test")
    imdb = PascalVoc("test", 2007, devkit, classes=["dog", "cat"], cache_dir=tmp_path / "c", use_07_metric=use_07)
    all_boxes = _perfect(imdb)
    all_boxes[1][0] = all_boxes[1][0][:1]  # drop one of the two dogs: recall 0.5 at precision 1
    out = tmp_path / "out"
    result = imdb.evaluate_detections(all_boxes, out)
    assert result["aps"]["cat"] == pytest.approx(1.0)
    assert result["aps"]["dog"] == pytest.approx(dog_ap, abs=1e-9)
    assert result["map"] == pytest.approx((1.0 + dog_ap) / 2, abs=1e-9)
    assert not list(out.glob("comp4*"))  # salted results files are cleaned up outside competition mode
    pr = safe_load(out / "dog_pr.pkl")
    assert pr["ap"] == pytest.approx(dog_ap) and pr["rec"][-1] == pytest.approx(0.5)


def test_competition_mode_keeps_plain_result_files(tmp_path):
    devkit = make_voc(tmp_path / "devkit", EVAL_SET, split="test")
    imdb = PascalVoc("test", 2007, devkit, classes=["dog", "cat"], cache_dir=tmp_path / "c")
    imdb.competition_mode(True)
    result = imdb.evaluate_detections(_perfect(imdb), tmp_path / "out")
    assert result["map"] == pytest.approx(1.0)
    lines = (tmp_path / "out" / "comp4_det_test_cat.txt").read_text().splitlines()
    assert lines == ["000001 0.900 1.0 1.0 20.0 20.0", "000002 0.900 2.0 3.0 40.0 45.0"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="classes"):
            imdb.evaluate_detections(_perfect(imdb)[:2], tmp_path / "out")
