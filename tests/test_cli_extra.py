"""The commands inspect, eval, demo and plot-losses of pipeline.py, on hand-made data (numbers computed by hand) and
on one tiny pipeline run shared by the module (cross-checked against the pipeline's own p1/eval outputs)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

import pipeline
from nets import im_detect, postprocess_detections, prep_image
from roidb.safe_pickle import safe_load
from roidb.synthetic import ensure_shapes_dataset
from stages.engine.config import load_config
from stages.commands.inspect import validate_stats_json
from stages.settings import load_stage_model
from vocfmt_helpers import CLASSES, PROPOSALS, make_voc

ROOT = Path(__file__).resolve().parent.parent
TINY_YML = ROOT / "tests" / "data" / "tiny_pipeline.yml"
EXP = "tiny_e2e"


def size_of(path) -> tuple[int, int]:
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert im is not None, path
    return im.shape[1], im.shape[0]


def cli(capsys, *args: str, status: int = 0) -> tuple[str, str]:
    code = pipeline.main(list(args))
    out, err = capsys.readouterr()
    assert code == status, (out, err)
    return out, err


def write(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return str(path)


# ---------------------------------------------------------------------------------------------- hand-made data
@pytest.fixture()
def hand(tmp_path):
    voc = make_voc(tmp_path / "voc")
    imdb = f"vocfmt:{voc}:test"
    sets = {"PIPELINE.DATA_ROOT": str(tmp_path), "PIPELINE.OUTPUT_ROOT": str(tmp_path / "out"),
            "PIPELINE.CLASSES": repr(CLASSES), "PIPELINE.TRAIN_IMDB": imdb, "PIPELINE.TEST_IMDB": imdb}
    return tmp_path, ["--config", str(TINY_YML), *[x for k, v in sets.items() for x in ("--set", k, v)]]


def test_inspect_json_on_hand_made_pickle(capsys, hand):
    tmp, conf = hand
    out, _ = cli(capsys, "inspect", write(tmp / "p.pkl", PROPOSALS), "--top", "3", "--top", "1", "--top", "2",
                 "--json", *conf)
    [doc] = json.loads(out)
    validate_stats_json(doc)
    assert (doc["num_images"], doc["num_gt"]) == (2, 3)
    assert [r["recall@0.5"] for r in doc["top_n"]] == pytest.approx([2 / 3, 1, 1])
    assert [r["recall@0.7"] for r in doc["top_n"]] == pytest.approx([0, 1 / 3, 2 / 3])
    assert doc["top_n"][2]["average_recall"] == pytest.approx(20 / 30)


def test_inspect_table_plot_and_draw(capsys, hand):
    tmp, conf = hand
    a, b = write(tmp / "a.pkl", PROPOSALS), write(tmp / "b.pkl", [PROPOSALS[0][:1], PROPOSALS[1]])
    out, _ = cli(capsys, "inspect", a, b, "--top", "1", "--top", "3", "--plot", str(tmp / "cmp.png"),
                 "--draw", "im1", "--draw-top", "2", "--out", str(tmp / "d.png"), *conf)
    assert "== a.pkl" in out and "== b.pkl" in out and "proposals/image  min 2  median 2.5  max 3" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("3 ")]
    assert [r[1:3] for r in rows] == [["1.0000", "0.6667"], ["0.6667", "0.0000"]]   # a, then b (IoU .5, 0, 2/3)
    assert size_of(tmp / "cmp.png") == (840, 400)
    assert size_of(tmp / "d_a.png") == size_of(tmp / "d_b.png") == (100, 80)


@pytest.mark.parametrize("payload, message", [
    ([PROPOSALS[0]], "bad.pkl: proposal pickle has 1 images but vocfmt_"),
    ([PROPOSALS[0], np.zeros((2, 5), np.float32)], r"bad.pkl: image 1 (im2): proposals must be an (N, 4) array"),
    ({"boxes": PROPOSALS}, "bad.pkl: proposal pickle must hold a list of (N, 4) arrays, got dict"),
])
def test_inspect_refuses_mismatched_pickles(capsys, hand, payload, message):
    tmp, conf = hand
    _, err = cli(capsys, "inspect", write(tmp / "bad.pkl", payload), *conf, status=2)
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_inspect_refuses_hostile_pickle_and_missing_step(capsys, hand):
    tmp, conf = hand
    evil = tmp / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp / "pwned").encode() + b"'\ntR.")
    _, err = cli(capsys, "inspect", str(evil), *conf, status=2)
    assert "refused to unpickle global 'os.system'" in err and not (tmp / "pwned").exists()
    _, err = cli(capsys, "inspect", "p1", *conf, status=2)
    assert "p1/proposals.pkl not found" in err and "run --until p1" in err
    good = write(tmp / "p.pkl", PROPOSALS)
    _, err = cli(capsys, "inspect", good, "--draw", "im9", "--out", str(tmp / "d.png"), *conf, status=2)
    assert "image id 'im9' is not in vocfmt_" in err and not (tmp / "d.png").exists()
    _, err = cli(capsys, "inspect", good, "--draw", "im1", *conf, status=2)
    assert "--draw needs --out" in err


# cat: npos 2 (im1, im2; the difficult cat of im1 is ignored). Sorted: 0.9 TP, 0.85 on the difficult cat (ignored),
# 0.8 duplicate of the matched cat (FP), 0.7 TP -> rec .5 .5 .5 1, prec 1 1 .5 2/3.
#   area AP = 0.5 * 1 + 0.5 * 2/3 = 0.8333; VOC07 11-point = (6 * 1 + 5 * 2/3) / 11 = 0.8485
# dog: npos 1; IoU exactly 0.5 is not a match (strict), the other box is in the wrong image -> AP 0.
DETECTIONS = [
    [np.zeros((0, 5), np.float32)] * 2,
    [np.array([[10, 10, 29, 29, 0.9], [70, 50, 89, 69, 0.85], [10, 10, 29, 29, 0.8]], np.float32),
     np.array([[0, 0, 39, 19, 0.7]], np.float32)],
    [np.array([[50, 20, 69, 59, 0.6]], np.float32), np.array([[50, 20, 69, 39, 0.5]], np.float32)],
]


@pytest.mark.parametrize("metric, cat_ap", [("--no-use-07-metric", 0.5 + 0.5 * 2 / 3),
                                            ("--use-07-metric", (6 + 5 * 2 / 3) / 11)])
def test_eval_detections_rescored_by_hand(capsys, hand, metric, cat_ap):
    tmp, conf = hand
    dets = write(tmp / "detections.pkl", DETECTIONS)
    out, _ = cli(capsys, "eval", "--detections", dets, metric, "--pr-plot", str(tmp / "pr.png"), *conf)
    table = dict(line.split() for line in out.splitlines() if line.split()[:1] in (["cat"], ["dog"], ["mAP"]))
    assert float(table["cat"]) == pytest.approx(cat_ap, abs=1e-4) and float(table["dog"]) == 0.0
    assert float(table["mAP"]) == pytest.approx(cat_ap / 2, abs=1e-4)
    folder = next(tmp.glob("reval_*"))
    aps = json.loads((folder / "aps.json").read_text())
    assert aps["aps"]["cat"] == pytest.approx(cat_ap) and aps["use_07_metric"] == (metric == "--use-07-metric")
    lines = (folder / "results" / "comp4_det_test_cat.txt").read_text().splitlines()
    assert lines[0] == "im1 0.900 11.0 11.0 30.0 30.0" and len(lines) == 4
    assert size_of(tmp / "pr.png") == (640, 480)


def test_eval_refuses_bad_detections(capsys, hand):
    tmp, conf = hand
    _, err = cli(capsys, "eval", "--detections", write(tmp / "d.pkl", DETECTIONS[:2]), *conf, status=2)
    assert "d.pkl: detections pickle must hold 3 class lists" in err


def test_plot_losses_on_hand_written_logs(capsys, hand):
    tmp, conf = hand
    for step, terms in (("stage1", ("rpn_cls", "rpn_bbox")), ("stage2", ("cls", "bbox"))):
        folder = tmp / "out" / EXP / step
        folder.mkdir(parents=True)
        records = [{"iter": i, "loss": 2.0 / i, "losses": {terms[0]: 1.5 / i, terms[1]: 0.5 / i},
                    "lr": 0.01 if i < 4 else 0.001} for i in range(1, 6)]
        (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iter": 6, "lo')
    out, _ = cli(capsys, "plot-losses", "--out", str(tmp / "l.png"), *conf)
    assert out.splitlines()[1].split() == ["stage1", "5", "0.4000", "0.001"]   # the torn last line is ignored
    assert size_of(tmp / "l.png") == (1040, 340)
    _, err = cli(capsys, "plot-losses", "stage3", "--out", str(tmp / "x.png"), *conf, status=2)
    assert "stage3/log.jsonl: no training log" in err


# ---------------------------------------------------------------------------------------- one tiny pipeline run
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-iteration-per-stage run of tests/data/tiny_pipeline.yml on 6 + 3 generated shapes images."""
    root = tmp_path_factory.mktemp("tiny")
    ensure_shapes_dataset(root / "shapes", num_trainval=6, num_test=3, n_jobs=1)
    voc = root / "shapes" / "VOC2007"
    sets = {"PIPELINE.DATA_ROOT": str(root), "PIPELINE.OUTPUT_ROOT": str(root / "out"),
            "PIPELINE.TRAIN_IMDB": f"vocfmt:{voc}:trainval", "PIPELINE.TEST_IMDB": f"vocfmt:{voc}:test"}
    for k in range(1, 5):
        sets.update({f"PIPELINE.STAGE{k}_ITERS": "4", f"PIPELINE.STAGE{k}_STEPSIZE": "3",
                     f"PIPELINE.STAGE{k}_SNAPSHOT_ITERS": "0"})
    conf = ["--config", str(TINY_YML), *[x for k, v in sets.items() for x in ("--set", k, v)]]
    assert pipeline.main(["run", *conf]) == 0
    config = load_config(TINY_YML, overrides=list(sets.items()))
    return root, voc, conf, config


def test_inspect_p1_p2_agree_with_the_dump_metrics(capsys, tiny):
    root, _, conf, _ = tiny
    out, err = cli(capsys, "inspect", "p1", "p2", "--json", "--plot", str(root / "cmp.png"), *conf)
    docs = json.loads(out)
    for step, doc in zip(("p1", "p2"), docs):
        validate_stats_json(doc)
        metrics = json.loads((root / "out" / EXP / step / "manifest.json").read_text())["metrics"]
        row = {r["n"]: r for r in doc["top_n"]}
        assert row[300]["recall@0.5"] == pytest.approx(metrics["recall@0.5_top300"], abs=1e-6)
        assert row[300]["recall@0.7"] == pytest.approx(metrics["recall@0.7_top300"], abs=1e-6)
        assert row[2000]["recall@0.5"] == pytest.approx(metrics["recall@0.5"], abs=1e-6)
        scores = safe_load(root / "out" / EXP / step / "scores.pkl")
        assert doc["score_range"]["max"] == pytest.approx(max(float(s.max()) for s in scores))
    assert "wrote" in err and size_of(root / "cmp.png") == (1260, 400)


def test_eval_stage4_reproduces_the_pipeline_eval(capsys, tiny):
    root, _, conf, _ = tiny
    out, _ = cli(capsys, "eval", *conf)
    ours = next((root / "out" / EXP).glob("eval_stage4_*"))
    theirs = root / "out" / EXP / "eval"
    assert json.loads((ours / "aps.json").read_text())["map"] == json.loads((theirs / "aps.json").read_text())["map"]
    a, b = safe_load(ours / "detections.pkl"), safe_load(theirs / "detections.pkl")
    for ca, cb in zip(a, b):
        for da, db in zip(ca, cb):
            np.testing.assert_array_equal(da, db)
    assert out.splitlines()[-1].startswith("wrote ") and "mAP" in out


def test_eval_stage2_is_m1_rpn_then_m2(capsys, tiny):
    root, voc, conf, config = tiny
    cli(capsys, "eval", "--step", "stage2", *conf)
    all_boxes = safe_load(next((root / "out" / EXP).glob("eval_stage2_*")) / "detections.pkl")
    classes = ["__background__", *config.get("PIPELINE.CLASSES")]
    m1, m2 = (load_stage_model(config, root / "out" / EXP / s / "model.pt", classes, "cpu") for s in ("stage1",
                                                                                                       "stage2"))
    first = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    im = cv2.imread(str(voc / "JPEGImages" / f"{first}.jpg"))
    t = config.TEST
    data, scale = prep_image(im, scale=t.SCALES[0], max_size=t.MAX_SIZE, pixel_means=tuple(config.PIXEL_MEANS[0][0]))
    rois, _ = m1.eval().propose(data, [data.shape[2], data.shape[3], scale], pre_nms_top_n=t.RPN_PRE_NMS_TOP_N,
                                post_nms_top_n=t.RPN_POST_NMS_TOP_N, nms_thresh=t.RPN_NMS_THRESH,
                                min_size=t.RPN_MIN_SIZE)
    scores, boxes = im_detect(m2, im, scales=list(t.SCALES), max_size=t.MAX_SIZE,
                              pixel_means=tuple(config.PIXEL_MEANS[0][0]), boxes=rois.numpy() / scale)
    expected = postprocess_detections(scores, boxes, thresh=config.get("PIPELINE.DET_THRESH"),
                                      nms_thresh=t.NMS, max_per_image=config.get("PIPELINE.MAX_PER_IMAGE"))
    for j in range(1, len(classes)):
        np.testing.assert_allclose(all_boxes[j][0], expected[j], rtol=1e-5, atol=1e-4)


def test_demo_matches_eval_detections(capsys, tiny):
    root, voc, conf, _ = tiny
    first = (voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    image = voc / "JPEGImages" / f"{first}.jpg"
    out, _ = cli(capsys, "demo", str(image), "--thresh", "0.05", "--out", str(root / "demo"), *conf)
    assert size_of(root / "demo" / f"{first}_det.jpg") == size_of(image)
    all_boxes = safe_load(root / "out" / EXP / "eval" / "detections.pkl")
    expected = sorted(float(d[4]) for c in all_boxes[1:] for d in c[0] if d[4] >= 0.05)
    rows = [line.split() for line in out.splitlines()[1:-1]]
    shown = sorted(float(r[2]) for r in rows if r[1] != "-")
    assert shown == pytest.approx([round(s, 3) for s in expected], abs=1e-3)
    _, err = cli(capsys, "demo", str(root / "missing.jpg"), *conf, status=2)
    assert "missing.jpg" in err


def test_plot_losses_of_the_run(capsys, tiny):
    root, _, conf, _ = tiny
    out, _ = cli(capsys, "plot-losses", "--out", str(root / "losses.png"), *conf)
    assert [line.split()[:2] for line in out.splitlines()[1:5]] == [[f"stage{k}", "4"] for k in range(1, 5)]
    assert size_of(root / "losses.png") == (1040, 680)
