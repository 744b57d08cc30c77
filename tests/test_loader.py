"""The data loader: aspect grouping for any length, reshuffling, resumable state, sharding, prefetch, wait time."""
import functools
import json
import threading
import time

import cv2
import numpy as np
import pytest

from roidb.loader import RoIDataLoader, aspect_grouped_permutation, batch_rng
from roidb.minibatch import get_minibatch

PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])


def sizes_roidb(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"width": int(w), "height": int(h)} for w, h in rng.integers(20, 60, (n, 2))]


def indices_fn(entries, rng):
    """A blob function that reports which entries it got and a draw from its rng."""
    return {"ids": [e["id"] for e in entries], "draw": rng.random()}


def id_roidb(n, seed=0):
    return [dict(e, id=i) for i, e in enumerate(sizes_roidb(n, seed))]


@pytest.mark.parametrize("n", [1, 2, 5, 7, 13, 64])
@pytest.mark.parametrize("group", [1, 2, 3])
def test_aspect_grouped_permutation_any_length(n, group):
    roidb = sizes_roidb(n, seed=n)
    w = np.array([e["width"] for e in roidb])
    h = np.array([e["height"] for e in roidb])
    perm = aspect_grouped_permutation(w, h, group, np.random.default_rng(0))
    assert sorted(perm.tolist()) == list(range(n))
    horz = w >= h
    full = n // group * group
    mixed = sum(len(set(horz[perm[i:i + group]])) > 1 for i in range(0, full, group))
    assert mixed <= 1          # only the joined remainders of the two orientations may mix


def test_odd_roidb_iterates_in_same_orientation_pairs():
    roidb = id_roidb(7)
    horz = np.array([e["width"] >= e["height"] for e in roidb])
    with RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=3, num_workers=0) as loader:
        batches = [next(loader)["ids"] for _ in range(30)]
    assert all(len(b) == 2 and len(set(b)) == 2 for b in batches)
    mixed = sum(horz[b[0]] != horz[b[1]] for b in batches)
    assert mixed <= 10        # 10 epochs of 3 batches, at most one mixed pair each


def test_reshuffles_when_fewer_than_a_batch_remain():
    roidb = id_roidb(5)
    with RoIDataLoader(roidb, indices_fn, ims_per_batch=2, aspect_grouping=False, seed=0,
                       num_workers=0) as loader:
        epochs = []
        for _ in range(4):
            a, b = next(loader)["ids"], next(loader)["ids"]
            epochs.append(a + b)
            assert len(set(a + b)) == 4
        assert loader.epoch == 3
    assert len({tuple(e) for e in epochs}) > 1


def test_exact_multiple_uses_every_entry_each_epoch():
    # py-faster-rcnn reshuffled when exactly one batch remained (>=); we use it.
    with RoIDataLoader(id_roidb(6), indices_fn, ims_per_batch=2, seed=1, num_workers=0) as loader:
        for _ in range(3):
            seen = sum((next(loader)["ids"] for _ in range(3)), [])
            assert sorted(seen) == list(range(6))


def test_workers_do_not_change_batches():
    roidb = id_roidb(11)
    runs = []
    for workers in (0, 1, 3):
        with RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=7, num_workers=workers, prefetch=3) as ld:
            runs.append([next(ld) for _ in range(15)])
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][4]["draw"] == batch_rng(7, 4).random()


def test_resume_gives_identical_batches_on_real_images(tmp_path):
    rng = np.random.default_rng(0)
    roidb = []
    for i in range(9):
        h, w = (30, 40) if i % 3 else (40, 28)
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        n = 12
        xy = rng.uniform(0, 15, (n, 2))
        boxes = np.hstack([xy, xy + rng.uniform(4, 12, (n, 2))]).astype(np.float32)
        ov = rng.uniform(0, 1, n).astype(np.float32)
        roidb.append({"image": str(path), "flipped": bool(i % 2), "width": w, "height": h, "boxes": boxes,
                      "gt_classes": np.zeros(n, np.int32), "max_overlaps": ov,
                      "max_classes": np.where(ov > 0, 1 + i % 2, 0).astype(np.int32)})
    blob_fn = functools.partial(get_minibatch, num_classes=3, scales=[24, 32], max_size=64,
                                pixel_means=PIXEL_MEANS, has_rpn=False, batch_size=8, bbox_reg=False)
    kw = dict(ims_per_batch=2, seed=3, num_workers=2, prefetch=3)
    with RoIDataLoader(roidb, blob_fn, **kw) as loader:
        for _ in range(6):
            next(loader)
        state = json.loads(json.dumps(loader.state_dict()))
        expected = [next(loader) for _ in range(8)]
    with RoIDataLoader(roidb, blob_fn, **kw) as resumed:
        next(resumed)                        # consumed and prefetched batches are discarded by the load
        resumed.load_state_dict(state)
        got = [next(resumed) for _ in range(8)]
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
    assert len({blobs["data"].shape for blobs in expected}) > 1     # the random scales really vary


def test_state_dict_reflects_consumed_batches_not_prefetched():
    roidb = id_roidb(10)
    with RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=2, num_workers=2, prefetch=5) as a, \
            RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=2, num_workers=0) as b:
        for _ in range(7):
            next(a), next(b)
        assert a.state_dict() == b.state_dict()
        assert a.state_dict()["step"] == 7


def test_load_state_dict_refuses_other_data():
    with RoIDataLoader(id_roidb(10), indices_fn, ims_per_batch=2, num_workers=0) as a:
        state = a.state_dict()
    with RoIDataLoader(id_roidb(9), indices_fn, ims_per_batch=2, num_workers=0) as b:
        with pytest.raises(ValueError, match="num_entries is 10, this loader has 9"):
            b.load_state_dict(state)
    with RoIDataLoader(id_roidb(10), indices_fn, ims_per_batch=1, num_workers=0) as c:
        with pytest.raises(ValueError, match="ims_per_batch"):
            c.load_state_dict(state)


def test_shards_are_disjoint_and_cover_each_epoch():
    roidb = id_roidb(13)
    loaders = [RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=5, num_workers=1, rank=r, world_size=2)
               for r in range(2)]
    try:
        for _ in range(5):                     # 13 // 4 = 3 steps per epoch
            steps = [[next(ld)["ids"] for ld in loaders] for _ in range(3)]
            ids = [i for step in steps for shard in step for i in shard]
            assert len(ids) == 12 and len(set(ids)) == 12
        draws = [next(ld)["draw"] for ld in loaders]
        assert draws[0] != draws[1]            # each rank samples with its own rng
    finally:
        for ld in loaders:
            ld.close()


@pytest.mark.parametrize("world_size,iter_size", [(2, 1), (2, 2), (3, 1)])
def test_ranks_times_iter_size_draw_the_global_batch_of_one_process(world_size, iter_size):
    """N ranks with iter_size I see, step for step, the micro-batches (entries and rng) of one process with
    iter_size N x I: rank r's m-th micro-batch is the single process's (r * I + m)-th, across reshuffles too."""
    roidb = id_roidb(17)                      # 17 is no multiple of any global batch: every epoch has leftovers
    slots = world_size * iter_size
    single = RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=9, num_workers=1, iter_size=slots)
    ranks = [RoIDataLoader(roidb, indices_fn, ims_per_batch=2, seed=9, num_workers=0, rank=r,
                           world_size=world_size, iter_size=iter_size) for r in range(world_size)]
    try:
        for _ in range(12):                   # several epochs
            expected = [next(single) for _ in range(slots)]
            got = [[next(ld) for _ in range(iter_size)] for ld in ranks]
            flat = [batch for per_rank in got for batch in per_rank]
            assert [b["ids"] for b in flat] == [b["ids"] for b in expected]
            assert [b["draw"] for b in flat] == [b["draw"] for b in expected]
            assert len({i for b in flat for i in b["ids"]}) == 2 * slots
        assert single.epoch == ranks[0].epoch > 1
    finally:
        for ld in ranks + [single]:
            ld.close()


def test_iter_size_state_resumes_mid_step_and_is_checked():
    roidb = id_roidb(11)
    with RoIDataLoader(roidb, indices_fn, ims_per_batch=1, seed=2, num_workers=0, iter_size=3) as a:
        for _ in range(4):
            next(a)
        state = a.state_dict()
        rest = [next(a)["ids"] for _ in range(9)]
    with RoIDataLoader(roidb, indices_fn, ims_per_batch=1, seed=2, num_workers=2, iter_size=3) as b:
        b.load_state_dict(state)
        assert [next(b)["ids"] for _ in range(9)] == rest
    with RoIDataLoader(roidb, indices_fn, ims_per_batch=1, seed=2, num_workers=0, iter_size=2) as c:
        with pytest.raises(ValueError, match="iter_size is 3, this loader has 2"):
            c.load_state_dict(state)


def test_wait_is_measured_and_hidden_by_prefetch():
    def slow(entries, rng):
        time.sleep(0.03)
        return {"ids": [e["id"] for e in entries]}

    roidb = id_roidb(8)
    with RoIDataLoader(roidb, slow, ims_per_batch=1, num_workers=0) as sync:
        next(sync)
        assert sync.last_wait_s >= 0.03
    with RoIDataLoader(roidb, slow, ims_per_batch=1, num_workers=2, prefetch=2) as loader:
        next(loader)
        waits = []
        for _ in range(4):
            time.sleep(0.2)                    # the "compute step": prefetch finishes meanwhile
            next(loader)
            waits.append(loader.last_wait_s)
        assert max(waits) < 0.025
        assert loader.num_batches == 5 and loader.total_wait_s >= sum(waits)


def test_close_stops_threads_and_errors():
    before = {t.name for t in threading.enumerate()}
    loader = RoIDataLoader(id_roidb(4), indices_fn, ims_per_batch=2, num_workers=2)
    next(loader)
    loader.close()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    assert not [t for t in threading.enumerate() if t.name.startswith("roidb-loader") and t.name not in before]


def test_worker_errors_reach_the_caller():
    def broken(entries, rng):
        raise ValueError("x.jpg: cannot read image")

    with RoIDataLoader(id_roidb(4), broken, ims_per_batch=1, num_workers=1) as loader:
        with pytest.raises(ValueError, match="x.jpg"):
            next(loader)


def test_constructor_errors():
    with pytest.raises(ValueError, match="no 'width'"):
        RoIDataLoader([{"id": 0}, {"id": 1}], indices_fn, ims_per_batch=1)
    with pytest.raises(ValueError, match="fewer than"):
        RoIDataLoader(id_roidb(3), indices_fn, ims_per_batch=2, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        RoIDataLoader(id_roidb(3), indices_fn, ims_per_batch=1, rank=2, world_size=2)
