"""The tiny net under CPU torch.autocast (PIPELINE.AMP bf16 / fp16): finite losses close to float32, finite grads
for every parameter, and fp16 training with a GradScaler that overfits one batch.

The batches are built as in test_nets_overfit.py: one synthetic 240x320 image, its 3 GT boxes and jittered
proposals sampled by proposal_target_layer (the loader's RPN and Fast R-CNN blobs).
"""
import warnings

import numpy as np
import pytest
import torch

from nets import FasterRCNN, param_groups, proposal_target_layer, set_trainable
from test_nets_overfit import NUM_CLASSES, _blob, _proposals, simple_sampler, synthetic_image

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3) on every conv/linear output; through the tiny
# net's 6 layers the losses move by well under 1% (measured ~1e-3). 5e-2 leaves room for other torch builds and
# the rare RoI max-pool cell whose argmax flips on a bf16 tie, while a real boundary bug (RoIs rounded to bf16,
# which moves corners by whole pixels, or fp16 overflow) is far outside it.
REL_TOL = 5e-2
ABS_TOL = 1e-3  # for a loss near 0, where a relative tolerance means nothing
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _model(pooling: str = "roi_pool") -> FasterRCNN:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeded random init warns that no pretrained weights were given
        return FasterRCNN("tiny", NUM_CLASSES, seed=3, pooling=pooling)


@pytest.fixture(scope="module")
def batches() -> tuple[dict, dict]:
    """(RPN blobs, Fast R-CNN blobs) for the synthetic image."""
    im, gt = synthetic_image()
    data = _blob(im)
    rpn = {"data": data, "im_info": np.array([[240, 320, 1.0]], np.float32), "gt_boxes": gt}
    rng = np.random.default_rng(3)
    proposals = torch.from_numpy(_proposals(gt, rng))
    t = proposal_target_layer(proposals, torch.from_numpy(gt), NUM_CLASSES, simple_sampler, rng=rng,
                              batch_size=64, bbox_normalize_stds=(0.1, 0.1, 0.2, 0.2))
    return rpn, {"data": data, **t}


def _losses(model: FasterRCNN, batches: tuple[dict, dict], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """All four losses; under CPU autocast at ``dtype`` unless None. The anchor sampling seed is fixed."""
    rpn, frcn = batches
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model.rpn_losses(rpn, generator=torch.Generator().manual_seed(3))
        out.update(model.frcn_losses(frcn))
    return out


def _cpu_fp16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            y = torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))
        return y.dtype == torch.float16 and hasattr(torch.amp, "GradScaler")
    except (RuntimeError, TypeError, AssertionError):
        return False


def _skip_without_cpu_fp16(amp: str) -> None:
    if amp == "fp16" and not _cpu_fp16_autocast_works():
        pytest.skip("this torch build does not support float16 autocast (or GradScaler) on the CPU")


@pytest.mark.parametrize("pooling", ["roi_pool", "roi_align"])
@pytest.mark.parametrize("amp", sorted(AMP_DTYPES))
def test_autocast_losses_are_finite_and_close_to_float32(batches, amp, pooling):
    _skip_without_cpu_fp16(amp)
    model = _model(pooling)
    want = _losses(model, batches, None)
    got = _losses(model, batches, AMP_DTYPES[amp])
    assert set(got) == {"rpn_cls", "rpn_bbox", "cls", "bbox"}
    for name, value in got.items():
        assert value.dtype == torch.float32, name  # the net's outputs leave the conv/fc part in float32
        assert torch.isfinite(value), name
        got_v, want_v = float(value.detach()), float(want[name].detach())
        assert abs(got_v - want_v) <= REL_TOL * abs(want_v) + ABS_TOL, (name, got_v, want_v)


@pytest.mark.parametrize("amp", sorted(AMP_DTYPES))
def test_autocast_backward_gives_finite_grads_for_every_parameter(batches, amp):
    _skip_without_cpu_fp16(amp)
    model = _model()
    sum(_losses(model, batches, AMP_DTYPES[amp]).values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.dtype == p.dtype, name
        assert bool(torch.isfinite(p.grad).all()), name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.roi_head.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in model.rpn.parameters())


def _fp16_train(model: FasterRCNN, stage: str, loss_fn, steps: int, lr: float) -> list[float]:
    """SGD steps under fp16 autocast with a GradScaler at its default init scale (the training loop's setup);
    the scaler skips the first steps, whose scaled grads overflow fp16, while it calibrates."""
    set_trainable(model, stage)
    opt = torch.optim.SGD(param_groups(model, lr, 0.0005), momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    history = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.float16):
            total = sum(loss_fn().values())
        opt.zero_grad()
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()
        history.append(float(total.detach()))
    return history


def test_fp16_grad_scaler_steps_reduce_the_loss_on_one_batch(batches):
    _skip_without_cpu_fp16("fp16")
    rpn, frcn = batches
    model = _model()
    rpn_hist = _fp16_train(model, "stage1", lambda: model.rpn_losses(rpn, generator=torch.Generator().manual_seed(3)),
                           steps=8, lr=0.01)
    frcn_hist = _fp16_train(model, "stage2", lambda: model.frcn_losses(frcn), steps=8, lr=0.02)
    for history in (rpn_hist, frcn_hist):
        assert all(np.isfinite(history)), history
        assert np.mean(history[-3:]) < 0.8 * np.mean(history[:3]), history
