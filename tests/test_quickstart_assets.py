"""Specs for the offline quickstart's home-made tokenizer, tiny model and toy preference data (no training here)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.errors import ConfigError
from preftune.quickstart_assets import (
    HELD_OUT_OBJECTS,
    QUICKSTART_DATA_SIZES,
    QUICKSTART_TRAINING,
    build_model,
    build_preference_data,
    build_quickstart_workspace,
    build_tokenizer,
    write_jsonl,
)

SAMPLE_PROMPT = "user : can you fix the lamp ? assistant :"
SAMPLE_REPLY = " sure , i will fix the lamp now ."


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def small_split():
    return build_preference_data(200, 60, seed=3)


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_tokenizer_maps_each_word_and_punctuation_mark_to_one_token(tokenizer):
    text = SAMPLE_PROMPT + SAMPLE_REPLY
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == text.split()


def test_tokenizer_decode_round_trips_a_prompt_and_reply(tokenizer):
    text = SAMPLE_PROMPT + SAMPLE_REPLY
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(text.split())


def test_tokenizer_prepends_bos_only_when_special_tokens_are_requested(tokenizer):
    with_special = tokenizer(SAMPLE_PROMPT)["input_ids"]
    without_special = tokenizer(SAMPLE_PROMPT, add_special_tokens=False)["input_ids"]
    assert with_special[0] == tokenizer.bos_token_id
    assert with_special[1:] == without_special
    assert tokenizer.bos_token_id not in without_special


def test_tokenizer_has_distinct_bos_eos_pad_unk_tokens(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert None not in special_ids and len(special_ids) == 4


def test_tokenizer_splits_eos_appended_to_a_reply_into_its_own_token(tokenizer):
    # TRL-style data appends the EOS string straight after the final full stop.
    ids = tokenizer(SAMPLE_PROMPT + SAMPLE_REPLY + tokenizer.eos_token)["input_ids"]
    assert ids[-2:] == [tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id]


def test_tokenizer_marks_an_unknown_word_as_unk(tokenizer):
    words = "user : can you juggle the lamp ?".split()
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert ids[words.index("juggle")] == tokenizer.unk_token_id
    assert ids.count(tokenizer.unk_token_id) == 1


def test_every_generated_row_tokenizes_without_unk(tokenizer, small_split):
    train_rows, eval_rows = small_split
    for row in train_rows + eval_rows:
        ids = tokenizer(row["prompt"] + row["chosen"] + row["rejected"])["input_ids"]
        assert tokenizer.unk_token_id not in ids, row


def test_saved_tokenizer_reloads_with_autotokenizer_and_encodes_identically(tokenizer, tmp_path):
    build_tokenizer(save_dir=tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = SAMPLE_PROMPT + SAMPLE_REPLY + "</s>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == " ".join(
        (SAMPLE_PROMPT + SAMPLE_REPLY).split()
    )
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )


# --- model -----------------------------------------------------------------------------------------------------


def test_model_is_a_tiny_llama_sized_to_the_tokenizer_without_dropout(tokenizer):
    model = build_model(tokenizer)
    config = model.config
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert config.attention_dropout == 0.0
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert config.pad_token_id == tokenizer.pad_token_id and config.eos_token_id == tokenizer.eos_token_id


def test_model_saves_as_safetensors_and_reloads_with_identical_logits(tokenizer, tmp_path):
    model = build_model(tokenizer, seed=0, save_dir=tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded.eval()
    input_ids = torch.tensor([tokenizer(SAMPLE_PROMPT + SAMPLE_REPLY)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_model_weights_depend_only_on_the_seed_and_leave_global_rng_alone(tokenizer):
    torch.manual_seed(1234)
    expected_next_draw = torch.rand(1)
    torch.manual_seed(1234)
    first = build_model(tokenizer, seed=5)
    assert torch.equal(torch.rand(1), expected_next_draw)
    second = build_model(tokenizer, seed=5)
    other = build_model(tokenizer, seed=6)
    for (name, a), (_, b), (_, c) in zip(
        first.named_parameters(), second.named_parameters(), other.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)


# --- preference data -------------------------------------------------------------------------------------------


def test_data_has_the_requested_counts_and_the_standard_text_columns(small_split):
    train_rows, eval_rows = small_split
    assert (len(train_rows), len(eval_rows)) == (200, 60)
    for row in train_rows + eval_rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(value, str) and value for value in row.values())
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")


def test_chosen_differs_from_rejected_in_every_row(small_split):
    train_rows, eval_rows = small_split
    assert all(row["chosen"] != row["rejected"] for row in train_rows + eval_rows)


def test_rows_are_distinct_within_each_split(small_split):
    for rows in small_split:
        keys = [(row["prompt"], row["chosen"], row["rejected"]) for row in rows]
        assert len(set(keys)) == len(keys)


def test_no_eval_pair_or_eval_prompt_occurs_in_training(small_split):
    train_rows, eval_rows = small_split
    train_pairs = {(row["prompt"], row["chosen"], row["rejected"]) for row in train_rows}
    train_prompts = {row["prompt"] for row in train_rows}
    for row in eval_rows:
        assert (row["prompt"], row["chosen"], row["rejected"]) not in train_pairs
        assert row["prompt"] not in train_prompts


def test_held_out_objects_appear_only_in_the_eval_split(small_split):
    train_rows, eval_rows = small_split
    train_words = {word for row in train_rows for text in row.values() for word in text.split()}
    eval_words = {word for row in eval_rows for text in row.values() for word in text.split()}
    assert train_words.isdisjoint(HELD_OUT_OBJECTS)
    assert eval_words & set(HELD_OUT_OBJECTS)


def test_data_is_deterministic_for_a_seed_and_varies_across_seeds():
    assert build_preference_data(50, 20, seed=7) == build_preference_data(50, 20, seed=7)
    assert build_preference_data(50, 20, seed=7) != build_preference_data(50, 20, seed=8)


def test_asking_for_more_pairs_than_a_split_can_hold_is_a_config_error():
    with pytest.raises(ConfigError, match="n_eval"):
        build_preference_data(10, 10**6)
    with pytest.raises(ConfigError, match="n_train"):
        build_preference_data(-1, 10)


# --- files -----------------------------------------------------------------------------------------------------


def test_write_jsonl_writes_one_json_object_per_line(tmp_path):
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "d", "chosen": " é", "rejected": " f"}]
    path = write_jsonl(rows, tmp_path / "nested" / "rows.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_workspace_holds_a_loadable_model_with_its_tokenizer_and_both_data_files(tmp_path):
    paths = build_quickstart_workspace(tmp_path / "quickstart", seed=0)
    assert set(paths) == {"model_dir", "train_file", "eval_file"}
    assert all(Path(path).is_relative_to(tmp_path / "quickstart") for path in paths.values())
    tokenizer = AutoTokenizer.from_pretrained(paths["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(paths["model_dir"])
    assert model.config.vocab_size == len(tokenizer)
    train_lines = Path(paths["train_file"]).read_text(encoding="utf-8").splitlines()
    eval_lines = Path(paths["eval_file"]).read_text(encoding="utf-8").splitlines()
    assert (len(train_lines), len(eval_lines)) == (QUICKSTART_DATA_SIZES["n_train"], QUICKSTART_DATA_SIZES["n_eval"])
    assert json.loads(train_lines[0]).keys() == {"prompt", "chosen", "rejected"}


def test_quickstart_training_settings_are_valid_trl_dpo_config_fields():
    trl = pytest.importorskip("trl", reason="trl is the oracle for DPOConfig field names (dev dependency)")
    field_names = {field.name for field in dataclasses.fields(trl.DPOConfig)}
    assert set(QUICKSTART_TRAINING) <= field_names
