"""The end2end mode (py-faster-rcnn's approximate joint training): its layers against hand-computed values, a tiny
net overfitting one image, the mode through the pipeline (run, rerun, status, kill and resume, compare), and the
config that selects it."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from kernels.boxes import bbox_overlaps
from nets import FasterRCNN, param_groups, proposal_target_layer, set_trainable
from nets.rpn import proposal_layer
from roidb.minibatch import sample_rois
from roidb.synthetic import ensure_shapes_dataset
from stages.engine.config import ConfigError, load_config, solver_settings
from stages.engine.graph import GRAPHS, graph_for
from tests.test_distributed import run_single, torchrun
from tests.test_nets_overfit import NUM_CLASSES, _blob, synthetic_image

ROOT = Path(__file__).resolve().parent.parent
TINY_YML = ROOT / "tests" / "data" / "tiny_pipeline.yml"
EXP = "tiny_e2e"
E2E_SETS = ("PIPELINE.MODE", "end2end", "PIPELINE.E2E_ITERS", "8", "PIPELINE.E2E_LR", "0.01",
            "PIPELINE.E2E_STEPSIZE", "6", "PIPELINE.E2E_SNAPSHOT_ITERS", "4")
STDS = (0.1, 0.1, 0.2, 0.2)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the proposal target layer and the losses, by hand ---------------------------------------------------------

def _smooth_l1(x: np.ndarray, sigma: float) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax < 1.0 / sigma ** 2, 0.5 * sigma ** 2 * x * x, ax - 0.5 / sigma ** 2)


def _targets(rois: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """py-faster-rcnn's bbox_transform, written out."""
    ew, eh = rois[:, 2] - rois[:, 0] + 1, rois[:, 3] - rois[:, 1] + 1
    ex, ey = rois[:, 0] + 0.5 * ew, rois[:, 1] + 0.5 * eh
    gw, gh = gt[:, 2] - gt[:, 0] + 1, gt[:, 3] - gt[:, 1] + 1
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    return np.stack([(gx - ex) / ew, (gy - ey) / eh, np.log(gw / ew), np.log(gh / eh)], axis=1)


GT = torch.tensor([[0, 0, 9, 9, 1], [20, 20, 29, 29, 2]], dtype=torch.float32)
# proposals (batch index 0): IoU with GT 0 / GT 1 written beside each
PROPOSALS = torch.tensor([
    [0, 1, 0, 10, 9],     # 90/110 = 0.818 with GT 0 (fg, class 1): targets (-0.1, 0, 0, 0) -> (-1, 0, 0, 0)
    [0, 0, 0, 9, 11],     # 100/120 = 0.833 with GT 0 (fg, class 1)
    [0, 20, 20, 29, 29],  # = GT 1 (fg, class 2)
    [0, 0, 0, 4, 9],      # 50/100 = 0.5 with GT 0 (fg: FG_THRESH is inclusive)
    [0, 0, 0, 3, 9],      # 40/100 = 0.4 with GT 0 (bg)
    [0, 20, 20, 24, 24],  # 25/100 = 0.25 with GT 1 (bg)
    [0, 40, 40, 49, 49],  # 0 (bg only when BG_THRESH_LO is 0)
    [0, 60, 60, 69, 69],  # 0
], dtype=torch.float32)


def test_proposal_target_takes_every_candidate_when_the_quota_allows():
    """BATCH_SIZE 64, FG_FRACTION 0.25: a quota of 16 fg, so all 4 fg proposals + the 2 appended GT boxes are fg,
    and with BG_THRESH_LO 0.1 the 2 bg proposals at 0.4 and 0.25 (not the 0-overlap ones) fill the rest."""
    t = proposal_target_layer(PROPOSALS, GT, 3, sample_rois, rng=np.random.default_rng(0), batch_size=64,
                              fg_fraction=0.25, fg_thresh=0.5, bg_thresh_hi=0.5, bg_thresh_lo=0.1,
                              bbox_normalize_stds=STDS)
    rois, labels = t["rois"].numpy(), t["labels"].numpy()
    assert len(rois) == 8 and sorted(labels[:6].tolist()) == [1, 1, 1, 1, 2, 2] and labels[6:].tolist() == [0, 0]
    fg_boxes = {tuple(r) for r in rois[:6, 1:].tolist()}
    assert fg_boxes == {(1, 0, 10, 9), (0, 0, 9, 11), (20, 20, 29, 29), (0, 0, 4, 9), (0, 0, 9, 9)}  # GT 1 twice
    assert {tuple(r) for r in rois[6:, 1:].tolist()} == {(0, 0, 3, 9), (20, 20, 24, 24)}
    row = [i for i, r in enumerate(rois) if tuple(r[1:]) == (1, 0, 10, 9)][0]
    np.testing.assert_allclose(t["bbox_targets"][row].numpy(), [0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(t["bbox_inside_weights"][row].numpy(), [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    assert not t["bbox_targets"][6:].any() and not t["bbox_outside_weights"][6:].any()
    # every fg row: (bbox_transform(roi, its GT) - 0) / stds in its class's 4 slots
    gt = GT.numpy()
    best = bbox_overlaps(rois[:, 1:].astype(np.float64), gt[:, :4].astype(np.float64)).argmax(axis=1)
    expected = _targets(rois[:6, 1:], gt[best[:6], :4]) / np.array(STDS)
    for i in range(6):
        np.testing.assert_allclose(t["bbox_targets"][i, 4 * labels[i]:4 * labels[i] + 4].numpy(), expected[i],
                                   atol=1e-5)


def test_proposal_target_respects_the_fg_quota_and_the_batch_size():
    """BATCH_SIZE 8, FG_FRACTION 0.25: 2 of the 6 fg candidates, then 6 bg (BG_THRESH_LO 0: 4 candidates, all
    taken; py-faster-rcnn does not pad), so 6 RoIs."""
    for seed in range(5):
        t = proposal_target_layer(PROPOSALS, GT, 3, sample_rois, rng=np.random.default_rng(seed), batch_size=8,
                                  fg_fraction=0.25, bg_thresh_lo=0.0, bbox_normalize_stds=STDS)
        labels = t["labels"].numpy()
        assert len(labels) == 6 and (labels[:2] > 0).all() and (labels[2:] == 0).all()
        assert int(t["bbox_outside_weights"].sum()) == 2 * 4


def _zeroed_predictors(model: FasterRCNN) -> None:
    with torch.no_grad():
        for layer in (model.rpn.rpn_cls_score, model.rpn.rpn_bbox_pred, model.roi_head.cls_score,
                      model.roi_head.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()


def _tiny_model(num_classes: int = NUM_CLASSES) -> FasterRCNN:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FasterRCNN("tiny", num_classes, seed=3)


def test_e2e_losses_normalisation_by_hand():
    """With zero predictors every logit is 0 and every delta 0: rpn_cls = log 2 (averaged over the sampled
    anchors), cls = log K (averaged over the sampled RoIs), bbox = sum of smooth-L1 (sigma 1) of the normalised
    targets divided by the number of RoIs (not of fg RoIs), computed here from the RoIs the sampler picked."""
    im, gt = synthetic_image()
    model = _tiny_model()
    _zeroed_predictors(model)
    blobs = {"data": _blob(im), "im_info": np.array([[240, 320, 1.0]], np.float32), "gt_boxes": gt}
    picked = {}

    def recording_sampler(max_overlaps, max_classes, **kw):
        keep, labels = sample_rois(max_overlaps, max_classes, **kw)
        picked.update(keep=keep, labels=labels)
        return keep, labels

    settings = dict(pre_nms_top_n=12000, post_nms_top_n=2000, nms_thresh=0.7, min_size=16)
    losses = model.e2e_losses(blobs, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0),
                              sampler=recording_sampler, proposal_settings=settings,
                              proposal_target_settings=dict(batch_size=128, bg_thresh_lo=0.0,
                                                            bbox_normalize_stds=STDS))
    assert set(losses) == {"rpn_cls", "rpn_bbox", "cls", "bbox"}
    losses = {k: v.detach() for k, v in losses.items()}
    assert float(losses["rpn_cls"]) == pytest.approx(np.log(2), rel=1e-6)
    assert float(losses["cls"]) == pytest.approx(np.log(NUM_CLASSES), rel=1e-6)
    # the proposals the layer saw: all deltas 0, so decoded anchors (an independent call on the same outputs)
    _, logits, deltas, anchors = model.rpn_forward(torch.from_numpy(blobs["data"]))
    rois, _ = proposal_layer(logits, deltas, [240, 320, 1.0], anchors, **settings)
    all_rois = np.vstack([rois[:, 1:].numpy(), gt[:, :4]]).astype(np.float64)
    keep, labels = picked["keep"], picked["labels"]
    assert len(keep) == 128 and (labels > 0).sum() <= 32
    best = bbox_overlaps(all_rois, gt[:, :4].astype(np.float64)).argmax(axis=1)
    fg = labels > 0
    t = _targets(all_rois[keep][fg], gt[best[keep][fg], :4].astype(np.float64)) / np.array(STDS)
    expected_bbox = _smooth_l1(t, 1.0).sum() / len(keep)
    assert float(losses["bbox"]) == pytest.approx(expected_bbox, rel=1e-5)
    assert float(losses["rpn_bbox"]) > 0


def test_no_gradient_flows_through_the_proposal_coordinates():
    """The Fast R-CNN losses alone give the RPN head no gradient: the proposals are constants ("approximate")."""
    im, gt = synthetic_image()
    model = _tiny_model()
    set_trainable(model, "e2e")
    blobs = {"data": _blob(im), "im_info": np.array([[240, 320, 1.0]], np.float32), "gt_boxes": gt}
    losses = model.e2e_losses(blobs, generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0),
                              sampler=sample_rois, proposal_settings=dict(pre_nms_top_n=12000, post_nms_top_n=2000,
                                                                           nms_thresh=0.7, min_size=16))
    (losses["cls"] + losses["bbox"]).backward()
    for name, p in model.rpn.named_parameters():
        assert p.grad is None or not p.grad.any(), name
    assert any(p.grad is not None and p.grad.any() for p in model.body.parameters())


def test_tiny_net_overfits_one_image_end_to_end():
    """The joint loss on one image falls by >= 80%, and the model then finds every GT box (IoU >= 0.5, right
    class) with its own RPN at test time."""
    from nets import im_detect, postprocess_detections
    im, gt = synthetic_image()
    model = _tiny_model()
    set_trainable(model, "e2e")
    model.set_bbox_normalization((0, 0, 0, 0), STDS)
    opt = torch.optim.SGD(param_groups(model, 0.01, 0.0005), momentum=0.9)
    blobs = {"data": _blob(im), "im_info": np.array([[240, 320, 1.0]], np.float32), "gt_boxes": gt}
    settings = dict(pre_nms_top_n=12000, post_nms_top_n=2000, nms_thresh=0.7, min_size=16)
    history = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a shared CI machine: no oversubscription
    try:
        history = _overfit(model, opt, blobs, settings, steps=80)
    finally:
        torch.set_num_threads(threads)
    assert np.mean(history[-5:]) <= 0.2 * np.mean(history[:5]), (history[:5], history[-5:])
    scores, boxes = im_detect(model, im, scales=[240], max_size=1000)
    dets = postprocess_detections(scores, boxes)
    for x1, y1, x2, y2, cls in gt:
        found = dets[int(cls)]
        assert len(found), f"class {int(cls)} not detected"
        iou = bbox_overlaps(found[:1, :4].astype(np.float64), np.array([[x1, y1, x2, y2]], np.float64))
        assert iou.max() >= 0.5, (int(cls), found[:1])


def _overfit(model, opt, blobs, settings, steps):
    history = []
    for k in range(steps):
        losses = model.e2e_losses(blobs, generator=torch.Generator().manual_seed(k), rng=np.random.default_rng(k),
                                  sampler=sample_rois, proposal_settings=settings,
                                  proposal_target_settings=dict(batch_size=64, bbox_normalize_stds=STDS))
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(float(total.detach()))
    return history


# ---- the mode and its config -------------------------------------------------------------------------------------

def test_py_faster_rcnn_end2end_yml_selects_end2end(tmp_path):
    """py-faster-rcnn's experiments/cfgs/faster_rcnn_end2end.yml, verbatim keys: TRAIN.HAS_RPN True and no
    PIPELINE.MODE give end2end; an explicit MODE (file or --set) wins; the alt-opt yml stays alt_opt."""
    yml = tmp_path / "faster_rcnn_end2end.yml"
    yml.write_text("EXP_DIR: faster_rcnn_end2end\nTRAIN:\n  HAS_RPN: True\n  IMS_PER_BATCH: 1\n"
                   "  BBOX_NORMALIZE_TARGETS_PRECOMPUTED: True\n  RPN_POSITIVE_OVERLAP: 0.7\n"
                   "  RPN_BATCHSIZE: 256\n  PROPOSAL_METHOD: gt\n  BG_THRESH_LO: 0.0\nTEST:\n  HAS_RPN: True\n")
    config = load_config(yml)
    assert config.PIPELINE.MODE == "end2end" and graph_for(config).order == ("e2e", "eval")
    assert load_config(yml, [("PIPELINE.MODE", "alt_opt")]).PIPELINE.MODE == "alt_opt"
    alt = tmp_path / "faster_rcnn_alt_opt.yml"
    alt.write_text("EXP_DIR: faster_rcnn_alt_opt\nTRAIN:\n  BG_THRESH_LO: 0.0\nTEST:\n  HAS_RPN: True\n")
    assert load_config(alt).PIPELINE.MODE == "alt_opt"
    assert load_config(ROOT / "configs" / "shapes_end2end.yml").PIPELINE.MODE == "end2end"
    vgg = load_config(ROOT / "configs" / "voc07_vgg16_end2end.yml")
    assert vgg.PIPELINE.MODE == "end2end"
    assert solver_settings(vgg, "E2E") == solver_settings(vgg, "E2E").__class__(
        iters=70000, lr=0.001, stepsize=50000, gamma=0.1, momentum=0.9, weight_decay=0.0005,
        snapshot_iters=10000, iter_size=2, amp="off")
    with pytest.raises(ConfigError, match="PIPELINE.MODE must be one of alt_opt, end2end"):
        load_config(None, [("PIPELINE.MODE", "joint")])


def test_end2end_graph_reads_its_own_solver():
    graph = GRAPHS["end2end"]
    e2e = graph.get_step("e2e")
    assert e2e.stage == "E2E" and "PIPELINE.E2E_ITERS" in e2e.reads
    assert not any(k.startswith("PIPELINE.STAGE") for k in e2e.reads)
    assert graph.get_step("eval").upstream == ("e2e",)


# ---- through the pipeline ----------------------------------------------------------------------------------------

class Env:
    def __init__(self, data_root: Path):
        self.voc = data_root / "shapes" / "VOC2007"
        self.data_root = data_root

    def args(self, out: Path, *extra: str, mode: str = "end2end") -> list[str]:
        pairs = [("PIPELINE.DATA_ROOT", str(self.data_root)), ("PIPELINE.OUTPUT_ROOT", str(out)),
                 ("PIPELINE.TRAIN_IMDB", f"vocfmt:{self.voc}:trainval"),
                 ("PIPELINE.TEST_IMDB", f"vocfmt:{self.voc}:test")]
        sets = [x for k, v in pairs for x in ("--set", k, v)]
        if mode == "end2end":
            sets += [x for i in range(0, len(E2E_SETS), 2) for x in ("--set", E2E_SETS[i], E2E_SETS[i + 1])]
        return ["--config", str(TINY_YML), *sets, *extra]


def cli(capsys, *args: str) -> str:
    code = pipeline.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def ran_steps(text: str) -> list[str]:
    return re.findall(r"^(\w+): running", text, flags=re.M)


def manifest(out: Path, step: str) -> dict:
    return json.loads((out / EXP / step / "manifest.json").read_text())


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    data_root = tmp_path_factory.mktemp("data")
    ensure_shapes_dataset(data_root / "shapes", num_trainval=11, num_test=7, n_jobs=1)
    return Env(data_root)


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    try:
        assert pipeline.main(["run", *env.args(out)]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    return out


def test_end2end_run_trains_and_evaluates(env, baseline, capsys):
    for step in ("e2e", "eval"):
        m = manifest(baseline, step)
        assert m["status"] == "done", step
    assert not (baseline / EXP / "stage1").exists()
    metrics = manifest(baseline, "e2e")["metrics"]
    assert metrics["iters"] == 8 and set(metrics) >= {"rpn_cls", "rpn_bbox", "cls", "bbox", "images_per_iter"}
    eval_metrics = manifest(baseline, "eval")["metrics"]
    assert eval_metrics["num_images"] == 7 and 0 <= eval_metrics["recall@0.5_top300"] <= 1
    keys = manifest(baseline, "e2e")["fingerprint_parts"]["keys"]
    assert keys["PIPELINE.E2E_ITERS"] == 8 and "TRAIN.RPN_POST_NMS_TOP_N" in keys
    assert "PIPELINE.E2E_SNAPSHOT_ITERS" not in keys
    text = cli(capsys, "run", *env.args(baseline))
    assert ran_steps(text) == []
    status = cli(capsys, "status", *env.args(baseline))
    assert re.search(r"^e2e\s+done", status, flags=re.M) and re.search(r"^eval\s+done", status, flags=re.M)
    assert "stage1" not in status


def test_until_and_clean_follow_the_end2end_graph(env, baseline, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baseline, out)
    removed = cli(capsys, "clean", "eval", *env.args(out))
    assert "removed" in removed
    assert ran_steps(cli(capsys, "run", *env.args(out, "--until", "e2e"))) == []
    code = pipeline.main(["run", *env.args(out, "--until", "stage2")])
    assert code == 2 and "PIPELINE.MODE end2end" in capsys.readouterr().err
    assert ran_steps(cli(capsys, "run", *env.args(out))) == ["eval"]   # restored from the run cache or re-run
    assert sha256(out / EXP / "eval" / "detections.pkl") == sha256(baseline / EXP / "eval" / "detections.pkl")


def test_killed_e2e_resumes_bit_identically(env, baseline, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "pipeline.py", "run", *env.args(out, "--until", "e2e")]
    child_env = {k: v for k, v in os.environ.items() if k != "FRCNN_FAULT"}
    # SIGKILL while writing the final model.pt, after the iteration-4 snapshot
    killed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**child_env, "FRCNN_FAULT": "kill:e2e/model.pt:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert manifest(out, "e2e")["status"] == "running"
    assert (out / EXP / "e2e" / "snapshots" / "iter_00000004.pt").is_file()
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=child_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[e2e] resuming from snapshot iteration 4/8" in resumed.stdout
    assert sha256(out / EXP / "e2e" / "model.pt") == sha256(baseline / EXP / "e2e" / "model.pt")


@pytest.fixture(scope="module")
def alt_opt(env, tmp_path_factory) -> Path:
    """A tiny alt_opt run and its unshared detector (eval --step stage2), for compare."""
    out = tmp_path_factory.mktemp("alt")
    try:
        assert pipeline.main(["run", *env.args(out, mode="alt_opt")]) == 0
        assert pipeline.main(["eval", "--step", "stage2", *env.args(out, mode="alt_opt")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    return out


def test_compare_reads_what_each_eval_wrote(env, baseline, alt_opt, tmp_path, capsys):
    from stages.commands.compare import compare
    text = cli(capsys, "compare", str(alt_opt / EXP), str(baseline / EXP), "--plot", str(tmp_path / "pr.png"))
    assert (tmp_path / "pr.png").stat().st_size > 0
    assert re.search(r"^mode\s+alt_opt\s+alt_opt\s+end2end$", text, flags=re.M)
    rows = json.loads(cli(capsys, "compare", str(alt_opt / EXP), str(baseline / EXP), "--json"))
    assert [r["detector"] for r in rows] == ["M4 (shared convs)", "M1 RPN + M2 (unshared)", "joint model"]
    for row, folder in zip(rows, (alt_opt / EXP / "eval", next((alt_opt / EXP).glob("eval_stage2_*")),
                                  baseline / EXP / "eval")):
        aps = json.loads((folder / "aps.json").read_text())
        assert row["map"] == aps["map"] and row["aps"] == aps["aps"]
        assert f"{aps['map']:.4f}" in text
    exp_manifests = [manifest(alt_opt, s) for s in ("stage1", "p1", "stage2", "stage3", "p2", "stage4")]
    assert rows[0]["train_seconds"] == pytest.approx(sum(m["timings"]["seconds"] for m in exp_manifests), abs=0.01)
    assert rows[0]["recall"] == {k: manifest(alt_opt, "eval")["metrics"][k]
                                 for k in ("recall@0.5_top300", "recall@0.7_top300")}
    unshared = json.loads(next((alt_opt / EXP).glob("eval_stage2_*/aps.json")).read_text())
    assert rows[1]["recall"] == unshared["proposal_recall"] and rows[1]["recall"]["recall@0.5_top300"] is not None
    assert rows[1]["train_seconds"] == pytest.approx(sum(m["timings"]["seconds"] for m in exp_manifests[:3]), abs=0.01)
    e2e = manifest(baseline, "e2e")["metrics"]
    assert rows[2]["images_per_second"] == pytest.approx(8 * e2e["images_per_iter"] / e2e["train_seconds"], rel=1e-3)
    assert rows[2]["step_seconds"]["e2e"] == pytest.approx(manifest(baseline, "e2e")["timings"]["seconds"], abs=1e-3)
    detectors, notes = compare([alt_opt / EXP, baseline / EXP])
    assert len(detectors) == 3 and notes == []


def test_eval_command_defaults_to_the_end2end_model(env, baseline, tmp_path, capsys):
    """`eval` on an end2end experiment detects with e2e/model.pt and scores what the eval step scored."""
    text = cli(capsys, "eval", *env.args(baseline, "--out", str(tmp_path / "ev")))
    assert text.startswith("e2e (joint model)")
    ours = json.loads((tmp_path / "ev" / "aps.json").read_text())
    theirs = json.loads((baseline / EXP / "eval" / "aps.json").read_text())
    assert ours["map"] == theirs["map"] and ours["proposal_recall"] == theirs["proposal_recall"]
    assert (tmp_path / "ev" / "detections.pkl").read_bytes() == (baseline / EXP / "eval" / "detections.pkl").read_bytes()


def test_compare_bad_input(tmp_path, capsys):
    code = pipeline.main(["compare", str(tmp_path)])
    assert code == 2 and "not an experiment folder" in capsys.readouterr().err


# ---- under torchrun ----------------------------------------------------------------------------------------------

def test_two_processes_match_one(env, tmp_path):
    """2 CPU ranks: the eval's sharded detections are byte-identical to one process's from the same model, and
    the e2e loss trajectory equals one process with ITER_SIZE 2 (the same global batch, the same anchor and RoI
    samples: each batch's seeds depend only on its number)."""
    from stages.engine.trainer import read_log
    ddp = tmp_path / "ddp"
    proc = torchrun(env, ddp, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert manifest(ddp, "e2e")["world_size"] == 2 and manifest(ddp, "eval")["status"] == "done"
    assert "2 images per iteration (2 process(es) x ITER_SIZE 1 x 1)" in proc.stdout
    single = tmp_path / "single"
    shutil.copytree(ddp, single)
    assert run_single(env, single, "--only", "eval", "--force", "eval") == 0
    for name in ("detections.pkl", "aps.json"):
        assert (single / EXP / "eval" / name).read_bytes() == (ddp / EXP / "eval" / name).read_bytes(), name
    accumulated = tmp_path / "accumulated"
    assert run_single(env, accumulated, "--until", "e2e", "--set", "PIPELINE.ITER_SIZE", "2") == 0
    a, b = read_log(ddp / EXP / "e2e" / "log.jsonl"), read_log(accumulated / EXP / "e2e" / "log.jsonl")
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x["lr"] == y["lr"]
        for key in ("rpn_cls", "rpn_bbox", "cls", "bbox"):
            assert x["losses"][key] == pytest.approx(y["losses"][key], rel=1e-5, abs=1e-7), (x["iter"], key)


@pytest.mark.parametrize("amp", ["bf16"])   # fp16 (GradScaler) is mode-independent; test_distributed covers it
def test_e2e_trains_under_amp_on_the_cpu(env, tmp_path, amp):
    from stages.engine.trainer import read_log
    out = tmp_path / amp
    try:
        assert pipeline.main(["run", *env.args(out, "--until", "e2e", "--set", "PIPELINE.AMP", amp)]) == 0
    finally:
        torch.use_deterministic_algorithms(False)
    records = read_log(out / EXP / "e2e" / "log.jsonl")
    assert len(records) == 8 and all(np.isfinite(r["loss"]) and r["loss"] < 20 for r in records)
    assert manifest(out, "e2e")["fingerprint_parts"]["keys"]["PIPELINE.AMP"] == amp
