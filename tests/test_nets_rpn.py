"""RPN head layout, anchor_target_layer on hand-built cases, proposal_layer invariants."""
import numpy as np
import pytest
import torch

from kernels.reference import nms as reference_nms
from nets import RPNHead, anchor_target_layer, bbox_overlaps, proposal_layer, shifted_anchors

SMALL = [[0, 0, 15, 15]]          # 16x16 anchor at each cell
BIG = [[-8, -8, 23, 23]]          # 32x32 anchor centred on the cell


def _targets(base, gt, im=(64, 64), **kw):
    anchors = shifted_anchors(np.array(base, np.float32), im[0] // 16, im[1] // 16, 16)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return anchors, anchor_target_layer(anchors, torch.tensor(gt, dtype=torch.float32), [im[0], im[1], 1.0], **kw)


def _counts(labels):
    return int((labels == 1).sum()), int((labels == 0).sum()), int((labels == -1).sum())


def test_rpn_head_channel_layout_matches_pyfrcnn():
    torch.manual_seed(0)
    head = RPNHead(8, 16, num_anchors=3)
    feats = torch.randn(1, 8, 4, 5)
    logits, deltas = head(feats)
    x = torch.relu(head.rpn_conv(feats))
    cls, box = head.rpn_cls_score(x), head.rpn_bbox_pred(x)
    for h, w, a in [(0, 0, 0), (1, 3, 2), (3, 4, 1)]:
        i = (h * 5 + w) * 3 + a
        # py-faster-rcnn's (1, 2, A*H, W) reshape: channel a is bg, channel A + a is fg.
        torch.testing.assert_close(logits[i], torch.stack([cls[0, a, h, w], cls[0, 3 + a, h, w]]))
        torch.testing.assert_close(deltas[i], box[0, 4 * a:4 * a + 4, h, w])


def test_rpn_head_init_is_normal_001():
    head = RPNHead(64, 64, 9)
    head.reset_parameters(torch.Generator().manual_seed(0))
    for conv in (head.rpn_conv, head.rpn_cls_score, head.rpn_bbox_pred):
        assert abs(conv.weight.std().item() - 0.01) < 0.001 and conv.bias.abs().max() == 0


def test_anchor_target_hand_counted():
    # 64x64 image, 4x4 map, A=2 (small 16x16 and big 32x32). The 16 small anchors are all inside; a big anchor is
    # inside only at shifts 16 and 32 on both axes (4 of 16). GT [0,0,31,15] overlaps small anchors (0,0) and (16,0)
    # with IoU 256/512 = 0.5 each (a tie: both attain the GT's max -> fg). Big anchor [8,8,39,39]: 192/1344 = 0.14,
    # [24,8,55,39]: 64/1472 = 0.04, the others 0 -> bg. So fg 2, bg 14 + 4 = 18, ignored (outside) 12.
    anchors, t = _targets([SMALL[0], BIG[0]], [[0, 0, 31, 15, 1]])
    assert _counts(t["labels"]) == (2, 18, 12)
    fg = torch.nonzero(t["labels"] == 1).flatten()
    np.testing.assert_array_equal(anchors[fg].numpy(), [[0, 0, 15, 15], [16, 0, 31, 15]])
    # Targets: anchor [0,0,15,15] -> GT [0,0,31,15]: dx = (16 - 8) / 16 = 0.5, dw = log(2), dy = dh = 0.
    expect = torch.tensor([0.5, 0.0, np.log(2.0), 0.0], dtype=torch.float32)
    torch.testing.assert_close(t["bbox_targets"][fg[0]], expect)
    assert torch.equal(t["bbox_inside_weights"][fg], torch.ones(2, 4))
    assert t["bbox_inside_weights"][t["labels"] != 1].abs().sum() == 0
    # Outside weights 1 / (fg + bg) on sampled anchors, 0 on ignored ones.
    sampled = t["labels"] >= 0
    torch.testing.assert_close(t["bbox_outside_weights"][sampled], torch.full((20, 4), 1 / 20))
    assert t["bbox_outside_weights"][~sampled].abs().sum() == 0
    assert t["bbox_targets"][t["labels"] == -1].abs().sum() == 0


def test_anchor_target_sampling_caps_fg_then_fills_bg():
    # Same scene, batch 8 at fg_fraction 0.5: both fg stay (cap 4), bg is cut to 8 - 2 = 6, the other 12 -> -1.
    _, t = _targets([SMALL[0], BIG[0]], [[0, 0, 31, 15, 1]], rpn_batchsize=8)
    assert _counts(t["labels"]) == (2, 6, 24)
    torch.testing.assert_close(t["bbox_outside_weights"][t["labels"] >= 0], torch.full((8, 4), 1 / 8))
    # fg cap: 4 GT boxes on 4 small anchors, batch 4 at fraction 0.5 -> 2 fg kept, 2 bg.
    gt = [[0, 0, 15, 15, 1], [16, 16, 31, 31, 1], [32, 32, 47, 47, 1], [48, 48, 63, 63, 1]]
    _, t = _targets(SMALL, gt, rpn_batchsize=4)
    assert _counts(t["labels"]) == (2, 2, 12)


def test_anchor_target_sampling_follows_the_generator():
    gt = [[0, 0, 63, 15, 1]]
    draws = [_targets(SMALL, gt, rpn_batchsize=6, generator=torch.Generator().manual_seed(s))[1]["labels"]
             for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1])
    assert _counts(draws[2]) == _counts(draws[0]) == (3, 3, 10)


def test_positive_overlap_and_clobber_order():
    # GT [0,0,3,3] (4x4) only touches anchor (0,0): IoU 16/256 = 0.0625, its max -> fg unless clobbering,
    # where IoU < 0.3 is applied last and turns it to bg.
    _, t = _targets(SMALL, [[0, 0, 3, 3, 1]])
    assert _counts(t["labels"]) == (1, 15, 0)
    _, t = _targets(SMALL, [[0, 0, 3, 3, 1]], rpn_clobber_positives=True)
    assert _counts(t["labels"]) == (0, 16, 0)
    # IoU >= the positive threshold marks every such anchor positive, not only the argmax: GT [0,0,17,15] has
    # IoU 256/288 = 0.89 with (0,0) and 32/512 = 0.0625 with (16,0); with threshold 0.05 both are fg.
    _, t = _targets(SMALL, [[0, 0, 17, 15, 1]], rpn_positive_overlap=0.05)
    assert _counts(t["labels"]) == (2, 14, 0)
    # Between the thresholds: IoU 0.5 with negative 0.3 and positive 0.7 -> ignored unless it is a GT's max.
    _, t = _targets(SMALL, [[0, 0, 31, 15, 1], [0, 32, 15, 47, 1]], rpn_positive_overlap=0.7)
    assert _counts(t["labels"]) == (3, 13, 0)


def test_gt_without_overlap_marks_no_anchor_positive():
    # Only the 4 inside big anchors (covering pixels 8..55) count; GT [0,0,5,5] overlaps none of them. Plain
    # py-faster-rcnn would mark all 4 zero-overlap anchors positive (0 == the GT's max); the guard keeps them bg.
    _, t = _targets(BIG, [[0, 0, 5, 5, 1]])
    assert _counts(t["labels"]) == (0, 4, 12)


def test_anchor_target_without_gt_is_all_background():
    anchors = shifted_anchors(np.array(SMALL, np.float32), 4, 4, 16)
    t = anchor_target_layer(anchors, torch.zeros((0, 5)), [64, 64, 1.0], generator=torch.Generator())
    assert _counts(t["labels"]) == (0, 16, 0)


def test_positive_weight_splits_outside_weights():
    _, t = _targets([SMALL[0], BIG[0]], [[0, 0, 31, 15, 1]], rpn_positive_weight=0.25)
    torch.testing.assert_close(t["bbox_outside_weights"][t["labels"] == 1], torch.full((2, 4), 0.25 / 2))
    torch.testing.assert_close(t["bbox_outside_weights"][t["labels"] == 0], torch.full((18, 4), 0.75 / 18))
    with pytest.raises(ValueError, match="rpn_positive_weight"):
        _targets(SMALL, [[0, 0, 31, 15, 1]], rpn_positive_weight=1.5)


def _random_rpn_outputs(seed=0, h=10, w=14):
    g = torch.Generator().manual_seed(seed)
    from nets import generate_anchors
    anchors = shifted_anchors(generate_anchors(), h, w, 16)
    scores = torch.randn(anchors.shape[0], 2, generator=g)
    deltas = torch.randn(anchors.shape[0], 4, generator=g) * 0.3
    return anchors, scores, deltas


def test_proposal_layer_invariants():
    anchors, scores, deltas = _random_rpn_outputs()
    im_info = [150.0, 220.0, 0.75]
    rois, s = proposal_layer(scores, deltas, im_info, anchors, pre_nms_top_n=500, post_nms_top_n=60,
                             nms_thresh=0.7, min_size=16)
    assert rois.shape == (60, 5) and s.shape == (60,)
    assert torch.all(rois[:, 0] == 0)
    assert torch.all(s[:-1] >= s[1:])
    b = rois[:, 1:]
    assert b[:, 0].min() >= 0 and b[:, 2].max() <= 219 and b[:, 1].min() >= 0 and b[:, 3].max() <= 149
    assert torch.all(b[:, 2] - b[:, 0] + 1 >= 12) and torch.all(b[:, 3] - b[:, 1] + 1 >= 12)
    iou = bbox_overlaps(b, b) - torch.eye(60)
    assert iou.max() <= 0.7
    fg = torch.softmax(scores, 1)[:, 1]
    assert torch.all(torch.isin(s, fg))


def test_proposal_layer_matches_naive_pipeline():
    from nets import bbox_transform_inv, clip_boxes
    anchors, scores, deltas = _random_rpn_outputs(1, 6, 8)
    im_info = [96.0, 128.0, 1.0]
    for pre, post in ((-1, -1), (100, 20), (-1, 2000)):
        rois, s = proposal_layer(scores, deltas, im_info, anchors, pre_nms_top_n=pre, post_nms_top_n=post,
                                 nms_thresh=0.6, min_size=8)
        fg = torch.softmax(scores, 1)[:, 1]
        boxes = clip_boxes(bbox_transform_inv(anchors, deltas), (96, 128))
        wh = boxes[:, 2:] - boxes[:, :2] + 1
        rows = [i for i in range(len(boxes)) if wh[i, 0] >= 8 and wh[i, 1] >= 8]
        rows = sorted(rows, key=lambda i: -float(fg[i]))
        if pre > 0:
            rows = rows[:pre]
        keep = reference_nms(boxes[rows], fg[rows], 0.6)
        if post > 0:
            keep = keep[:post]
        expect = boxes[rows][keep]
        torch.testing.assert_close(rois[:, 1:], expect)
        torch.testing.assert_close(s, fg[rows][keep])


def test_proposal_layer_min_size_scales_with_im_scale():
    anchors = torch.tensor([[0, 0, 15, 15], [0, 0, 31, 31], [0, 0, 63, 63]], dtype=torch.float32)
    scores = torch.tensor([[0.0, 3.0], [0.0, 2.0], [0.0, 1.0]])
    deltas = torch.zeros(3, 4)
    rois, _ = proposal_layer(scores, deltas, [100, 100, 2.0], anchors, pre_nms_top_n=-1, post_nms_top_n=-1,
                             nms_thresh=0.99, min_size=16)
    # min size 16 * 2 = 32 px: the 16 px anchor goes, the 32 and 64 px ones stay (best first).
    np.testing.assert_array_equal(rois[:, 1:].numpy(), [[0, 0, 31, 31], [0, 0, 63, 63]])


def test_anchor_target_with_no_anchor_inside():
    anchors = shifted_anchors(np.array(BIG, np.float32), 1, 1, 16)
    t = anchor_target_layer(anchors, torch.tensor([[0, 0, 5, 5, 1.0]]), [16, 16, 1.0], generator=torch.Generator())
    assert _counts(t["labels"]) == (0, 0, 1)
