"""1 process vs N torchrun processes (gloo, CPU) on the same small pipeline, side by side in one run.

    python3 bench/bench_scaleout.py [--config configs/default.yml] [--iters 100 100 100 100] [--nproc 2]
                                    [--images 40 20] [--threads-single 2]

Runs `pipeline.py run` from scratch twice on a generated shapes set of --images (trainval, test) images: once as
one process with --threads-single torch threads, once as `torchrun --standalone --nproc_per_node=N` with
cores / N threads per rank. Prints each step's seconds (from the manifests) and the whole wall time of both.
With DDP each iteration sees N x the images of one process, so equal iteration counts mean N x the data; the
"per image" rows divide by that.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from roidb.synthetic import ensure_shapes_dataset  # noqa: E402
from stages.engine.graph import STEP_ORDER  # noqa: E402

TRAINING = ("stage1", "stage2", "stage3", "stage4")


def run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr[-2000:]}")
    return seconds


def step_seconds(exp_dir: Path) -> dict[str, float]:
    return {s: json.loads((exp_dir / s / "manifest.json").read_text())["timings"]["seconds"] for s in STEP_ORDER}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yml"))
    parser.add_argument("--iters", type=int, nargs=4, default=[100, 100, 100, 100], metavar="N")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--images", type=int, nargs=2, default=[40, 20], metavar=("TRAINVAL", "TEST"))
    parser.add_argument("--threads-single", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_scaleout_") as tmp:
        data = Path(tmp) / "data"
        ensure_shapes_dataset(data / "shapes", num_trainval=args.images[0], num_test=args.images[1], n_jobs=1)
        voc = data / "shapes" / "VOC2007"
        sets = {"PIPELINE.DATA_ROOT": str(data), "PIPELINE.TRAIN_IMDB": f"vocfmt:{voc}:trainval",
                "PIPELINE.TEST_IMDB": f"vocfmt:{voc}:test", "PIPELINE.CLASSES": "[ellipse, rectangle, triangle, "
                "star, cross, ring]", "EXP_DIR": "bench", "PIPELINE.WORKERS": "0",
                **{f"PIPELINE.STAGE{k}_ITERS": str(n) for k, n in zip(range(1, 5), args.iters)},
                **{f"PIPELINE.STAGE{k}_STEPSIZE": str(max(1, n * 3 // 4)) for k, n in zip(range(1, 5), args.iters)}}

        def command(out: str) -> list[str]:
            pairs = {**sets, "PIPELINE.OUTPUT_ROOT": str(Path(tmp) / out)}
            return ["pipeline.py", "run", "--config", args.config, *[x for k, v in pairs.items() for x in ("--set", k, v)]]

        cores = os.cpu_count() or 1
        single = run([sys.executable, *command("single")], args.threads_single)
        multi = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={args.nproc}", *command("multi")], max(1, cores // args.nproc))
        a, b = step_seconds(Path(tmp) / "single" / "bench"), step_seconds(Path(tmp) / "multi" / "bench")
    n = args.nproc
    print(f"iterations {args.iters}, {args.images[0]} trainval / {args.images[1]} test images, {cores} cores")
    print(f"| step | 1 process ({args.threads_single} threads) s | {n} processes ({max(1, cores // n)} thread each) s "
          f"| ratio | images/s, N procs vs 1 |")
    print("|---|---|---|---|---|")
    for step in STEP_ORDER:
        per_image = f"{a[step] / (b[step] / n):.2f}x" if step in TRAINING else "-"
        print(f"| {step} | {a[step]:.1f} | {b[step]:.1f} | {a[step] / b[step]:.2f}x | {per_image} |")
    print(f"| whole run (wall) | {single:.1f} | {multi:.1f} | {single / multi:.2f}x | |")


if __name__ == "__main__":
    main()
