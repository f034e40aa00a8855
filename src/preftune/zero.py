"""DeepSpeed ZeRO (stages 0-3, with optimizer and parameter offload): the config and the engine.

``resolve_deepspeed_config`` reads a DeepSpeed config (file or dict), fills its ``"auto"`` values from the preftune
config and refuses values that disagree; ``initialize_policy`` / ``initialize_reference`` build the engines around
preftune's own AdamW (not through accelerate's plugin); ``whole_state_dict`` and ``whole_optimizer_state`` gather
what a checkpoint holds (the same files as an FSDP run's, no pickle).

Why preftune drives the engine itself, what it does not take from DeepSpeed, and stage 3: docs/distributed.md.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# Sections of a DeepSpeed config that preftune does not take, and why.
_SECTIONS_REFUSED = {
    "optimizer": "preftune builds AdamW from learning_rate, adam_beta1/2, adam_epsilon and weight_decay",
    "scheduler": "preftune builds the schedule from lr_scheduler_type, warmup_steps/warmup_ratio",
}


def read_deepspeed_config(value: str | os.PathLike | dict) -> dict[str, Any]:
    """The DeepSpeed config a ``deepspeed:`` value names: a dict as given, or a JSON file (a relative path from the
    working directory). ConfigError (key ``deepspeed``) naming the file when it cannot be read, is not a JSON object,
    or holds a section preftune does not take."""
    if isinstance(value, dict):
        config, source = copy.deepcopy(value), "the deepspeed dict"
    else:
        path = Path(value)
        source = str(path)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"deepspeed: no such DeepSpeed config file {path}", key="deepspeed") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"deepspeed: cannot read {path} as JSON: {error}", key="deepspeed") from None
        if not isinstance(config, dict):
            raise ConfigError(f"deepspeed: {path} holds a JSON {type(config).__name__}, expected an object", key="deepspeed")
    for section, reason in _SECTIONS_REFUSED.items():
        if section in config:
            raise ConfigError(
                f"deepspeed: {source} has a {section!r} section; {reason}: remove the section", key="deepspeed"
            )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: {source}: zero_optimization.stage must be 0, 1, 2 or 3", key="deepspeed")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def resolve_deepspeed_config(raw: dict[str, Any], args: Any, world_size: int, hidden_size: int | None) -> dict[str, Any]:
    """The config handed to ``deepspeed.initialize``: ``"auto"`` values filled from ``args``, explicit ones checked.

    The trainer marks accumulation boundaries itself, so DeepSpeed's ``gradient_accumulation_steps`` is 1 and its
    micro-batch is the trainer's (``per_device_train_batch_size``); ``train_batch_size`` follows from them.
    ``gradient_clipping`` is ``max_grad_norm`` (DeepSpeed's own default, 1.0, is never used silently)."""
    config = copy.deepcopy(raw)
    _settle(config, "train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "per_device_train_batch_size")
    if config.get("gradient_accumulation_steps", "auto") not in ("auto", args.gradient_accumulation_steps):
        raise ConfigError(
            f"deepspeed: gradient_accumulation_steps {config['gradient_accumulation_steps']} differs from "
            f"gradient_accumulation_steps {args.gradient_accumulation_steps}; set it to \"auto\"",
            key="deepspeed",
        )
    config["gradient_accumulation_steps"] = 1  # the trainer's own boundaries (engine.set_gradient_accumulation_boundary)
    global_batch = args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps
    if config.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ConfigError(
            f"deepspeed: train_batch_size {config['train_batch_size']} is not per_device_train_batch_size x processes "
            f"x gradient_accumulation_steps = {global_batch}; set it to \"auto\"",
            key="deepspeed",
        )
    config["train_batch_size"] = args.per_device_train_batch_size * world_size  # one micro-batch per process
    _settle(config, "gradient_clipping", float(args.max_grad_norm), "max_grad_norm")
    for precision, on in (("bf16", bool(args.bf16)), ("fp16", bool(args.fp16))):
        section = config.setdefault(precision, {})
        _settle(section, "enabled", on, precision, where=f"{precision}.enabled")
    zero = config.setdefault("zero_optimization", {})
    if hidden_size:
        for key, value in (
            ("reduce_bucket_size", hidden_size * hidden_size),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
            ("stage3_param_persistence_threshold", 10 * hidden_size),
        ):
            if zero.get(key) == "auto":
                zero[key] = value
    leftover = _auto_values(config)
    if leftover:
        raise ConfigError(f"deepspeed: preftune cannot fill \"auto\" for {', '.join(leftover)}; set a value", key="deepspeed")
    config.setdefault("zero_allow_untested_optimizer", True)  # preftune's own torch AdamW
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # ... also with optimizer offload
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def _settle(section: dict, key: str, value: Any, preftune_key: str, where: str | None = None) -> None:
    """``section[key]``: ``value`` when missing or "auto"; refused when it is set to something else."""
    given = section.get(key, "auto")
    if given != "auto" and given != value:
        raise ConfigError(
            f"deepspeed: {where or key} is {given!r} but {preftune_key} is {value!r}; set it to \"auto\" (preftune fills "
            "it) or make them agree",
            key="deepspeed",
        )
    section[key] = value


def _auto_values(config: Any, prefix: str = "") -> list[str]:
    if isinstance(config, dict):
        return [found for key, value in config.items() for found in _auto_values(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if config == "auto" else []


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


def whole_state_dict(engine: Any) -> dict[str, torch.Tensor]:
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


def whole_optimizer_state(engine: Any) -> dict[str, Any] | None:
    """The whole AdamW state of the engine's trainable parameters, keyed by parameter name (the format of FSDP's
    whole state, ``preftune.distributed.full_optimizer_state``), gathered from the partitions with DeepSpeed's public
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


def load_whole_optimizer_state(engine: Any, saved: dict[str, Any]) -> None:
    """Give every process its partitions of a state saved by ``whole_optimizer_state`` (a collective). The optimizer
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
