"""The whole alternating-training pipeline, end to end, on a small generated shapes set with few iterations.

One baseline run (module fixture) writes every artefact; the other tests work on copies of its output folder:
a rerun runs nothing, TEST.NMS re-runs eval only, PIPELINE.STAGE2_ITERS re-runs stage2..eval, --from/--only/
--force select what they should, a SIGKILLed stage4 resumes to bit-identical M4 weights, and an isolated
(child-process) eval reproduces the in-process mAP.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from roidb.blob import blob_scale
from roidb.synthetic import ensure_shapes_dataset
from stages.engine.graph import STEP_ORDER

ROOT = Path(__file__).resolve().parent.parent
TINY_YML = ROOT / "tests" / "data" / "tiny_pipeline.yml"
NUM_TRAINVAL, NUM_TEST = 10, 6
EXP = "tiny_e2e"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path, step: str) -> dict:
    return json.loads((out / EXP / step / "manifest.json").read_text())


def state_dict(out: Path, step: str) -> dict:
    return torch.load(out / EXP / step / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def ran_steps(text: str) -> list[str]:
    """Steps the runner reported as running, in order."""
    return re.findall(r"^(\w+): running", text, flags=re.M)


class Env:
    """The shared data folder and the --set pairs that point the tiny config at it and at an output folder."""

    def __init__(self, data_root: Path):
        self.data_root = data_root
        self.voc = data_root / "shapes" / "VOC2007"

    def pairs(self, out: Path) -> list[tuple[str, str]]:
        return [("PIPELINE.DATA_ROOT", str(self.data_root)), ("PIPELINE.OUTPUT_ROOT", str(out)),
                ("PIPELINE.TRAIN_IMDB", f"vocfmt:{self.voc}:trainval"),
                ("PIPELINE.TEST_IMDB", f"vocfmt:{self.voc}:test")]

    def args(self, out: Path, *extra: str) -> list[str]:
        sets = [x for k, v in self.pairs(out) for x in ("--set", k, v)]
        return ["--config", str(TINY_YML), *sets, *extra]


def run_cli(capsys, env: Env, out: Path, *args: str, command: str = "run") -> str:
    code = pipeline.main([command, *env.args(out), *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    data_root = tmp_path_factory.mktemp("data")
    ensure_shapes_dataset(data_root / "shapes", num_trainval=NUM_TRAINVAL, num_test=NUM_TEST, n_jobs=1)
    return Env(data_root)


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory) -> tuple[Path, str]:
    """Output folder of one full uninterrupted run and its printed output."""
    out = tmp_path_factory.mktemp("baseline")
    try:
        code = pipeline.main(["run", *env.args(out)])
    finally:
        torch.use_deterministic_algorithms(False)
    assert code == 0
    return out, ""


@pytest.fixture
def copy_of(baseline, tmp_path):
    """A fresh copy of the baseline output folder (so a test may change it)."""
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    yield out
    torch.use_deterministic_algorithms(False)


def test_full_run_writes_every_artefact(env, baseline):
    out = baseline[0]
    for step in STEP_ORDER:
        m = manifest(out, step)
        assert m["status"] == "done", step
        for rel, digest in m["outputs"].items():
            assert sha256(out / EXP / step / rel) == digest, (step, rel)
    for step in ("stage1", "stage2", "stage3", "stage4"):
        assert set(manifest(out, step)["outputs"]) == {"model.pt"}
        assert not (out / EXP / step / "snapshots").exists()
        assert len((out / EXP / step / "log.jsonl").read_text().splitlines()) == 8
    assert (out / EXP / "config.yml").is_file()
    metrics = manifest(out, "eval")["metrics"]
    assert 0.0 <= metrics["mAP"] <= 1.0 and metrics["num_images"] == NUM_TEST
    assert set(metrics) >= {f"AP_{c}" for c in ("ellipse", "rectangle", "triangle", "star", "cross", "ring")}
    aps = json.loads((out / EXP / "eval" / "aps.json").read_text())
    assert aps["map"] == pytest.approx(metrics["mAP"], abs=1e-6)
    assert np.mean(list(aps["aps"].values())) == pytest.approx(aps["map"])
    comp4 = sorted(p.name for p in (out / EXP / "eval" / "results").glob("comp4_det_test_*.txt"))
    assert len(comp4) == 6


def test_proposal_pickle_is_py_faster_rcnn_format(env, baseline):
    out = baseline[0]
    image_index = (env.voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    with open(out / EXP / "p1" / "proposals.pkl", "rb") as handle:
        boxes = pickle.load(handle)
    with open(out / EXP / "p1" / "scores.pkl", "rb") as handle:
        scores = pickle.load(handle)
    assert isinstance(boxes, list) and len(boxes) == len(image_index) == NUM_TRAINVAL
    import cv2
    for index, b, s in zip(image_index, boxes, scores):
        h, w = cv2.imread(str(env.voc / "JPEGImages" / f"{index}.jpg")).shape[:2]
        assert isinstance(b, np.ndarray) and b.dtype == np.float32 and b.ndim == 2 and b.shape[1] == 4
        assert 0 < len(b) <= 2000 and s.shape == (len(b),) and s.dtype == np.float32
        assert np.all(np.diff(s) <= 0), "proposals are best first"
        # original-image pixels: clipped to the blob's [0, W'-1] x [0, H'-1], then divided by the blob scale
        scale = blob_scale(h, w, 160, 320)
        assert b.min() >= 0.0
        assert b[:, 2].max() <= (round(w * scale) - 1) / scale + 1e-3
        assert b[:, 3].max() <= (round(h * scale) - 1) / scale + 1e-3
        assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
    metrics = manifest(out, "p1")["metrics"]
    for key in ("recall@0.5_top300", "recall@0.7_top300", "recall@0.5", "recall@0.7"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["recall@0.5"] >= metrics["recall@0.5_top300"] >= metrics["recall@0.7_top300"]


def test_final_model_holds_m2_convs_m3_rpn_and_m4_head(baseline):
    out = baseline[0]
    m2, m3, m4 = (state_dict(out, s) for s in ("stage2", "stage3", "stage4"))
    body = [k for k in m4 if k.startswith("body.")]
    rpn = [k for k in m4 if k.startswith("rpn.")]
    head = [k for k in m4 if k.startswith("roi_head.")]
    assert body and rpn and head
    assert all(torch.equal(m4[k], m2[k]) and torch.equal(m3[k], m2[k]) for k in body)
    assert all(torch.equal(m4[k], m3[k]) for k in rpn)
    assert not all(torch.equal(m3[k], m2[k]) for k in rpn), "stage3 trains the RPN head"
    assert all(torch.equal(m3[k], m2[k]) for k in head), "stage3 leaves the detector head alone"
    assert not any(torch.equal(m4[k], m3[k]) for k in head if k.endswith("weight")), "stage4 trains fc6..bbox_pred"
    ckpt = torch.load(out / EXP / "stage4" / "model.pt", map_location="cpu", weights_only=True)
    stds = ckpt["bbox_stds"].reshape(-1, 4)
    assert ckpt["classes"][0] == "__background__" and ckpt["stage"] == "stage4" and ckpt["iteration"] == 8
    assert torch.all(stds[0] == 0) and torch.all(stds[1:].sum(dim=1) > 0), "data stds stored for the test-time undo"


def test_rerun_does_nothing(env, copy_of, capsys):
    before = {s: (copy_of / EXP / s / "manifest.json").stat().st_mtime_ns for s in STEP_ORDER}
    t0 = time.perf_counter()
    text = run_cli(capsys, env, copy_of)
    assert time.perf_counter() - t0 < 5.0
    assert ran_steps(text) == []
    assert all(f"{s}: done, skipped" in text for s in STEP_ORDER)
    assert before == {s: (copy_of / EXP / s / "manifest.json").stat().st_mtime_ns for s in STEP_ORDER}


def test_test_nms_reruns_eval_only(env, copy_of, baseline, capsys):
    text = run_cli(capsys, env, copy_of, "--set", "TEST.NMS", "0.5")
    assert ran_steps(text) == ["eval"]
    assert manifest(copy_of, "eval")["fingerprint"] != manifest(baseline[0], "eval")["fingerprint"]


def test_stage2_iters_reruns_stage2_onwards(env, copy_of, baseline, capsys):
    text = run_cli(capsys, env, copy_of, "--set", "PIPELINE.STAGE2_ITERS", "6")
    assert ran_steps(text) == ["stage2", "stage3", "p2", "stage4", "eval"]
    assert sha256(copy_of / EXP / "stage1" / "model.pt") == sha256(baseline[0] / EXP / "stage1" / "model.pt")
    assert sha256(copy_of / EXP / "stage2" / "model.pt") != sha256(baseline[0] / EXP / "stage2" / "model.pt")


def test_force_reproduces_outputs_so_downstream_stays_done(env, copy_of, baseline, capsys):
    text = run_cli(capsys, env, copy_of, "--force", "p1")
    assert ran_steps(text) == ["p1"], "a deterministic p1 gives the same P1, so nothing downstream re-runs"
    for name in ("proposals.pkl", "scores.pkl"):
        assert sha256(copy_of / EXP / "p1" / name) == sha256(baseline[0] / EXP / "p1" / name)


def test_from_and_only(env, copy_of, baseline, capsys):
    text = run_cli(capsys, env, copy_of, "--from", "stage4")
    assert ran_steps(text) == ["stage4", "eval"]
    assert sha256(copy_of / EXP / "stage4" / "model.pt") == sha256(baseline[0] / EXP / "stage4" / "model.pt")
    assert ran_steps(run_cli(capsys, env, copy_of, "--only", "p2")) == []
    text = run_cli(capsys, env, copy_of, "--only", "eval", "--force", "eval")
    assert ran_steps(text) == ["eval"]
    assert manifest(copy_of, "eval")["metrics"]["mAP"] == manifest(baseline[0], "eval")["metrics"]["mAP"]


def test_isolated_eval_in_a_child_process_matches(env, copy_of, baseline, capsys):
    text = run_cli(capsys, env, copy_of, "--only", "eval", "--force", "eval",
                   "--set", "PIPELINE.ISOLATE_STEPS", "True")
    assert ran_steps(text) == ["eval"]
    assert manifest(copy_of, "eval")["outputs"] == manifest(baseline[0], "eval")["outputs"]


def test_sigkilled_stage4_resumes_to_identical_weights(env, copy_of, baseline):
    for step in ("stage4", "eval"):
        shutil.rmtree(copy_of / EXP / step)
    args = [sys.executable, str(ROOT / "pipeline.py"), "run", *env.args(copy_of, "--until", "stage4"),
            "--set", "PIPELINE.STAGE4_SNAPSHOT_ITERS", "1"]
    snapshots = copy_of / EXP / "stage4" / "snapshots"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(snapshots.glob("iter_*.pt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert manifest(copy_of, "stage4")["status"] == "running" and list(snapshots.glob("iter_*.pt"))
    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from snapshot iteration" in rerun.stdout
    assert ran_steps(rerun.stdout) == ["stage4"]
    assert sha256(copy_of / EXP / "stage4" / "model.pt") == sha256(baseline[0] / EXP / "stage4" / "model.pt")


def test_proposal_recall_hand_computed():
    from stages.proposals import proposal_recall
    gt = [np.array([[0, 0, 9, 9], [20, 20, 29, 29]], np.float32), np.array([[0, 0, 19, 19]], np.float32)]
    # image 0: the first GT box exactly, then a box with IoU 40/100 = 0.4 with the second GT;
    # image 1: a box with IoU 120/400 = 0.3 with its GT, then the GT box exactly
    boxes = [np.array([[0, 0, 9, 9], [20, 20, 29, 23]], np.float32),
             np.array([[0, 0, 5, 19], [0, 0, 19, 19]], np.float32)]
    assert proposal_recall(boxes, gt, 0.5) == pytest.approx(2 / 3)
    assert proposal_recall(boxes, gt, 0.5, top_n=1) == pytest.approx(1 / 3)
    assert proposal_recall(boxes, gt, 0.25, top_n=1) == pytest.approx(2 / 3)
    assert proposal_recall(boxes, gt, 0.35) == pytest.approx(1.0)
    assert proposal_recall([np.zeros((0, 4), np.float32)] * 2, gt, 0.5) == 0.0


def test_training_groups_follow_caffe_multipliers():
    from nets import FasterRCNN, param_groups, set_trainable
    from stages.engine.trainer import make_optimizer
    from stages.training import _caffe_multipliers
    model = FasterRCNN("tiny", 3, warn_random_init=False)
    set_trainable(model, "stage3")
    opt = make_optimizer(_caffe_multipliers(param_groups(model, 0.01, 0.0005)), 0.01, 0.9, 0.0005)
    by_lr = {g["lr"]: g for g in opt.param_groups}
    assert set(by_lr) == {0.01, 0.02}
    assert by_lr[0.01]["weight_decay"] == 0.0005 and by_lr[0.02]["weight_decay"] == 0.0
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.rpn.parameters()}


def test_detect_image_without_bbox_reg_tiles_the_rois(env, baseline):
    import cv2
    from stages.engine.config import load_config
    from stages.evaluation import detect_image
    from stages.settings import load_stage_model
    pairs = env.pairs(baseline[0])
    config = load_config(TINY_YML, overrides=pairs)
    no_reg = load_config(TINY_YML, overrides=pairs + [("TEST.BBOX_REG", "False")])
    classes = ("__background__", "ellipse", "rectangle", "triangle", "star", "cross", "ring")
    model = load_stage_model(config, baseline[0] / EXP / "stage4" / "model.pt", classes, torch.device("cpu"))
    index = (env.voc / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    im = cv2.imread(str(env.voc / "JPEGImages" / f"{index}.jpg"))
    scores, boxes = detect_image(model, im, config)
    scores_nr, boxes_nr = detect_image(model, im, no_reg)
    assert scores.shape == scores_nr.shape and boxes.shape == boxes_nr.shape == (len(scores), 4 * len(classes))
    assert np.array_equal(scores, scores_nr), "the same RoIs are scored either way"
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)
    per_class = boxes_nr.reshape(len(boxes_nr), len(classes), 4)
    assert np.all(per_class == per_class[:, :1]), "without regression every class gets the RoI itself"
    h, w = im.shape[:2]
    assert boxes.min() >= 0 and boxes[:, 0::2].max() <= w - 1 and boxes[:, 1::2].max() <= h - 1
    assert not np.allclose(boxes, boxes_nr), "with regression the boxes move"
