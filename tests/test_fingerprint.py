"""Runs never mix: a checkpoint records its run's id and fingerprint; a resume with other settings is refused naming
the keys (unless overridden), a checkpoint from before fingerprints resumes with a warning, and a fresh run into
another run's output_dir never resumes from, prunes or reports that run's checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from preftune import DPOConfig, DPOTrainer
from preftune.checkpoint import (
    MANIFEST_FILE,
    STATE_FILE,
    checkpoint_run,
    claim_output_dir,
    fingerprint_differences,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_path,
    verify_checkpoint,
    write_checkpoint,
)
from preftune.errors import ConfigError
from preftune.preflight import NOT_FINGERPRINTED, OVERRIDE_KEY, run_fingerprint

from test_resume import _environment, _train_command, _write_run_config
from test_training import STORY_PAIRS, make_config


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(output_dir: Path) -> list[int]:
    return [record["step"] for record in json.loads((output_dir / "log_history.json").read_text()) if "loss" in record]


# ------------------------------------------------------------------------------------------ the scenario
@pytest.mark.slow
def test_a_second_run_with_other_settings_resuming_latest_is_refused_naming_the_keys_before_loading(
    stories_model_dir, tmp_path
):
    first = _write_run_config(tmp_path, stories_model_dir, "run", seed=0, max_steps=3)
    subprocess.run(_train_command(first), check=True, env=_environment(), capture_output=True, timeout=600)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    state_before, history_before = _sha256(checkpoint / STATE_FILE), _sha256(tmp_path / "run" / "log_history.json")

    second = tmp_path / "second.yaml"  # the same output_dir, two settings changed, resume_from_checkpoint: latest
    settings = yaml.safe_load(first.read_text())
    changed = {"beta": 0.2, "learning_rate": 5e-4}
    second.write_text(yaml.safe_dump({**settings, **changed, "resume_from_checkpoint": "latest"}))
    refused = subprocess.run(_train_command(second), env=_environment(), capture_output=True, text=True, timeout=600)

    assert refused.returncode == 2, refused.stderr[-2000:]
    errors = [line for line in refused.stderr.splitlines() if line.startswith("preftune: error:")]
    assert len(errors) == 1
    for key, new in changed.items():
        assert f"{key}: {settings.get(key, DPOConfig().to_dict()[key])} -> {new}" in errors[0]
    assert "checkpoint-3" in errors[0] and f"{OVERRIDE_KEY}: true" in errors[0] and "resume_from_checkpoint" in errors[0]
    assert "Loading weights" not in refused.stderr and "Tokenizing" not in refused.stderr  # refused before loading
    assert _sha256(checkpoint / STATE_FILE) == state_before  # the first run's files are untouched
    assert _sha256(tmp_path / "run" / "log_history.json") == history_before


def test_a_fresh_run_into_another_runs_output_dir_never_resumes_prunes_or_reports_its_checkpoints(
    stories_model_dir, tmp_path, caplog
):
    first = make_config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    DPOTrainer(model=str(stories_model_dir), args=first, train_dataset=STORY_PAIRS).train()
    output = tmp_path / "run"
    first_run, _ = checkpoint_run(output / "checkpoint-4")
    first_checkpoint_4 = _sha256(output / "checkpoint-4" / "model.safetensors")

    second = make_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, per_device_train_batch_size=4,
                         beta=0.3, save_total_limit=1)
    with caplog.at_level("WARNING", logger="preftune.preflight"):
        trainer = DPOTrainer(model=str(stories_model_dir), args=second, train_dataset=STORY_PAIRS)
    warnings = [record.getMessage() for record in caplog.records if "another run" in record.getMessage()]
    assert len(warnings) == 1 and "checkpoint-2, checkpoint-4" in warnings[0]
    trainer.train()

    # save_total_limit 1 kept this run's newest and left the other run's checkpoint-4 alone
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-3", "checkpoint-4"]
    assert checkpoint_run(output / "checkpoint-4")[0] == first_run != trainer.run_id
    assert verify_checkpoint(output / "checkpoint-4") is None
    assert _sha256(output / "checkpoint-4" / "model.safetensors") == first_checkpoint_4
    # latest is this run's newest (step 3), not the numerically newer checkpoint-4 of the other run
    assert resolve_resume_path("latest", output) == output / "checkpoint-3"
    # the outputs describe this run only
    assert _steps(output) == [1, 2, 3]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["global_step"] == 3 and summary["config"]["beta"] == 0.3


# ------------------------------------------------------------------------------------------ resume: override, old
def _override(config: DPOConfig) -> DPOConfig:
    """Set the override key."""
    setattr(config, OVERRIDE_KEY, True)
    return config


def test_a_resume_with_changed_settings_is_refused_then_goes_on_when_overridden(stories_model_dir, tmp_path, caplog):
    common = dict(max_steps=3, save_strategy="steps", save_steps=1, per_device_train_batch_size=4)
    first = make_config(tmp_path, **common)
    trainer = DPOTrainer(model=str(stories_model_dir), args=first, train_dataset=STORY_PAIRS)
    trainer.train()
    shutil.rmtree(tmp_path / "run" / "checkpoint-3")  # as if stopped after step 2

    changed = dict(common, learning_rate=2e-3, resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match=r"learning_rate: 0\.001 -> 0\.002\)") as refused:
        DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path, **changed), train_dataset=STORY_PAIRS)
    assert refused.value.key == "resume_from_checkpoint"

    resumed = DPOTrainer(model=str(stories_model_dir), args=_override(make_config(tmp_path, **changed)),
                         train_dataset=STORY_PAIRS)
    with caplog.at_level("WARNING", logger="preftune.preflight"):
        resumed.train()
    assert any("with changed settings" in r.getMessage() and "learning_rate: 0.001 -> 0.002" in r.getMessage()
               for r in caplog.records)
    assert [record["step"] for record in resumed.recorder.train_records] == [1, 2, 3]  # continued after step 2
    assert resumed.run_id == trainer.run_id  # the same run, changed on purpose


def _strip_run_identity(checkpoint: Path) -> None:
    """Make ``checkpoint`` look written before run fingerprints: no "run" entry, the manifest recomputed."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["run"]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    manifest = {
        str(path.relative_to(checkpoint)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(checkpoint.rglob("*")) if path.is_file() and path.name != MANIFEST_FILE
    }
    (checkpoint / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_checkpoint_written_before_fingerprints_resumes_with_a_warning(stories_model_dir, tmp_path, caplog):
    args = make_config(tmp_path, max_steps=2, save_strategy="steps", save_steps=1, per_device_train_batch_size=4)
    DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()
    output = tmp_path / "run"
    for checkpoint in list_checkpoints(output):
        _strip_run_identity(checkpoint)
    (output / "run.json").unlink()  # a folder from before run ids
    assert verify_checkpoint(output / "checkpoint-2") is None and checkpoint_run(output / "checkpoint-2") == (None, None)

    resume = make_config(tmp_path, max_steps=3, save_strategy="no", per_device_train_batch_size=4,
                         resume_from_checkpoint="latest")  # max_steps differs: cannot be seen without a fingerprint
    trainer = DPOTrainer(model=str(stories_model_dir), args=resume, train_dataset=STORY_PAIRS)
    with caplog.at_level("WARNING", logger="preftune.preflight"):
        result = trainer.train()
    assert any("written before preftune recorded run fingerprints" in r.getMessage() for r in caplog.records)
    assert result.global_step == 3 and [r["step"] for r in trainer.recorder.train_records] == [1, 2, 3]


# ------------------------------------------------------------------------------------------ the fingerprint itself
def test_every_config_key_is_fingerprinted_or_left_out_with_a_reason():
    keys = set(DPOConfig().to_dict())
    assert set(NOT_FINGERPRINTED) - keys <= {OVERRIDE_KEY}  # no stale names in the list
    assert all(reason.strip() for reason in NOT_FINGERPRINTED.values())
    fingerprint = run_fingerprint(DPOConfig(model_name_or_path="org/model"))
    for key in keys - set(NOT_FINGERPRINTED):
        assert key in fingerprint, key
    for key in ("beta", "learning_rate", "seed", "max_length", "loss_type", "gradient_accumulation_steps"):
        assert key in fingerprint and key not in NOT_FINGERPRINTED


def test_output_and_cadence_settings_leave_the_fingerprint_unchanged_and_a_trained_setting_changes_it(tmp_path):
    base = dict(model_name_or_path="org/model", beta=0.1)
    one = run_fingerprint(DPOConfig(**base, output_dir=str(tmp_path / "a")))
    other_outputs = run_fingerprint(DPOConfig(
        **base, output_dir=str(tmp_path / "b"), logging_steps=3, save_steps=7, save_total_limit=2, run_name="x",
        per_device_eval_batch_size=2, prefix_sharing=False, chunked_lm_head=False, plot_loss=False,
    ))
    assert fingerprint_differences(one, other_outputs) == []
    changed = run_fingerprint(DPOConfig(**{**base, "beta": 0.25}, output_dir=str(tmp_path / "a")))
    assert fingerprint_differences(one, changed) == [("beta", 0.1, 0.25)]


def test_the_model_is_identified_by_its_absolute_folder_and_config_json(stories_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(stories_model_dir / "config.json", model / "config.json")
    monkeypatch.chdir(tmp_path)
    relative = run_fingerprint(DPOConfig(model_name_or_path="model"))
    absolute = run_fingerprint(DPOConfig(model_name_or_path=str(model)))
    assert relative == absolute
    assert absolute["model_name_or_path"] == str(model.resolve())
    assert absolute["model_name_or_path config.json"] == _sha256(model / "config.json")[:16]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    assert [key for key, _, _ in fingerprint_differences(absolute, run_fingerprint(DPOConfig(model_name_or_path="model")))] \
        == ["model_name_or_path config.json"]


def test_keys_recorded_on_one_side_only_are_not_compared():
    saved = {"beta": 0.1, "old_key": 1}
    current = {"beta": 0.1, "new_key": 2}
    assert fingerprint_differences(saved, current) == []
    assert fingerprint_differences({"a": None}, {"a": 0}) == [("a", None, 0)]


# ------------------------------------------------------------------------------------------ pruning by run
def _small_checkpoint(target: Path, run_id: str | None) -> Path:
    state = {"global_step": int(target.name.split("-")[1])}
    if run_id is not None:
        state["run"] = {"id": run_id, "fingerprint": {}}
    return write_checkpoint(target, save_weights=lambda d: (d / "model.bin").write_bytes(b"w"), trainer_state=state,
                            optimizer_state={"state": {0: {"exp_avg": torch.ones(1)}}, "param_groups": [{"params": [0]}]})


def test_pruning_and_latest_count_only_the_run_s_own_checkpoints(tmp_path):
    for step, run in ((1, None), (2, "other"), (3, "mine"), (4, "other"), (5, "mine"), (6, "mine")):
        _small_checkpoint(tmp_path / f"checkpoint-{step}", run)
    prune_checkpoints(tmp_path, keep=2, newest=tmp_path / "checkpoint-6", run_id="mine")
    assert [path.name for path in list_checkpoints(tmp_path)] == [f"checkpoint-{n}" for n in (1, 2, 4, 5, 6)]
    assert resolve_resume_path("latest", tmp_path) == tmp_path / "checkpoint-6"  # no run.json: the newest of all
    claim_output_dir(tmp_path, "other")
    assert resolve_resume_path("latest", tmp_path) == tmp_path / "checkpoint-4"  # the claiming run's newest
    claim_output_dir(tmp_path, "a run without checkpoints yet")
    assert resolve_resume_path("latest", tmp_path) == tmp_path / "checkpoint-6"
