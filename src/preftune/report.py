"""``preftune report OUTPUT_DIR``: the story of a training run, read from the files the trainer wrote.

Reads ``log_history.json`` (required) and ``summary.json`` (optional: the config with β and the learning rate,
and the diagnostics). Tells: how loss, margins, accuracy and the chosen/rejected log-probs moved, whether the
likelihood-displacement detector fired (``preftune.diagnostics``), gradient-norm spikes, the eval results, and what
to try next.

Each series is described twice: overall, "up"/"down" from its first logged value to its last ("flat" within 1 %
of the larger magnitude), and over the last third of the run (at least its last 5 logs: on fewer the test can never
be significant; none with fewer than 5 logs in all), "rising"/"falling" when the Mann-Kendall trend test is
significant (|z| >= 1.96), "flat" otherwise (a noisy end is judged by the latter).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.diagnostics import DISPLACEMENT_REMEDIES, detect_displacement, grad_norm_spikes, mann_kendall_z
from preftune.errors import DataError

TREND_Z = 1.96  # |Mann-Kendall z| above which the late part of a series counts as rising or falling
FLAT_FRACTION = 0.01  # an overall change within this fraction of the series' magnitude is "flat"

# Thresholds of the advice rules (see ``advice``).
CHANCE_ACCURACY = 0.6  # final train accuracy at or below this: DPO has not separated chosen from rejected
OVERFIT_GAP = 0.15  # train accuracy minus eval accuracy above this: overfitting
EVAL_RISE = 0.05  # last eval loss above the lowest earlier one by more than this fraction: overfitting


@dataclass(frozen=True)
class SeriesTrend:
    """A logged metric over the logs: first and last value, the overall change (module docstring) and the trend of
    its last third (None with fewer than 5 logs)."""

    key: str
    first: float
    last: float
    change: float
    overall: str  # "up", "down" or "flat"
    late: str | None  # "rising", "falling" or "flat"
    count: int

    def describe(self) -> str:
        late = f"; last third: {self.late}" if self.late else ""
        return f"{self.key}: {self.first:.4g} -> {self.last:.4g} ({self.overall} overall{late}; {self.count} logs)"


@dataclass
class RunReport:
    """What ``preftune report`` prints (``format()``) or dumps (``to_dict()``)."""

    output_dir: str
    steps: int
    settings: dict[str, Any]
    trends: dict[str, SeriesTrend]
    eval_last: dict[str, float]
    eval_trends: dict[str, SeriesTrend]
    displacement: dict[str, Any] | None
    spikes: list[dict[str, Any]]
    skipped_steps: int
    eval_loss_rise: tuple[int, float, float] | None = None  # (step of the lowest eval loss, lowest, last)
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": self.output_dir, "steps": self.steps, "settings": self.settings,
            "trends": {key: vars(trend) for key, trend in self.trends.items()},
            "eval_last": self.eval_last, "eval_trends": {key: vars(t) for key, t in self.eval_trends.items()},
            "likelihood_displacement": self.displacement, "grad_norm_spikes": self.spikes,
            "skipped_nonfinite_steps": self.skipped_steps, "advice": self.advice, "notes": self.notes,
        }

    def format(self) -> str:
        lines = [f"Run in {self.output_dir}: {self.steps} optimizer steps"]
        if self.settings:
            lines.append("Settings: " + ", ".join(f"{key} {value}" for key, value in self.settings.items()))
        lines += [f"  note: {note}" for note in self.notes]
        lines.append("Training (first log -> last log):")
        lines += [f"  {trend.describe()}" for trend in self.trends.values()]
        if self.eval_last:
            lines.append("Eval (last):  " + ", ".join(f"{key} {value:.4g}" for key, value in self.eval_last.items()))
            lines += [f"  {trend.describe()}" for trend in self.eval_trends.values()]
        if self.displacement:
            lines.append(
                f"Likelihood displacement: steps {self.displacement['start_step']}-{self.displacement['end_step']}: "
                "logps/chosen fell together with logps/rejected."
            )
        else:
            lines.append("Likelihood displacement: not detected.")
        if self.spikes:
            shown = ", ".join(f"step {s['step']} ({s['grad_norm']:.3g} vs median {s['median_before']:.3g})" for s in self.spikes[:5])
            more = f" and {len(self.spikes) - 5} more" if len(self.spikes) > 5 else ""
            lines.append(f"Gradient-norm spikes: {len(self.spikes)}: {shown}{more}")
        else:
            lines.append("Gradient-norm spikes: none.")
        if self.skipped_steps:
            lines.append(f"Skipped updates (non-finite loss or gradient): {self.skipped_steps}")
        lines.append("What to try next:")
        lines += [f"  - {item}" for item in self.advice]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- reading
def read_log_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``output_dir/log_history.json``; ``DataError`` naming the file when missing or malformed."""
    path = Path(output_dir) / "log_history.json"
    if not Path(output_dir).is_dir():
        raise DataError("no such output directory (expected a training run's output_dir)", file=str(output_dir))
    if not path.is_file():
        raise DataError("missing: is this a training run's output_dir? (the trainer writes it at the first log)",
                        file=str(path))
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read: {error}", file=str(path)) from None
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise DataError("expected a JSON list of log records (objects)", file=str(path))
    for index, record in enumerate(records):
        if not isinstance(record.get("step"), int):
            raise DataError("record without an integer 'step'", file=str(path), row=index, field="step")
    return records


def read_summary(output_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(summary, None)``, or ``(None, why)`` when ``summary.json`` is absent (a run still going) or unreadable."""
    path = Path(output_dir) / "summary.json"
    if not path.is_file():
        return None, "no summary.json (run not finished, or interrupted): settings and diagnostics from the log only"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as error:
        return None, f"{path} is unreadable ({error}); using the log only"
    if not isinstance(summary, dict):
        return None, f"{path} is not a JSON object; using the log only"
    return summary, None


# -------------------------------------------------------------------------------------------------- analysing
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series_trend(records: list[dict[str, Any]], key: str) -> SeriesTrend | None:
    """The trend of ``key`` over the records that have a finite value for it; None if none has."""
    values = [float(record[key]) for record in records if _finite(record.get(key))]
    if not values:
        return None
    change = values[-1] - values[0]
    scale = max(abs(values[0]), abs(values[-1]), 1e-12)
    overall = "flat" if abs(change) <= FLAT_FRACTION * scale else "up" if change > 0 else "down"
    tail = values[-max(5, len(values) // 3):]
    late = None
    if len(values) >= 5:
        z = mann_kendall_z(tail)
        late = "rising" if z >= TREND_Z else "falling" if z <= -TREND_Z else "flat"
    return SeriesTrend(key, values[0], values[-1], change, overall, late, len(values))


TRAIN_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm", "learning_rate")
EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")


def _settings(summary: dict[str, Any] | None, train: list[dict[str, Any]]) -> dict[str, Any]:
    config = (summary or {}).get("config") or {}
    out = {key: config[key] for key in ("run_name", "loss_type", "beta", "learning_rate", "lr_scheduler_type", "finetuning_type",
                                        "rpo_alpha", "dpop_lambda") if config.get(key) is not None}
    rates = [record["learning_rate"] for record in train if _finite(record.get("learning_rate"))]
    if rates:
        out["learning_rate_logged_peak"] = max(rates)
    return out


def _eval_loss_rise(evals: list[dict[str, Any]]) -> tuple[int, float, float] | None:
    """``(step, lowest, last)`` when the last eval loss lies above the lowest earlier one by more than
    ``EVAL_RISE`` of it (relative) and 0.01 (absolute); else None."""
    points = [(record["step"], float(record["eval_loss"])) for record in evals if _finite(record.get("eval_loss"))]
    if len(points) < 2:
        return None
    low_step, low = min(points[:-1], key=lambda point: point[1])
    last = points[-1][1]
    return (low_step, low, last) if last - low > max(0.01, EVAL_RISE * abs(low)) else None


def advice(report: RunReport) -> list[str]:
    """Rules, in order of urgency; "healthy" when none applies."""
    tips: list[str] = []
    trends, settings = report.trends, report.settings
    if report.displacement:
        tips.append("Likelihood displacement: the chosen responses are losing probability. Try " + "; ".join(DISPLACEMENT_REMEDIES) + ".")
    if report.skipped_steps:
        tips.append(f"{report.skipped_steps} updates were skipped for non-finite values: lower learning_rate, use bf16 "
                    "instead of fp16, or check the rows named in the log.")
    if report.spikes:
        tips.append("Gradient-norm spikes: lower learning_rate, add warmup (warmup_ratio: 0.1), or keep "
                    "max_grad_norm at 1.0; look at the batches at those steps for outliers.")
    accuracy = trends.get("rewards/accuracies")
    margins = trends.get("rewards/margins")
    if accuracy is not None and accuracy.last <= CHANCE_ACCURACY and (margins is None or margins.last <= 0.1):
        rate = settings.get("learning_rate")
        tips.append(
            f"Accuracy is near chance ({accuracy.last:.2f}) and margins small: train longer or raise learning_rate"
            + (f" (now {rate:g})" if rate is not None else "")
            + "; check with `preftune data check` that chosen and rejected differ in a learnable way."
        )
    eval_accuracy = report.eval_last.get("eval_rewards/accuracies")
    if accuracy is not None and eval_accuracy is not None and accuracy.last - eval_accuracy > OVERFIT_GAP:
        tips.append(f"Train accuracy {accuracy.last:.2f} vs eval {eval_accuracy:.2f}: overfitting. Fewer epochs, a "
                    "larger beta, or more (diverse) pairs.")
    loss = trends.get("loss")
    if report.eval_loss_rise is not None and loss is not None and loss.late != "rising":
        low_step, low, last = report.eval_loss_rise
        tips.append(f"Eval loss rose from {low:.4g} (step {low_step}) to {last:.4g} while the training loss did not: "
                    "overfitting; stop earlier (pick the checkpoint near that step), or use fewer epochs.")
    if loss is not None and (loss.overall == "up" or loss.late == "rising"):
        tips.append("Training loss is rising: the learning rate is likely too high.")
    margins_late = margins.late if margins is not None else None
    if margins_late == "rising" and not any("near chance" in tip for tip in tips):
        tips.append("Margins were still rising over the last third of the run: more steps may help (watch eval "
                    "accuracy).")
    if not tips:
        tips.append("The run looks healthy: margins and accuracy settled, no displacement, no spikes. Judge the "
                    "outputs themselves next: `preftune eval` with a judge gives win rate and KL.")
    return tips


def build_report(output_dir: str | Path) -> RunReport:
    """Read the run's files and analyse them (see the module docstring)."""
    records = read_log_history(output_dir)
    summary, note = read_summary(output_dir)
    train = [record for record in records if "loss" in record]
    evals = [record for record in records if "eval_loss" in record]
    diagnostics = (summary or {}).get("diagnostics")
    if isinstance(diagnostics, dict) and "likelihood_displacement" in diagnostics:
        displacement = diagnostics["likelihood_displacement"]
    else:
        finding = detect_displacement(train)
        displacement = finding.to_dict() if finding is not None else None
    spikes = [{"step": s.step, "grad_norm": s.grad_norm, "median_before": s.median_before} for s in grad_norm_spikes(train)]
    skipped = ((summary or {}).get("skipped_nonfinite_steps") or {}).get("count", 0)
    report = RunReport(
        output_dir=str(output_dir),
        steps=max((record["step"] for record in records), default=0),
        settings=_settings(summary, train),
        trends={key: trend for key in TRAIN_KEYS if (trend := series_trend(train, key)) is not None},
        eval_last={key: float(evals[-1][key]) for key in EVAL_KEYS if evals and _finite(evals[-1].get(key))},
        eval_trends={key: trend for key in ("eval_loss",) if len(evals) >= 2 and (trend := series_trend(evals, key))},
        eval_loss_rise=_eval_loss_rise(evals),
        displacement=displacement,
        spikes=spikes,
        skipped_steps=int(skipped or 0),
        notes=[note] if note else [],
    )
    if not train:
        report.notes.append("no training log records yet (the first log comes after logging_steps steps)")
    report.advice = advice(report)
    return report
