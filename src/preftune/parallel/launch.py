"""Launching and splitting a run over several processes, the same for every backend.

The accelerator (``build_accelerator``; DDP through accelerate, gloo on CPU) and the checks of the launch
(``check_distributed_settings``), the ``nproc`` re-launch under torchrun, each process's contiguous share of a step's
micro-batches as ``(batch, weight)`` pairs (``rank_share``) and gathers of Python values (``gather_objects``). With N
processes a run takes exactly the steps of a one-process run with N times the gradient accumulation.

The split, the loss scaling, stand-in micro-batches and seeds: docs/distributed.md.
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


def rank_share(items: Sequence[T], rank: int, world_size: int) -> list[tuple[T, int]]:
    """Process ``rank``'s contiguous share of ``items`` as ``(item, weight)`` pairs, ``ceil(len / world_size)`` of
    them on every process: its own items weigh 1; where the last processes' shares run short they are filled with
    stand-ins of weight 0 (``items[0]``: a real item, whose loss counts 0), so that every process runs as many
    forwards and backwards. The weight-1 items of the shares, concatenated in rank order, are ``items``."""
    per_rank = math.ceil(len(items) / world_size)
    share = [(item, 1) for item in items[rank * per_rank : (rank + 1) * per_rank]]
    return share + [(items[0], 0)] * (per_rank - len(share))


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
