"""kernels: the reference against hand-computed cases, the C++ kernels against the reference, errors, backends."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import kernels
from kernels import build, reference
from kernels._validate import KernelInputError

DTYPES = (torch.float32, torch.float64)


@pytest.fixture(scope="module")
def ext():
    mod = build.cpu_extension()
    if mod is None:
        pytest.skip("the C++ extension cannot be built here (no compiler); the reference is used instead")
    return mod


# ---------------------------------------------------------------- inputs


def clustered_boxes(n: int, seed: int, dtype=torch.float32, integer: bool = False, ties: bool = False):
    """RPN-like boxes [n, 4]: jittered copies of a few objects plus scattered boxes; scores [n]."""
    g = torch.Generator().manual_seed(seed)
    n_obj = 1 + seed % 5
    obj = torch.rand(n_obj, 2, generator=g, dtype=torch.float64) * 300
    size = 10 + torch.rand(n_obj, 2, generator=g, dtype=torch.float64) * 120
    k = torch.randint(0, n_obj, (n,), generator=g)
    ctr = obj[k] + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.15 * size[k]
    wh = size[k] * torch.exp(torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.2)
    scattered = torch.rand(n, generator=g) < 0.3
    ctr[scattered] = torch.rand(int(scattered.sum()), 2, generator=g, dtype=torch.float64) * 300
    boxes = torch.cat((ctr - wh / 2, ctr + wh / 2), 1)
    if integer:
        boxes = boxes.round()
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if ties:
        scores = (scores * 4).floor() / 4
    return boxes.to(dtype), scores.to(dtype)


def random_rois(r: int, seed: int, batch: int, extent: float, dtype=torch.float64) -> torch.Tensor:
    """RoIs [r, 5] over several images; some partly or wholly outside the map, some degenerate (x2 < x1)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand(r, generator=g, dtype=torch.float64) * extent * 1.4 - extent * 0.2
    y1 = torch.rand(r, generator=g, dtype=torch.float64) * extent * 1.4 - extent * 0.2
    w = torch.rand(r, generator=g, dtype=torch.float64) * extent * 0.8 - extent * 0.05
    h = torch.rand(r, generator=g, dtype=torch.float64) * extent * 0.8 - extent * 0.05
    b = torch.randint(0, batch, (r,), generator=g).double()
    return torch.stack((b, x1, y1, x1 + w, y1 + h), 1).to(dtype)


# ---------------------------------------------------------------- reference vs hand-computed cases


def test_reference_nms_three_boxes():
    boxes = torch.tensor([[1, 1, 10, 10], [0, 0, 9, 9], [20, 20, 29, 29]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.9, 0.7])
    # IoU(0, 1) = 81 / (100 + 100 - 81) = 0.6807 with +1 areas
    assert reference.nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert reference.nms(boxes, scores, 0.7).tolist() == [1, 0, 2]


def test_reference_nms_strict_threshold_and_ties():
    boxes = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 4], [0, 0, 9, 9]], dtype=torch.float64)
    scores = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)
    # IoU(0, 1) = 50 / (100 + 50 - 50) = 0.5 exactly: kept at 0.5 (strict >), suppressed just below
    # (tied scores go by decreasing index, as py-faster-rcnn's argsort()[::-1])
    assert reference.nms(boxes[:2], scores[:2], 0.5).tolist() == [1, 0]
    assert reference.nms(boxes[:2], scores[:2], 0.4999).tolist() == [1]
    # identical boxes with tied scores: the highest index survives
    assert reference.nms(boxes, scores, 0.9).tolist() == [2, 1]


def test_caffe_round_goes_away_from_zero():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49999997, 2.4], dtype=torch.float32)
    assert reference.caffe_round(x).tolist() == [1, 2, 3, -1, -2, 0, 2]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_roi_pool_hand_computed(dtype):
    feats = torch.arange(36, dtype=dtype).reshape(1, 1, 6, 6)
    rois = torch.tensor([[0, 0, 0, 5, 5], [0, 1, 1, 4, 4], [0, 10, 10, 20, 20], [0, 2, 2, 2, 2]], dtype=dtype)
    out = reference.roi_pool(feats, rois, (2, 2), 1.0)
    assert out[0, 0].tolist() == [[14, 17], [32, 35]]  # 6x6 roi, bins of 3: maxima at the bottom-right corners
    assert out[1, 0].tolist() == [[14, 16], [26, 28]]  # 4x4 roi from (1, 1), bins of 2
    assert out[2, 0].tolist() == [[0, 0], [0, 0]]  # wholly outside: empty cells give 0
    assert out[3, 0].tolist() == [[14, 14], [14, 14]]  # a 1x1 roi: every bin covers the one pixel (2, 2)
    # scale 0.5: round(1.0) = 1, round(2.5) = 3 (half away from zero) -> the 3x3 roi at (1, 1)
    out = reference.roi_pool(feats, torch.tensor([[0, 2, 2, 5, 5]], dtype=dtype), (1, 1), 0.5)
    assert out.item() == 21


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_roi_align_on_a_linear_map(dtype):
    # f(y, x) = x: bilinear interpolation is exact, so a bin gives the mean x of its samples
    feats = torch.arange(10, dtype=dtype).repeat(10, 1)[None, None]
    rois = torch.tensor([[0, 2, 2, 6, 6]], dtype=dtype)
    out = reference.roi_align(feats, rois, (2, 2), 1.0, sampling_ratio=2)
    # roi width 4, bins of 2, samples at 2.5, 3.5 | 4.5, 5.5
    assert torch.allclose(out[0, 0], torch.tensor([[3.0, 5.0], [3.0, 5.0]], dtype=dtype))
    out = reference.roi_align(feats, rois, (2, 2), 1.0, sampling_ratio=2, aligned=True)
    assert torch.allclose(out[0, 0], torch.tensor([[2.5, 4.5], [2.5, 4.5]], dtype=dtype))  # shifted by -0.5


# ---------------------------------------------------------------- C++ NMS vs the reference


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_matches_reference_on_many_seeds(ext, dtype):
    for seed in range(40):
        n = (0, 1, 2, 3, 17, 64, 65, 200, 700)[seed % 9]
        boxes, scores = clustered_boxes(n, seed, dtype, integer=seed % 3 == 0, ties=seed % 4 == 1)
        for thr in (0.0, 0.3, 0.5, 0.7, 0.95, 1.0, -0.1):
            got = ext.nms(boxes, scores, thr)
            want = reference.nms(boxes, scores, thr)
            assert got.dtype == torch.int64
            assert torch.equal(got, want), (seed, n, thr)


def test_nms_matches_reference_on_rpn_sized_input(ext):
    boxes, scores = clustered_boxes(4000, seed=7)
    assert torch.equal(ext.nms(boxes, scores, 0.7), reference.nms(boxes, scores, 0.7))


def _anchor_like(n: int, seed: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded-anchor-like boxes: stride-8 grid centres with jitter, sizes 16..256 at ratios 0.5/1/2 (the dense
    many-to-a-cell layout of a stride-8 RPN), float scores with a few exact ties."""
    g = torch.Generator().manual_seed(seed)
    cx = torch.randint(0, 60, (n,), generator=g) * 8 + torch.randn(n, generator=g) * 3
    cy = torch.randint(0, 40, (n,), generator=g) * 8 + torch.randn(n, generator=g) * 3
    sizes = torch.tensor([16.0, 32, 64, 128, 256])[torch.randint(0, 5, (n,), generator=g)]
    sizes = sizes * (0.7 + 0.7 * torch.rand(n, generator=g))
    ratio = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (n,), generator=g)]
    w, h = sizes * ratio.sqrt(), sizes / ratio.sqrt()
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).to(dtype)
    scores = (torch.randint(0, 400, (n,), generator=g) / 400.0).to(dtype)
    return boxes, scores


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_centre_window_pruning_is_exact_on_dense_anchor_like_boxes(ext, dtype):
    """For thr > 0 the kernel visits only grid cells whose centres lie within (1 - thr) / thr of the kept box's
    size of its centre; on dense, many-sized boxes (where that prunes most pairs) it must still be the greedy
    answer of the reference, at every threshold, with and without max_keep."""
    for seed in range(6):
        boxes, scores = _anchor_like(2500, seed, dtype)
        for thr in (0.05, 0.3, 0.5, 0.7, 0.9, 0.999):
            want = reference.nms(boxes, scores, thr)
            assert torch.equal(ext.nms(boxes, scores, thr), want), (seed, thr)
            assert torch.equal(ext.nms(boxes, scores, thr, 300), want[:300]), (seed, thr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_edge_cases(ext, dtype):
    empty = ext.nms(torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), 0.5)
    assert empty.dtype == torch.int64 and empty.numel() == 0
    one = torch.tensor([[5, 5, 20, 30]], dtype=dtype)
    assert ext.nms(one, torch.ones(1, dtype=dtype), 0.5).tolist() == [0]
    # 100 identical boxes with tied scores -> the last one only (argsort()[::-1]); at 1.0 nothing is suppressed
    same = one.repeat(100, 1)
    assert ext.nms(same, torch.ones(100, dtype=dtype), 0.5).tolist() == [99]
    assert ext.nms(same, torch.ones(100, dtype=dtype), 1.0).tolist() == list(range(99, -1, -1))
    # IoU exactly 0.5 in a large input (so the tiled path runs): kept at 0.5, suppressed at 0.49
    base = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 4]], dtype=dtype)
    far = torch.arange(100, dtype=dtype)[:, None] * 1000
    boxes = (base[None] + far[:, :, None].expand(-1, 1, 4)).reshape(-1, 4)
    scores = torch.linspace(1, 0, 200, dtype=dtype)
    assert ext.nms(boxes, scores, 0.5).numel() == 200
    assert ext.nms(boxes, scores, 0.49).tolist() == list(range(0, 200, 2))
    # degenerate boxes (x2 < x1 - 1) and tiny ones mixed in
    boxes, scores = clustered_boxes(300, seed=3, dtype=dtype)
    boxes[::7, 2] = boxes[::7, 0] - 5
    boxes[::11] = boxes[::11, :2].repeat(1, 2)
    for thr in (0.0, 0.5, 0.7):
        assert torch.equal(ext.nms(boxes, scores, thr), reference.nms(boxes, scores, thr))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nms_max_keep_is_the_full_answer_truncated(ext, dtype):
    """Stopping the greedy scan at max_keep kept boxes (the proposal layer's post-NMS top N) gives exactly the first
    max_keep indices of the full NMS, in the C++ kernel, the reference and kernels.nms; tie-heavy, integer and
    RPN-sized inputs, both paths of the C++ kernel (simple below 64 boxes, tiled above)."""
    cases = [clustered_boxes(n, seed, dtype, integer=seed % 3 == 0, ties=seed % 2 == 1)
             for seed, n in enumerate((3, 40, 63, 64, 300, 700, 5000))]
    ones = torch.tensor([[5, 5, 20, 30]], dtype=dtype).repeat(150, 1)
    cases.append((ones + torch.arange(150, dtype=dtype)[:, None] % 7, torch.ones(150, dtype=dtype)))  # all tied
    for boxes, scores in cases:
        for thr in (0.0, 0.3, 0.7, 1.0):
            full = reference.nms(boxes, scores, thr)
            assert torch.equal(ext.nms(boxes, scores, thr), full)
            for k in (1, 2, 17, len(full) - 1, len(full), len(full) + 5, 2000):
                if k <= 0:
                    continue
                want = full[:k]
                assert torch.equal(ext.nms(boxes, scores, thr, k), want), (len(boxes), thr, k)
                assert torch.equal(kernels.nms(boxes, scores, thr, max_keep=k), want), (len(boxes), thr, k)
                if k in (1, 17, len(full) - 1) and len(boxes) <= 700:  # the slow reference: a few cases
                    assert torch.equal(reference.nms(boxes, scores, thr, k), want), (len(boxes), thr, k)
            for no_cap in (None, 0, -1):
                assert torch.equal(kernels.nms(boxes, scores, thr, max_keep=no_cap), full)
    with pytest.raises(KernelInputError, match="max_keep"):
        kernels.nms(*cases[0], 0.5, max_keep=2.0)


def test_nms_returns_decreasing_scores():
    boxes, scores = clustered_boxes(500, seed=11)
    keep = kernels.nms(boxes, scores, 0.5)
    assert bool((scores[keep][1:] <= scores[keep][:-1]).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_nms_equals_per_class_nms(dtype):
    for seed in range(6):
        boxes, scores = clustered_boxes(300, seed, dtype, ties=seed % 2 == 0)
        idxs = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(seed))
        keep = kernels.batched_nms(boxes, scores, idxs, 0.5)
        want = []
        for c in range(5):
            members = (idxs == c).nonzero().flatten()
            want += members[kernels.nms(boxes[members], scores[members], 0.5)].tolist()
        assert sorted(keep.tolist()) == sorted(want)
        assert torch.equal(keep, reference.batched_nms(boxes, scores, idxs, 0.5))
        # decreasing score, ties by higher index (py-faster-rcnn's argsort()[::-1])
        order = sorted(want, key=lambda i: (-float(scores[i]), -i))
        assert keep.tolist() == order
    one_class = kernels.batched_nms(boxes, scores, torch.zeros(300, dtype=torch.int64), 0.5)
    assert torch.equal(one_class, kernels.nms(boxes, scores, 0.5))
    assert kernels.batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5).numel() == 0


# ---------------------------------------------------------------- C++ RoI ops vs the reference


ROI_CASES = [((7, 7), 1 / 16, 160), ((3, 5), 0.5, 20), ((1, 1), 1.0, 12), ((2, 3), 0.25, 60)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_matches_reference(ext, dtype):
    for seed, (size, scale, extent) in enumerate(ROI_CASES * 2):
        B, C, H, W = 2, 3 + seed % 3, 9 + seed, 11
        feats = torch.randn(B, C, H, W, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        rois = random_rois(25, seed, B, extent / scale * (H / extent) if scale < 1 else extent, dtype)
        f1 = feats.clone().requires_grad_(True)
        f2 = feats.clone().requires_grad_(True)
        out = kernels.roi_pool(f1, rois, size, scale)
        want = reference.roi_pool(f2, rois, size, scale)
        assert torch.equal(out, want), seed  # max pooling: bit-exact
        grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(100 + seed))
        out.backward(grad)
        want.backward(grad)
        assert torch.allclose(f1.grad, f2.grad, atol=1e-5 if dtype == torch.float32 else 1e-12), seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_align_matches_reference(ext, dtype):
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    seed = 0
    for size, scale, extent in ROI_CASES:
        for sampling_ratio in (-1, 0, 1, 2, 3):
            for aligned in (False, True):
                seed += 1
                B, C, H, W = 2, 2 + seed % 4, 8 + seed % 5, 10
                feats = torch.randn(B, C, H, W, dtype=dtype, generator=torch.Generator().manual_seed(seed))
                rois = random_rois(12, seed, B, W / scale, dtype)
                f1 = feats.clone().requires_grad_(True)
                f2 = feats.clone().requires_grad_(True)
                out = kernels.roi_align(f1, rois, size, scale, sampling_ratio, aligned)
                want = reference.roi_align(f2, rois, size, scale, sampling_ratio, aligned)
                assert torch.allclose(out, want, **tol), (seed, sampling_ratio, aligned)
                grad = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
                out.backward(grad)
                want.backward(grad)
                assert torch.allclose(f1.grad, f2.grad, **tol), (seed, sampling_ratio, aligned)


def test_roi_ops_hand_cases_on_the_cpp_kernels(ext):
    feats = torch.arange(36, dtype=torch.float32).reshape(1, 1, 6, 6)
    rois = torch.tensor([[0, 0, 0, 5, 5], [0, 1, 1, 4, 4], [0, 10, 10, 20, 20]], dtype=torch.float32)
    assert kernels.roi_pool(feats, rois, 2, 1.0)[:, 0].tolist() == [[[14, 17], [32, 35]], [[14, 16], [26, 28]],
                                                                    [[0, 0], [0, 0]]]
    lin = torch.arange(10, dtype=torch.float32).repeat(10, 1)[None, None]
    out = kernels.roi_align(lin, torch.tensor([[0, 2, 2, 6, 6]], dtype=torch.float32), 2, 1.0, 2)
    assert out[0, 0].tolist() == [[3.0, 5.0], [3.0, 5.0]]


def test_roi_pool_gradient_goes_to_the_first_argmax(ext):
    feats = torch.zeros(1, 1, 4, 4, requires_grad=True)  # all equal: the first pixel of each cell wins
    out = kernels.roi_pool(feats, torch.tensor([[0, 0, 0, 3, 3]], dtype=torch.float32), 2, 1.0)
    out.backward(torch.ones_like(out))
    want = torch.zeros(4, 4)
    want[0, 0] = want[0, 2] = want[2, 0] = want[2, 2] = 1
    assert torch.equal(feats.grad[0, 0], want)


def test_empty_rois(ext):
    feats = torch.randn(1, 4, 5, 5, requires_grad=True)
    for op in (kernels.roi_pool, kernels.roi_align):
        out = op(feats, torch.zeros(0, 5), (2, 3), 0.5)
        assert out.shape == (0, 4, 2, 3)
        out.sum().backward()
        assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_gradcheck_float64(ext):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 2, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 1.3, 0.7, 9.6, 11.2], [1, -3, 2, 5, 20], [1, 4, 4, 4.5, 4.2]], dtype=torch.float64)
    for fn in (kernels.roi_pool, reference.roi_pool):
        assert torch.autograd.gradcheck(lambda f: fn(f, rois, (3, 2), 0.5), (feats,), eps=1e-6, atol=1e-8)
    for fn in (kernels.roi_align, reference.roi_align):
        for sr, aligned in ((2, False), (-1, True)):
            assert torch.autograd.gradcheck(lambda f: fn(f, rois, (3, 2), 0.5, sr, aligned), (feats,), eps=1e-6,
                                            atol=1e-8)


def test_roi_align_backward_is_deterministic_across_thread_counts(ext):
    feats = torch.randn(2, 70, 12, 15, generator=torch.Generator().manual_seed(1))
    rois = random_rois(300, 1, 2, 200, torch.float32)
    grad = torch.randn(300, 70, 7, 7, generator=torch.Generator().manual_seed(2))
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            f = feats.clone().requires_grad_(True)
            kernels.roi_align(f, rois, 7, 1 / 16, 2).backward(grad)
            grads.append(f.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


# ---------------------------------------------------------------- float16/bfloat16 (autocast) boundary


HALF_DTYPES = (torch.float16, torch.bfloat16)
ROI_OPS = [pytest.param("roi_pool", {}, id="roi_pool"),
           pytest.param("roi_align", dict(sampling_ratio=2), id="roi_align-sr2"),
           pytest.param("roi_align", dict(sampling_ratio=-1, aligned=True), id="roi_align-adaptive-aligned")]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("half", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("op, kw", ROI_OPS)
def test_half_roi_ops_are_the_float32_op_cast_back(monkeypatch, backend, half, op, kw):
    if backend == "reference":
        monkeypatch.setenv("FRCNN_KERNELS", "reference")
    feats = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5)).to(half)
    rois = random_rois(30, 5, 2, 11 / 0.5, torch.float64)  # float64 RoIs: cast to float32, never to the half dtype
    f_half = feats.clone().requires_grad_(True)
    f32 = feats.float().requires_grad_(True)
    out = getattr(kernels, op)(f_half, rois, (3, 4), 0.5, **kw)
    want = getattr(kernels, op)(f32, rois.float(), (3, 4), 0.5, **kw)
    assert out.dtype == half
    assert torch.equal(out, want.to(half))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(half)
    out.backward(grad)
    want.backward(grad.float())
    assert f_half.grad.dtype == half
    assert torch.equal(f_half.grad, f32.grad.to(half))


@pytest.mark.parametrize("op", ["roi_pool", "roi_align"])
def test_rois_of_half_features_are_not_rounded_to_the_half_dtype(op):
    # Column w holds w % 16 (exact in bfloat16). x = 257 rounds to 256 in bfloat16 (8 significant bits).
    feats = (torch.arange(300) % 16).to(torch.bfloat16).repeat(1, 1, 4, 1)
    rois = torch.tensor([[0.0, 257, 0, 257, 3]])
    kw = {"sampling_ratio": 1} if op == "roi_align" else {}
    out = getattr(kernels, op)(feats, rois, 1, 1.0, **kw)
    want = getattr(kernels, op)(feats.float(), rois, 1, 1.0, **kw)
    assert torch.equal(out.float(), want)
    assert float(getattr(kernels, op)(feats.float(), rois.bfloat16().float(), 1, 1.0, **kw)) != float(want)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("half", HALF_DTYPES, ids=str)
def test_half_nms_equals_float32_nms_on_the_upcast_boxes(monkeypatch, backend, half):
    if backend == "reference":
        monkeypatch.setenv("FRCNN_KERNELS", "reference")
    for seed in range(4):
        boxes, scores = clustered_boxes(300, seed, integer=seed % 2 == 1, ties=seed % 2 == 0)
        boxes, scores = boxes.to(half), scores.to(half)
        idxs = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(seed))
        for thr in (0.3, 0.7):
            assert torch.equal(kernels.nms(boxes, scores, thr), kernels.nms(boxes.float(), scores.float(), thr))
            assert torch.equal(kernels.batched_nms(boxes, scores, idxs, thr),
                               kernels.batched_nms(boxes.float(), scores.float(), idxs, thr))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("call, name", [
    (lambda: kernels.nms(torch.zeros(3, 5), torch.zeros(3), 0.5), "boxes"),
    (lambda: kernels.nms(torch.zeros(3, 4), torch.zeros(4), 0.5), "scores"),
    (lambda: kernels.nms(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3), 0.5), "boxes"),
    (lambda: kernels.nms(torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64), 0.5), "scores"),
    (lambda: kernels.nms(torch.tensor([[0, 0, math.nan, 1.0]]), torch.zeros(1), 0.5), "boxes"),
    (lambda: kernels.nms(torch.zeros(1, 4), torch.tensor([math.nan]), 0.5), "scores"),
    (lambda: kernels.nms(torch.zeros(1, 4), torch.zeros(1), math.nan), "iou_threshold"),
    (lambda: kernels.batched_nms(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2), 0.5), "idxs"),
    (lambda: kernels.batched_nms(torch.zeros(2, 4), torch.zeros(2), torch.zeros(3, dtype=torch.int64), 0.5),
     "idxs"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4), torch.zeros(2, 4), 2, 1.0), "rois"),
    (lambda: kernels.roi_pool(torch.zeros(1, 4, 4), torch.zeros(2, 5), 2, 1.0), "features"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4, dtype=torch.int32), torch.zeros(2, 5), 2, 1.0), "features"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4), torch.zeros(2, 5), 0, 1.0), "output_size"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4), torch.zeros(2, 5), (2, 2, 2), 1.0), "output_size"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4), torch.zeros(2, 5), 2, -1.0), "spatial_scale"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4), torch.tensor([[1.0, 0, 0, 2, 2]]), 2, 1.0), "rois"),
    (lambda: kernels.roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[0.5, 0, 0, 2, 2]]), 2, 1.0), "rois"),
    (lambda: kernels.roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 0, math.inf, 2, 2]]), 2, 1.0), "rois"),
    (lambda: kernels.roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 2, 1.0, 1.5), "sampling_ratio"),
    (lambda: kernels.roi_align(torch.zeros(1, 1, 4, 4, dtype=torch.float16), torch.zeros(1, 5, dtype=torch.int64), 2,
                               1.0), "rois"),
    (lambda: kernels.roi_pool(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1, 5), 2, 1.0), "features"),
    (lambda: kernels.nms(torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, dtype=torch.bfloat16), 0.5),
     "scores"),
])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_value_error_naming_the_argument(monkeypatch, call, name, backend):
    if backend == "reference":
        monkeypatch.setenv("FRCNN_KERNELS", "reference")
    with pytest.raises(ValueError, match=name) as err:
        call()
    assert isinstance(err.value, KernelInputError)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- backends


def test_frcnn_kernels_reference_selects_the_reference(monkeypatch):
    monkeypatch.setenv("FRCNN_KERNELS", "reference")
    assert build.backend(torch.device("cpu")) is None
    boxes, scores = clustered_boxes(50, seed=2)
    assert torch.equal(kernels.nms(boxes, scores, 0.5), reference.nms(boxes, scores, 0.5))
    monkeypatch.setenv("FRCNN_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FRCNN_KERNELS"):
        kernels.nms(boxes, scores, 0.5)


def test_failed_build_falls_back_to_the_reference_with_one_warning(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(build, "_load", no_compiler)
    monkeypatch.setattr(build, "_cache", {})
    monkeypatch.setattr(build, "_warned", False)
    boxes, scores = clustered_boxes(50, seed=4)
    with pytest.warns(RuntimeWarning, match="reference"):
        keep = kernels.nms(boxes, scores, 0.5)
    assert torch.equal(keep, reference.nms(boxes, scores, 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.roi_pool(torch.randn(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 3, 3]]), 2, 1.0)


def test_import_does_not_build(tmp_path):
    import subprocess
    import sys

    code = ("import kernels, kernels.build as b, sys; "
            "sys.exit(0 if not b._cache and 'torch.utils.cpp_extension' not in sys.modules else 1)")
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    root = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
    assert subprocess.run([sys.executable, "-c", code], cwd=root, env=env).returncode == 0


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next_load():
    """torch's build cache marks a build with a plain `lock` file; a build killed mid-way left one behind and every
    later load waited for ever (found by the kill campaign while another checkout rebuilt the same extension)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    mod = build.cpu_extension()
    if mod is None:
        pytest.skip("no C++ compiler: the reference kernels are used")
    name = build._name("cpu")
    stale = build._build_root() / name / "lock"
    stale.touch()
    code = "import torch, kernels.build as b; sys_ok = b.cpu_extension() is not None; raise SystemExit(0 if sys_ok else 1)"
    root = Path(__file__).resolve().parent.parent
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ), timeout=120,
                              capture_output=True, text=True)
    finally:
        stale.unlink(missing_ok=True)
    assert proc.returncode == 0, proc.stderr
    assert "left by a build that was killed" in proc.stderr


def test_the_extension_name_follows_the_sources(monkeypatch, tmp_path):
    """Two checkouts with different kernel sources get different builds (no rebuilding over each other)."""
    import shutil

    before = build._name("cpu")
    copy = tmp_path / "csrc"
    shutil.copytree(build.CSRC, copy)
    monkeypatch.setattr(build, "CSRC", copy)
    assert build._name("cpu") == before
    (copy / "nms_cpu.cpp").write_text((copy / "nms_cpu.cpp").read_text() + "\n// edited\n")
    assert build._name("cpu") != before
    assert build._name("cpu").startswith(before[:-10])
