"""Small parity items found by running py-faster-rcnn's own code beside ours (issue 17).

- The pickles py-faster-rcnn's Python 2 tools read (proposals.pkl, scores.pkl, detections.pkl) name only globals
  that Python 2's cPickle with NumPy 1.x has (``numpy.core.multiarray``, never NumPy 2's ``numpy._core``).
- NMS among equal scores: py-faster-rcnn sorts with ``scores.argsort()[::-1]`` (higher index first among ties).
- Zero-area boxes (IoU 0/0 = NaN): kept, as py-faster-rcnn's GPU kernel and cpu_nms.pyx do (docs/differences.md).
- voc_eval compares class names after strip/lower-case (docs/differences.md).
- An unknown config key's "did you mean" names the nearest key.
"""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

import kernels
from kernels import reference
from kernels.reference import py_cpu_nms
from stages.engine.config import load_config
from stages.engine.errors import ConfigError
from stages.proposals import py2_compatible_pickle, write_pickle

# What Python 2.7's cPickle finds with NumPy 1.x for these pickles (module, name) -> the object it stands for here.
_PY2_NUMPY1 = {
    ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(1))[0],
    ("numpy.core.multiarray", "scalar"): np.float32(0).__reduce__()[0],
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("__builtin__", "bytes"): bytes,   # Python 2's bytes is str
}


class Py2NumPy1Unpickler(pickle.Unpickler):
    """Knows only the globals Python 2 + NumPy 1.x can import; anything else (numpy._core ...) fails."""

    def find_class(self, module, name):
        if (module, name) not in _PY2_NUMPY1:
            raise pickle.UnpicklingError(f"Python 2 / NumPy 1.x has no {module}.{name}")
        return _PY2_NUMPY1[(module, name)]


def _py2_load(data: bytes):
    return Py2NumPy1Unpickler(io.BytesIO(data), encoding="latin1").load()


def test_pickles_load_with_only_numpy_core_names(tmp_path):
    rng = np.random.default_rng(0)
    proposals = [rng.uniform(0, 500, (n, 4)).astype(np.float32) for n in (0, 1, 7, 300)]
    detections = [[np.zeros((0, 5), np.float32)] * 2, [rng.uniform(0, 1, (3, 5)).astype(np.float32)] * 2]
    for obj in (proposals, detections, [p[:, 0].copy() for p in proposals]):
        with pytest.raises(pickle.UnpicklingError, match="numpy._core"):
            _py2_load(pickle.dumps(obj, protocol=2))   # what NumPy 2 writes by default
        path = tmp_path / "x.pkl"
        write_pickle(path, obj)
        data = path.read_bytes()
        assert data[:2] == b"\x80\x02" and b"numpy._core" not in data
        loaded = _py2_load(data)
        flat = lambda o: [a for x in o for a in (flat(x) if isinstance(x, list) else [x])]
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(flat(loaded), flat(obj)))
        assert all(np.array_equal(a, b) for a, b in zip(flat(pickle.loads(data)), flat(obj)))   # and NumPy 2
    # array data that happens to contain the text of the NumPy 2 global is left alone
    trap = np.frombuffer(b"cnumpy._core.multiarray\n_reconstruct\n" + b"\0" * 3, dtype=np.float32)
    assert np.array_equal(_py2_load(py2_compatible_pickle([trap]))[0], trap)


def py_faster_rcnn_py_cpu_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """lib/nms/py_cpu_nms.py with the stable sort of the NumPy 1.x of py-faster-rcnn's day."""
    return py_cpu_nms(dets, thresh, sort_kind="stable")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_nms_ties_go_by_higher_index_as_argsort_reversed(monkeypatch, backend):
    if backend == "reference":
        monkeypatch.setenv("FRCNN_KERNELS", "reference")
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(2, 17))
        xy = rng.integers(0, 30, (n, 2)).astype(np.float32)
        boxes = np.hstack([xy, xy + rng.integers(5, 25, (n, 2))]).astype(np.float32)
        scores = rng.choice(np.float32([0.3, 0.5, 0.9]), n)        # many ties
        if trial % 4 == 0:
            boxes[:] = boxes[0]                                    # identical boxes, all tied
            scores[:] = 0.5
        with np.errstate(invalid="ignore"):
            want = py_faster_rcnn_py_cpu_nms(np.hstack([boxes, scores[:, None]]), 0.5)
        got = kernels.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5).tolist()
        assert got == want, (trial, boxes, scores)
    # 100 identical tied boxes (the tiled CPU path runs at >= 64): the last index survives, as argsort()[::-1]
    same = torch.tensor([[5.0, 5, 20, 30]]).repeat(100, 1)
    assert kernels.nms(same, torch.ones(100), 0.5).tolist() == [99]
    assert reference.argsort_desc(torch.tensor([0.5, 0.9, 0.5, 0.5])).tolist() == [1, 3, 2, 0]


def test_zero_area_boxes_are_never_suppressed_by_each_other():
    """Two zero-width boxes (x2 = x1 - 1): IoU = 0 / 0 = NaN, and NaN > thr is false, so both stay: py-faster-rcnn's
    GPU kernel (the default, USE_GPU_NMS) and cpu_nms.pyx do the same; only py_cpu_nms.py (ovr <= thr keeps) drops
    the second. Listed in docs/differences.md."""
    boxes = torch.tensor([[10.0, 10, 9, 20], [10.0, 10, 9, 20], [0, 0, 30, 30]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    for thr in (0.0, 0.3, 0.7):
        assert kernels.nms(boxes, scores, thr).tolist() == [0, 1, 2]
        assert reference.nms(boxes, scores, thr).tolist() == [0, 1, 2]
    with np.errstate(invalid="ignore"):
        assert py_faster_rcnn_py_cpu_nms(np.hstack([boxes.numpy(), scores.numpy()[:, None]]), 0.3) == [0, 2]


def test_voc_eval_compares_lower_cased_class_names(tmp_path):
    """An annotation named ' Dog ' counts as a 'dog' GT, as the imdb reads it for training; py-faster-rcnn's
    voc_eval (``obj['name'] == classname``) would not count it: there the 0.9 detection on it is a false positive,
    npos 1, AP 0.5 (area metric) instead of our 1.0. Listed in docs/differences.md."""
    from test_voc_eval import VocDir
    voc = VocDir(tmp_path, {"im1": [(" Dog ", 0, [1, 1, 10, 10]), ("dog", 0, [50, 50, 60, 60])]})
    voc.dets("dog", ["im1 0.9 1 1 10 10", "im1 0.8 50 50 60 60"])
    rec, prec, ap = voc.eval("dog")
    assert rec.tolist() == [0.5, 1.0] and prec.tolist() == [1.0, 1.0] and ap == 1.0


@pytest.mark.parametrize("key, nearest", [
    ("FOO", None), ("TRAIN.X", None), ("TEST.X", None), ("TRAIN.SCALE", "TRAIN.SCALES"),
    ("TRAN.SCALES", "TRAIN.SCALES"), ("PIPELINE.STAGE1_ITER", "PIPELINE.STAGE1_ITERS"), ("rng_seed", "RNG_SEED"),
    ("PIPELINE.NETS", "PIPELINE.NET"), ("SCALES", None),
])
def test_unknown_key_names_the_nearest_key(tmp_path, key, nearest):
    """Always a hint, and always a leaf key (the old rule could answer `TRAIN` or nothing at all for `FOO: 1`)."""
    flat = load_config().flat()
    section, _, leaf = key.rpartition(".")
    (tmp_path / "bad.yml").write_text(f"{section}:\n  {leaf}: 1\n" if section else f"{leaf}: 1\n")
    for load in (lambda: load_config(overrides=[(key, "1")]), lambda: load_config(tmp_path / "bad.yml")):
        with pytest.raises(ConfigError) as err:
            load()
        message = str(err.value)
        assert "unknown config key " in message and " (did you mean " in message, message   # YAML: TRAN's section
        hint = message.split("did you mean ")[-1].rstrip("?)")
        assert hint in flat, message          # a key, never a section
        assert hint == (nearest or hint), message
