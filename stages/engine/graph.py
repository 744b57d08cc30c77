"""The step graph of 4-step alternating training: steps, their inputs, the config keys each reads, fingerprints,
and the --until/--from/--only/--force selection.

    stage1 (M1) -> p1 (P1) -> stage2 (M2, from M0) -> stage3 (M3) -> p2 (P2) -> stage4 (M4, from M3 + P2) -> eval

A step's fingerprint is the sha256 of a canonical JSON of (step id, code version, the values of only the keys it
reads, the digests of the artefacts it consumes, extra). Changing TEST.NMS therefore re-runs eval only; changing
PIPELINE.STAGE2_ITERS re-runs stage2 and, through its outputs' digest, everything after it.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import Config
from .errors import StepSelectionError

M0 = "M0"  # the external initial weights (PIPELINE.WEIGHTS, or a seeded random init when empty)

_MODEL = ("PIPELINE.NET", "PIPELINE.CLASSES", "PIPELINE.ANCHOR_SCALES", "PIPELINE.ANCHOR_RATIOS", "PIPELINE.AMP")
_TRAIN_DATA = ("PIPELINE.TRAIN_IMDB", "TRAIN.SCALES", "TRAIN.MAX_SIZE", "TRAIN.USE_FLIPPED",
               "TRAIN.ASPECT_GROUPING", "PIXEL_MEANS", "RNG_SEED")
_RPN_TRAIN = ("TRAIN.RPN_POSITIVE_OVERLAP", "TRAIN.RPN_NEGATIVE_OVERLAP", "TRAIN.RPN_CLOBBER_POSITIVES",
              "TRAIN.RPN_FG_FRACTION", "TRAIN.RPN_BATCHSIZE", "TRAIN.RPN_BBOX_INSIDE_WEIGHTS",
              "TRAIN.RPN_POSITIVE_WEIGHT")
_FRCN_TRAIN = ("TRAIN.BATCH_SIZE", "TRAIN.FG_FRACTION", "TRAIN.FG_THRESH", "TRAIN.BG_THRESH_HI",
               "TRAIN.BG_THRESH_LO", "TRAIN.BBOX_THRESH", "TRAIN.BBOX_NORMALIZE_TARGETS",
               "TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED", "TRAIN.BBOX_NORMALIZE_MEANS",
               "TRAIN.BBOX_NORMALIZE_STDS", "TRAIN.BBOX_INSIDE_WEIGHTS")
_SOLVER = ("PIPELINE.GAMMA", "PIPELINE.MOMENTUM", "PIPELINE.WEIGHT_DECAY", "PIPELINE.ITER_SIZE")
_PROPOSALS = ("PIPELINE.TRAIN_IMDB", "TEST.SCALES", "TEST.MAX_SIZE", "PIXEL_MEANS", "TEST.RPN_NMS_THRESH",
              "TEST.RPN_MIN_SIZE")
_EVAL = ("PIPELINE.TEST_IMDB", "TEST.SCALES", "TEST.MAX_SIZE", "PIXEL_MEANS", "TEST.NMS", "TEST.BBOX_REG",
         "TEST.SVM", "TEST.HAS_RPN", "TEST.RPN_NMS_THRESH", "TEST.RPN_PRE_NMS_TOP_N", "TEST.RPN_POST_NMS_TOP_N",
         "TEST.RPN_MIN_SIZE", "PIPELINE.MAX_PER_IMAGE", "PIPELINE.DET_THRESH")


def _stage_solver(k: int) -> tuple[str, ...]:
    # STAGEk_SNAPSHOT_ITERS is left out on purpose: a resumed run is bit-identical whatever the interval.
    return (f"PIPELINE.STAGE{k}_ITERS", f"PIPELINE.STAGE{k}_LR", f"PIPELINE.STAGE{k}_STEPSIZE") + _SOLVER


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: `inputs` are upstream step ids (or M0), `reads` the config keys it depends on
    (a full dotted key, a section name, or a prefix ending in '*'), `outputs` the files it leaves in its folder."""
    id: str
    kind: str  # "train" | "proposals" | "eval"
    inputs: tuple[str, ...]
    reads: tuple[str, ...]
    outputs: tuple[str, ...]
    description: str
    stage: int = 0  # training stage 1-4 for solver settings, 0 otherwise
    version: str = "1"


STEPS: dict[str, Step] = {s.id: s for s in (
    Step("stage1", "train", (M0,), _MODEL + _TRAIN_DATA + _RPN_TRAIN + _stage_solver(1), ("model.pt",),
         "train RPN (M1) from M0", stage=1),
    Step("p1", "proposals", ("stage1",), _MODEL + _PROPOSALS, ("proposals.pkl", "scores.pkl"),
         "dump proposals P1 with M1 over the training images"),
    Step("stage2", "train", ("p1", M0), _MODEL + _TRAIN_DATA + _FRCN_TRAIN + _stage_solver(2), ("model.pt",),
         "train Fast R-CNN (M2) from M0 on P1", stage=2),
    Step("stage3", "train", ("stage2",), _MODEL + _TRAIN_DATA + _RPN_TRAIN + _stage_solver(3), ("model.pt",),
         "fine-tune RPN (M3) from M2, shared conv frozen", stage=3),
    Step("p2", "proposals", ("stage3",), _MODEL + _PROPOSALS, ("proposals.pkl", "scores.pkl"),
         "dump proposals P2 with M3 over the training images"),
    Step("stage4", "train", ("stage3", "p2"), _MODEL + _TRAIN_DATA + _FRCN_TRAIN + _stage_solver(4),
         ("model.pt",), "fine-tune Fast R-CNN (M4) from M3 on P2, shared conv frozen", stage=4),
    Step("eval", "eval", ("stage4",), _MODEL + _EVAL, ("detections.pkl",),
         "detect on the test imdb with M4; per-class AP and mAP"),
)}
STEP_ORDER: tuple[str, ...] = tuple(STEPS)


def get_step(step_id: str) -> Step:
    """The step called `step_id`, or StepSelectionError naming the nearest step id."""
    if step_id not in STEPS:
        close = difflib.get_close_matches(step_id, STEP_ORDER, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise StepSelectionError(f"unknown step {step_id!r}{hint}; steps are {', '.join(STEP_ORDER)}")
    return STEPS[step_id]


def upstream_steps(step_id: str) -> list[str]:
    """Step ids `step_id` depends on, directly or not, in pipeline order (M0 excluded)."""
    found: set[str] = set()
    stack = [i for i in get_step(step_id).inputs if i != M0]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(i for i in STEPS[current].inputs if i != M0)
    return [s for s in STEP_ORDER if s in found]


def downstream_steps(step_id: str) -> list[str]:
    """Step ids that depend on `step_id`, directly or not, in pipeline order."""
    get_step(step_id)
    return [s for s in STEP_ORDER if step_id in upstream_steps(s)]


def _matches(spec: str, key: str) -> bool:
    if spec.endswith("*"):
        return key.startswith(spec[:-1])
    return key == spec or key.startswith(spec + ".")


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


def fingerprint_parts(step: Step | str, config: Config, input_digests: Mapping[str, str],
                      extra: Any = None) -> dict[str, Any]:
    """What a fingerprint hashes, kept in the manifest so a stale reason can name the changed key."""
    step = get_step(step) if isinstance(step, str) else step
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
    return hash_parts(fingerprint_parts(step, config, input_digests, extra))


@dataclass(frozen=True)
class Selection:
    """The steps `run` walks through, in order, and those it must run even when they look done."""
    steps: tuple[str, ...]
    forced: frozenset[str]


def select_steps(until: str | None = None, from_: str | None = None, only: str | None = None,
                 force: str | None = None, is_done: Callable[[str], str | None] = lambda s: None) -> Selection:
    """The steps `run` walks through, from the --until/--from/--only/--force options.

    until: stop after this step (default eval). from_: start here and re-run it and everything after it up to
    `until`; its upstream steps must be done. only: just this step; its upstream steps must be done. force: re-run
    this step even if done (downstream re-runs only where its new outputs' digests differ).
    `is_done(step)` returns None when done, else the reason it is not (used to check inputs).
    """
    for name in (until, from_, only, force):
        if name is not None:
            get_step(name)
    if only is not None and (until is not None or from_ is not None):
        raise StepSelectionError("--only cannot be combined with --until or --from")
    last = STEP_ORDER.index(until) if until is not None else len(STEP_ORDER) - 1
    if only is not None:
        steps = (only,)
        first = only
    else:
        start = STEP_ORDER.index(from_) if from_ is not None else 0
        if start > last:
            raise StepSelectionError(f"--from {from_} comes after --until {until}")
        steps = STEP_ORDER[start:last + 1]
        first = steps[0]
    if force is not None and force not in steps:
        raise StepSelectionError(f"--force {force} is not among the selected steps ({', '.join(steps)})")
    _require_inputs_done(first, "--only" if only is not None else "--from", is_done)
    forced = set(steps) if from_ is not None else set()
    if force is not None:
        forced.add(force)
    return Selection(steps=tuple(steps), forced=frozenset(forced))


def _require_inputs_done(step_id: str, option: str, is_done: Callable[[str], str | None]) -> None:
    for upstream in get_step(step_id).inputs:
        if upstream == M0:
            continue
        reason = is_done(upstream)
        if reason is not None:
            raise StepSelectionError(f"{option} {step_id}: its input {upstream} is not done ({reason}); "
                                     f"run up to {upstream} first, e.g. `run --until {upstream}`")
