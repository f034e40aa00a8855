"""``Parallelism``: what the training loop and evaluation ask of the way a run is split across processes.

One subclass per backend, one file each (``data_parallel``: one process or DDP; ``fsdp``: FSDP2; ``zero``:
DeepSpeed ZeRO), chosen once by ``preftune.parallel.build_parallelism``. The loop never asks which one it runs on:

- set-up: ``prepare_models`` (before the optimizer takes the parameters), then ``prepare`` (the model the loop runs,
  the optimizer it steps, a checkpoint's optimizer state loaded, the reference placed);
- each micro-batch: ``accumulating`` around it and ``backward``; each step: ``clip_and_step``, then ``zero_grad``;
- the split of a step and the gathers of results (``share``, ``gather``), the same for every backend;
- checkpoints and the saved model: ``unwrap``, ``whole_weights``, ``whole_optimizer_state``;
- what the batch layout may use: ``allows_padding_free``, ``holds_whole_output_layer``, ``lockstep_forwards``.

The defaults here drive accelerate (one process or DDP; FSDP2 keeps most of them); a backend overrides what it does
otherwise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any, ContextManager, Sequence, TypeVar

import torch
from accelerate import Accelerator
from torch import nn

from preftune.parallel.launch import gather_objects, rank_share

T = TypeVar("T")


class Parallelism(ABC):
    """How the processes of a run share its work (see the module docstring for the order of the calls)."""

    # The config key that selects this backend (named in errors about it); None for the default.
    config_key: str | None = None
    # Each process holds only part of the weights, so every forward is a collective: all processes must run the same
    # forwards (stand-ins in evaluation too), and nothing can read the whole model outside a gather.
    lockstep_forwards = False
    # Padding-free batches (a variable number of forwards per micro-batch) may be used.
    allows_padding_free = True
    # The output layer's whole weight is there between forwards (the chunked LM head projects with it).
    holds_whole_output_layer = True

    def __init__(self, args: Any, accelerator: Accelerator) -> None:
        self.args, self.accelerator = args, accelerator
        self.world_size, self.rank = accelerator.num_processes, accelerator.process_index

    @property
    @abstractmethod
    def name(self) -> str:
        """How the processes share the work, as ``summary.json`` records it: ``single``, ``ddp``,
        ``fsdp <options>``, ``deepspeed zero-<stage>``."""

    # ------------------------------------------------------------------------------------ set-up
    def prepare_models(self, model: nn.Module, reference: Any) -> None:
        """Before the optimizer takes the policy's parameters (and after a checkpoint's weights are loaded): change
        the policy and a separate reference model in place where the backend must (FSDP shards them). Default:
        nothing."""

    @abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, reference: Any,
                optimizer_state: dict[str, Any] | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """``(the model the loop runs, the optimizer it steps)`` for ``model`` and ``optimizer`` (wrapped, or an
        engine); ``optimizer_state`` (a checkpoint's, from ``whole_optimizer_state``) loaded where the backend needs
        it; the reference (a ``preftune.reference.Reference`` or None) placed for its forwards."""

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a state saved by ``whole_optimizer_state`` (a collective where the state is split)."""
        optimizer.load_state_dict(state)

    def place_reference(self, reference: Any) -> None:
        """Move the reference's own weights to this process's device (None: no reference)."""
        if reference is not None:
            reference.to(self.accelerator.device)

    # -------------------------------------------------------------------------------- the step
    def share(self, items: Sequence[T]) -> list[tuple[T, int]]:
        """This process's contiguous share of a step's micro-batches (or of eval batches) as ``(batch, weight)``
        pairs; weight-0 stand-ins fill a short share (``launch.rank_share``)."""
        return rank_share(items, self.rank, self.world_size)

    def gather(self, value: T) -> list[T]:
        """``value`` of every process, by rank (a collective; ``[value]`` in a one-process run)."""
        return gather_objects(value) if self.world_size > 1 else [value]

    def accumulating(self, model: nn.Module, boundary: bool) -> ContextManager:
        """The context of one micro-batch's forward and backward; ``boundary``: the last of this process's step,
        whose backward reduces the gradients over processes (DDP's ``no_sync`` holds the others back)."""
        return nullcontext() if boundary else self.accelerator.no_sync(model)

    def backward(self, model: nn.Module, loss: torch.Tensor, boundary: bool) -> None:
        """One micro-batch's backward (``boundary``: see ``accumulating``)."""
        self.accelerator.backward(loss)

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, update: bool) -> tuple[float, bool]:
        """``(gradient norm before clipping, whether the weights were updated)``.

        With ``update`` false (something in the step was not finite) nothing is measured or updated: ``(nan,
        False)``. Else the gradients are clipped to ``max_grad_norm`` (0: measured, not clipped), and the optimizer
        steps only when the norm is finite. The gradients are kept (``zero_grad`` clears them)."""
        if not update:
            return float("nan"), False
        grad_norm = self.clip_gradients(model)
        if not math.isfinite(grad_norm):
            return grad_norm, False
        optimizer.step()
        return grad_norm, True

    def clip_gradients(self, model: nn.Module) -> float:
        """Clip the gradients to ``max_grad_norm`` (0: no clipping); the norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm or float("inf")))

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Clear the gradients after a step (updated or skipped)."""
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------ what is saved
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The bare policy inside what ``prepare`` returned (or the policy itself)."""
        return self.accelerator.unwrap_model(model)

    def whole_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole weights, on the main process, where they are split across processes (a collective: every
        process calls it); None where every process holds them (read them from the model)."""
        return None

    def whole_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer's whole state for a checkpoint, complete on the main process (a collective where it is
        split: then keyed by parameter name); None before the first step where the backend has none yet."""
        return optimizer.state_dict()
