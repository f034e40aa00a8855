"""Precomputed reference log-probs: equal to the on-the-fly reference, cached by what decides them, and safe with
bad cache files (reported, never overwritten unless asked)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.data.tokenize import TokenizeSettings, tokenize_dataset
from preftune.errors import ConfigError
from preftune.logprobs import completion_logprobs
from preftune.ref_cache import (
    PrecomputedReference,
    attach_reference_logps,
    dataset_fingerprint,
    precompute_reference_logps,
    reference_fingerprint,
)
from preftune.reference import FrozenReference

from test_training import STORY_PAIRS as _TRAINING_PAIRS

COLLATORS = {"plain": collate_pairs, "shared_prefix": collate_shared_prefix}

STORY_PAIRS = _TRAINING_PAIRS[:7]  # prompts and completions of different lengths, so batches pad


def with_negatives(pairs):
    """Three negatives per prompt: its rejected, the next pair's chosen and the next pair's rejected."""
    return [
        {**pair, "rejected": [pair["rejected"], pairs[(i + 1) % len(pairs)]["chosen"], pairs[(i + 1) % len(pairs)]["rejected"]]}
        for i, pair in enumerate(pairs)
    ]


@pytest.fixture(scope="module")
def model_dir():
    from conftest import shared_asset

    return shared_asset("stories260K-hf")


@pytest.fixture(scope="module")
def stories(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def tokenized(tokenizer, pairs=STORY_PAIRS, max_length=None):
    return tokenize_dataset(Dataset.from_list(pairs), tokenizer, TokenizeSettings(max_length=max_length))


class CountingScore:
    """``score`` for ``precompute_reference_logps`` that counts its calls."""

    def __init__(self, model):
        self.reference = FrozenReference(model)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        return self.reference.completion_logps(batch)


def precompute(model, dataset, cache_dir, *, collate_fn=collate_pairs, score=None, **overrides):
    settings = dict(
        collate_fn=collate_fn, pad_token_id=0, batch_size=3, cache_dir=cache_dir,
        key_parts={"reference": reference_fingerprint(model), "ld_alpha": None},
    )
    settings.update(overrides)
    return precompute_reference_logps(score or CountingScore(model), dataset, **settings)


# ------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("layout", COLLATORS)
@pytest.mark.parametrize("negatives", [1, 3])
@pytest.mark.parametrize("max_length", [None, 24])  # 24 cuts the completions of 3-4 of the 7 rows
def test_precomputed_values_equal_the_on_the_fly_reference(stories, tokenizer, tmp_path, layout, negatives, max_length):
    data = tokenized(tokenizer, STORY_PAIRS if negatives == 1 else with_negatives(STORY_PAIRS), max_length)
    assert (data.stats.truncated > 0) == (max_length is not None) and data.stats.rows_out == 7
    dataset, collate = data.dataset, COLLATORS[layout]
    result = precompute(stories, dataset, tmp_path, collate_fn=collate)
    assert result.values.shape == (len(dataset), negatives + 1) and result.values.dtype == torch.float32

    examples = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        same_batches = torch.cat(
            [completion_logprobs(stories, collate(examples[i : i + 3], pad_token_id=0)).logps for i in range(0, 7, 3)], 1
        )
        one_batch = completion_logprobs(stories, collate(examples, pad_token_id=0)).logps
    torch.testing.assert_close(result.values, same_batches.T, atol=0, rtol=0)
    # Other padding changes float32 sums of ~50 nats in the last bits only.
    torch.testing.assert_close(result.values, one_batch.T, atol=1e-5, rtol=1e-6)

    attached = attach_reference_logps(dataset, result.values)
    frozen, precomputed = FrozenReference(stories), PrecomputedReference()
    for subset in ([5, 0, 3], [6], [2, 4, 1, 0]):
        batch = collate([attached[i] for i in subset], pad_token_id=0)
        torch.testing.assert_close(batch.ref_logps, frozen.completion_logps(batch), atol=1e-5, rtol=1e-6)
        for got, want in zip(precomputed.logps(batch), frozen.logps(batch)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_values_do_not_depend_on_the_batch_size_or_device_argument(stories, tokenizer):
    dataset = tokenized(tokenizer).dataset
    one = precompute(stories, dataset, None, batch_size=1, device="cpu").values
    all_rows = precompute(stories, dataset, None, batch_size=len(dataset)).values
    torch.testing.assert_close(one, all_rows, atol=1e-5, rtol=1e-6)


def test_unpaired_rows_have_one_column(stories, tokenizer):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i % 2 == 0} for i, p in enumerate(STORY_PAIRS)]
    dataset = tokenized(tokenizer, rows).dataset
    result = precompute(stories, dataset, None)
    batch = collate_pairs([attach_reference_logps(dataset, result.values)[i] for i in (3, 1)], pad_token_id=0)
    assert batch.ref_logps.shape == (1, 2)
    torch.testing.assert_close(batch.ref_logps, FrozenReference(stories).completion_logps(batch), atol=1e-5, rtol=1e-6)


def test_attach_replaces_an_existing_column_and_checks_the_row_count(tokenizer):
    dataset = tokenized(tokenizer).dataset
    first = attach_reference_logps(dataset, torch.zeros(len(dataset), 2))
    second = attach_reference_logps(first, torch.ones(len(dataset), 2))
    assert second[4]["ref_logps"] == [1.0, 1.0] and second.column_names.count("ref_logps") == 1
    assert first._fingerprint != second._fingerprint
    with pytest.raises(ValueError, match="shape"):
        attach_reference_logps(dataset, torch.zeros(len(dataset) + 1, 2))


def test_a_batch_without_precomputed_values_is_a_clear_error(tokenizer):
    dataset = tokenized(tokenizer).dataset
    batch = collate_pairs([dataset[0], dataset[1]], pad_token_id=0)
    reference = PrecomputedReference()
    assert reference.to("cpu") is reference and reference.model is None
    with pytest.raises(ValueError, match="no precomputed reference log-probs"):
        reference.logps(batch)


# ------------------------------------------------------------------------------------------------- cache
def test_a_rerun_reads_the_cache_without_scoring(stories, tokenizer, tmp_path, caplog):
    dataset = tokenized(tokenizer).dataset
    first_score, second_score = CountingScore(stories), CountingScore(stories)
    first = precompute(stories, dataset, tmp_path, score=first_score)
    with caplog.at_level("INFO", logger="preftune.ref_cache"):
        second = precompute(stories, dataset, tmp_path, score=second_score)
    assert f"reusing precomputed reference log-probs from {first.path}" in caplog.text
    assert first_score.calls == 3 and not first.reused and first.path.exists()
    assert second_score.calls == 0 and second.reused and second.path == first.path
    assert torch.equal(first.values, second.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.path.name]  # no temporary file left behind


def test_the_cache_misses_when_the_data_the_model_or_the_options_change(stories, tokenizer, tmp_path):
    data = tokenized(tokenizer, max_length=None).dataset
    base = precompute(stories, data, tmp_path)

    edited = data.to_list()
    edited[4]["chosen_ids"] = edited[4]["chosen_ids"][:-2] + [300, 2]  # one token of one row
    changed_model = copy.deepcopy(stories)
    with torch.no_grad():
        changed_model.model.layers[0].mlp.up_proj.weight[3, 5] += 0.01
    shorter = tokenized(tokenizer, max_length=24).dataset
    alpha = {"reference": reference_fingerprint(stories), "ld_alpha": 0.5}
    runs = [
        precompute(stories, Dataset.from_list(edited), tmp_path),
        precompute(changed_model, data, tmp_path, score=CountingScore(changed_model)),
        precompute(stories, shorter, tmp_path),
        precompute(stories, data, tmp_path, key_parts=alpha),
    ]
    assert not any(run.reused for run in runs)
    assert len({base.path, *(run.path for run in runs)}) == 5
    assert not torch.equal(runs[1].values, base.values)  # the changed weight changes the values, not only the key


def test_the_key_must_name_the_reference(stories, tokenizer):
    with pytest.raises(ValueError, match="reference"):
        precompute(stories, tokenized(tokenizer).dataset, None, key_parts={"ld_alpha": None})


def test_without_a_cache_dir_nothing_is_stored(stories, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    score = CountingScore(stories)
    result = precompute(stories, tokenized(tokenizer).dataset, None, score=score)
    assert result.path is None and not result.reused and score.calls == 3
    assert list(tmp_path.iterdir()) == []


def _corrupt_truncated(path, rows, k):
    path.write_bytes(path.read_bytes()[:-7])


def _foreign_key(path, rows, k):
    save_file({"ref_logps": torch.zeros(rows, k)}, str(path), metadata={"key": "0" * 64, "version": "1"})


def _wrong_shape(path, rows, k):
    key = path.stem
    save_file({"ref_logps": torch.zeros(rows + 1, k)}, str(path), metadata={"key": key, "version": "1"})


def _not_finite(path, rows, k):
    values = torch.zeros(rows, k)
    values[2, 1] = float("nan")
    save_file({"ref_logps": values}, str(path), metadata={"key": path.stem, "version": "1"})


@pytest.mark.parametrize("spoil", [_corrupt_truncated, _foreign_key, _wrong_shape, _not_finite])
def test_a_bad_cache_file_is_reported_and_left_alone_unless_overwrite(stories, tokenizer, tmp_path, spoil):
    dataset = tokenized(tokenizer).dataset
    good = precompute(stories, dataset, tmp_path)
    spoil(good.path, len(dataset), 2)
    spoiled = good.path.read_bytes()

    score = CountingScore(stories)
    with pytest.raises(ConfigError) as caught:
        precompute(stories, dataset, tmp_path, score=score)
    assert caught.value.key == "precompute_ref_log_probs"
    assert str(good.path) in str(caught.value) and "overwrite_cache: true" in str(caught.value)
    assert good.path.read_bytes() == spoiled and score.calls == 0

    replaced = precompute(stories, dataset, tmp_path, overwrite=True)
    assert not replaced.reused and replaced.path == good.path
    torch.testing.assert_close(replaced.values, good.values, atol=0, rtol=0)
    assert precompute(stories, dataset, tmp_path).reused


def test_overwrite_recomputes_a_good_file_too(stories, tokenizer, tmp_path):
    dataset = tokenized(tokenizer).dataset
    precompute(stories, dataset, tmp_path)
    score = CountingScore(stories)
    assert not precompute(stories, dataset, tmp_path, score=score, overwrite=True).reused and score.calls == 3


def test_non_finite_reference_values_are_refused_and_not_cached(stories, tokenizer, tmp_path):
    from preftune.errors import DataError

    dataset = tokenized(tokenizer).dataset

    def score(batch):
        values = FrozenReference(stories).completion_logps(batch)
        return torch.where(torch.tensor(batch.rows) == 4, float("-inf"), values)

    with pytest.raises(DataError, match="non-finite") as caught:
        precompute(stories, dataset, tmp_path, score=score)
    assert caught.value.row == 4 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- fingerprints
class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(3, 3)
        self.adapter = nn.Linear(3, 3, bias=False)
        self.register_buffer("scale", torch.ones(3))


def test_reference_fingerprint_covers_weights_buffers_and_dtype_and_honours_exclude():
    torch.manual_seed(0)
    model = TwoLayers()
    fingerprint = reference_fingerprint(model)
    skip_adapter = lambda name: name.startswith("adapter.")  # noqa: E731
    without_adapter = reference_fingerprint(model, exclude=skip_adapter)
    assert fingerprint == reference_fingerprint(copy.deepcopy(model)) and fingerprint != without_adapter

    with torch.no_grad():
        model.adapter.weight[0, 0] += 1.0
    assert reference_fingerprint(model) != fingerprint
    assert reference_fingerprint(model, exclude=skip_adapter) == without_adapter

    buffered = copy.deepcopy(model)
    buffered.scale[1] = 2.0
    assert reference_fingerprint(buffered) != reference_fingerprint(model)
    assert reference_fingerprint(copy.deepcopy(model).double()) != reference_fingerprint(model)
    assert reference_fingerprint(copy.deepcopy(model).bfloat16()) != reference_fingerprint(model)


def test_dataset_fingerprint_follows_content_and_order_not_storage(tokenizer):
    dataset = tokenized(tokenizer).dataset
    fingerprint = dataset_fingerprint(dataset)
    rows = dataset.to_list()
    assert dataset_fingerprint(Dataset.from_list(rows)) == fingerprint  # int64 columns, new table
    assert dataset_fingerprint(dataset.select(range(len(dataset)))) == fingerprint
    assert dataset_fingerprint(dataset.remove_columns("row")) == fingerprint
    assert dataset_fingerprint(dataset.select([1, 0, *range(2, len(dataset))])) != fingerprint
    moved = [dict(row) for row in rows]  # same tokens, the prompt/completion boundary moved by one
    moved[0]["chosen_ids"] = moved[0]["prompt_ids"][-1:] + moved[0]["chosen_ids"]
    moved[0]["prompt_ids"] = moved[0]["prompt_ids"][:-1]
    assert dataset_fingerprint(Dataset.from_list(moved)) != fingerprint
    regrouped = [dict(row) for row in rows]  # the same stream of chosen ids, cut into rows differently
    regrouped[1]["chosen_ids"] = regrouped[0]["chosen_ids"][-1:] + regrouped[1]["chosen_ids"]
    regrouped[0]["chosen_ids"] = regrouped[0]["chosen_ids"][:-1]
    assert dataset_fingerprint(Dataset.from_list(regrouped)) != fingerprint
    negatives = tokenized(tokenizer, with_negatives(STORY_PAIRS)).dataset
    assert dataset_fingerprint(negatives) != fingerprint
    assert dataset_fingerprint(negatives.select(range(3, 7))) == dataset_fingerprint(Dataset.from_list(negatives.to_list()[3:]))
