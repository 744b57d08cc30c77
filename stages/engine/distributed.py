"""Data-parallel runs under torchrun: the process group, the DDP wrapper, barriers and the gather of sharded work.

`torchrun --nproc_per_node=N pipeline.py run ...` starts N copies of the pipeline; torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous, and tears every rank down when one dies. This module only reads those variables:

- `init_from_env(device)` joins the group (gloo on the CPU, nccl on CUDA) when WORLD_SIZE > 1 and returns a
  `DistContext`; without torchrun it returns the single-process context, and every helper below is a no-op.
- Rank 0 alone writes manifests and artefacts; the others wait at `barrier()` and then read them.
- Training steps wrap the model and its loss in `DistributedDataParallel` (`wrap_loss`); each rank's loader draws
  its own shard of the shared permutation (roidb.loader), so the global batch is N x IMS_PER_BATCH x ITER_SIZE.
- Proposal dumps and eval split the image indices into N contiguous shards (`shard`) and `gather` the per-image
  results back to rank 0 in image_index order, so the pickles are those of a single process.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, so that `status` (which never trains) starts without it.

__all__ = ["DistContext", "SINGLE", "init_from_env", "resolve_device", "shard", "wrap_loss"]

_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: rank, world size, local rank (its GPU on its node), the device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = field(default="cpu", compare=False)  # a torch.device ("cpu" in SINGLE, to spare the import)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if not self.enabled:
            return
        import torch.distributed as dist
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        import torch.distributed as dist
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """[value of rank 0, value of rank 1, ...] on rank 0, None on the others."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def all_mean(self, values: "torch.Tensor") -> "torch.Tensor":
        """The element-wise mean over ranks of a float64 CPU vector (NaN anywhere gives NaN everywhere)."""
        if not self.enabled:
            return values
        import torch
        import torch.distributed as dist
        buffer = values.to(self.device, torch.float64)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.cpu() / self.world_size

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


SINGLE = DistContext()


def resolve_device(wanted: str, local_rank: int = 0) -> "torch.device":
    """PIPELINE.DEVICE ('auto', 'cpu', 'cuda') as a torch.device; CUDA is this rank's GPU (LOCAL_RANK)."""
    import torch
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config key PIPELINE.DEVICE is cuda but no CUDA device is available")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                              f"(torchrun --nproc_per_node must not exceed it)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _env_int(name: str, default: int, env: Mapping[str, str]) -> int:
    value = env.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(wanted_device: str, env: Mapping[str, str] | None = None) -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on the CPU, nccl on CUDA); else SINGLE on the
    resolved device. Idempotent: a second call returns the same context."""
    env = os.environ if env is None else env
    world_size = _env_int("WORLD_SIZE", 1, env)
    rank, local_rank = _env_int("RANK", 0, env), _env_int("LOCAL_RANK", 0, env)
    device = resolve_device(wanted_device, local_rank if world_size > 1 else 0)
    if world_size <= 1:
        return DistContext(device=device)
    import torch
    import torch.distributed as dist
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown() -> None:
    """Leave the process group (end of `pipeline.py run`)."""
    import sys
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(num_items: int, ctx: DistContext) -> range:
    """The contiguous block of `range(num_items)` that rank `ctx.rank` handles (the first blocks one larger)."""
    base, extra = divmod(num_items, ctx.world_size)
    start = ctx.rank * base + min(ctx.rank, extra)
    return range(start, start + base + (1 if ctx.rank < extra else 0))


def gather_in_order(items: Sequence[Any], ctx: DistContext) -> list[Any] | None:
    """The per-index results of every rank's `shard`, concatenated in index order on rank 0 (None elsewhere)."""
    parts = ctx.gather(list(items))
    return None if parts is None else [item for part in parts for item in part]


def wrap_loss(model: "torch.nn.Module", loss_fn: Callable[["torch.nn.Module", Any], Mapping[str, "torch.Tensor"]],
              ctx: DistContext) -> "torch.nn.Module":
    """A module computing `loss_fn(model, batch)` in its `forward` (where DDP hooks in); under torchrun a
    DistributedDataParallel that averages the gradients of `model`'s trainable parameters over the ranks (and
    first broadcasts rank 0's weights)."""
    from torch.nn.parallel import DistributedDataParallel

    from .loss_module import LossModule
    module = LossModule(model, loss_fn)
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
