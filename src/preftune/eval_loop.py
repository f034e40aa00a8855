"""The trainer's evaluation of tokenized eval sets: mean metrics over the set's micro-batches (each process its
share, as in training), TRL's ``compute_metrics`` on the rewards, and the best-metric bookkeeping of
``load_best_model_at_end`` / ``save_strategy: best``."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from transformers import EvalPrediction, TrainerState

from preftune.batches import BatchMaker, LazyBatch
from preftune.config import DPOConfig
from preftune.errors import ConfigError
from preftune.metrics import MetricAccumulator
from preftune.objective import BatchLoss
from preftune.parallel import Parallelism


def mean_metrics(score: Callable[[LazyBatch, bool], BatchLoss], dataset: Any, *, batch_maker: BatchMaker,
                 parallelism: Parallelism, batch_size: int) -> tuple[dict[str, float], list]:
    """``(mean metrics, rewards of each micro-batch)`` over ``dataset``, the same on every process.

    ``score(lazy, counted)`` is one micro-batch's ``BatchLoss``; each process scores its contiguous share, a weight-0
    stand-in only where every forward gathers parameters from all processes (``lockstep_forwards``); the results
    are gathered in batch order. A micro-batch's rewards are a ``(pairs, 1 + negatives)`` array, None for unpaired
    data.
    """
    batches = batch_maker.batches(dataset, batch_size, shuffle_seed=None, drop_last=False)
    results = []
    for lazy, weight in parallelism.share(batches):
        if not weight and not parallelism.lockstep_forwards:
            continue
        result = score(lazy, weight > 0)
        if weight:
            rewards = None if result.rewards is None else result.rewards.float().cpu().numpy()
            results.append((result.sums, rewards))
    results = [entry for results_of_rank in parallelism.gather(results) for entry in results_of_rank]
    accumulator = MetricAccumulator()
    for sums, _ in results:
        accumulator.add(sums)
    return accumulator.means(), [rewards for _, rewards in results]


def computed_metrics(compute_metrics: Callable | None, rewards: list, prefix: str) -> dict[str, float]:
    """``compute_metrics`` on an eval set's rewards ``(pairs, 1 + negatives)`` (chosen first), with label 0 (the
    chosen column is preferred) for every pair; its keys get the metric prefix. Empty without ``compute_metrics``
    or rewards (unpaired data)."""
    if compute_metrics is None or not rewards or any(r is None for r in rewards):
        return {}
    predictions = np.concatenate(rewards)
    labels = np.zeros(len(predictions), dtype=np.int64)
    computed = compute_metrics(EvalPrediction(predictions=predictions, label_ids=labels)) or {}
    return {key if key.startswith(f"{prefix}_") else f"{prefix}_{key}": value for key, value in computed.items()}


def track_best_metric(args: DPOConfig, state: TrainerState, metrics: dict[str, float]) -> bool:
    """``metric_for_best_model``: keep the best value so far and its step in ``state.best_metric`` and
    ``state.best_global_step``; higher or lower is better by ``greater_is_better`` (default: lower for names ending
    in "loss", as transformers). Returns whether ``metrics`` improved on the best. Without ``metric_for_best_model``
    the metric is ``loss`` when ``load_best_model_at_end`` is set, else nothing is tracked."""
    name = args.metric_for_best_model
    if not name:
        if not args.load_best_model_at_end:
            return False
        name = "loss"
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:
        raise ConfigError(f"metric_for_best_model {name!r} is not among the eval metrics "
                          f"({', '.join(sorted(metrics))})", key="metric_for_best_model")
    greater = args.greater_is_better
    greater = (not name.endswith("loss")) if greater is None else greater
    value, best = metrics[key], state.best_metric
    if best is None or (value > best if greater else value < best):
        state.best_metric, state.best_global_step = value, state.global_step
        return True
    return False
