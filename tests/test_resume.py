"""Checkpoints and resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run; a
damaged newest checkpoint is skipped; non-finite losses stop or skip; nothing non-finite is saved."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from preftune import DPOTrainer
from preftune.checkpoint import list_checkpoints, verify_checkpoint
from preftune.errors import CheckpointError

from conftest import REPO_ROOT
from test_training import STORY_PAIRS, make_config

TIMING_KEYS = {"tokens_per_second", "eval_runtime", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _write_run_config(tmp_path: Path, model_dir: Path, name: str, seed: int, **overrides) -> Path:
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS * 3))
    config = {
        "model_name_or_path": str(model_dir), "dataset": str(data), "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 12, "learning_rate": 1e-3,
        "save_strategy": "steps", "save_steps": 1, "logging_steps": 1, "seed": seed, "max_length": 64,
        "plot_loss": False, "lr_scheduler_type": "cosine", "warmup_steps": 2, **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "preftune.cli", "train", str(config), *overrides]


def _environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), OMP_NUM_THREADS="1")
    return env


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model.safetensors"))


@pytest.mark.parametrize("seed, kill_after", [(0, 3), (7, 8)])
def test_sigkill_then_resume_is_bit_identical_to_an_uninterrupted_run(stories_model_dir, tmp_path, seed, kill_after):
    whole = _write_run_config(tmp_path, stories_model_dir, "whole", seed)
    subprocess.run(_train_command(whole), check=True, env=_environment(), capture_output=True, timeout=600)

    broken = _write_run_config(tmp_path, stories_model_dir, "broken", seed)
    process = subprocess.Popen(_train_command(broken), env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    output = tmp_path / "broken"
    deadline = time.monotonic() + 300
    while not (output / f"checkpoint-{kill_after}").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "model.safetensors").exists(), "killed too late: the run had finished"

    resumed = subprocess.run(
        _train_command(broken, "resume_from_checkpoint=latest"), env=_environment(), capture_output=True, text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _final_weights(tmp_path / "whole"), _final_weights(output)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name  # bit for bit
    whole_history = json.loads((tmp_path / "whole" / "log_history.json").read_text())
    resumed_history = json.loads((output / "log_history.json").read_text())
    assert _comparable(resumed_history) == _comparable(whole_history)
    steps = [record["step"] for record in resumed_history if "loss" in record]
    assert steps == list(range(1, 13))  # every step once, none duplicated or missing
    csv_steps = [line.split(",")[0] for line in (output / "training_metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(step) for step in range(1, 13)]


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(stories_model_dir, tmp_path, caplog):
    args = make_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, per_device_train_batch_size=4)
    DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [p.name for p in checkpoints] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert all(verify_checkpoint(p) is None for p in checkpoints)
    weights = checkpoints[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert "does not match" in verify_checkpoint(checkpoints[-1])

    resume = make_config(tmp_path, max_steps=3, save_strategy="no", per_device_train_batch_size=4, resume_from_checkpoint="latest")
    trainer = DPOTrainer(model=str(stories_model_dir), args=resume, train_dataset=STORY_PAIRS)
    with caplog.at_level("WARNING", logger="preftune.checkpoint"):
        trainer.train()
    assert "skipping damaged checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert [r["step"] for r in trainer.recorder.train_records] == [1, 2, 3]  # resumed after step 2, ran step 3


def test_resume_from_a_missing_or_model_only_checkpoint_is_a_clear_error(stories_model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=2, resume_from_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no such directory"):
        DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()
    only_model = make_config(tmp_path / "m", max_steps=1, save_strategy="steps", save_steps=1, save_only_model=True)
    DPOTrainer(model=str(stories_model_dir), args=only_model, train_dataset=STORY_PAIRS).train()
    resume = make_config(tmp_path / "m", max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match="save_only_model"):
        DPOTrainer(model=str(stories_model_dir), args=resume, train_dataset=STORY_PAIRS).train()


def test_save_total_limit_keeps_the_newest(stories_model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2, per_device_train_batch_size=4)
    DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-3", "checkpoint-4"]
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir())  # no staging left behind


def _poison_step(trainer: DPOTrainer, bad_step: int) -> None:
    """Make the loss of the first micro-batch of ``bad_step`` NaN (as a numerically broken batch would)."""
    original, calls = trainer.batch_loss, {"n": 0}
    per_step = trainer.args.gradient_accumulation_steps

    def batch_loss(model, lazy, **options):
        result = original(model, lazy, **options)
        calls["n"] += 1
        if model.training and (calls["n"] - 1) // per_step + 1 == bad_step:
            result = result._replace(losses=result.losses * float("nan"))
        return result

    trainer.batch_loss = batch_loss


def test_a_non_finite_loss_stops_naming_the_step_and_rows(stories_model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=3, per_device_train_batch_size=4)
    trainer = DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS)
    _poison_step(trainer, 2)
    with pytest.raises(Exception, match=r"non-finite loss at step 2 on source rows \[") as info:
        trainer.train()
    assert "nonfinite_loss: skip" in str(info.value)


def test_a_non_finite_loss_is_skipped_counted_and_never_saved(stories_model_dir, tmp_path):
    args = make_config(
        tmp_path, max_steps=3, per_device_train_batch_size=4, nonfinite_loss="skip", save_strategy="steps", save_steps=1
    )
    trainer = DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS)
    _poison_step(trainer, 2)
    result = trainer.train()
    assert result.metrics["skipped_nonfinite_steps"] == {"count": 1, "steps": [2]}
    for checkpoint in list_checkpoints(tmp_path / "run"):
        for name, value in load_file(str(checkpoint / "model.safetensors")).items():
            assert torch.isfinite(value).all(), (checkpoint, name)
    assert math.isfinite(result.training_loss)
