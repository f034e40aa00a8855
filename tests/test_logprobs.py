"""Per-sequence log-probs equal a naive token-by-token computation on a real model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.data.collate import collate_pairs
from preftune.logprobs import pair_logprobs, token_logps


def naive_completion_logp(model, prompt_ids, completion_ids):
    """Σ log p(completion_t | prompt, completion_<t), one unpadded forward per sequence, full log-softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    total = 0.0
    for i, token in enumerate(completion_ids):
        position = len(prompt_ids) + i
        total += float(log_softmax[position - 1, token])
    return total


PAIRS = [  # real story text (stories260K ids); prompt lengths differ, so the batch pads and masks differently per row
    {"prompt_ids": [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426],
     "chosen_ids": [338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 426, 2],
     "rejected_ids": [291, 400, 428, 352, 303, 261, 424, 283, 269, 270, 292, 426, 2], "row": 0},
    {"prompt_ids": [1, 274, 287, 381, 261, 352, 266, 268, 388, 426],
     "chosen_ids": [346, 286, 393, 426], "rejected_ids": [359, 413, 286, 296, 418, 269, 280, 414, 341, 426], "row": 1},
    {"prompt_ids": [1, 346], "chosen_ids": [286, 393, 426], "rejected_ids": [286], "row": 2},
]


def test_pair_logprobs_equal_a_naive_per_token_loop_with_prompt_and_padding_masked(stories_model_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_model_dir).eval()
    batch = collate_pairs(PAIRS, pad_token_id=0)
    with torch.no_grad():
        out = pair_logprobs(model, batch)
    for i, pair in enumerate(PAIRS):
        expected_chosen = naive_completion_logp(model, pair["prompt_ids"], pair["chosen_ids"])
        expected_rejected = naive_completion_logp(model, pair["prompt_ids"], pair["rejected_ids"])
        assert out.chosen_logps[i].item() == pytest.approx(expected_chosen, abs=1e-5)
        assert out.rejected_logps[i].item() == pytest.approx(expected_rejected, abs=1e-5)
        assert out.chosen_lengths[i].item() == len(pair["chosen_ids"])
        assert out.rejected_lengths[i].item() == len(pair["rejected_ids"])


def test_pad_token_value_does_not_change_logprobs(stories_model_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_model_dir).eval()
    with torch.no_grad():
        a = pair_logprobs(model, collate_pairs(PAIRS, pad_token_id=0))
        b = pair_logprobs(model, collate_pairs(PAIRS, pad_token_id=511))
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps, atol=1e-6, rtol=0)


def test_token_logps_match_log_softmax_gather_for_any_chunk_size():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 17, 50, generator=generator) * 4
    targets = torch.randint(0, 50, (3, 17), generator=generator)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    for chunk in (1, 5, 17, 100):
        logps, mean_logits = token_logps(logits, targets, chunk_size=chunk)
        torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(mean_logits, logits.mean(-1), atol=1e-6, rtol=0)
    assert math.isfinite(float(logps.sum()))
