"""`preftune report OUTPUT_DIR`: the story of a run from constructed log histories."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.errors import DataError
from preftune.report import build_report, series_trend


def write_run(path, history, summary=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "log_history.json").write_text(json.dumps(history))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def train_log(n, *, chosen, rejected, accuracy, margins, grad_norm=lambda i: 1.0, loss=lambda i: 0.69 - 0.005 * i,
              lr=1e-6):
    return [{"step": i, "epoch": i / n, "loss": loss(i), "rewards/margins": margins(i), "rewards/accuracies": accuracy(i),
             "logps/chosen": chosen(i), "logps/rejected": rejected(i), "grad_norm": grad_norm(i), "learning_rate": lr}
            for i in range(1, n + 1)]


def healthy(n=30, **overrides):
    settings = dict(chosen=lambda i: -30 + 0.05 * i + 0.1 * (-1) ** i, rejected=lambda i: -30 - 0.5 * i,
                    accuracy=lambda i: min(1.0, 0.5 + 0.05 * i), margins=lambda i: min(2.0, 0.1 * i))
    settings.update(overrides)
    return train_log(n, **settings)


SUMMARY = {"config": {"beta": 0.25, "learning_rate": 5e-7, "loss_type": "sigmoid", "lr_scheduler_type": "cosine"},
           "skipped_nonfinite_steps": {"count": 0, "steps": []}}


def test_series_trend_compares_first_and_last_and_tests_the_last_third():
    noisy_flat = [{"step": i, "x": v} for i, v in enumerate([1.0, 1.2, 0.9, 1.1, 1.0, 1.05, 0.95, 1.0, 1.02], start=1)]
    trend = series_trend(noisy_flat, "x")
    assert (trend.first, trend.last, trend.overall, trend.late, trend.count) == (1.0, 1.02, "up", "flat", 9)
    rising = [{"step": i, "x": 0.1 * i + 0.01 * (-1) ** i} for i in range(1, 16)]
    trend = series_trend(rising, "x")
    assert trend.overall == "up" and trend.late == "rising" and trend.change == pytest.approx(1.49 - 0.09)
    falling_then_flat = [{"step": i, "x": max(0.0, 1 - 0.2 * i)} for i in range(1, 16)]
    trend = series_trend(falling_then_flat, "x")
    assert trend.overall == "down" and trend.late == "flat"
    assert series_trend([{"step": 1, "x": 2.0}, {"step": 2, "x": 1.0}], "x").late is None
    assert series_trend([{"step": 1, "x": 2.0}, {"step": 2, "x": 2.01}], "x").overall == "flat"
    assert series_trend([{"step": 1}], "x") is None


def test_report_of_a_healthy_run_shows_settings_trends_and_no_warnings(tmp_path):
    history = healthy()
    history.append({"step": 30, "eval_loss": 0.3, "eval_rewards/accuracies": 0.95, "eval_rewards/margins": 1.8})
    report = build_report(write_run(tmp_path / "run", history, SUMMARY))
    assert report.steps == 30
    assert report.settings["beta"] == 0.25 and report.settings["learning_rate"] == 5e-7
    assert report.trends["logps/rejected"].overall == "down" and report.trends["logps/rejected"].late == "falling"
    assert report.trends["rewards/margins"].overall == "up" and report.trends["rewards/margins"].late == "flat"
    assert report.displacement is None and report.spikes == []
    assert report.eval_last["eval_rewards/accuracies"] == 0.95
    assert len(report.advice) == 1 and "healthy" in report.advice[0]
    text = report.format()
    assert "beta 0.25" in text and "learning_rate 5e-07" in text
    assert "rewards/accuracies: 0.55 -> 1 (up overall; last third: flat; 30 logs)" in text
    assert "Likelihood displacement: not detected." in text


def test_report_names_displacement_spikes_and_their_remedies(tmp_path):
    history = healthy(40, chosen=lambda i: -30 - 0.6 * i, rejected=lambda i: -30 - 1.5 * i,
                      grad_norm=lambda i: 25.0 if i == 17 else 1.0 + 0.01 * i)
    report = build_report(write_run(tmp_path / "run", history))  # no summary.json: detector re-run on the log
    assert report.displacement is not None and report.displacement["start_step"] == 1
    assert [spike["step"] for spike in report.spikes] == [17]
    text = report.format()
    assert "Likelihood displacement: steps 1-40" in text
    assert "step 17 (25 vs median" in text
    assert "no summary.json" in text
    advice = " ".join(report.advice)
    for remedy in ("rpo_alpha", "dpop_lambda", "learning_rate", "beta", "warmup"):
        assert remedy in advice


def test_report_prefers_the_diagnostics_recorded_in_summary_json(tmp_path):
    recorded = {"start_step": 5, "end_step": 9, "message": "m"}
    summary = {**SUMMARY, "diagnostics": {"likelihood_displacement": recorded, "grad_norm_spikes": {"count": 0}}}
    report = build_report(write_run(tmp_path / "run", healthy(), summary))
    assert report.displacement == recorded


def test_report_advises_on_chance_accuracy_and_on_overfitting(tmp_path):
    stuck = healthy(20, accuracy=lambda i: 0.5, margins=lambda i: 0.01, loss=lambda i: 0.69)
    report = build_report(write_run(tmp_path / "stuck", stuck, SUMMARY))
    assert any("near chance (0.50)" in tip and "now 5e-07" in tip for tip in report.advice)

    overfit = healthy(20, accuracy=lambda i: 1.0)
    overfit += [{"step": s, "eval_loss": 0.4 + 0.05 * k, "eval_rewards/accuracies": 0.6} for k, s in enumerate((5, 10, 15, 20))]
    report = build_report(write_run(tmp_path / "overfit", overfit, SUMMARY))
    advice = " ".join(report.advice)
    assert "Train accuracy 1.00 vs eval 0.60: overfitting" in advice
    assert "Eval loss rose from 0.4 (step 5) to 0.55 while the training loss did not" in advice


def test_report_counts_skipped_steps_from_the_summary(tmp_path):
    summary = {**SUMMARY, "skipped_nonfinite_steps": {"count": 3, "steps": [4, 5, 6]}}
    report = build_report(write_run(tmp_path / "run", healthy(), summary))
    assert report.skipped_steps == 3 and "3 updates were skipped" in report.advice[0]


def test_report_errors_name_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="no such output directory"):
        build_report(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"log_history.json: missing"):
        build_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "log_history.json").write_text('[{"step": 1, "loss": 0.6},\n{"step": 2, "loss": ')
    with pytest.raises(DataError, match=r"log_history.json: not valid JSON \(line 2"):
        build_report(bad)
    (bad / "log_history.json").write_text('{"step": 1}')
    with pytest.raises(DataError, match="expected a JSON list of log records"):
        build_report(bad)
    (bad / "log_history.json").write_text('[{"loss": 0.6}]')
    with pytest.raises(DataError, match="row 0, field 'step'"):
        build_report(bad)


def test_a_corrupt_summary_is_reported_and_the_log_still_used(tmp_path):
    run = write_run(tmp_path / "run", healthy())
    (run / "summary.json").write_text("{not json")
    report = build_report(run)
    assert report.settings == {"learning_rate_logged_peak": 1e-6}
    assert any("unreadable" in note for note in report.notes)


def test_cli_report_prints_the_story_and_json_and_fails_in_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", healthy(), SUMMARY)
    assert main(["report", str(run)]) == 0
    assert "What to try next:" in capsys.readouterr().out
    assert main(["report", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["beta"] == 0.25 and data["likelihood_displacement"] is None
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: file ") and "\n" not in err
