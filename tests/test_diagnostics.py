"""The likelihood-displacement detector and grad-norm spike detection (preftune.diagnostics), and how the run's
recorder, summary.json and training_curves.png carry them."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

from preftune.diagnostics import (
    DisplacementDetector,
    DisplacementSettings,
    detect_displacement,
    grad_norm_spikes,
    linear_trend,
    mann_kendall_z,
    run_diagnostics,
)
from preftune.metrics import RunRecorder


def records(chosen, rejected, *, steps=None, **extra):
    steps = steps or range(1, len(chosen) + 1)
    return [{"step": s, "loss": 0.5, "logps/chosen": c, "logps/rejected": r, **extra}
            for s, c, r in zip(steps, chosen, rejected)]


def noisy(rng, values, sigma):
    return [v + rng.gauss(0, sigma) for v in values]


def test_linear_trend_matches_the_hand_computed_slope_and_t_statistic():
    # x = 0..3, y = 1, 3, 2, 5: Sxx = 5, Sxy = 5.5, slope 1.1, intercept 1.1, residuals -0.1, 0.8, -1.3, 0.6,
    # SSR = 2.7, se = sqrt(2.7 / 2 / 5) = sqrt(0.27), t = 1.1 / sqrt(0.27).
    trend = linear_trend([0, 1, 2, 3], [1, 3, 2, 5])
    assert trend.slope == pytest.approx(1.1)
    assert trend.t_stat == pytest.approx(1.1 / math.sqrt(0.27))
    assert trend.fitted_last == pytest.approx(4.4)


def test_linear_trend_of_an_exact_line_has_an_infinite_t_statistic():
    assert linear_trend([1, 2, 3, 4], [10, 8, 6, 4]).t_stat == -math.inf
    assert linear_trend([1, 2, 3], [7, 7, 7]).t_stat == 0.0
    with pytest.raises(ValueError):
        linear_trend([1, 2], [1, 2])


def test_mann_kendall_z_matches_hand_computed_values():
    # 1, 3, 2, 5: five rising pairs, one falling: S = 4; Var = 4*3*13/18; z = (4 - 1) / sqrt(Var)
    assert mann_kendall_z([1, 3, 2, 5]) == pytest.approx(3 / math.sqrt(4 * 3 * 13 / 18))
    # ties: 1, 1, 2: S = 2; Var = (3*2*11 - 2*1*9) / 18 = 48/18; z = (2 - 1) / sqrt(48/18)
    assert mann_kendall_z([1, 1, 2]) == pytest.approx(1 / math.sqrt(48 / 18))
    assert mann_kendall_z([5, 4, 3, 2, 1, 0]) < -1.96  # any monotone fall, not only a line
    assert mann_kendall_z([4, 4, 4]) == 0.0 and mann_kendall_z([1, 2]) == 0.0


def test_detector_fires_once_when_chosen_and_rejected_fall_together(caplog):
    rng = random.Random(0)
    n = 40
    chosen = noisy(rng, [-30 - 0.4 * i for i in range(n)], 0.3)
    rejected = noisy(rng, [-32 - 1.2 * i for i in range(n)], 0.3)
    detector = DisplacementDetector()
    fired_at = []
    with caplog.at_level(logging.WARNING, logger="preftune.diagnostics"):
        for record in records(chosen, rejected):
            if detector.update(record) is not None:
                fired_at.append(record["step"])
    warnings = [r for r in caplog.records if "likelihood displacement" in r.getMessage()]
    assert len(warnings) == 1 and len(fired_at) == 1
    settings = DisplacementSettings()
    # The first full window ends at log `window`; it must pass on `confirm` consecutive logs.
    assert fired_at[0] == settings.window + settings.confirm - 1
    finding = detector.finding
    assert finding.start_step == 1
    assert finding.end_step == n  # the fall went on to the end, so the span grows with it
    assert finding.chosen_slope == pytest.approx(-0.4, abs=0.15) and finding.rejected_slope == pytest.approx(-1.2, abs=0.15)
    for remedy in ("rpo_alpha", "dpop_lambda", "learning_rate", "beta"):
        assert remedy in warnings[0].getMessage()


def test_detector_span_ends_where_the_fall_stops():
    chosen = [-30 - 0.5 * i for i in range(20)] + [-40.0] * 20
    rejected = [-30 - 1.5 * i for i in range(20)] + [-60.0 - 0.01 * i for i in range(20)]
    finding = detect_displacement(records(chosen, rejected, steps=range(10, 410, 10)))
    assert finding is not None and finding.start_step == 10
    # Windows stop passing once most of their logs are flat: the span ends within a window of the turn at step 200.
    assert 200 <= finding.end_step < 200 + 10 * DisplacementSettings().window


def test_detector_stays_quiet_on_a_healthy_run():
    rng = random.Random(1)
    n = 200
    chosen = noisy(rng, [-30 + 0.02 * i for i in range(n)], 0.5)  # flat to slowly rising
    rejected = noisy(rng, [-30 - 0.3 * i for i in range(n)], 0.5)  # falling
    assert detect_displacement(records(chosen, rejected)) is None


@pytest.mark.parametrize("correlation", [0.0, 0.5])
def test_detector_stays_quiet_on_pure_noise(correlation):
    fired = 0
    for seed in range(20):
        rng = random.Random(seed)
        chosen, rejected = [], []
        for _ in range(300):
            shared = rng.gauss(0, 1)
            mix = lambda: math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * rng.gauss(0, 1)  # noqa: E731
            chosen.append(-30 + 2 * mix())
            rejected.append(-40 + 2 * mix())
        fired += detect_displacement(records(chosen, rejected)) is not None
    assert fired == 0


def test_detector_ignores_a_steady_fall_too_small_to_matter():
    chosen = [-30 - 0.001 * i for i in range(60)]  # 0.06 nats in all
    rejected = [-30 - 1.0 * i for i in range(60)]
    assert detect_displacement(records(chosen, rejected)) is None


def test_detector_skips_eval_and_nonfinite_records():
    chosen = [-30 - 0.5 * i for i in range(30)]
    rejected = [-30 - 1.5 * i for i in range(30)]
    history = []
    for record in records(chosen, rejected):
        history.append(record)
        history.append({"step": record["step"], "eval_loss": 0.3, "eval_logps/chosen": 0.0})
    history.append({"step": 31, "loss": float("nan"), "logps/chosen": float("nan"), "logps/rejected": -80.0})
    finding = detect_displacement(history)
    assert finding is not None and finding.end_step == 30


def test_grad_norm_spikes_are_measured_against_the_running_median():
    norms = [1.0, 1.2, 0.8, 1.1, 9.0, 1.0, 0.9, float("nan"), 6.0, 1.0]
    history = [{"step": i + 1, "loss": 0.5, "grad_norm": g} for i, g in enumerate(norms)]
    spikes = grad_norm_spikes(history, factor=5.0, window=10, min_history=3)
    # step 5: 9.0 > 5 x median(1.0, 1.2, 0.8, 1.1) = 5.25; step 9: 6.0 > 5 x median(1.0 .. 0.9 with 9.0) = 5.25
    assert [(s.step, s.grad_norm) for s in spikes] == [(5, 9.0), (9, 6.0)]
    assert spikes[0].median_before == pytest.approx(1.05)
    assert grad_norm_spikes(history[:3]) == []  # too little history for a median


def test_recorder_keeps_the_finding_for_summary_and_shades_the_logps_panels(tmp_path, monkeypatch):
    import matplotlib.axes

    chosen = [-30 - 0.5 * i for i in range(24)]
    rejected = [-30 - 1.5 * i for i in range(24)]
    recorder = RunRecorder(tmp_path)
    for record in records(chosen, rejected, grad_norm=1.0):
        recorder.log(record)
    diagnostics = recorder.diagnostics()
    found = diagnostics["likelihood_displacement"]
    assert found["start_step"] == 1 and found["end_step"] == 24 and "rpo_alpha" in found["message"]
    assert diagnostics["grad_norm_spikes"]["count"] == 0
    json.dumps(diagnostics)  # summary.json-ready

    spans = []
    original = matplotlib.axes.Axes.axvspan
    monkeypatch.setattr(matplotlib.axes.Axes, "axvspan",
                        lambda self, a, b, **kw: spans.append((self.get_title() or None, a, b)) or original(self, a, b, **kw))
    assert recorder.write_plot().is_file()
    assert [(a, b) for _, a, b in spans] == [(1, 24), (1, 24)]  # logps/chosen and logps/rejected


def test_restored_recorder_replays_history_and_warns_only_as_a_reminder(tmp_path, caplog):
    chosen = [-30 - 0.5 * i for i in range(24)]
    rejected = [-30 - 1.5 * i for i in range(24)]
    history = records(chosen, rejected)
    recorder = RunRecorder(tmp_path)
    with caplog.at_level(logging.WARNING):
        recorder.restore(history[:20])
        for record in history[20:]:
            recorder.log(record)
    messages = [r.getMessage() for r in caplog.records if "likelihood displacement" in r.getMessage()]
    assert len(messages) == 1 and "before the resumed checkpoint" in messages[0]
    assert recorder.diagnostics()["likelihood_displacement"]["end_step"] == 24


def test_run_diagnostics_reads_only_training_records():
    history = [{"step": 1, "eval_loss": 0.5, "grad_norm": 100.0}] + [
        {"step": i, "loss": 0.6, "grad_norm": 1.0} for i in range(1, 6)]
    assert run_diagnostics(history) == {"likelihood_displacement": None, "grad_norm_spikes": {"count": 0, "spikes": []}}


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.parametrize("rpo_alpha, displaced", [(None, True), (1.0, False)])
def test_a_high_learning_rate_on_stories260k_displaces_and_rpo_prevents_it(stories_model_dir, tmp_path, caplog,
                                                                         rpo_alpha, displaced):
    """lr 3e-3 (constant) for 16 steps: plain DPO raises logps/chosen for two steps, then pushes it down steadily
    with logps/rejected (step 2 on); with RPO's NLL term (rpo_alpha 1) the chosen log-probs keep rising."""
    from test_training import STORY_PAIRS

    from preftune import DPOConfig, DPOTrainer

    config = DPOConfig(
        output_dir=str(tmp_path / "run"), learning_rate=3e-3, lr_scheduler_type="constant", max_steps=16,
        logging_steps=1, save_strategy="no", per_device_train_batch_size=8, max_length=64, seed=0,
        overwrite_cache=True, rpo_alpha=rpo_alpha,
    )
    with caplog.at_level(logging.WARNING, logger="preftune"):
        result = DPOTrainer(model=str(stories_model_dir), args=config, train_dataset=STORY_PAIRS).train()
    warnings = [r for r in caplog.records if "likelihood displacement" in r.getMessage()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    found = summary["diagnostics"]["likelihood_displacement"]
    history = result.metrics and json.loads((tmp_path / "run" / "log_history.json").read_text())
    chosen = [r["logps/chosen"] for r in history if "loss" in r]  # the training records
    if displaced:
        assert len(warnings) == 1
        assert found is not None and found["end_step"] == 16
        assert chosen[-1] < chosen[found["start_step"] - 1] - 5  # the span really covers a large fall
    else:
        assert not warnings and found is None
        assert chosen[-1] > chosen[0]
