"""A training run's state saved as ``checkpoint-<step>`` and read back to resume, through the run's ``Parallelism``:
it gathers the whole weights and optimizer state where they are split across processes (and, at resume, loads the
optimizer state back in ``Parallelism.prepare``). The files, their atomic writing and their verification:
``preftune.checkpoint``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from preftune.adapters import save_trainable_weights
from preftune.checkpoint import (
    checkpoint_run,
    prune_checkpoints,
    read_checkpoint,
    resolve_resume_path,
    rng_states,
    write_checkpoint,
)
from preftune.errors import CheckpointError
from preftune.parallel import Parallelism
from preftune.preflight import check_resume_fingerprint

logger = logging.getLogger(__name__)


class ResumePoint(NamedTuple):
    """A checkpoint to resume from, checked (``open_resume_checkpoint``); its parts as ``read_checkpoint`` gives them."""

    path: Path
    run_id: str | None  # None: written before run ids
    trainer_state: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]  # this process's RNG states


def save_training_checkpoint(
    parallelism: Parallelism, model: nn.Module, optimizer: Any, scheduler: Any, target: Path, *, tokenizer: Any,
    trainer_state: dict[str, Any], with_optimizer: bool, keep: int, run_id: str, best: Path | None,
) -> None:
    """Write ``target`` (``output_dir/checkpoint-<step>``) atomically from the main process, with every process's RNG
    states and, ``with_optimizer``, the optimizer and scheduler state; then keep the newest ``keep`` of ``run_id``'s
    checkpoints (0: all; ``best`` is never deleted). Never writes non-finite weights (logged as an error instead).
    A collective where weights or optimizer state are split: every process calls it; it does not wait for the write."""
    per_rank_rng = parallelism.gather(rng_states()) if parallelism.world_size > 1 else None
    weights = parallelism.whole_weights(model)  # None: read them from the model
    optimizer_state = parallelism.whole_optimizer_state(model, optimizer) if with_optimizer else None
    if not parallelism.accelerator.is_main_process:
        return
    unwrapped = parallelism.unwrap(model)
    trainable = weights.values() if weights is not None else (p for p in unwrapped.parameters() if p.requires_grad)
    if not all(torch.isfinite(value).all() for value in trainable):
        logger.error("step %d: the weights hold non-finite values; checkpoint not written", trainer_state["global_step"])
        return
    written = write_checkpoint(
        target,
        save_weights=lambda directory: save_trainable_weights(unwrapped, tokenizer, directory, weights),
        trainer_state=trainer_state,
        optimizer_state=optimizer_state,
        scheduler_state=None if optimizer_state is None else scheduler.state_dict(),
        rank_rng_states=per_rank_rng,
    )
    prune_checkpoints(target.parent, keep, newest=written, run_id=run_id, best=best)


def open_resume_checkpoint(spec: str, output_dir: Path, *, world_size: int, rank: int, fingerprint: dict[str, Any],
                           args: Any) -> ResumePoint:
    """The checkpoint ``spec`` names (a folder, or ``latest`` in ``output_dir``), read for process ``rank``; refused
    (CheckpointError) unless it holds optimizer and scheduler state, was written by ``world_size`` processes (the
    global batch and data position depend on it) and by a run of this ``fingerprint``
    (``preflight.check_resume_fingerprint``)."""
    path = resolve_resume_path(spec, output_dir)
    saved = read_checkpoint(path, rank=rank)
    if saved["optimizer"] is None or saved["scheduler"] is None:
        raise CheckpointError(f"{path} holds no optimizer/scheduler state (saved with save_only_model): cannot resume")
    saved_world_size = saved["trainer_state"].get("world_size", 1)
    if saved_world_size != world_size:
        raise CheckpointError(
            f"{path} was written by a run of {saved_world_size} process(es), this run has {world_size}: "
            "the global batch (per_device_train_batch_size x processes x gradient_accumulation_steps) and the data "
            "position would differ; resume with the same number of processes"
        )
    saved_run_id, saved_fingerprint = checkpoint_run(path)
    check_resume_fingerprint(saved_fingerprint, fingerprint, path, args)
    return ResumePoint(path, saved_run_id, saved["trainer_state"], saved["optimizer"], saved["scheduler"], saved["rng"])
