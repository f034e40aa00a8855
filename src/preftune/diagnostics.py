"""Training diagnostics from the log records: likelihood displacement and gradient-norm spikes.

**Likelihood displacement** (Razin et al. 2024, "Unintentional Unalignment"; Pal et al. 2024, "Smaug"/DPOP): DPO
only widens the margin ``log π(y_w)/π_ref(y_w) − log π(y_l)/π_ref(y_l)``, and it can do so while *both* log-probs
fall; the probability mass leaves the chosen responses too and goes to responses nobody rated. The detector watches
``logps/chosen`` and ``logps/rejected`` of the training logs and fires when, over the last ``window`` logs,

1. the least-squares slope of each series is negative with a t-statistic below ``-t_threshold`` (a steady fall,
   not one noisy step), and
2. the chosen log-prob (the fitted value at the window's last log) lies below its start by more than
   ``max(min_drop_nats, relative_drop · |start|)`` (a fall that matters, not a drift of a tenth of a nat), where the
   start is the higher of the run's first logged value and the fitted value at the window's first log (so a fall
   counts both when it takes the chosen log-prob below where the run began and when it undoes an earlier rise),

and both hold on ``confirm`` consecutive logs. It fires once per run, logs one warning naming the remedies, and
keeps the step range: from the first step of the first window that passed to the last log at which the condition
still held.

**Gradient-norm spikes**: a log whose ``grad_norm`` (measured before clipping) exceeds ``factor`` times the median
of the ``window`` logs before it.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

DISPLACEMENT_REMEDIES = (
    "rpo_alpha (RPO: add an NLL term on the chosen responses, e.g. rpo_alpha: 1.0)",
    "dpop_lambda (DPOP: penalise a chosen log-ratio below zero, e.g. dpop_lambda: 50)",
    "a lower learning_rate",
    "a larger beta",
)


@dataclass(frozen=True)
class DisplacementSettings:
    """Thresholds of the likelihood-displacement detector (module docstring).

    Attributes:
        window: logs per trend test (>= 3).
        t_threshold: both slopes' t-statistics must be below ``-t_threshold``. 4.0 is about the one-sided 0.2 %
            point of Student's t with 8 degrees of freedom (window 10): pure noise passes it for one series about
            once in 500 windows; for both at once, and on ``confirm`` consecutive windows, far more rarely, even when
            the two series' noise is correlated (tests/test_diagnostics.py measures it).
        confirm: consecutive logs on which the condition must hold before the detector fires.
        relative_drop: the chosen log-prob must have fallen by more than this fraction of its start...
        min_drop_nats: ...and by more than this many nats.
    """

    window: int = 10
    t_threshold: float = 4.0
    confirm: int = 3
    relative_drop: float = 0.05
    min_drop_nats: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 3:
            raise ValueError(f"window must be >= 3 (a slope and its error need 3 points), got {self.window}")
        if self.confirm < 1:
            raise ValueError(f"confirm must be >= 1, got {self.confirm}")


@dataclass(frozen=True)
class Trend:
    """Least-squares line through ``(x_i, y_i)``: slope (units of y per unit of x), its t-statistic, and the fitted
    value at the last x."""

    slope: float
    t_stat: float
    fitted_last: float


def linear_trend(xs: Sequence[float], ys: Sequence[float]) -> Trend:
    """Ordinary least squares ``y = a + b·x``: ``b = Sxy/Sxx``, ``se(b) = sqrt(SSR/(n−2)/Sxx)``, ``t = b/se(b)``.

    A perfect line (SSR = 0) has ``t = ±inf`` (0 for a flat one). Needs n >= 3 points with distinct x.
    """
    n = len(xs)
    if n < 3 or n != len(ys):
        raise ValueError(f"need >= 3 points and as many x as y, got {n} x and {len(ys)} y")
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x values are equal: no slope")
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    ssr = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    stderr = math.sqrt(ssr / (n - 2) / sxx)
    # Residuals at float-rounding level: an exact line, whose t-statistic is infinite (or 0 when flat).
    if stderr <= 1e-12 * max(1.0, abs(slope)):
        t_stat = 0.0 if slope == 0 else math.copysign(math.inf, slope)
    else:
        t_stat = slope / stderr
    return Trend(slope=slope, t_stat=t_stat, fitted_last=intercept + slope * xs[-1])


def mann_kendall_z(values: Sequence[float]) -> float:
    """Mann-Kendall trend statistic: ``S = Σ_{i<j} sign(y_j − y_i)``, ``Var(S) = [n(n−1)(2n+5) − Σ_g t_g(t_g−1)(2t_g+5)]
    / 18`` (t_g: sizes of groups of equal values), ``z = (S − sign(S)) / sqrt(Var(S))`` (continuity-corrected).
    Positive: rising; |z| >= 1.96 is significant at 5 % (two-sided). Any monotone shape counts, not only a line.
    0 for fewer than 3 values or all values equal."""
    n = len(values)
    if n < 3:
        return 0.0
    s = sum((values[j] > values[i]) - (values[j] < values[i]) for i in range(n) for j in range(i + 1, n))
    groups: dict[float, int] = {}
    for value in values:
        groups[value] = groups.get(value, 0) + 1
    variance = (n * (n - 1) * (2 * n + 5) - sum(t * (t - 1) * (2 * t + 5) for t in groups.values())) / 18
    if variance <= 0 or s == 0:
        return 0.0
    return (s - math.copysign(1, s)) / math.sqrt(variance)


@dataclass
class DisplacementFinding:
    """Likelihood displacement seen between ``start_step`` and ``end_step`` (training steps)."""

    start_step: int
    end_step: int
    chosen_start: float  # the start the fall is measured from (condition 2 of the module docstring)
    chosen_at_detection: float  # fitted logps/chosen at the log where the detector fired
    rejected_at_detection: float
    chosen_slope: float  # nats per step, in the window that fired
    rejected_slope: float
    chosen_t: float
    rejected_t: float
    remedies: tuple[str, ...] = DISPLACEMENT_REMEDIES

    def message(self) -> str:
        return (
            f"likelihood displacement: logps/chosen and logps/rejected have both been falling steadily since step "
            f"{self.start_step} (chosen {self.chosen_start:.2f} -> {self.chosen_at_detection:.2f} nats, slope "
            f"{self.chosen_slope:.3g}/step; rejected slope {self.rejected_slope:.3g}/step): DPO is widening the margin "
            f"by pushing the chosen responses down too. Try: {'; '.join(self.remedies)}."
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["remedies"] = list(self.remedies)
        out["message"] = self.message()
        return {key: _finite_or_none(value) for key, value in out.items()}


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _number(record: dict[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class DisplacementDetector:
    """Feed it training log records in order (``update``); it fires at most once (``finding``).

    Records without finite ``step``, ``logps/chosen`` and ``logps/rejected`` are ignored (eval records, KTO windows
    without rejected rows, non-finite values). After firing, ``finding.end_step`` keeps moving forward while the
    condition still holds on the latest window.
    """

    def __init__(self, settings: DisplacementSettings | None = None, *, warn: bool = True) -> None:
        self.settings = settings or DisplacementSettings()
        self.warn = warn
        self.points: list[tuple[int, float, float]] = []  # (step, chosen, rejected)
        self.finding: DisplacementFinding | None = None
        self._still_falling = False
        self._passed: list[DisplacementFinding] = []  # consecutive windows that passed, before firing

    def update(self, record: dict[str, Any]) -> DisplacementFinding | None:
        """Add one log record; return the finding when the detector fires on this record, else None."""
        step, chosen, rejected = _number(record, "step"), _number(record, "logps/chosen"), _number(record, "logps/rejected")
        if step is None or chosen is None or rejected is None or "loss" not in record:
            return None
        if self.points and step <= self.points[-1][0]:  # a resumed run replays steps: keep each step once
            self.points = [p for p in self.points if p[0] < step]
        self.points.append((int(step), chosen, rejected))
        window = self.points[-self.settings.window :]
        if len(window) < self.settings.window:
            return None
        found = self._test(window)
        if self.finding is not None:
            if found is not None and self._still_falling:
                self.finding.end_step = window[-1][0]
            self._still_falling = self._still_falling and found is not None
            return None
        self._passed = self._passed + [found] if found is not None else []
        if len(self._passed) < self.settings.confirm:
            return None
        found.start_step = self._passed[0].start_step
        self.finding, self._still_falling, self._passed = found, True, []
        if self.warn:
            logger.warning(found.message())
        return found

    def _test(self, window: list[tuple[int, float, float]]) -> DisplacementFinding | None:
        steps = [float(p[0]) for p in window]
        chosen = linear_trend(steps, [p[1] for p in window])
        rejected = linear_trend(steps, [p[2] for p in window])
        limit = -self.settings.t_threshold
        if not (chosen.slope < 0 and rejected.slope < 0 and chosen.t_stat < limit and rejected.t_stat < limit):
            return None
        window_start = chosen.fitted_last - chosen.slope * (steps[-1] - steps[0])
        start = max(self.points[0][1], window_start)
        needed = max(self.settings.min_drop_nats, self.settings.relative_drop * abs(start))
        if start - chosen.fitted_last <= needed:
            return None
        return DisplacementFinding(
            start_step=window[0][0], end_step=window[-1][0], chosen_start=start,
            chosen_at_detection=chosen.fitted_last, rejected_at_detection=rejected.fitted_last,
            chosen_slope=chosen.slope, rejected_slope=rejected.slope, chosen_t=chosen.t_stat, rejected_t=rejected.t_stat,
        )


def detect_displacement(
    records: Iterable[dict[str, Any]], settings: DisplacementSettings | None = None
) -> DisplacementFinding | None:
    """Run a fresh ``DisplacementDetector`` (without logging) over ``records``; its finding, or None."""
    detector = DisplacementDetector(settings, warn=False)
    for record in records:
        detector.update(record)
    return detector.finding


@dataclass(frozen=True)
class GradNormSpike:
    step: int
    grad_norm: float
    median_before: float  # median grad_norm of the ``window`` logs before

    @property
    def ratio(self) -> float:
        return self.grad_norm / self.median_before if self.median_before > 0 else math.inf


def grad_norm_spikes(
    records: Iterable[dict[str, Any]], *, factor: float = 5.0, window: int = 10, min_history: int = 3
) -> list[GradNormSpike]:
    """Logs whose ``grad_norm`` exceeds ``factor`` × the median of the (up to) ``window`` logs before it, once at
    least ``min_history`` earlier logs exist. A non-finite ``grad_norm`` (a skipped step) is not a spike here: the
    trainer reports those itself; it does not enter the median either."""
    spikes, history = [], []
    for record in records:
        norm, step = _number(record, "grad_norm"), _number(record, "step")
        if norm is None or step is None:
            continue
        recent = history[-window:]
        if len(recent) >= min_history:
            median = statistics.median(recent)
            if norm > factor * median:
                spikes.append(GradNormSpike(step=int(step), grad_norm=norm, median_before=median))
        history.append(norm)
    return spikes


def run_diagnostics(records: Sequence[dict[str, Any]], finding: DisplacementFinding | None = None) -> dict[str, Any]:
    """What goes into ``summary.json["diagnostics"]``: the displacement finding (or None) and the grad-norm spikes
    (the first 100) of the training records."""
    train = [record for record in records if "loss" in record]
    if finding is None:
        finding = detect_displacement(train)
    spikes = grad_norm_spikes(train)
    return {
        "likelihood_displacement": finding.to_dict() if finding is not None else None,
        "grad_norm_spikes": {
            "count": len(spikes),
            "spikes": [{"step": s.step, "grad_norm": s.grad_norm, "median_before": s.median_before} for s in spikes[:100]],
        },
    }
