"""Throughput of the proposal dumps (p1/p2) and of eval against the network's forward alone, on the same images.

    python3 bench/bench_inference.py --model OUT/stage1/model.pt [--eval-model OUT/stage4/model.pt]
                                     [--config configs/default.yml] [--images 200] [--rounds 3] [--threads 2]

Rows, each in images per second (the best of `--rounds` interleaved rounds, so a busy machine hurts all alike):

    (a) p1/p2 as the step does it: stages.proposals.imdb_proposals over the training images (JPEG decode, blob
        preparation, body + RPN, proposal layer with no pre-NMS cap -> NMS 0.7 -> 2000, copies to NumPy);
    (b) body + RPN head forward alone on the same images, blobs decoded and prepared beforehand;
    (c) eval's pass over the test images as the step makes it: stages.evaluation.test_net (decode, prep, im_detect
        with the TEST RPN settings, the RoI head, box decoding, per-class NMS, top 100 per image) and the recall of
        the top 300 test proposals (before: a second body + RPN pass, test_proposal_recall; now: test_net's RoIs);
    (c+) the whole eval step's work: (c), then the VOC AP (imdb.evaluate_detections; with --images 0 only);
    (d) body + RPN head + RoI pooling + fc head forward alone on the same test images, on the RoIs (c) used.

Ratios (a)/(b), (c)/(d) and (c+)/(d): issue 15 asks >= 0.9 for the dumps and >= 0.8 for eval. Use trained models
(the score distribution of the proposals sets the NMS cost): e.g. `python3 pipeline.py run --until eval --set
EXP_DIR speedexp --set PIPELINE.OUTPUT_ROOT /tmp/speed_out`, then --model /tmp/speed_out/speedexp/stage1/model.pt
--eval-model /tmp/speed_out/speedexp/stage4/model.pt. `--profile` adds cProfile's top functions of (a) and (c).

On a 2-core machine that another process shares, run with OMP_WAIT_POLICY=PASSIVE: torch's OpenMP workers otherwise
spin between parallel regions, and against one busy neighbour every op slows down about 6x (body + RPN 46 -> 275 ms
per image, the proposal layer's small ops 1.5 -> 50 ms), which says nothing about the code being measured.
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nets import prep_image  # noqa: E402
from stages.engine.config import load_config  # noqa: E402
from stages import evaluation  # noqa: E402
from stages.evaluation import test_net, test_proposal_recall  # noqa: E402
from stages.proposals import imdb_proposals, read_image  # noqa: E402
from stages.settings import load_imdb, load_stage_model, test_image_settings, test_rpn_settings  # noqa: E402


class _Subset:
    """The first `n` images of an imdb, for test_net (which runs over every image of the imdb it is given)."""

    def __init__(self, imdb, n: int):
        self._imdb, self.num_images = imdb, min(n, imdb.num_images)
        self.num_classes = imdb.num_classes

    def image_path_at(self, i: int) -> str:
        return self._imdb.image_path_at(i)

    def gt_roidb(self):
        return self._imdb.gt_roidb()[:self.num_images]


def blobs_of(imdb, n: int, config) -> list:
    settings = test_image_settings(config)
    out = []
    for i in range(n):
        data, scale = prep_image(read_image(imdb.image_path_at(i)), **settings)
        out.append((data, [data.shape[2], data.shape[3], scale]))
    return out


@torch.no_grad()
def rpn_forward_only(model, blobs) -> None:
    for data, _ in blobs:
        model.rpn(model.body(data))


@torch.no_grad()
def detect_forward_only(model, blobs, rois) -> None:
    for (data, _), r in zip(blobs, rois):
        features = model.body(data)
        model.rpn(features)
        model.roi_head(features, r)


def eval_pass(model, imdb, config):
    """What the eval step computes before it writes: all_boxes and the top-300 test-proposal recall."""
    if "proposals_out" in inspect.signature(test_net).parameters:
        proposals: list = []
        all_boxes = test_net(model, imdb, config, label="bench", proposals_out=proposals)
        return all_boxes, evaluation.proposals_recall(proposals, imdb)
    return test_net(model, imdb, config, label="bench"), test_proposal_recall(model, imdb, config)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile(fn, label: str, top: int = 25) -> None:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"\n--- cProfile of {label} (by own time) ---")
    print("\n".join(out.getvalue().splitlines()[:top + 12]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yml"))
    parser.add_argument("--model", required=True, help="a stage model.pt for the proposal dump (M1 or M3)")
    parser.add_argument("--eval-model", help="the model.pt eval detects with (M4; default: --model)")
    parser.add_argument("--images", type=int, default=200, help="images of each imdb per round (0: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions of (a), (c)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    train, test = load_imdb(config, "PIPELINE.TRAIN_IMDB"), load_imdb(config, "PIPELINE.TEST_IMDB")
    n_train = train.num_images if args.images <= 0 else min(args.images, train.num_images)
    n_test = test.num_images if args.images <= 0 else min(args.images, test.num_images)
    device = torch.device("cpu")
    rpn_model = load_stage_model(config, Path(args.model), train.classes, device).eval()
    det_model = load_stage_model(config, Path(args.eval_model or args.model), test.classes, device).eval()
    train_blobs, test_blobs = blobs_of(train, n_train, config), blobs_of(test, n_test, config)
    rpn = test_rpn_settings(config)
    with torch.no_grad():
        test_rois = []
        for data, info in test_blobs:
            boxes, _ = det_model.propose(data, info, **rpn)
            test_rois.append(torch.cat((boxes.new_zeros((boxes.shape[0], 1)), boxes), dim=1))
    subset = _Subset(test, n_test)
    imdb_proposals(rpn_model, train, config, indices=range(min(5, n_train)), progress=False)  # warm-up
    rows: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "ap", "d")}
    all_boxes = recall = None
    for _ in range(args.rounds):
        rows["a"].append(timed(lambda: imdb_proposals(rpn_model, train, config, indices=range(n_train),
                                                      progress=False)))
        rows["b"].append(timed(lambda: rpn_forward_only(rpn_model, train_blobs)))
        t0 = time.perf_counter()
        all_boxes, recall = eval_pass(det_model, subset, config)
        rows["c"].append(time.perf_counter() - t0)
        rows["d"].append(timed(lambda: detect_forward_only(det_model, test_blobs, test_rois)))
        if n_test == test.num_images:
            with tempfile.TemporaryDirectory() as tmp:
                test.competition_mode(True)
                rows["ap"].append(timed(lambda: test.evaluate_detections(all_boxes, tmp)))
    best = {k: min(v) for k, v in rows.items() if v}
    ips = {"a": n_train / best["a"], "b": n_train / best["b"], "c": n_test / best["c"], "d": n_test / best["d"]}
    whole = best["c"] + best.get("ap", 0.0)
    ips["c+"] = n_test / whole
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; threads "
          f"{torch.get_num_threads()}; config {args.config}; TEST.SCALES {list(config.TEST.SCALES)}; "
          f"{n_train} train / {n_test} test images; best of {args.rounds} rounds")
    print(f"proposal model {args.model}; eval model {args.eval_model or args.model}; test recall {recall}")
    lines = [("(a) p1/p2 proposal dump (imdb_proposals)", best["a"], ips["a"]),
             ("(b) body + RPN forward alone", best["b"], ips["b"]),
             ("(c) eval pass (test_net + proposal recall)", best["c"], ips["c"]),
             ("    eval VOC AP (evaluate_detections)" if "ap" in best else "    VOC AP (needs --images 0)",
              best.get("ap", float("nan")), n_test / best["ap"] if "ap" in best else float("nan")),
             ("(c+) whole eval step (c + recall + AP)", whole, ips["c+"]),
             ("(d) body + RPN + RoI pool + head forward alone", best["d"], ips["d"])]
    width = max(len(r[0]) for r in lines)
    print(f"{'measure'.ljust(width)}  {'seconds':>8}  {'images/s':>9}")
    for name, seconds, rate in lines:
        print(f"{name.ljust(width)}  {seconds:8.3f}  {rate:9.2f}")
    print(f"ratio (a)/(b) proposal dump vs forward: {ips['a'] / ips['b']:.3f}  (goal >= 0.9)")
    print(f"ratio (c)/(d) eval pass vs forward: {ips['c'] / ips['d']:.3f}  (goal >= 0.8)")
    print(f"ratio (c+)/(d) whole eval step vs forward: {ips['c+'] / ips['d']:.3f}")
    if args.profile:
        profile(lambda: imdb_proposals(rpn_model, train, config, indices=range(n_train), progress=False), "(a)")
        profile(lambda: eval_pass(det_model, subset, config), "(c)")


if __name__ == "__main__":
    main()
