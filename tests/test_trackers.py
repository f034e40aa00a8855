"""Experiment trackers through transformers' own callbacks (`report_to`): TensorBoard event files, an MLflow file
store, a W&B offline run and a local Trackio database each get the scalars of `log_history.json`, read back here
with each tracker's own format."""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import shared_asset
from preftune import DPOTrainer
from preftune.errors import ConfigError
from test_training import STORY_PAIRS, make_config

TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]


def _numbers(record: dict) -> dict[str, float]:
    return {key: value for key, value in record.items()
            if key not in ("step",) and isinstance(value, (int, float)) and math.isfinite(value)}


def _prefixed(key: str) -> str:
    """transformers' ``rewrite_logs``: eval_ metrics under "eval/", the others under "train/"."""
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One short run reporting to every tracker, each writing under a scratch folder; its log history."""
    tmp = tmp_path_factory.mktemp("trackers")
    patch = pytest.MonkeyPatch()
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true",
                        "MLFLOW_TRACKING_URI": f"file://{tmp / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
                        "TRACKIO_DIR": str(tmp / "trackio"), "HF_HUB_OFFLINE": "1"}.items():
        patch.setenv(name, value)
    # trackio reads TRACKIO_DIR once, at import: a module imported by an earlier test (TRL's OnlineDPOTrainer imports
    # trackio) keeps the default folder, so point its copies of the constant here too.
    for module in [module for name, module in sys.modules.items() if name == "trackio" or name.startswith("trackio.")]:
        if isinstance(getattr(module, "TRACKIO_DIR", None), Path):
            patch.setattr(module, "TRACKIO_DIR", tmp / "trackio")
    (tmp / "wandb").mkdir()
    args = make_config(tmp, max_steps=3, per_device_train_batch_size=4, report_to=TRACKERS, run_name="tracked",
                       eval_strategy="steps", eval_steps=2, logging_dir=str(tmp / "tensorboard"), project="preftune-test")
    model_dir = shared_asset("stories260K-hf")
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:3])
    trainer.train()
    trainer.end()
    patch.undo()
    history = json.loads((tmp / "run" / "log_history.json").read_text())
    assert history == trainer.state.log_history
    return tmp, history


@pytest.mark.slow
def test_tensorboard_event_files_hold_every_logged_scalar(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, history = tracked_run
    events = EventAccumulator(str(tmp / "tensorboard"))
    events.Reload()
    written = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    checked = 0
    for record in history:
        for key, value in _numbers(record).items():
            assert written[_prefixed(key)][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), key
            checked += 1
    assert checked > 40


@pytest.mark.slow
def test_mlflow_file_store_holds_every_logged_metric(tracked_run):
    import mlflow

    tmp, history = tracked_run
    client = mlflow.tracking.MlflowClient(f"file://{tmp / 'mlruns'}")
    (run,) = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    for record in history:
        for key, value in _numbers(record).items():
            if key == "epoch":
                continue
            steps = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, key)}
            assert steps[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert run.data.params["beta"] == "0.1"  # the config goes along as parameters


def _wandb_records(path: Path):
    """The records of a W&B run file: a ":W&B" header (7 bytes), then LevelDB-log framing (32 KiB blocks of
    records with a 7-byte header: checksum, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, []
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        if left_in_block < 7:
            position += left_in_block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if kind == 0:  # zero padding to the end of the block
            position += left_in_block
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pieces = [payload]
        elif kind == 3:
            pieces.append(payload)
        elif kind == 4:
            yield b"".join(pieces + [payload])


@pytest.mark.slow
def test_wandb_offline_run_holds_every_logged_metric(tracked_run):
    from wandb.proto import wandb_internal_pb2

    tmp, history = tracked_run
    (run_file,) = (tmp / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for raw in _wandb_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["train/global_step"], {}).update(row)
    checked = 0
    for record in history:
        if "train_runtime" in record:
            continue  # transformers' W&B callback puts the end-of-training record into the run summary
        for key, value in _numbers(record).items():
            assert by_step[record["step"]][_prefixed(key)] == pytest.approx(value, rel=1e-6, abs=1e-7), key
            checked += 1
    assert checked > 30


@pytest.mark.slow
def test_trackio_database_holds_every_logged_metric(tracked_run):
    tmp, history = tracked_run
    (database,) = (tmp / "trackio").glob("*.db")
    with sqlite3.connect(database) as connection:
        rows = connection.execute("select metrics from metrics").fetchall()
    by_step: dict[int, dict] = {}
    for (metrics,) in rows:
        metrics = json.loads(metrics)
        by_step.setdefault(metrics["train/global_step"], {}).update(metrics)
    checked = 0
    for record in history:
        if "train_runtime" in record:
            continue  # transformers' Trackio callback keeps the end-of-training values out of the series
        for key, value in _numbers(record).items():
            assert by_step[record["step"]][_prefixed(key)] == pytest.approx(value, rel=1e-6, abs=1e-7), key
            checked += 1
    assert checked > 30


def test_a_tracker_that_is_not_installed_is_one_line(stories_model_dir, tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="report_to tensorboard: the tensorboard package is not installed"):
        DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path, report_to="tensorboard"),
                   train_dataset=STORY_PAIRS)
