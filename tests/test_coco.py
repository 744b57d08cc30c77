"""roidb.coco: py-faster-rcnn's COCO conversion rules by hand, crowd handling through the training roidb and the
samplers, proposals and crowd filtering, the factory's COCO names, content_files, and one-line errors for bad JSON."""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from roidb.coco import (CocoImdb, coco_box_to_xyxy, filter_crowd_proposals, proposal_crowd_overlaps,
                        read_coco_json)
from roidb.errors import DataError
from roidb.factory import get_imdb, get_imdbs, list_imdbs
from roidb.minibatch import sample_rois
from roidb.training import compute_bbox_targets, filter_roidb, prepare_roidb

# Categories deliberately not in id order: classes follow the file's order, not the ids'.
CATEGORIES = [{"id": 7, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 90, "name": "traffic light"}]
IMAGES = [{"id": 42, "file_name": "a.jpg", "width": 100, "height": 80},
          {"id": 5, "file_name": "sub/b.png", "width": 60, "height": 50}]
ANNOTATIONS = [
    # pixel-aligned: covers pixels 10..29 x 20..59 -> [10, 20, 29, 59]
    {"id": 1, "image_id": 42, "category_id": 3, "bbox": [10, 20, 20, 40], "area": 800, "iscrowd": 0},
    # fractional, ends past the right edge: x2 = min(99, 90.5 + 19) = 99, y2 = 5.25 + 9.5 = 14.75
    {"id": 2, "image_id": 42, "category_id": 7, "bbox": [90.5, 5.25, 20, 10.5], "area": 123.5, "iscrowd": 0},
    # starts left of the image: x1 = 0 and x2 = 0 + (8 - 1) = 7 (py-faster-rcnn shifts, it does not clip)
    {"id": 3, "image_id": 42, "category_id": 90, "bbox": [-5, 0, 8, 4], "area": 32},
    # zero area: dropped
    {"id": 4, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 0, "iscrowd": 0},
    # starts right of the image: x2 = 99 < x1 = 120, dropped
    {"id": 5, "image_id": 42, "category_id": 3, "bbox": [120, 1, 5, 5], "area": 25, "iscrowd": 0},
    # crowd: kept with overlaps -1
    {"id": 6, "image_id": 42, "category_id": 7, "bbox": [40, 40, 30, 30], "area": 700, "iscrowd": 1},
    # zero width: a 1-pixel-wide box (max(0, w - 1) = 0) kept because area > 0
    {"id": 7, "image_id": 5, "category_id": 90, "bbox": [3, 4, 0, 6], "area": 2.5, "iscrowd": 0},
]


def write_images(image_dir: Path, images=IMAGES) -> None:
    for im in images:
        path = image_dir / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((im["height"], im["width"], 3), 90, np.uint8))


def make_coco(tmp_path: Path, doc: dict | list | None = None, name: str = "instances.json") -> tuple[Path, Path]:
    """Write ``doc`` (default the toy set) as ``name`` and the toy set's images; (JSON path, image folder)."""
    doc = doc if doc is not None else {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}
    image_dir = tmp_path / "images"
    write_images(image_dir)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path, image_dir


@pytest.fixture
def imdb(tmp_path) -> CocoImdb:
    path, image_dir = make_coco(tmp_path)
    return CocoImdb(path, image_dir, name="toy", cache_dir=tmp_path / "cache")


def test_classes_images_and_boxes_follow_py_faster_rcnn(imdb):
    assert imdb.classes == ("__background__", "zebra", "cat", "traffic light")
    assert imdb.category_ids == (7, 3, 90)
    assert imdb.image_index == ["42", "5"] and imdb.coco_image_ids == [42, 5]
    assert imdb.image_sizes().tolist() == [[80, 100], [50, 60]]
    e = imdb.gt_roidb()[0]
    np.testing.assert_array_equal(e["boxes"], np.array([[10, 20, 29, 59], [90.5, 5.25, 99, 14.75], [0, 0, 7, 3],
                                                        [40, 40, 69, 69]], np.float32))
    assert e["boxes"].dtype == np.float32 and e["gt_classes"].dtype == np.int32
    np.testing.assert_array_equal(e["gt_classes"], [2, 1, 3, 1])
    expected = np.zeros((4, 4), np.float32)
    expected[[0, 1, 2], [2, 1, 3]] = 1.0
    expected[3] = -1.0
    np.testing.assert_array_equal(e["gt_overlaps"], expected)
    np.testing.assert_array_equal(e["seg_areas"], [800, 123.5, 32, 700])  # the annotation's area
    e2 = imdb.gt_roidb()[1]
    np.testing.assert_array_equal(e2["boxes"], [[3, 4, 3, 9]])
    assert e2["gt_classes"].tolist() == [3]


def test_conversion_formula_by_hand():
    assert coco_box_to_xyxy([10, 20, 20, 40], 100, 80) == (10, 20, 29, 59)
    assert coco_box_to_xyxy([0, 0, 100, 80], 100, 80) == (0, 0, 99, 79)
    assert coco_box_to_xyxy([-3.5, -1, 10, 10], 100, 80) == (0, 0, 9, 9)
    assert coco_box_to_xyxy([95, 75, 20, 20], 100, 80) == (95, 75, 99, 79)
    assert coco_box_to_xyxy([2.5, 2.5, 0.5, 0.5], 100, 80) == (2.5, 2.5, 2.5, 2.5)


def test_gt_cache_hit_is_identical_and_keyed_by_content(imdb, tmp_path):
    first = imdb.gt_roidb()
    files = list((tmp_path / "cache").glob("toy_gt_roidb_*.pkl"))
    assert len(files) == 1
    again = CocoImdb(imdb.annotation_file, imdb.image_dir, name="toy", cache_dir=tmp_path / "cache").gt_roidb()
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    doc = json.loads(imdb.annotation_file.read_text())
    doc["annotations"][0]["bbox"] = [11, 20, 20, 40]
    imdb.annotation_file.write_text(json.dumps(doc))
    changed = CocoImdb(imdb.annotation_file, imdb.image_dir, name="toy", cache_dir=tmp_path / "cache")
    assert changed.gt_roidb()[0]["boxes"][0].tolist() == [11, 20, 30, 59]
    assert len(list((tmp_path / "cache").glob("toy_gt_roidb_*.pkl"))) == 2


def test_content_files(imdb):
    options, entries = imdb.content_files()
    assert options == {"format": "coco", "parser_version": 1,
                       "classes": ["__background__", "zebra", "cat", "traffic light"],
                       "category_ids": [7, 3, 90], "crowd_thresh": 0.7}
    json.dumps(options)
    assert "/" not in json.dumps(options)  # no paths
    assert entries == [("annotation", "", str(imdb.annotation_file)),
                       ("image", "42", str(imdb.image_dir / "a.jpg")),
                       ("image", "5", str(imdb.image_dir / "sub" / "b.png"))]
    assert all(Path(p).is_absolute() for _, _, p in entries)


def test_crowd_is_neither_foreground_nor_background(imdb):
    roidb = prepare_roidb(imdb)
    e = roidb[0]
    assert e["max_overlaps"].tolist() == [1, 1, 1, -1] and e["max_classes"].tolist() == [2, 1, 3, 0]
    # with every threshold that lets anything through, the crowd row is never drawn
    for lo in (0.0, -1.0, -5.0):
        keep, labels = sample_rois(e["max_overlaps"], e["max_classes"], fg_thresh=0.5, bg_thresh_hi=0.5,
                                   bg_thresh_lo=lo, rois_per_image=64, fg_rois_per_image=16,
                                   rng=np.random.default_rng(0))
        assert 3 not in keep.tolist() and sorted(keep.tolist()) == [0, 1, 2]
    targets = compute_bbox_targets(e["boxes"], e["max_overlaps"], e["max_classes"], 0.5)
    assert targets[3].tolist() == [0, 0, 0, 0, 0]
    only_crowd = {"max_overlaps": np.array([-1.0], np.float32)}
    assert filter_roidb([only_crowd], bg_thresh_lo=0.0) == []
    assert filter_roidb([only_crowd], bg_thresh_lo=-1.0) == []


def test_flipping_keeps_crowd_rows(imdb):
    imdb.append_flipped_images()
    e, f = imdb.roidb[0], imdb.roidb[2]
    assert f["flipped"] and imdb.image_index == ["42", "5", "42", "5"]
    np.testing.assert_array_equal(f["boxes"][:, 0], 100 - e["boxes"][:, 2] - 1)
    np.testing.assert_array_equal(f["gt_overlaps"], e["gt_overlaps"])


def test_crowd_overlap_equals_pycocotools():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 50, (40, 2))
    props = np.hstack([p, p + rng.uniform(0, 40, (40, 2))])
    c = rng.uniform(0, 50, (6, 2))
    crowd = np.hstack([c, c + rng.uniform(0, 40, (6, 2))])
    xywh = lambda b: np.hstack([b[:, :2], b[:, 2:] - b[:, :2] + 1])  # noqa: E731 (py-faster-rcnn's xyxy_to_xywh)
    expected = coco_mask.iou(xywh(props), xywh(crowd), [1] * len(crowd))
    np.testing.assert_allclose(proposal_crowd_overlaps(props, crowd), expected, rtol=1e-12, atol=1e-12)


def test_rpn_roidb_proposals_and_crowd(imdb, tmp_path):
    proposals = [np.array([
        [10, 20, 29, 59],    # the cat box itself: IoU 1 with the cat
        [45, 45, 60, 60],    # inside the crowd box [40, 40, 69, 69]: IoA 1 -> -1
        [40, 40, 69, 99],    # covers the crowd box: IoU 0.5, IoA 0.5 <= 0.7 -> 0 (never the crowd's class)
        [10, 20, 29, 39],    # half of the cat: IoU 0.5 with class 2
    ], np.float32), np.zeros((0, 4), np.float32)]
    path = tmp_path / "props.pkl"
    path.write_bytes(pickle.dumps(proposals, protocol=2))
    roidb = imdb.rpn_roidb(path)
    e = roidb[0]
    assert len(e["boxes"]) == 8 and e["gt_classes"].tolist() == [2, 1, 3, 1, 0, 0, 0, 0]
    ov = e["gt_overlaps"]
    assert ov[4].tolist() == [0, 0, 1, 0]
    assert ov[5].tolist() == [-1, -1, -1, -1]
    assert ov[6].tolist() == [0, 0, 0, 0]
    assert ov[7].tolist() == pytest.approx([0, 0, 0.5, 0])
    assert ov[3].tolist() == [-1, -1, -1, -1]  # the crowd GT row is untouched
    assert len(roidb[1]["boxes"]) == 1
    # the threshold is py-faster-rcnn's config['crowd_thresh']
    imdb.config["crowd_thresh"] = 0.4
    assert imdb.rpn_roidb(path)[0]["gt_overlaps"][6].tolist() == [-1, -1, -1, -1]


def test_filter_crowd_proposals_leaves_entries_without_crowd():
    entry = {"boxes": np.array([[0, 0, 9, 9], [0, 0, 9, 9]], np.float32), "gt_classes": np.array([1, 0], np.int32),
             "gt_overlaps": np.array([[0, 1], [0, 1]], np.float32)}
    before = copy.deepcopy(entry)
    filter_crowd_proposals([entry])
    np.testing.assert_array_equal(entry["gt_overlaps"], before["gt_overlaps"])


def test_class_list_check(tmp_path):
    path, image_dir = make_coco(tmp_path)
    CocoImdb(path, image_dir, name="t", classes=["zebra", "cat", "traffic light"], cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"instances.json: its categories \['zebra', 'cat', 'traffic light'\]"):
        CocoImdb(path, image_dir, name="t", classes=["cat", "zebra", "traffic light"], cache_dir=tmp_path)


# ---------------------------------------------------------------------- factory
def test_factory_names(tmp_path):
    names = list_imdbs()
    for name in ("coco_2014_train", "coco_2014_val", "coco_2014_minival", "coco_2014_valminusminival",
                 "coco_2017_train", "coco_2017_val", "shapes_coco_trainval", "shapes_coco_test",
                 "cocofmt:<annotations.json>:<image_dir>"):
        assert name in names
    coco = tmp_path / "coco"
    doc = {"images": [{"id": 1, "file_name": "x.jpg", "width": 8, "height": 8}], "annotations": [],
           "categories": [{"id": 1, "name": "person"}]}
    for split, folder in (("minival2014", "val2014"), ("valminusminival2014", "val2014"), ("train2017", "train2017"),
                          ("train2014", "train2014")):
        (coco / "annotations").mkdir(parents=True, exist_ok=True)
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
        write_images(coco / "images" / folder, doc["images"])
    for name, folder in (("coco_2014_minival", "val2014"), ("coco_2014_valminusminival", "val2014"),
                         ("coco_2017_train", "train2017"), ("coco_2014_train", "train2014")):
        imdb = get_imdb(name, data_root=tmp_path)
        assert imdb.name == name and imdb.image_dir == (coco / "images" / folder).resolve()
        assert imdb.image_path_at(0) == str((coco / "images" / folder / "x.jpg").resolve())
    with pytest.raises(DataError, match=r"instances_val2017.json: annotation file not found"):
        get_imdb("coco_2017_val", data_root=tmp_path)
    with pytest.raises(DataError, match="unknown imdb name"):
        get_imdb("coco_2017_minival", data_root=tmp_path)


def test_cocofmt_names_and_combinations(tmp_path):
    a, images = make_coco(tmp_path, name="a.json")
    b, _ = make_coco(tmp_path, name="b.json")
    imdb = get_imdb(f"cocofmt:{a}:{images}", data_root=tmp_path)
    assert imdb.name.startswith("cocofmt_a_") and imdb.num_images == 2
    both = get_imdbs(f"cocofmt:{a}:{images}+cocofmt:{b}:{images}", data_root=tmp_path)
    assert [i.num_images for i in both] == [2, 2] and both[0].name != both[1].name
    doc = {"images": IMAGES, "annotations": [], "categories": [{"id": 1, "name": "dog"}]}
    c, _ = make_coco(tmp_path, doc, name="c.json")
    with pytest.raises(DataError, match="different class lists"):
        get_imdbs(f"cocofmt:{a}:{images}+cocofmt:{c}:{images}", data_root=tmp_path)
    with pytest.raises(DataError, match=r"expected cocofmt:<annotations.json>:<image_dir>"):
        get_imdb(f"cocofmt:{a}", data_root=tmp_path)
    with pytest.raises(DataError, match="VOC07 metric choice applies to VOC-format"):
        get_imdb(f"cocofmt:{a}:{images}", data_root=tmp_path, use_07_metric=True)
    with pytest.raises(DataError, match="image folder not found"):
        get_imdb(f"cocofmt:{a}:{tmp_path / 'nowhere'}", data_root=tmp_path)


# ---------------------------------------------------------------------- bad input
def doc_with(**changes) -> dict:
    doc = copy.deepcopy({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES})
    doc.update(changes)
    return doc


def ann_with(i: int, **changes) -> list:
    anns = copy.deepcopy(ANNOTATIONS)
    anns[i].update(changes)
    return anns


BAD_DOCS = {
    "unknown_category": (doc_with(annotations=ann_with(2, category_id=99)),
                         r"annotation id 3: unknown category_id 99 \(known: 7, 3, 90\)"),
    "negative_width": (doc_with(annotations=ann_with(1, bbox=[1, 2, -3, 4])),
                       r"annotation id 2: bbox \[1, 2, -3, 4\] has a negative width or height"),
    "negative_height": (doc_with(annotations=ann_with(0, bbox=[1, 2, 3, -0.5])),
                        r"annotation id 1: bbox .* has a negative width or height"),
    "image_twice": (doc_with(images=IMAGES + [dict(IMAGES[0], file_name="c.jpg")]),
                    r"image id 42 appears twice in 'images'"),
    "annotation_twice": (doc_with(annotations=ANNOTATIONS + [dict(ANNOTATIONS[0])]),
                         r"annotation id 1 appears twice in 'annotations'"),
    "unknown_image": (doc_with(annotations=ann_with(4, image_id=43)), r"annotation id 5: image_id 43 is not in"),
    "top_level_list": ([1, 2], r"not a COCO instances file \(the top level is a list"),
    "no_images": ({"annotations": [], "categories": CATEGORIES}, r"not a COCO instances file: 'images' must be a "
                                                                 r"list \(missing\)"),
    "no_categories_list": (doc_with(categories={"1": "cat"}), r"'categories' must be a list \(a dict\)"),
    "empty_categories": (doc_with(categories=[]), r"'categories' is empty"),
    "bbox_three_numbers": (doc_with(annotations=ann_with(0, bbox=[1, 2, 3])), r"annotation id 1: 'bbox' must be"),
    "bbox_string": (doc_with(annotations=ann_with(0, bbox=[1, 2, "3", 4])), r"annotation id 1: 'bbox' must be"),
    "bool_id": (doc_with(annotations=ann_with(0, id=True)), r"annotations\[0\]: 'id' must be an integer"),
    "string_image_id": (doc_with(images=[dict(IMAGES[0], id="a")]), r"images\[0\]: 'id' must be an integer"),
    "iscrowd_2": (doc_with(annotations=ann_with(0, iscrowd=2)), r"annotation id 1: 'iscrowd' must be 0 or 1"),
    "negative_area": (doc_with(annotations=ann_with(0, area=-1)), r"annotation id 1: 'area' must be"),
    "bad_width": (doc_with(images=[dict(IMAGES[0], width=0)]), r"image id 42: 'width' and 'height' must be"),
    "duplicate_category": (doc_with(categories=CATEGORIES + [{"id": 3, "name": "dog"}]),
                           r"category id 3 appears twice"),
    "duplicate_name": (doc_with(categories=CATEGORIES + [{"id": 4, "name": "cat"}]),
                       r"category id 4: name 'cat' is used by two categories"),
    "slash_in_name": (doc_with(categories=[{"id": 1, "name": "../x"}]), r"category id 1: name '../x' cannot be"),
    "background_name": (doc_with(categories=[{"id": 1, "name": "__background__"}]), r"cannot be a class name"),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCS))
def test_bad_json_one_line_naming_file_and_id(tmp_path, case):
    doc, pattern = BAD_DOCS[case]
    path, image_dir = make_coco(tmp_path, doc)
    with pytest.raises(DataError) as err:
        CocoImdb(path, image_dir, name="bad", cache_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert __import__("re").search(pattern, message), message


@pytest.mark.parametrize("text, pattern", [
    ("{\"images\": [", r"not valid JSON \(line 1 column 13"),
    ("{\"images\": [], \"x\": NaN}", r"not valid JSON \(NaN is not a JSON number\)"),
    ("[" * 100000 + "]" * 100000, r"nested too deeply"),
    ("\xff\xfe garbage", r"not valid JSON"),
])
def test_not_json(tmp_path, text, pattern):
    path = tmp_path / "x.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=pattern) as err:
        read_coco_json(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_size_bound(tmp_path):
    path, image_dir = make_coco(tmp_path)
    size = path.stat().st_size
    with pytest.raises(DataError, match=rf"annotation file is {size} bytes, over the limit of 100"):
        CocoImdb(path, image_dir, name="big", max_json_bytes=100)
    CocoImdb(path, image_dir, name="ok", max_json_bytes=size, cache_dir=tmp_path)


def test_missing_image_file_names_file_and_image_id(imdb, tmp_path):
    (imdb.image_dir / "sub" / "b.png").unlink()
    with pytest.raises(DataError, match=r"sub/b.png: image file not found \(image id 5 of .*instances.json\)"):
        imdb.gt_roidb()
    with pytest.raises(DataError, match=r"image id 5 of"):
        imdb.image_path_at(1)


def test_image_size_must_match_the_file(tmp_path):
    path, image_dir = make_coco(tmp_path, doc_with(images=[dict(IMAGES[0], width=101), IMAGES[1]]))
    imdb = CocoImdb(path, image_dir, name="size", cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"instances.json: image id 42: the file says 101x80 but .*a.jpg is 100x80"):
        imdb.gt_roidb()


def test_file_name_cannot_leave_the_image_folder(tmp_path):
    images = [dict(IMAGES[0], file_name="../outside.jpg")]
    path, image_dir = make_coco(tmp_path, doc_with(images=images, annotations=[]))
    imdb = CocoImdb(path, image_dir, name="esc", cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"image id 42: file_name '../outside.jpg' leaves the image folder"):
        imdb.gt_roidb()


def test_rpn_batches_take_crowd_boxes_as_gt_like_py_faster_rcnn(imdb):
    """py-faster-rcnn's RPN data layer takes every row with gt_classes != 0, crowd boxes included."""
    from roidb.minibatch import get_minibatch

    entry = prepare_roidb(imdb)[0]
    blobs = get_minibatch([entry], imdb.num_classes, np.random.default_rng(0), scales=[80], max_size=1000,
                          pixel_means=np.zeros((1, 1, 3), np.float32), has_rpn=True)
    scale = blobs["im_info"][0, 2]
    np.testing.assert_allclose(blobs["gt_boxes"][:, :4], entry["boxes"] * scale, rtol=1e-6)
    assert blobs["gt_boxes"][:, 4].tolist() == [2, 1, 3, 1]
