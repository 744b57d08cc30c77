"""stages.commands.plots: PNG sizes read back with cv2, pixels of drawn boxes, curves drawn from the numbers given."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages.engine.errors import PipelineError
from stages.commands.inspect import proposal_stats
from stages.commands.plots import (GT_COLOR, PROPOSAL_COLOR, draw_detections, draw_proposals, plot_losses, plot_pr_curves,
                          plot_recall_vs_iou, write_image)
from vocfmt_helpers import PROPOSALS

GT = [np.array([[10, 10, 29, 29], [50, 20, 69, 39]], np.float32), np.array([[0, 0, 39, 19]], np.float32)]


def size_of(path) -> tuple[int, int]:
    im = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert im is not None, path
    return im.shape[1], im.shape[0]


def stats(label, top_ns=(300, 1000, 2000)):
    return proposal_stats(PROPOSALS, GT, source=label, imdb_name="hand", top_ns=top_ns)


def test_recall_vs_iou_panels_and_size(tmp_path):
    out = tmp_path / "cmp.png"
    assert plot_recall_vs_iou([stats("p1"), stats("p2")], ["p1", "p2"], out) == [300, 1000, 2000]
    assert size_of(out) == (1260, 400)        # 3 panels x 4.2 in x 100 dpi, 4 in high
    assert not list(tmp_path.glob(".*tmp"))   # written atomically, no temporary left
    few = tmp_path / "few.png"
    assert plot_recall_vs_iou([stats("a", (1, 2))], ["a"], few) == [1, 2]
    assert size_of(few) == (840, 400)
    with pytest.raises(PipelineError, match="share no top N"):
        plot_recall_vs_iou([stats("a", (1,)), stats("b", (2,))], ["a", "b"], tmp_path / "x.png")


def test_pr_curves_size(tmp_path):
    pr = {"cat": (np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]), 0.8333),
          "dog": (np.zeros(0), np.zeros(0), 0.0)}
    plot_pr_curves(pr, tmp_path / "pr.png", title="hand")
    assert size_of(tmp_path / "pr.png") == (640, 480)


def test_loss_panels_size(tmp_path):
    rpn = [{"iter": i, "loss": 1.0 / i, "losses": {"rpn_cls": 0.8 / i, "rpn_bbox": 0.2 / i},
            "lr": 0.001 if i <= 3 else 0.0001} for i in range(1, 7)]
    frcn = [{"iter": i, "loss": 2.0 / i, "losses": {"cls": 1.5 / i, "bbox": 0.5 / i}, "lr": 0.001}
            for i in range(1, 7)]
    plot_losses({"stage1": rpn, "stage2": frcn, "stage3": rpn}, tmp_path / "l.png", smooth=3)
    assert size_of(tmp_path / "l.png") == (1040, 680)   # 2 columns x 5.2 in, 2 rows x 3.4 in
    plot_losses({"stage4": frcn}, tmp_path / "one.png")
    assert size_of(tmp_path / "one.png") == (520, 340)
    with pytest.raises(PipelineError, match="no training log"):
        plot_losses({}, tmp_path / "none.png")


def test_draw_proposals_colours_gt_and_proposals():
    image = np.full((160, 200, 3), 255, np.uint8)
    out = draw_proposals(image, PROPOSALS[1], GT[1], top_n=1)
    assert out.shape == image.shape and (image == 255).all()            # the input is not modified
    assert tuple(out[17, 0]) == GT_COLOR                                 # GT left edge (x 0) below the legend
    assert tuple(out[25, 39]) == PROPOSAL_COLOR                          # proposal 0 right edge below the GT
    assert tuple(out[60, 65]) == (255, 255, 255)                         # proposal 1 is not in the top 1


def test_draw_detections_threshold_and_labels(tmp_path):
    image = np.zeros((120, 160, 3), np.uint8)
    dets = [np.zeros((0, 5), np.float32), np.array([[40, 40, 99, 99, 0.9], [5, 100, 20, 115, 0.3]], np.float32)]
    out = draw_detections(image, dets, ["__background__", "cat"], thresh=0.5)
    assert out[70, 40].any() and out[99, 70].any()           # the kept box's edges are drawn
    assert not out[108, 5:21].any()                          # the 0.3 box is below the threshold
    assert out[30:39, 41:60].any()                           # its 'cat 0.90' label sits above the box
    write_image(tmp_path / "d.jpg", out)
    assert size_of(tmp_path / "d.jpg") == (160, 120)
    with pytest.raises(PipelineError, match=r"\.png or \.jpg"):
        write_image(tmp_path / "d.gif", out)
