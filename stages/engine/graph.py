"""The step graphs (one per PIPELINE.MODE): steps, their inputs, the config keys each reads, fingerprints, and the
--until/--from/--only/--force selection.

    alt_opt: stage1 (M1) -> p1 (P1) -> stage2 (M2, from M0) -> stage3 (M3) -> p2 (P2) -> stage4 (M4) -> eval
    end2end: e2e (approximate joint training from M0: RPN + Fast R-CNN losses in one net) -> eval

A step's inputs are upstream step ids and external inputs: M0 (the initial weights, PIPELINE.WEIGHTS) and the
content of the training or test imdb (`data:train`, `data:test`: image-set ids, annotations, images, class list
and parse options, never their path). A step's fingerprint is the sha256 of a canonical JSON of (step id, code
version, the values of only the keys it reads, the digests of its inputs, extra). Changing TEST.NMS therefore
re-runs eval only; changing PIPELINE.STAGE2_ITERS re-runs stage2 and, through its outputs' digest, everything after
it; editing one annotation re-runs every step that reads the training data.

`reads` cannot drift from what a body really reads: the runner records every config key a body touches and fails
the step (a bug, not bad input) when one is neither in `reads`, nor stood for by one of its data inputs, nor in
NON_RESULT_KEYS.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import Config
from .errors import ConfigError, StepSelectionError

M0 = "M0"  # the external initial weights (PIPELINE.WEIGHTS, or a seeded random init when empty)
TRAIN_DATA = "data:train"  # the content of PIPELINE.TRAIN_IMDB
TEST_DATA = "data:test"  # the content of PIPELINE.TEST_IMDB
# The config keys a data input stands for: its digest covers what they select (ids, annotations, images, classes).
DATA_INPUTS: dict[str, tuple[str, ...]] = {
    TRAIN_DATA: ("PIPELINE.TRAIN_IMDB", "PIPELINE.DATA_ROOT", "PIPELINE.CLASSES"),
    TEST_DATA: ("PIPELINE.TEST_IMDB", "PIPELINE.DATA_ROOT", "PIPELINE.CLASSES"),
}
EXTERNAL_INPUTS = (M0, TRAIN_DATA, TEST_DATA)

# Keys a body may read that cannot change what it computes, so they stay out of every fingerprint.
NON_RESULT_KEYS: dict[str, str] = {
    "PIPELINE.LOG_EVERY": "how often the loop logs",
    "PIPELINE.WORKERS": "loader processes; batches are a function of RNG_SEED and the batch number",
    "PIPELINE.ISOLATE_STEPS": "where the body runs, not what it computes",
    "PIPELINE.OUTPUT_ROOT": "where outputs go",
    "EXP_DIR": "where outputs go",
    "PIPELINE.WEIGHTS": "stood for by M0's sha256",
    "PIPELINE.PRETRAIN_ITERS": "stood for by M0's sha256 (the budget of a built M0)",
    "PIPELINE.PRETRAIN_SCENES": "stood for by M0's sha256 (the budget of a built M0)",
    "PIPELINE.DEVICE": "the resolved device; a resumed or re-run step on another device is not re-fingerprinted",
    "PIPELINE.DETERMINISTIC": "CUDA algorithm choice; no effect on the CPU",
    "PIPELINE.RUN_CACHE_VERSIONS": "how many old versions are kept",
    "TRAIN.SNAPSHOT_ITERS": "a resumed run is bit-identical whatever the interval",
    "ROOT_DIR": "the project folder, used to resolve relative paths",
    "DATA_DIR": "the default data root; stood for by the data inputs",
    **{f"PIPELINE.STAGE{k}_SNAPSHOT_ITERS": "a resumed run is bit-identical whatever the interval"
       for k in range(1, 5)},
    "PIPELINE.E2E_SNAPSHOT_ITERS": "a resumed run is bit-identical whatever the interval",
}

_MODEL = ("PIPELINE.NET", "PIPELINE.CLASSES", "PIPELINE.ANCHOR_SCALES", "PIPELINE.ANCHOR_RATIOS", "PIPELINE.AMP",
          "RNG_SEED")
_TRAIN_DATA = ("TRAIN.SCALES", "TRAIN.MAX_SIZE", "TRAIN.USE_FLIPPED", "TRAIN.ASPECT_GROUPING", "PIXEL_MEANS",
               "RNG_SEED")
_RPN_TRAIN = ("TRAIN.RPN_POSITIVE_OVERLAP", "TRAIN.RPN_NEGATIVE_OVERLAP", "TRAIN.RPN_CLOBBER_POSITIVES",
              "TRAIN.RPN_FG_FRACTION", "TRAIN.RPN_BATCHSIZE", "TRAIN.RPN_BBOX_INSIDE_WEIGHTS",
              "TRAIN.RPN_POSITIVE_WEIGHT")
_FRCN_TRAIN = ("TRAIN.BATCH_SIZE", "TRAIN.FG_FRACTION", "TRAIN.FG_THRESH", "TRAIN.BG_THRESH_HI",
               "TRAIN.BG_THRESH_LO", "TRAIN.BBOX_THRESH", "TRAIN.BBOX_NORMALIZE_TARGETS",
               "TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED", "TRAIN.BBOX_NORMALIZE_MEANS",
               "TRAIN.BBOX_NORMALIZE_STDS", "TRAIN.BBOX_INSIDE_WEIGHTS")
_SOLVER = ("PIPELINE.GAMMA", "PIPELINE.MOMENTUM", "PIPELINE.WEIGHT_DECAY", "PIPELINE.ITER_SIZE")
_PROPOSALS = ("TEST.SCALES", "TEST.MAX_SIZE", "PIXEL_MEANS", "TEST.RPN_NMS_THRESH", "TEST.RPN_MIN_SIZE")
_EVAL = ("TEST.SCALES", "TEST.MAX_SIZE", "PIXEL_MEANS", "TEST.NMS", "TEST.BBOX_REG",
         "TEST.SVM", "TEST.HAS_RPN", "TEST.RPN_NMS_THRESH", "TEST.RPN_PRE_NMS_TOP_N", "TEST.RPN_POST_NMS_TOP_N",
         "TEST.RPN_MIN_SIZE", "PIPELINE.MAX_PER_IMAGE", "PIPELINE.DET_THRESH")


# end2end's e2e step: the proposal layer in the training net (TRAIN.RPN_*), the proposal-target layer (TRAIN RoI
# sampling, targets normalised with the fixed TRAIN.BBOX_NORMALIZE_MEANS/STDS), its own solver PIPELINE.E2E_*.
_E2E_TRAIN = ("TRAIN.RPN_PRE_NMS_TOP_N", "TRAIN.RPN_POST_NMS_TOP_N", "TRAIN.RPN_NMS_THRESH", "TRAIN.RPN_MIN_SIZE",
              "TRAIN.BATCH_SIZE", "TRAIN.FG_FRACTION", "TRAIN.FG_THRESH", "TRAIN.BG_THRESH_HI", "TRAIN.BG_THRESH_LO",
              "TRAIN.BBOX_NORMALIZE_TARGETS", "TRAIN.BBOX_NORMALIZE_MEANS", "TRAIN.BBOX_NORMALIZE_STDS",
              "TRAIN.BBOX_INSIDE_WEIGHTS")
_E2E_SOLVER = ("PIPELINE.E2E_ITERS", "PIPELINE.E2E_LR", "PIPELINE.E2E_STEPSIZE")


def _stage_solver(k: int) -> tuple[str, ...]:
    return (f"PIPELINE.STAGE{k}_ITERS", f"PIPELINE.STAGE{k}_LR", f"PIPELINE.STAGE{k}_STEPSIZE") + _SOLVER


@dataclass(frozen=True)
class Step:
    """One step: `inputs` are upstream step ids and external inputs (M0, data:train, data:test), `reads` the
    config keys it depends on (a full dotted key, a section name, or a prefix ending in '*'), `stage` the training
    stage whose PIPELINE.STAGEk_* solver it uses (0: none; "E2E": PIPELINE.E2E_*), `version` the version of this
    declaration (bump it when the inputs' meaning changes; a change to what the body computes bumps the body's
    version in stages/steps.py instead)."""
    id: str
    inputs: tuple[str, ...]
    reads: tuple[str, ...]
    stage: int | str = 0
    version: str = "1"

    @property
    def upstream(self) -> tuple[str, ...]:
        """The inputs that are steps (external inputs left out)."""
        return tuple(i for i in self.inputs if i not in EXTERNAL_INPUTS)

    def allowed_reads(self) -> tuple[str, ...]:
        """Key specs the body may read: its `reads`, the keys its data inputs stand for, NON_RESULT_KEYS."""
        covered = tuple(k for i in self.inputs for k in DATA_INPUTS.get(i, ()))
        return self.reads + covered + tuple(NON_RESULT_KEYS)


class Graph:
    """The steps of one PIPELINE.MODE, in run order, with the selection logic of `run`."""

    def __init__(self, mode: str, steps: tuple[Step, ...]):
        self.mode = mode
        self.steps: dict[str, Step] = {s.id: s for s in steps}
        self.order: tuple[str, ...] = tuple(self.steps)
        for step in steps:
            unknown = [i for i in step.upstream if i not in self.steps or self.order.index(i) >= self.order.index(step.id)]
            if unknown:
                raise ValueError(f"graph {mode}: step {step.id} has inputs {unknown} that are not earlier steps")

    def get_step(self, step_id: str) -> Step:
        """The step called `step_id`, or StepSelectionError naming the nearest step id."""
        if step_id not in self.steps:
            close = difflib.get_close_matches(step_id, self.order, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise StepSelectionError(f"unknown step {step_id!r}{hint}; the steps of PIPELINE.MODE {self.mode} are "
                                     f"{', '.join(self.order)}")
        return self.steps[step_id]

    def upstream_steps(self, step_id: str) -> list[str]:
        """Step ids `step_id` depends on, directly or not, in run order."""
        found: set[str] = set()
        stack = list(self.get_step(step_id).upstream)
        while stack:
            current = stack.pop()
            if current not in found:
                found.add(current)
                stack.extend(self.steps[current].upstream)
        return [s for s in self.order if s in found]

    def downstream_steps(self, step_id: str) -> list[str]:
        """Step ids that depend on `step_id`, directly or not, in run order."""
        self.get_step(step_id)
        return [s for s in self.order if step_id in self.upstream_steps(s)]

    def select(self, until: str | None = None, from_: str | None = None, only: str | None = None,
               force: str | None = None, is_done: Callable[[str], str | None] = lambda s: None) -> "Selection":
        """The steps `run` walks through, from the --until/--from/--only/--force options.

        until: stop after this step (default: the last). from_: start here and re-run it and everything after it
        up to `until`; its upstream steps must be done. only: just this step; its upstream steps must be done.
        force: re-run this step even if done (downstream re-runs only where its new outputs' digests differ).
        `is_done(step)` returns None when done, else the reason it is not (used to check inputs).
        """
        for name in (until, from_, only, force):
            if name is not None:
                self.get_step(name)
        if only is not None and (until is not None or from_ is not None):
            raise StepSelectionError("--only cannot be combined with --until or --from")
        last = self.order.index(until) if until is not None else len(self.order) - 1
        if only is not None:
            steps: tuple[str, ...] = (only,)
        else:
            start = self.order.index(from_) if from_ is not None else 0
            if start > last:
                raise StepSelectionError(f"--from {from_} comes after --until {until}")
            steps = self.order[start:last + 1]
        if force is not None and force not in steps:
            raise StepSelectionError(f"--force {force} is not among the selected steps ({', '.join(steps)})")
        option = "--only" if only is not None else "--from"
        for upstream in self.get_step(steps[0]).upstream:
            reason = is_done(upstream)
            if reason is not None:
                raise StepSelectionError(f"{option} {steps[0]}: its input {upstream} is not done ({reason}); "
                                         f"run up to {upstream} first, e.g. `run --until {upstream}`")
        forced = set(steps) if from_ is not None else set()
        if force is not None:
            forced.add(force)
        return Selection(steps=tuple(steps), forced=frozenset(forced))


ALT_OPT = Graph("alt_opt", (
    Step("stage1", (M0, TRAIN_DATA), _MODEL + _TRAIN_DATA + _RPN_TRAIN + _stage_solver(1), stage=1),
    Step("p1", ("stage1", TRAIN_DATA), _MODEL + _PROPOSALS),
    Step("stage2", ("p1", M0, TRAIN_DATA), _MODEL + _TRAIN_DATA + _FRCN_TRAIN + _stage_solver(2), stage=2),
    Step("stage3", ("stage2", TRAIN_DATA), _MODEL + _TRAIN_DATA + _RPN_TRAIN + _stage_solver(3), stage=3),
    Step("p2", ("stage3", TRAIN_DATA), _MODEL + _PROPOSALS),
    Step("stage4", ("stage3", "p2", TRAIN_DATA), _MODEL + _TRAIN_DATA + _FRCN_TRAIN + _stage_solver(4), stage=4),
    Step("eval", ("stage4", TEST_DATA), _MODEL + _EVAL),
))

END2END = Graph("end2end", (
    Step("e2e", (M0, TRAIN_DATA), _MODEL + _TRAIN_DATA + _RPN_TRAIN + _E2E_TRAIN + _E2E_SOLVER + _SOLVER,
         stage="E2E"),
    Step("eval", ("e2e", TEST_DATA), _MODEL + _EVAL),
))

GRAPHS: dict[str, Graph] = {ALT_OPT.mode: ALT_OPT, END2END.mode: END2END}


def graph_for(config: Config) -> Graph:
    """The graph of the config's PIPELINE.MODE."""
    mode = config.get("PIPELINE.MODE")
    if mode not in GRAPHS:
        raise ConfigError(f"config key PIPELINE.MODE must be one of {', '.join(GRAPHS)}, got {mode!r}")
    return GRAPHS[mode]


def all_step_ids() -> tuple[str, ...]:
    """Every step id of every mode, each once, in the order of first appearance (for the CLI's choices)."""
    seen: dict[str, None] = {}
    for graph in GRAPHS.values():
        seen.update(dict.fromkeys(graph.order))
    return tuple(seen)


# The alt_opt graph's names, kept for callers that only know 4-step alternating training.
STEPS = ALT_OPT.steps
STEP_ORDER = ALT_OPT.order
get_step = ALT_OPT.get_step
upstream_steps = ALT_OPT.upstream_steps
downstream_steps = ALT_OPT.downstream_steps
select_steps = ALT_OPT.select


def _matches(spec: str, key: str) -> bool:
    if spec.endswith("*"):
        return key.startswith(spec[:-1])
    return key == spec or key.startswith(spec + ".")


def undeclared_reads(step: Step, read: set[str] | frozenset[str]) -> list[str]:
    """The keys in `read` (dotted leaf keys a body touched) that `step` may not read (see Step.allowed_reads)."""
    allowed = step.allowed_reads()
    return sorted(k for k in read if not any(_matches(spec, k) for spec in allowed))


def keys_read(step: Step, config: Config) -> dict[str, Any]:
    """{dotted key: value} of the config keys `step` reads; a spec that matches nothing is a programming error."""
    flat = config.flat()
    values: dict[str, Any] = {}
    for spec in step.reads:
        matched = {k: v for k, v in flat.items() if _matches(spec, k)}
        if not matched:
            raise KeyError(f"step {step.id} reads config key {spec}, which does not exist")
        values.update(matched)
    return {k: _canonical(v) for k, v in sorted(values.items())}


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    return value


def fingerprint_parts(step: Step, config: Config, input_digests: Mapping[str, str],
                      extra: Any = None) -> dict[str, Any]:
    """What a fingerprint hashes, kept in the manifest so a stale reason can name the changed key or input."""
    missing = [i for i in step.inputs if i not in input_digests]
    if missing:
        raise KeyError(f"fingerprint of {step.id}: no digest for input(s) {', '.join(missing)}")
    return {"step": step.id, "version": step.version, "keys": keys_read(step, config),
            "inputs": {i: input_digests[i] for i in step.inputs}, "extra": _canonical(extra)}


def hash_parts(parts: Mapping[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(blob.encode("ascii")).hexdigest()


def fingerprint(step: Step | str, config: Config, input_digests: Mapping[str, str], extra: Any = None) -> str:
    """sha256 over a canonical JSON of (step id, code version, the read keys' values, inputs' digests, extra)."""
    step = graph_for(config).get_step(step) if isinstance(step, str) else step
    return hash_parts(fingerprint_parts(step, config, input_digests, extra))


@dataclass(frozen=True)
class Selection:
    """The steps `run` walks through, in order, and those it must run even when they look done."""
    steps: tuple[str, ...]
    forced: frozenset[str]
