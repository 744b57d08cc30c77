"""Lazy JIT build of the C++ (and, with a CUDA device, CUDA) extensions, with a fallback to the reference.

Nothing is compiled at ``import kernels``: :func:`backend` builds on the first op call with
``torch.utils.cpp_extension.load`` (cached under ``TORCH_EXTENSIONS_DIR``) and logs how long it took.
``FRCNN_KERNELS=reference`` selects the pure-torch reference; so does a failed build (no C++ compiler),
with a one-time warning.

Two guards around torch's build cache:
- the extension's name carries a hash of its sources (and the torch version), so two checkouts with different
  kernel sources sharing one TORCH_EXTENSIONS_DIR never rebuild over each other, and a build is only ever loaded
  for the sources it was built from;
- torch marks a build in progress with a plain ``lock`` file that a killed build leaves behind, after which every
  later load waits for ever. Builds here hold an ``fcntl`` lock (released by the kernel when its holder dies)
  around torch's, so a ``lock`` file found while holding it is stale and is removed.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["backend", "cpu_extension", "cuda_extension", "CSRC", "CPU_SOURCES", "CUDA_SOURCES", "build_seconds"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ["nms_cpu.cpp", "roi_pool_cpu.cpp", "roi_align_cpu.cpp", "binding_cpu.cpp"]
CUDA_SOURCES = ["nms_cuda.cu", "roi_pool_cuda.cu", "roi_align_cuda.cu", "binding_cuda.cpp"]
# Portable flags: the build cache may move between machines, so no -march=native; no fast-math, and no FMA
# contraction, so the float results match the reference's separately rounded torch ops.
CFLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]  # torch picks the -std it needs

_lock = threading.Lock()
_cache: dict[str, ModuleType | None] = {}
_resolved: dict[str, tuple] = {}  # kind -> (_cache, CSRC, module), see _extension
build_seconds: dict[str, float] = {}
_warned = False


def _build_root() -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory("", verbose=False))


def _load(name: str, sources: list[str], cuda: bool) -> ModuleType:
    from torch.utils import cpp_extension

    t0 = time.perf_counter()
    root = _build_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.flock", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # held until the build or load is over; released if we die
        stale = root / name / "lock"
        if stale.exists():
            log.warning("kernels: removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        mod = _cpp_load(cpp_extension, name, sources, cuda)
    build_seconds[name] = time.perf_counter() - t0
    # A cached load takes milliseconds; anything slow was a compile, which the user should see once.
    level = logging.WARNING if build_seconds[name] > 2.0 else logging.DEBUG
    log.log(level, "kernels: built the %s extension in %.1f s (one-time; cached under %s)", name,
            build_seconds[name], os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default torch_extensions dir"))
    return mod


def _cpp_load(cpp_extension, name: str, sources: list[str], cuda: bool) -> ModuleType:
    return cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=CFLAGS,
        extra_cuda_cflags=["-O3", "--fmad=false"] if cuda else None,
        extra_ldflags=None,
        with_cuda=cuda,
        verbose=False,
    )


def _get(name: str, sources: list[str], cuda: bool) -> ModuleType | None:
    global _warned
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = _load(name, sources, cuda)
            except Exception as exc:  # no compiler, failed compile: fall back to the reference
                _cache[name] = None
                if not _warned:
                    _warned = True
                    warnings.warn(f"kernels: building the {name} extension failed ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); "
                                  f"using the slow pure-torch reference kernels", RuntimeWarning, stacklevel=3)
        return _cache[name]


def _name(kind: str) -> str:
    # The torch version and the sources are part of the name: a build cached for one torch or one version of the
    # sources must never load into another.
    version = "".join(ch if ch.isalnum() else "_" for ch in torch.__version__)
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    h = hashlib.sha256()
    for source in sorted(set(sources) | {p.name for p in CSRC.glob("*.h")}):
        h.update(source.encode() + b"\0" + (CSRC / source).read_bytes())
    return f"frcnn_kernels_{kind}_torch{version}_{h.hexdigest()[:10]}"


def _extension(kind: str, sources: list[str], cuda: bool) -> ModuleType | None:
    """The module of `kind` this process resolved (built or loaded) first. Naming it hashes every source file, a
    millisecond that every op call (several per image at inference) used to pay; the answer is kept per process,
    for as long as `_cache` and `CSRC` are the ones it was resolved with (tests swap them)."""
    hit = _resolved.get(kind)
    if hit is not None and hit[0] is _cache and hit[1] == CSRC:
        return hit[2]
    mod = _get(_name(kind), sources, cuda)
    _resolved[kind] = (_cache, CSRC, mod)
    return mod


def cpu_extension() -> ModuleType | None:
    """The C++ CPU extension module, built on first call; None when it cannot be built."""
    return _extension("cpu", CPU_SOURCES, cuda=False)


def cuda_extension() -> ModuleType | None:
    """The CUDA extension module (only with a CUDA device), built on first call; None when unavailable."""
    if not torch.cuda.is_available():
        return None
    return _extension("cuda", CUDA_SOURCES, cuda=True)


def backend(device: torch.device) -> ModuleType | None:
    """The compiled module for ``device``, or None to use :mod:`kernels.reference`."""
    choice = os.environ.get("FRCNN_KERNELS", "").strip().lower()
    if choice == "reference":
        return None
    if choice not in ("", "auto", "compiled"):
        raise ValueError(f"FRCNN_KERNELS must be 'reference' or unset, got {choice!r}")
    if device.type == "cuda":
        return cuda_extension()
    if device.type == "cpu":
        return cpu_extension()
    return None
