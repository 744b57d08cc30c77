"""Restricted unpickling: plain data loads, hostile or broken pickles are refused with one line naming the file."""
import os
import pickle
import struct

import numpy as np
import pytest

from roidb.errors import DataError, UnsafePickleError
from roidb.safe_pickle import allowed_globals, safe_load, safe_loads


def _py2_array(values: np.ndarray) -> bytes:
    """A float32 (N, 4) ndarray as Python 2's cPickle (protocol 2) wrote it: py2 ``str`` payloads, int flags."""
    raw = values.astype("<f4").tobytes()
    n = values.shape[0]
    return (b"cnumpy.core.multiarray\n_reconstruct\n"
            b"cnumpy\nndarray\n" b"K\x00\x85" b"U\x01b" b"\x87R"          # _reconstruct(ndarray, (0,), 'b')
            b"(K\x01" + b"J" + struct.pack("<i", n) + b"K\x04\x86"          # state: version 1, shape (n, 4)
            b"cnumpy\ndtype\n" b"U\x02f4K\x00K\x01\x87R"                     # dtype('f4', 0, 1)
            b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"      # dtype state
            b"\x89" + b"T" + struct.pack("<i", len(raw)) + raw +             # not fortran, BINSTRING data
            b"tb")


def py_faster_rcnn_pickle(arrays) -> bytes:
    """``cPickle.dump(list_of_arrays, f, cPickle.HIGHEST_PROTOCOL)`` from Python 2, written out by hand."""
    return b"\x80\x02](" + b"".join(_py2_array(a) for a in arrays) + b"e."


def test_hand_written_py2_proposal_pickle_loads(tmp_path):
    a = np.array([[0, 0, 9, 9], [1.5, 2.5, 300.25, 200.75]], np.float32)
    b = np.array([[10, 20, 30, 40]], np.float32)
    path = tmp_path / "vgg16_rpn_stage1_iter_80000_proposals.pkl"
    path.write_bytes(py_faster_rcnn_pickle([a, b]))
    got = safe_load(path)
    assert isinstance(got, list) and len(got) == 2
    for want, have in zip((a, b), got):
        assert have.dtype == np.float32 and have.shape == want.shape
        np.testing.assert_array_equal(have, want)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_lists_round_trip_every_protocol(protocol):
    data = [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 4), np.float32),
            np.array([[1, 2, 3, 4]], np.int64)]
    got = safe_loads(pickle.dumps(data, protocol=protocol))
    for want, have in zip(data, got):
        assert have.dtype == want.dtype
        np.testing.assert_array_equal(have, want)


def test_dicts_tuples_and_scalars_load():
    data = {"rec": np.array([0.5, 1.0]), "ap": np.float64(0.75), "n": np.int32(3), "t": (1, 2.5, "x", None),
            "flag": True, "b": b"\x00\xff", "s": {1, 2}}
    got = safe_loads(pickle.dumps(data, protocol=2))
    assert got["ap"] == 0.75 and got["n"] == 3 and got["t"] == (1, 2.5, "x", None) and got["s"] == {1, 2}
    assert got["b"] == b"\x00\xff" and got["flag"] is True
    np.testing.assert_array_equal(got["rec"], data["rec"])


class _WritesFile:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


class _RunsShell:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload, refused", [(_WritesFile, ".open"), (_RunsShell, ".system")])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, payload, refused):
    target = tmp_path / "pwned"
    path = tmp_path / "proposals.pkl"
    path.write_bytes(pickle.dumps([np.zeros((1, 4), np.float32), payload(target)], protocol=2))
    with pytest.raises(UnsafePickleError) as err:
        safe_load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and refused in message
    assert not target.exists()


def test_hostile_element_inside_object_array_is_refused(tmp_path):
    target = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = _WritesFile(target)
    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(arr), "obj.pkl")
    assert not target.exists()


def test_truncated_pickle_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps([np.ones((50, 4), np.float32)], protocol=2)[:-40])
    with pytest.raises(DataError) as err:
        safe_load(path)
    assert "truncated" in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_empty_missing_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle at all")
    for path, words in ((empty, "empty"), (tmp_path / "missing.pkl", "cannot read"), (garbage, "pickle")):
        with pytest.raises(DataError) as err:
            safe_load(path)
        assert str(path) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_allow_list_holds_only_data_constructors():
    names = allowed_globals()
    assert "numpy.ndarray" in names and "builtins.list" in names
    assert not any(n.endswith((".eval", ".exec", ".system", ".open", ".getattr", ".__import__")) for n in names)
