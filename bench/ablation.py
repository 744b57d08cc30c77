"""The README's ablation table: each row is `pipeline.py run` from scratch (no data, no output, no built M0; the
C++ kernels prebuilt by scripts/install.sh) with the default config and one change, timed wall clock, with the
peak RSS of the process tree and the demo-test mAP (VOC07 metric).

    python3 bench/ablation.py                         # every row, in order
    python3 bench/ablation.py --rows default,random_m0 --work /tmp/ablation

Each row runs in <work>/<row>/ with its own DATA_ROOT and OUTPUT_ROOT, so nothing is shared between rows (the
dataset is generated and M0 pretrained inside every row's time, as on a fresh machine). `--repeat-default`
runs the default twice and checks that the mAP and M4's sha256 agree. Rows take 4-20 minutes each on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# row name -> (what changes, extra pipeline arguments)
ROWS = {
    "previous_default": ("the previous default: random M0, tiny (stride 16), 100/540/680/280 iterations",
                         ["--set", "PIPELINE.WEIGHTS", "", "--set", "PIPELINE.NET", "tiny",
                          "--set", "PIPELINE.STAGE1_ITERS", "100", "--set", "PIPELINE.STAGE1_STEPSIZE", "75",
                          "--set", "PIPELINE.STAGE2_ITERS", "540", "--set", "PIPELINE.STAGE2_STEPSIZE", "405",
                          "--set", "PIPELINE.STAGE3_ITERS", "680", "--set", "PIPELINE.STAGE3_STEPSIZE", "510",
                          "--set", "PIPELINE.STAGE4_ITERS", "280", "--set", "PIPELINE.STAGE4_STEPSIZE", "210"]),
    "random_m0": ("default, but M0 a seeded random init (PIPELINE.WEIGHTS '')", ["--set", "PIPELINE.WEIGHTS", ""]),
    "random_m0_same_wall": ("default, but a random M0 and pretraining's time given to stage2 (1080 iterations)",
                            ["--set", "PIPELINE.WEIGHTS", "", "--set", "PIPELINE.STAGE2_ITERS", "1080",
                             "--set", "PIPELINE.STAGE2_STEPSIZE", "810"]),
    "stride16": ("default, but the stride-16 tiny net", ["--set", "PIPELINE.NET", "tiny"]),
    "default": ("configs/default.yml", []),
    "long": ("configs/shapes_long.yml", ["--config", str(ROOT / "configs" / "shapes_long.yml")]),
}


# Runs the command and writes the peak RSS (KiB) of its largest process (the pipeline or a data-generation worker).
_PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
             "sys.exit(code)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_row(name: str, args: list[str], work: Path) -> dict:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    command = [sys.executable, str(ROOT / "pipeline.py"), "run", "--set", "PIPELINE.DATA_ROOT", str(folder / "data"),
               "--set", "PIPELINE.OUTPUT_ROOT", str(folder / "output"), *args]
    started = time.time()
    with open(folder / "run.log", "w") as log:
        code = subprocess.call([sys.executable, "-c", _PEAK_RSS, str(folder / "peak_rss_kb"), *command], stdout=log,
                               stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.time() - started
    peak_kb = int((folder / "peak_rss_kb").read_text())
    if code != 0:
        raise SystemExit(f"row {name} failed (exit {code}); see {folder / 'run.log'}")
    exp = next((folder / "output").iterdir())
    evaluation = json.loads((exp / "eval" / "manifest.json").read_text())
    m4 = exp / "stage4" / "model.pt"
    steps = {}
    for step in ("stage1", "p1", "stage2", "stage3", "p2", "stage4", "eval"):
        manifest = json.loads((exp / step / "manifest.json").read_text())
        steps[step] = manifest["timings"]["seconds"]
    return {"row": name, "seconds": round(seconds, 1), "mAP": evaluation["metrics"]["mAP"],
            "m4_sha256": hashlib.sha256(m4.read_bytes()).hexdigest(), "steps": steps,
            "peak_rss_gb": round(peak_kb / 1024 ** 2, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ROWS)}")
    parser.add_argument("--work", default="/tmp/frcnn_ablation", help="scratch folder (emptied per row)")
    parser.add_argument("--repeat-default", action="store_true", help="run the default twice and compare")
    opts = parser.parse_args()
    rows = [r for r in opts.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(unknown)} (known: {', '.join(ROWS)})")
    work = Path(opts.work)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch CPU capability: ", end="")
    import torch
    print(torch.backends.cpu.get_cpu_capability(), f"; {torch.get_num_threads()} threads", flush=True)
    results = []
    for name in rows:
        results.append(run_row(name, ROWS[name][1], work))
        print(json.dumps(results[-1]), flush=True)
    if opts.repeat_default and "default" in rows:
        again = run_row("default", ROWS["default"][1], work / "again")
        first = next(r for r in results if r["row"] == "default")
        same = again["mAP"] == first["mAP"] and again["m4_sha256"] == first["m4_sha256"]
        print(json.dumps({**again, "row": "default (second run)"}))
        print(f"second default run: mAP {again['mAP']} (first {first['mAP']}), M4 sha256 "
              f"{'identical' if same else 'DIFFERENT'}")
        results.append({**again, "row": "default (second run)"})
    print()
    print("| change | wall | peak RSS | mAP |")
    print("|---|---|---|---|")
    for r in results:
        label = ROWS.get(r["row"], ("",))[0] or r["row"]
        print(f"| {label} | {int(r['seconds'] // 60)}:{int(r['seconds'] % 60):02d} | {r['peak_rss_gb']} GB | "
              f"{r['mAP']:.4f} |")


if __name__ == "__main__":
    main()
