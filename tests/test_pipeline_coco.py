"""The whole pipeline on COCO-format data: the COCO copy of a small generated shapes set, few iterations.

One baseline run (module fixture) with PIPELINE.TRAIN_IMDB / TEST_IMDB ``cocofmt:`` names of the files that
``shapes_coco_{trainval,test}`` read (the same converter; those names mean the full 750-image set). Checks: every
step finishes, eval prints and stores COCO metrics, the results JSON is COCO's format; ``eval --detections``
re-scores with COCOeval; a damaged JSON stops a run with one line and changes nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from faults import changed_files, digest_tree, error_line
from roidb.synthetic import ensure_shapes_coco, ensure_shapes_dataset, shapes_coco_paths
from stages.engine.graph import STEP_ORDER
from test_pipeline_e2e import TINY_YML, sha256

EXP = "tiny_e2e"
NUM_TRAINVAL, NUM_TEST = 10, 6
COCO_KEYS = ("mAP", "AP", "AP50", "AP75", "APs", "APm", "AR1", "AR10", "AR100")


def coco_name(root: Path, split: str, annotations: Path | None = None) -> str:
    default, images = shapes_coco_paths(root, split)
    return f"cocofmt:{annotations or default}:{images}"


def args(data_root: Path, out: Path, train: str | None = None) -> list[str]:
    shapes = data_root / "shapes"
    pairs = {"PIPELINE.DATA_ROOT": str(data_root), "PIPELINE.OUTPUT_ROOT": str(out),
             "PIPELINE.TRAIN_IMDB": train or coco_name(shapes, "trainval"),
             "PIPELINE.TEST_IMDB": coco_name(shapes, "test")}
    return ["--config", str(TINY_YML), *[x for k, v in pairs.items() for x in ("--set", k, v)]]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    ensure_shapes_dataset(root / "shapes", num_trainval=NUM_TRAINVAL, num_test=NUM_TEST, n_jobs=1)
    ensure_shapes_coco(root / "shapes")
    return root


@pytest.fixture(scope="module")
def baseline(data_root, tmp_path_factory) -> tuple[Path, str]:
    """Output folder of one full run and what it printed."""
    out = tmp_path_factory.mktemp("out")
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = pipeline.main(["run", *args(data_root, out)])
    finally:
        torch.use_deterministic_algorithms(False)
    assert code == 0, buffer.getvalue()
    return out, buffer.getvalue()


def test_full_run_prints_and_stores_coco_metrics(data_root, baseline):
    out, printed = baseline
    exp = out / EXP
    for step in STEP_ORDER:
        m = json.loads((exp / step / "manifest.json").read_text())
        assert m["status"] == "done", step
        for rel, digest in m["outputs"].items():
            assert sha256(exp / step / rel) == digest, (step, rel)
    assert "COCO bbox AP (pycocotools COCOeval" in printed
    for needle in ("[eval] class      AP      AP50", "[eval] mean", "[eval] AP ", "[eval] AR1 "):
        assert needle in printed, needle
    metrics = json.loads((exp / "eval" / "manifest.json").read_text())["metrics"]
    assert set(metrics) >= set(COCO_KEYS) | {f"AP_{c}" for c in ("ellipse", "rectangle", "triangle")}
    assert metrics["mAP"] == metrics["AP50"] and metrics["num_images"] == NUM_TEST
    aps = json.loads((exp / "eval" / "aps.json").read_text())
    assert aps["metric"] == "coco" and set(aps["coco"]) >= {"AP", "AP50", "ARl"} and set(aps["aps_coco"]) == \
        set(aps["aps"])
    outputs = json.loads((exp / "eval" / "manifest.json").read_text())["outputs"]
    results_name = next(r for r in outputs if r.endswith("_results.json"))
    assert "results/coco_eval.txt" in outputs and not any("comp4" in r for r in outputs)
    # the results JSON is the detections of detections.pkl in COCO's format
    with open(exp / "eval" / "detections.pkl", "rb") as f:
        all_boxes = pickle.load(f)
    records = json.loads((exp / "eval" / results_name).read_text())
    test_ids = [int(i) for i in (data_root / "shapes" / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text()
                .split()]
    expected = [(test_ids[i], k, [*d[:2], d[2] - d[0] + 1, d[3] - d[1] + 1], d[4])
                for k in range(1, 7) for i in range(NUM_TEST) for d in all_boxes[k][i].astype(np.float64).tolist()]
    assert len(records) == len(expected) == metrics["num_detections"] > 0
    for rec, (image_id, cat, bbox, score) in zip(records, expected):
        assert (rec["image_id"], rec["category_id"]) == (image_id, cat)
        assert rec["bbox"] == pytest.approx(bbox) and rec["score"] == pytest.approx(score)
    # p1 read the COCO imdb: a py-faster-rcnn proposal pickle, one (N, 4) array per training image
    with open(exp / "p1" / "proposals.pkl", "rb") as f:
        proposals = pickle.load(f)
    assert len(proposals) == NUM_TRAINVAL and all(p.ndim == 2 and p.shape[1] == 4 for p in proposals)


def test_eval_command_rescores_with_cocoeval(data_root, baseline, tmp_path, capsys):
    out, _ = baseline
    detections = out / EXP / "eval" / "detections.pkl"
    code = pipeline.main(["eval", *args(data_root, out), "--detections", str(detections), "--out",
                          str(tmp_path / "re"), "--pr-plot", str(tmp_path / "pr.png")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "COCO bbox AP" in printed and "AR100" in printed and "detections_*_results.json" in printed
    again = json.loads((tmp_path / "re" / "aps.json").read_text())
    stored = json.loads((out / EXP / "eval" / "aps.json").read_text())
    assert again["coco"] == stored["coco"] and again["aps"] == stored["aps"]
    assert (tmp_path / "pr.png").stat().st_size > 0
    code = pipeline.main(["eval", *args(data_root, out), "--detections", str(detections), "--use-07-metric"])
    assert code == 2
    assert "VOC07 metric choice applies to VOC-format imdbs" in error_line(capsys.readouterr().err)


def test_inspect_reads_proposals_against_the_coco_imdb(data_root, baseline, capsys):
    out, _ = baseline
    code = pipeline.main(["inspect", "p1", *args(data_root, out), "--json"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    stats = json.loads(printed)
    stats = stats[0] if isinstance(stats, list) else stats
    assert stats["num_images"] == NUM_TRAINVAL and stats["imdb"].startswith("cocofmt_instances_trainval_")
    doc = json.loads(shapes_coco_paths(data_root / "shapes", "trainval")[0].read_text())
    crowd = sum(a["iscrowd"] for a in doc["annotations"])
    assert crowd > 0 and stats["num_gt"] == len(doc["annotations"]) - crowd  # recall counts no crowd box


def test_damaged_json_stops_with_one_line_and_loses_nothing(data_root, baseline, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    annotations, _ = shapes_coco_paths(data_root / "shapes", "trainval")
    doc = json.loads(annotations.read_text())
    doc["annotations"][3]["category_id"] = 77
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    before = digest_tree(out)
    train = coco_name(data_root / "shapes", "trainval", bad)
    code = pipeline.main(["run", *args(data_root, out, train=train), "--until", "stage1"])
    err = capsys.readouterr().err
    assert code == 2
    line = error_line(err)
    assert str(bad) in line and f"annotation id {doc['annotations'][3]['id']}: unknown category_id 77" in line
    # config.yml records the configuration of the latest run (here another TRAIN_IMDB): the one file that may change
    before.pop(f"{EXP}/config.yml")
    assert changed_files(before, digest_tree(out)) == []
    assert not list((out / EXP).glob(".*.previous")), "a set-aside step folder was left behind"
