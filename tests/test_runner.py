"""The runner with registered toy step bodies (a real training loop on a 2-layer net, real files): skip on rerun,
fingerprint cascades, --from/--only/--force, crash resume, isolated child processes, the lock and signals."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import signal
import socket
import json

import numpy as np
import pytest
import torch

from stages.engine.artifacts import atomic_path, read_manifest, sha256_file
from stages.engine.config import load_config
from stages.engine.errors import (Interrupted, LockError, MissingStepBodyError, StepFailedError, StepSelectionError)
from stages.engine.graph import STEP_ORDER
from stages.engine.lock import LOCK_NAME, RunLock, defer_interrupts, interrupt_guard, raise_if_interrupted, read_lock
from stages.engine.runner import Runner, StepRegistry, StepResult, register_step, REGISTRY
from test_train_loop import build, loop, toy_loss
from vocfmt_helpers import data_overrides


class Crash(RuntimeError):
    pass


def record_call(ctx):
    with open(ctx.exp_dir / "calls.txt", "a", encoding="utf-8") as handle:
        handle.write(ctx.step.id + "\n")


def calls(runner):
    path = runner.exp_dir / "calls.txt"
    lines = path.read_text().split() if path.exists() else []
    path.unlink(missing_ok=True)
    return lines


def fault(ctx, kind):
    """A marker file `<kind>-<step>` holding an iteration arms a one-shot fault in that step."""
    marker = ctx.exp_dir / f"{kind}-{ctx.step.id}"
    if not marker.exists():
        return None
    at = int(marker.read_text())
    marker.unlink()
    return at


def train_body(ctx):
    record_call(ctx)
    model, loader, rngs = build(ctx.config.RNG_SEED)
    upstream = {"stage3": "stage2", "stage4": "stage3"}.get(ctx.step.id)
    if upstream:
        model.load_state_dict(torch.load(ctx.input_file(upstream, "model.pt"), weights_only=True)["model"])
    crash_at, kill_at = fault(ctx, "crash"), fault(ctx, "kill")
    seen = {"n": 0}

    def loss_fn(model, batch):
        seen["n"] += 1
        if seen["n"] == crash_at:
            raise Crash(f"{ctx.step.id} crashed")
        if seen["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return toy_loss(model, batch)
    result = ctx.train(model, loss_fn, loader, numpy_rngs=rngs)
    return StepResult(["model.pt"], {"loss": result.last_losses["cls"]})


def proposals_body(ctx):
    record_call(ctx)
    source = {"p1": "stage1", "p2": "stage3"}[ctx.step.id]
    weights = torch.load(ctx.input_file(source, "model.pt"), weights_only=True)["model"]["0.weight"].numpy()
    boxes = [np.round(np.abs(weights) * 100 + i).astype(np.float32) for i in range(3)]
    for name, obj in (("proposals.pkl", boxes), ("scores.pkl", [b[:, 0] for b in boxes])):
        with atomic_path(ctx.step_dir / name) as tmp:
            tmp.write_bytes(pickle.dumps(obj, protocol=4))
    return {"outputs": ["proposals.pkl", "scores.pkl"], "metrics": {"num_images": 3, "recall@0.5": 0.98765}}


def eval_body(ctx):
    record_call(ctx)
    bias = torch.load(ctx.input_file("stage4", "model.pt"), weights_only=True)["model"]["3.bias"].numpy()
    detections = bias * ctx.config.TEST.NMS
    with atomic_path(ctx.step_dir / "detections.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(detections, protocol=4))
    return StepResult(["detections.pkl"], {"mAP": float(abs(detections).sum())})


def self_kill_body(ctx):
    os.kill(os.getpid(), signal.SIGKILL)


def sigterm_body(ctx):
    record_call(ctx)
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM should have interrupted the body")


def swallowing_body(ctx):
    """p1 completes after a signal whose exception a bare `except:` swallowed, as the module init of a Cython
    extension (numpy.random, lxml) does when the signal lands during its import."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have raised here")
    except BaseException:
        pass
    return proposals_body(ctx)


def toy_registry(**replace):
    registry = StepRegistry()
    bodies = {"stage1": train_body, "p1": proposals_body, "stage2": train_body, "stage3": train_body,
              "p2": proposals_body, "stage4": train_body, "eval": eval_body, **replace}
    for step, body in bodies.items():
        registry.register(step, body)
    return registry


def toy_config(tmp_path, *extra, exp="toy"):
    solver = [(f"PIPELINE.STAGE{k}_{key}", v) for k in (1, 2, 3, 4)
              for key, v in (("ITERS", "20"), ("STEPSIZE", "10"), ("SNAPSHOT_ITERS", "5"), ("LR", "0.05"))]
    return load_config(overrides=[("PIPELINE.OUTPUT_ROOT", str(tmp_path)), ("EXP_DIR", exp),
                                  ("PIPELINE.DEVICE", "cpu"), *data_overrides(tmp_path / "data"), *solver, *extra])


def make_runner(tmp_path, *extra, registry=None, exp="toy", **kw):
    return Runner(toy_config(tmp_path, *extra, exp=exp), registry=registry or toy_registry(),
                  echo=lambda m: None, **kw)


@pytest.fixture(scope="module")
def done_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    runner = make_runner(root)
    reports = runner.run()
    assert [r.action for r in reports] == ["ran"] * 7
    assert calls(runner) == list(STEP_ORDER)
    return root


@pytest.fixture
def done(done_template, tmp_path):
    """A finished toy experiment at tmp_path/toy (a copy of one run per module, to keep the tests fast)."""
    shutil.copytree(done_template / "toy", tmp_path / "toy")
    return make_runner(tmp_path)


def test_full_run_records_manifests_and_rerun_does_nothing(done, tmp_path):
    for step in STEP_ORDER:
        manifest = read_manifest(done.step_dir(step))
        assert manifest["status"] == "done" and manifest["outputs"]
        for rel, digest in manifest["outputs"].items():
            assert sha256_file(done.step_dir(step) / rel) == digest
    assert read_manifest(done.step_dir("stage2"))["inputs"]["M0"] == "random-init"
    assert (done.exp_dir / "config.yml").exists() and not (done.exp_dir / LOCK_NAME).exists()
    assert not (done.step_dir("stage1") / "snapshots").exists()
    rerun = make_runner(tmp_path).run()
    assert [r.action for r in rerun] == ["skipped"] * 7 and calls(done) == []


def test_test_nms_reruns_eval_only(done, tmp_path):
    reports = make_runner(tmp_path, ("TEST.NMS", "0.5")).run()
    assert [r.step for r in reports if r.action == "ran"] == ["eval"] and calls(done) == ["eval"]


def test_stage2_iters_reruns_stage2_and_after(done, tmp_path):
    make_runner(tmp_path, ("PIPELINE.STAGE2_ITERS", "25")).run()
    assert calls(done) == ["stage2", "stage3", "p2", "stage4", "eval"]


def test_force_reruns_one_step_and_identical_outputs_stop_the_cascade(done, tmp_path):
    before = sha256_file(done.step_dir("stage1") / "model.pt")
    reports = make_runner(tmp_path).run(force="stage1")
    assert calls(done) == ["stage1"] and reports[0].reason == "forced"
    assert sha256_file(done.step_dir("stage1") / "model.pt") == before


def test_from_reruns_the_step_and_everything_after(done, tmp_path):
    make_runner(tmp_path).run(from_="stage3", until="stage4")
    assert calls(done) == ["stage3", "p2", "stage4"]


def test_only_and_its_inputs(tmp_path):
    runner = make_runner(tmp_path)
    runner.run(until="stage1")
    assert calls(runner) == ["stage1"]
    runner.run(only="p1")
    assert calls(runner) == ["p1"]
    with pytest.raises(StepSelectionError, match=r"--only stage3: its input stage2 is not done \(missing\)"):
        runner.run(only="stage3")
    with pytest.raises(StepSelectionError, match=r"--from p2: its input stage3 is not done"):
        runner.run(from_="p2")
    assert not (runner.exp_dir / LOCK_NAME).exists()


def test_crash_leaves_partial_step_and_rerun_resumes_bit_identical(done, tmp_path):
    runner = make_runner(tmp_path, exp="crashy")
    runner.exp_dir.mkdir(parents=True)
    (runner.exp_dir / "crash-stage2").write_text("13")
    with pytest.raises(Crash):
        runner.run(until="stage2")
    rows = {r["step"]: r["state"] for r in runner.status_rows()}
    assert rows["stage1"] == "done" and rows["stage2"] == "partial at iteration 10/20" and rows["p2"] == "missing"
    assert not (runner.exp_dir / LOCK_NAME).exists()
    calls(runner)
    runner.run()
    assert calls(runner) == ["stage2", "stage3", "p2", "stage4", "eval"]
    for step in ("stage2", "stage4"):
        assert sha256_file(runner.step_dir(step) / "model.pt") == sha256_file(done.step_dir(step) / "model.pt")


def test_changed_config_discards_a_partial_run(tmp_path):
    runner = make_runner(tmp_path)
    runner.exp_dir.mkdir(parents=True)
    (runner.exp_dir / "crash-stage1").write_text("8")
    with pytest.raises(Crash):
        runner.run(until="stage1")
    assert (runner.step_dir("stage1") / "snapshots" / "iter_00000005.pt").exists()
    changed = make_runner(tmp_path, ("PIPELINE.STAGE1_LR", "0.01"))
    assert changed.status_rows()[0]["state"] == "partial at iteration 5/20"
    changed.run(until="stage1")
    log = [json.loads(line) for line in (changed.step_dir("stage1") / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(1, 21)) and log[0]["lr"] == 0.01


def test_status_reasons(done, tmp_path):
    changed = make_runner(tmp_path, ("TEST.NMS", "0.5"))
    rows = {r["step"]: r for r in changed.status_rows()}
    assert rows["stage4"]["state"] == "done" and rows["eval"]["state"] == "stale: fingerprint changed: TEST.NMS"
    assert rows["eval"]["metrics"].startswith("mAP ") and rows["p1"]["metrics"] == "recall@0.5 0.9877  num_images 3"
    (done.step_dir("p1") / "scores.pkl").write_bytes(b"tampered")
    rows = {r["step"]: r["state"] for r in done.status_rows()}
    assert rows["p1"] == "stale: output scores.pkl sha256 mismatch" and rows["stage2"] == "stale: waiting for p1"
    (done.step_dir("p1") / "scores.pkl").unlink()
    assert done.status_rows()[1]["state"] == "stale: output scores.pkl missing"


def test_clean_names_downstream_and_rerun_recreates(done, tmp_path):
    assert done.clean("stage3") == ["p2", "stage4", "eval"]
    assert not done.step_dir("stage3").exists()
    make_runner(tmp_path).run()
    assert calls(done) == ["stage3"]  # deterministic: the same M3 bytes, so p2.. stay done


def test_missing_bodies_are_listed_before_anything_runs(tmp_path):
    registry = StepRegistry()
    registry.register("stage1", train_body)
    runner = make_runner(tmp_path, registry=registry)
    with pytest.raises(MissingStepBodyError, match=r"no body registered yet for step\(s\) p1, stage2, stage3, "
                                                   r"p2, stage4, eval; steps with a body: stage1"):
        runner.run()
    assert calls(runner) == [] and not (runner.exp_dir / "config.yml").exists()
    runner.run(until="stage1")
    assert calls(runner) == ["stage1"]


def test_register_step_default_registry_and_errors():
    previous = REGISTRY.get("eval")
    try:
        @register_step("eval", version="7")
        def body(ctx):
            return StepResult([])
        assert REGISTRY.get("eval") == (body, "7")
    finally:
        REGISTRY._bodies.pop("eval", None)
        if previous:
            REGISTRY.register("eval", *previous)
    with pytest.raises(StepSelectionError, match="unknown step 'stage9'"):
        StepRegistry().register("stage9", body)


def test_body_version_change_reruns_that_step(done, tmp_path):
    registry = toy_registry()
    registry.register("p2", proposals_body, version="2")
    make_runner(tmp_path, registry=registry).run()
    assert calls(done) == ["p2"]  # same proposals bytes -> stage4 and eval stay done


def test_sigterm_in_a_step_releases_the_lock_and_keeps_it_partial(tmp_path):
    runner = make_runner(tmp_path, registry=toy_registry(p1=sigterm_body))
    with pytest.raises(Interrupted, match="SIGTERM"):
        runner.run()
    assert not (runner.exp_dir / LOCK_NAME).exists()
    assert read_manifest(runner.step_dir("p1"))["status"] == "running"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_swallowed_signal_still_stops_the_run_before_the_next_step(tmp_path):
    runner = make_runner(tmp_path, registry=toy_registry(p1=swallowing_body))
    with pytest.raises(Interrupted, match="SIGTERM"):
        runner.run()
    assert calls(runner) == ["stage1", "p1"]
    assert read_manifest(runner.step_dir("p1"))["status"] == "done", "the finished step is kept"
    assert not (runner.exp_dir / LOCK_NAME).exists()


def test_a_swallowed_signal_stops_a_training_step_at_the_next_iteration(tmp_path):
    from stages.engine.trainer import train_loop
    model, loader, rngs = build(3)
    seen = {"n": 0}

    def loss_fn(model, batch):
        seen["n"] += 1
        if seen["n"] == 3:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                raise AssertionError("SIGINT should have raised here")
            except BaseException:
                pass
        return toy_loss(model, batch)

    with interrupt_guard():
        with pytest.raises(Interrupted, match="interrupted by SIGINT during iteration 4/10"):
            loop(model, loss_fn, loader, iters=10, lr=0.05, momentum=0.9, weight_decay=0.0, gamma=0.1,
                       stepsize=5, snapshot_iters=2, out_dir=tmp_path, numpy_rngs=rngs, label="toy", echo=print)
    assert seen["n"] == 3 and sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["iter_00000002.pt"]
    raise_if_interrupted()  # the signal is forgotten once the guard ends


def test_defer_interrupts_finishes_the_block_first():
    finished = []
    with pytest.raises(Interrupted, match="SIGINT"):
        with interrupt_guard():
            with defer_interrupts():
                os.kill(os.getpid(), signal.SIGINT)
                finished.append(True)
    assert finished == [True]


def test_lock_refuses_a_second_run_with_the_first_pid(tmp_path):
    with RunLock(tmp_path, echo=lambda m: None):
        assert read_lock(tmp_path)["pid"] == os.getpid()
        with pytest.raises(LockError, match=rf"in use by another run \(pid {os.getpid()} on"):
            RunLock(tmp_path).acquire()
        runner = make_runner(tmp_path / "other", exp="x")
        runner.exp_dir = tmp_path
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            runner.run(until="stage1")
    assert read_lock(tmp_path) is None


def dead_pid():
    process = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    process.start()
    process.join()
    return process.pid


def test_stale_lock_is_taken_over_with_a_message(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    messages = []
    with RunLock(tmp_path, echo=messages.append):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert messages == [f"taking over the stale lock {tmp_path / LOCK_NAME} (pid {pid} is gone)"]
    (tmp_path / LOCK_NAME).write_text("")
    with RunLock(tmp_path, echo=messages.append):
        pass
    assert "unreadable" in messages[-1]


def test_isolated_steps_run_in_children_and_match_in_process(done, tmp_path):
    runner = make_runner(tmp_path, ("PIPELINE.ISOLATE_STEPS", "True"), exp="isolated")
    assert runner.isolate is True
    runner.run(until="p1")
    assert calls(runner) == ["stage1", "p1"]
    for step in ("stage1", "p1"):
        assert read_manifest(runner.step_dir(step))["outputs"] == read_manifest(done.step_dir(step))["outputs"]


def test_isolated_child_killed_by_a_signal_is_reported_without_hanging(tmp_path):
    runner = make_runner(tmp_path, registry=toy_registry(stage1=self_kill_body), isolate=True)
    with pytest.raises(StepFailedError, match=r"stage1: child process \(pid \d+\) was killed by SIGKILL"):
        runner.run(until="stage1")
    assert not (runner.exp_dir / LOCK_NAME).exists()
    assert read_manifest(runner.step_dir("stage1"))["status"] == "running"


def test_isolated_sigkill_mid_training_then_resume_is_bit_identical(done, tmp_path):
    runner = make_runner(tmp_path, exp="killed", isolate=True)
    runner.exp_dir.mkdir(parents=True)
    (runner.exp_dir / "kill-stage1").write_text("12")
    with pytest.raises(StepFailedError, match="SIGKILL"):
        runner.run(until="stage1")
    assert runner.status_rows()[0]["state"] == "partial at iteration 10/20"
    make_runner(tmp_path, exp="killed").run(until="stage1")
    assert sha256_file(runner.step_dir("stage1") / "model.pt") == sha256_file(done.step_dir("stage1") / "model.pt")


def rng_body(ctx):
    import random
    draws = {"torch": float(torch.rand(1)), "numpy": float(np.random.rand()), "python": random.random()}
    (ctx.step_dir / "draws.json").write_text(json.dumps(draws))
    return StepResult(["draws.json"], draws)


def test_every_step_is_reseeded_with_rng_seed_in_process_and_in_children(tmp_path):
    import random
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = {"torch": float(torch.rand(1)), "numpy": float(np.random.rand()), "python": random.random()}
    for isolate in (False, True):
        runner = make_runner(tmp_path, ("RNG_SEED", "5"), registry=toy_registry(stage1=rng_body),
                             exp=f"rng{isolate}", isolate=isolate)
        torch.rand(3), np.random.rand(3)  # whatever ran before must not matter
        assert runner.run(until="stage1")[0].metrics == expected


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": "x", "identity": "old-boot:123"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(info))
    messages = []
    with RunLock(tmp_path, echo=messages.append):
        pass
    assert messages == [f"taking over the stale lock {tmp_path / LOCK_NAME} (pid {os.getpid()} is now another "
                        f"process)"]


def test_a_body_registered_by_name_is_imported_when_it_runs(tmp_path):
    registry = toy_registry()
    registry.register("stage1", "test_runner:train_body", version="3")
    assert registry._bodies["stage1"][0] == "test_runner:train_body"  # nothing imported yet
    make_runner(tmp_path, registry=registry).run(until="stage1")
    assert registry.get("stage1") == (train_body, "3")
    with pytest.raises(ValueError, match="expected 'module:function'"):
        registry.register("p1", "test_runner.proposals_body")
