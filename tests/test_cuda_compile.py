"""Every CUDA source in kernels/csrc compiles alone with `nvcc -c` (skipped when nvcc is not on the PATH)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "kernels" / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"nms_cuda.cu", "roi_pool_cuda.cu", "roi_align_cuda.cu"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(source, tmp_path):
    # The same flags the JIT build adds for the kernels' numerics; no torch headers are needed.
    cmd = ["nvcc", "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-O3", "--fmad=false",
           "-std=c++17", "-I", str(CSRC)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}"
    assert "error" not in res.stderr.lower(), res.stderr
