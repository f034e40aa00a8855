"""DeepSpeed ZeRO (stages 0-3, with optimizer and parameter offload): the engines preftune builds around its own
AdamW (not through accelerate's plugin), and the whole weights and optimizer state gathered from (and scattered back
into) DeepSpeed's partitions for checkpoints that are the same files as an FSDP run's, no pickle.

Why preftune drives the engine itself, what it does not take from DeepSpeed, and stage 3: docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch import nn

from preftune.errors import CheckpointError, ConfigError
from preftune.logprobs import unwrap_model
from preftune.parallel.base import Parallelism
from preftune.parallel.deepspeed_config import read_deepspeed_config, resolve_deepspeed_config, zero_stage

logger = logging.getLogger(__name__)


def start_deepspeed(backend: str | None = None) -> Any:
    """Import DeepSpeed for this process (the CPU accelerator where there is no GPU) and join the process group
    torch.distributed already holds. ConfigError when DeepSpeed is not installed."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as error:
        raise ConfigError(
            f"deepspeed is set but DeepSpeed cannot be imported ({error}); install it: pip install deepspeed",
            key="deepspeed",
        ) from None
    # DeepSpeed builds a C++ shared-memory op at process-group set-up on the CPU (tens of seconds, one process holding
    # a file lock while the others wait); only its inference all-reduce uses it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend or torch.distributed.get_backend())
    return deepspeed


def initialize_policy(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """The policy's ``DeepSpeedEngine`` over preftune's optimizer (the engine holds it as a ZeRO optimizer).

    With bf16/fp16 DeepSpeed casts the model to 16 bits and copies its fp32 master weights from the cast; the masters
    are then set back to the model's fp32 weights, so that training starts (or resumes) from them exactly."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    sixteen_bit = any(config.get(precision, {}).get("enabled") for precision in ("bf16", "fp16"))
    masters = {
        name: param.detach().to("cpu", torch.float32, copy=True)
        for name, param in model.named_parameters()
        if sixteen_bit and param.requires_grad
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for name, param in engine.module.named_parameters():
        if name in masters:
            safe_set_full_fp32_param(param, masters.pop(name).to(param.device))
    logger.info("DeepSpeed ZeRO stage %d over %d processes", zero_stage(config), torch.distributed.get_world_size())
    return engine


def initialize_reference(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """A frozen reference partitioned as the policy (stage 3, its parameter offload included): a forward-only engine
    (as TRL makes its reference under ZeRO-3); returns its module, frozen."""
    import deepspeed

    inference = {key: value for key, value in config.items() if not key.startswith("zero_force")}
    zero = config.get("zero_optimization", {})
    inference["zero_optimization"] = {key: value for key, value in zero.items() if key != "offload_optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=model, config=inference)
    module = engine.module
    module.eval()
    module.requires_grad_(False)
    return module


def _whole_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The whole weights of the engine's model on the main process (a collective: every process calls it); names as
    ``named_parameters``/``named_buffers`` give them (a tied weight once).

    With bf16/fp16 the model DeepSpeed runs holds 16-bit copies; the trained weights are the fp32 master weights
    (``safe_get_full_fp32_param``), which are what is saved, so that a checkpoint resumes exactly and the result
    matches a run without DeepSpeed (whose weights stay fp32 under autocast)."""
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers in the parameters' dtype (fp32 stays fp32)
    else:
        state = module.state_dict()
    state = state or {}
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        from deepspeed.utils import safe_get_full_fp32_param

        for name, param in module.named_parameters():
            if param.requires_grad:
                master = safe_get_full_fp32_param(param)
                if name in state:  # the main process
                    state[name] = master
    names = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    return {name: value.detach().cpu() for name, value in state.items() if name in names}


# ----------------------------------------------------------------------------------------- optimizer state
_ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _whole_optimizer_state(engine: Any) -> dict[str, Any] | None:
    """The whole AdamW state of the engine's trainable parameters, keyed by parameter name (the format of FSDP's
    whole state, ``FSDP.whole_optimizer_state``), gathered from the partitions with DeepSpeed's public
    ``safe_get_full_optimizer_state`` (a collective: every process calls it). None before the first step."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = engine.optimizer.optimizer  # preftune's torch AdamW, stepping the flat fp32 partitions
    step = next((state["step"] for state in base.state.values() if "step" in state), None)
    if step is None:
        return None
    _link_optimizer_states(engine)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            entry = {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone() for key in _ADAM_STATES}
            state[name] = {**entry, "step": torch.as_tensor(step).detach().cpu().clone()}
    groups = [{key: value for key, value in group.items() if key != "params"} for group in base.param_groups]
    return {"state": state, "param_groups": groups}


def _load_whole_optimizer_state(engine: Any, saved: dict[str, Any]) -> None:
    """Give every process its partitions of a state saved by ``_whole_optimizer_state`` (a collective). The optimizer
    states are created first (AdamW creates them lazily at its first step), then overwritten fragment by fragment."""
    from deepspeed.utils import safe_set_full_optimizer_state

    names = {name for name, param in engine.module.named_parameters() if param.requires_grad}
    if names != set(saved["state"]):
        raise CheckpointError(
            f"the saved optimizer state is for other parameters ({len(saved['state'])} saved, {len(names)} trainable here)"
        )
    base = engine.optimizer.optimizer
    step = float(next(iter(saved["state"].values()))["step"])
    fused = any(group.get("fused") for group in base.param_groups)
    for flat in _flat_partitions(engine):
        state = base.state[flat]
        for key in _ADAM_STATES:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
        state["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if fused else "cpu")
    _link_optimizer_states(engine)
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            for key in _ADAM_STATES:
                safe_set_full_optimizer_state(param, saved["state"][name][key].to(param.device), key)
    for group, saved_group in zip(base.param_groups, saved["param_groups"]):
        group.update({key: saved_group[key] for key in ("lr", "initial_lr") if key in saved_group})


def _link_optimizer_states(engine: Any) -> None:
    """Point every parameter's fragment mapping at the optimizer states (ZeRO-1/2). DeepSpeed 0.19 links them once,
    right after the first parameter group's first step, so the other groups' states (biases and norms here) stay
    unlinked and ``safe_get/set_full_optimizer_state`` fails for them; ZeRO-3 reads the states directly."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _flat_partitions(engine: Any) -> list[torch.Tensor]:
    """The flat fp32 tensors the AdamW steps (its state's keys): this process's partitions of each parameter group
    (ZeRO-3 takes them out of the optimizer's groups between steps)."""
    optimizer = engine.optimizer
    for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):  # stage 3, stages 1-2
        if hasattr(optimizer, attribute):
            return list(getattr(optimizer, attribute))
    return [flat for group in optimizer.optimizer.param_groups for flat in group["params"]]


class ZeRO(Parallelism):
    """DeepSpeed's engine over preftune's optimizer: it averages the gradients over processes at the boundaries the
    trainer marks, clips them to ``max_grad_norm`` and steps; stage 3 partitions the parameters, and a separate
    reference model's too."""

    config_key = "deepspeed"
    allows_padding_free = False

    def __init__(self, args: Any, accelerator: Any) -> None:
        super().__init__(args, accelerator)
        self.config = read_deepspeed_config(args.deepspeed)
        self.stage = zero_stage(self.config)
        self.lockstep_forwards = self.stage == 3
        self.holds_whole_output_layer = self.stage != 3  # stage 3: the model's forward projects (no chunked head)
        self.engine: Any = None  # the policy's DeepSpeedEngine, from ``prepare`` on

    @property
    def name(self) -> str:
        return f"deepspeed zero-{self.stage}"

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, reference: Any,
                optimizer_state: dict[str, Any] | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        """The policy's engine over ``optimizer`` (which the loop keeps, for the schedule); under stage 3 a separate
        reference model is partitioned too; a checkpoint's optimizer state goes into the engine's partitions."""
        start_deepspeed()
        hidden_size = getattr(unwrap_model(model).config, "hidden_size", None)
        config = resolve_deepspeed_config(self.config, self.args, self.world_size, hidden_size)
        engine = initialize_policy(model.to(self.accelerator.device), optimizer, config)
        if self.stage == 3 and reference is not None and reference.separate_model is not None:
            reference.model = initialize_reference(reference.model.to(self.accelerator.device), config)
        self.engine = engine
        if optimizer_state is not None:
            self.load_optimizer_state(engine, optimizer, optimizer_state)
        self.place_reference(reference)
        return engine, optimizer

    def place_reference(self, reference: Any) -> None:
        if self.stage != 3 or self.engine is None:  # a stage-3 run's separate reference lives in its engine's partitions
            super().place_reference(reference)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        _load_whole_optimizer_state(self.engine, state)

    def accumulating(self, model: nn.Module, boundary: bool) -> ContextManager:
        return nullcontext()  # the engine reduces at the boundary ``backward`` marks

    def backward(self, model: nn.Module, loss: torch.Tensor, boundary: bool) -> None:
        model.set_gradient_accumulation_boundary(boundary)
        model.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, update: bool) -> tuple[float, bool]:
        """``engine.step()``: clipping, the update and zeroed gradients in one call. DeepSpeed measures the norm only
        within it, so a non-finite norm is known after the update (``updated`` is then True)."""
        if not update:
            return float("nan"), False
        model.step()
        return float(model.get_global_grad_norm()), True

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        return None  # the engine's step zeroed them

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if self.engine is not None and model is self.engine else super().unwrap(model)

    def whole_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        return _whole_state_dict(self.engine) if self.engine is not None else None

    def whole_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        return _whole_optimizer_state(self.engine)
