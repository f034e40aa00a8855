"""The CLI end to end on stories260K, and bad input: one clear line naming file/row/key, exit 2, no traceback."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, shared_asset

METRIC_NAMES = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1", "PREFTUNE_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "preftune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def write_yaml(path: Path, settings: dict) -> Path:
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    return path


@pytest.fixture
def hh_config(tmp_path) -> dict:
    return {
        "model_name_or_path": str(shared_asset("stories260K-hf")),
        "dataset": str(shared_asset("hh-rlhf-test/helpful-base-test.jsonl.gz")),
        "max_samples": 48, "val_size": 8, "max_length": 384, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2, "learning_rate": 1e-4, "logging_steps": 1, "eval_strategy": "steps",
        "eval_steps": 2, "save_strategy": "no", "output_dir": str(tmp_path / "out"),
    }


def test_cli_trains_and_writes_the_four_output_files(tmp_path, hh_config):
    config = write_yaml(tmp_path / "cfg.yaml", hh_config)
    result = run_cli("train", str(config), "max_steps=4", "beta=0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"

    history = json.loads((out / "log_history.json").read_text())
    train_records = [r for r in history if "loss" in r]
    eval_records = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [2, 4]
    for record in train_records:
        for name in METRIC_NAMES + ["grad_norm", "learning_rate", "epoch", "step", "tokens_per_second"]:
            assert math.isfinite(record[name]), name
        assert record["rewards/margins"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"], abs=1e-5)
        assert 0 <= record["rewards/accuracies"] <= 1
    assert train_records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    for name in METRIC_NAMES:
        assert math.isfinite(eval_records[-1][f"eval_{name}"])

    with open(out / "training_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["loss"]) == pytest.approx(train_records[-1]["loss"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["loss"] == pytest.approx(train_records[-1]["loss"])
    assert summary["eval"]["rewards/accuracies"] == pytest.approx(eval_records[-1]["eval_rewards/accuracies"])
    assert summary["config"]["beta"] == 0.2 and summary["config"]["max_steps"] == 4
    assert summary["global_step"] == 4 and summary["pairs_per_second"] > 0 and summary["tokens_per_second"] > 0
    assert summary["memory"]["peak_rss_mb"] > 0
    data = summary["data"]["train"]
    assert data["rows_read"] == 40 and data["pairs_used"] + data["rows_dropped_no_room"] == 40

    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_llamafactory_yaml_parses_and_runs(tmp_path):
    model_dir = shared_asset("stories260K-hf")
    dataset_dir = shared_asset("llamafactory")
    config = tmp_path / "llamafactory.yaml"
    config.write_text(f"""\
model_name_or_path: {model_dir}
stage: dpo
do_train: true
finetuning_type: full
pref_beta: 0.1
pref_loss: sigmoid
dataset: dpo_en_demo
dataset_dir: {dataset_dir}
template: qwen
cutoff_len: 1024
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
num_train_epochs: 2.0
learning_rate: 5.0e-6
bf16: true
output_dir: saves/demo/dpo
""")
    # max_samples/cutoff_len shrink the run to seconds; everything else is the YAML as LLaMA-Factory users write it.
    result = run_cli("train", str(config), "max_samples=32", "cutoff_len=512", "max_steps=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "saves/demo/dpo/summary.json").read_text())
    assert summary["config"]["beta"] == 0.1 and summary["config"]["bf16"] is True
    assert summary["config"]["gradient_accumulation_steps"] == 16 and summary["global_step"] == 2


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("preftune: error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])


def _bad_data_run(tmp_path, hh_config, data_file: Path, *extra: str):
    config = write_yaml(tmp_path / "cfg.yaml", {**hh_config, "dataset": str(data_file), "val_size": 0})
    return run_cli("train", str(config), "max_steps=1", *extra, cwd=tmp_path)


GOOD_ROW = {"prompt": "Tom had a red ball.", "chosen": " He was happy.", "rejected": " It was sad."}


@pytest.mark.parametrize(
    "name, lines, fragments",
    [
        ("malformed_json", [json.dumps(GOOD_ROW), "{not json", json.dumps(GOOD_ROW)], ["row 1"]),
        ("missing_chosen", [json.dumps(GOOD_ROW), json.dumps({"prompt": "a", "rejected": "b"})], ["row 1", "chosen"]),
        ("non_string_completion", [json.dumps({**GOOD_ROW, "rejected": 42}), json.dumps(GOOD_ROW)], ["row 0", "rejected"]),
        ("empty_response", [json.dumps(GOOD_ROW), json.dumps({**GOOD_ROW, "chosen": "   "})], ["row 1", "chosen"]),
    ],
)
def test_bad_rows_stop_with_file_row_and_field(tmp_path, hh_config, name, lines, fragments):
    data_file = tmp_path / f"{name}.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    _assert_one_line_error(_bad_data_run(tmp_path, hh_config, data_file), str(data_file), *fragments)


def test_skip_policy_counts_bad_rows_in_the_summary(tmp_path, hh_config):
    data_file = tmp_path / "mixed.jsonl"
    rows = [GOOD_ROW] * 6 + [{"prompt": "a", "rejected": "b"}, {**GOOD_ROW, "chosen": ""}]
    data_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _bad_data_run(tmp_path, hh_config, data_file, "on_bad_row=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["train"]["rows_skipped_bad"] == 2
    assert sorted(r["row"] for r in summary["data"]["train"]["skipped_rows"]) == [6, 7]


def test_missing_data_file_is_named(tmp_path, hh_config):
    missing = tmp_path / "nope.jsonl"
    _assert_one_line_error(_bad_data_run(tmp_path, hh_config, missing), "nope.jsonl")


def test_wrong_typed_config_value_names_key_and_file(tmp_path, hh_config):
    config = write_yaml(tmp_path / "cfg.yaml", {**hh_config, "learning_rate": "fast"})
    _assert_one_line_error(run_cli("train", str(config), cwd=tmp_path), "cfg.yaml", "learning_rate")


def test_unknown_config_key_suggests_the_closest(tmp_path, hh_config):
    config = write_yaml(tmp_path / "cfg.yaml", {**hh_config, "betta": 0.2})
    _assert_one_line_error(run_cli("train", str(config), cwd=tmp_path), "cfg.yaml", "betta", "beta")


def test_missing_model_directory_is_named(tmp_path, hh_config):
    config = write_yaml(tmp_path / "cfg.yaml", {**hh_config, "model_name_or_path": str(tmp_path / "no-model")})
    _assert_one_line_error(run_cli("train", str(config), cwd=tmp_path), "no-model", "model_name_or_path")


def test_overrides_may_follow_the_nproc_option():
    """`preftune train cfg.yaml --nproc 2 beta=0.2`: the overrides after an option still reach the config."""
    from preftune.cli import parse_args

    args = parse_args(["train", "cfg.yaml", "max_steps=3", "--nproc", "2", "beta=0.2"])
    assert (args.config, args.overrides, args.nproc) == ("cfg.yaml", ["max_steps=3", "beta=0.2"], 2)
    with pytest.raises(SystemExit):  # anything else is still refused
        parse_args(["train", "cfg.yaml", "--nproc", "2", "--bogus"])
