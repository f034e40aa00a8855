"""Errors first: what can be checked before a model loads is checked, in one pass, with one line per problem naming
the key or file; the loaders' library errors come whole on one line; ``preftune train`` fails before loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from torch import nn

from preftune import DPOConfig, DPOTrainer
from preftune.errors import CheckpointError, ConfigError, DataError
from preftune.models import load_causal_lm, load_tokenizer
from preftune.preflight import PreflightError, run_preflight_checks

from conftest import REPO_ROOT
from test_training import STORY_PAIRS


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS))
    return path


def _config(tmp_path, model, data_file, **overrides) -> DPOConfig:
    return DPOConfig(**{"model_name_or_path": str(model), "dataset": str(data_file), "output_dir": str(tmp_path / "out"),
                        "max_length": 64, **overrides})


def _model_copy(source: Path, target: Path, *names: str) -> Path:
    """A folder with some of ``source``'s files (a broken model folder, as users make them)."""
    target.mkdir()
    for name in names:
        shutil.copy(source / name, target / name)
    return target


def _raised(config: DPOConfig, **given) -> Exception:
    with pytest.raises(Exception) as caught:
        run_preflight_checks(config, **given)
    return caught.value


def _one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text
    return text


# ------------------------------------------------------------------------------------------ the model folder
def test_a_missing_model_path_names_the_key_and_the_path(stories_model_dir, tmp_path, data_file):
    missing = tmp_path / "no-such-model"
    error = _raised(_config(tmp_path, missing, data_file))
    assert isinstance(error, ConfigError) and error.key == "model_name_or_path"
    assert f"no such folder: {missing}" in _one_line(error) and "Repo id" not in str(error)


def test_a_folder_with_pickle_weights_only_says_safetensors_with_the_conversion(stories_model_dir, tmp_path, data_file):
    folder = _model_copy(stories_model_dir, tmp_path / "bin-only", "config.json", "tokenizer.json",
                         "tokenizer_config.json")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    error = _raised(_config(tmp_path, folder, data_file))
    message = _one_line(error)
    assert error.key == "model_name_or_path" and str(folder) in message
    assert "pytorch_model.bin" in message and "safetensors weights only" in message
    assert f"from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}')" in message


def test_a_folder_without_config_or_tokenizer_files_is_named(stories_model_dir, tmp_path, data_file):
    no_config = _model_copy(stories_model_dir, tmp_path / "no-config", "model.safetensors", "tokenizer.json")
    assert "has no config.json" in _one_line(_raised(_config(tmp_path, no_config, data_file)))
    no_tokenizer = _model_copy(stories_model_dir, tmp_path / "no-tokenizer", "config.json", "model.safetensors")
    error = _raised(_config(tmp_path, no_tokenizer, data_file))
    assert error.key == "model_name_or_path" and f"{no_tokenizer} has no tokenizer files" in _one_line(error)
    # the tokenizer from elsewhere: then that folder is the one checked, under its own key
    assert run_preflight_checks(_config(tmp_path, no_tokenizer, data_file, tokenizer_name_or_path=str(stories_model_dir))) is None
    error = _raised(_config(tmp_path, no_tokenizer, data_file, tokenizer_name_or_path=str(tmp_path / "nowhere")))
    assert error.key == "tokenizer_name_or_path"


def test_a_hub_id_is_announced_and_max_length_beyond_the_context_is_flagged(stories_model_dir, tmp_path, data_file,
                                                                           caplog):
    with caplog.at_level("WARNING", logger="preftune.preflight"):
        run_preflight_checks(_config(tmp_path, "some-org/some-model", data_file))
        run_preflight_checks(_config(tmp_path, stories_model_dir, data_file, max_length=2048))
    messages = [record.getMessage() for record in caplog.records]
    assert any("'some-org/some-model' is not a local folder" in m and "Hugging Face Hub" in m for m in messages)
    limit = json.loads((stories_model_dir / "config.json").read_text())["max_position_embeddings"]
    assert any(f"max_length 2048 is above the model's max_position_embeddings {limit}" in m for m in messages)


def test_loaded_models_are_not_checked(tmp_path, data_file):
    config = _config(tmp_path, tmp_path / "not-used", data_file)
    assert run_preflight_checks(config, model=nn.Linear(1, 1), tokenizer=object()) is None


# ------------------------------------------------------------------------------------------ output, data, keys
def test_an_output_dir_that_is_a_file_or_under_a_file_is_refused(stories_model_dir, tmp_path, data_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    error = _raised(_config(tmp_path, stories_model_dir, data_file, output_dir=str(blocker)))
    assert error.key == "output_dir" and f"output_dir {blocker} is a file" in _one_line(error)
    error = _raised(_config(tmp_path, stories_model_dir, data_file, output_dir=str(blocker / "run")))
    assert error.key == "output_dir" and f"{blocker} is a file, not a folder" in _one_line(error)
    assert run_preflight_checks(_config(tmp_path, stories_model_dir, data_file,  # a missing parent is fine
                                        output_dir=str(tmp_path / "new" / "deeper"))) is None


def test_a_missing_data_file_an_unknown_template_and_a_resume_target_are_all_reported_in_one_pass(
    stories_model_dir, tmp_path, data_file
):
    config = _config(tmp_path, stories_model_dir, tmp_path / "missing.jsonl", eval_dataset=str(tmp_path / "ev.jsonl"),
                     template="no-such-template", resume_from_checkpoint=str(tmp_path / "nowhere"))
    error = _raised(config)
    assert isinstance(error, PreflightError)
    kinds = {type(problem): problem for problem in error.problems}
    assert len(error.problems) == 4 and {CheckpointError, DataError, ConfigError} == set(kinds)
    message = _one_line(error)
    for expected in ("missing.jsonl: file not found", "ev.jsonl: file not found", "unknown chat template 'no-such-template'",
                     f"cannot resume from {tmp_path / 'nowhere'}: no such directory"):
        assert expected in message


def test_a_folder_that_is_no_checkpoint_and_latest_without_checkpoints_are_refused(stories_model_dir, tmp_path,
                                                                                    data_file):
    error = _raised(_config(tmp_path, stories_model_dir, data_file, resume_from_checkpoint=str(tmp_path)))
    assert isinstance(error, CheckpointError) and "not a preftune checkpoint" in str(error)
    error = _raised(_config(tmp_path, stories_model_dir, data_file, resume_from_checkpoint="latest"))
    assert isinstance(error, CheckpointError) and "holds no checkpoint-N folder" in str(error)


def test_the_trainer_given_a_path_refuses_before_loading_the_model(tmp_path, data_file, monkeypatch):
    loaded = []
    monkeypatch.setattr("preftune.model_setup.load_causal_lm", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr("preftune.model_setup.load_tokenizer", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError, match="no such folder"):
        DPOTrainer(model=str(tmp_path / "nowhere"), args=_config(tmp_path, tmp_path, data_file))
    assert loaded == []


# ------------------------------------------------------------------------------------------ the loaders
def test_library_errors_from_the_loaders_come_whole_on_one_line_naming_the_key(stories_model_dir, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    broken = _model_copy(stories_model_dir, tmp_path / "broken-tokenizer", "config.json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(str(broken), key="tokenizer_name_or_path")
    message = _one_line(caught.value)
    assert caught.value.key == "tokenizer_name_or_path" and str(broken) in message
    assert "Couldn't instantiate the backend tokenizer from one of:" in message
    assert "to convert a slow tokenizer to a fast one" in message  # the library's last line too: nothing cut off

    with pytest.raises(ConfigError) as caught:
        load_causal_lm("no-org/no-such-model", key="ref_model_name_or_path")
    message = _one_line(caught.value)
    assert caught.value.key == "ref_model_name_or_path" and "'no-org/no-such-model'" in message
    assert "not a local folder" in message and "Repo id must be" not in message


# ------------------------------------------------------------------------------------------ preftune train
def _train(config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(REPO_ROOT / "src"), "PREFTUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "preftune.cli", "train", str(path)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_preftune_train_prints_each_problem_on_one_line_before_loading_or_tokenizing(stories_model_dir, tmp_path,
                                                                                      data_file):
    bin_only = _model_copy(stories_model_dir, tmp_path / "bin-only", "config.json", "tokenizer.json")
    (bin_only / "pytorch_model.bin").write_bytes(b"pickle")
    output_file = tmp_path / "out"
    output_file.write_text("a file where the output folder should be")
    result = _train({"model_name_or_path": str(bin_only), "dataset": str(data_file), "output_dir": str(output_file),
                     "template": "nope", "max_length": 64}, tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("preftune: error:")]
    assert len(errors) == 3
    assert "key 'output_dir'" in errors[0] and "is a file" in errors[0]
    assert "key 'model_name_or_path'" in errors[1] and f"{bin_only} has only PyTorch pickle weights" in errors[1]
    assert "key 'template'" in errors[2]
    assert not (tmp_path / "cache").exists()  # nothing was tokenized
    assert "Loading weights" not in result.stderr and "Traceback" not in result.stderr
