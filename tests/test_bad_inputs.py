"""The bad-input matrix, through the command line on the real small pipeline: one named test per case.

Each refused case asserts a single `error: ...` line that names the file (and object, line or key) at fault, exit
status 2, no traceback (unless --debug), and that every file that existed in the output folder before the command
is untouched (sha256 and mtime; config.yml, rewritten on each run, by content). The state before each case is a
finished baseline run; data errors are provoked by `run --force stage1` after the dataset was damaged (stage1 is
set aside, fails while loading its data, and is put back), foreign files by registering them as a step's output.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import (EXP, STEPS, Workspace, changed_files, cli, digest_tree, error_line, hostile_pickle,
                    manifest, manifest_problems, register_output, remove_steps, sha256)
from roidb.factory import get_imdb

CONFIG_YML = f"{EXP}/config.yml"
SHAPE_CLASSES = ["ellipse", "rectangle", "triangle", "star", "cross", "ring"]


def first_train_id(ws: Workspace) -> str:
    return (ws.voc / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]


def refused(ws: Workspace, capsys, before: dict, *args: str, fault: str | None = None, **overrides: str) -> str:
    """Run `pipeline.py run ARGS`; assert exit 2, one error line, nothing that existed changed; the line."""
    code, out, err = cli(capsys, ws, "run", *args, fault=fault, **overrides)
    assert code == 2, out + err
    line = error_line(err)
    if overrides:  # config.yml records the config of the latest run, so only its content may change then
        before = {k: v for k, v in before.items() if k != CONFIG_YML}
    assert changed_files(before, digest_tree(ws.out), content_only=(CONFIG_YML,)) == []
    assert not list(ws.exp.glob(".*.previous")), "a set-aside step folder was left behind"
    assert manifest_problems(ws.exp) == []
    return line


def damage_training_data(ws: Workspace, capsys, damage) -> str:
    """Apply `damage(ws, image_id)` to the training set, then `run --force stage1`: the refusal line."""
    before = digest_tree(ws.out)
    damage(ws, first_train_id(ws))
    line = refused(ws, capsys, before, "--force", "stage1")
    return line


def edit_xml(ws: Workspace, image_id: str, pattern: str, replacement: str, count: int = 1) -> Path:
    path = ws.voc / "Annotations" / f"{image_id}.xml"
    text, n = re.subn(pattern, replacement, path.read_text(), count=count)
    assert n == count
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------- annotations
def test_malformed_xml(ws, capsys):
    def damage(ws, image_id):
        path = ws.voc / "Annotations" / f"{image_id}.xml"
        path.write_text(path.read_text()[:200])
    line = damage_training_data(ws, capsys, damage)
    xml = ws.voc / "Annotations" / f"{first_train_id(ws)}.xml"
    assert f"{xml}: malformed XML" in line and "line" in line


def test_annotation_with_x2_below_x1(ws, capsys):
    def damage(ws, image_id):
        edit_xml(ws, image_id, r"<xmin>(\d+)</xmin>(\s*)<ymin>(\d+)</ymin>(\s*)<xmax>(\d+)</xmax>",
                 r"<xmin>\5</xmin>\2<ymin>\3</ymin>\4<xmax>\1</xmax>")
    line = damage_training_data(ws, capsys, damage)
    assert f"{first_train_id(ws)}.xml: object[0]" in line and "xmax < xmin" in line


def test_zero_coordinate_in_1_based_xml_is_clamped_with_a_warning(ws):
    """Not an error: a 0 in the (1-based) XML becomes 0 after the shift, with a warning, never 65535."""
    image_id = first_train_id(ws)
    edit_xml(ws, image_id, r"<xmin>\d+</xmin>", "<xmin>0</xmin>")
    proc = ws.run("run", "--force", "stage1", "--until", "stage1")
    assert proc.returncode == 0, proc.stderr
    assert "1 boxes had a 0 coordinate in the XML" in proc.stderr and "clamped to 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    imdb = get_imdb(f"vocfmt:{ws.voc}:trainval", data_root=ws.data_root, classes=SHAPE_CLASSES)
    index = imdb.image_index.index(image_id)
    boxes = imdb.gt_roidb()[index]["boxes"]
    assert boxes.dtype == np.float32 and boxes[0, 0] == 0.0
    assert boxes.max() < 1000 and boxes.min() >= 0, "a -1 must never wrap to 65535"
    assert manifest(ws.exp, "stage1")["status"] == "done"


def test_box_outside_the_image(ws, capsys):
    def damage(ws, image_id):
        edit_xml(ws, image_id, r"<xmax>\d+</xmax>", "<xmax>5000</xmax>")
    line = damage_training_data(ws, capsys, damage)
    assert f"{first_train_id(ws)}.xml: object[0]" in line and "lies outside" in line


def test_unknown_class_name(ws, capsys):
    def damage(ws, image_id):
        edit_xml(ws, image_id, r"<name>\w+</name>", "<name>unicorn</name>")
    line = damage_training_data(ws, capsys, damage)
    assert f"{first_train_id(ws)}.xml: object[0]: unknown class 'unicorn'" in line


# --------------------------------------------------------------------------------------------- images, sets
def test_missing_jpeg(ws, capsys):
    def damage(ws, image_id):
        (ws.voc / "JPEGImages" / f"{image_id}.jpg").unlink()
    line = damage_training_data(ws, capsys, damage)
    assert f"JPEGImages/{first_train_id(ws)}.jpg: image file not found" in line


def test_zero_byte_jpeg(ws, capsys):
    def damage(ws, image_id):
        (ws.voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")
    line = damage_training_data(ws, capsys, damage)
    assert f"JPEGImages/{first_train_id(ws)}.jpg: empty image file (0 bytes)" in line


def test_unreadable_jpeg(ws, capsys):
    def damage(ws, image_id):
        (ws.voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"this is not an image\n" * 50)
    line = damage_training_data(ws, capsys, damage)
    assert f"JPEGImages/{first_train_id(ws)}.jpg: " in line
    assert "not a readable image" in line or "corrupt JPEG" in line


def test_empty_imageset_file(ws, capsys):
    def damage(ws, image_id):
        (ws.voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n")
    line = damage_training_data(ws, capsys, damage)
    assert "ImageSets/Main/trainval.txt: image set file is empty" in line


# --------------------------------------------------------------------------------------------- proposal pickles
def p1_boxes(ws: Workspace) -> list[np.ndarray]:
    with open(ws.exp / "p1" / "proposals.pkl", "rb") as handle:
        return pickle.load(handle)  # our own baseline file


def refused_p1(ws: Workspace, capsys, data: bytes) -> str:
    """P1 replaced by `data` (registered in p1's manifest, as an imported pickle would be); stage2 reads it."""
    register_output(ws.exp, "p1", "proposals.pkl", data)
    before = digest_tree(ws.out)
    line = refused(ws, capsys, before)
    assert manifest(ws.exp, "stage2")["outputs"] == ws.baseline["stage2"], "the previous M2 is kept"
    return line


def test_proposal_pickle_truncated(ws, capsys):
    data = (ws.exp / "p1" / "proposals.pkl").read_bytes()
    line = refused_p1(ws, capsys, data[: len(data) // 2])
    assert f"{ws.exp / 'p1' / 'proposals.pkl'}: truncated pickle" in line


def test_proposal_pickle_with_the_wrong_image_count(ws, capsys):
    boxes = p1_boxes(ws)
    line = refused_p1(ws, capsys, pickle.dumps(boxes[:-1], protocol=2))
    assert f"proposals.pkl: proposal pickle has {len(boxes) - 1} images but" in line


def test_proposal_pickle_arrays_not_n_by_4(ws, capsys):
    boxes = p1_boxes(ws)
    line = refused_p1(ws, capsys, pickle.dumps([b[:, :3] for b in boxes], protocol=2))
    assert "proposals.pkl: image 0 (" in line and "proposals must be an (N, 4) array, got (" in line


def test_proposal_pickle_with_nan_coordinates(ws, capsys):
    boxes = p1_boxes(ws)
    boxes[1][0, 2] = np.nan
    line = refused_p1(ws, capsys, pickle.dumps(boxes, protocol=2))
    assert "proposals.pkl: image 1 (" in line and "NaN or infinite coordinates" in line


def test_pickle_that_would_run_code_is_not_run(ws, capsys, tmp_path):
    marker = tmp_path / "pwned"
    line = refused_p1(ws, capsys, hostile_pickle(marker))
    assert "refused to unpickle global" in line and "system" in line and "nothing from the file was run" in line
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- checkpoints
def altered_m3(ws: Workspace, **changes) -> bytes:
    ckpt = torch.load(ws.exp / "stage3" / "model.pt", map_location="cpu", weights_only=True)
    ckpt.update(changes)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


def test_checkpoint_from_another_net(ws, capsys):
    register_output(ws.exp, "stage3", "model.pt", altered_m3(ws, net="vgg16"))
    line = refused(ws, capsys, digest_tree(ws.out))
    assert f"{ws.exp / 'stage3' / 'model.pt'}: checkpoint is for net 'vgg16', expected 'tiny'" in line


def test_checkpoint_with_another_class_list(ws, capsys):
    ckpt = torch.load(ws.exp / "stage3" / "model.pt", map_location="cpu", weights_only=True)
    other = ["__background__", "cat", "dog", "bird", "cow", "horse", "sheep"]
    assert len(other) == len(ckpt["classes"])
    register_output(ws.exp, "stage3", "model.pt", altered_m3(ws, classes=other))
    line = refused(ws, capsys, digest_tree(ws.out))
    assert "stage3/model.pt: checkpoint classes" in line and "'dog'" in line and "differ from expected" in line


def test_initial_weights_from_another_net(ws, capsys, tmp_path):
    """PIPELINE.WEIGHTS (M0) holding a ZF-layout state dict (5 convs) for the tiny net (4)."""
    shapes = [(16, 3, 7, 7), (32, 16, 5, 5), (32, 32, 3, 3), (32, 32, 3, 3), (16, 32, 3, 3)]
    state = {f"conv{i + 1}.weight": torch.zeros(s) for i, s in enumerate(shapes)}
    state.update({f"conv{i + 1}.bias": torch.zeros(s[0]) for i, s in enumerate(shapes)})
    for name, (cout, cin) in (("fc6", (64, 16 * 36)), ("fc7", (64, 64)), ("fc8", (10, 64))):
        state.update({f"{name}.weight": torch.zeros(cout, cin), f"{name}.bias": torch.zeros(cout)})
    weights = tmp_path / "zf_like.pt"
    torch.save(state, weights)
    line = refused(ws, capsys, digest_tree(ws.out), **{"PIPELINE.WEIGHTS": str(weights)})
    assert f"{weights}: 5 conv layers, tiny has 4" in line


# --------------------------------------------------------------------------------------------- config, steps
def test_unknown_config_key(ws, capsys, tmp_path):
    before = digest_tree(ws.out)
    line = refused(ws, capsys, before, **{"TRAIN.RPN_BATCHSIZ": "64"})
    assert line == "error: --set TRAIN.RPN_BATCHSIZ: unknown config key TRAIN.RPN_BATCHSIZ (did you mean " \
                   "TRAIN.RPN_BATCHSIZE?)"
    yml = tmp_path / "bad.yml"
    yml.write_text("EXP_DIR: tiny_e2e\nTRAIN:\n  SCALES: [96]\n  FG_TRESH: 0.4\n")
    code, out, err = cli(capsys, ws, "run", "--config", str(yml))
    assert code == 2
    assert f"{yml}" in error_line(err) and "unknown config key TRAIN.FG_TRESH" in err
    assert changed_files(before, digest_tree(ws.out), content_only=(CONFIG_YML,)) == []


def test_config_value_of_the_wrong_type(ws, capsys):
    before = digest_tree(ws.out)
    line = refused(ws, capsys, before, **{"PIPELINE.STAGE2_ITERS": "'many'"})
    assert line == "error: --set PIPELINE.STAGE2_ITERS 'many': config key PIPELINE.STAGE2_ITERS expects int, " \
                   "got str 'many'"
    line = refused(ws, capsys, before, **{"TRAIN.SCALES": "600"})
    assert "config key TRAIN.SCALES expects" in line


def test_from_a_step_whose_inputs_do_not_exist(ws, capsys):
    remove_steps(ws.exp, "p1")
    before = digest_tree(ws.out)
    line = refused(ws, capsys, before, "--from", "stage2")
    assert "p1" in line and "stage2" in line
    assert not (ws.exp / "stage2").exists()


# --------------------------------------------------------------------------------------------- disk full
def test_disk_full_while_writing_config_yml_keeps_it(ws, capsys):
    before = digest_tree(ws.out)
    code, out, err = cli(capsys, ws, "run", fault="enospc:config.yml:1", **{"TEST.NMS": "0.4"})
    assert code == 2
    line = error_line(err)
    assert "No space left on device" in line and f"{ws.exp / 'config.yml'}" in line
    assert changed_files(before, digest_tree(ws.out)) == [], "config.yml too keeps its bytes and mtime"


def test_disk_full_while_writing_proposals_keeps_the_previous_ones(ws, capsys):
    before = digest_tree(ws.out)
    line = refused(ws, capsys, before, "--force", "p2", fault="enospc:p2/proposals.pkl:1")
    assert "No space left on device" in line and f"{ws.exp / 'p2' / 'proposals.pkl'}" in line
    assert not list((ws.exp / "p2").glob(".*.tmp"))


def test_disk_full_during_a_snapshot_keeps_the_previous_snapshot(ws, capsys):
    remove_steps(ws.exp, "stage4")
    before = digest_tree(ws.out)
    every_iter = {"PIPELINE.STAGE4_SNAPSHOT_ITERS": "1"}
    line = refused(ws, capsys, before, fault="enospc:stage4/snapshots/iter_*.pt:2", **every_iter)
    assert "No space left on device" in line and "iter_00000002.pt" in line
    snapshots = sorted(p.name for p in (ws.exp / "stage4" / "snapshots").iterdir())
    assert snapshots == ["iter_00000001.pt"]
    assert torch.load(ws.exp / "stage4" / "snapshots" / snapshots[0], weights_only=True)["iteration"] == 1
    code, out, err = cli(capsys, ws, "run", "--until", "stage4", **every_iter)
    assert code == 0, err
    assert "resuming from snapshot iteration 1/4" in out
    assert sha256(ws.exp / "stage4" / "model.pt") == ws.m4_sha()


# --------------------------------------------------------------------------------------------- NaN loss
def test_nan_loss_at_iteration_k_stops_names_k_and_keeps_the_last_good_snapshot(ws, capsys):
    remove_steps(ws.exp, "stage4")
    before = digest_tree(ws.out)
    every_iter = {"PIPELINE.STAGE4_SNAPSHOT_ITERS": "1"}
    line = refused(ws, capsys, before, fault="nan:stage4:3", **every_iter)
    assert "stage4: non-finite loss at iteration 3" in line
    assert "last good snapshot: snapshots/iter_00000002.pt" in line
    snapshots = sorted(p.name for p in (ws.exp / "stage4" / "snapshots").iterdir())
    assert snapshots[-1] == "iter_00000002.pt" and not (ws.exp / "stage4" / "model.pt").exists()
    log = [json.loads(x) for x in (ws.exp / "stage4" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3] and not np.isfinite(log[-1]["loss"])
    assert manifest(ws.exp, "stage4")["status"] == "running"
    code, out, err = cli(capsys, ws, "run", "--until", "stage4", **every_iter)
    assert code == 0 and "resuming from snapshot iteration 2/4" in out
    assert sha256(ws.exp / "stage4" / "model.pt") == ws.m4_sha(), "iteration 3's NaN update was never applied"


# --------------------------------------------------------------------------------------------- presentation
def test_debug_shows_the_traceback(ws, capsys):
    edit_xml(ws, first_train_id(ws), r"<name>\w+</name>", "<name>unicorn</name>")
    code, out, err = cli(capsys, ws, "run", "--force", "stage1", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_a_real_process_prints_one_line_and_exits_2(ws):
    edit_xml(ws, first_train_id(ws), r"<name>\w+</name>", "<name>unicorn</name>")
    before = digest_tree(ws.out)
    proc = ws.run("run", "--force", "stage1")
    assert proc.returncode == 2
    assert "unknown class 'unicorn'" in error_line(proc.stderr)
    assert changed_files(before, digest_tree(ws.out), content_only=(CONFIG_YML,)) == []
    assert all(manifest(ws.exp, s)["status"] == "done" for s in STEPS)


def test_an_isolated_step_reports_bad_input_in_one_line_too(ws, capsys):
    """With PIPELINE.ISOLATE_STEPS the body fails in a child process; the user still sees one error line."""
    edit_xml(ws, first_train_id(ws), r"<name>\w+</name>", "<name>unicorn</name>")
    line = refused(ws, capsys, digest_tree(ws.out), "--force", "stage1", **{"PIPELINE.ISOLATE_STEPS": "True"})
    assert line.startswith("error: stage1: ") and "unknown class 'unicorn'" in line


# --------------------------------------------------------------------------------------------- round 2: config ranges
RANGE_CASES = [("TRAIN.RPN_BATCHSIZE", "0"), ("TRAIN.BATCH_SIZE", "0"), ("PIPELINE.ANCHOR_RATIOS", "[0]"),
               ("TRAIN.FG_THRESH", "2"), ("TRAIN.SCALES", "[0]"), ("TRAIN.MAX_SIZE", "0"), ("TEST.MAX_SIZE", "0"),
               ("PIPELINE.ANCHOR_SCALES", "[]"), ("PIPELINE.MOMENTUM", "-0.5"), ("PIPELINE.WEIGHT_DECAY", "-1"),
               ("RNG_SEED", "-3"), ("TRAIN.SCALES", "[[96]]")]


def test_settings_that_would_train_garbage_are_refused_at_load_naming_the_key(ws, capsys):
    """Each of these trained with loss 0 (or crashed in cv2/torch) before; now the config load refuses them."""
    before = digest_tree(ws.out)
    for key, raw in RANGE_CASES:
        line = refused(ws, capsys, before, "--force", "stage1", **{key: raw})
        assert line.startswith(f"error: --set {key} {raw}: config key {key} "), line
    assert manifest(ws.exp, "stage1")["outputs"] == ws.baseline["stage1"]


def test_alias_bomb_config_file_is_refused_in_under_a_second(ws, capsys, tmp_path):
    import time
    from test_config import alias_bomb
    bomb = tmp_path / "bomb.yml"
    bomb.write_text(alias_bomb())
    before = digest_tree(ws.out)
    start = time.perf_counter()
    code, out, err = cli(capsys, ws, "run", "--config", str(bomb))
    assert time.perf_counter() - start < 1.0
    assert code == 2 and f"{bomb} line 1: YAML anchors and aliases" in error_line(err)
    assert changed_files(before, digest_tree(ws.out)) == []


# --------------------------------------------------------------------------------------------- round 2: containment
def listing(*folders: Path) -> set[str]:
    """Every path below `folders` (names only: the before/after picture of the filesystem around the roots)."""
    found: set[str] = set()
    for folder in folders:
        if folder.exists():
            found.add(str(folder))
            found.update(str(p) for p in folder.rglob("*"))
    return found


def test_no_name_in_the_config_or_the_data_can_write_outside_the_roots(ws, capsys, tmp_path_factory):
    """`../` and absolute names through every name-bearing key: classes, EXP_DIR, vocfmt split, imdb names,
    image ids, cocofmt parts. Each is refused in one line, and nothing appears anywhere around the roots."""
    import uuid
    tag = f"escape_{uuid.uuid4().hex[:8]}"
    tmp = Path("/tmp")
    around = [ws.root.parent, tmp / tag]
    before_around, before_tmp = listing(*around), set(map(str, tmp.iterdir()))
    escapes = [f"../../../../../../../../tmp/{tag}/evil", f"/tmp/{tag}/evil", "../evil", f"{tag}/../../evil"]
    keys: list[dict[str, str]] = []
    for name in escapes:
        keys.append({"PIPELINE.CLASSES": repr(["ellipse", "rectangle", "triangle", "star", "cross", name])})
        keys.append({"EXP_DIR": name})
        keys.append({"PIPELINE.TRAIN_IMDB": f"vocfmt:{ws.voc}:{name}"})
        keys.append({"PIPELINE.TEST_IMDB": f"vocfmt:{ws.voc}:{name}"})
        keys.append({"PIPELINE.TEST_IMDB": f"cocofmt:{ws.root}/{name}.json:{ws.root}/{name}"})
        keys.append({"PIPELINE.TRAIN_IMDB": f"voc_2007_{name}"})
    baseline = digest_tree(ws.out)
    for overrides in keys:
        code, out, err = cli(capsys, ws, "run", "--force", "stage1", **overrides)
        assert code == 2, (overrides, out, err)
        line = error_line(err)
        assert any(part in line for part in ("not a plain name", "EXP_DIR must be a relative folder name",
                                             "not found", "unknown imdb name", "does not exist",
                                             "a class list is only accepted")), line
    image_sets = ws.voc / "ImageSets" / "Main" / "trainval.txt"
    for name in escapes:  # an image id is a name too
        image_sets.write_text(f"{name}\n" + image_sets.read_text())
        code, out, err = cli(capsys, ws, "run", "--force", "stage1")
        assert code == 2 and "image id" in error_line(err) and "not a plain name" in err, err
        image_sets.write_text(image_sets.read_text().split("\n", 1)[1])
    assert changed_files(baseline, digest_tree(ws.out), content_only=(CONFIG_YML,)) == []
    assert listing(*around) - before_around - listing(ws.out, ws.data_root) == set()
    assert set(map(str, tmp.iterdir())) - before_tmp == set() or not (tmp / tag).exists()
    assert not (tmp / tag).exists()


def test_the_write_guard_catches_an_escape_that_no_name_check_saw(tmp_path):
    """Defence in depth: with the CLI's roots installed, a writer handed an escaping path refuses it (PathEscapeError,
    one line) before creating anything, in the engine (atomic writes) and in roidb (eval files, caches)."""
    import stages.write_guard  # noqa: F401  (installs the roidb guard)
    from roidb.imdb import atomic_write_bytes as roidb_write
    from roidb.voc_eval import write_voc_results_files
    from stages.engine.artifacts import atomic_write_text
    from stages.engine.paths import PathEscapeError, set_write_roots
    out, data = tmp_path / "out", tmp_path / "data"
    previous = set_write_roots([out, data])
    try:
        atomic_write_text(out / "exp" / "ok.txt", "fine")
        roidb_write(data / "cache" / "ok.pkl", b"fine")
        for target in (out / ".." / "evil.txt", tmp_path / "evil.txt", Path("/tmp") / "evil_guard.txt"):
            with pytest.raises(PathEscapeError, match="refused to write outside"):
                atomic_write_text(target, "x")
            with pytest.raises(PathEscapeError, match="refused to write outside"):
                roidb_write(target, b"x")
        with pytest.raises(PathEscapeError):
            write_voc_results_files([[np.zeros((0, 5), np.float32)]] * 2, ["a"],
                                    ["__background__", "/../../../../../../../../../tmp/evil_guard"],
                                    str(out / "exp" / "results"), "test")
    finally:
        set_write_roots(previous)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]
    assert not Path("/tmp/evil_guard.txt").exists()
