"""preftune.atomic: a file or folder holds its old content or its new one, never a mix, and nothing is left behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from preftune import atomic


def _entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_files_are_written_whole_with_chinese_text_as_itself(tmp_path):
    atomic.write_text(tmp_path / "a" / "notes.txt", "偏好数据\n")
    atomic.write_json(tmp_path / "a" / "summary.json", {"名字": "运行", "n": 1})
    assert atomic.write_jsonl(tmp_path / "a" / "rows.jsonl", ({"prompt": f"问题{i}"} for i in range(3))) == 3
    atomic.write_bytes(tmp_path / "a" / "blob.bin", b"\x00\x01")
    folder = tmp_path / "a"
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "偏好数据\n"
    assert "名字" in (folder / "summary.json").read_text(encoding="utf-8")
    assert json.loads((folder / "summary.json").read_text(encoding="utf-8")) == {"名字": "运行", "n": 1}
    lines = (folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": "问题0"}, {"prompt": "问题1"}, {"prompt": "问题2"}]
    assert (folder / "blob.bin").read_bytes() == b"\x00\x01"
    assert _entries(folder) == ["blob.bin", "notes.txt", "rows.jsonl", "summary.json"]  # no temporaries


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "log_history.json"
    atomic.write_text(path, "old")

    def rows():
        yield {"a": 1}
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.write_jsonl(path, rows())
    assert path.read_text() == "old" and _entries(tmp_path) == ["log_history.json"]


def test_written_files_get_the_usual_permissions_not_owner_only(tmp_path):
    atomic.write_text(tmp_path / "summary.json", "{}")
    mode = stat.S_IMODE((tmp_path / "summary.json").stat().st_mode)
    assert mode == 0o666 & ~_umask()


def test_a_folder_is_replaced_as_a_whole_and_a_failed_write_keeps_the_old_one(tmp_path):
    target = tmp_path / "checkpoint-1"
    atomic.write_folder(target, lambda staging: (staging / "old.bin").write_bytes(b"old"))
    assert _entries(target) == ["old.bin"]

    def failing(staging: Path) -> None:
        (staging / "new.bin").write_bytes(b"new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic.write_folder(target, failing)
    assert _entries(tmp_path) == ["checkpoint-1"] and _entries(target) == ["old.bin"]

    def nested(staging: Path) -> None:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.bin").write_bytes(b"new")

    atomic.write_folder(target, nested)
    assert _entries(tmp_path) == ["checkpoint-1"] and _entries(target) == ["sub"]  # the old file is gone with its folder
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()


def test_update_folder_replaces_earlier_weight_files_and_keeps_the_others(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                 "README.md"):
        (folder / name).write_text("earlier save")

    def write(staging: Path) -> None:
        (staging / "model.safetensors").write_text("new")
        (staging / "config.json").write_text("{}")

    atomic.update_folder(folder, write, replaced_patterns=("model*.safetensors", "model.safetensors.index.json"))
    assert _entries(folder) == ["README.md", "config.json", "model.safetensors"]
    assert _entries(tmp_path) == ["model"]  # the staging folder is gone

    with pytest.raises(RuntimeError, match="unexpected folder"):
        atomic.update_folder(folder, lambda staging: (staging / "nested").mkdir())
    assert _entries(folder) == ["README.md", "config.json", "model.safetensors"] and _entries(tmp_path) == ["model"]


def test_a_full_model_save_removes_the_shards_of_an_earlier_save(tmp_path):
    """The trainer's whole-model save (no LoRA) goes through the same folder update as the adapter save."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from preftune.adapters import save_trainable_weights

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    output = tmp_path / "final"
    output.mkdir()
    for name in ("model-00001-of-00003.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"):
        (output / name).write_text("stale")
    save_trainable_weights(model, None, output)
    assert "model.safetensors" in _entries(output)
    assert not {"model-00001-of-00003.safetensors", "model.safetensors.index.json",
                "adapter_model.safetensors"} & set(_entries(output))
    assert _entries(tmp_path) == ["final"]


def test_finite_json_replaces_non_finite_floats_at_any_depth():
    value = {"a": float("nan"), "b": [1.5, float("inf"), {"c": -float("inf"), "d": "nan"}], "e": (2, float("nan"))}
    cleaned = atomic.finite_json(value)
    assert cleaned == {"a": None, "b": [1.5, None, {"c": None, "d": "nan"}], "e": [2, None]}
    json.loads(json.dumps(cleaned, allow_nan=False))  # strict JSON
