"""How a run is split across processes: one ``Parallelism`` object per run, chosen once by ``build_parallelism``.

``base.py`` holds the interface the loop uses; each backend is one file (``data_parallel.py``: one process or DDP,
``fsdp.py``: FSDP2, ``zero.py``: DeepSpeed ZeRO, with its config in ``deepspeed_config.py``); ``launch.py`` holds
what every backend shares (the accelerator, the torchrun re-launch, the per-process share of a step, gathers).
A new backend is a new file with a ``Parallelism`` subclass and one line here.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate import Accelerator

from preftune.parallel.base import Parallelism
from preftune.parallel.data_parallel import DataParallel
from preftune.parallel.fsdp import FSDP
from preftune.parallel.launch import check_distributed_settings
from preftune.parallel.zero import ZeRO

logger = logging.getLogger(__name__)

__all__ = ["Parallelism", "build_parallelism"]


def build_parallelism(args: Any, accelerator: Accelerator) -> Parallelism:
    """The run's backend: FSDP2 for ``fsdp``, DeepSpeed ZeRO for ``deepspeed`` (either with several processes only;
    with one it is ignored, with a warning), else DDP (or one process). Refuses (ConfigError naming the key) a process
    count the config or the launcher contradicts."""
    check_distributed_settings(args, accelerator)
    several = accelerator.num_processes > 1
    if args.fsdp and several:
        return FSDP(args, accelerator)
    if args.fsdp:
        logger.warning("fsdp: %s ignored: this run has one process", args.fsdp)
    if args.deepspeed and several:
        return ZeRO(args, accelerator)
    if args.deepspeed:
        logger.warning("deepspeed ignored: this run has one process")
    return DataParallel(args, accelerator)
