"""The generic training loop of every training step: momentum SGD with step LR, resumable snapshots, log.jsonl.

A snapshot (`snapshots/iter_XXXXXXXX.pt`, loadable with `torch.load(weights_only=True)`) holds the model, the
optimiser, the scheduler, every RNG state (torch, CUDA, Python `random`, NumPy's global state and the NumPy
generators passed in) and the loader's state_dict, so that on the CPU a run resumed from it ends with weights
bit-identical to an uninterrupted run. When the loop finishes it writes `model.pt` and deletes the snapshots.

Under torchrun (`dist` enabled) the loss runs through DistributedDataParallel, every rank trains on its own
loader shard, the logged losses are the means over the ranks, and rank 0 alone writes the log, the snapshots
(which then hold every rank's RNG and loader state, and the world size: a resume needs the same world size) and
`model.pt`.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np
import torch

from .artifacts import FAULT_ENV, FINAL_MODEL, SNAPSHOT_DIR, atomic_path, atomic_write_text, parse_fault
from .config import SolverSettings
from .distributed import SINGLE, DistContext, wrap_loss
from .errors import Interrupted, NonFiniteLossError, PipelineError, SnapshotMismatchError, StepFailedError
from .lock import defer_interrupts, raise_if_interrupted
from .paths import contained
from .progress import ProgressBar

LOG_NAME = "log.jsonl"
KEEP_SNAPSHOTS = 2
_SNAPSHOT_RE = re.compile(r"^iter_(\d{8})\.pt$")
_SNAPSHOT_KEYS = ("iteration", "model", "optimizer", "scheduler", "scaler", "rng", "loader")
AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class BatchLoader(Protocol):
    """What the loop needs from a data loader: an endless `next()` and a restorable state (plain types,
    tensors or NumPy arrays)."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]]


@dataclass
class TrainResult:
    """What a finished loop reports; `model_path` is `<out_dir>/model.pt`."""
    model_path: Path
    iterations: int
    resumed_from: int
    last_losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    data_seconds: float = 0.0


def step_lr(base_lr: float, gamma: float, stepsize: int, iteration: int) -> float:
    """Caffe's "step" policy: 0-based iteration `iteration` uses base_lr * gamma^(iteration // stepsize)."""
    return base_lr * gamma ** (iteration // stepsize)


def make_optimizer(param_groups: Iterable[Any], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.SGD:
    """torch SGD over the trainable parameters only.

    `param_groups` is an iterable of Parameters, or of dicts {"params": [...], "lr_mult": 1.0,
    "decay_mult": 1.0} (Caffe's per-blob multipliers, e.g. lr_mult 2 for biases). Parameters with
    requires_grad False are dropped, so frozen layers take neither updates nor weight decay.
    """
    groups = []
    items = list(param_groups)
    if items and not isinstance(items[0], dict):
        items = [{"params": items}]
    for item in items:
        params = [p for p in item["params"] if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * item.get("lr_mult", 1.0),
                           "weight_decay": weight_decay * item.get("decay_mult", 1.0)})
    if not groups:
        raise StepFailedError("the training step has no trainable parameters (every parameter is frozen)")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _encode(obj: Any) -> Any:
    """Make a state loadable with weights_only=True: NumPy arrays become tagged tensors, tuples stay tuples."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64)
                                                if obj.dtype.kind in "iub" else np.ascontiguousarray(obj)),
                "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_encode(v) for v in obj)
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype"}:
            return obj["__ndarray__"].numpy().astype(np.dtype(obj["dtype"]))
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_decode(v) for v in obj)
    return obj


def capture_rng(numpy_rngs: Mapping[str, np.random.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state the loop may touch, as tensors and plain types."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _encode(random.getstate()),
        "numpy_global": _encode(np.random.get_state()),
        "numpy": {name: _encode(gen.bit_generator.state) for name, gen in (numpy_rngs or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], numpy_rngs: Mapping[str, np.random.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = _decode(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(_decode(state["numpy_global"]))
    for name, gen in (numpy_rngs or {}).items():
        if name not in state["numpy"]:
            raise ValueError(f"snapshot has no state for the NumPy generator {name!r}")
        gen.bit_generator.state = _decode(state["numpy"][name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot_path(out_dir: str | Path, iteration: int) -> Path:
    return Path(out_dir) / SNAPSHOT_DIR / f"iter_{iteration:08d}.pt"


def list_snapshots(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the snapshots in `out_dir`/snapshots, newest first."""
    folder = Path(out_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_RE.match(p.name))]
    return sorted(found, reverse=True)


def load_snapshot(path: Path, iteration: int) -> dict[str, Any]:
    """A snapshot's dict, checked: ValueError when it is corrupt, partial or not the named iteration."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file fails in many ways (zip, unpickling, EOF)
        raise ValueError(f"snapshot {path.name} is unreadable: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or any(k not in state for k in _SNAPSHOT_KEYS):
        raise ValueError(f"snapshot {path.name} lacks some of {', '.join(_SNAPSHOT_KEYS)}")
    if state["iteration"] != iteration:
        raise ValueError(f"snapshot {path.name} holds iteration {state['iteration']}")
    return state


def newest_valid_snapshot(out_dir: str | Path, max_iteration: int, echo: Callable[[str], None] = print,
                          fingerprint: str = "") -> dict[str, Any] | None:
    """The newest snapshot that loads, is at most `max_iteration` and belongs to the run of `fingerprint`;
    corrupt and foreign ones are reported and skipped."""
    for iteration, path in list_snapshots(out_dir):
        if iteration > max_iteration:
            echo(f"ignoring snapshot {path.name}: beyond the {max_iteration} iterations asked for")
            continue
        try:
            state = load_snapshot(path, iteration)
        except ValueError as err:
            echo(f"skipping {err}")
            continue
        written_for = state.get("fingerprint")
        if written_for != fingerprint:
            echo(f"ignoring snapshot {path.name}: it belongs to another run (fingerprint "
                 f"{str(written_for or 'none')[:12]}, this run {fingerprint[:12] or 'none'}); not resuming from it")
            continue
        return state
    return None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a torn last line (a crash mid-write) is ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number != len(lines) - 1:
                raise PipelineError(f"{path} line {number + 1} is not JSON") from None
    return records


def _truncate_log(path: Path, last_iteration: int) -> None:
    """Drop records after `last_iteration` (written by the run that crashed after its last snapshot)."""
    if not path.exists():
        return
    kept = [r for r in read_log(path) if r.get("iter", 0) <= last_iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _total_loss(losses: Mapping[str, torch.Tensor], label: str) -> torch.Tensor:
    if not losses:
        raise ValueError(f"{label}: loss_fn returned no losses")
    total = sum(losses.values())
    assert isinstance(total, torch.Tensor)
    return total


def _injected_nan(label: str, iteration: int) -> bool:
    """FRCNN_FAULT="nan:<label>:<k>" (fault injection, see stages.engine.artifacts): a NaN loss at iteration k."""
    action, step, k = parse_fault(os.environ[FAULT_ENV])
    return action == "nan" and step == label and k == iteration


def _nonfinite(losses: Mapping[str, float], total: float) -> list[str]:
    bad = [f"{k}={v}" for k, v in losses.items() if not math.isfinite(v)]
    return bad or ([f"total={total}"] if not math.isfinite(total) else [])


@dataclass
class _Run:
    """The loop's mutable pieces, kept together for snapshotting."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: BatchLoader
    numpy_rngs: Mapping[str, np.random.Generator] | None
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    device_type: str
    dist: DistContext = SINGLE
    iter_size: int = 1
    fingerprint: str = ""

    def rank_state(self) -> dict[str, Any]:
        return {"rng": capture_rng(self.numpy_rngs), "loader": _encode(self.loader.state_dict())}

    def state(self, iteration: int) -> dict[str, Any] | None:
        """The snapshot dict on rank 0 (a collective: every rank must call it), None on the other ranks."""
        mine = self.rank_state()
        ranks = self.dist.gather(mine)
        if ranks is None:
            return None
        state = {"iteration": iteration, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), **mine, "world_size": self.dist.world_size,
                 "fingerprint": self.fingerprint}
        if self.dist.enabled:
            state["ranks"] = ranks
        return state

    def restore(self, state: Mapping[str, Any], name: str) -> None:
        written_by = int(state.get("world_size", 1))
        if written_by != self.dist.world_size:
            raise SnapshotMismatchError(
                f"snapshot {name} was written by {written_by} process(es) and this run has "
                f"{self.dist.world_size}: resume with the same torchrun --nproc_per_node x --nnodes, or clean the step")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.dist.rank] if self.dist.enabled else state
        self.loader.load_state_dict(_decode(mine["loader"]))
        restore_rng(mine["rng"], self.numpy_rngs)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a file object, so the zip's inner folder is "archive" whatever the (temporary)
    file name: the same weights then give the same bytes and the same sha256.

    On a full disk torch raises RuntimeError("[enforce fail at inline_container.cc] ... file write failed");
    that one becomes OSError(ENOSPC) (one line, exit 2), but only when the disk really is full: an ENOSPC in the
    exception chain, or a write failure with less than DISK_FULL_BYTES left on the file's filesystem. Any other
    RuntimeError stays a bug."""
    try:
        with open(path, "wb") as handle:
            torch.save(obj, handle)
    except RuntimeError as err:
        if disk_full(err, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from err
        raise


DISK_FULL_BYTES = 1 << 20


def disk_full(err: BaseException, path: Path) -> bool:
    """Whether `err`, raised while writing `path`, is the disk being full (see save_torch)."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    if "write" not in str(err):
        return False
    try:
        stats = os.statvfs(Path(path).parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < DISK_FULL_BYTES


def _save_snapshot(run: _Run, out_dir: Path, iteration: int) -> Path | None:
    path = snapshot_path(out_dir, iteration)
    state = run.state(iteration)
    if state is None:
        return None
    with defer_interrupts():
        with atomic_path(path) as tmp:
            save_torch(state, tmp)
    for _, old in list_snapshots(out_dir)[KEEP_SNAPSHOTS:]:
        old.unlink()
    return path


def _save_final(model: torch.nn.Module, out_dir: Path, iterations: int,
                checkpoint_fn: Callable[[torch.nn.Module], dict[str, Any]] | None) -> Path:
    payload = dict(checkpoint_fn(model)) if checkpoint_fn else {"model": model.state_dict()}
    payload["iteration"] = iterations
    path = out_dir / FINAL_MODEL
    with defer_interrupts():
        with atomic_path(path) as tmp:
            save_torch(payload, tmp)
    shutil.rmtree(out_dir / SNAPSHOT_DIR, ignore_errors=True)
    return path


def _finished_earlier(model: torch.nn.Module, out_dir: Path, iters: int, is_main: bool = True) -> bool:
    """model.pt of this step's folder already holds the full run (a crash hit between it and the manifest)."""
    path = out_dir / FINAL_MODEL
    if not path.is_file():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    weights = payload.get("model", payload.get("state_dict")) if isinstance(payload, dict) else None
    if not isinstance(weights, dict) or payload.get("iteration") != iters:
        return False
    model.load_state_dict(weights)
    if is_main:
        shutil.rmtree(out_dir / SNAPSHOT_DIR, ignore_errors=True)
    return True


@dataclass
class Reporter:
    """Where the loop reports: one-line messages (`echo`, prefixed by the caller), the log.jsonl interval, the
    progress bar (None: only on a terminal) and `on_snapshot(k, N)`, called after each snapshot is written."""
    label: str = "train"
    echo: Callable[[str], None] = print
    log_every: int = 1
    progress_bar: bool | None = None
    on_snapshot: Callable[[int, int], None] | None = None


def train_loop(model: torch.nn.Module, loss_fn: LossFn, loader: BatchLoader, solver: SolverSettings,
               out_dir: str | Path, *, param_groups: Iterable[Any] | None = None,
               numpy_rngs: Mapping[str, np.random.Generator] | None = None,
               checkpoint_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
               dist: DistContext = SINGLE, reporter: Reporter | None = None, fingerprint: str = "") -> TrainResult:
    """Train `model` for `solver.iters` iterations (resuming from out_dir/snapshots when a valid snapshot of the
    same `fingerprint` exists; a snapshot of another run is reported and never resumed).

    Each iteration: `solver.iter_size` micro-batches (Caffe's iter_size), each batch = next(loader) and losses =
    loss_fn(model, batch) (a dict of scalar tensors, summed, divided by iter_size, backward: the gradients
    accumulate); then one SGD step (momentum, weight decay, lr = step_lr(lr, gamma, stepsize, k-1) for
    iteration k). Under torchrun (`dist`) DDP averages the gradients over the ranks as well.
    A snapshot is written after iteration k when k % snapshot_iters == 0 (0: never) and k < iters; the final
    weights go to out_dir/model.pt as checkpoint_fn(model) (default {"model": state_dict}; the weights under
    "model" or "state_dict") plus "iteration".
    `param_groups` defaults to model.parameters(); see `make_optimizer`. `solver.amp` ("off", "fp16", "bf16")
    runs loss_fn under torch.autocast, with a GradScaler (kept in the snapshots) for fp16; an fp16 step the scaler
    skips still counts as an iteration. The caller seeds the RNGs and builds `model` identically on every
    call: a resumed call then overwrites it from the snapshot.
    Raises NonFiniteLossError at the first NaN/inf loss (of any rank; no update is applied; snapshots are kept),
    SnapshotMismatchError when the newest snapshot was written by another world size.
    """
    reporter = reporter or Reporter()
    iters, stepsize, iter_size, label = solver.iters, solver.stepsize, solver.iter_size, reporter.label
    echo = reporter.echo
    out_dir = Path(out_dir)
    contained(out_dir).mkdir(parents=True, exist_ok=True)
    if iters <= 0 or stepsize <= 0 or iter_size <= 0:
        raise ValueError(f"{label}: iters, stepsize and iter_size must be > 0, got {iters}, {stepsize}, {iter_size}")
    if not dist.is_main:
        echo = _silent
    if _finished_earlier(model, out_dir, iters, dist.is_main):
        echo(f"{FINAL_MODEL} already holds all {iters} iterations")
        return TrainResult(out_dir / FINAL_MODEL, iters, iters)
    optimizer = make_optimizer(param_groups if param_groups is not None else model.parameters(),
                               solver.lr, solver.momentum, solver.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=stepsize, gamma=solver.gamma)
    amp = solver.amp
    if amp not in AMP_DTYPES:
        raise ValueError(f"{label}: amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=amp == "fp16")
    run = _Run(model, optimizer, scheduler, loader, numpy_rngs, scaler, AMP_DTYPES[amp], device_type, dist,
               iter_size, fingerprint)
    start = 0
    snapshot = _agreed_snapshot(out_dir, iters, dist, echo, fingerprint)
    if snapshot is not None:
        run.restore(snapshot, snapshot_path(out_dir, snapshot["iteration"]).name)
        start = snapshot["iteration"]
        echo(f"resuming from snapshot iteration {start}/{iters}")
    if dist.is_main:
        _truncate_log(out_dir / LOG_NAME, start)
    if reporter.on_snapshot and dist.is_main:
        reporter.on_snapshot(start, iters)
    return _iterate(run, loss_fn, start, iters, solver.snapshot_iters, out_dir, checkpoint_fn, reporter.log_every,
                    reporter.progress_bar if dist.is_main else False, reporter.on_snapshot if dist.is_main else None,
                    label)


def _silent(message: str) -> None:
    """The echo of ranks other than 0: they would repeat rank 0's messages."""


def _agreed_snapshot(out_dir: Path, iters: int, dist: DistContext, echo: Callable[[str], None],
                     fingerprint: str) -> dict[str, Any] | None:
    """The newest valid snapshot, chosen by rank 0 and loaded by every rank from the shared output folder."""
    snapshot = newest_valid_snapshot(out_dir, iters, echo, fingerprint) if dist.is_main else None
    iteration = dist.broadcast(None if snapshot is None else snapshot["iteration"])
    if iteration is None or dist.is_main:
        return snapshot
    return load_snapshot(snapshot_path(out_dir, iteration), iteration)


class _Accumulator:
    """The micro-batch losses of one iteration: their mean per key (and of the total) over micro-batches and
    ranks, as Python floats (float64 sums of the float32 values)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.sums: list[float] = []
        self.count = 0

    def add(self, losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> None:
        values = [float(v.detach()) for v in losses.values()] + [float(total.detach())]
        if not self.keys:
            self.keys, self.sums = list(losses) + [""], [0.0] * len(values)
        self.sums = [s + v for s, v in zip(self.sums, values)]
        self.count += 1

    def means(self, dist: DistContext) -> tuple[dict[str, float], float]:
        mean = torch.tensor(self.sums, dtype=torch.float64) / self.count
        mean = dist.all_mean(mean).tolist()
        return dict(zip(self.keys[:-1], mean[:-1])), mean[-1]


def _micro_batches(run: _Run, module: torch.nn.Module, loss_fn_label: str, iteration: int
                   ) -> tuple[_Accumulator, float]:
    """Forward and backward over the iteration's `iter_size` micro-batches; DDP syncs on the last one only."""
    acc, data_time = _Accumulator(), 0.0
    for m in range(run.iter_size):
        t0 = time.perf_counter()
        batch = next(run.loader)
        data_time += time.perf_counter() - t0
        last = m == run.iter_size - 1
        sync = contextlib.nullcontext() if last or not run.dist.enabled else module.no_sync()
        with sync:
            with torch.autocast(run.device_type, dtype=run.autocast_dtype, enabled=run.autocast_dtype is not None):
                losses = module(batch)
            if FAULT_ENV in os.environ and _injected_nan(loss_fn_label, iteration):
                losses = {k: v * float("nan") for k, v in losses.items()}
            total = _total_loss(losses, loss_fn_label)
            acc.add(losses, total)
            run.scaler.scale(total / run.iter_size if run.iter_size > 1 else total).backward()
    return acc, data_time


def _iterate(run: _Run, loss_fn: LossFn, start: int, iters: int, snapshot_iters: int, out_dir: Path,
             checkpoint_fn: Callable[[torch.nn.Module], dict[str, Any]] | None, log_every: int,
             progress: bool | None, progress_callback: Callable[[int, int], None] | None,
             label: str) -> TrainResult:
    bar = ProgressBar(iters, label, start=start, enabled=progress)
    module = wrap_loss(run.model, loss_fn, run.dist)
    t_begin, data_total, last = time.perf_counter(), 0.0, {}
    recent: list[float] = []
    iteration = start
    main = run.dist.is_main
    try:
        with (open(out_dir / LOG_NAME, "a", encoding="utf-8") if main else contextlib.nullcontext()) as log, \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for iteration in range(start + 1, iters + 1):
                raise_if_interrupted()
                t0 = time.perf_counter()
                run.optimizer.zero_grad(set_to_none=True)
                acc, data_time = _micro_batches(run, module, label, iteration)
                data_total += data_time
                last, total = acc.means(run.dist)
                lr_now = run.optimizer.param_groups[0]["lr"]
                record = {"iter": iteration, "loss": total, "losses": last, "lr": lr_now,
                          "data_time": round(data_time, 6)}
                bad = _nonfinite(last, record["loss"])
                if bad:
                    if main:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    raise NonFiniteLossError(_nan_message(label, iteration, bad, out_dir), iteration)
                run.scaler.step(run.optimizer)
                run.scaler.update()
                run.scheduler.step()
                record["time"] = round(time.perf_counter() - t0, 6)
                recent = (recent + [record["loss"]])[-20:]
                if main and (iteration % log_every == 0 or iteration == iters):
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if snapshot_iters and iteration % snapshot_iters == 0 and iteration < iters:
                    _save_snapshot(run, out_dir, iteration)
                    if progress_callback:
                        progress_callback(iteration, iters)
                bar.update(iteration, loss=sum(recent) / len(recent), lr=f"{lr_now:.2e}")
    except Interrupted as err:
        bar.close()
        raise Interrupted(err.signum, _interrupt_message(label, err.signame, iteration, iters, out_dir)) from None
    bar.close()
    path = _save_final(run.model, out_dir, iters, checkpoint_fn) if main else out_dir / FINAL_MODEL
    return TrainResult(path, iters, start, last, time.perf_counter() - t_begin, data_total)


def _last_snapshot_text(out_dir: Path) -> str:
    snaps = list_snapshots(out_dir)
    return f"{SNAPSHOT_DIR}/{snaps[0][1].name}" if snaps else "none (a rerun starts from iteration 0)"


def _nan_message(label: str, iteration: int, bad: list[str], out_dir: Path) -> str:
    return (f"{label}: non-finite loss at iteration {iteration} ({', '.join(bad)}); stopped without applying it; "
            f"last good snapshot: {_last_snapshot_text(out_dir)}")


def _interrupt_message(label: str, signame: str, iteration: int, iters: int, out_dir: Path) -> str:
    return (f"{label}: interrupted by {signame} during iteration {iteration}/{iters}; "
            f"last snapshot: {_last_snapshot_text(out_dir)}")
