"""The engine apart from the steps: it imports nothing of nets, roidb or kernels, and a step's fingerprint keys
cannot miss a key its body reads (the runner records every read and fails the step as a bug)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from stages.engine.config import load_config, recording_reads
from stages.engine.graph import GRAPHS, NON_RESULT_KEYS
from stages.engine.runner import StepResult
from test_runner import make_runner, toy_registry, train_body

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "stages" / "engine"
FORBIDDEN = ("nets", "roidb", "kernels")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level >= 2:
            names.add("stages." + (node.module or ""))  # from ..x: outside the engine
    return names


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_engine_modules_import_no_model_or_data_code(path):
    bad = sorted(m for m in imported_modules(path) if m.split(".")[0] in FORBIDDEN or m.startswith("stages."))
    assert bad == [], f"{path.name} imports {bad}"


def test_importing_and_using_the_engine_loads_no_model_or_data_code():
    script = ("import sys\nimport stages.engine.runner, stages.engine.runcache, stages.engine.trainer\n"
              "from stages.engine.config import load_config\nfrom stages.engine.graph import graph_for\n"
              "graph_for(load_config()).select()\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'nets', 'roidb', 'kernels'}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reads_are_recorded_through_every_access_path():
    config = load_config()
    with recording_reads() as read:
        train = config.TRAIN
        train.SCALES, config["TEST"]["NMS"], config.get("PIPELINE.NET"), config.PIPELINE  # noqa: B018
    assert read == {"TRAIN.SCALES", "TEST.NMS", "PIPELINE.NET"}
    config.TEST.NMS  # noqa: B018  (outside the block nothing is recorded)
    assert read == {"TRAIN.SCALES", "TEST.NMS", "PIPELINE.NET"}


def test_every_declared_key_and_non_result_key_exists():
    flat = load_config().flat()
    for graph in GRAPHS.values():
        for step in graph.steps.values():
            assert all(any(k == spec or k.startswith(spec) for k in flat) for spec in step.reads), step.id
    assert set(NON_RESULT_KEYS) <= set(flat)


def test_a_body_reading_an_undeclared_key_is_a_bug_and_never_done(tmp_path):
    def sneaky(ctx):
        ctx.config.TEST.NMS  # noqa: B018  stage1 does not declare TEST.NMS: a change would not re-run it
        return train_body(ctx)

    runner = make_runner(tmp_path, registry=toy_registry(stage1=sneaky))
    with pytest.raises(RuntimeError, match=r"bug: step stage1 read config key\(s\) TEST.NMS that its fingerprint"):
        runner.run(until="stage1")
    assert runner.not_done_reason("stage1").startswith("partial")


def test_an_undeclared_read_in_an_isolated_child_is_caught_too(tmp_path):
    runner = make_runner(tmp_path, ("PIPELINE.ISOLATE_STEPS", "True"), registry=toy_registry(stage1=sneaky_child))
    with pytest.raises(RuntimeError, match="TEST.RPN_NMS_THRESH"):
        runner.run(until="stage1")
    assert runner.not_done_reason("stage1").startswith("partial")


def sneaky_child(ctx):
    ctx.config.get("TEST.RPN_NMS_THRESH")
    return StepResult([], {})


def test_status_starts_without_torch(tmp_path):
    """`status` never trains: it must not pay for importing torch (most of a second, more on a slow disk)."""
    from vocfmt_helpers import data_overrides
    sets = [x for k, v in data_overrides(tmp_path / "data") for x in ("--set", k, v)]
    script = ("import sys\nsys.path[:0] = [{root!r}]\nimport pipeline\n"
              "code = pipeline.main(['status', '--set', 'PIPELINE.OUTPUT_ROOT', {out!r}] + {sets!r})\n"
              "print(code, 'torch' in sys.modules)").format(root=str(ROOT), out=str(tmp_path / "out"), sets=sets)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stdout + out.stderr
