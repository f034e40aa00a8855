"""Micro-batch planning: by pair count and by token budget (``max_tokens_per_batch``)."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune import DPOTrainer
from preftune.data.batching import plan_batches, row_token_counts, token_budget_groups

from test_training import STORY_PAIRS, make_config


def test_pair_count_batches_keep_the_seeded_shuffle():
    groups = plan_batches(10, 4, shuffle_seed=3, drop_last=False)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert groups == [expected[0:4], expected[4:8], expected[8:10]]
    assert plan_batches(10, 4, shuffle_seed=3, drop_last=True) == groups[:2]
    assert plan_batches(5, 2, shuffle_seed=None, drop_last=False) == [[0, 1], [2, 3], [4]]


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(1, 300), min_size=1, max_size=60),
    budget=st.integers(1, 800),
    max_rows=st.integers(1, 9),
)
def test_token_budget_groups_cover_every_row_once_within_the_limits(counts, budget, max_rows):
    groups = token_budget_groups(counts, budget, max_rows)
    assert sorted(row for group in groups for row in group) == list(range(len(counts)))
    for group in groups:
        assert 1 <= len(group) <= max_rows
        tokens = sum(counts[row] for row in group)
        assert tokens <= budget or len(group) == 1  # only a lone over-long row may exceed the budget


def test_token_budget_partition_is_fixed_and_only_its_order_is_shuffled():
    counts = [5, 40, 12, 33, 7, 21, 18, 2, 29, 11]
    epoch0 = plan_batches(10, 8, shuffle_seed=0, drop_last=False, token_counts=counts, max_tokens=50)
    epoch1 = plan_batches(10, 8, shuffle_seed=1, drop_last=False, token_counts=counts, max_tokens=50)
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, epoch1))
    assert len({tuple(map(tuple, e)) for e in (epoch0, epoch1)}) == 2 or len(epoch0) == 1
    # Sorting by length packs similar lengths together: the longest rows come first in the unshuffled plan.
    assert plan_batches(10, 8, shuffle_seed=None, drop_last=False, token_counts=counts, max_tokens=50)[0] == [1]


def _tokenized(rows):
    return datasets.Dataset.from_list(rows)


def test_row_token_counts_count_the_prompt_once_or_per_completion():
    data = _tokenized(
        [
            {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [1], "chosen_ids": [4, 5, 6, 7], "rejected_ids": [8, 9]},
        ]
    )
    assert row_token_counts(data, prompt_once=True) == [6, 7]
    assert row_token_counts(data, prompt_once=False) == [9, 8]
    assert row_token_counts(data.select([1]), prompt_once=True) == [7]  # selections see their own rows


def test_row_token_counts_sum_several_negatives():
    data = _tokenized([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [[4, 5], [6], [7, 8, 9]]}])
    assert row_token_counts(data, prompt_once=True) == [2 + 1 + 6]
    assert row_token_counts(data, prompt_once=False) == [2 * 4 + 1 + 6]


def test_training_with_a_token_budget_uses_budgeted_batches(stories_model_dir, tmp_path):
    args = make_config(
        tmp_path, max_tokens_per_batch=60, per_device_train_batch_size=8, num_train_epochs=1, max_steps=-1,
        prefix_sharing=True,
    )
    trainer = DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS)
    counts = row_token_counts(trainer.data.train.dataset, prompt_once=True)
    batches = trainer.batch_maker.batches(trainer.data.train.dataset, 8, shuffle_seed=0, drop_last=False,
                                          max_tokens=60, token_counts=counts)
    assert len(batches) > 1
    for lazy in batches:
        assert sum(counts[i] for i in lazy.indices) <= 60 or len(lazy.indices) == 1
    result = trainer.train()
    assert result.global_step == len(batches)  # one optimizer step per micro-batch, one epoch
    assert math.isfinite(result.training_loss)
    assert all(record["loss"] > 0 for record in trainer.recorder.train_records)


def test_token_budget_with_accumulation_gives_the_whole_epoch_gradient(stories_model_dir, tmp_path):
    """Budgeted micro-batches accumulated over the epoch = one batch of every pair (pair-weighted accumulation)."""
    whole, _ = _one_step(stories_model_dir, tmp_path / "whole", per_device_train_batch_size=8)
    budget, _ = _one_step(
        stories_model_dir, tmp_path / "budget", per_device_train_batch_size=8, max_tokens_per_batch=40,
        gradient_accumulation_steps=8,
    )
    counts = row_token_counts(budget.data.train.dataset, prompt_once=budget.layout.prefix_sharing is True)
    micro_batches = budget.batch_maker.batches(budget.data.train.dataset, 8, shuffle_seed=0, drop_last=False,
                                               max_tokens=40, token_counts=counts)
    assert 1 < len(micro_batches) <= 8  # several budgeted micro-batches, all in the one accumulation window
    assert budget.state.log_history[0]["loss"] == pytest.approx(whole.state.log_history[0]["loss"], abs=1e-6)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), budget.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def _one_step(model_dir, tmp_path, **overrides):
    args = make_config(tmp_path, adam_epsilon=1.0, **overrides)
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=STORY_PAIRS)
    return trainer, trainer.train()
