"""Several processes (one per device): how a run is split across them, and how it is launched.

The accelerator (``build_accelerator``; DDP through accelerate, gloo on CPU), the ``nproc`` re-launch under torchrun,
each process's contiguous share of a step's micro-batches (``rank_share``), gathers of Python values, and FSDP2
sharding with the whole weights and optimizer state gathered for checkpoints. With N processes a run takes exactly
the steps of a one-process run with N times the gradient accumulation.

The split, the loss scaling, stand-in micro-batches, seeds and FSDP: docs/distributed.md.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import subprocess
import sys
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from torch import nn

from preftune.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Set in the processes that ``relaunch`` starts, so that they never re-launch again.
RELAUNCHED_ENV = "PREFTUNE_RELAUNCHED"


def launched_world_size() -> int:
    """Processes of the launcher this process runs under (``WORLD_SIZE`` of torchrun / accelerate launch), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def build_accelerator(args: Any) -> Accelerator:
    """The run's ``Accelerator``: mixed precision from ``bf16``/``fp16``; several processes on CPU use gloo.

    accelerate picks a distributed CPU run only when told ``cpu=True``; without it, processes under torchrun on a
    machine without GPU would each train alone on the whole data. ``ddp_timeout`` bounds every collective.

    DDP's buffer broadcast is off: it runs at every forward, so processes whose micro-batches take different numbers
    of forwards (padding-free batches go row by row) would fall out of step; a causal LM's buffers (rotary
    frequencies) are constants that never need syncing. Gradients are the only thing DDP communicates.
    """
    instead = {
        "deepspeed": "set `deepspeed: <DeepSpeed JSON config>` in the preftune config instead (preftune drives "
                     "DeepSpeed's engine itself)",
        "fsdp": "set `fsdp: full_shard` in the preftune config instead",
    }
    selected = (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", "deepspeed"), ("ACCELERATE_USE_FSDP", "FSDP", "fsdp"))
    for variable, engine, key in selected:
        if os.environ.get(variable, "false").lower() == "true":  # set by `accelerate launch` from its config
            raise ConfigError(
                f"not supported yet: training under {engine} selected by the accelerate config; use an accelerate "
                f"config with distributed_type: MULTI_GPU (or MULTI_CPU, or `preftune train --nproc N`) and "
                f"{instead[key]}",
                key=key,
            )
    cpu = bool(args.use_cpu) or (launched_world_size() > 1 and not _has_accelerator_device())
    return Accelerator(
        mixed_precision="bf16" if args.bf16 else ("fp16" if args.fp16 else "no"),
        cpu=cpu,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
            DistributedDataParallelKwargs(**ddp_options(args)),
        ],
    )


def ddp_options(args: Any) -> dict[str, Any]:
    """DDP's options from the config's ``ddp_*`` keys; unset ones keep DDP's defaults, except ``broadcast_buffers``
    (off, see ``build_accelerator``)."""
    options = {"find_unused_parameters": args.ddp_find_unused_parameters, "bucket_cap_mb": args.ddp_bucket_cap_mb,
               "static_graph": args.ddp_static_graph}
    options = {name: value for name, value in options.items() if value is not None}
    options["broadcast_buffers"] = bool(args.ddp_broadcast_buffers)
    return options


def check_distributed_settings(args: Any, accelerator: Accelerator) -> None:
    """Refuse what cannot work with this number of processes (ConfigError naming the key)."""
    processes = accelerator.num_processes
    if args.nproc is not None and args.nproc > 1 and processes == 1:
        raise ConfigError(
            f"nproc: {args.nproc} but this is a single process: `preftune train` re-launches itself under torchrun; "
            "from Python, start the script with `torchrun --nproc_per_node N` or `accelerate launch`",
            key="nproc",
        )
    if args.nproc is not None and processes > 1 and args.nproc != processes:
        raise ConfigError(
            f"nproc: {args.nproc} but the launcher started {processes} processes; set nproc to {processes} or leave "
            "it out",
            key="nproc",
        )
    distributed_type = str(accelerator.distributed_type).split(".")[-1]
    if processes > 1 and distributed_type not in ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU"):
        raise ConfigError(
            f"this run has {processes} processes under accelerate's {distributed_type} mode; preftune runs DDP (plain "
            "`accelerate launch` / torchrun), FSDP and DeepSpeed through its own `fsdp` and `deepspeed` keys, not "
            "accelerate's FSDP or DeepSpeed plugins",
            key={"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(distributed_type),
        )


def rank_share(items: Sequence[T], rank: int, world_size: int) -> list[T | None]:
    """Process ``rank``'s contiguous share of ``items``: ``ceil(len / world_size)`` entries (the last processes' shares
    may run short; they are padded with None), so that concatenating the shares in rank order gives ``items``."""
    per_rank = math.ceil(len(items) / world_size)
    share: list[T | None] = list(items[rank * per_rank : (rank + 1) * per_rank])
    return share + [None] * (per_rank - len(share))


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


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) weights of an FSDP-sharded model, on the CPU (a collective: every process calls it).

    A tied weight appears once, under the name ``named_parameters`` gives it (as ``save_pretrained`` writes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state.items() if name in names}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state of an FSDP-sharded model, keyed by parameter name, on the CPU of the main process
    (the others get an empty dict; a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Give every process its shards of a whole optimizer state saved by ``full_optimizer_state`` (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def gather_objects(value: T) -> list[T]:
    """``value`` of every process, by rank (a collective: every process must call it)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def relaunch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m preftune.cli <argv>``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "preftune.cli", *argv,
    ]


def should_relaunch(nproc: int | None) -> bool:
    """True when ``nproc`` asks for several processes and this process was not started by a launcher."""
    return bool(nproc and nproc > 1) and launched_world_size() == 1 and not os.environ.get(RELAUNCHED_ENV)


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run the command again as ``nproc`` processes under torchrun; returns torchrun's exit code."""
    command = relaunch_command(nproc, argv)
    logger.info("launching %d processes: %s", nproc, shlex.join(command))
    environment = {**os.environ, RELAUNCHED_ENV: "1"}
    return subprocess.run(command, env=environment, check=False).returncode
