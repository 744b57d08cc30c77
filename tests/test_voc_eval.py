"""VOC evaluation: hand-built cases, the results-file format, and agreement with py-faster-rcnn's algorithm."""
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from roidb.errors import DataError
from roidb.voc_eval import parse_rec, voc_ap, voc_eval, write_voc_results_files


def write_xml(path, objects):
    """objects: (name, difficult or None, [x1, y1, x2, y2]) with 1-based VOC coordinates."""
    parts = ["<annotation><filename>x.jpg</filename>"]
    for name, difficult, (x1, y1, x2, y2) in objects:
        diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>{diff}"
                     f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
                     "</object>")
    parts.append("</annotation>")
    path.write_text("".join(parts))


class VocDir:
    def __init__(self, root, annotations):
        self.root = root
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        for image_id, objects in annotations.items():
            write_xml(root / "Annotations" / f"{image_id}.xml", objects)
        self.imageset = root / "test.txt"
        self.imageset.write_text("".join(f"{i}\n" for i in annotations))
        self.annopath = str(root / "Annotations" / "{:s}.xml")
        self.detpath = str(root / "det_{:s}.txt")
        self.cachedir = str(root / "cache")

    def dets(self, cls, lines):
        (self.root / f"det_{cls}.txt").write_text("".join(line + "\n" for line in lines))

    def eval(self, cls, **kw):
        return voc_eval(self.detpath, self.annopath, str(self.imageset), cls, self.cachedir, **kw)


def test_hand_case_duplicate_difficult_and_iou_exactly_half(tmp_path):
    voc = VocDir(tmp_path, {
        "im1": [("dog", 0, [1, 1, 10, 10]), ("dog", 1, [50, 50, 60, 60])],
        "im2": [("dog", None, [1, 1, 10, 10]), ("cat", 0, [1, 1, 10, 10])],
    })
    voc.dets("dog", [
        "im1 0.9 1 1 10 10",      # TP on the first dog
        "im1 0.8 1 1 10 10",      # duplicate of a matched GT: FP
        "im1 0.7 50 50 60 60",    # best GT is difficult: ignored
        "im2 0.6 1 1 10 5",       # IoU 50 / 100 = 0.5 exactly: not > 0.5, FP
    ])
    rec, prec, ap = voc.eval("dog")
    # npos = 2 (the difficult one is not counted; a missing <difficult> is 0)
    np.testing.assert_allclose(rec, [0.5, 0.5, 0.5, 0.5])
    np.testing.assert_allclose(prec, [1.0, 0.5, 0.5, 1 / 3])
    assert ap == pytest.approx(0.5, abs=1e-12)
    _, _, ap07 = voc.eval("dog", use_07_metric=True)
    assert ap07 == pytest.approx(6 / 11, abs=1e-12)       # t = 0, .1, ..., .5 see precision 1
    rec, _, _ = voc.eval("dog", ovthresh=0.49)              # now the 0.5 detection is a TP
    assert rec[-1] == 1.0


def test_first_detection_on_difficult_gives_zero_precision_not_nan(tmp_path):
    voc = VocDir(tmp_path, {"im1": [("dog", 1, [1, 1, 10, 10]), ("dog", 0, [30, 30, 40, 40])]})
    voc.dets("dog", ["im1 0.9 1 1 10 10", "im1 0.5 30 30 40 40"])
    rec, prec, ap = voc.eval("dog")
    np.testing.assert_array_equal(prec, [0.0, 1.0])
    np.testing.assert_array_equal(rec, [0.0, 1.0])
    assert ap == 1.0


def test_recall_exactly_point_three(tmp_path):
    # 10 GT, 3 found: recall 3/10 == 0.3 but the 07 threshold np.arange(0, 1.1, .1)[3] is 0.30000000000000004,
    # so only t = 0, .1, .2 count: AP07 = 3/11 (py-faster-rcnn's behaviour).
    voc = VocDir(tmp_path, {f"im{i}": [("car", 0, [1, 1, 20, 20])] for i in range(10)})
    voc.dets("car", [f"im{i} 0.{9 - i} 1 1 20 20" for i in range(3)])
    rec, prec, ap07 = voc.eval("car", use_07_metric=True)
    assert rec[-1] == 0.3 and (prec == 1).all()
    assert ap07 == pytest.approx(3 / 11, abs=1e-12)
    _, _, ap = voc.eval("car")
    assert ap == pytest.approx(0.3, abs=1e-12)


def test_empty_detection_file_gives_zero(tmp_path):
    voc = VocDir(tmp_path, {"im1": [("dog", 0, [1, 1, 10, 10])]})
    voc.dets("dog", [])
    rec, prec, ap = voc.eval("dog")
    assert rec.size == 0 and prec.size == 0 and ap == 0.0
    voc.dets("cat", ["im1 0.9 1 1 10 10"])           # no GT of the class: AP 0, no NaN
    rec, prec, ap = voc.eval("cat")
    assert ap == 0.0 and np.isfinite(rec).all()


def test_voc_ap_hand_computed():
    rec = np.array([0.2, 0.4, 0.4, 0.8])
    prec = np.array([1.0, 0.5, 0.6, 0.4])
    # envelope: [1, .6, .6, .4]; area = .2 * 1 + .2 * .6 + .4 * .4
    assert voc_ap(rec, prec) == pytest.approx(0.2 + 0.12 + 0.16)
    # 07: t = 0..0.2 -> 1 (3 points), .3, .4 -> .6 (2), .5 .. .8 -> .4 (4), .9, 1 -> 0
    assert voc_ap(rec, prec, True) == pytest.approx((3 * 1 + 2 * 0.6 + 4 * 0.4) / 11)


def test_cache_follows_imageset_and_annotations(tmp_path):
    voc = VocDir(tmp_path, {"im1": [("dog", 0, [1, 1, 10, 10])]})
    voc.dets("dog", ["im1 0.9 1 1 10 10"])
    assert voc.eval("dog")[2] == 1.0
    # A different image set under the same cachedir: py-faster-rcnn's fixed annots.pkl gave a KeyError here.
    write_xml(tmp_path / "Annotations" / "im2.xml", [("dog", 0, [5, 5, 30, 30])])
    voc.imageset.write_text("im1\nim2\n")
    voc.dets("dog", ["im1 0.9 1 1 10 10", "im2 0.8 5 5 30 30"])
    assert voc.eval("dog")[2] == 1.0
    # An edited annotation is re-read (different size/mtime).
    write_xml(tmp_path / "Annotations" / "im2.xml", [("dog", 0, [100, 100, 130, 130]), ("dog", 0, [1, 1, 2, 2])])
    os.utime(tmp_path / "Annotations" / "im2.xml", ns=(1, 1))
    rec, _, _ = voc.eval("dog")
    assert rec[-1] == pytest.approx(1 / 3)
    files = os.listdir(voc.cachedir)
    assert len(files) == 3 and all(f.startswith("annots_") and f.endswith(".json") for f in files)


def test_bad_inputs_name_the_file(tmp_path):
    voc = VocDir(tmp_path, {"im1": [("dog", 0, [1, 1, 10, 10])]})
    voc.dets("dog", ["im9 0.9 1 1 10 10"])
    with pytest.raises(DataError, match=r"det_dog.txt:1: image id 'im9'"):
        voc.eval("dog")
    voc.dets("dog", ["im1 0.9 1 1 10"])
    with pytest.raises(DataError, match=r"det_dog.txt:1: expected"):
        voc.eval("dog")
    with pytest.raises(DataError, match="det_cow.txt"):
        voc.eval("cow")
    (tmp_path / "Annotations" / "im1.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"im1.xml: malformed XML"):
        voc.eval("dog")
    (tmp_path / "Annotations" / "im1.xml").write_text(
        "<annotation><object><name>dog</name><bndbox><xmin>1</xmin><ymin>a</ymin><xmax>3</xmax>"
        "<ymax>4</ymax></bndbox></object></annotation>")
    with pytest.raises(DataError, match=r"im1.xml: object 0 has a non-numeric"):
        parse_rec(str(tmp_path / "Annotations" / "im1.xml"))
    voc.imageset.write_text("im1\nim404\n")
    with pytest.raises(DataError, match=r"im404.xml: annotation file not found"):
        voc.eval("dog")


def test_results_file_format(tmp_path):
    classes = ["__background__", "dog", "cat"]
    all_boxes = [[[], []],
                 [np.array([[10, 20, 30, 40, 0.9], [0, 0, 5.5, 5.25, 0.12345]], np.float32), np.zeros((0, 5))],
                 [[], np.array([[1, 2, 3, 4, 1.0]], np.float32)]]
    paths = write_voc_results_files(all_boxes, ["000001", "000002"], classes, str(tmp_path / "out"), "test")
    assert set(paths) == {"dog", "cat"}
    assert os.path.basename(paths["dog"]) == "comp4_det_test_dog.txt"
    assert open(paths["dog"]).read() == "000001 0.900 11.0 21.0 31.0 41.0\n000001 0.123 1.0 1.0 6.5 6.2\n"
    assert open(paths["cat"]).read() == "000002 1.000 2.0 3.0 4.0 5.0\n"
    salted = write_voc_results_files(all_boxes, ["000001", "000002"], classes, str(tmp_path / "out"), "test",
                                     salt="ab12")
    assert os.path.basename(salted["cat"]) == "comp4_ab12_det_test_cat.txt"
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="image_index"):
        write_voc_results_files(all_boxes, ["000001"], classes, str(tmp_path / "out"), "test")


# --- An independent, straightforward re-implementation of py-faster-rcnn's lib/datasets/voc_eval.py (published
# algorithm: parse with ElementTree and int() coordinates, greedy matching in decreasing score order, cumulative
# TP/FP, eps-guarded precision), used only as the reference for the comparison below.

def reference_parse(filename):
    objs = []
    for obj in ET.parse(filename).findall("object"):
        bb = obj.find("bndbox")
        objs.append({"name": obj.find("name").text, "difficult": int(obj.find("difficult").text),
                     "bbox": [int(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]})
    return objs


def reference_ap(rec, prec, use_07_metric):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def reference_voc_eval(detpath, annopath, imagesetfile, classname, ovthresh, use_07_metric):
    names = [x.strip() for x in open(imagesetfile).readlines()]
    recs = {n: reference_parse(annopath.format(n)) for n in names}
    class_recs, npos = {}, 0
    for n in names:
        R = [o for o in recs[n] if o["name"] == classname]
        difficult = np.array([o["difficult"] for o in R]).astype(bool)
        class_recs[n] = {"bbox": np.array([o["bbox"] for o in R]), "difficult": difficult, "det": [False] * len(R)}
        npos += sum(~difficult)
    lines = [x.strip().split(" ") for x in open(detpath.format(classname)).readlines()]
    ids = [x[0] for x in lines]
    conf = np.array([float(x[1]) for x in lines])
    BB = np.array([[float(z) for z in x[2:]] for x in lines])
    order = np.argsort(-conf)
    BB = BB[order, :]
    ids = [ids[x] for x in order]
    tp, fp = np.zeros(len(ids)), np.zeros(len(ids))
    for d in range(len(ids)):
        R = class_recs[ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        gt = R["bbox"].astype(float)
        if gt.size > 0:
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (gt[:, 2] - gt[:, 0] + 1.0) * (
                gt[:, 3] - gt[:, 1] + 1.0) - inters
            overlaps = inters / uni
            ovmax, jmax = np.max(overlaps), np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, reference_ap(rec, prec, use_07_metric)


def random_dataset(rng, root, n_images=25, classes=("dog", "cat", "car")):
    annotations = {}
    for i in range(n_images):
        objs = []
        for _ in range(rng.integers(1, 5)):
            x1, y1 = rng.integers(1, 200, 2)
            w, h = rng.integers(8, 120, 2)
            objs.append((str(rng.choice(classes)), int(rng.random() < 0.2), [int(x1), int(y1), int(x1 + w),
                                                                              int(y1 + h)]))
        annotations[f"{i:06d}"] = objs
    voc = VocDir(root, annotations)
    index = list(annotations)
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in index]]
    for cls in classes:
        per_image = []
        for image_id in index:
            gt = np.array([o[2] for o in annotations[image_id] if o[0] == cls], np.float64).reshape(-1, 4) - 1
            near = np.repeat(gt, 3, axis=0) + rng.normal(0, 4, (3 * len(gt), 4))
            xy = rng.uniform(0, 250, (rng.integers(0, 4), 2))
            far = np.hstack([xy, xy + rng.uniform(5, 100, xy.shape)])
            boxes = np.vstack([near, far])
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2])
            scores = rng.random((len(boxes), 1))
            per_image.append(np.hstack([boxes, scores]).astype(np.float32))
        all_boxes.append(per_image)
    write_voc_results_files(all_boxes, index, ("__background__",) + classes, str(root / "results"), "test")
    voc.detpath = str(root / "results" / "comp4_det_test_{:s}.txt")
    return voc, classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_reference_on_random_detections(tmp_path, seed):
    voc, classes = random_dataset(np.random.default_rng(seed), tmp_path)
    for cls in classes:
        for ovthresh in (0.5, 0.7):
            for use07 in (False, True):
                rec, prec, ap = voc.eval(cls, ovthresh=ovthresh, use_07_metric=use07)
                ref = reference_voc_eval(voc.detpath, voc.annopath, str(voc.imageset), cls, ovthresh, use07)
                np.testing.assert_allclose(rec, ref[0], rtol=0, atol=1e-12)
                np.testing.assert_allclose(prec, ref[1], rtol=0, atol=1e-12)
                assert abs(ap - ref[2]) < 1e-6
                assert 0.0 < ap < 1.0
