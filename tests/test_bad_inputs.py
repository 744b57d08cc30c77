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
    assert not (tmp / tag).exists() and not [p for p in set(map(str, tmp.iterdir())) - before_tmp if "evil" in p]


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


# --------------------------------------------------------------------------------------------- round 2: images
def jpeg_of(ws: Workspace, image_id: str) -> Path:
    return ws.voc / "JPEGImages" / f"{image_id}.jpg"


def test_a_fifo_directory_or_device_where_an_image_is_expected_says_what_it_is(ws, capsys):
    import os
    kinds = {"a FIFO (named pipe)": lambda p: os.mkfifo(p), "a directory": lambda p: p.mkdir(),
             "a character device": lambda p: p.symlink_to("/dev/zero")}
    for words, make in kinds.items():
        def damage(ws, image_id, make=make):
            jpeg_of(ws, image_id).unlink()
            make(jpeg_of(ws, image_id))
        line = damage_training_data(ws, capsys, damage)
        assert f"JPEGImages/{first_train_id(ws)}.jpg: image file is {words}, not a regular file" in line, line
        ws.reset()


def test_demo_on_a_fifo_does_not_block(ws, tmp_path):
    import os
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    proc = ws.run("demo", str(fifo), "--out", str(tmp_path / "demo"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{fifo}: image file is a FIFO (named pipe), not a regular file" in error_line(proc.stderr)
    assert not (tmp_path / "demo").exists()


def test_a_truncated_jpeg_is_refused_not_trained_on(ws, capsys):
    def damage(ws, image_id):
        data = jpeg_of(ws, image_id).read_bytes()
        jpeg_of(ws, image_id).write_bytes(data[: len(data) * 2 // 3])
    line = damage_training_data(ws, capsys, damage)
    assert f"JPEGImages/{first_train_id(ws)}.jpg: truncated JPEG (no end-of-image marker)" in line


def set_jpeg_header_size(path: Path, width: int, height: int) -> None:
    """Rewrite the SOF0 segment's size fields (the pixels stay as they are)."""
    import struct
    data = bytearray(path.read_bytes())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def test_a_jpeg_whose_header_disagrees_with_the_xml_or_is_absurd(ws, capsys):
    image_id = first_train_id(ws)
    xml = (ws.voc / "Annotations" / f"{image_id}.xml").read_text()
    width, height = (int(re.search(rf"<{k}>(\d+)</{k}>", xml).group(1)) for k in ("width", "height"))

    def smaller(ws, image_id):
        set_jpeg_header_size(jpeg_of(ws, image_id), width - 8, height)
    line = damage_training_data(ws, capsys, smaller)
    assert f"{image_id}.xml: <size> says {width}x{height} but the image is {width - 8}x{height}" in line
    ws.reset()

    def absurd(ws, image_id):
        set_jpeg_header_size(jpeg_of(ws, image_id), 20000, 20000)
    line = damage_training_data(ws, capsys, absurd)
    assert f"{image_id}.jpg: image header claims 20000x20000 pixels, over the 100,000,000-pixel limit" in line


def test_decode_checks_the_header_against_the_annotation_and_the_decode_itself(tmp_path):
    """Before decoding: the header's size against the annotation's; after: that the decode worked."""
    import cv2
    from roidb.errors import DataError
    from roidb.imdb import decode_image
    path = tmp_path / "x.jpg"
    cv2.imwrite(str(path), np.full((40, 60, 3), 128, np.uint8))
    assert decode_image(path, (40, 60)).shape == (40, 60, 3)
    set_jpeg_header_size(path, 30, 40)
    with pytest.raises(DataError, match=r"x\.jpg: image is 30x40 but its annotation says 60x40"):
        decode_image(path, (40, 60))
    png = tmp_path / "y.png"
    cv2.imwrite(str(png), np.full((40, 60, 3), 128, np.uint8))
    data = bytearray(png.read_bytes())
    data[60:80] = b"\x00" * 20  # inside the IDAT stream: the CRC and inflate fail
    png.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"y\.png: cannot decode image"):
        decode_image(png, (40, 60))


# --------------------------------------------------------------------------------------------- round 2: XML
def test_an_xml_with_an_external_entity_says_so_in_training_and_in_eval(ws, capsys, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("ellipse")

    def damage(ws, image_id):
        path = ws.voc / "Annotations" / f"{image_id}.xml"
        text = path.read_text()
        decl = f'<?xml version="1.0"?>\n<!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file://{secret}">]>\n'
        path.write_text(decl + re.sub(r"<name>\w+</name>", "<name>&xxe;</name>", text.split("?>", 1)[-1]
                                      if text.startswith("<?xml") else text, count=1))
    line = damage_training_data(ws, capsys, damage)
    assert f"{first_train_id(ws)}.xml: XML declares the entity 'xxe' (<!ENTITY ...>)" in line
    from roidb.errors import DataError
    from roidb.voc_eval import parse_rec
    with pytest.raises(DataError, match=r"XML declares the entity 'xxe'"):  # eval's reader: the same parser
        parse_rec(str(ws.voc / "Annotations" / f"{first_train_id(ws)}.xml"))


def test_a_5000_digit_coordinate_gives_a_short_line(ws, capsys):
    def damage(ws, image_id):
        edit_xml(ws, image_id, r"<xmax>\d+</xmax>", "<xmax>" + "9" * 5000 + "</xmax>")
    line = damage_training_data(ws, capsys, damage)
    assert f"{first_train_id(ws)}.xml: object[0]" in line and len(line) < 500, line


# --------------------------------------------------------------------------------------------- round 2: state files
@pytest.mark.parametrize("field, value", [("outputs", ["model.pt"]), ("progress", 7), ("metrics", "good"),
                                          ("fingerprint", 42), ("fingerprint", "../../../x"), ("timings", [1]),
                                          ("outputs", {"../../../etc/passwd": "0" * 64})])
def test_a_hand_edited_manifest_with_a_wrong_type_reads_as_not_done(ws, capsys, field, value):
    path = ws.exp / "stage4" / "manifest.json"
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    code, out, err = cli(capsys, ws, "status")
    assert code == 0 and "Traceback" not in err, err
    assert re.search(r"stage4\s+stale: manifest unreadable", out), out
    code, out, err = cli(capsys, ws, "run", "--until", "stage4")
    assert code == 0 and "Traceback" not in err, err
    assert manifest(ws.exp, "stage4")["status"] == "done"
    assert manifest(ws.exp, "stage4")["outputs"] == ws.baseline["stage4"], "re-run reproduces M4 bit for bit"


def test_an_annotation_cache_of_the_wrong_shape_is_rebuilt(ws, capsys):
    code, out, err = cli(capsys, ws, "eval")
    assert code == 0, err
    caches = list(ws.data_root.rglob("annots_*.json"))
    assert caches, "eval keeps a parsed-annotation cache"
    good = [c.read_text() for c in caches]
    for bad in ('["not", "a", "dict"]', '{"%s": 3}', '{"%s": [{"name": 1, "bbox": "x"}]}', "[[[[[[["):
        for c in caches:
            c.write_text(bad.replace("%s", "000001") if "%s" in bad else bad)
        code, out2, err = cli(capsys, ws, "eval")
        assert code == 0 and "Traceback" not in err, err
        assert out2.splitlines()[1:] == out.splitlines()[1:]
    assert [c.read_text() for c in caches] == good, "rebuilt from the XML"


def test_a_training_set_with_no_objects_says_so_naming_the_imdb(ws, capsys):
    def damage(ws, image_id):
        for xml in (ws.voc / "Annotations").glob("*.xml"):
            xml.write_text(re.sub(r"<object>.*?</object>", "", xml.read_text(), flags=re.S))
    line = damage_training_data(ws, capsys, damage)
    assert "vocfmt_VOC2007_" in line and "_trainval: the training set has no objects" in line


def test_a_lock_left_by_another_host_says_how_to_release_it(ws, capsys):
    (ws.exp / ".lock").write_text(json.dumps({"pid": 4242, "host": "gpu-node-17", "started": "2026-01-01T00:00"}))
    line = refused(ws, capsys, digest_tree(ws.out))
    assert "in use by another run (pid 4242 on gpu-node-17" in line
    assert f"remove {ws.exp / '.lock'} by hand" in line


# --------------------------------------------------------------------------------------------- round 2: pickles
BYTEARRAY_BOMB = b"\x80\x02c__builtin__\nbytearray\nJ\x00\x94\x35\x77\x85R."  # bytearray(2000000000), 33 bytes


def reduce_pickle(module: str, name: str, args: tuple) -> bytes:
    """A protocol-2 pickle that calls module.name(*args) (args: ints, tuples of ints and strings)."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the args tuple without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."


@pytest.mark.parametrize("data, words", [
    (BYTEARRAY_BOMB, "bytearray would allocate 2,000,000,000 bytes"),
    (reduce_pickle("__builtin__", "bytes", (2_000_000_000,)), "bytes would allocate 2,000,000,000 bytes"),
    (reduce_pickle("numpy", "ndarray", ((100_000, 100_000),)), "numpy.ndarray would allocate 80,000,000,000 bytes"),
    (reduce_pickle("numpy.core.multiarray", "_reconstruct", (0, (10 ** 10,), "f8")),
     "numpy _reconstruct would allocate 80,000,000,000 bytes"),
    (reduce_pickle("numpy", "dtype", ("V2000000000",)), "numpy.dtype would allocate 2,000,000,000 bytes"),
    (reduce_pickle("_codecs", "encode", ("x" * 10, "zlib_codec")), "_codecs.encode with codec 'zlib_codec'"),
])
def test_an_allow_listed_constructor_cannot_allocate_beyond_the_pickle(data, words):
    """Refused before allocating: the peak of Python's allocations stays far below what the call asks for."""
    import tracemalloc
    from roidb.errors import DataError
    from roidb.safe_pickle import safe_loads
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="refused: " + re.escape(words)):
            safe_loads(data, "hostile.pkl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) < 100 and peak < 10_000_000, peak


def test_a_40_byte_pickle_asking_for_2_gb_is_refused_through_the_cli(ws, capsys):
    line = refused_p1(ws, capsys, BYTEARRAY_BOMB)
    assert f"{ws.exp / 'p1' / 'proposals.pkl'}: refused: bytearray would allocate 2,000,000,000 bytes" in line


# --------------------------------------------------------------------------------------------- round 2: real disk full
PAGE = 4096


@pytest.fixture
def small_disk(ws, tmp_path):
    """A real tmpfs holding a copy of the baseline output folder (mtimes kept): `fill(leave)` then leaves exactly
    `leave` bytes free. Skips where a tmpfs cannot be mounted (not root, no mount namespace)."""
    import os
    import shutil
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode(errors='replace').strip()}")
    try:
        assert os.sysconf("SC_PAGE_SIZE") == PAGE
        shutil.copytree(ws.out, mount / "out")

        def fill(leave: int) -> None:
            left = shutil.disk_usage(mount).free - leave
            with open(mount / "filler", "wb") as handle:
                while left > 0:
                    handle.write(b"\0" * min(left, 1 << 24))
                    left -= 1 << 24
            assert shutil.disk_usage(mount).free == leave
        yield mount / "out", fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


def disk_full_refusal(ws, capsys, out: Path, fill, leave: int, *args: str, **overrides: str) -> str:
    before = digest_tree(out)
    fill(leave)
    code, stdout, err = cli(capsys, ws, "run", *args, **{"PIPELINE.OUTPUT_ROOT": str(out), **overrides})
    assert code == 2, stdout + err
    line = error_line(err)
    assert "No space left on device" in line
    before.pop(CONFIG_YML)  # it records the latest run's config (here another OUTPUT_ROOT)
    assert changed_files(before, digest_tree(out)) == [], "nothing lost"
    assert not [p for p in out.rglob("*.tmp*")], "no temporary left behind"
    assert manifest_problems(out / EXP) == []
    return line


def test_real_disk_full_during_a_snapshot(ws, capsys, small_disk):
    out, fill = small_disk
    line = disk_full_refusal(ws, capsys, out, fill, 1 << 20, "--force", "stage4",
                             **{"PIPELINE.STAGE4_SNAPSHOT_ITERS": "1"})
    assert f"{out / EXP / 'stage4' / 'snapshots' / 'iter_00000001.pt'}" in line
    assert manifest(out / EXP, "stage4")["outputs"] == ws.baseline["stage4"], "the previous M4 is kept"


def test_real_disk_full_while_writing_model_pt(ws, capsys, small_disk):
    out, fill = small_disk
    line = disk_full_refusal(ws, capsys, out, fill, 1 << 20, "--force", "stage4",
                             **{"PIPELINE.STAGE4_SNAPSHOT_ITERS": "100"})
    assert f"{out / EXP / 'stage4' / 'model.pt'}" in line
    assert sha256(out / EXP / "stage4" / "model.pt") == ws.m4_sha()


def test_real_disk_full_while_writing_the_proposals_pickle(ws, capsys, small_disk):
    out, fill = small_disk
    # the lock, config.yml's new copy (the old one is freed) and p2's 'running' manifest take a page each
    line = disk_full_refusal(ws, capsys, out, fill, 3 * PAGE, "--force", "p2")
    assert f"{out / EXP / 'p2' / 'proposals.pkl'}" in line


def test_real_disk_full_while_writing_a_manifest(ws, capsys, small_disk):
    out, fill = small_disk
    p2 = out / EXP / "p2"
    # the lock and the 'running' manifest, the two pickles: everything but the 'done' manifest fits
    leave = (2 + pages(p2 / "proposals.pkl") + pages(p2 / "scores.pkl")) * PAGE
    line = disk_full_refusal(ws, capsys, out, fill, leave, "--force", "p2")
    assert f"{p2 / 'manifest.json'}" in line


def test_only_a_real_full_disk_turns_torchs_write_failure_into_enospc(tmp_path):
    """torch.save's RuntimeError('[enforce fail at inline_container.cc] ... file write failed') is ENOSPC only
    when the filesystem is in fact (nearly) full or the chain holds an ENOSPC; otherwise it stays a bug."""
    import errno
    from stages.engine.trainer import disk_full
    torch_says = RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                              "data/0: file write failed")
    assert not disk_full(torch_says, tmp_path / "model.pt"), "this disk has room"
    assert not disk_full(RuntimeError("CUDA error: device-side assert"), tmp_path / "model.pt")
    chained = RuntimeError("wrapped")
    chained.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full(chained, tmp_path / "model.pt")
