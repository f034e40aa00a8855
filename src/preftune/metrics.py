"""Metrics: per-batch DPO statistics, their accumulation (a batch's sums, the loop's ``RunTotals``), and the run's
output files (``RunRecorder``; ``ReplicaRecorder`` on the other processes writes none).

Names follow TRL: ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``, ``logps/{chosen,rejected}``,
``logits/{chosen,rejected}``. Rewards are ``β·(log π − log π_ref)`` of summed log-probs; logits are the
vocabulary-mean logit averaged over completion tokens. Eval records carry the same names prefixed ``eval_``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import resource
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from preftune import atomic
from preftune.diagnostics import DisplacementDetector, DisplacementFinding, run_diagnostics
from preftune.logprobs import PairLogProbs

logger = logging.getLogger(__name__)

PLOTTED_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def _mean_over_negatives(values: Tensor) -> Tensor:
    """``(B,)`` as is; ``(B, M)`` (several negatives) averaged over the M negatives."""
    return values.mean(dim=1) if values.dim() == 2 else values


def pair_metric_sums(
    per_example_loss: Tensor,
    policy: PairLogProbs,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    nll: Tensor | None = None,
    components: dict[str, Tensor] | None = None,
    aux_loss: Tensor | None = None,
) -> dict[str, float]:
    """Sums over the batch's pairs (and tokens, for logits) of each metric; ``MetricAccumulator`` averages them.

    With several negatives (rejected tensors ``(B, M)``), each pair's rejected reward, log-prob and accuracy
    (chosen reward above that negative's) are averaged over its negatives; logits stay token-weighted over all
    rejected tokens. Returns the sums plus ``pairs`` and ``count:<metric>`` denominators for token-weighted ones,
    so that batches of different sizes combine exactly. ``aux_loss`` (the batch's MoE load-balancing loss, one
    value per forward) counts once per pair, so the logged ``aux_loss`` is its pair-weighted mean over batches.
    """
    with torch.no_grad():
        chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
        beats = (chosen[:, None] > rejected).float() if rejected.dim() == 2 else (chosen > rejected).float()
        sums = {
            "pairs": float(per_example_loss.numel()),
            "loss": float(per_example_loss.detach().sum()),
            "rewards/chosen": float(chosen.sum()),
            "rewards/rejected": float(_mean_over_negatives(rejected).sum()),
            "rewards/margins": float((chosen - _mean_over_negatives(rejected)).sum()),
            "rewards/accuracies": float(_mean_over_negatives(beats).sum()),
            "logps/chosen": float(policy.chosen_logps.detach().sum()),
            "logps/rejected": float(_mean_over_negatives(policy.rejected_logps.detach()).sum()),
            "logits/chosen": float(policy.chosen_logits_sum.sum()),
            "count:logits/chosen": float(policy.chosen_lengths.sum()),
            "logits/rejected": float(policy.rejected_logits_sum.sum()),
            "count:logits/rejected": float(policy.rejected_lengths.sum()),
        }
        if nll is not None:
            sums["nll_loss"] = float(nll.detach().sum())
        for name, values in (components or {}).items():
            sums[f"loss/{name}"] = float(values.detach().sum())
        if aux_loss is not None:
            sums["aux_loss"] = float(aux_loss.detach()) * sums["pairs"]
        return sums


def unpaired_metric_sums(
    per_example_loss: Tensor, logps: Tensor, rewards: Tensor, labels: Tensor, kl: Tensor, aux_loss: Tensor | None = None
) -> dict[str, float]:
    """KTO metrics (TRL's KTO names): ``rewards/chosen`` and ``logps/chosen`` average over desirable rows,
    ``.../rejected`` over undesirable ones, ``rewards/margins`` is their difference of means (computed from the
    accumulated means), ``kl`` the batch KL estimate z₀ (averaged over batches, weighted by rows)."""
    with torch.no_grad():
        desirable = labels.bool()
        rows = float(per_example_loss.numel())
        sums = {"pairs": rows, "loss": float(per_example_loss.detach().sum()), "kl": float(kl) * rows}
        if aux_loss is not None:  # as in pair_metric_sums
            sums["aux_loss"] = float(aux_loss.detach()) * rows
        for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
            sums[f"rewards/{name}"] = float(rewards.detach()[mask].sum())
            sums[f"count:rewards/{name}"] = float(mask.sum())
            sums[f"logps/{name}"] = float(logps.detach()[mask].sum())
            sums[f"count:logps/{name}"] = float(mask.sum())
        return sums


class MetricAccumulator:
    """Adds up metric sums and returns means: per pair, or per ``count:<metric>`` where a sum carries one."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, sums: dict[str, float]) -> None:
        for key, value in sums.items():
            self.sums[key] += value

    @property
    def pairs(self) -> int:
        return int(self.sums.get("pairs", 0))

    def means(self) -> dict[str, float]:
        pairs = self.sums.get("pairs", 0.0)
        if not pairs:
            return {}
        out = {}
        for key, value in self.sums.items():
            if key == "pairs" or key.startswith("count:"):
                continue
            denominator = self.sums.get(f"count:{key}", pairs)
            if denominator:  # a metric over no rows (e.g. no undesirable row in a KTO window) is left out
                out[key] = value / denominator
        if "count:rewards/chosen" in self.sums and "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]  # unpaired: difference of means
        return out

    def reset(self) -> None:
        self.sums.clear()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and of the CUDA allocator when a GPU is used), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _readable_json(value: Any) -> str:
    """JSON with non-ASCII text written as itself, so Chinese run names and paths stay readable; a document holding
    a lone surrogate (undecodable bytes of a command-line argument or path) is not UTF-8, so it keeps \\u escapes."""
    text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, indent=2, default=str)
    return text


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunRecorder:
    """Keeps the log history of a run and writes its files into ``output_dir``.

    Files: ``log_history.json`` (list of records), ``training_metrics.csv`` (one row per training log),
    ``training_curves.png`` and ``summary.json``. History files are rewritten (atomically) at every log,
    so an interrupted run still leaves readable files.

    Every training record also goes through a ``DisplacementDetector`` (``preftune.diagnostics``): it logs one
    warning when ``logps/chosen`` and ``logps/rejected`` fall together; ``diagnostics()`` returns its finding and the
    grad-norm spikes for ``summary.json``, and the plot shades the span on the log-prob panels.
    """

    warns = True  # whether this recorder's detector logs its warning (a subclass for replica processes: False)

    def __init__(self, output_dir: str | Path, *, plot: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.plot = plot
        self.history: list[dict[str, Any]] = []
        self.displacement = DisplacementDetector(warn=self.warns)

    def log(self, record: dict[str, Any]) -> None:
        self.history.append({key: _json_safe(value) for key, value in record.items()})
        self.displacement.update(record)
        self._write_history()

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Continue from a checkpoint's history: records logged after it (by the interrupted run) are dropped, so
        the files hold every step exactly once. The detector replays the history silently; a finding in it is
        logged again once, as a reminder."""
        self.history[:] = history
        self.displacement = DisplacementDetector(self.displacement.settings, warn=False)
        for record in history:
            self.displacement.update(record)
        self.displacement.warn = self.warns
        if self.warns and self.displacement.finding is not None:
            logger.warning("(before the resumed checkpoint) %s", self.displacement.finding.message())
        self._write_history()

    def diagnostics(self) -> dict[str, Any]:
        """``summary.json["diagnostics"]``: likelihood displacement (or None) and grad-norm spikes."""
        return run_diagnostics(self.history, self.displacement.finding)

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.history if "loss" in r]

    @property
    def eval_records(self) -> list[dict[str, Any]]:
        return [r for r in self.history if "eval_loss" in r]

    def _write_history(self) -> None:
        atomic.write_text(self.output_dir / "log_history.json", json.dumps(self.history, indent=2))
        rows = self.train_records
        if not rows:
            return
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]
        with atomic.open_atomic(self.output_dir / "training_metrics.csv", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.output_dir / "summary.json"
        atomic.write_text(path, _readable_json(summary))
        return path

    def write_plot(self) -> Path | None:
        if not self.plot or not self.train_records:
            return None
        path = self.output_dir / "training_curves.png"
        plot_curves(self.train_records, self.eval_records, path, displacement=self.displacement.finding)
        return path


class ReplicaRecorder(RunRecorder):
    """The history of a process other than the main one: kept in memory (for ``train()``'s result), never written."""

    warns = False  # the main process logs the likelihood-displacement warning

    def _write_history(self) -> None:
        return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        return None

    def write_plot(self) -> None:
        return None


@dataclass
class RunTotals:
    """The loop's running totals, saved in checkpoints so that a resumed run continues them exactly."""

    window: MetricAccumulator = field(default_factory=MetricAccumulator)  # metrics since the last log
    run_loss: MetricAccumulator = field(default_factory=MetricAccumulator)  # loss over the whole run
    window_tokens: int = 0
    total_pairs: int = 0
    total_tokens: int = 0
    last_eval_step: int = -1
    skipped_steps: list[int] = field(default_factory=list)
    session_pairs: int = 0  # this process only (for pairs/s), not checkpointed
    session_tokens: int = 0

    def add_step(self, step_sums: list[tuple[dict[str, float], int]], pairs: int) -> None:
        for sums, tokens in step_sums:
            self.window.add(sums)
            self.run_loss.add({key: sums[key] for key in ("pairs", "loss", "aux_loss") if key in sums})
            self.window_tokens += tokens
            self.total_tokens += tokens
            self.session_tokens += tokens
        self.total_pairs += pairs
        self.session_pairs += pairs

    def reset_window(self) -> None:
        self.window.reset()
        self.window_tokens = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": dict(self.window.sums), "run_loss": dict(self.run_loss.sums), "window_tokens": self.window_tokens,
            "total_pairs": self.total_pairs, "total_tokens": self.total_tokens, "last_eval_step": self.last_eval_step,
            "skipped_steps": list(self.skipped_steps),
        }

    def load(self, saved: dict[str, Any]) -> None:
        self.window.sums.update(saved["window"])
        self.run_loss.sums.update(saved["run_loss"])
        self.window_tokens, self.total_pairs, self.total_tokens = saved["window_tokens"], saved["total_pairs"], saved["total_tokens"]
        self.last_eval_step, self.skipped_steps = saved["last_eval_step"], list(saved["skipped_steps"])


def _series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record["step"])
            values.append(value)
    return steps, values


def plot_curves(
    train: list[dict[str, Any]], evals: list[dict[str, Any]], path: Path, *, displacement: DisplacementFinding | None = None
) -> None:
    """One panel per metric in ``PLOTTED_METRICS``: training curve, eval points where present; a likelihood
    displacement's step range is shaded (red) on the ``logps/*`` panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = math.ceil(len(PLOTTED_METRICS) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, PLOTTED_METRICS):
        steps, values = _series(train, key)
        axis.plot(steps, values, label="train", color="tab:blue")
        eval_steps, eval_values = _series(evals, f"eval_{key}")
        if eval_values:
            axis.plot(eval_steps, eval_values, "o-", label="eval", color="tab:orange")
        if displacement is not None and key.startswith("logps/"):
            axis.axvspan(displacement.start_step, displacement.end_step, color="tab:red", alpha=0.15,
                         label="likelihood displacement")
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if eval_values or (displacement is not None and key.startswith("logps/")):
            axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(PLOTTED_METRICS) :]:
        axis.axis("off")
    save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> None:
    """A matplotlib figure laid out, written as PNG (100 dpi) atomically (``preftune.atomic``), then closed."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        with atomic.open_atomic(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
