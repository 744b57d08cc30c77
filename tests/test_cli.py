"""pipeline.py: --help everywhere, one-line errors with exit status 2, run/status/clean with toy step bodies."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import pipeline
from stages.engine.graph import STEP_ORDER
from stages.engine.lock import RunLock
from stages.engine.runner import REGISTRY
from test_runner import toy_registry
from vocfmt_helpers import data_overrides

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *args):
    code = pipeline.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def toy_bodies():
    saved = dict(REGISTRY._bodies)
    REGISTRY._bodies.update(toy_registry()._bodies)
    yield
    REGISTRY._bodies.clear()
    REGISTRY._bodies.update(saved)


@pytest.fixture
def toy_yml(tmp_path):
    pipeline_keys = {"OUTPUT_ROOT": str(tmp_path / "out"), "DEVICE": "cpu"}
    for key, value in data_overrides(tmp_path / "data"):
        pipeline_keys[key.split(".")[1]] = yaml.safe_load(value)
    for k in (1, 2, 3, 4):
        pipeline_keys.update({f"STAGE{k}_ITERS": 12, f"STAGE{k}_STEPSIZE": 6, f"STAGE{k}_SNAPSHOT_ITERS": 4,
                              f"STAGE{k}_LR": 0.05})
    path = tmp_path / "toy.yml"
    path.write_text(yaml.safe_dump({"EXP_DIR": "cli", "PIPELINE": pipeline_keys}))
    return path


@pytest.mark.parametrize("command", [[], ["run"], ["status"], ["clean"]])
def test_help_on_every_command(capsys, command):
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and "Usage: pipeline.py" in out


def test_bad_key_is_one_line_and_exit_2_in_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "run", "--set", "TEST.NMSS", "0.4"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --set TEST.NMSS: unknown config key TEST.NMSS "
                                   "(did you mean TEST.NMS?)")


def test_debug_shows_the_traceback(capsys):
    code, _, err = cli(capsys, "status", "--set", "TEST.NMS", "'x'", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().endswith(
        "error: --set TEST.NMS 'x': config key TEST.NMS expects float, got str 'x'")


@pytest.mark.parametrize("args, message", [
    (["run", "--config", "nope.yml"], "error: config file nope.yml does not exist"),
    (["status", "--set", "PIPELINE.STAGE1_ITERS", "1.5"], "expects int, got float 1.5"),
    (["run", "--until", "stage9"], "Invalid value for '--until'"),
])
def test_bad_input_exit_2(capsys, args, message):
    code, _, err = cli(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_step_bodies_are_named(capsys, toy_yml):
    saved = dict(REGISTRY._bodies)
    REGISTRY._bodies.clear()
    try:
        code, _, err = cli(capsys, "run", "--config", str(toy_yml))
    finally:
        REGISTRY._bodies.update(saved)
    assert code == 2 and err.strip() == ("error: no body registered yet for step(s) stage1, p1, stage2, stage3, "
                                         "p2, stage4, eval (see stages.register_step)")


def test_run_status_clean(capsys, toy_bodies, toy_yml, tmp_path):
    code, out, err = cli(capsys, "run", "--config", str(toy_yml), "--until", "stage4")
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()[-6:]] == [[s, "ran"] for s in STEP_ORDER[:6]]

    code, out, _ = cli(capsys, "run", "--config", str(toy_yml))
    assert code == 0 and "eval: running (missing)" in out
    assert [line.split()[1] for line in out.splitlines()[-7:]] == ["skipped"] * 6 + ["ran"]
    assert (tmp_path / "out" / "cli" / "config.yml").exists()

    code, out, _ = cli(capsys, "status", "--config", str(toy_yml), "--set", "TEST.NMS", "0.5")
    lines = out.splitlines()
    assert code == 0 and lines[1].split() == ["step", "state", "time", "metrics"]
    assert lines[-2].startswith("eval    stale: fingerprint changed: TEST.NMS")
    assert lines[-1].startswith("run cache: 0 versions, 0.0 MB (PIPELINE.RUN_CACHE_VERSIONS 2 per step")
    assert lines[3].split()[:2] == ["p1", "done"] and "recall@0.5 0.9877  num_images 3" in lines[3]
    column = lines[1].index("state")
    assert all(line[column - 2:column] == "  " and line[column] != " " for line in lines[2:-1])

    code, out, _ = cli(capsys, "clean", "stage3", "--config", str(toy_yml))
    assert code == 0 and "downstream of stage3: p2, stage4, eval" in out
    assert not (tmp_path / "out" / "cli" / "stage3").exists()


def test_from_without_inputs_is_refused(capsys, toy_bodies, toy_yml):
    code, _, err = cli(capsys, "run", "--config", str(toy_yml), "--from", "stage3")
    assert code == 2 and "error: --from stage3: its input stage2 is not done (missing)" in err


def test_second_run_is_refused_and_status_still_reads(capsys, toy_bodies, toy_yml, tmp_path):
    exp = tmp_path / "out" / "cli"
    with RunLock(exp, echo=lambda m: None):
        code, _, err = cli(capsys, "run", "--config", str(toy_yml))
        assert code == 2 and f"in use by another run (pid {os.getpid()}" in err
        before = sorted(p.name for p in exp.iterdir())
        code, out, _ = cli(capsys, "status", "--config", str(toy_yml))
        assert code == 0 and "stage1  missing" in out
        assert sorted(p.name for p in exp.iterdir()) == before


def test_status_never_writes(capsys, toy_yml, tmp_path):
    code, out, _ = cli(capsys, "status", "--config", str(toy_yml))
    assert code == 0 and out.count("missing") == 7 and not (tmp_path / "out").exists()


DRIVER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import pipeline
from stages.engine.runner import REGISTRY
from test_runner import toy_registry
REGISTRY._bodies.update(toy_registry()._bodies)
sys.exit(pipeline.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_releases_the_lock_and_says_how_to_continue(tmp_path, toy_yml, signum):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    args = [sys.executable, str(driver), "run", "--config", str(toy_yml), "--set", "PIPELINE.STAGE1_ITERS",
            "1000000", "--set", "PIPELINE.STAGE1_SNAPSHOT_ITERS", "50"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshots = tmp_path / "out" / "cli" / "stage1" / "snapshots"
    deadline = time.time() + 90
    while time.time() < deadline and not any(snapshots.glob("iter_*.pt")):
        time.sleep(0.05)
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    name = signal.Signals(signum).name
    assert re.search(rf"stage1: interrupted by {name} during iteration \d+/1000000; last snapshot: "
                     r"snapshots/iter_\d+\.pt; finished steps are kept: run the same command again to continue", err), err
    assert not (tmp_path / "out" / "cli" / ".lock").exists()
    assert not list(snapshots.glob(".*.tmp"))
