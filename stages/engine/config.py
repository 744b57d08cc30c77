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
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import yaml

from . import schema
from .errors import ConfigError

_MAX_SET_CHARS = 65536

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
    # the budget of a built M0 (PIPELINE.WEIGHTS 'pretrain:<recipe>', stages/pretrain.py); 0: the recipe's own.
    "PRETRAIN_ITERS": 0, "PRETRAIN_SCENES": 0,
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
    """The message for an unknown `key`, naming the nearest existing leaf key (never a section, always one)."""
    names = [k for k, _ in _flatten(reference)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if not close:   # case-insensitive, and the best there is however far (`FOO: 1` still gets a key)
        by_upper = {n.upper(): n for n in names}
        close = [by_upper[m] for m in difflib.get_close_matches(key.upper(), list(by_upper), n=1, cutoff=0.0)]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key {key}{hint}"


def _type_name(value: Any) -> str:
    return type(value).__name__


def coerce_value(key: str, value: Any, default: Any) -> Any:
    """`value` converted to config key `key`'s type and checked against its range (see schema.SCHEMA), or
    ConfigError naming the key."""
    return schema.check(key, value, default)


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


def set_value(config: Config, key: str, raw: str) -> None:
    """Apply one `--set KEY VALUE` pair: VALUE goes through ast.literal_eval, or stays a raw string for str keys.

    A list key also takes YAML flow syntax (`[ellipse, ring]`, unquoted names), as in the config files, read by
    schema.load_yaml (no aliases, bounded nesting).
    """
    current = config.get(key, default=None)
    if current is None or isinstance(current, dict):
        if isinstance(current, dict):
            raise ConfigError(f"--set {key}: {key} is a section; name one of its keys")
        raise ConfigError(f"--set {key}: {_unknown_key_message(key, config)}")
    shown = raw if len(raw) <= 80 else f"{raw[:60]}...({len(raw)} chars)"
    if len(raw) > _MAX_SET_CHARS:
        raise ConfigError(f"--set {key}: value of {len(raw)} characters is over the {_MAX_SET_CHARS} limit")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = schema.load_yaml(raw, f"--set {key}") if isinstance(current, (list, tuple)) else raw
    if isinstance(current, str) and not isinstance(value, str):
        value = raw
    parent_key, _, leaf = key.rpartition(".")
    parent = config.get(parent_key) if parent_key else config
    try:
        parent[leaf] = coerce_value(key, value, current)
    except ConfigError as err:
        raise ConfigError(f"--set {key} {shown}: {err}") from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML file ({} for an empty file); errors name the file (and line for syntax errors).

    Only a regular file is opened (a FIFO would block), at most schema.MAX_BYTES of it, through schema.load_yaml.
    """
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"config file {path}: is {describe_file_type(info.st_mode)}, not a regular file")
        if info.st_size > schema.MAX_BYTES:
            raise ConfigError(f"config file {path}: {info.st_size} bytes is over the {schema.MAX_BYTES} limit")
        with open(path, "r", encoding="utf-8") as handle:
            text = handle.read(schema.MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot read: {err}") from None
    data = schema.load_yaml(text, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys, got {_type_name(data)}")
    return data


def describe_file_type(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', 'a character device', ... for a stat mode that is not a file."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return words
    return "not a regular file"


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
