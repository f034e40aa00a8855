"""One process, or DDP through accelerate: every process holds the whole model; gradients are averaged over processes
at each step's last backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from preftune.parallel.base import Parallelism


class DataParallel(Parallelism):
    """accelerate's ``prepare``: the policy in DDP's wrapper with several processes (as is with one)."""

    @property
    def name(self) -> str:
        return "ddp" if self.world_size > 1 else "single"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, reference: Any,
                optimizer_state: dict[str, Any] | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        if optimizer_state is not None:
            self.load_optimizer_state(model, optimizer, optimizer_state)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        self.place_reference(reference)
        return model, optimizer
