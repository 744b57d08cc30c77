"""Shared harness of the reliability tests: a small VOC-format shapes set, one uninterrupted baseline run of the real
pipeline (tiny net, few images, 4 iterations per stage), and helpers to run the CLI, digest the output tree, check
manifests and inject faults (FRCNN_FAULT, see stages/artifacts.py).

The baseline is computed once per pytest process (`workspace()`); each test gets the output folder and the dataset
back exactly as the baseline left them (`Workspace.reset`), so the same paths, fingerprints and config.yml apply.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_YML = ROOT / "tests" / "data" / "tiny_pipeline.yml"
EXP = "tiny_e2e"  # EXP_DIR of tiny_pipeline.yml
STEPS = ("stage1", "p1", "stage2", "stage3", "p2", "stage4", "eval")
NUM_TRAINVAL, NUM_TEST = 4, 2
ITERS = 4

# The small-iteration pipeline: 4 + 2 images at a 96-pixel short side, 4 iterations per stage, snapshots every 2.
FAST = {"TRAIN.SCALES": "[96]", "TRAIN.MAX_SIZE": "160", "TEST.SCALES": "[96]", "TEST.MAX_SIZE": "160",
        **{f"PIPELINE.STAGE{k}_{key}": value for k in (1, 2, 3, 4)
           for key, value in (("ITERS", str(ITERS)), ("SNAPSHOT_ITERS", "2"), ("STEPSIZE", "3"))}}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def digest_tree(root: Path) -> dict[str, tuple[str, int]]:
    """{relpath: (sha256, mtime_ns)} of every file under `root`."""
    return {p.relative_to(root).as_posix(): (sha256(p), p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def changed_files(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]],
                  content_only: tuple[str, ...] = ()) -> list[str]:
    """Files of `before` that are gone or differ in `after` (only the sha256 counts for `content_only`)."""
    changed = []
    for rel, (digest, mtime) in before.items():
        if rel not in after or after[rel][0] != digest or (rel not in content_only and after[rel][1] != mtime):
            changed.append(rel)
    return changed


def manifest(exp_dir: Path, step: str) -> dict[str, Any]:
    return json.loads((exp_dir / step / "manifest.json").read_text())


def manifest_problems(exp_dir: Path) -> list[str]:
    """Every output a done manifest names must exist with the recorded sha256; returns what does not hold."""
    problems = []
    for step in STEPS:
        path = exp_dir / step / "manifest.json"
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            problems.append(f"{step}: manifest.json is not JSON")
            continue
        if data.get("status") != "done":
            continue
        for rel, digest in data["outputs"].items():
            target = exp_dir / step / rel
            if not target.is_file():
                problems.append(f"{step}/{rel} missing")
            elif sha256(target) != digest:
                problems.append(f"{step}/{rel} sha256 mismatch")
    return problems


def register_output(exp_dir: Path, step: str, relpath: str, data: bytes) -> None:
    """Put `data` in place of a done step's output and record its sha256 in the manifest, as if the step had
    produced it (a file imported from elsewhere, e.g. a py-faster-rcnn proposal pickle)."""
    (exp_dir / step / relpath).write_bytes(data)
    path = exp_dir / step / "manifest.json"
    data_manifest = json.loads(path.read_text())
    data_manifest["outputs"][relpath] = hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(data_manifest, indent=1) + "\n")


def remove_steps(exp_dir: Path, first: str) -> None:
    """Delete the folders of `first` and every step after it (the state just before `first` runs)."""
    for step in STEPS[STEPS.index(first):]:
        shutil.rmtree(exp_dir / step, ignore_errors=True)


class MarkerPayload:
    """Pickles to a call of os.system that creates `marker`: loading it with plain pickle would run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_pickle(marker: Path) -> bytes:
    return pickle.dumps([MarkerPayload(marker)], protocol=2)


def hostile_torch_file(marker: Path) -> bytes:
    """A torch.save zip whose pickle would run os.system on a plain torch.load (weights_only=False)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evil.pt"
        torch.save({"format": "frcnn-altopt-model-1", "state_dict": MarkerPayload(marker)}, path)
        return path.read_bytes()


class Workspace:
    """The dataset, the baseline output folder, and pristine copies of both to reset them from."""

    def __init__(self, root: Path):
        self.root = root
        self.data_root = root / "data"
        self.voc = self.data_root / "shapes" / "VOC2007"
        self.out = root / "out"
        self.exp = self.out / EXP
        self._pristine_data = root / "pristine_data"
        self._pristine_out = root / "pristine_out"
        self.baseline: dict[str, dict[str, str]] = {}

    def args(self, *extra: str, **overrides: str) -> list[str]:
        """--config and --set pairs pointing the tiny config at this dataset and output folder, then `extra`."""
        pairs = {"PIPELINE.DATA_ROOT": str(self.data_root), "PIPELINE.OUTPUT_ROOT": str(self.out),
                 "PIPELINE.TRAIN_IMDB": f"vocfmt:{self.voc}:trainval",
                 "PIPELINE.TEST_IMDB": f"vocfmt:{self.voc}:test", **FAST, **overrides}
        return ["--config", str(TINY_YML), *[x for k, v in pairs.items() for x in ("--set", k, v)], *extra]

    def command(self, command: str, *extra: str, **overrides: str) -> list[str]:
        return [sys.executable, str(ROOT / "pipeline.py"), command, *self.args(*extra, **overrides)]

    def run(self, command: str, *extra: str, fault: str | None = None, timeout: float = 300,
            **overrides: str) -> subprocess.CompletedProcess:
        """`python pipeline.py <command> ...` in a child process (FRCNN_FAULT=`fault` when given)."""
        return subprocess.run(self.command(command, *extra, **overrides), cwd=ROOT, env=fault_env(fault),
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, command: str, *extra: str, fault: str | None = None, **overrides: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(command, *extra, **overrides), cwd=ROOT, env=fault_env(fault),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def build(self) -> None:
        from roidb.synthetic import ensure_shapes_dataset
        ensure_shapes_dataset(self.data_root / "shapes", num_trainval=NUM_TRAINVAL, num_test=NUM_TEST, n_jobs=1)
        proc = self.run("run", timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"baseline run failed:\n{proc.stdout}\n{proc.stderr}")
        self.baseline = {s: manifest(self.exp, s)["outputs"] for s in STEPS}
        shutil.copytree(self.data_root, self._pristine_data)
        shutil.copytree(self.out, self._pristine_out)

    def reset(self) -> None:
        """Output folder and dataset back to the baseline's bytes and mtimes."""
        for live, pristine in ((self.out, self._pristine_out), (self.data_root, self._pristine_data)):
            shutil.rmtree(live, ignore_errors=True)
            shutil.copytree(pristine, live)

    def m4_sha(self) -> str:
        return self.baseline["stage4"]["model.pt"]

    def outputs_match_baseline(self) -> list[str]:
        """Steps whose recorded outputs differ from the uninterrupted run's."""
        return [s for s in STEPS if manifest(self.exp, s).get("outputs") != self.baseline[s]]


def cli(capsys, ws: Workspace, command: str, *extra: str, fault: str | None = None,
        **overrides: str) -> tuple[int, str, str]:
    """`pipeline.main([command, ...])` in this process: (exit status, stdout, stderr). Cheaper than a child
    process; `fault` sets FRCNN_FAULT for the call (write faults count from this call on)."""
    import pipeline
    from stages.engine import artifacts

    artifacts._fault_counts.clear()
    saved = os.environ.pop("FRCNN_FAULT", None)
    if fault:
        os.environ["FRCNN_FAULT"] = fault
    try:
        code = pipeline.main([command, *ws.args(*extra, **overrides)])
    finally:
        os.environ.pop("FRCNN_FAULT", None)
        if saved is not None:
            os.environ["FRCNN_FAULT"] = saved
        torch.use_deterministic_algorithms(False)
    out, err = capsys.readouterr()
    return code, out, err


def fault_env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FRCNN_FAULT"}
    if fault:
        env["FRCNN_FAULT"] = fault
    return env


_WORKSPACE: dict[str, Workspace] = {}


def workspace(tmp_path_factory) -> Workspace:
    """The process-wide workspace with its baseline run (built on first use, ~20 s on 2 cores)."""
    if "ws" not in _WORKSPACE:
        ws = Workspace(tmp_path_factory.mktemp("reliability"))
        ws.build()
        _WORKSPACE["ws"] = ws
    return _WORKSPACE["ws"]


def error_line(stderr: str) -> str:
    """The single `error: ...` line a failed command prints; asserts there is exactly one line and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    return errors[0]
