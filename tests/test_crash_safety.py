"""Crash safety by fault injection on the real small pipeline: one SIGKILL in every step, then clean SIGINT/SIGTERM.

The kill chain starts from an empty experiment and kills `pipeline.py run` once in each step (stage1, p1, stage2,
stage3, p2, stage4, eval), each time at a different kind of moment: mid-snapshot write, between two artefacts,
mid-manifest write, from outside mid-training, mid-model write. After each kill every output a done manifest names
exists with its sha256 and the dead run's lock is left behind; the next `run` takes the lock over and goes on.
The last run completes with every output (M1..M4, P1, P2, detections) bit-identical to an uninterrupted run's.
bench/kill_campaign.py does the same with random moments, 5+ kills per step.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from faults import (STEPS, Workspace, manifest, manifest_problems, remove_steps, sha256)
from stages.engine.lock import LOCK_NAME

CONTINUE_HINT = "run the same command again to continue"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def run_until_killed(ws: Workspace, fault: str | None = None, kill_when: Path | None = None,
                     **overrides: str) -> tuple[subprocess.Popen, str, str]:
    """Start a run (FRCNN_FAULT=`fault`), SIGKILL it from outside once `kill_when` exists; (process, out, err)."""
    proc = ws.popen("run", fault=fault, **overrides)
    try:
        if kill_when is not None:
            wait_for(kill_when, proc)
            proc.send_signal(signal.SIGKILL)
    finally:
        out, err = proc.communicate(timeout=300)
    return proc, out, err


def leftovers(ws: Workspace) -> list[str]:
    """Temporaries and set-aside folders under the experiment (none after a successful run)."""
    found = list(ws.exp.rglob("*.tmp")) + list(ws.exp.glob(".*.previous")) + list(ws.exp.glob(".lock*"))
    return sorted(str(p.relative_to(ws.exp)) for p in found)


# (step, moment, FRCNN_FAULT or the file whose appearance triggers an outside SIGKILL)
KILLS = [
    ("stage1", "mid-write of its snapshot", "kill:stage1/snapshots/iter_*.pt:1"),
    ("p1", "between proposals.pkl and scores.pkl", "kill:p1/scores.pkl:1"),
    ("stage2", "mid-write of the manifest that says done", "kill:stage2/manifest.json:4"),
    ("stage3", "from outside, right after its first snapshot", "outside:stage3/snapshots/iter_00000001.pt"),
    ("p2", "mid-write of the manifest that says done", "kill:p2/manifest.json:2"),
    ("stage4", "mid-write of model.pt", "kill:stage4/model.pt:1"),
    ("eval", "mid-write of aps.json", "kill:eval/aps.json:1"),
]


def test_one_sigkill_in_every_step_then_identical_outputs(ws):
    remove_steps(ws.exp, "stage1")
    stage3_snapshots = {"PIPELINE.STAGE3_SNAPSHOT_ITERS": "1"}  # 3 iterations left after the first: time to kill
    for step, moment, how in KILLS:
        if how.startswith("outside:"):
            proc, out, err = run_until_killed(ws, kill_when=ws.exp / how.split(":", 1)[1], **stage3_snapshots)
        else:
            proc, out, err = run_until_killed(ws, fault=how, **stage3_snapshots)
        assert proc.returncode == -signal.SIGKILL, (step, moment, out, err)
        assert f"{step}: running" in out, (step, out)
        assert manifest_problems(ws.exp) == [], (step, moment)
        assert manifest(ws.exp, step)["status"] == "running", (step, moment)
        done = [s for s in STEPS if (ws.exp / s / "manifest.json").exists() and manifest(ws.exp, s)["status"] == "done"]
        assert done == list(STEPS[:STEPS.index(step)]), (step, done)
        assert json.loads((ws.exp / LOCK_NAME).read_text())["pid"] == proc.pid, "the dead run's lock stays"
    final = ws.run("run")
    assert final.returncode == 0, final.stderr
    assert "taking over the stale lock" in final.stdout
    assert "eval: running" in final.stdout
    assert not (ws.exp / LOCK_NAME).exists(), "the lock is released"
    assert leftovers(ws) == []
    assert manifest_problems(ws.exp) == []
    assert sha256(ws.exp / "stage4" / "model.pt") == ws.m4_sha()
    assert ws.outputs_match_baseline() == []


def test_sigint_during_a_snapshot_write_completes_the_snapshot(ws):
    remove_steps(ws.exp, "stage3")
    proc = ws.run("run", "--until", "stage4", fault="sigint:stage3/snapshots/iter_*.pt:1")
    assert proc.returncode == 130, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "stage3: interrupted by SIGINT" in message and CONTINUE_HINT in message
    assert "last snapshot: snapshots/iter_00000002.pt" in message
    snapshot = ws.exp / "stage3" / "snapshots" / "iter_00000002.pt"
    assert torch.load(snapshot, weights_only=True)["iteration"] == 2, "the snapshot was finished, not torn"
    assert not (ws.exp / LOCK_NAME).exists() and leftovers(ws) == []
    again = ws.run("run", "--until", "stage4")
    assert again.returncode == 0 and "resuming from snapshot iteration 2/4" in again.stdout
    assert "taking over" not in again.stdout
    assert sha256(ws.exp / "stage4" / "model.pt") == ws.m4_sha()


def test_sigterm_during_an_artefact_write_discards_it(ws):
    remove_steps(ws.exp, "p2")
    proc = ws.run("run", "--until", "p2", fault="sigterm:p2/proposals.pkl:1")
    assert proc.returncode == 130, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "p2: interrupted by SIGTERM" in message and CONTINUE_HINT in message
    assert not (ws.exp / "p2" / "proposals.pkl").exists(), "the half-written pickle is discarded"
    assert manifest(ws.exp, "p2")["status"] == "running"
    assert not (ws.exp / LOCK_NAME).exists() and leftovers(ws) == []
    again = ws.run("run", "--until", "p2")
    assert again.returncode == 0
    assert manifest(ws.exp, "p2")["outputs"] == ws.baseline["p2"]


def test_sigterm_from_outside_mid_training_stops_cleanly(ws):
    remove_steps(ws.exp, "stage1")
    every_iter = {"PIPELINE.STAGE1_SNAPSHOT_ITERS": "1"}
    proc = ws.popen("run", "--until", "stage1", **every_iter)
    try:
        wait_for(ws.exp / "stage1" / "snapshots" / "iter_00000001.pt", proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    message = err.strip().splitlines()[-1]
    assert "stage1: interrupted by SIGTERM during iteration" in message and CONTINUE_HINT in message
    assert not (ws.exp / LOCK_NAME).exists() and leftovers(ws) == []
    again = ws.run("run", "--until", "stage1", **every_iter)
    assert again.returncode == 0 and "resuming from snapshot iteration" in again.stdout
    assert manifest(ws.exp, "stage1")["outputs"] == ws.baseline["stage1"]


def test_a_corrupted_output_is_detected_and_its_step_rerun(ws):
    """Bit rot or a torn copy of a done step's output: the sha256 check re-runs that step (and only the steps whose
    inputs then differ), ending with the same bytes."""
    model = ws.exp / "stage2" / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 3])
    proc = ws.run("run")
    assert proc.returncode == 0, proc.stderr
    assert "stage2: running (output model.pt sha256 mismatch)" in proc.stdout
    assert "stage3: done, skipped" in proc.stdout, "the re-made M2 is byte-identical, so nothing downstream re-runs"
    assert ws.outputs_match_baseline() == []


def child_pids(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sigkill_of_the_parent_also_kills_an_isolated_step(ws):
    """With PIPELINE.ISOLATE_STEPS the step body runs in a child; when the parent is SIGKILLed the child must die
    too, or it would go on writing into a folder the next run (which takes over the dead lock) owns."""
    remove_steps(ws.exp, "stage1")
    isolated = {"PIPELINE.ISOLATE_STEPS": "True"}
    proc = ws.popen("run", "--until", "stage1", **isolated)
    try:
        wait_for(ws.exp / "stage1" / "log.jsonl", proc)
        children = child_pids(proc.pid)
        assert children, "the step runs in a child process"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=120)
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{c}").exists() for c in children), "an orphaned step process lives on"
    assert not (ws.exp / "stage1" / "model.pt").exists() and manifest(ws.exp, "stage1")["status"] == "running"
    again = ws.run("run", "--until", "stage1", **isolated)
    assert again.returncode == 0 and "taking over the stale lock" in again.stdout, again.stderr
    assert manifest(ws.exp, "stage1")["outputs"] == ws.baseline["stage1"]
