"""Scale-out under torchrun: a 2-process gloo run of the small-iteration pipeline, launched as torchrun does it.

- the run completes, rank 0 alone writes, and every training step records world_size 2;
- its P1 pickle (sharded over the ranks, gathered in image_index order) is byte-identical to a single-process dump
  from the same M1, and so are its eval detections from the same M4;
- its loss trajectory matches one process with ITER_SIZE 2 (the same global batch, micro-batch for micro-batch);
- a run whose rank 0 is SIGKILLed mid-stage2 resumes from the snapshot with the same world size to bit-identical
  weights, and a single-process resume of that snapshot is refused with a one-line error.
CUDA (nccl, AMP fp16) runs are at the end, skipped without GPUs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline
from roidb.synthetic import ensure_shapes_dataset
from stages.engine.config import ConfigError
from stages.engine.distributed import SINGLE, DistContext, init_from_env, resolve_device, shard
from stages.engine.trainer import read_log

ROOT = Path(__file__).resolve().parent.parent
TINY_YML = ROOT / "tests" / "data" / "tiny_pipeline.yml"
EXP = "tiny_e2e"
TRAINING = ("stage1", "stage2", "stage3", "stage4")


class Env:
    def __init__(self, data_root: Path):
        self.data_root = data_root
        self.voc = data_root / "shapes" / "VOC2007"

    def args(self, out: Path, *extra: str) -> list[str]:
        pairs = [("PIPELINE.DATA_ROOT", str(self.data_root)), ("PIPELINE.OUTPUT_ROOT", str(out)),
                 ("PIPELINE.TRAIN_IMDB", f"vocfmt:{self.voc}:trainval"),
                 ("PIPELINE.TEST_IMDB", f"vocfmt:{self.voc}:test")]
        return ["--config", str(TINY_YML), *[x for k, v in pairs for x in ("--set", k, v)], *extra]


def torchrun(env: Env, out: Path, *extra: str, nproc: int = 2, fault: str | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N pipeline.py run ...` as a user types it (one thread per rank)."""
    child_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child_env.pop("FRCNN_FAULT", None)
    if fault:
        child_env["FRCNN_FAULT"] = fault
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "pipeline.py", "run", *env.args(out), *extra]
    return subprocess.run(command, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout)


def run_single(env: Env, out: Path, *extra: str) -> int:
    """The pipeline in this process with one thread, as each torchrun rank computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pipeline.main(["run", *env.args(out), *extra])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)


def manifest(out: Path, step: str) -> dict:
    return json.loads((out / EXP / step / "manifest.json").read_text())


def weights(out: Path, step: str) -> dict:
    return torch.load(out / EXP / step / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    data_root = tmp_path_factory.mktemp("data")
    ensure_shapes_dataset(data_root / "shapes", num_trainval=11, num_test=7, n_jobs=1)  # odd: uneven shards
    return Env(data_root)


@pytest.fixture(scope="module")
def ddp_run(env, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun(env, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_two_process_run_completes_and_rank0_alone_speaks(ddp_run):
    out, proc = ddp_run
    for step in ("stage1", "p1", "stage2", "stage3", "p2", "stage4", "eval"):
        m = manifest(out, step)
        assert m["status"] == "done" and m["world_size"] == 2, step
    for step in TRAINING:
        records = read_log(out / EXP / step / "log.jsonl")
        assert [r["iter"] for r in records] == list(range(1, 9))       # one writer: no duplicated lines
        assert not (out / EXP / step / "snapshots").exists()
    assert proc.stdout.count("stage1: running") == 1                    # the other rank is quiet
    assert "(2 processes, cpu)" in proc.stdout
    assert "4 images per iteration (2 process(es) x ITER_SIZE 1 x 2)" in proc.stdout
    assert manifest(out, "p1")["metrics"]["num_images"] == 11
    assert manifest(out, "eval")["metrics"]["num_images"] == 7


def test_sharded_p1_and_eval_are_byte_identical_to_one_process(env, ddp_run, tmp_path):
    out = tmp_path / "single"
    shutil.copytree(ddp_run[0], out)
    for step in ("p1", "eval"):
        assert run_single(env, out, "--only", step, "--force", step) == 0
    for step, name in (("p1", "proposals.pkl"), ("p1", "scores.pkl"), ("eval", "detections.pkl")):
        ours = (out / EXP / step / name).read_bytes()
        assert ours == (ddp_run[0] / EXP / step / name).read_bytes(), (step, name)


def test_loss_trajectory_matches_one_process_with_the_same_global_batch(env, ddp_run, tmp_path):
    """2 ranks x 1 micro-batch vs 1 process x ITER_SIZE 2: the same images, RoI and anchor samples in every
    iteration. DDP averages the two gradients, accumulation sums their halves: with 2 (a power of two) both are
    exact, and the measured losses agree bitwise over all 8 iterations of stage1 and stage2; the tolerance, 1e-5
    relative, leaves room for other world sizes' rounding."""
    out = tmp_path / "accumulated"
    assert run_single(env, out, "--until", "stage2", "--set", "PIPELINE.ITER_SIZE", "2") == 0
    for step in ("stage1", "stage2"):
        ddp = read_log(ddp_run[0] / EXP / step / "log.jsonl")
        one = read_log(out / EXP / step / "log.jsonl")
        assert len(ddp) == len(one) == 8
        for a, b in zip(ddp, one):
            assert a["lr"] == b["lr"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (step, a["iter"])
            for key in a["losses"]:
                assert a["losses"][key] == pytest.approx(b["losses"][key], rel=1e-5, abs=1e-7), (step, key)


def test_killed_two_process_run_resumes_to_identical_weights(env, ddp_run, tmp_path):
    out = tmp_path / "killed"
    # rank 0 dies by SIGKILL while writing stage2's model.pt, after the iteration-4 snapshot; torchrun ends rank 1
    killed = torchrun(env, out, fault="kill:stage2/model.pt:1")
    assert killed.returncode != 0
    assert manifest(out, "stage2")["status"] == "running"
    assert (out / EXP / "stage2" / "snapshots" / "iter_00000004.pt").is_file()

    refused = subprocess.run([sys.executable, "pipeline.py", "run", *env.args(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        "error: snapshot iter_00000004.pt was written by 2 process(es) and this run has 1")
    assert (out / EXP / "stage2" / "snapshots" / "iter_00000004.pt").is_file()   # nothing lost

    resumed = torchrun(env, out)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "stage1: done, skipped" in resumed.stdout
    assert "[stage2] resuming from snapshot iteration 4/8" in resumed.stdout
    for step in TRAINING:
        expected, got = weights(ddp_run[0], step), weights(out, step)
        assert all(torch.equal(expected[k], got[k]) for k in expected), step
    assert (out / EXP / "p2" / "proposals.pkl").read_bytes() == (ddp_run[0] / EXP / "p2" / "proposals.pkl").read_bytes()


@pytest.mark.parametrize("n,world", [(11, 2), (7, 3), (2, 3), (0, 2), (5, 1)])
def test_shards_are_contiguous_and_cover_every_index(n, world):
    blocks = [shard(n, DistContext(rank=r, world_size=world)) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_without_torchrun_the_context_is_a_single_process():
    ctx = init_from_env("cpu", env={})
    assert ctx == SINGLE and not ctx.enabled and ctx.is_main
    assert ctx.broadcast({"a": 1}) == {"a": 1} and ctx.gather(3) == [3]
    assert torch.equal(ctx.all_mean(torch.tensor([1.0, 2.0], dtype=torch.float64)), torch.tensor([1.0, 2.0],
                                                                                                   dtype=torch.float64))
    ctx.barrier()
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        init_from_env("cpu", env={"WORLD_SIZE": "two"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="PIPELINE.DEVICE is cuda"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_steps_run_on_the_cpu(env, tmp_path, amp):
    """PIPELINE.AMP trains under torch.autocast (CPU autocast supports both here); the RoI kernels compute in
    float32 at their boundary."""
    out = tmp_path / amp
    # Small images: CPU convolutions under fp16 autocast have no fast kernels (about 5 s an iteration at scale 160).
    small = ("--set", "TRAIN.SCALES", "[80]", "--set", "TRAIN.MAX_SIZE", "128",
             "--set", "TEST.SCALES", "[80]", "--set", "TEST.MAX_SIZE", "128")
    assert run_single(env, out, "--until", "stage2", "--set", "PIPELINE.AMP", amp,
                      "--set", "PIPELINE.STAGE2_ITERS", "9", *small) == 0
    for step in ("stage1", "stage2"):
        records = read_log(out / EXP / step / "log.jsonl")
        assert len(records) in (8, 9) and all(r["loss"] < 10 for r in records), step
    assert manifest(out, "stage2")["fingerprint_parts"]["keys"]["PIPELINE.AMP"] == amp


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
def test_cuda_pipeline_runs_with_amp(env, tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out = tmp_path / amp
    code = pipeline.main(["run", *env.args(out, "--set", "PIPELINE.DEVICE", "cuda", "--set", "PIPELINE.AMP", amp)])
    torch.use_deterministic_algorithms(False)
    assert code == 0
    for step in TRAINING:
        records = read_log(out / EXP / step / "log.jsonl")
        assert len(records) == 8 and all(r["loss"] == r["loss"] for r in records)
    assert 0.0 <= manifest(out, "eval")["metrics"]["mAP"] <= 1.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_nccl_run_matches_its_sharded_dump(env, tmp_path):
    out = tmp_path / "nccl"
    proc = torchrun(env, out, "--set", "PIPELINE.DEVICE", "cuda")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 processes, cuda)" in proc.stdout
    assert all(manifest(out, s)["world_size"] == 2 for s in TRAINING)
