"""The CUDA kernels against the pure-torch reference, their deterministic backward against the CPU kernels, and
the float16/bfloat16 boundary on the GPU (skipped without a CUDA device)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import kernels
from kernels import build, reference
from test_kernels import HALF_DTYPES, random_rois

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


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch.use_deterministic_algorithms(enabled) inside the block, the previous setting restored after it."""
    prev = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn_only)


DET_OPS = [pytest.param("roi_pool", {}, id="roi_pool"),
           pytest.param("roi_align", dict(sampling_ratio=2), id="roi_align-sr2"),
           pytest.param("roi_align", dict(sampling_ratio=-1, aligned=True), id="roi_align-adaptive-aligned")]


def _feature_grad(op: str, kw: dict, feats, rois, grad, device: str, deterministic: bool) -> torch.Tensor:
    """features.grad [B, C, H, W] of sum(grad * op(features, rois)) on ``device``; the deterministic setting is
    applied around the backward only (ops read it at backward time)."""
    f = feats.to(device).requires_grad_(True)
    out = getattr(kernels, op)(f, rois.to(device), (7, 7), 1 / 16, **kw)
    with deterministic_algorithms(deterministic):
        out.backward(grad.to(device))
    return f.grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op, kw", DET_OPS)
def test_cuda_deterministic_backward_matches_cpu_and_repeats_bitwise(cuda_ext, dtype, op, kw):
    # 400 RoIs over a small 2-image map: many RoIs hit each pixel, so the atomic order varies between runs.
    feats = torch.randn(2, 16, 20, 24, dtype=dtype, generator=torch.Generator().manual_seed(7))
    rois = random_rois(400, 7, 2, 24 * 16, dtype)
    grad = torch.randn(400, 16, 7, 7, dtype=dtype, generator=torch.Generator().manual_seed(8))
    cpu = _feature_grad(op, kw, feats, rois, grad, "cpu", False)
    first = _feature_grad(op, kw, feats, rois, grad, "cuda", True)
    second = _feature_grad(op, kw, feats, rois, grad, "cuda", True)
    atomic = _feature_grad(op, kw, feats, rois, grad, "cuda", False)
    assert torch.equal(first, second)
    assert torch.allclose(first, cpu, atol=1e-5, rtol=1e-5), float((first - cpu).abs().max())
    assert torch.allclose(atomic, first, atol=1e-4, rtol=1e-4), float((atomic - first).abs().max())


def test_cuda_binding_backward_takes_the_deterministic_keyword(cuda_ext):
    feats = torch.randn(1, 2, 6, 6, device="cuda")
    rois = torch.tensor([[0.0, 0, 0, 5, 5], [0, 1, 1, 4, 4]], device="cuda")
    out, argmax = cuda_ext.roi_pool_forward(feats, rois, 2, 2, 1.0)
    grad = torch.ones_like(out)
    a = cuda_ext.roi_pool_backward(grad, rois, argmax, 1, 2, 6, 6, deterministic=True)
    b = cuda_ext.roi_pool_backward(grad, rois, argmax, 1, 2, 6, 6)
    assert torch.equal(a, b)  # integer-valued sums: exact in any order
    a = cuda_ext.roi_align_backward(grad, rois, 1, 2, 6, 6, 2, 2, 1.0, 2, False, deterministic=True)
    b = cuda_ext.roi_align_backward(grad, rois, 1, 2, 6, 6, 2, 2, 1.0, 2, False)
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("half", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op, kw", DET_OPS)
def test_cuda_half_roi_ops_are_the_float32_op_cast_back(cuda_ext, half, op, kw):
    feats = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5)).to(half).cuda()
    rois = random_rois(30, 5, 2, 11 / 0.5, torch.float64).cuda()
    f_half = feats.clone().requires_grad_(True)
    f32 = feats.float().requires_grad_(True)
    out = getattr(kernels, op)(f_half, rois, (3, 4), 0.5, **kw)
    want = getattr(kernels, op)(f32, rois.float(), (3, 4), 0.5, **kw)
    assert out.dtype == half and torch.equal(out, want.to(half))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(half).cuda()
    with deterministic_algorithms(True):  # both float32 sums in one fixed order, so the casts agree exactly
        out.backward(grad)
        want.backward(grad.float())
    assert f_half.grad.dtype == half
    assert torch.equal(f_half.grad, f32.grad.to(half))
    boxes = torch.rand(200, 2, device="cuda") * 100
    boxes = torch.cat((boxes, boxes + 10 + torch.rand(200, 2, device="cuda") * 40), 1).to(half)
    scores = torch.rand(200, device="cuda").to(half)
    assert torch.equal(kernels.nms(boxes, scores, 0.5), kernels.nms(boxes.float(), scores.float(), 0.5))
