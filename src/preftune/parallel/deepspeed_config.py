"""The DeepSpeed config of a ZeRO run: read (a JSON file or a dict; sections preftune does not take refused), its
``"auto"`` values filled from the preftune config and explicit values that disagree refused. Read when the config
loads, so that a bad file is named before any model loads. docs/distributed.md."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError

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
