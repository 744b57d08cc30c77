"""stages.commands.inspect: proposal statistics checked against hand-computed IoUs on a hand-made VOC folder and pickle."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from roidb.errors import DataError, UnsafePickleError
from roidb.factory import get_imdb
from stages.engine.errors import PipelineError
from stages.commands.inspect import (AR_IOUS, best_overlaps, find_scores_file, format_stats_table, inspect_pickle,
                            proposal_stats, stats_to_json, validate_stats_json)
from vocfmt_helpers import CLASSES, PROPOSALS, SCORES, make_voc

# GT order: im1 cat, im1 dog (the difficult cat is excluded), im2 cat. Best IoU by the top 1, 2, 3 proposals:
BEST = np.array([[0.5, 0.5, 1.0], [0.0, 0.75, 0.75], [2 / 3, 2 / 3, 2 / 3]])


@pytest.fixture()
def imdb(tmp_path):
    voc = make_voc(tmp_path / "voc")
    return get_imdb(f"vocfmt:{voc}:test", data_root=tmp_path, classes=CLASSES)


def write(path, obj, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def test_best_overlaps_hand_computed():
    gt = [np.array([[10, 10, 29, 29], [50, 20, 69, 39]], np.float32), np.array([[0, 0, 39, 19]], np.float32)]
    np.testing.assert_allclose(best_overlaps(PROPOSALS, gt, [1, 2, 3]), BEST, atol=1e-12)
    # no proposals: best overlap 0; no GT: no rows
    out = best_overlaps([np.zeros((0, 4), np.float32), PROPOSALS[0]], [gt[1], np.zeros((0, 4))], [5])
    np.testing.assert_array_equal(out, np.zeros((1, 1)))


def test_hand_made_pyfrcnn_pickle_inspects(imdb, tmp_path):
    path = write(tmp_path / "vgg16_rpn_stage1_iter_80000_proposals.pkl", PROPOSALS)
    stats = inspect_pickle(path, imdb, top_ns=(1, 2, 3))
    assert stats.num_images == 2 and stats.num_gt == 3 and stats.score_range is None
    assert stats.per_image == {"min": 2, "median": 2.5, "max": 3, "mean": 2.5}
    np.testing.assert_allclose(stats.recall["0.5"], [2 / 3, 1.0, 1.0])
    np.testing.assert_allclose(stats.recall["0.7"], [0.0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(stats.mean_best_overlap, BEST.mean(axis=0))
    # AR over 0.5:0.05:0.95 with all 3: IoU 1.0 counts at all 10, 0.75 at 6 (0.5..0.75), 2/3 at 4 (0.5..0.65)
    assert stats.average_recall[2] == pytest.approx(20 / 30)
    naive = [np.mean([[b >= t for t in AR_IOUS] for b in BEST[:, k]]) for k in range(3)]
    np.testing.assert_allclose(stats.average_recall, naive)
    # recall-vs-IoU curve of the top 3 at IoU 0.5, 0.7, 0.75, 0.8, 1.0
    curve = dict(zip(stats.curve_ious, stats.curves[3]))
    assert [curve[t] for t in (0.5, 0.7, 0.75, 0.8, 1.0)] == pytest.approx([1, 2 / 3, 2 / 3, 1 / 3, 1 / 3])


def test_top_n_beyond_the_pickle_uses_every_proposal(imdb, tmp_path):
    stats = inspect_pickle(write(tmp_path / "p.pkl", PROPOSALS), imdb, top_ns=(3, 2000))
    assert stats.recall["0.7"] == pytest.approx([2 / 3, 2 / 3])


def test_scores_beside_the_pickle(imdb, tmp_path):
    folder = tmp_path / "p1"
    folder.mkdir()
    write(folder / "proposals.pkl", PROPOSALS)
    write(folder / "scores.pkl", SCORES)
    assert find_scores_file(folder / "proposals.pkl") == folder / "scores.pkl"
    stats = inspect_pickle(folder / "proposals.pkl", imdb, top_ns=(1,))
    assert stats.score_range == pytest.approx((0.1, 0.95))
    write(tmp_path / "mine.pkl", PROPOSALS)
    write(tmp_path / "mine_scores.pkl", [SCORES[0], SCORES[1][:1]])
    with pytest.raises(DataError, match=r"mine_scores.pkl: image 1: \(1,\) scores for 2 proposals"):
        inspect_pickle(tmp_path / "mine.pkl", imdb)


@pytest.mark.parametrize("payload, message", [
    ([PROPOSALS[0]], r"has 1 images but vocfmt_\w+_test has 2"),
    ([PROPOSALS[0], np.zeros((3, 5), np.float32)], r"image 1 \(im2\): proposals must be an \(N, 4\) array"),
    ([PROPOSALS[0], np.array([[0, 0, 500, 400]], np.float32)], r"image 1 \(im2\): proposals reach .* another imdb"),
])
def test_mismatched_pickles_are_refused(imdb, tmp_path, payload, message):
    with pytest.raises(DataError, match=message) as err:
        inspect_pickle(write(tmp_path / "bad.pkl", payload), imdb)
    assert "\n" not in str(err.value) and "bad.pkl" in str(err.value)


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_not_run(imdb, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle global '(posix|os)\.system'"):
        inspect_pickle(write(tmp_path / "evil.pkl", [Hostile(marker)]), imdb)
    assert not marker.exists()


def test_json_schema(imdb, tmp_path):
    stats = inspect_pickle(write(tmp_path / "p.pkl", PROPOSALS), imdb, top_ns=(2, 1))
    doc = json.loads(json.dumps(stats_to_json(stats)))
    validate_stats_json(doc)
    assert doc["schema"] == "proposal-stats/1" and doc["score_range"] is None
    assert [r["n"] for r in doc["top_n"]] == [1, 2]
    assert doc["top_n"][1] == {"n": 2, "recall@0.5": 1.0, "recall@0.7": pytest.approx(1 / 3),
                               "average_recall": pytest.approx(np.mean([[b >= t for t in AR_IOUS]
                                                                        for b in BEST[:, 1]])),
                               "mean_best_overlap": pytest.approx(BEST[:, 1].mean())}
    assert len(doc["recall_vs_iou"]["iou"]) == len(doc["recall_vs_iou"]["recall"]["2"]) == 21
    broken = [("schema", "x"), ("num_gt", "3"), ("score_range", {"min": 2.0, "max": 1.0})]
    for key, value in broken:
        with pytest.raises(PipelineError, match=key):
            validate_stats_json({**doc, key: value})
    bad_row = json.loads(json.dumps(doc))
    bad_row["top_n"][0]["recall@0.5"] = 1.5
    with pytest.raises(PipelineError, match=r"top_n\[0\]"):
        validate_stats_json(bad_row)


def test_table_is_aligned(imdb, tmp_path):
    stats = proposal_stats(PROPOSALS, [np.zeros((0, 4))] * 2, source="x.pkl", imdb_name="i", scores=SCORES,
                           top_ns=(50, 2000))
    table = format_stats_table(stats).split("\n\n")[1].splitlines()
    assert len({len(line) for line in table}) == 1 and table[0].split()[:2] == ["top", "N"]
    assert "0.1000 .. 0.9500" in format_stats_table(stats)
    with pytest.raises(PipelineError, match="positive"):
        proposal_stats(PROPOSALS, [np.zeros((0, 4))] * 2, source="x", imdb_name="i", top_ns=(0,))
