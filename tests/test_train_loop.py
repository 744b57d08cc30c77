"""The generic training loop: exact momentum SGD + step LR, bit-identical resume, NaN stop, snapshots, log.jsonl."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.engine.artifacts import sha256_file
from stages.engine.config import SolverSettings
from stages.engine.errors import Interrupted, NonFiniteLossError, StepFailedError
from stages.engine.trainer import (LOG_NAME, Reporter, list_snapshots, make_optimizer, read_log, snapshot_path, step_lr,
                          train_loop)

ROOT = Path(__file__).resolve().parent.parent


class ToyLoader:
    """Endless minibatches of a fixed dataset, reshuffled each epoch by a NumPy generator (state: perm, cursor)."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = (self.x[:, 0] + 0.5 * self.x[:, 1] > 0).long()
        self.batch, self.rng = batch, rng
        self.perm, self.cursor = rng.permutation(n), 0

    def __next__(self):
        if self.cursor + self.batch > len(self.perm):
            self.perm, self.cursor = self.rng.permutation(len(self.perm)), 0
        idx = self.perm[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"perm": self.perm.copy(), "cursor": self.cursor}

    def load_state_dict(self, state):
        self.perm, self.cursor = np.asarray(state["perm"]), int(state["cursor"])


def toy_loss(model, batch):
    """Cross-entropy with dropout (torch RNG) and weights drawn from Python's and NumPy's global RNGs."""
    x, y = batch
    logits = model(x)
    scale = random.uniform(0.9, 1.1) * float(np.random.uniform(0.9, 1.1))
    return {"cls": torch.nn.functional.cross_entropy(logits, y) * scale, "l2": 1e-3 * logits.pow(2).mean()}


def build(seed: int = 3):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 2))
    rng = np.random.default_rng(seed)
    return model, ToyLoader(50, 8, rng), {"loader": rng}


SOLVER = dict(lr=0.05, stepsize=12, gamma=0.1, momentum=0.9, weight_decay=0.0005)


def loop(model, loss_fn, loader, *, out_dir, iters, snapshot_iters, lr, stepsize, gamma, momentum, weight_decay,
         iter_size=1, amp="off", progress=False, echo=lambda m: None, label="train", **kwargs):
    """train_loop with its solver and reporter spelled out as keywords."""
    solver = SolverSettings(iters=iters, lr=lr, stepsize=stepsize, gamma=gamma, momentum=momentum,
                            weight_decay=weight_decay, snapshot_iters=snapshot_iters, iter_size=iter_size, amp=amp)
    return train_loop(model, loss_fn, loader, solver, out_dir,
                      reporter=Reporter(label=label, echo=echo, progress_bar=progress), **kwargs)


def run(out_dir, iters=30, snapshot_iters=7, loss_fn=toy_loss, **kw):
    model, loader, rngs = build()
    result = loop(model, loss_fn, loader, iters=iters, snapshot_iters=snapshot_iters, out_dir=out_dir,
                        numpy_rngs=rngs, progress=False, echo=lambda m: None, **{**SOLVER, **kw})
    return model, result


class Crash(RuntimeError):
    pass


def crashing_at(k):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == k:
            raise Crash(f"simulated crash at iteration {k}")
        return toy_loss(model, batch)
    return loss_fn


def test_step_lr_is_caffe_step_policy():
    assert [step_lr(1e-3, 0.1, 3, i) for i in range(7)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-5])


def test_sgd_matches_hand_written_momentum_update_on_given_groups_only(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)  # frozen: no update, no weight decay
    frozen = model[0].weight.detach().clone()
    groups = [{"params": [model[0].bias, model[1].weight], "lr_mult": 1.0},
              {"params": [model[1].bias], "lr_mult": 2.0, "decay_mult": 0.0}]
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    mults = {"0.bias": (1, 1), "1.weight": (1, 1), "1.bias": (2, 0)}
    lr, m, wd, stepsize, gamma = 0.1, 0.9, 0.01, 2, 0.5
    velocity = {n: torch.zeros_like(p) for n, p in ref.items()}
    for it in range(5):
        params = {n: p.clone().requires_grad_(True) for n, p in ref.items()}
        h = x @ params["0.weight"].T + params["0.bias"]
        loss = ((h @ params["1.weight"].T + params["1.bias"] - y) ** 2).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        for n, (lm, dm) in mults.items():
            g = grads[n] + wd * dm * ref[n]
            velocity[n] = m * velocity[n] + g
            ref[n] = ref[n] - step_lr(lr, gamma, stepsize, it) * lm * velocity[n]

    class Fixed:
        def __next__(self):
            return x, y

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def mse(model, batch):
        return {"mse": ((model(batch[0]) - batch[1]) ** 2).mean()}

    loop(model, mse, Fixed(), iters=5, lr=lr, stepsize=stepsize, gamma=gamma, momentum=m, weight_decay=wd,
               snapshot_iters=0, out_dir=tmp_path, param_groups=groups, progress=False, echo=lambda s: None)
    assert torch.equal(model[0].weight, frozen)
    for n, p in model.named_parameters():
        if n != "0.weight":
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-6, atol=1e-7)


def test_all_frozen_is_an_error():
    layer = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(StepFailedError, match="no trainable parameters"):
        make_optimizer(layer.parameters(), 0.1, 0.9, 0.0)


def test_resume_after_crash_is_bit_identical_and_cleans_up(tmp_path):
    _, full = run(tmp_path / "full")
    assert full.resumed_from == 0
    with pytest.raises(Crash):
        run(tmp_path / "crash", loss_fn=crashing_at(17))
    assert [k for k, _ in list_snapshots(tmp_path / "crash")] == [14, 7]
    state = torch.load(snapshot_path(tmp_path / "crash", 14), weights_only=True)
    assert state["iteration"] == 14 and set(state["rng"]) >= {"torch", "python", "numpy_global", "numpy"}
    _, resumed = run(tmp_path / "crash")
    assert resumed.resumed_from == 14
    assert sha256_file(resumed.model_path) == sha256_file(full.model_path)
    assert not (tmp_path / "crash" / "snapshots").exists()
    log = read_log(tmp_path / "crash" / LOG_NAME)
    assert [r["iter"] for r in log] == list(range(1, 31))
    assert all({"loss", "losses", "lr", "time", "data_time"} <= set(r) for r in log)
    full_log = read_log(tmp_path / "full" / LOG_NAME)
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]
    assert [r["lr"] for r in full_log] == pytest.approx([step_lr(0.05, 0.1, 12, i) for i in range(30)])


def test_resume_skips_a_corrupt_newest_snapshot(tmp_path):
    _, full = run(tmp_path / "full")
    with pytest.raises(Crash):
        run(tmp_path / "crash", loss_fn=crashing_at(17))
    newest = snapshot_path(tmp_path / "crash", 14)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a torn file
    messages = []
    model, loader, rngs = build()
    result = loop(model, toy_loss, loader, iters=30, snapshot_iters=7, out_dir=tmp_path / "crash",
                        numpy_rngs=rngs, progress=False, echo=messages.append, **SOLVER)
    assert result.resumed_from == 7
    assert any("iter_00000014.pt is unreadable" in m for m in messages)
    assert sha256_file(result.model_path) == sha256_file(full.model_path)


def test_nan_loss_stops_naming_the_iteration_and_keeps_the_last_good_snapshot(tmp_path):
    def nan_at_12(model, batch):
        losses = toy_loss(model, batch)
        if len(read_log(tmp_path / LOG_NAME)) == 11:
            losses["cls"] = losses["cls"] * float("nan")
        return losses
    with pytest.raises(NonFiniteLossError, match=r"iteration 12 .*cls=nan.*snapshots/iter_00000007\.pt") as err:
        run(tmp_path, loss_fn=nan_at_12)
    assert err.value.iteration == 12
    assert [k for k, _ in list_snapshots(tmp_path)] == [7]
    assert torch.load(snapshot_path(tmp_path, 7), weights_only=True)["iteration"] == 7
    assert not (tmp_path / "model.pt").exists()


def test_interrupt_names_iteration_and_snapshot(tmp_path):
    def interrupted_at_10(model, batch):
        if len(read_log(tmp_path / LOG_NAME)) == 9:
            raise Interrupted(signal.SIGTERM)
        return toy_loss(model, batch)
    with pytest.raises(Interrupted, match=r"SIGTERM during iteration 10/30; last snapshot: snapshots/iter_00000007"):
        run(tmp_path, loss_fn=interrupted_at_10)


def test_torn_last_log_line_is_ignored(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text(json.dumps({"iter": 1}) + "\n" + json.dumps({"iter": 2}) + "\n{\"iter\": 3, \"lo")
    assert [r["iter"] for r in read_log(path)] == [1, 2]


def test_finished_model_is_not_retrained(tmp_path):
    _, first = run(tmp_path)
    digest = sha256_file(first.model_path)
    model, second = run(tmp_path, loss_fn=crashing_at(1))  # would crash if it trained at all
    assert second.resumed_from == 30 and sha256_file(second.model_path) == digest
    payload = torch.load(second.model_path, weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in payload["model"].items())


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{root!r}, {tests!r}]
    import test_train_loop as t
    def slow(model, batch):
        time.sleep(0.02)
        return t.toy_loss(model, batch)
    t.run(sys.argv[1], iters=60, snapshot_iters=5, loss_fn=slow)
""")


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    _, full = run(tmp_path / "full", iters=60, snapshot_iters=5)
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests")))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and not any(k >= 15 for k, _ in list_snapshots(out)):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "model.pt").exists()
    _, resumed = run(out, iters=60, snapshot_iters=5)
    assert resumed.resumed_from >= 15
    assert sha256_file(resumed.model_path) == sha256_file(full.model_path)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_resume_is_bit_identical_and_keeps_the_grad_scaler(tmp_path, amp):
    _, full = run(tmp_path / "full", amp=amp)
    with pytest.raises(Crash):
        run(tmp_path / "crash", loss_fn=crashing_at(17), amp=amp)
    scaler = torch.load(snapshot_path(tmp_path / "crash", 14), weights_only=True)["scaler"]
    assert bool(scaler) == (amp == "fp16")
    _, resumed = run(tmp_path / "crash", amp=amp)
    assert resumed.resumed_from == 14 and sha256_file(resumed.model_path) == sha256_file(full.model_path)
    _, plain = run(tmp_path / "plain")
    assert sha256_file(plain.model_path) != sha256_file(full.model_path)  # autocast did change the numerics


def test_progress_bar_draws_only_when_enabled():
    import io
    from stages.engine.progress import ProgressBar, format_seconds

    quiet = io.StringIO()
    bar = ProgressBar(100, "stage1", stream=quiet)  # StringIO is not a TTY
    bar.update(50, loss=0.5)
    bar.close()
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    bar = ProgressBar(100, "stage1", start=20, stream=shown, enabled=True, min_interval=0.0)
    bar.t0 -= 2.0  # 2 s for 30 iterations: 15 it/s, 50 left -> ETA 3s
    bar.update(50, loss=0.25)
    bar.close()
    text = shown.getvalue()
    assert text.startswith("\rstage1 [") and "50/100 loss 0.2500" in text and text.endswith("\n")
    assert re.search(r"1[45]\.\d\d it/s ETA [34]s", text)
    assert [format_seconds(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]


def test_finished_model_with_a_state_dict_key_is_recognised(tmp_path):
    def checkpoint(model):
        return {"format": 1, "state_dict": model.state_dict(), "classes": ["a", "b"]}
    _, first = run(tmp_path, checkpoint_fn=checkpoint)
    model, second = run(tmp_path, checkpoint_fn=checkpoint, loss_fn=crashing_at(1))
    payload = torch.load(second.model_path, weights_only=True)
    assert second.resumed_from == 30 and payload["iteration"] == 30 and payload["classes"] == ["a", "b"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in payload["state_dict"].items())


def test_iter_size_accumulates_the_gradient_of_the_whole_batch(tmp_path):
    """ITER_SIZE 2 over micro-batches of 4 takes the SGD steps of one batch of 8 (mean losses, no dropout):
    the weights agree to float rounding, and the log holds the mean of the two micro-batch losses."""
    def plain_loss(model, batch):
        x, y = batch
        return {"cls": torch.nn.functional.cross_entropy(model(x), y)}

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    whole, accumulated = net(), net()
    loop(whole, plain_loss, ToyLoader(48, 8, np.random.default_rng(1)), iters=12, snapshot_iters=0,
               out_dir=tmp_path / "whole", progress=False, echo=lambda m: None, **SOLVER)
    loop(accumulated, plain_loss, ToyLoader(48, 4, np.random.default_rng(1)), iters=12, snapshot_iters=5,
               out_dir=tmp_path / "acc", progress=False, echo=lambda m: None, iter_size=2, **SOLVER)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    logs = read_log(tmp_path / "whole" / LOG_NAME), read_log(tmp_path / "acc" / LOG_NAME)
    assert [r["iter"] for r in logs[1]] == list(range(1, 13))
    for a, b in zip(*logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
