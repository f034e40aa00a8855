"""Disk and permission failures while saving, and checkpoint paths that try to lead outside ``output_dir``.

A failed write must end the run with a message that names the checkpoint and says which good ones remain, and it
must leave the last good checkpoint whole (resumable). Paths read from a checkpoint (its manifest, linked folders)
must never make us read or delete files elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from preftune import DPOTrainer
from preftune.checkpoint import (
    list_checkpoints,
    prune_checkpoints,
    resolve_resume_path,
    verify_checkpoint,
    write_checkpoint,
)
from preftune.errors import CheckpointError, ConfigError

from test_training import STORY_PAIRS, make_config


def _write_small_checkpoint(target: Path, payload: bytes = b"weights") -> Path:
    return write_checkpoint(
        target,
        save_weights=lambda directory: (directory / "model.bin").write_bytes(payload),
        trainer_state={"global_step": int(target.name.split("-")[1])},
        optimizer_state={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
    )


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _hidden_leftovers(directory: Path) -> list[str]:
    return [path.name for path in directory.iterdir() if path.name.startswith(".")]


# ------------------------------------------------------------------------------------------ a writer that fails
def test_a_full_disk_while_writing_keeps_the_previous_checkpoint_and_names_it(tmp_path, monkeypatch):
    good = _write_small_checkpoint(tmp_path / "checkpoint-1")
    monkeypatch.setattr("preftune.checkpoint.save_file", _disk_full)  # the optimizer tensors hit a full disk
    with pytest.raises(CheckpointError) as caught:
        _write_small_checkpoint(tmp_path / "checkpoint-2")
    message = str(caught.value)
    assert "checkpoint-2" in message and "No space left on device" in message
    assert "checkpoint-1" in message and "resume_from_checkpoint: latest" in message
    assert verify_checkpoint(good) is None
    assert not (tmp_path / "checkpoint-2").exists() and _hidden_leftovers(tmp_path) == []
    assert resolve_resume_path("latest", tmp_path) == good


def test_a_failed_swap_of_a_resaved_step_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    target = _write_small_checkpoint(tmp_path / "checkpoint-4", payload=b"old")
    real_rename = os.rename

    def rename(source, destination):
        if ".staging-" in str(source):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(source, destination)

    monkeypatch.setattr("preftune.atomic.os.rename", rename)  # the checkpoint folder is swapped in by preftune.atomic
    with pytest.raises(CheckpointError):
        _write_small_checkpoint(target, payload=b"new")
    assert (target / "model.bin").read_bytes() == b"old"
    assert verify_checkpoint(target) is None and _hidden_leftovers(tmp_path) == []


def test_training_stops_clearly_when_a_checkpoint_cannot_be_written_and_resumes_from_the_last_good_one(
    stories_model_dir, tmp_path, monkeypatch
):
    import preftune.checkpoint as checkpoint

    real_save_file, calls = checkpoint.save_file, []

    def fail_on_second_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            _disk_full()
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fail_on_second_checkpoint)
    args = make_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, per_device_train_batch_size=4)
    with pytest.raises(CheckpointError, match=r"checkpoint-2.*No space left.*checkpoint-1"):
        DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()
    output = tmp_path / "run"
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-1"]
    assert verify_checkpoint(output / "checkpoint-1") is None and _hidden_leftovers(output) == []

    monkeypatch.setattr(checkpoint, "save_file", real_save_file)  # space freed
    resumed = make_config(tmp_path, max_steps=3, save_strategy="steps", save_steps=1, per_device_train_batch_size=4,
                          resume_from_checkpoint="latest")
    result = DPOTrainer(model=str(stories_model_dir), args=resumed, train_dataset=STORY_PAIRS).train()
    assert result.global_step == 3
    steps = [record["step"] for record in json.loads((output / "log_history.json").read_text()) if "loss" in record]
    assert steps == [1, 2, 3]


def test_an_output_dir_that_cannot_be_created_is_refused_before_training(stories_model_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = make_config(tmp_path, output_dir=str(blocker / "run"), max_steps=1)
    with pytest.raises(ConfigError, match=r"output_dir .*a-file/run is not writable"):
        DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()


# ------------------------------------------------------------------------------------------ a real small disk
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4.5 MiB tmpfs mounted on a fresh folder (root only; skipped where mounting is not permitted)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4600k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); "
                    "the patched-writer tests cover the same paths")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_real_full_disk_leaves_the_last_good_checkpoint_whole(stories_model_dir, tmp_path, small_tmpfs):
    """stories260K's checkpoint (weights + two Adam moments) takes ~3.1 MiB: the first fits, the second cannot."""
    output = small_tmpfs / "run"
    args = make_config(tmp_path, output_dir=str(output), max_steps=3, save_strategy="steps", save_steps=1,
                       per_device_train_batch_size=4, plot_loss=False)
    with pytest.raises(CheckpointError, match="No space left on device"):
        DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()
    assert [path.name for path in list_checkpoints(output)] == ["checkpoint-1"]
    assert verify_checkpoint(output / "checkpoint-1") is None and _hidden_leftovers(output) == []


def test_a_read_only_output_disk_is_refused_before_training(stories_model_dir, tmp_path, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    args = make_config(tmp_path, output_dir=str(small_tmpfs / "run"), max_steps=1)
    with pytest.raises(ConfigError, match="output_dir .* is not writable"):
        DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS).train()


# ------------------------------------------------------------------------------------------ paths stay inside
def test_a_manifest_naming_a_file_outside_the_checkpoint_is_refused(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    checkpoint = _write_small_checkpoint(tmp_path / "run" / "checkpoint-1")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for name in ("../../secret.txt", str(secret)):
        crafted = {**manifest, name: {"size": 9, "sha256": "0" * 64}}
        (checkpoint / "manifest.json").write_text(json.dumps(crafted))
        assert "outside the checkpoint" in verify_checkpoint(checkpoint)
    (checkpoint / "manifest.json").write_text(json.dumps(["not", "an", "object"]))
    assert "not a JSON object" in verify_checkpoint(checkpoint)


def test_a_file_linked_from_inside_a_checkpoint_is_refused(tmp_path):
    checkpoint = _write_small_checkpoint(tmp_path / "run" / "checkpoint-1")
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(checkpoint / "model.bin", outside)
    (checkpoint / "model.bin").unlink()
    (checkpoint / "model.bin").symlink_to(outside)  # same bytes, so only the link itself can be objected to
    assert "outside the checkpoint" in verify_checkpoint(checkpoint)


def test_a_linked_checkpoint_folder_is_neither_resumed_nor_pruned(tmp_path):
    output = tmp_path / "run"
    good = _write_small_checkpoint(output / "checkpoint-1")
    foreign = _write_small_checkpoint(tmp_path / "foreign" / "checkpoint-9")
    (output / "checkpoint-9").symlink_to(foreign, target_is_directory=True)
    assert list_checkpoints(output) == [good]
    assert resolve_resume_path("latest", output) == good
    newest = _write_small_checkpoint(output / "checkpoint-2")
    prune_checkpoints(output, keep=1, newest=newest)
    assert foreign.is_dir() and verify_checkpoint(foreign) is None  # the link's target is never deleted
    assert list_checkpoints(output) == [newest]


def test_the_cli_reports_an_os_error_as_one_line_naming_the_path(monkeypatch, capsys):
    from preftune import cli

    def no_space(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/log_history.json")

    monkeypatch.setattr("preftune.config.config_table_markdown", no_space)
    assert cli.main(["config-keys"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("preftune: error: ") and "/out/log_history.json" in error and "Traceback" not in error
