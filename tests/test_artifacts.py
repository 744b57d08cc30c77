"""Atomic writes (a simulated ENOSPC keeps the previous file), sha256, and manifest done/stale reasons."""
from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch

from stages.engine import artifacts
from stages.engine.artifacts import (atomic_path, atomic_write_json, atomic_write_text, hash_outputs, read_manifest,
                              sha256_file, stale_reason, write_manifest)
from stages.engine.graph import hash_parts
from stages.engine.trainer import save_torch


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and leftovers(target.parent) == []


def test_enospc_mid_write_keeps_previous_file(tmp_path):
    target = tmp_path / "proposals.pkl"
    target.write_bytes(b"previous artefact")
    with pytest.raises(OSError) as err:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half of the new")
                enospc()
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous artefact" and leftovers(tmp_path) == []


def test_enospc_at_fsync_keeps_previous_json(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"status": "done"})
    monkeypatch.setattr(artifacts, "_fsync_file", enospc)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(target, {"status": "running"})
    assert json.loads(target.read_text()) == {"status": "done"} and leftovers(tmp_path) == []


def test_enospc_in_torch_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    with atomic_path(target) as tmp:
        save_torch({"w": torch.ones(3)}, tmp)

    def torch_save_then_fail(obj, handle):
        handle.write(b"PK\x03\x04 truncated")
        enospc()
    monkeypatch.setattr(torch, "save", torch_save_then_fail)
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            save_torch({"w": torch.zeros(3)}, tmp)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3)) and leftovers(tmp_path) == []


def test_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def make_done_step(step_dir, nms=0.3):
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / "model.pt").write_bytes(b"weights")
    parts = {"version": "1", "keys": {"TEST.NMS": nms, "TEST.SCALES": [600]}, "inputs": {"stage4": "abc"}}
    write_manifest(step_dir, {"status": "done", "fingerprint": hash_parts(parts), "fingerprint_parts": parts,
                              "outputs": hash_outputs(step_dir, ["model.pt"])})
    return parts


def test_done_and_stale_reasons(tmp_path):
    step = tmp_path / "eval"
    assert stale_reason(step, "x") == "missing"
    parts = make_done_step(step)
    assert stale_reason(step, hash_parts(parts), parts) is None

    changed = json.loads(json.dumps(parts))
    changed["keys"]["TEST.NMS"] = 0.4
    assert stale_reason(step, hash_parts(changed), changed) == "fingerprint changed: TEST.NMS"
    changed["inputs"]["stage4"] = "def"
    assert stale_reason(step, hash_parts(changed), changed) == "fingerprint changed: TEST.NMS, input stage4"

    (step / "model.pt").write_bytes(b"weightz")
    assert stale_reason(step, hash_parts(parts), parts) == "output model.pt sha256 mismatch"
    (step / "model.pt").unlink()
    assert stale_reason(step, hash_parts(parts), parts) == "output model.pt missing"


def test_partial_and_unreadable_manifest(tmp_path):
    step = tmp_path / "stage2"
    step.mkdir()
    write_manifest(step, {"status": "running", "fingerprint": "f", "progress": {"iteration": 300, "total": 1000}})
    assert stale_reason(step, "f") == "partial at iteration 300/1000"
    write_manifest(step, {"status": "running", "fingerprint": "f"})
    assert stale_reason(step, "f").startswith("partial")
    (step / "manifest.json").write_text('{"status": "do')
    assert read_manifest(step) is None and stale_reason(step, "f") == "manifest unreadable"


def test_hash_outputs_names_a_missing_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="output detections.pkl of"):
        hash_outputs(tmp_path, ["detections.pkl"])


def test_atomic_files_get_umask_permissions_not_mkstemp_0600(tmp_path):
    import os
    old = os.umask(0o022)
    os.umask(old)
    atomic_write_text(tmp_path / "config.yml", "a: 1\n")
    assert (tmp_path / "config.yml").stat().st_mode & 0o777 == 0o666 & ~old
