"""Runs the selected steps in order: skip what is done, restore what the run cache holds, resume what is partial,
run the rest (in this process or in a fresh child process each), and record each step's outputs, timings and
metrics in its manifest.

Step bodies are registered by id (`register_step("stage1", fn)`); a body is `fn(ctx: StepContext) ->
StepResult` (or a dict with "outputs" and "metrics"), writing its files under `ctx.step_dir`. Data inputs
(`data:train`, `data:test`) are registered the same way (`register_data_input`): a function of the config that
returns a `DataInput` (its digest, and how to name what changed since another digest).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .artifacts import (FINAL_MODEL, SNAPSHOT_DIR, describe_change, hash_outputs, outputs_digest, read_manifest, sha256_file, stale_reason,
                        atomic_write_json, update_manifest, write_manifest)
from .config import Config, SolverSettings, dump_config, experiment_dir, recording_reads, resolve_path, solver_settings
from .distributed import SINGLE, DistContext, resolve_device
from .errors import (ConfigError, Interrupted, MissingStepBodyError, StepFailedError, StepSelectionError, is_bad_input,
                     one_line)
from .graph import (DATA_INPUTS, M0, Graph, Selection, Step, all_step_ids, fingerprint_parts, graph_for, hash_parts,
                    undeclared_reads)
from .lock import RunLock, interrupt_guard, lock_holder_alive, raise_if_interrupted, read_lock
from .paths import contained, set_write_roots, write_roots
from .runcache import RunCache

if TYPE_CHECKING:  # torch is imported when a step runs, so that `status` starts without it
    import torch

    from .trainer import BatchLoader, LossFn, TrainResult

_RESULT = ".result.json"
_CHILD_GRACE_S = 120.0
DATA_LABELS = {"data:train": "training data", "data:test": "test data"}


@dataclass
class StepResult:
    """What a body returns: the files it wrote (relative to its step folder) and metrics for the manifest."""
    outputs: list[str]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepInput:
    """A finished upstream step: its folder and its recorded outputs as absolute paths."""
    step: str
    dir: Path
    outputs: dict[str, Path]


@dataclass
class StepContext:
    """Everything a body gets: config, its own folder, its inputs' artefacts, the M0 weights, a logger."""
    step: Step
    config: Config
    exp_dir: Path
    step_dir: Path
    inputs: dict[str, StepInput]
    weights: Path | None
    echo: Callable[[str], None] = print
    dist: DistContext = SINGLE
    fingerprint: str = ""

    def log(self, message: str) -> None:
        self.echo(f"[{self.step.id}] {message}")

    def input_file(self, step_id: str, relpath: str) -> Path:
        """Absolute path of output `relpath` of upstream step `step_id`."""
        if step_id not in self.inputs or relpath not in self.inputs[step_id].outputs:
            raise StepFailedError(f"{self.step.id}: no input {step_id}/{relpath}")
        return self.inputs[step_id].outputs[relpath]

    def report_progress(self, iteration: int, total: int) -> None:
        """Record 'partial at iteration k/N' in the manifest (called after each snapshot)."""
        update_manifest(self.step_dir, progress={"iteration": iteration, "total": total})

    def train(self, model: "torch.nn.Module", loss_fn: "LossFn", loader: "BatchLoader", **kwargs: Any) -> "TrainResult":
        """`train_loop` with this training step's solver (PIPELINE.STAGEk_*, AMP, ITER_SIZE), under torchrun's DDP
        when launched so, writing into the step folder, its snapshots tagged with this run's fingerprint, and
        recording progress in the manifest; kwargs go to `train_loop` (param_groups, numpy_rngs, checkpoint_fn)."""
        from .trainer import Reporter, train_loop
        reporter = Reporter(label=self.step.id, echo=self.log, log_every=self.config.get("PIPELINE.LOG_EVERY"),
                            on_snapshot=self.report_progress)
        return train_loop(model, loss_fn, loader, self.solver, self.step_dir, dist=self.dist, reporter=reporter,
                          fingerprint=self.fingerprint, **kwargs)

    @property
    def solver(self) -> SolverSettings:
        return solver_settings(self.config, self.step.stage)

    @property
    def device(self) -> "torch.device":
        """PIPELINE.DEVICE with 'auto' resolved (CUDA when available, else the CPU); under torchrun this rank's
        GPU (LOCAL_RANK)."""
        return resolve_device(self.config.get("PIPELINE.DEVICE"), self.dist.local_rank)


StepBody = Callable[[StepContext], Any]


class StepRegistry:
    """Maps step id -> (body, version); the version enters the step's fingerprint.

    A body may be registered as "package.module:function", imported only when the step runs, so that a rerun
    with nothing to do never imports the model and data code.
    """

    def __init__(self) -> None:
        self._bodies: dict[str, tuple[StepBody | str, str]] = {}

    def register(self, step_id: str, fn: StepBody | str, version: str = "1") -> None:
        if step_id not in all_step_ids():
            raise StepSelectionError(f"unknown step {step_id!r}; steps are {', '.join(all_step_ids())}")
        if isinstance(fn, str) and fn.count(":") != 1:
            raise ValueError(f"body of step {step_id}: expected 'module:function', got {fn!r}")
        if not isinstance(fn, str) and not callable(fn):
            raise TypeError(f"body of step {step_id} must be callable, got {type(fn).__name__}")
        self._bodies[step_id] = (fn, str(version))

    def get(self, step_id: str) -> tuple[StepBody, str] | None:
        """(callable body, version), importing a body registered by name; None when there is none."""
        entry = self._bodies.get(step_id)
        if entry is None or not isinstance(entry[0], str):
            return entry  # type: ignore[return-value]
        module_name, _, attr = entry[0].partition(":")
        body = getattr(importlib.import_module(module_name), attr)
        self._bodies[step_id] = (body, entry[1])
        return body, entry[1]

    def version(self, step_id: str) -> str | None:
        entry = self._bodies.get(step_id)
        return entry[1] if entry else None

    def missing(self, step_ids: list[str] | tuple[str, ...]) -> list[str]:
        return [s for s in step_ids if s not in self._bodies]


REGISTRY = StepRegistry()


def register_step(step_id: str, fn: StepBody | None = None, version: str = "1") -> Any:
    """Register the real body of a step in the default registry; usable as `@register_step("p1")` too."""
    if fn is None:
        def decorate(body: StepBody) -> StepBody:
            REGISTRY.register(step_id, body, version)
            return body
        return decorate
    REGISTRY.register(step_id, fn, version)
    return fn


class DataInput(Protocol):
    """What a data-input function returns: the content digest of an imdb, and the words for a change."""
    digest: str

    def describe_change(self, old_digest: str) -> str:
        """What differs from the data of `old_digest`, e.g. '2 annotations, 1 image, image set'."""
        ...


DATA_INPUT_FUNCTIONS: dict[str, str | Callable[[Config], DataInput]] = {}


def register_data_input(name: str, fn: str | Callable[[Config], DataInput]) -> None:
    """Register the function (or its "module:function" name, imported on first use) that digests data input
    `name` (one of graph.DATA_INPUTS) for a config."""
    if name not in DATA_INPUTS:
        raise ValueError(f"unknown data input {name!r}; expected one of {', '.join(DATA_INPUTS)}")
    DATA_INPUT_FUNCTIONS[name] = fn


def _data_input_function(name: str) -> Callable[[Config], DataInput]:
    fn = DATA_INPUT_FUNCTIONS.get(name)
    if fn is None:
        raise MissingStepBodyError(f"no function registered for data input {name} (see register_data_input)")
    if isinstance(fn, str):
        module_name, _, attr = fn.partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        DATA_INPUT_FUNCTIONS[name] = fn
    return fn


WEIGHTS_SOURCES: dict[str, dict[str, str | Callable[..., Any]]] = {}


def register_weights_source(scheme: str, locate: str | Callable[[Config], tuple[Path, str] | None],
                            build: str | Callable[..., Any]) -> None:
    """Register how a PIPELINE.WEIGHTS value starting with `scheme` (e.g. 'pretrain:') is found and built, as
    functions or "module:function" names imported on first use: ``locate(config)`` -> (path, sha256) of the built
    file or None (cheap, no torch: `status` calls it), ``build(config, echo)`` builds it (`run` calls it, under
    the run lock, before any fingerprint is computed)."""
    WEIGHTS_SOURCES[scheme] = {"locate": locate, "build": build}


def _weights_source(value: str, what: str) -> Callable[..., Any] | None:
    for scheme, functions in WEIGHTS_SOURCES.items():
        if value.startswith(scheme):
            fn = functions[what]
            if isinstance(fn, str):
                module_name, _, attr = fn.partition(":")
                fn = functions[what] = getattr(importlib.import_module(module_name), attr)
            return fn
    return None


def _as_result(value: Any, step_id: str) -> StepResult:
    if isinstance(value, StepResult):
        return value
    if isinstance(value, dict) and "outputs" in value:
        return StepResult(list(value["outputs"]), dict(value.get("metrics") or {}))
    raise StepFailedError(f"body of {step_id} returned {type(value).__name__}; expected a StepResult")


def seed_everything(seed: int, deterministic: bool) -> None:
    """py-faster-rcnn reseeds every step with RNG_SEED, so a step's result never depends on what ran before."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class StepReport:
    step: str
    action: str  # "skipped" | "restored" | "ran"
    reason: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepState:
    """Where a step stands for the current config: `reason` None when done and current, else why not; `where`
    the done version's place ("live": the step folder, "cache": the run cache); `fingerprint` and its `parts`."""
    reason: str | None
    where: str
    fingerprint: str = ""
    parts: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


class Runner:
    """The orchestrator for one experiment folder (output/<EXP_DIR>), walking the graph of PIPELINE.MODE."""

    def __init__(self, config: Config, registry: StepRegistry = REGISTRY, echo: Callable[[str], None] = print,
                 isolate: bool | None = None, debug: bool = False, dist: DistContext = SINGLE):
        self.config = config
        self.graph: Graph = graph_for(config)
        self.registry = registry
        self.dist = dist
        self.echo = echo if dist.is_main else _silent
        self.isolate = config.get("PIPELINE.ISOLATE_STEPS") if isolate is None else isolate
        if self.isolate and dist.enabled:
            self.echo("PIPELINE.ISOLATE_STEPS is ignored under torchrun: each rank already is its own process")
            self.isolate = False
        self.debug = debug
        self.exp_dir = experiment_dir(config)
        self.cache = RunCache(self.exp_dir, config.get("PIPELINE.RUN_CACHE_VERSIONS"))
        self._weights_digest: str | None = None
        self._data: dict[str, DataInput] = {}
        self._states: dict[str, StepState] = {}

    def step_dir(self, step_id: str) -> Path:
        return self.exp_dir / step_id

    def weights_path(self) -> Path | None:
        """M0's file: PIPELINE.WEIGHTS as a path, or the built file of a registered weights source
        ('pretrain:<recipe>'); None for a random init."""
        value = self.config.get("PIPELINE.WEIGHTS")
        if not value:
            return None
        locate = _weights_source(value, "locate")
        if locate is None:
            return resolve_path(self.config, "PIPELINE.WEIGHTS")
        located = locate(self.config)
        if located is None:
            raise ConfigError(f"PIPELINE.WEIGHTS: {value} is not built yet (`pipeline.py run` or `pipeline.py "
                              f"pretrain` builds it)")
        return located[0]

    def build_weights(self) -> None:
        """Build M0 when PIPELINE.WEIGHTS names a weights source whose file is not built yet (rank 0)."""
        value = self.config.get("PIPELINE.WEIGHTS")
        locate = _weights_source(value, "locate") if value else None
        if locate is not None and locate(self.config) is None:
            _weights_source(value, "build")(self.config, echo=self.echo)
            self._weights_digest = None
            self._changed()

    def _m0_digest(self) -> str:
        if self._weights_digest is None:
            value = self.config.get("PIPELINE.WEIGHTS")
            locate = _weights_source(value, "locate") if value else None
            if not value:
                self._weights_digest = "random-init"
            elif locate is not None:
                located = locate(self.config)
                self._weights_digest = f"not built: {value}" if located is None else located[1]
            else:
                path = self.weights_path()
                if not path.is_file():
                    raise ConfigError(f"PIPELINE.WEIGHTS: weights file {path} does not exist")
                self._weights_digest = sha256_file(path)
        return self._weights_digest

    def data_input(self, name: str) -> DataInput:
        """The digest of data input `name` for this config (computed once per Runner)."""
        if name not in self._data:
            self._data[name] = _data_input_function(name)(self.config)
        return self._data[name]

    def input_digests(self, step: Step) -> dict[str, str]:
        """Digest per input: M0's file sha256, a data input's content digest, or the upstream outputs' digest
        ('not done' if unfinished)."""
        digests = {}
        for name in step.inputs:
            if name == M0:
                digests[name] = self._m0_digest()
            elif name in DATA_INPUTS:
                digests[name] = self.data_input(name).digest
            else:
                state = self.state(name)
                digests[name] = (outputs_digest(state.manifest.get("outputs") or {}) if state.reason is None
                                 else "not done")
        return digests

    def current_parts(self, step_id: str) -> dict[str, Any]:
        step = self.graph.get_step(step_id)
        return fingerprint_parts(step, self.config, self.input_digests(step),
                                 extra={"body_version": self.registry.version(step_id) or "1"})

    def state(self, step_id: str, verify_hashes: bool = True) -> StepState:
        """Where `step_id` stands (see StepState); remembered until the next change this runner makes."""
        if step_id not in self._states:
            self._states[step_id] = self._compute_state(step_id, verify_hashes)
        return self._states[step_id]

    def _compute_state(self, step_id: str, verify_hashes: bool) -> StepState:
        step = self.graph.get_step(step_id)
        folder = self.step_dir(step_id)
        for name in step.upstream:
            if self.state(name, verify_hashes).reason is not None:
                return StepState("missing" if read_manifest(folder) is None else f"waiting for {name}", "none")
        parts = self.current_parts(step_id)
        fingerprint = hash_parts(parts)
        reason = stale_reason(folder, fingerprint, parts, verify_hashes)
        if reason is None:
            return StepState(None, "live", fingerprint, parts, read_manifest(folder) or {})
        cached = self.cache.lookup(step_id, fingerprint, verify_hashes)
        if cached is not None and cached.done:
            return StepState(None, "cache", fingerprint, parts, cached.manifest)
        if reason.startswith("fingerprint changed"):
            reason = self._describe_stale((read_manifest(folder) or {}).get("fingerprint_parts") or {}, parts)
        elif cached is not None and not (read_manifest(folder) or {}).get("fingerprint") == fingerprint:
            progress = cached.manifest.get("progress") or {}
            reason = (f"partial at iteration {progress['iteration']}/{progress['total']} (in the run cache)"
                      if "iteration" in progress and "total" in progress else "partial (in the run cache)")
        return StepState(reason, "none", fingerprint, parts)

    def _describe_stale(self, old: dict[str, Any], new: dict[str, Any]) -> str:
        """'fingerprint changed: TEST.NMS; training data changed (1 annotation, image set)'."""
        old_in, new_in = old.get("inputs") or {}, new.get("inputs") or {}
        data = [name for name in DATA_INPUTS if name in new_in and name in old_in and old_in[name] != new_in[name]]
        others = describe_change({**old, "inputs": {k: v for k, v in old_in.items() if k not in data}},
                                 {**new, "inputs": {k: v for k, v in new_in.items() if k not in data}})
        parts = [] if others.startswith("unknown") and data else [f"fingerprint changed: {others}"]
        for name in data:
            parts.append(f"{DATA_LABELS[name]} changed ({self.data_input(name).describe_change(old_in[name])})")
        return "; ".join(parts)

    def not_done_reason(self, step_id: str, verify_hashes: bool = True) -> str | None:
        """None when `step_id` is done and current (in its folder or the run cache); else why not."""
        return self.state(step_id, verify_hashes).reason

    def plan(self, until: str | None = None, from_: str | None = None, only: str | None = None,
             force: str | None = None) -> Selection:
        return self.graph.select(until=until, from_=from_, only=only, force=force, is_done=self.not_done_reason)

    def run(self, until: str | None = None, from_: str | None = None, only: str | None = None,
            force: str | None = None) -> list[StepReport]:
        """Take the lock, save config.yml, and walk the selected steps; returns one report per step.

        Under torchrun rank 0 holds the lock, decides and records; every rank runs the bodies."""
        lock = RunLock(self.exp_dir, echo=self.echo) if self.dist.is_main else contextlib.nullcontext()
        self._changed()
        with lock, interrupt_guard():
            self._on_main(self.build_weights)
            selection = self._on_main(lambda: self.plan(until, from_, only, force))
            pending = [s for s in selection.steps if s in selection.forced or self._on_main(
                lambda: self.not_done_reason(s)) is not None]
            self._require_bodies(pending)
            if self.dist.is_main:
                dump_config(self.config, self.exp_dir / "config.yml")
            reports = []
            for step_id in selection.steps:
                raise_if_interrupted()
                reports.append(self._run_or_skip(step_id, step_id in selection.forced))
            raise_if_interrupted()
            return reports

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() computed by rank 0 and shared with every rank; its bad-input error is raised on every rank."""
        if not self.dist.enabled:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.dist.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as err:  # noqa: BLE001  (shared with every rank, then raised there)
                outcome = ("error", err)
        kind, value = self.dist.broadcast(outcome)
        if kind == "error":
            raise value
        return value

    def _require_bodies(self, step_ids: list[str]) -> None:
        missing = self.registry.missing(step_ids)
        if missing:
            ready = [s for s in self.graph.order if s not in self.registry.missing([s])]
            hint = f"; steps with a body: {', '.join(ready)}" if ready else ""
            raise MissingStepBodyError(f"no body registered yet for step(s) {', '.join(missing)}{hint} "
                                       f"(see stages.register_step)")

    def _changed(self) -> None:
        self._states.clear()

    def _materialize(self, step_id: str) -> None:
        """Make the done version of `step_id` (and of its inputs) the step folder, restoring it from the run
        cache where it waits there (rank 0, under the lock)."""
        step = self.graph.get_step(step_id)
        for name in step.upstream:
            self._materialize(name)
        state = self.state(step_id)
        if state.reason is None and state.where == "cache":
            self._restore_from_cache(step_id, state.fingerprint)

    def _restore_from_cache(self, step_id: str, fingerprint: str) -> None:
        folder = self.step_dir(step_id)
        if folder.exists():
            _remove_temporaries(folder)
        self.cache.stash(step_id, folder)
        self.cache.restore(step_id, fingerprint, folder)
        self._changed()

    def _run_or_skip(self, step_id: str, forced: bool) -> StepReport:
        main = self.dist.is_main
        state = self._on_main(lambda: self.state(step_id))
        if not forced and state.reason is None:
            if state.where == "cache":
                if main:
                    self._materialize(step_id)
                self.dist.barrier()
                self.echo(f"{step_id}: done (restored from the run cache)")
                return StepReport(step_id, "restored", "run cache", metrics=state.manifest.get("metrics") or {})
            self.echo(f"{step_id}: done, skipped")
            return StepReport(step_id, "skipped", "done", metrics=state.manifest.get("metrics") or {})
        self._require_bodies([step_id])
        reason = "forced" if forced else state.reason
        self.echo(f"{step_id}: running ({reason})")
        started = time.time()
        parts, fingerprint = state.parts, state.fingerprint
        if not fingerprint:  # an input was not done when the state was computed; it is now
            self._changed()
            parts = self._on_main(lambda: self.current_parts(step_id))
            fingerprint = hash_parts(parts)
        stashed = None
        if main:
            for name in self.graph.get_step(step_id).upstream:
                self._materialize(name)
            progress, stashed = self._prepare_dir(step_id, fingerprint, forced)
            write_manifest(self.step_dir(step_id), {
                "step": step_id, "status": "running", "fingerprint": fingerprint, "fingerprint_parts": parts,
                "inputs": parts["inputs"], "outputs": {}, "metrics": {}, "progress": progress,
                "timings": {"started": _iso(started)}, "world_size": self.dist.world_size})
            self._changed()
        self.dist.barrier()
        try:
            result = self._call_body(step_id, fingerprint)
            self.dist.barrier()
        except Interrupted as err:
            if main:
                self._after_failure(step_id, stashed)
            message = str(err) if str(err).startswith(step_id) else f"{step_id}: {err}"
            raise Interrupted(err.signum, message) from None
        except BaseException:
            if main:
                self._after_failure(step_id, stashed)
            raise
        seconds = time.time() - started
        if main:
            try:
                outputs = hash_outputs(self.step_dir(step_id), result.outputs)
                update_manifest(self.step_dir(step_id), status="done", outputs=outputs, metrics=result.metrics,
                                timings={"started": _iso(started), "finished": _iso(time.time()),
                                         "seconds": round(seconds, 3)})
            except BaseException:  # e.g. a full disk at the 'done' manifest: as for a failed body
                self._after_failure(step_id, stashed)
                raise
            self.cache.drop(step_id, fingerprint)  # a cached copy of this fingerprint is superseded
            self.cache.prune(step_id)
            self._changed()
        self.dist.barrier()
        self.echo(f"{step_id}: done in {seconds:.1f}s")
        return StepReport(step_id, "ran", reason or "", seconds, result.metrics)

    def _prepare_dir(self, step_id: str, fingerprint: str, forced: bool) -> tuple[dict[str, Any] | None, str | None]:
        """Keep a partial run of the same fingerprint (to resume it); otherwise set the folder aside in the run
        cache and resume this fingerprint's partial run from there, or start from an empty folder.
        Returns (progress to resume from, fingerprint of the version set aside)."""
        folder = self.step_dir(step_id)
        manifest = read_manifest(folder)
        if (not forced and manifest and manifest.get("status") == "running"
                and manifest.get("fingerprint") == fingerprint):
            _remove_temporaries(folder)
            return manifest.get("progress"), None
        if folder.exists():
            _remove_temporaries(folder)
        stashed = self.cache.stash(step_id, folder)
        cached = None if forced else self.cache.lookup(step_id, fingerprint, verify_hashes=False)
        if cached is not None and not cached.done:
            self.cache.restore(step_id, fingerprint, folder)
            _remove_temporaries(folder)
            self.echo(f"{step_id}: resuming its partial run from the run cache")
            return cached.manifest.get("progress"), stashed
        contained(folder).mkdir(parents=True)
        return None, stashed

    def _after_failure(self, step_id: str, stashed: str | None) -> None:
        """After a failed or interrupted run: keep what it left to resume (a snapshot or model.pt); otherwise put
        back the version set aside, so bad input leaves the folder as it was. The set-aside version stays in the
        run cache either way: a finished version is never lost to a failed re-run."""
        folder = self.step_dir(step_id)
        self._changed()
        if (folder / FINAL_MODEL).is_file() or any((folder / SNAPSHOT_DIR).glob("iter_*.pt")):
            return
        if stashed is not None and self.cache.lookup(step_id, stashed, verify_hashes=False) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            self.cache.restore(step_id, stashed, folder)
            self.echo(f"{step_id}: kept its previous outputs (the failed run left nothing to resume)")

    def context(self, step_id: str, echo: Callable[[str], None] | None = None, fingerprint: str = "") -> StepContext:
        step = self.graph.get_step(step_id)
        inputs = {}
        for name in step.upstream:
            folder = self.step_dir(name)
            recorded = (read_manifest(folder) or {}).get("outputs") or {}
            inputs[name] = StepInput(name, folder, {rel: folder / rel for rel in recorded})
        weights = self.weights_path() if M0 in step.inputs else None
        return StepContext(step, self.config, self.exp_dir, self.step_dir(step_id), inputs, weights,
                           echo or self.echo, self.dist, fingerprint)

    def _call_body(self, step_id: str, fingerprint: str) -> StepResult:
        entry = self.registry.get(step_id)
        assert entry is not None
        if self.isolate:
            result, read = self._call_isolated(step_id, entry[0], fingerprint)
        else:
            seed_everything(self.config.get("RNG_SEED"), self.config.get("PIPELINE.DETERMINISTIC"))
            with recording_reads() as read:
                result = _as_result(entry[0](self.context(step_id, fingerprint=fingerprint)), step_id)
        check_reads(self.graph.get_step(step_id), read)
        return result

    def _call_isolated(self, step_id: str, body: StepBody, fingerprint: str) -> tuple[StepResult, set[str]]:
        ctx = self.context(step_id, echo=print, fingerprint=fingerprint)
        result_file = self.step_dir(step_id) / _RESULT
        result_file.unlink(missing_ok=True)
        process = multiprocessing.get_context("spawn").Process(
            target=_child_main, args=(body, ctx, self.debug, os.getpid(), write_roots()), name=f"step-{step_id}")
        process.start()
        _wait_for_child(process, step_id)
        try:
            data = json.loads(result_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        result_file.unlink(missing_ok=True)
        if process.exitcode == 2 and isinstance(data, dict) and "error" in data:
            raise StepFailedError(data["error"])  # the child's one-line bad-input message, printed once
        if process.exitcode != 0:
            raise StepFailedError(f"{step_id}: child process (pid {process.pid}) {_exit_text(process.exitcode)}")
        if not isinstance(data, dict) or "outputs" not in data:
            raise StepFailedError(f"{step_id}: child process exited without reporting its result")
        return StepResult(data["outputs"], data["metrics"]), set(data.get("reads") or ())

    def status_rows(self) -> list[dict[str, str]]:
        """One row per step: step, state, time, metrics (reads only; never locks or writes)."""
        holder = read_lock(self.exp_dir)
        live = holder if lock_holder_alive(holder) else None
        self._changed()
        rows = []
        for step_id in self.graph.order:
            manifest = read_manifest(self.step_dir(step_id)) or {}
            state = self.state(step_id)
            reason = state.reason
            text = "done" if reason is None else reason
            if reason is None and state.where == "cache":
                text = "done (in the run cache; `run` restores it)"
                manifest = state.manifest
            elif reason not in (None, "missing") and not reason.startswith("partial"):
                text = f"stale: {reason}"
            if live and manifest.get("status") == "running":
                text = f"running (pid {live.get('pid')}), {text}"
            seconds = (manifest.get("timings") or {}).get("seconds")
            rows.append({"step": step_id, "state": text,
                         "time": _format_seconds(seconds) if seconds is not None else "-",
                         "metrics": format_metrics(manifest.get("metrics") or {})})
        return rows

    def cache_summary(self) -> str:
        """'run cache: 3 versions, 41.2 MB (PIPELINE.RUN_CACHE_VERSIONS 2 per step; `clean --cache` empties it)'."""
        count, size = self.cache.usage()
        return (f"run cache: {count} version{'s' if count != 1 else ''}, {size / 1e6:.1f} MB "
                f"(PIPELINE.RUN_CACHE_VERSIONS {self.cache.versions} per step; `clean --cache` empties it)")

    def clean(self, step_id: str) -> list[str]:
        """Remove the step's folder and its cached versions (under the lock); returns the steps downstream."""
        self.graph.get_step(step_id)
        with RunLock(self.exp_dir, echo=self.echo):
            folder = self.step_dir(step_id)
            if folder.exists():
                shutil.rmtree(folder)
            self.cache.drop(step_id)
            shutil.rmtree(self.exp_dir / f".{step_id}.previous", ignore_errors=True)
        self._changed()
        return self.graph.downstream_steps(step_id)

    def clean_cache(self, step_id: str | None = None) -> tuple[int, int]:
        """Empty the run cache (of `step_id` only when given), under the lock; returns (versions, bytes) freed."""
        if step_id is not None:
            self.graph.get_step(step_id)
        with RunLock(self.exp_dir, echo=self.echo):
            versions = self.cache.entries(step_id)
            size = sum(p.stat().st_size for v in versions for p in v.dir.rglob("*") if p.is_file())
            for version in versions:
                shutil.rmtree(version.dir, ignore_errors=True)
        self._changed()
        return len(versions), size


def check_reads(step: Step, read: set[str]) -> None:
    """A body that read a config key its fingerprint does not cover is a bug: its result could go stale
    unnoticed. Raises RuntimeError (a traceback, exit 1), so the step is never recorded as done."""
    missing = undeclared_reads(step, read)
    if missing:
        raise RuntimeError(f"bug: step {step.id} read config key(s) {', '.join(missing)} that its fingerprint does "
                           f"not cover; add them to its reads in stages/engine/graph.py (or to NON_RESULT_KEYS "
                           f"if they cannot change its result)")


def _remove_temporaries(folder: Path) -> None:
    for leftover in folder.rglob(".*.tmp"):  # temporaries of a killed write; we hold the lock
        leftover.unlink(missing_ok=True)


def _silent(message: str) -> None:
    """The echo of torchrun ranks other than 0 (rank 0 speaks for the run)."""


def _format_seconds(seconds: float) -> str:
    from .progress import format_seconds
    return format_seconds(seconds)


KEY_METRICS = ("mAP", "recall@0.5", "recall@0.7", "loss")


def format_metrics(metrics: dict[str, Any], limit: int = 4) -> str:
    """'mAP 0.9123  loss 0.4521' from the scalar metrics: KEY_METRICS first, then the body's order; `limit` shown."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    order = [k for k in KEY_METRICS if k in scalars] + [k for k in scalars if k not in KEY_METRICS]
    shown = [f"{k} {scalars[k]:.4g}" if isinstance(scalars[k], float) else f"{k} {scalars[k]}" for k in order]
    return "  ".join(shown[:limit]) or "-"


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stamp))


def _exit_text(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def _wait_for_child(process: multiprocessing.process.BaseProcess, step_id: str) -> None:
    """Join the child; on SIGINT/SIGTERM pass the signal on, give it time to stop cleanly, then re-raise."""
    try:
        while process.is_alive():
            process.join(0.2)
    except Interrupted as err:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, err.signum)
        process.join(_CHILD_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
        raise Interrupted(err.signum, f"{step_id}: interrupted by {err.signame}; its child process "
                          f"{_exit_text(process.exitcode)}") from None


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel SIGKILL this child when the parent dies: an orphaned step must not go on writing
    into a folder that the next run (which takes over the dead parent's lock) owns."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(137)


def _child_main(body: StepBody, ctx: StepContext, debug: bool, parent_pid: int | None = None,
                roots: tuple[Path, ...] = ()) -> None:
    """Entry point of an isolated step: run the body, leave its result in the step folder, exit 0/2/130/1."""
    if parent_pid is not None and sys.platform.startswith("linux"):
        _die_with_parent(parent_pid)
    set_write_roots(roots)  # the parent's write containment (a spawned child starts without it)
    code = 0
    with interrupt_guard():
        try:
            seed_everything(ctx.config.get("RNG_SEED"), ctx.config.get("PIPELINE.DETERMINISTIC"))
            with recording_reads() as read:
                result = _as_result(body(ctx), ctx.step.id)
            atomic_write_json(ctx.step_dir / _RESULT, {**dataclasses.asdict(result), "reads": sorted(read)})
        except Interrupted as err:
            print(f"{ctx.step.id}: {err}", file=sys.stderr)
            code = 130
        except BaseException as err:
            if not is_bad_input(err):
                traceback.print_exc()
                print(f"error: {ctx.step.id}: this is a bug (the traceback above says where); please report it",
                      file=sys.stderr)
                code = 1
            else:
                if debug:
                    traceback.print_exc()
                message = one_line(err)
                try:  # the parent prints it, so the user sees one error line
                    atomic_write_json(ctx.step_dir / _RESULT, {"error": f"{ctx.step.id}: {message}"})
                except OSError:
                    print(f"error: {ctx.step.id}: {message}", file=sys.stderr)
                code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
