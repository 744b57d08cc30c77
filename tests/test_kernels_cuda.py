"""The CUDA kernels against the pure-torch reference (skipped without a CUDA device)."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels import build, reference
from test_kernels import random_rois

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(scope="module")
def cuda_ext():
    mod = build.cuda_extension()
    assert mod is not None, "the CUDA extension failed to build"
    return mod


def boxes_and_scores(n: int, seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    ctr = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200
    wh = 8 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    boxes = torch.cat((ctr - wh / 2, ctr + wh / 2), 1)
    if seed % 2:
        boxes = boxes.round()
    scores = (torch.rand(n, generator=g, dtype=torch.float64) * (4 if seed % 3 == 0 else 1e6)).floor()
    return boxes.to(dtype), scores.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_nms_matches_reference(cuda_ext, dtype):
    for seed in range(12):
        n = (0, 1, 63, 64, 65, 500, 3000)[seed % 7]
        boxes, scores = boxes_and_scores(n, seed, dtype)
        for thr in (0.0, 0.5, 0.7, 1.0):
            got = kernels.nms(boxes.cuda(), scores.cuda(), thr)
            assert got.device.type == "cuda"
            assert torch.equal(got.cpu(), reference.nms(boxes, scores, thr)), (seed, n, thr)
        idxs = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
        got = kernels.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5)
        assert torch.equal(got.cpu(), reference.batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["roi_pool", "roi_align"])
def test_cuda_roi_ops_match_reference(cuda_ext, dtype, op):
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    for seed, (size, scale) in enumerate([((7, 7), 1 / 16), ((3, 5), 0.5), ((1, 1), 1.0)]):
        feats = torch.randn(2, 3, 9, 11, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        rois = random_rois(20, seed, 2, 11 / scale, dtype)
        variants = [{}] if op == "roi_pool" else [dict(sampling_ratio=s, aligned=a) for s in (-1, 2) for a in
                                                   (False, True)]
        for kw in variants:
            fc = feats.cuda().requires_grad_(True)
            fr = feats.clone().requires_grad_(True)
            out = getattr(kernels, op)(fc, rois.cuda(), size, scale, **kw)
            want = getattr(reference, op)(fr, rois, size, scale, **kw)
            assert torch.allclose(out.cpu(), want, **tol), (seed, kw)
            grad = torch.randn(want.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
            out.backward(grad.cuda())
            want.backward(grad)
            assert torch.allclose(fc.grad.cpu(), fr.grad, **tol), (seed, kw)
