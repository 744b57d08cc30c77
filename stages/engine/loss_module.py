"""LossModule: `forward(batch) = loss_fn(model, batch)`, the module DistributedDataParallel wraps (kept apart from
distributed.py so that importing the engine does not import torch)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch


class LossModule(torch.nn.Module):
    """`forward(batch) = loss_fn(model, batch)`: routes the loss through `forward`, where DDP hooks in."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], Mapping[str, torch.Tensor]]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Mapping[str, torch.Tensor]:
        return self.loss_fn(self.model, batch)
