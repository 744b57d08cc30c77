"""get_imdb / get_imdbs / list_imdbs: every kind of name, combined 'a+b' names, and unknown names."""
from pathlib import Path

import numpy as np
import pytest

from roidb.errors import DataError
from roidb.factory import get_imdb, get_imdbs, list_imdbs
from roidb.pascal_voc import VOC_CLASSES
from roidb.synthetic import SHAPE_CLASSES, read_manifest
from test_pascal_voc import make_voc

VOC_IMAGES = {"000005": (50, 40, [("dog", 1, 1, 20, 20, 0)]), "000007": (60, 30, [("cat", 5, 5, 9, 9, 0)])}


@pytest.fixture
def data_root(tmp_path):
    for year in ("2007", "2012"):
        for split in ("trainval", "test"):
            make_voc(tmp_path / f"VOCdevkit{year}", VOC_IMAGES, split=split, year=year)
    return tmp_path


def test_list_imdbs():
    names = list_imdbs()
    for year in ("2007", "2012"):
        for split in ("train", "val", "trainval", "test"):
            assert f"voc_{year}_{split}" in names
    assert "shapes_trainval" in names and "shapes_test" in names and "vocfmt:<path>:<split>" in names


def test_voc_names(data_root):
    imdb = get_imdb("voc_2007_trainval", data_root=data_root)
    assert imdb.name == "voc_2007_trainval" and imdb.classes == VOC_CLASSES and imdb.use_07_metric
    assert imdb.image_index == ["000005", "000007"]
    imdb.gt_roidb()
    assert list((data_root / "cache").glob("voc_2007_trainval_gt_roidb_*.pkl"))
    assert not get_imdb("voc_2012_test", data_root=data_root, cache_dir=data_root / "c2").use_07_metric


def test_missing_devkit_names_the_folder(tmp_path):
    with pytest.raises(DataError) as err:
        get_imdb("voc_2012_val", data_root=tmp_path)
    assert str(tmp_path / "VOCdevkit2012" / "VOC2012") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["voc_2010_trainval", "voc_2007_minival", "coco_2015_test", "coco_2017_minival",
                                  "shapes_val", "shapes_coco_val", ""])
def test_unknown_name_lists_the_known_ones(tmp_path, name):
    with pytest.raises(DataError) as err:
        get_imdb(name, data_root=tmp_path)
    message = str(err.value)
    assert "unknown imdb name" in message and "voc_2007_trainval" in message and "shapes_test" in message
    assert "vocfmt:<path>:<split>" in message and "\n" not in message


def test_vocfmt_reads_any_voc_folder(tmp_path):
    make_voc(tmp_path / "my data", {"x1": (40, 40, [("Widget", 1, 1, 10, 10, 0)])}, split="train", year="")
    folder = tmp_path / "my data" / "VOC"
    imdb = get_imdb(f"vocfmt:{folder}:train", classes=["widget"], cache_dir=tmp_path / "cache")
    assert imdb.classes == ("__background__", "widget") and imdb.num_images == 1 and not imdb.use_07_metric
    assert imdb.name.startswith("vocfmt_VOC_") and imdb.name.endswith("_train") and " " not in imdb.name
    assert imdb.gt_roidb()[0]["boxes"].tolist() == [[0, 0, 9, 9]]
    with pytest.raises(DataError, match="vocfmt:<path>:<split>"):
        get_imdb(f"vocfmt:{folder}")
    with pytest.raises(DataError, match="only accepted for vocfmt"):
        get_imdb("voc_2007_test", classes=["widget"])


def test_combined_names(data_root):
    imdbs = get_imdbs("voc_2007_trainval+voc_2012_trainval", data_root=data_root)
    assert [i.name for i in imdbs] == ["voc_2007_trainval", "voc_2012_trainval"]
    with pytest.raises(DataError, match="empty imdb name"):
        get_imdbs("voc_2007_trainval+", data_root=data_root)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_voc(root / "VOCdevkit2007", VOC_IMAGES, split="trainval")
    return root


def test_combined_names_must_share_classes(shapes_root):
    imdbs = get_imdbs("shapes_trainval+shapes_test", data_root=shapes_root)
    assert [i.name for i in imdbs] == ["shapes_trainval", "shapes_test"]
    with pytest.raises(DataError) as err:
        get_imdbs("shapes_trainval+voc_2007_trainval", data_root=shapes_root)
    assert "different class lists" in str(err.value) and "voc_2007_trainval" in str(err.value)


def test_shapes_generated_on_first_use(shapes_root):
    imdb = get_imdb("shapes_test", data_root=shapes_root)
    assert imdb.name == "shapes_test" and imdb.classes == ("__background__", *SHAPE_CLASSES)
    assert imdb.use_07_metric and imdb.num_images >= 200
    assert read_manifest(shapes_root / "shapes" / "VOC2007")["num_test"] == imdb.num_images
    assert len(imdb.gt_roidb()) == imdb.num_images
    again = get_imdb("shapes_trainval", data_root=shapes_root)  # reused, not regenerated
    assert again.num_images >= 400 and again.image_index[0] == "000001"


def test_shapes_coco_roidb_equals_the_voc_roidb_entry_by_entry(shapes_root):
    """The COCO-format copy of the shapes set: same images (no copy of the pixels), same boxes and classes.

    VOC drops difficult objects (use_diff False); the COCO copy holds them as crowd boxes (overlaps -1). So the
    COCO roidb equals the use_diff=True VOC roidb in boxes, classes and areas, and its non-crowd rows equal the
    default VOC roidb exactly."""
    for split in ("test", "trainval"):
        coco = get_imdb(f"shapes_coco_{split}", data_root=shapes_root)
        voc = get_imdb(f"shapes_{split}", data_root=shapes_root)
        voc_diff = get_imdb(f"shapes_{split}", data_root=shapes_root, use_diff=True,
                            cache_dir=shapes_root / "cache_diff")
        assert coco.name == f"shapes_coco_{split}" and coco.classes == voc.classes
        assert coco.image_index == [str(int(i)) for i in voc.image_index]
        assert [coco.image_path_at(i) for i in range(coco.num_images)] == \
            [str(Path(voc.image_path_at(i)).resolve()) for i in range(voc.num_images)]
        np.testing.assert_array_equal(coco.image_sizes(), voc.image_sizes())
        crowd_total = 0
        for c, v, d in zip(coco.gt_roidb(), voc.gt_roidb(), voc_diff.gt_roidb()):
            for key in ("boxes", "gt_classes", "seg_areas"):
                np.testing.assert_array_equal(c[key], d[key])
                assert c[key].dtype == d[key].dtype
            crowd = (c["gt_overlaps"] == -1).all(axis=1)
            crowd_total += int(crowd.sum())
            for key in ("boxes", "gt_classes", "gt_overlaps", "seg_areas"):
                np.testing.assert_array_equal(c[key][~crowd], v[key])
            assert c["flipped"] == v["flipped"] is False
        assert crowd_total == sum(len(d["boxes"]) - len(v["boxes"]) for d, v in
                                  zip(voc_diff.gt_roidb(), voc.gt_roidb())) > 0
