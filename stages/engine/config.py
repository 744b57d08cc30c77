"""The pipeline's config: py-faster-rcnn's cfg keys and defaults plus our PIPELINE section, loaded from YAML.

Precedence is defaults < YAML file < `--set KEY VALUE` pairs. Every key must already exist (an unknown key is an
error naming the nearest valid key) and values keep the default's type, with py-faster-rcnn's conversions: an int
is accepted for a float and a list for a tuple. There is no global cfg: `load_config` returns a fresh `Config`
that callers pass down explicitly.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

from .errors import ConfigError

ROOT_DIR = str(Path(__file__).resolve().parents[2])

_TRAIN_DEFAULTS: dict[str, Any] = {
    "SCALES": (600,), "MAX_SIZE": 1000, "IMS_PER_BATCH": 2, "BATCH_SIZE": 128, "FG_FRACTION": 0.25,
    "FG_THRESH": 0.5, "BG_THRESH_HI": 0.5, "BG_THRESH_LO": 0.1, "USE_FLIPPED": True, "BBOX_REG": True,
    "BBOX_THRESH": 0.5, "SNAPSHOT_ITERS": 10000, "SNAPSHOT_INFIX": "", "USE_PREFETCH": False,
    "BBOX_NORMALIZE_TARGETS": True, "BBOX_INSIDE_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
    "BBOX_NORMALIZE_TARGETS_PRECOMPUTED": False, "BBOX_NORMALIZE_MEANS": (0.0, 0.0, 0.0, 0.0),
    "BBOX_NORMALIZE_STDS": (0.1, 0.1, 0.2, 0.2), "PROPOSAL_METHOD": "selective_search", "ASPECT_GROUPING": True,
    "HAS_RPN": False, "RPN_POSITIVE_OVERLAP": 0.7, "RPN_NEGATIVE_OVERLAP": 0.3, "RPN_CLOBBER_POSITIVES": False,
    "RPN_FG_FRACTION": 0.5, "RPN_BATCHSIZE": 256, "RPN_NMS_THRESH": 0.7, "RPN_PRE_NMS_TOP_N": 12000,
    "RPN_POST_NMS_TOP_N": 2000, "RPN_MIN_SIZE": 16, "RPN_BBOX_INSIDE_WEIGHTS": (1.0, 1.0, 1.0, 1.0),
    "RPN_POSITIVE_WEIGHT": -1.0,
}

_TEST_DEFAULTS: dict[str, Any] = {
    "SCALES": (600,), "MAX_SIZE": 1000, "NMS": 0.3, "SVM": False, "BBOX_REG": True, "HAS_RPN": False,
    "PROPOSAL_METHOD": "selective_search", "RPN_NMS_THRESH": 0.7, "RPN_PRE_NMS_TOP_N": 6000,
    "RPN_POST_NMS_TOP_N": 300, "RPN_MIN_SIZE": 16,
}

# py-faster-rcnn's alt-opt solvers: RPN steps (1, 3) step at 60k, Fast R-CNN steps (2, 4) at 30k.
_STAGE_ITERS = {1: 80000, 2: 40000, 3: 80000, 4: 40000}
_STAGE_STEPSIZE = {1: 60000, 2: 30000, 3: 60000, 4: 30000}

_PIPELINE_DEFAULTS: dict[str, Any] = {
    "NET": "vgg16", "WEIGHTS": "", "TRAIN_IMDB": "voc_2007_trainval", "TEST_IMDB": "voc_2007_test",
    "CLASSES": [], "DATA_ROOT": "", "OUTPUT_ROOT": "",
    **{f"STAGE{k}_ITERS": _STAGE_ITERS[k] for k in range(1, 5)},
    **{f"STAGE{k}_LR": 0.001 for k in range(1, 5)},
    **{f"STAGE{k}_STEPSIZE": _STAGE_STEPSIZE[k] for k in range(1, 5)},
    **{f"STAGE{k}_SNAPSHOT_ITERS": 0 for k in range(1, 5)},
    "GAMMA": 0.1, "MOMENTUM": 0.9, "WEIGHT_DECAY": 0.0005, "ITER_SIZE": 1,
    "DEVICE": "auto", "WORKERS": 0, "ISOLATE_STEPS": False, "AMP": "off", "DETERMINISTIC": False,
    "ANCHOR_SCALES": [8, 16, 32], "ANCHOR_RATIOS": [0.5, 1.0, 2.0],
    "MAX_PER_IMAGE": 100, "DET_THRESH": 0.05, "LOG_EVERY": 1,
    "MODE": "alt_opt", "RUN_CACHE_VERSIONS": 2,
    # end2end (approximate joint training): py-faster-rcnn's VGG16 VOC07 solver (70k iterations, step at 50k).
    "E2E_ITERS": 70000, "E2E_LR": 0.001, "E2E_STEPSIZE": 50000, "E2E_SNAPSHOT_ITERS": 0,
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "PIPELINE.NET": ("tiny", "vgg16", "zf"),
    "PIPELINE.DEVICE": ("auto", "cpu", "cuda"),
    "PIPELINE.AMP": ("off", "fp16", "bf16", "auto"),
    "PIPELINE.MODE": ("alt_opt", "end2end"),
}
# Element types of list keys whose default is empty (the others take the type of the default's elements).
_ELEMENT_TYPES: dict[str, type] = {"PIPELINE.CLASSES": str}


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


_RANGES: dict[str, tuple[Any, str]] = {
    **{f"PIPELINE.STAGE{k}_ITERS": (_positive, "> 0") for k in range(1, 5)},
    **{f"PIPELINE.STAGE{k}_LR": (_positive, "> 0") for k in range(1, 5)},
    **{f"PIPELINE.STAGE{k}_STEPSIZE": (_positive, "> 0") for k in range(1, 5)},
    **{f"PIPELINE.STAGE{k}_SNAPSHOT_ITERS": (_non_negative, ">= 0") for k in range(1, 5)},
    **{f"PIPELINE.E2E_{k}": (_positive, "> 0") for k in ("ITERS", "LR", "STEPSIZE")},
    "PIPELINE.E2E_SNAPSHOT_ITERS": (_non_negative, ">= 0"),
    "TRAIN.SNAPSHOT_ITERS": (_positive, "> 0"),
    "PIPELINE.WORKERS": (_non_negative, ">= 0"),
    "PIPELINE.ITER_SIZE": (_positive, "> 0"),
    "PIPELINE.LOG_EVERY": (_positive, "> 0"),
    "PIPELINE.RUN_CACHE_VERSIONS": (_non_negative, ">= 0"),
    "EXP_DIR": (bool, "non-empty"),
}


def default_dict() -> dict[str, Any]:
    """py-faster-rcnn's `lib/fast_rcnn/config.py` defaults plus our PIPELINE section, as a fresh nested dict."""
    return {
        "TRAIN": dict(_TRAIN_DEFAULTS),
        "TEST": dict(_TEST_DEFAULTS),
        "DEDUP_BOXES": 1.0 / 16.0,
        "PIXEL_MEANS": [[[102.9801, 115.9465, 122.7717]]],
        "RNG_SEED": 3,
        "EPS": 1e-14,
        "ROOT_DIR": ROOT_DIR,
        "DATA_DIR": os.path.join(ROOT_DIR, "data"),
        "MODELS_DIR": os.path.join(ROOT_DIR, "models"),
        "MATLAB": "matlab",
        "EXP_DIR": "default",
        "USE_GPU_NMS": True,
        "GPU_ID": 0,
        "PIPELINE": copy.deepcopy(_PIPELINE_DEFAULTS),
    }


_READS: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("config_reads", default=None)


@contextlib.contextmanager
def recording_reads() -> Iterator[set[str]]:
    """Collect the dotted leaf keys read from any Config (`cfg.TRAIN.SCALES`, `cfg["TEST"]["NMS"]`,
    `cfg.get("TEST.NMS")`) inside the block: the runner checks them against the step's declared reads."""
    read: set[str] = set()
    token = _READS.set(read)
    try:
        yield read
    finally:
        _READS.reset(token)


class Config(dict):
    """A nested dict with attribute access (`cfg.TRAIN.SCALES`) and dotted look-up (`cfg.get("TEST.NMS")`)."""

    def __init__(self, data: dict[str, Any] | None = None, prefix: str = ""):
        super().__init__()
        object.__setattr__(self, "_prefix", prefix)
        for key, value in (data or {}).items():
            self[key] = Config(value, f"{prefix}{key}.") if isinstance(value, dict) else value

    def __getitem__(self, name: str) -> Any:
        value = dict.__getitem__(self, name)
        read = _READS.get()
        if read is not None and not isinstance(value, dict):
            read.add(f"{self.__dict__.get('_prefix', '')}{name}")
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"unknown config key {name}") from None

    def get(self, key: str, default: Any = ...) -> Any:  # type: ignore[override]
        """Value of a dotted key such as "PIPELINE.STAGE2_ITERS"; unknown keys raise unless a default is given."""
        node: Any = self
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                raise ConfigError(_unknown_key_message(key, self))
            node = dict.__getitem__(node, part)
        read = _READS.get()
        if read is not None and not isinstance(node, dict):
            read.add(f"{self.__dict__.get('_prefix', '')}{key}")
        return node

    def flat(self) -> dict[str, Any]:
        """All leaf keys by dotted name, e.g. {"TRAIN.SCALES": (600,), ...}."""
        return dict(_flatten(self))

    def to_plain(self) -> dict[str, Any]:
        """A plain nested dict with tuples turned into lists (for YAML and JSON)."""
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_plain(), sort_keys=True, default_flow_style=None, width=120)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(node: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def _unknown_key_message(key: str, reference: dict[str, Any]) -> str:
    names = [k for k, _ in _flatten(reference)]
    sections = {k.rsplit(".", 1)[0] for k in names if "." in k}
    close = difflib.get_close_matches(key, names + sorted(sections), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.upper(), names, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key {key}{hint}"


def _type_name(value: Any) -> str:
    return type(value).__name__


def coerce_value(key: str, value: Any, default: Any) -> Any:
    """`value` converted to the type of `default` for config key `key`, or ConfigError naming both types."""
    if key == "PIPELINE.AMP" and value is False:
        value = "off"  # YAML 1.1 reads an unquoted `off` as False
    if isinstance(default, bool) or isinstance(default, str):
        ok = type(value) is type(default)
    elif isinstance(default, int):
        ok = type(value) is int
    elif isinstance(default, float):
        ok = type(value) in (int, float)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        if ok:
            value = _coerce_sequence(key, value, default)
    else:
        ok = type(value) is type(default)
    if not ok:
        raise ConfigError(f"config key {key} expects {_type_name(default)}, got {_type_name(value)} {value!r}")
    _check_choice_and_range(key, value)
    return value


def _leaf_type(default: Any) -> type | None:
    while isinstance(default, (list, tuple)):
        if not default:
            return None
        default = default[0]
    return type(default)


def _coerce_sequence(key: str, value: Sequence[Any], default: Sequence[Any]) -> list[Any] | tuple[Any, ...]:
    leaf = _ELEMENT_TYPES.get(key) or _leaf_type(default)
    converted = [_coerce_leaf(key, v, leaf) for v in value]
    return tuple(converted) if isinstance(default, tuple) else converted


def _coerce_leaf(key: str, value: Any, leaf: type | None) -> Any:
    if isinstance(value, (list, tuple)):
        return [_coerce_leaf(key, v, leaf) for v in value]
    if leaf is None or type(value) is leaf:
        return value
    if leaf is float and type(value) is int:
        return float(value)
    raise ConfigError(f"config key {key} expects a list of {leaf.__name__}, got an element of type "
                      f"{_type_name(value)} {value!r}")


def _check_choice_and_range(key: str, value: Any) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"config key {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if key in _RANGES:
        check, words = _RANGES[key]
        if not check(value):
            raise ConfigError(f"config key {key} must be {words}, got {value!r}")


def merge_into(config: Config, updates: dict[str, Any], source: str) -> None:
    """Merge a nested dict of `updates` (from `source`, for messages) into `config`, checking keys and types."""
    _merge(config, updates, source, "", config)


def _merge(node: Config, updates: dict[str, Any], source: str, prefix: str, root: Config) -> None:
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str) or key not in node:
            raise ConfigError(f"{source}: {_unknown_key_message(str(name), root)}")
        current = dict.__getitem__(node, key)
        if isinstance(current, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key {name} is a section, got {_type_name(value)} {value!r}")
            _merge(current, value, source, name + ".", root)
            continue
        try:
            node[key] = coerce_value(name, value, current)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def _yaml_flow(raw: str) -> Any:
    """`[a, b]` as YAML reads it; the raw text when it is not YAML (coerce_value then names the key)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_value(config: Config, key: str, raw: str) -> None:
    """Apply one `--set KEY VALUE` pair: VALUE goes through ast.literal_eval, or stays a raw string for str keys.

    A list key also takes YAML flow syntax (`[ellipse, ring]`, unquoted names), as in the config files.
    """
    current = config.get(key, default=None)
    if current is None or isinstance(current, dict):
        if isinstance(current, dict):
            raise ConfigError(f"--set {key}: {key} is a section; name one of its keys")
        raise ConfigError(f"--set {key}: {_unknown_key_message(key, config)}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = _yaml_flow(raw) if isinstance(current, (list, tuple)) else raw
    if isinstance(current, str) and not isinstance(value, str):
        value = raw
    parent_key, _, leaf = key.rpartition(".")
    parent = config.get(parent_key) if parent_key else config
    try:
        parent[leaf] = coerce_value(key, value, current)
    except ConfigError as err:
        raise ConfigError(f"--set {key} {raw}: {err}") from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML file ({} for an empty file); errors name the file (and line for syntax errors)."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot read: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys, got {_type_name(data)}")
    return data


def load_config(path: str | os.PathLike[str] | None = None,
                overrides: Sequence[tuple[str, str]] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then the `--set` pairs `overrides`, in that order."""
    config = Config(default_dict())
    data = read_yaml(path) if path is not None else {}
    if path is not None:
        merge_into(config, data, source=str(path))
    for key, raw in overrides:
        set_value(config, key, raw)
    explicit_mode = isinstance(data.get("PIPELINE"), dict) and "MODE" in data["PIPELINE"]
    if not explicit_mode and not any(key == "PIPELINE.MODE" for key, _ in overrides):
        config["PIPELINE"]["MODE"] = implied_mode(config)
    if config.get("PIPELINE.AMP") == "auto":
        config["PIPELINE"]["AMP"] = "bf16" if native_bf16(config.get("PIPELINE.DEVICE")) else "off"
    return config


def implied_mode(config: Config) -> str:
    """PIPELINE.MODE when neither the YAML file nor a --set names it: 'end2end' when TRAIN.HAS_RPN is True (only
    py-faster-rcnn's faster_rcnn_end2end.yml sets it: alt-opt's stages override HAS_RPN per stage), else 'alt_opt'."""
    return "end2end" if dict.__getitem__(config["TRAIN"], "HAS_RPN") else "alt_opt"


def native_bf16(device: str) -> bool:
    """Whether PIPELINE.DEVICE (auto, cpu, cuda) computes bfloat16 natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated and slower than float32). PIPELINE.AMP 'auto' becomes 'bf16'
    there and 'off' elsewhere, when the config is loaded, so fingerprints and config.yml hold the resolved value."""
    import torch
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)


def dump_config(config: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    from .artifacts import atomic_write_text
    atomic_write_text(path, config.to_yaml())


def resolve_path(config: Config, key: str, empty_default: str = "") -> Path:
    """An absolute path for a path key; '' means `empty_default`; a relative path is taken from ROOT_DIR (the
    project folder, as py-faster-rcnn does), so the command works the same from any working directory."""
    value = config.get(key) or empty_default
    path = Path(value).expanduser()
    return (path if path.is_absolute() else Path(config.get("ROOT_DIR")) / path).resolve()


def data_root(config: Config) -> Path:
    """PIPELINE.DATA_ROOT, or DATA_DIR (py-faster-rcnn's `<root>/data`) when empty."""
    return resolve_path(config, "PIPELINE.DATA_ROOT", config.get("DATA_DIR"))


def experiment_dir(config: Config) -> Path:
    """output/<EXP_DIR>: PIPELINE.OUTPUT_ROOT (default `<root>/output`) joined with EXP_DIR."""
    root = resolve_path(config, "PIPELINE.OUTPUT_ROOT", os.path.join(config.get("ROOT_DIR"), "output"))
    exp = Path(config.get("EXP_DIR"))
    if exp.is_absolute() or ".." in exp.parts:
        raise ConfigError(f"config key EXP_DIR must be a relative folder name, got {str(exp)!r}")
    return root / exp


@dataclass(frozen=True)
class SolverSettings:
    """One training step's solver: py-faster-rcnn's step LR policy, momentum SGD and snapshot interval."""
    iters: int
    lr: float
    stepsize: int
    gamma: float
    momentum: float
    weight_decay: float
    snapshot_iters: int
    iter_size: int = 1
    amp: str = "off"


def solver_settings(config: Config, stage: int | str) -> SolverSettings:
    """The solver of training stage 1-4 (alt_opt's stage1..stage4: PIPELINE.STAGEk_*) or "E2E" (end2end's e2e step:
    PIPELINE.E2E_*); snapshot 0 means TRAIN.SNAPSHOT_ITERS."""
    if stage in (1, 2, 3, 4):
        prefix = f"STAGE{stage}"
    elif stage == "E2E":
        prefix = "E2E"
    else:
        raise ConfigError(f"training stage must be 1, 2, 3, 4 or 'E2E', got {stage!r}")
    p = config.PIPELINE
    snapshot = p[f"{prefix}_SNAPSHOT_ITERS"] or config.TRAIN.SNAPSHOT_ITERS
    return SolverSettings(iters=p[f"{prefix}_ITERS"], lr=p[f"{prefix}_LR"],
                          stepsize=p[f"{prefix}_STEPSIZE"], gamma=p.GAMMA, momentum=p.MOMENTUM,
                          weight_decay=p.WEIGHT_DECAY, snapshot_iters=snapshot, iter_size=p.ITER_SIZE, amp=p.AMP)
