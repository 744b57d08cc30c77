"""The proposal steps p1 and p2: run a trained RPN (M1, M3) over the unflipped training images and dump proposals.

py-faster-rcnn's ``rpn_generate`` with the alt-opt overrides: TEST.SCALES / TEST.MAX_SIZE, no pre-NMS cap
(TEST.RPN_PRE_NMS_TOP_N = -1), 2000 after NMS (TEST.RPN_POST_NMS_TOP_N = 2000), TEST.RPN_NMS_THRESH and
TEST.RPN_MIN_SIZE from the config. Outputs, both pickled with protocol 2 (py-faster-rcnn's cPickle reads them):

    proposals.pkl  list of float32 (N_i, 4) [x1, y1, x2, y2] in original-image pixels (inclusive), one per image of
                   imdb.image_index, best RPN score first
    scores.pkl     list of float32 (N_i,) RPN foreground scores, row for row

Inference runs in float32 whatever PIPELINE.AMP says (it applies to training). The manifest metrics hold the recall of the non-difficult GT boxes at IoU 0.5 and 0.7 by the top 300 and by all
proposals (recall@0.5_top300, recall@0.7_top300, recall@0.5, recall@0.7) and the mean number of proposals.
"""
from __future__ import annotations

import pickle
import pickletools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from kernels.boxes import bbox_overlaps
from nets import FasterRCNN, prep_image
from roidb.imdb import Imdb, decode_image, object_rows

from .engine.artifacts import atomic_write_bytes
from .engine.config import Config
from .engine.lock import raise_if_interrupted
from .engine.distributed import gather_in_order, shard
from .settings import load_imdb, load_stage_model, proposal_dump_settings, test_image_settings
from .engine.progress import ProgressBar
from .engine.runner import StepContext, StepResult

__all__ = ["image_proposals", "blob_proposals", "imdb_proposals", "prepared_images", "proposal_recall",
           "write_pickle", "p1", "p2"]

RECALL_TOP_N = 300
PICKLE_PROTOCOL = 2


def read_image(path: str) -> np.ndarray:
    """BGR uint8 (H, W, 3) image, or DataError naming the file."""
    return decode_image(path)


def _prepared(path: str, image: dict) -> tuple[torch.Tensor, float, tuple[int, int]]:
    im = read_image(path)
    data, scale = prep_image(im, **image)
    return data, scale, im.shape[:2]


def prepared_images(imdb: Imdb, indices: Sequence[int], image: dict
                    ) -> Iterator[tuple[torch.Tensor, float, tuple[int, int]]]:
    """(blob, scale, (H, W)) of each image of `indices`, in that order: the image decoded and prepared by
    nets.prep_image with the settings `image` (test_image_settings), one image ahead in a background thread, so the
    JPEG decode and resize of the next image overlap the network's forward on this one (OpenCV and NumPy release
    the GIL). Each blob is a function of its file alone, so the values are those of a sequential loop; an image
    that fails to read raises its DataError when its turn comes."""
    if len(indices) == 0:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        ahead: Future = pool.submit(_prepared, imdb.image_path_at(indices[0]), image)
        try:
            for k in range(len(indices)):
                current = ahead
                if k + 1 < len(indices):
                    ahead = pool.submit(_prepared, imdb.image_path_at(indices[k + 1]), image)
                yield current.result()
        finally:
            ahead.cancel()


@torch.no_grad()
def blob_proposals(model: FasterRCNN, data: torch.Tensor, scale: float, config: Config
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`image_proposals` on a blob already made by nets.prep_image (`data`, `scale`)."""
    im_info = [data.shape[2], data.shape[3], scale]
    boxes, scores = model.propose(data.to(model.device), im_info, **proposal_dump_settings(config))
    boxes = boxes.float().cpu().numpy() / np.float32(scale)
    return boxes.astype(np.float32), scores.float().cpu().numpy().astype(np.float32)


@torch.no_grad()
def image_proposals(model: FasterRCNN, im: np.ndarray, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """RPN proposals of one BGR image: float32 boxes (N, 4) in original pixels, best first, and scores (N,)."""
    data, scale = prep_image(im, **test_image_settings(config))
    return blob_proposals(model, data, scale, config)


def imdb_proposals(model: FasterRCNN, imdb: Imdb, config: Config, label: str = "proposals",
                   indices: Sequence[int] | None = None, progress: bool | None = None
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Proposals and scores for the images `indices` (default: every image) of `imdb`, unflipped, in that order
    (each image decoded one ahead, see :func:`prepared_images`)."""
    model.eval()
    indices = range(imdb.num_images) if indices is None else indices
    bar = ProgressBar(len(indices), label, enabled=progress)
    boxes, scores = [], []
    for n, (data, scale, _) in enumerate(prepared_images(imdb, indices, test_image_settings(config))):
        raise_if_interrupted()
        b, s = blob_proposals(model, data, scale, config)
        boxes.append(b)
        scores.append(s)
        bar.update(n + 1)
    bar.close()
    return boxes, scores


def proposal_recall(boxes: Sequence[np.ndarray], gt_boxes: Sequence[np.ndarray], iou: float,
                    top_n: int | None = None) -> float:
    """Fraction of GT boxes overlapped with IoU >= `iou` by one of the first `top_n` (all: None) proposals."""
    covered = total = 0
    for props, gt in zip(boxes, gt_boxes):
        total += len(gt)
        props = props if top_n is None else props[:top_n]
        if len(gt) and len(props):
            best = bbox_overlaps(np.asarray(props, np.float64), np.asarray(gt, np.float64)).max(axis=0)
            covered += int((best >= iou).sum())
    return covered / total if total else 0.0


def _builtin_dtypes(obj):
    """`obj` (nested lists of arrays) with every array viewed on NumPy's builtin dtype object. An array that was
    unpickled (gathered from another rank) holds a private copy of its dtype, which pickle writes out again where
    it would memoise the shared one: the same values would give other bytes than in one process."""
    if isinstance(obj, np.ndarray):
        return obj.view(np.dtype(obj.dtype.str)) if obj.dtype.fields is None else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_builtin_dtypes(x) for x in obj)
    return obj


def py2_compatible_pickle(obj) -> bytes:
    """`obj` pickled with protocol 2 so that Python 2's cPickle with NumPy 1.x loads it: NumPy 2 names its
    reconstructors ``numpy._core.multiarray._reconstruct`` (and ``numpy._core.*`` generally), a module NumPy 1.x
    does not have; every such GLOBAL is rewritten to the ``numpy.core.*`` name NumPy 1.x wrote (NumPy 2 still
    loads it). GLOBAL is a newline-terminated text opcode and protocol 2 addresses nothing by byte offset, so
    replacing the opcodes found by ``pickletools.genops`` (never a match inside array data) keeps the pickle valid."""
    data = pickle.dumps(_builtin_dtypes(obj), protocol=PICKLE_PROTOCOL)
    pieces, start = [], 0
    for op, arg, pos in pickletools.genops(data):
        if op.name == "GLOBAL" and arg.startswith("numpy._core"):
            module, name = arg.split(" ", 1)
            end = pos + 1 + len(module) + 1 + len(name) + 1
            pieces += [data[start:pos], b"c" + f"numpy.core{module[len('numpy._core'):]}\n{name}\n".encode("ascii")]
            start = end
    return b"".join(pieces) + data[start:] if pieces else data


def write_pickle(path, obj) -> None:
    """Pickle `obj` (protocol 2, :func:`py2_compatible_pickle`) to `path` atomically; the bytes depend only on the
    values (see _builtin_dtypes)."""
    atomic_write_bytes(path, py2_compatible_pickle(obj))


def _recall_metrics(boxes: list[np.ndarray], imdb: Imdb) -> dict[str, float]:
    gt = [e["boxes"][object_rows(e)] for e in imdb.gt_roidb()]
    metrics = {}
    for top_n, suffix in ((RECALL_TOP_N, f"_top{RECALL_TOP_N}"), (None, "")):
        for iou in (0.5, 0.7):
            metrics[f"recall@{iou}{suffix}"] = round(proposal_recall(boxes, gt, iou, top_n), 6)
    metrics["mean_proposals"] = round(float(np.mean([len(b) for b in boxes])) if boxes else 0.0, 3)
    metrics["num_images"] = len(boxes)
    return metrics


def _dump(ctx: StepContext, model_step: str) -> StepResult:
    """Under torchrun each rank proposes for its block of images; rank 0 gathers them in image_index order and
    writes the pickles (the same bytes as one process's)."""
    imdb = load_imdb(ctx.config, "PIPELINE.TRAIN_IMDB")
    model = load_stage_model(ctx.config, ctx.input_file(model_step, "model.pt"), imdb.classes, ctx.device)
    mine = imdb_proposals(model, imdb, ctx.config, label=ctx.step.id, indices=shard(imdb.num_images, ctx.dist),
                          progress=None if ctx.dist.is_main else False)
    pairs = gather_in_order(list(zip(*mine)), ctx.dist)
    if pairs is None:
        return StepResult(outputs=["proposals.pkl", "scores.pkl"])
    boxes, scores = [b for b, _ in pairs], [s for _, s in pairs]
    write_pickle(ctx.step_dir / "proposals.pkl", boxes)
    write_pickle(ctx.step_dir / "scores.pkl", scores)
    metrics = _recall_metrics(boxes, imdb)
    ctx.log("recall of the top {0}: {1:.4f} @0.5, {2:.4f} @0.7; of all: {3:.4f} @0.5, {4:.4f} @0.7".format(
        RECALL_TOP_N, metrics[f"recall@0.5_top{RECALL_TOP_N}"], metrics[f"recall@0.7_top{RECALL_TOP_N}"],
        metrics["recall@0.5"], metrics["recall@0.7"]))
    return StepResult(outputs=["proposals.pkl", "scores.pkl"], metrics=metrics)


def p1(ctx: StepContext) -> StepResult:
    """Proposals P1 of M1 over the training images."""
    return _dump(ctx, "stage1")


def p2(ctx: StepContext) -> StepResult:
    """Proposals P2 of M3 over the training images."""
    return _dump(ctx, "stage3")
