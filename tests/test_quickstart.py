"""The offline quickstart (the embedded default) trains end to end and reaches the promised held-out accuracy."""

from __future__ import annotations

import json

import pytest

from preftune.quickstart import TARGET_EVAL_ACCURACY, run_quickstart


@pytest.mark.slow
def test_quickstart_reaches_target_accuracy_and_writes_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFTUNE_SHARED", str(tmp_path / "no-shared"))  # it must not need ../shared
    summary = run_quickstart(tmp_path / "qs")
    run_dir = tmp_path / "qs" / "run"
    for name in ("training_metrics.csv", "training_curves.png", "summary.json", "log_history.json", "model.safetensors"):
        assert (run_dir / name).exists(), name
    assert summary["eval"]["rewards/accuracies"] >= TARGET_EVAL_ACCURACY
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["eval"]["rewards/accuracies"] == summary["eval"]["rewards/accuracies"]
    first_loss = on_disk_history_first_loss(run_dir)
    assert summary["train"]["loss"] < first_loss  # it learned, not just started above the bar
    printed = capsys.readouterr().out
    assert "eval_rewards/accuracies" in printed and str(run_dir) in printed


def on_disk_history_first_loss(run_dir) -> float:
    history = json.loads((run_dir / "log_history.json").read_text())
    return next(record["loss"] for record in history if "loss" in record)
