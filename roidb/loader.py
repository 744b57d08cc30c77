"""The training data loader: seeded shuffling with aspect grouping, resumable state, threaded prefetch.

py-faster-rcnn's ``RoIDataLayer`` index logic, made resumable and overlapped with compute:

- The shuffle comes from a NumPy ``Generator`` seeded with ``seed``. With ``aspect_grouping`` the landscape
  (width >= height) and portrait entries are permuted separately, cut into groups of ``ims_per_batch``, the
  groups permuted, and any leftover entries (the mixed remainder of both orientations) go last, so every length
  works, odd ones included (py-faster-rcnn#61).
- One solver step consumes ``G = ims_per_batch * world_size * iter_size`` entries of the shared permutation: G / ims
  micro-batches, numbered ``j = rank * iter_size + m`` within the step (m: the rank's m-th micro-batch, summed
  into one update by gradient accumulation). A new permutation is drawn when fewer than G entries remain.
- The micro-batch with global number ``step * world_size * iter_size + j`` is built by
  ``blob_fn(entries, rng=batch_rng(seed, that number))``, a pure function of it, so prefetching in threads never
  changes what a batch contains, and N ranks x iter_size I draw exactly the batches of one process with
  iter_size N x I (the same global batch).
- ``state_dict()`` holds the permutation, the cursor, the shuffle generator's state and the batch counter as of
  the last batch handed out (prefetched batches are not counted); ``load_state_dict`` resumes from it and the next
  batches are bit-identical.
"""
from __future__ import annotations

import collections
import concurrent.futures
import copy
import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["RoIDataLoader", "aspect_grouped_permutation", "batch_rng"]

BlobFn = Callable[..., dict]
_STATE_VERSION = 1


def batch_rng(seed: int, number: int) -> np.random.Generator:
    """The generator of the micro-batch with global number ``number``: a pure function of its arguments."""
    return np.random.default_rng([int(seed), 0x5EED, int(number), 0])


def aspect_grouped_permutation(widths: np.ndarray, heights: np.ndarray, group: int,
                               rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(len(widths))`` whose consecutive ``group``-sized chunks share an orientation.

    Landscape (w >= h) and portrait indices are permuted separately and cut into full groups; the remainders of
    both (fewer than ``group`` each) are joined into mixed groups. The groups are permuted; a final chunk shorter
    than ``group`` (when the length is not a multiple of it) goes last.
    """
    horz = np.asarray(widths) >= np.asarray(heights)
    groups, rest = [], []
    for inds in (np.flatnonzero(horz), np.flatnonzero(~horz)):
        inds = rng.permutation(inds)
        full = inds.size // group * group
        groups.extend(inds[:full].reshape(-1, group))
        rest.append(inds[full:])
    rest = np.concatenate(rest)
    full = rest.size // group * group
    groups.extend(rest[:full].reshape(-1, group))
    order = rng.permutation(len(groups))
    return np.concatenate([groups[i] for i in order] + [rest[full:]]).astype(np.int64)


class RoIDataLoader:
    """Endless iterator of training minibatch blobs over a prepared roidb.

    Args:
        roidb: prepared entries (``width`` and ``height`` are needed for aspect grouping).
        blob_fn: ``blob_fn(entries, rng=generator) -> dict``, e.g.
            ``functools.partial(roidb.minibatch.get_minibatch, num_classes=K, scales=..., ...)``.
        ims_per_batch: TRAIN.IMS_PER_BATCH (entries per batch per rank).
        aspect_grouping: TRAIN.ASPECT_GROUPING.
        seed: RNG_SEED; the permutation and every batch's rng follow from it.
        num_workers: threads building blobs (0: build in the caller's thread on demand).
        prefetch: most batches planned ahead of the consumer (bounded queue).
        rank, world_size: this process's shard for data-parallel training.
        iter_size: micro-batches per solver step on each rank (Caffe's iter_size, gradient accumulation).

    After each ``next()``: ``last_wait_s`` is how long the caller waited for that batch, ``total_wait_s`` the sum,
    ``last_db_inds`` the roidb indices it holds.
    """

    def __init__(self, roidb: Sequence[dict], blob_fn: BlobFn, *, ims_per_batch: int, aspect_grouping: bool = True,
                 seed: int = 3, num_workers: int = 2, prefetch: int = 4, rank: int = 0, world_size: int = 1,
                 iter_size: int = 1):
        if ims_per_batch < 1 or world_size < 1 or iter_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"RoIDataLoader: bad ims_per_batch={ims_per_batch}, rank={rank}, "
                             f"world_size={world_size}, iter_size={iter_size}")
        if len(roidb) < ims_per_batch * world_size * iter_size:
            raise ValueError(f"RoIDataLoader: the roidb has {len(roidb)} entries, fewer than "
                             f"ims_per_batch * world_size * iter_size = {ims_per_batch * world_size * iter_size}")
        self.roidb, self.blob_fn = roidb, blob_fn
        self.ims_per_batch, self.aspect_grouping, self.seed = ims_per_batch, aspect_grouping, int(seed)
        self.rank, self.world_size, self.iter_size = rank, world_size, iter_size
        self.prefetch = max(1, prefetch)
        if aspect_grouping:
            self._widths, self._heights = self._sizes(roidb)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._step, self._epoch = 0, 0
        self._shuffle()
        self._consumed = self._snapshot()
        self._pending: collections.deque = collections.deque()
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="roidb-loader")
                      if num_workers > 0 else None)
        self._closed = False
        self.last_wait_s, self.total_wait_s, self.num_batches = 0.0, 0.0, 0
        self.last_db_inds = np.zeros(0, np.int64)

    @staticmethod
    def _sizes(roidb: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        for i, entry in enumerate(roidb):
            if "width" not in entry or "height" not in entry:
                raise ValueError(f"roidb entry {i} has no 'width'/'height' (run prepare_roidb first); "
                                 "aspect grouping needs them")
        return (np.array([e["width"] for e in roidb], np.int64), np.array([e["height"] for e in roidb], np.int64))

    # --- index planning (caller's thread only) ---
    def _shuffle(self) -> None:
        if self.aspect_grouping:
            self._perm = aspect_grouped_permutation(self._widths, self._heights, self.ims_per_batch, self._rng)
        else:
            self._perm = self._rng.permutation(len(self.roidb)).astype(np.int64)
        self._cur = 0

    def _snapshot(self) -> dict:
        return {"perm": self._perm, "cur": self._cur, "rng": self._rng.bit_generator.state,
                "step": self._step, "epoch": self._epoch}

    def _plan(self) -> tuple[np.ndarray, int]:
        """Entries and global micro-batch number of this rank's next micro-batch (`_step` counts micro-batches)."""
        slots = self.world_size * self.iter_size
        step, m = divmod(self._step, self.iter_size)
        if m == 0 and self._cur + self.ims_per_batch * slots > len(self._perm):
            self._shuffle()
            self._epoch += 1
        slot = self.rank * self.iter_size + m
        start = self._cur + slot * self.ims_per_batch
        inds = self._perm[start:start + self.ims_per_batch]
        self._step += 1
        if m == self.iter_size - 1:
            self._cur += self.ims_per_batch * slots
        return inds, step * slots + slot

    def _build(self, inds: np.ndarray, number: int) -> dict:
        entries = [self.roidb[i] for i in inds]
        return self.blob_fn(entries, rng=batch_rng(self.seed, number))

    def _fill(self) -> None:
        while len(self._pending) < self.prefetch:
            inds, step = self._plan()
            job = self._pool.submit(self._build, inds, step) if self._pool else None
            self._pending.append((inds, step, job, self._snapshot()))

    # --- iteration ---
    def __iter__(self) -> "RoIDataLoader":
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise RuntimeError("RoIDataLoader is closed")
        t0 = time.perf_counter()
        if self._pool is None:
            inds, step = self._plan()
            blobs, state = self._build(inds, step), self._snapshot()
        else:
            self._fill()
            inds, step, job, state = self._pending.popleft()
            blobs = job.result()
            self._fill()
        self.last_wait_s = time.perf_counter() - t0
        self.total_wait_s += self.last_wait_s
        self.num_batches += 1
        self.last_db_inds = inds
        self._consumed = state
        return blobs

    @property
    def epoch(self) -> int:
        """How many times the permutation has been redrawn, as of the last batch handed out."""
        return self._consumed["epoch"]

    # --- resumable state ---
    def state_dict(self) -> dict[str, Any]:
        """Plain Python state (ints, lists, dicts) as of the last batch handed out; JSON- and torch.save-friendly."""
        s = self._consumed
        return {"version": _STATE_VERSION, "seed": self.seed, "num_entries": len(self.roidb),
                "ims_per_batch": self.ims_per_batch, "aspect_grouping": self.aspect_grouping,
                "world_size": self.world_size, "iter_size": self.iter_size, "perm": [int(i) for i in s["perm"]], "cur": int(s["cur"]),
                "rng_state": copy.deepcopy(s["rng"]), "step": int(s["step"]), "epoch": int(s["epoch"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: prefetched batches are dropped and the next batch is the one that
        followed when the state was saved. The rank may differ; the sharding and data must not."""
        mine = {"version": _STATE_VERSION, "seed": self.seed, "num_entries": len(self.roidb),
                "ims_per_batch": self.ims_per_batch, "aspect_grouping": self.aspect_grouping,
                "world_size": self.world_size, "iter_size": self.iter_size}
        for key, value in mine.items():
            if state.get(key, 1 if key == "iter_size" else None) != value:
                raise ValueError(f"loader state: {key} is {state.get(key)!r}, this loader has {value!r}")
        perm = np.asarray(state["perm"], dtype=np.int64)
        if perm.ndim != 1 or perm.size > len(self.roidb) or (perm.size and (perm.min() < 0 or
                                                                           perm.max() >= len(self.roidb))):
            raise ValueError("loader state: 'perm' is not a permutation of this roidb's indices")
        self._drop_pending()
        self._perm, self._cur = perm, int(state["cur"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng_state"])
        self._step, self._epoch = int(state["step"]), int(state["epoch"])
        self._consumed = self._snapshot()

    # --- lifetime ---
    def _drop_pending(self) -> None:
        for _, _, job, _ in self._pending:
            if job is not None:
                job.cancel()
        self._pending.clear()

    def close(self) -> None:
        """Stop the worker threads and drop prefetched batches. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "RoIDataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
