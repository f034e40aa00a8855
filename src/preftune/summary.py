"""What a training run reports from its totals (``metrics.RunTotals``): the record logged at each logging step, the
record logged when training ends (transformers' names) and ``summary.json``. Pure functions of the totals and the
history; the trainer logs and writes them."""

from __future__ import annotations

from typing import Any, Iterable

from preftune.data.pipeline import eval_key
from preftune.metrics import RunRecorder, RunTotals, peak_memory_mb


def training_record(run: RunTotals, grad_norm: float, learning_rate: float, elapsed: float) -> dict[str, Any]:
    """The metrics of the steps since the last log (means over their pairs) with the last step's gradient norm and
    learning rate, and the tokens per second of that window (``elapsed`` seconds)."""
    return {**run.window.means(), "grad_norm": grad_norm, "learning_rate": learning_rate,
            "tokens_per_second": run.window_tokens / elapsed if elapsed > 0 else 0.0}


def train_end_record(run: RunTotals, runtime: float, training_loss: float, steps: int, total_flos: float) -> dict:
    """The record transformers' Trainer logs when training ends: ``train_runtime``, ``train_samples_per_second``
    (pairs), ``train_steps_per_second`` (``steps`` taken in this session), ``total_flos`` and ``train_loss`` (the mean
    loss of the run); with an MoE load-balancing loss also its run mean ``aux_loss``."""
    record = {
        "train_runtime": runtime,
        "train_samples_per_second": run.session_pairs / runtime if runtime > 0 else 0.0,
        "train_steps_per_second": steps / runtime if runtime > 0 else 0.0,
        "total_flos": total_flos,
        "train_loss": training_loss,
    }
    run_means = run.run_loss.means()
    if "aux_loss" in run_means:  # MoE: the run's mean load-balancing loss, as train_loss is the run's mean loss
        record["aux_loss"] = run_means["aux_loss"]
    return record


def _without(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``record``'s ``prefix``-ed entries with the prefix cut off (``step`` and ``epoch`` left out)."""
    return {key[len(prefix) :]: value for key, value in record.items()
            if key.startswith(prefix) and key not in ("step", "epoch")}


def run_summary(recorder: RunRecorder, run: RunTotals, *, runtime: float, training_loss: float, global_step: int,
                epoch: float | None, num_processes: int, parallelism: str, data_report: dict[str, Any],
                config: dict[str, Any], eval_sets: Iterable[str | None]) -> dict[str, Any]:
    """``summary.json``: the last training and eval metrics, throughput, totals, how the processes shared the work
    (``parallelism``), skipped steps, peak memory, the data report, the config, the last metrics of each named eval
    set (``eval_<name>``) and the diagnostics (likelihood displacement, grad-norm spikes)."""
    train_records, eval_records = recorder.train_records, recorder.eval_records
    summary = {
        "train": _without(train_records[-1]) if train_records else {},
        "eval": _without(eval_records[-1], "eval_") if eval_records else {},
        "training_loss_mean": training_loss,
        "global_step": global_step,
        "epoch": epoch,
        "runtime_seconds": runtime,
        "pairs_per_second": run.session_pairs / runtime if runtime > 0 else 0.0,
        "tokens_per_second": run.session_tokens / runtime if runtime > 0 else 0.0,
        "total_pairs": run.total_pairs,
        "num_processes": num_processes,
        "parallelism": parallelism,
        "skipped_nonfinite_steps": {"count": len(run.skipped_steps), "steps": run.skipped_steps[:100]},
        "memory": peak_memory_mb(),
        "data": data_report,
        "config": config,
    }
    for name in eval_sets:  # named eval sets: their last metrics under "eval_<name>"
        if name is not None:
            prefix = f"{eval_key(name)}_"
            records = [record for record in recorder.history if f"{prefix}loss" in record]
            summary[eval_key(name)] = _without(records[-1], prefix) if records else {}
    summary["diagnostics"] = recorder.diagnostics()  # likelihood displacement, grad-norm spikes
    return summary
