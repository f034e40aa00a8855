"""FSDP2 (``fsdp: full_shard`` or ``shard_grad_op``): parameters, gradients and optimizer states sharded across the
processes with torch's ``fully_shard``; checkpoints gather the whole weights and optimizer state on the main process
(keyed by parameter name), so they are the files of a one-process run. docs/distributed.md."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from preftune.errors import ConfigError
from preftune.parallel.base import Parallelism

logger = logging.getLogger(__name__)


class FSDP(Parallelism):
    """The policy (and a separate reference model, forward only) sharded in place before the optimizer is made; every
    forward gathers parameters from all processes."""

    config_key = "fsdp"
    lockstep_forwards = True
    allows_padding_free = False

    @property
    def name(self) -> str:
        return f"fsdp {self.args.fsdp}"

    def prepare_models(self, model: nn.Module, reference: Any) -> None:
        """Shard the policy, and a separate frozen reference model too (forward-only, no optimizer)."""
        device, precision = self.accelerator.device, self.accelerator.mixed_precision
        shard_model(model.to(device), self.args.fsdp, precision)
        if reference is not None and reference.separate_model is not None:
            shard_model(reference.model.to(device), self.args.fsdp, precision, role="the reference model")

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, reference: Any,
                optimizer_state: dict[str, Any] | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        if optimizer_state is not None:
            self.load_optimizer_state(model, optimizer, optimizer_state)
        optimizer = self.accelerator.prepare(optimizer)  # the model is sharded already: accelerate would wrap it in DDP
        self.place_reference(reference)
        return model, optimizer

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Every process takes its shards of the whole state (keyed by parameter name; a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def clip_gradients(self, model: nn.Module) -> float:
        from torch.distributed.tensor import DTensor

        norm = self.accelerator.clip_grad_norm_(model.parameters(), self.args.max_grad_norm or float("inf"))
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # a DTensor over sharded gradients

    def whole_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole (unsharded) weights on the CPU; a tied weight once, under the name ``named_parameters`` gives it
        (as ``save_pretrained`` writes it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        return {name: value for name, value in state.items() if name in names}

    def whole_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Keyed by parameter name, on the CPU of the main process (the others get an empty dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def shard_model(model: nn.Module, fsdp: str, mixed_precision: str = "no", role: str = "the model") -> nn.Module:
    """Shard ``model`` in place with FSDP2 (``torch.distributed.fsdp.fully_shard``): each decoder layer, then the whole
    model (embeddings, final norm, LM head). ``full_shard`` reshards each layer's parameters after its forward;
    ``shard_grad_op`` keeps them gathered until the backward. Gradients are averaged over processes
    (reduce-scatter), as DDP's. ``mixed_precision`` "bf16"/"fp16": FSDP's own policy (computation in that dtype,
    gradients reduced in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    policy = MixedPrecisionPolicy(param_dtype=dtypes.get(mixed_precision), reduce_dtype=torch.float32)
    reshard = "full_shard" in fsdp.split()
    layers = _decoder_layers(model)
    if not layers:
        raise ConfigError(f"fsdp: cannot find the decoder layers of {type(model).__name__}", key="fsdp")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard, mp_policy=policy)
    # The root keeps its parameters gathered from forward to backward (FSDP's default for the root): the chunked LM
    # head uses the output layer's weight after the forward returns.
    fully_shard(model, mp_policy=policy)
    logger.info("FSDP2 (%s): %d decoder layers and %s sharded over %d processes", fsdp, len(layers), role,
                torch.distributed.get_world_size())
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM: the modules of its ``_no_split_modules`` classes."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]
