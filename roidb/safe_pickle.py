"""Restricted unpickling: load proposal and cache pickles without ever running code from them.

Only plain data is admitted: NumPy arrays, dtypes and scalars, lists, tuples, dicts, sets, strings, bytes and
numbers. Any other global a pickle names (``os.system``, ``builtins.eval``, a class, ...) stops the load with an
:class:`~roidb.errors.UnsafePickleError` naming the file and the global, before anything is called.

py2-era pickles (py-faster-rcnn's ``cPickle`` output, protocol 2 with ``__builtin__`` and byte strings) load with
``encoding='latin1'``, the setting NumPy needs for their array payloads.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
from typing import Any

import numpy as np

from roidb.errors import DataError, UnsafePickleError

__all__ = ["safe_load", "safe_loads", "allowed_globals"]


def _numpy_core_module(name: str):
    """``numpy._core.<name>`` on NumPy >= 2, ``numpy.core.<name>`` before (no deprecation shim)."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _build_allow_list() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_core_module("multiarray")
    numeric = _numpy_core_module("numeric")
    import codecs

    allowed: dict[tuple[str, str], Any] = {}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(text, 'latin1').
    allowed[("_codecs", "encode")] = codecs.encode
    for mod in ("builtins", "__builtin__"):
        for obj in (list, tuple, dict, set, frozenset, bytearray, bytes, str, int, float, complex, bool):
            allowed[(mod, obj.__name__)] = obj
    allowed[("__builtin__", "unicode")] = str
    allowed[("__builtin__", "long")] = int
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    return allowed


_ALLOWED = _build_allow_list()

# What an allow-listed constructor may allocate beyond the pickle's own bytes: a 40-byte pickle calling
# bytearray(2000000000) or numpy.ndarray((10**10,)) is refused before anything is allocated.
ALLOC_SLACK = 1 << 20
_TEXT_CODECS = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"}


class _Budget(Exception):
    """An allow-listed call would allocate more than the pickle's size allows (becomes a DataError)."""


def _nbytes(shape: Any, dtype: Any) -> int:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        raise TypeError(f"bad array shape {dims!r}")
    count = 1
    for d in dims:
        count *= int(d)
    return count * np.dtype(dtype).itemsize


class _BoundedNdarray:
    """Stands for ``numpy.ndarray`` in a pickle: as ``_reconstruct``'s subtype argument it becomes the real class;
    called directly it builds an array only within the budget."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
        if not args and "buffer" not in kwargs:
            _check(_nbytes(shape, dtype), self.budget, "numpy.ndarray")
        return np.ndarray(shape, dtype, *args, **kwargs)


def _check(size: int, budget: int, what: str) -> None:
    if size > budget:
        raise _Budget(f"{what} would allocate {size:,} bytes, more than this {budget - ALLOC_SLACK:,}-byte pickle "
                      "can hold")


def _bounded_globals(budget: int) -> dict[tuple[str, str], Any]:
    """The allow-list with the constructors that take a size wrapped to respect `budget` bytes."""
    ndarray = _BoundedNdarray(budget)
    real = _ALLOWED

    def sized(cls: type, name: str):
        def build(*args: Any) -> Any:
            if args and isinstance(args[0], (int, np.integer)) and not isinstance(args[0], bool):
                _check(int(args[0]), budget, name)
            return cls(*args)
        return build

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is ndarray:
            subtype = np.ndarray
        _check(_nbytes(shape, dtype), budget, "numpy _reconstruct")
        return real[("numpy._core.multiarray", "_reconstruct")](subtype, shape, dtype)

    def dtype(*args: Any, **kwargs: Any) -> np.dtype:
        made = np.dtype(*args, **kwargs)
        _check(made.itemsize, budget, "numpy.dtype")
        return made

    def encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if not isinstance(encoding, str) or encoding.lower() not in _TEXT_CODECS:
            raise _Budget(f"_codecs.encode with codec {encoding!r} (only text codecs such as latin1 are allowed)")
        return real[("_codecs", "encode")](obj, encoding, errors)

    bounded = dict(real)
    for mod in ("builtins", "__builtin__"):
        bounded[(mod, "bytearray")] = sized(bytearray, "bytearray")
        bounded[(mod, "bytes")] = sized(bytes, "bytes")
    for core in ("numpy.core", "numpy._core"):
        bounded[(f"{core}.multiarray", "_reconstruct")] = reconstruct
    bounded[("numpy", "ndarray")] = ndarray
    bounded[("numpy", "dtype")] = dtype
    bounded[("_codecs", "encode")] = encode
    return bounded


def allowed_globals() -> list[str]:
    """The ``module.name`` globals a pickle may reference, sorted."""
    return sorted(f"{m}.{n}" for m, n in _ALLOWED)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, size: int):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._globals = _bounded_globals(size + ALLOC_SLACK)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                self._source,
                f"refused to unpickle global '{module}.{name}' (only NumPy arrays, lists, tuples, dicts "
                "and plain scalars are allowed); nothing from the file was run") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self._source, "refused a persistent id in the pickle (not plain data)")


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` through the allow-list; ``source`` names it in error messages."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), source, len(data)).load()
    except DataError:
        raise
    except _Budget as exc:
        raise DataError(source, f"refused: {exc}; nothing was allocated") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in detail:
            raise DataError(source, f"truncated pickle ({detail})") from None
        raise DataError(source, f"corrupt or unreadable pickle ({type(exc).__name__}: {detail})") from None


def safe_load(path: str | os.PathLike) -> Any:
    """Unpickle the file at ``path`` through the allow-list (see the module docstring)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(path, f"cannot read pickle ({exc.strerror or exc})") from None
    if not data:
        raise DataError(path, "empty file, not a pickle")
    return safe_loads(data, path)
