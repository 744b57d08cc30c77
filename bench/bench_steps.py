"""Per-unit cost of each pipeline step on the default config: one training iteration of each stage kind, one
proposal image, one detection image. Prints a table of medians over repeats (seconds and rate).

    python3 bench/bench_steps.py [--config configs/default.yml] [--repeats 20] [--warmup 3] [--threads N]
                                 [--amp off|bf16|fp16]

Fast R-CNN batches sample from 2000 random boxes per image (stand-ins for P1). Multiply by the iteration / image counts of a config to predict a full run; compare with the step times that
`pipeline.py status` shows. Threads follow torch's default (OMP_NUM_THREADS or --threads to change it); on a shared
machine one thread per process is much faster than two competing ones.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from nets import param_groups, set_trainable  # noqa: E402
from stages.engine.config import load_config  # noqa: E402
from stages.evaluation import detect_image  # noqa: E402
from stages.settings import build_model, load_imdb, pixel_means  # noqa: E402
from stages.proposals import image_proposals, read_image, write_pickle  # noqa: E402
from stages.engine.trainer import AMP_DTYPES, make_optimizer  # noqa: E402
from stages.training import (_caffe_multipliers, frcn_loss_fn, frcn_roidb_for_training, make_loader,  # noqa: E402
                                   rpn_loss_fn, rpn_roidb_for_training)


def random_boxes(rng: np.random.Generator, height: int, width: int, n: int = 2000) -> np.ndarray:
    """n float32 boxes inside a height x width image: stand-ins for P1 (2000 per image, as py-faster-rcnn)."""
    xy = rng.uniform(0, [width - 2, height - 2], size=(n, 2))
    wh = rng.uniform(4, [width, height], size=(n, 2))
    far = np.minimum(xy + wh, [width - 1, height - 1])
    return np.hstack([xy, far]).astype(np.float32)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_iteration(model, loss_fn, loader, stage: str, amp: str = "off") -> Callable[[], None]:
    set_trainable(model, stage)
    opt = make_optimizer(_caffe_multipliers(param_groups(model, 1e-3, 5e-4)), 1e-3, 0.9, 5e-4)

    def step() -> None:
        batch = next(loader)
        with torch.autocast("cpu", dtype=AMP_DTYPES[amp], enabled=amp != "off"):
            losses = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yml"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="off",
                        help="autocast dtype of the training iterations (inference stays float32, as in the pipeline)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    rng = np.random.default_rng(0)
    imdb = load_imdb(config, "PIPELINE.TRAIN_IMDB")
    test_imdb = load_imdb(config, "PIPELINE.TEST_IMDB")
    model = build_model(config, imdb.num_classes)
    rpn_loader = make_loader(config, rpn_roidb_for_training(config, imdb), imdb.num_classes, has_rpn=True)
    ims = [read_image(imdb.image_path_at(i)) for i in range(args.repeats + args.warmup)]
    it_props = iter(ims * 2)
    frcn_imdb = load_imdb(config, "PIPELINE.TRAIN_IMDB")
    proposals = [random_boxes(rng, *frcn_imdb.image_size_at(i)) for i in range(frcn_imdb.num_images)]
    proposal_file = ROOT / "output" / ".bench_proposals.pkl"
    write_pickle(proposal_file, proposals)
    roidb, _, _ = frcn_roidb_for_training(config, frcn_imdb, proposal_file)
    proposal_file.unlink()
    frcn_loader = make_loader(config, roidb, imdb.num_classes, has_rpn=False)
    test_ims = iter([read_image(test_imdb.image_path_at(i)) for i in range(args.repeats + args.warmup)])
    rows = []
    cases = [("stage1 iteration (RPN, convs + head)", rpn_loader, rpn_loss_fn(config), "stage1"),
             ("stage2 iteration (Fast R-CNN, convs + head)", frcn_loader, frcn_loss_fn(), "stage2"),
             ("stage3 iteration (RPN head only)", rpn_loader, rpn_loss_fn(config), "stage3"),
             ("stage4 iteration (fc6..bbox_pred)", frcn_loader, frcn_loss_fn(), "stage4")]
    for name, loader, loss_fn, stage in cases:
        rows.append((name, median_seconds(train_iteration(model, loss_fn, loader, stage, args.amp), args.repeats,
                                          args.warmup)))
    model.eval()
    with torch.no_grad():
        rows.append(("p1/p2 image (RPN, 2000 proposals)",
                     median_seconds(lambda: image_proposals(model, next(it_props), config), args.repeats,
                                    args.warmup)))
        rows.append(("eval image (im_detect + RoI head)",
                     median_seconds(lambda: detect_image(model, next(test_ims), config), args.repeats, args.warmup)))
    rpn_loader.close()
    frcn_loader.close()
    print(f"config {args.config}; TRAIN.SCALES {list(config.TRAIN.SCALES)}, TEST.SCALES {list(config.TEST.SCALES)}; "
          f"torch threads {torch.get_num_threads()}; amp {args.amp}; median of {args.repeats} after {args.warmup} warm-up; "
          f"pixel means {pixel_means(config).ravel().tolist()}")
    width = max(len(r[0]) for r in rows)
    print(f"{'unit'.ljust(width)}  {'seconds':>8}  {'per second':>10}")
    for name, seconds in rows:
        print(f"{name.ljust(width)}  {seconds:8.4f}  {1.0 / seconds:10.2f}")


if __name__ == "__main__":
    main()
