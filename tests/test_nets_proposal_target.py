"""proposal_target_layer with a small sampler written here (the roidb sampler has the same signature)."""
import numpy as np
import pytest
import torch

from nets import proposal_target_layer


def first_k_sampler(max_overlaps, max_classes, *, fg_thresh, bg_thresh_hi, bg_thresh_lo, rois_per_image,
                    fg_rois_per_image, rng):
    """Deterministic sampler: the first fg_rois_per_image foreground RoIs, then background RoIs."""
    fg = np.flatnonzero(max_overlaps >= fg_thresh)[:fg_rois_per_image]
    bg = np.flatnonzero((max_overlaps < bg_thresh_hi) & (max_overlaps >= bg_thresh_lo))[:rois_per_image - fg.size]
    keep = np.concatenate([fg, bg]).astype(np.int64)
    labels = np.asarray(max_classes)[keep].astype(np.int64)
    labels[fg.size:] = 0
    return keep, labels


def test_hand_built_rois_targets_and_weights():
    gt = torch.tensor([[0, 0, 99, 99, 2]], dtype=torch.float32)
    rois = torch.tensor([[0, 10, 0, 109, 99],      # IoU 9000/11000 = 0.82 -> fg
                         [0, 50, 0, 149, 99],      # IoU 5000/15000 = 0.33 -> bg
                         [0, 200, 200, 250, 250]], dtype=torch.float32)  # IoU 0 < bg_thresh_lo -> unused
    seen = {}

    def sampler(max_overlaps, max_classes, **kw):
        seen.update(kw, max_overlaps=max_overlaps, max_classes=max_classes)
        return first_k_sampler(max_overlaps, max_classes, **kw)

    out = proposal_target_layer(rois, gt, 3, sampler, rng=np.random.default_rng(0), batch_size=8,
                                bbox_normalize_means=(0, 0, 0, 0), bbox_normalize_stds=(0.1, 0.1, 0.2, 0.2))
    # GT appended as the 4th RoI (IoU 1); rois_per_image 8, fg quota round(0.25 * 8) = 2.
    np.testing.assert_allclose(seen["max_overlaps"], [9000 / 11000, 5000 / 15000, 0.0, 1.0], rtol=1e-6)
    assert seen["rois_per_image"] == 8 and seen["fg_rois_per_image"] == 2 and seen["fg_thresh"] == 0.5
    np.testing.assert_array_equal(out["labels"].numpy(), [2, 2, 0])
    np.testing.assert_array_equal(out["rois"].numpy(), [[0, 10, 0, 109, 99], [0, 0, 0, 99, 99], [0, 50, 0, 149, 99]])
    # RoI [10,0,109,99] -> GT [0,0,99,99]: dx = (50 - 60) / 100 = -0.1, normalised by std 0.1 -> -1, in class 2's slots.
    expect = np.zeros((3, 12), np.float32)
    expect[0, 8] = -1.0
    np.testing.assert_allclose(out["bbox_targets"].numpy(), expect, atol=1e-6)
    inside = np.zeros((3, 12), np.float32)
    inside[:2, 8:12] = 1.0
    np.testing.assert_array_equal(out["bbox_inside_weights"].numpy(), inside)
    np.testing.assert_array_equal(out["bbox_outside_weights"].numpy(), inside)


def test_per_class_means_and_stds():
    gt = torch.tensor([[0, 0, 99, 99, 1]], dtype=torch.float32)
    rois = torch.tensor([[0, 10, 0, 109, 99]], dtype=torch.float32)
    means = np.array([[0, 0, 0, 0], [0.1, 0, 0, 0]], np.float32)
    stds = np.array([[1, 1, 1, 1], [0.5, 1, 1, 1]], np.float32)
    out = proposal_target_layer(rois, gt, 2, first_k_sampler, rng=np.random.default_rng(0), batch_size=4,
                                bbox_normalize_means=means, bbox_normalize_stds=stds)
    # first fg is the RoI: (-0.1 - 0.1) / 0.5 = -0.4.
    assert out["bbox_targets"][0, 4].item() == pytest.approx(-0.4)


def test_rejects_missing_gt():
    with pytest.raises(ValueError, match="gt_boxes"):
        proposal_target_layer(torch.zeros(1, 5), torch.zeros(0, 5), 2, first_k_sampler, rng=np.random.default_rng(0))


def test_e2e_losses_reach_every_trained_layer():
    import warnings

    from nets import FasterRCNN, set_trainable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FasterRCNN("tiny", 3, seed=3)
    set_trainable(model, "stage1")
    for p in model.roi_head.parameters():
        p.requires_grad_(True)
    rng = np.random.default_rng(0)
    blobs = {"data": rng.normal(0, 50, (1, 3, 192, 256)).astype(np.float32),
             "im_info": np.array([[192, 256, 1.0]], np.float32),
             "gt_boxes": np.array([[10, 10, 110, 150, 1], [140, 40, 240, 180, 2]], np.float32)}
    losses = model.e2e_losses(blobs, generator=torch.Generator().manual_seed(0), rng=rng, sampler=first_k_sampler,
                              proposal_settings=dict(pre_nms_top_n=2000, post_nms_top_n=300, nms_thresh=0.7,
                                                     min_size=16),
                              proposal_target_settings=dict(batch_size=32))
    assert set(losses) == {"rpn_cls", "rpn_bbox", "cls", "bbox"}
    sum(losses.values()).backward()
    for name in ("body.conv4.weight", "rpn.rpn_conv.weight", "roi_head.box_head.fc6.weight",
                 "roi_head.cls_score.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
