"""The config schema: the type and valid range of every config key, and the YAML reader config files go through.

Every key of `config.default_dict()` has a `Spec` in `SCHEMA` (tests/test_config.py fails for a key without one).
`check(key, value)` converts a value read from a YAML file or a `--set` pair to the key's type (an int is accepted
for a float, a list for a tuple) and refuses, naming the key, anything outside the range: TRAIN.RPN_BATCHSIZE 0,
TRAIN.FG_THRESH 2, ANCHOR_RATIOS [0], a NaN, a nested list where a flat list is expected, a class name that is not
a plain file name. A key missing from SCHEMA falls back to the type of its default (and the test names it).

YAML: `load_yaml` refuses anchors and aliases outright (`&a` / `*a`, hence also `<<` merge keys), nesting deeper
than MAX_DEPTH and text longer than MAX_BYTES, all from the event stream before any node is built, so that no
config text (an alias bomb, 10,000 nested brackets) can take more than linear time and memory. py-faster-rcnn's
yml files use none of these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 20  # a config file or --set value longer than 1 MiB is refused unread
MAX_DEPTH = 8  # nesting of YAML collections (PIXEL_MEANS needs 4 with the top mapping)
MAX_ITEMS = 4096  # elements of a list key
INT_MAX = 2 ** 31 - 1
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, so that a 5,000-digit number gives a short message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}...({len(text)} chars)"


@dataclass(frozen=True)
class Spec:
    """kind: int, float, bool, str, name, reldir, choice, list or nested. lo/hi bound numbers (inclusive unless
    lo_open/hi_open); a list holds `elem` items, `min_len`..`max_len` of them (`tuple` when the default is one);
    `nested` is the exact shape of a nested list of floats (PIXEL_MEANS); `test`/`words` an extra predicate."""
    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    elem: "Spec | None" = None
    min_len: int = 0
    max_len: int = MAX_ITEMS
    tuple: bool = False
    nested: tuple[int, ...] = ()
    test: Callable[[Any], bool] | None = field(default=None, compare=False)
    words: str = ""

    def range_words(self) -> str:
        if self.words:
            return self.words
        def num(v: float) -> str:
            return str(v) if self.kind == "int" else f"{v:g}"
        hi_shown = self.hi is not None and not (self.kind == "int" and self.hi == INT_MAX)
        lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        hi = f"{'<' if self.hi_open else '<='} {num(self.hi)}" if hi_shown else None  # type: ignore[arg-type]
        if lo and hi:
            return (f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}"  # type: ignore[arg-type]
                    f"{')' if self.hi_open else ']'}")
        return lo or hi or "valid"


def Int(lo: int | None = None, hi: int | None = INT_MAX) -> Spec:
    return Spec("int", lo=lo, hi=hi)


def Float(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
          test: Callable[[Any], bool] | None = None, words: str = "") -> Spec:
    return Spec("float", lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, test=test, words=words)


def List(elem: Spec, min_len: int = 0, max_len: int = MAX_ITEMS, tuple: bool = False) -> Spec:
    return Spec("list", elem=elem, min_len=min_len, max_len=max_len, tuple=tuple)


BOOL, STR = Spec("bool"), Spec("str")
NAME = Spec("name")  # becomes a file or folder name: no separators, not '.'/'..', no NUL, at most 200 chars
RELDIR = Spec("reldir")  # a relative folder below a root: no '..', not absolute, not empty
UNIT = Float(0.0, 1.0)
POS_FLOAT = Float(0.0, 1e12, lo_open=True)
PIXELS = Int(1, 8192)  # an image side in pixels
FOUR = List(Float(-1e6, 1e6), 4, 4, tuple=True)


def Choice(*choices: str) -> Spec:
    return Spec("choice", choices=choices)


def _rpn_positive_weight(v: float) -> bool:  # py-faster-rcnn: < 0 means uniform, else it asserts 0 < w < 1
    return v < 0 or 0 < v < 1


_TRAIN = {
    "SCALES": List(PIXELS, 1, 64, tuple=True), "MAX_SIZE": PIXELS, "IMS_PER_BATCH": Int(1, 1024),
    "BATCH_SIZE": Int(1, 1 << 20), "FG_FRACTION": UNIT, "FG_THRESH": UNIT, "BG_THRESH_HI": UNIT,
    "BG_THRESH_LO": UNIT, "USE_FLIPPED": BOOL, "BBOX_REG": BOOL, "BBOX_THRESH": UNIT, "SNAPSHOT_ITERS": Int(1),
    "SNAPSHOT_INFIX": STR, "USE_PREFETCH": BOOL, "BBOX_NORMALIZE_TARGETS": BOOL, "BBOX_INSIDE_WEIGHTS": FOUR,
    "BBOX_NORMALIZE_TARGETS_PRECOMPUTED": BOOL, "BBOX_NORMALIZE_MEANS": FOUR,
    "BBOX_NORMALIZE_STDS": List(Float(0.0, 1e6, lo_open=True), 4, 4, tuple=True),
    "PROPOSAL_METHOD": Choice("selective_search", "rpn", "gt"), "ASPECT_GROUPING": BOOL, "HAS_RPN": BOOL,
    "RPN_POSITIVE_OVERLAP": UNIT, "RPN_NEGATIVE_OVERLAP": UNIT, "RPN_CLOBBER_POSITIVES": BOOL,
    "RPN_FG_FRACTION": UNIT, "RPN_BATCHSIZE": Int(1, 1 << 20), "RPN_NMS_THRESH": UNIT,
    "RPN_PRE_NMS_TOP_N": Int(0), "RPN_POST_NMS_TOP_N": Int(0), "RPN_MIN_SIZE": Int(0, 8192),
    "RPN_BBOX_INSIDE_WEIGHTS": FOUR,
    "RPN_POSITIVE_WEIGHT": Float(-1e6, 1.0, test=_rpn_positive_weight, words="< 0 (uniform) or in (0, 1)"),
}
_TEST = {
    "SCALES": List(PIXELS, 1, 64, tuple=True), "MAX_SIZE": PIXELS, "NMS": UNIT, "SVM": BOOL, "BBOX_REG": BOOL,
    "HAS_RPN": BOOL, "PROPOSAL_METHOD": Choice("selective_search", "rpn", "gt"), "RPN_NMS_THRESH": UNIT,
    "RPN_PRE_NMS_TOP_N": Int(0), "RPN_POST_NMS_TOP_N": Int(0), "RPN_MIN_SIZE": Int(0, 8192),
}
_PIPELINE = {
    "NET": Choice("tiny", "tiny_s8", "vgg16", "zf", "resnet50", "resnet101"), "WEIGHTS": STR, "TRAIN_IMDB": STR, "TEST_IMDB": STR,
    "CLASSES": List(NAME, 0, 10000), "DATA_ROOT": STR, "OUTPUT_ROOT": STR,
    **{f"STAGE{k}_ITERS": Int(1, 10 ** 9) for k in range(1, 5)},
    **{f"STAGE{k}_LR": Float(0.0, 100.0, lo_open=True) for k in range(1, 5)},
    **{f"STAGE{k}_STEPSIZE": Int(1) for k in range(1, 5)},
    **{f"STAGE{k}_SNAPSHOT_ITERS": Int(0) for k in range(1, 5)},
    "E2E_ITERS": Int(1, 10 ** 9), "E2E_LR": Float(0.0, 100.0, lo_open=True), "E2E_STEPSIZE": Int(1),
    "E2E_SNAPSHOT_ITERS": Int(0),
    "GAMMA": Float(0.0, 1e6, lo_open=True), "MOMENTUM": Float(0.0, 1.0, hi_open=True), "WEIGHT_DECAY": Float(0.0, 1.0),
    "ITER_SIZE": Int(1, 1 << 16), "DEVICE": Choice("auto", "cpu", "cuda"), "WORKERS": Int(0, 256),
    "ISOLATE_STEPS": BOOL, "AMP": Choice("off", "fp16", "bf16", "auto"), "DETERMINISTIC": BOOL,
    "ANCHOR_SCALES": List(Int(1, 4096), 1, 64),
    "ANCHOR_RATIOS": List(Float(0.0, 1e4, lo_open=True), 1, 64),
    "MAX_PER_IMAGE": Int(0, 1 << 20), "DET_THRESH": UNIT, "LOG_EVERY": Int(1), "MODE": Choice("alt_opt", "end2end"),
    "RUN_CACHE_VERSIONS": Int(0, 1000), "PRETRAIN_ITERS": Int(0, 10 ** 7), "PRETRAIN_SCENES": Int(0, 10 ** 6),
}
SCHEMA: dict[str, Spec] = {
    **{f"TRAIN.{k}": v for k, v in _TRAIN.items()},
    **{f"TEST.{k}": v for k, v in _TEST.items()},
    "DEDUP_BOXES": Float(0.0, 1.0), "PIXEL_MEANS": Spec("nested", lo=-1e4, hi=1e4, nested=(1, 1, 3)),
    "RNG_SEED": Int(0, 2 ** 32 - 1), "EPS": Float(0.0, 1.0, lo_open=True), "ROOT_DIR": STR, "DATA_DIR": STR,
    "MODELS_DIR": STR, "MATLAB": STR, "EXP_DIR": RELDIR, "USE_GPU_NMS": BOOL, "GPU_ID": Int(0, 1023),
    **{f"PIPELINE.{k}": v for k, v in _PIPELINE.items()},
}


def _type_name(value: Any) -> str:
    return type(value).__name__


def spec_for(key: str, default: Any) -> Spec:
    """SCHEMA[key], or a spec of the default's type for a key nobody described yet (tests catch those)."""
    if key in SCHEMA:
        return SCHEMA[key]
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, int):
        return Spec("int", lo=-INT_MAX, hi=INT_MAX)
    if isinstance(default, float):
        return Float(-1e300, 1e300)
    if isinstance(default, (list, tuple)):
        leaf = default[0] if default else ""
        return List(spec_for("", leaf), tuple=isinstance(default, tuple))
    return STR


def check(key: str, value: Any, default: Any = None) -> Any:
    """`value` converted to config key `key`'s type and checked against its range; ConfigError naming the key."""
    spec = spec_for(key, default)
    if key == "PIPELINE.AMP" and value is False:
        value = "off"  # YAML 1.1 reads an unquoted `off` as False
    if spec.kind == "list":
        if not isinstance(value, (list, tuple)):
            expected = "tuple" if spec.tuple else "list"
            raise ConfigError(f"config key {key} expects {expected}, got {_type_name(value)} {short(value)}")
        if not spec.min_len <= len(value) <= spec.max_len:
            want = (f"exactly {spec.min_len}" if spec.min_len == spec.max_len
                    else f"{spec.min_len} to {spec.max_len}" if spec.min_len else f"at most {spec.max_len}")
            raise ConfigError(f"config key {key} needs {want} elements, got {len(value)}")
        items = [_leaf(key, v, spec.elem, in_list=True) for v in value]  # type: ignore[arg-type]
        if spec.elem is NAME and len(set(items)) != len(items):
            dup = next(x for x in items if items.count(x) > 1)
            raise ConfigError(f"config key {key} names {dup!r} twice")
        return tuple(items) if spec.tuple else items
    if spec.kind == "nested":
        return _nested(key, value, spec)
    return _leaf(key, value, spec)


def _leaf(key: str, value: Any, spec: Spec, in_list: bool = False) -> Any:
    def wrong(expected: str) -> ConfigError:
        if in_list:
            return ConfigError(f"config key {key} expects a list of {expected}, got an element of type "
                               f"{_type_name(value)} {short(value)}")
        return ConfigError(f"config key {key} expects {expected}, got {_type_name(value)} {short(value)}")

    kind = spec.kind
    if kind in ("int", "float"):
        if kind == "int" and type(value) is not int:
            raise wrong("int")
        if kind == "float":
            if type(value) not in (int, float):
                raise wrong("float")
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"config key {key}: {short(value)} is too large") from None
        inside = not (isinstance(value, float) and not math.isfinite(value))
        if inside and spec.lo is not None:
            inside = value > spec.lo if spec.lo_open else value >= spec.lo
        if inside and spec.hi is not None:
            inside = value < spec.hi if spec.hi_open else value <= spec.hi
        if inside and spec.test is not None:
            inside = spec.test(value)
        if not inside:
            what = "elements" if in_list else ""
            raise ConfigError(f"config key {key} {what + ' ' if what else ''}must be {spec.range_words()}, "
                              f"got {short(value)}")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise wrong("bool")
        return value
    if type(value) is not str:
        raise wrong("str")
    if kind == "choice" and value not in spec.choices:
        raise ConfigError(f"config key {key} must be one of {', '.join(spec.choices)}, got {short(value)}")
    if "\x00" in value:
        raise ConfigError(f"config key {key} contains a NUL character")
    if kind == "name":
        check_name(f"config key {key}", value)
    if kind == "reldir":
        check_reldir(key, value)
    return value


def check_name(what: str, name: str) -> str:
    """`name` (a class name, split, image id) as one plain path component, or ConfigError naming `what`."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name or len(name) > 200
            or name != name.strip()):
        raise ConfigError(f"{what}: {short(name)} is not a plain name (it becomes a file name: no '/', '\\', "
                          "'..', surrounding spaces or NUL, 1 to 200 characters)")
    return name


def check_reldir(key: str, value: str) -> str:
    from pathlib import PurePosixPath
    parts = PurePosixPath(value).parts
    if not value or value.startswith(("/", "~")) or "\\" in value or ".." in parts or len(value) > 255:
        raise ConfigError(f"config key {key} must be a relative folder name, got {short(value)}")
    return value


def _nested(key: str, value: Any, spec: Spec) -> Any:
    def shape(v: Any) -> tuple[int, ...]:
        if isinstance(v, (list, tuple)):
            inner = {shape(x) for x in v}
            if len(inner) > 1:
                raise ConfigError(f"config key {key} is a ragged nested list")
            return (len(v), *(inner.pop() if inner else ()))
        return ()

    got = shape(value)
    if got != spec.nested:
        raise ConfigError(f"config key {key} expects a nested list of shape {list(spec.nested)}, got shape "
                          f"{list(got)}")
    leaf = Float(spec.lo, spec.hi)

    def conv(v: Any) -> Any:
        return [conv(x) for x in v] if isinstance(v, (list, tuple)) else _leaf(key, v, leaf, in_list=True)
    return conv(value)


def load_yaml(text: str, source: str) -> Any:
    """The YAML document in `text` (from `source`, for messages), refusing anchors/aliases, nesting deeper than
    MAX_DEPTH and more than MAX_BYTES, before any node is built; ConfigError naming the source and line."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: config text of {len(text)} characters is over the {MAX_BYTES} limit")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            line = f" line {event.start_mark.line + 1}" if event.start_mark is not None else ""
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(f"{source}{line}: YAML anchors and aliases (&name, *name, <<) are not allowed "
                                  "in config files; write the values out")
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{source}{line}: YAML nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
        return yaml.load(text, Loader=_Loader)
    except ConfigError:
        raise
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}{where}: invalid YAML: {short(problem, 120)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of more than 4,300 digits
        raise ConfigError(f"{source}: unreadable value ({short(str(err), 100)})") from None
