"""imdb base: flipping, proposal loading and merging (py-faster-rcnn's rpn_roidb), proposal-method switching."""
import pickle

import numpy as np
import pytest

from roidb.errors import DataError, UnsafePickleError
from roidb.imdb import Imdb, read_image_size
from roidb.pascal_voc import PascalVoc
from test_pascal_voc import make_voc
from test_safe_pickle import py_faster_rcnn_pickle

DOG, CAT = 1, 2
IMAGES = {
    "a": (100, 80, [("dog", 10, 20, 30, 40, 0), ("cat", 1, 1, 100, 80, 0)]),   # 0-based [9,19,29,39], [0,0,99,79]
    "b": (60, 50, [("cat", 1, 1, 10, 10, 0)]),                                  # 0-based [0,0,9,9]
}


@pytest.fixture
def imdb(tmp_path):
    devkit = make_voc(tmp_path / "devkit", IMAGES)
    return PascalVoc("trainval", 2007, devkit, classes=["dog", "cat"], cache_dir=tmp_path / "cache")


def test_imdb_is_abstract():
    with pytest.raises(TypeError):
        Imdb("x", ["__background__", "a"])


def test_identity(imdb):
    assert imdb.num_images == 2 and imdb.num_classes == 3 and imdb.classes[0] == "__background__"
    assert imdb.image_path_at(1).endswith("JPEGImages/b.jpg")
    assert imdb.image_size_at(0) == (80, 100) and read_image_size(imdb.image_path_at(1)) == (50, 60)


def test_flipping_by_hand(imdb):
    before = [e["boxes"].copy() for e in imdb.roidb]
    imdb.append_flipped_images()
    roidb = imdb.roidb
    assert imdb.num_images == 4 and imdb.image_index == ["a", "b", "a", "b"]
    # x1' = W - x2 - 1, x2' = W - x1 - 1 with W = 100 and 60.
    np.testing.assert_array_equal(roidb[2]["boxes"], [[100 - 29 - 1, 19, 100 - 9 - 1, 39], [0, 0, 99, 79]])
    np.testing.assert_array_equal(roidb[3]["boxes"], [[60 - 9 - 1, 0, 60 - 0 - 1, 9]])
    assert roidb[2]["flipped"] is True and roidb[0]["flipped"] is False
    np.testing.assert_array_equal(roidb[0]["boxes"], before[0])
    np.testing.assert_array_equal(roidb[2]["gt_classes"], roidb[0]["gt_classes"])
    np.testing.assert_array_equal(roidb[2]["gt_overlaps"], roidb[0]["gt_overlaps"])
    assert roidb[2]["boxes"].dtype == np.float32
    assert imdb.image_size_at(3) == (50, 60) and imdb.image_path_at(3) == imdb.image_path_at(1)


def _dump(path, arrays, protocol=2):
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    return path


def test_rpn_roidb_merges_gt_first_with_overlaps_by_hand(imdb, tmp_path):
    props = [np.array([[9, 19, 29, 49],      # dog [9,19,29,39]: 21*21 / (21*31) = 21/31; vs cat: 441/8000
                       [200, 200, 210, 210],  # nothing
                       [0, 0, 49, 39]], np.float32),  # cat: 2000/8000 = 0.25 beats dog (inter 21*21/(2000+441-441))
             np.zeros((0, 4), np.float32)]
    imdb.config["rpn_file"] = str(_dump(tmp_path / "p.pkl", props))
    imdb.set_proposal_method("rpn")
    roidb = imdb.roidb
    e = roidb[0]
    np.testing.assert_array_equal(e["boxes"][:2], [[9, 19, 29, 39], [0, 0, 99, 79]])
    np.testing.assert_array_equal(e["boxes"][2:], props[0])
    np.testing.assert_array_equal(e["gt_classes"], [DOG, CAT, 0, 0, 0])
    want = np.zeros((5, 3), np.float32)
    want[0, DOG] = want[1, CAT] = 1.0
    want[2, DOG] = 21 / 31
    want[4, CAT] = 0.25
    np.testing.assert_allclose(e["gt_overlaps"], want, rtol=1e-6)
    np.testing.assert_array_equal(e["seg_areas"], [441, 8000, 0, 0, 0])
    assert [e[k].dtype for k in ("boxes", "gt_classes", "gt_overlaps", "seg_areas")] == \
        [np.float32, np.int32, np.float32, np.float32]
    assert len(roidb[1]["boxes"]) == 1 and roidb[1]["gt_overlaps"].shape == (1, 3)
    # The cached gt roidb is untouched by the merge.
    assert len(imdb.gt_roidb()[0]["boxes"]) == 2


def test_py_faster_rcnn_py2_pickle_loads_into_rpn_roidb(imdb, tmp_path):
    path = tmp_path / "vgg16_rpn_stage1_iter_80000_proposals.pkl"
    path.write_bytes(py_faster_rcnn_pickle([np.array([[9, 19, 29, 39]], np.float32), np.zeros((0, 4), np.float32)]))
    roidb = imdb.rpn_roidb(path)
    assert roidb[0]["gt_overlaps"][2, DOG] == pytest.approx(1.0)


def test_create_roidb_from_box_list_without_gt(imdb):
    roidb = imdb.create_roidb_from_box_list([np.array([[0, 0, 5, 5]]), np.zeros((0, 4))], None)
    assert roidb[0]["gt_overlaps"].tolist() == [[0, 0, 0]] and roidb[0]["gt_classes"].tolist() == [0]
    with pytest.raises(ValueError):
        Imdb.merge_roidbs(roidb, roidb[:1])


@pytest.mark.parametrize("props, needles", [
    ([np.zeros((1, 4), np.float32)], ["has 1 images", "has 2"]),
    ([np.zeros((1, 4)), np.array([[0, 0, np.nan, 5]])], ["image 1 (b)", "NaN"]),
    ([np.zeros((1, 4)), np.array([[0, 0, np.inf, 5]])], ["image 1 (b)", "infinite"]),
    ([np.zeros((1, 5)), np.zeros((1, 4))], ["image 0 (a)", "(N, 4)", "(1, 5)"]),
    ([np.zeros((1, 4)), [[0, 0, 1, 1]]], ["image 1 (b)", "(N, 4)"]),
    ([np.array([[5, 0, 1, 4]]), np.zeros((1, 4))], ["image 0 (a)", "x2 < x1"]),
    ({"a": 1}, ["list of (N, 4) arrays", "dict"]),
])
def test_bad_proposal_files(imdb, tmp_path, props, needles):
    path = _dump(tmp_path / "bad.pkl", props)
    with pytest.raises(DataError) as err:
        imdb.rpn_roidb(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_hostile_proposal_file_is_refused(imdb, tmp_path):
    target = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))

    with pytest.raises(UnsafePickleError):
        imdb.rpn_roidb(_dump(tmp_path / "evil.pkl", [np.zeros((1, 4)), Evil()]))
    assert not target.exists()


def test_proposal_method_switching(imdb, tmp_path):
    assert len(imdb.roidb[0]["boxes"]) == 2
    with pytest.raises(DataError, match="needs a proposal file"):
        imdb.set_proposal_method("rpn")
        imdb.roidb
    imdb.config["rpn_file"] = str(_dump(tmp_path / "p.pkl", [np.zeros((3, 4)), np.zeros((1, 4))]))
    imdb.set_proposal_method("rpn")
    assert len(imdb.roidb[0]["boxes"]) == 5
    imdb.set_proposal_method("gt")
    assert len(imdb.roidb[0]["boxes"]) == 2
    with pytest.raises(DataError, match="selective_search.*known: gt, rpn"):
        imdb.set_proposal_method("selective_search")
