"""Untrusted files cannot run code: checkpoints load with torch.load(weights_only=True), pickles through the
restricted unpickler (roidb.safe_pickle), and the commands that read user-named files refuse hostile ones.

Each hostile file would create a marker file if it were unpickled with plain pickle / torch.load(weights_only=False);
every test checks the refusal message (one line, exit status 2) and that the marker never appears.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import pipeline
from faults import (ROOT, changed_files, cli, digest_tree, error_line, hostile_pickle, hostile_torch_file,
                    manifest, register_output, remove_steps, sha256)

CODE_DIRS = ("stages", "nets", "roidb", "kernels")


def calls(tree: ast.AST, module: str, names: tuple[str, ...]):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def code_files() -> list[Path]:
    files = [ROOT / "pipeline.py"] + [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 20
    return files


def test_every_torch_load_passes_weights_only_true():
    offenders = []
    for path in code_files():
        tree = ast.parse(path.read_text(), str(path))
        for call in calls(tree, "torch", ("load",)):
            flags = [k for k in call.keywords if k.arg == "weights_only"]
            if not (flags and isinstance(flags[0].value, ast.Constant) and flags[0].value.value is True):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


def test_no_plain_unpickling_outside_the_restricted_unpickler():
    offenders = []
    for path in code_files():
        if path.name == "safe_pickle.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        offenders += [f"{path.relative_to(ROOT)}:{c.lineno}" for c in calls(tree, "pickle", ("load", "loads"))]
        offenders += [f"{path.relative_to(ROOT)}:{c.lineno}" for c in calls(tree, "np", ("load",))
                      if any(k.arg == "allow_pickle" for k in c.keywords)]
    assert offenders == [], f"plain pickle loads (use roidb.safe_pickle.safe_load): {offenders}"


def test_hostile_checkpoint_as_a_step_output_is_refused(ws, capsys, tmp_path):
    marker = tmp_path / "pwned"
    register_output(ws.exp, "stage3", "model.pt", hostile_torch_file(marker))
    before = digest_tree(ws.out)
    code, out, err = cli(capsys, ws, "run")
    assert code == 2
    line = error_line(err)
    assert f"{ws.exp / 'stage3' / 'model.pt'}: cannot read checkpoint" in line and "Weights only load failed" in line
    assert not marker.exists()
    assert changed_files(before, digest_tree(ws.out), content_only=("tiny_e2e/config.yml",)) == []


def test_hostile_initial_weights_are_refused(ws, capsys, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "imagenet.pt"
    weights.write_bytes(hostile_torch_file(marker))
    code, out, err = cli(capsys, ws, "run", **{"PIPELINE.WEIGHTS": str(weights)})
    assert code == 2
    assert f"{weights}: cannot load weights" in error_line(err)
    assert not marker.exists()


def test_hostile_snapshot_is_skipped_and_never_run(ws, capsys, tmp_path):
    """A planted newest snapshot is reported and skipped; training resumes from the older valid one."""
    remove_steps(ws.exp, "stage4")
    every_iter = {"PIPELINE.STAGE4_SNAPSHOT_ITERS": "1"}
    code, _, err = cli(capsys, ws, "run", fault="nan:stage4:3", **every_iter)
    assert code == 2 and "non-finite loss at iteration 3" in err
    marker = tmp_path / "pwned"
    (ws.exp / "stage4" / "snapshots" / "iter_00000003.pt").write_bytes(hostile_torch_file(marker))
    code, out, err = cli(capsys, ws, "run", "--until", "stage4", **every_iter)
    assert code == 0, err
    assert "skipping snapshot iter_00000003.pt is unreadable" in out
    assert "resuming from snapshot iteration 2/4" in out
    assert not marker.exists()
    assert sha256(ws.exp / "stage4" / "model.pt") == ws.m4_sha()


def test_inspect_refuses_a_hostile_pickle_and_says_why(ws, capsys, tmp_path):
    if "inspect" not in pipeline.cli.commands:
        pytest.skip("pipeline.py has no inspect command yet")
    marker = tmp_path / "pwned"
    evil = tmp_path / "proposals.pkl"
    evil.write_bytes(hostile_pickle(marker))
    code, out, err = cli(capsys, ws, "inspect", str(evil))
    assert code == 2, out + err
    line = error_line(err)
    assert f"{evil}: refused to unpickle global" in line and "system" in line
    assert "nothing from the file was run" in line
    assert not marker.exists()


def test_eval_refuses_a_hostile_detections_pickle(ws, capsys, tmp_path):
    if "eval" not in pipeline.cli.commands:
        pytest.skip("pipeline.py has no eval command yet")
    marker = tmp_path / "pwned"
    evil = tmp_path / "detections.pkl"
    evil.write_bytes(hostile_pickle(marker))
    code, out, err = cli(capsys, ws, "eval", "--detections", str(evil), "--out", str(tmp_path / "reval"))
    assert code == 2, out + err
    assert f"{evil}: refused to unpickle global" in error_line(err)
    assert not marker.exists()
    assert manifest(ws.exp, "eval")["outputs"] == ws.baseline["eval"]
