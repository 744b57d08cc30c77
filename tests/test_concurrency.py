"""Concurrency on one experiment folder: a second `run` (or `clean`) while a run goes on is refused with the first
run's pid, and `status` reads the live state without writing anything (or taking the lock).

The first run is a real `pipeline.py run` child process, frozen with SIGSTOP once it holds the lock and has started
stage1, so the folder cannot change under the checks; it is then resumed and stopped with SIGTERM.
"""
from __future__ import annotations

import json
import signal
import time

import pytest

from faults import cli, digest_tree, error_line, remove_steps
from stages.engine.lock import LOCK_NAME


@pytest.fixture
def frozen_run(ws):
    """A run that holds the lock and has started stage1, stopped with SIGSTOP; yields the process."""
    remove_steps(ws.exp, "stage1")
    proc = ws.popen("run")
    deadline = time.monotonic() + 240
    while not ((ws.exp / LOCK_NAME).exists() and (ws.exp / "stage1" / "manifest.json").exists()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        assert not (ws.exp / LOCK_NAME).exists(), "the stopped run released its lock"


def test_second_run_is_refused_with_the_first_ones_pid(ws, capsys, frozen_run):
    before = digest_tree(ws.out)
    code, out, err = cli(capsys, ws, "run")
    assert code == 2
    line = error_line(err)
    assert f"{ws.exp} is in use by another run (pid {frozen_run.pid} on " in line and "wait for it to finish" in line
    assert json.loads((ws.exp / LOCK_NAME).read_text())["pid"] == frozen_run.pid
    code, out, err = cli(capsys, ws, "clean", "stage1")
    assert code == 2 and f"pid {frozen_run.pid}" in error_line(err)
    assert digest_tree(ws.out) == before, "the refused commands wrote nothing"


def test_status_reads_a_live_run_and_never_writes(ws, capsys, frozen_run):
    out_before, data_before = digest_tree(ws.out), digest_tree(ws.data_root)
    for _ in range(2):
        code, out, err = cli(capsys, ws, "status")
        assert code == 0, err
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert f"running (pid {frozen_run.pid})" in rows["stage1"]
        assert all(rows[s].split()[1] == "missing" for s in ("p1", "stage2", "stage3", "p2", "stage4", "eval"))
    proc = ws.run("status")
    assert proc.returncode == 0 and f"running (pid {frozen_run.pid})" in proc.stdout
    assert digest_tree(ws.out) == out_before, "status wrote into the output folder"
    assert digest_tree(ws.data_root) == data_before, "status wrote into the data folder"
