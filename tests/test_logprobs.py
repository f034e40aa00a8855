"""Per-sequence log-probs equal a naive token-by-token computation, in every layout and head mode.

Modes: plain (2B padded rows) or prefix-shared (one row per pair, 4-D mask), each padded or padding-free
(row by row at its own length), each with the chunked LM head or full logits. Values are checked against an unbatched full-log-softmax loop; gradients of every mode are
checked against the plain full-logits path.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.data.collate import collate_pairs, collate_shared_prefix, shared_prefix_mask
from preftune.logprobs import CHUNKED_HEAD_MODEL_TYPES, pair_logprobs, supports_chunked_head, token_logps

COLLATORS = {
    "plain": collate_pairs,
    "shared_prefix": collate_shared_prefix,
    "plain_padding_free": lambda pairs, **kw: collate_pairs(pairs, **kw).without_padding(),
    "shared_prefix_padding_free": lambda pairs, **kw: collate_shared_prefix(pairs, **kw).without_padding(),
}
MODES = list(itertools.product(COLLATORS, [True, False]))


def naive_completion_logp(model, prompt_ids, completion_ids):
    """Σ log p(completion_t | prompt, completion_<t), one unpadded forward per sequence, full log-softmax."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(log_softmax[len(prompt_ids) + i - 1, token]) for i, token in enumerate(completion_ids))


STORY_PAIRS = [  # real story text (stories260K ids); prompt lengths differ, so rows pad and mask differently
    {"prompt_ids": [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426],
     "chosen_ids": [338, 401, 396, 267, 337, 410, 408, 419, 292, 411, 426, 2],
     "rejected_ids": [291, 400, 428, 352, 303, 261, 424, 283, 269, 270, 292, 426, 2], "row": 0},
    {"prompt_ids": [1, 274, 287, 381, 261, 352, 266, 268, 388, 426],
     "chosen_ids": [346, 286, 393, 426], "rejected_ids": [359, 413, 286, 296, 418, 269, 280, 414, 341, 426], "row": 1},
    {"prompt_ids": [1, 346], "chosen_ids": [286, 393, 426], "rejected_ids": [286], "row": 2},
]


def random_pairs(vocab: int, seed: int, count: int = 3):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda low, high: torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=generator)),), generator=generator).tolist()  # noqa: E731
    return [{"prompt_ids": [1] + draw(2, 20), "chosen_ids": draw(1, 15), "rejected_ids": draw(1, 15), "row": i} for i in range(count)]


def tiny_random_model(model_type: str, vocab: int = 32000, seed: int = 0):
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def stories(stories_model_dir_module):
    return AutoModelForCausalLM.from_pretrained(stories_model_dir_module).eval()


@pytest.fixture(scope="module")
def stories_model_dir_module():
    from conftest import shared_asset

    return shared_asset("stories260K-hf")


@pytest.mark.parametrize("layout, chunked", MODES)
def test_logprobs_equal_a_naive_loop_on_stories260k(stories, layout, chunked):
    batch = COLLATORS[layout](STORY_PAIRS, pad_token_id=0)
    with torch.no_grad():
        out = pair_logprobs(stories, batch, chunked_head=chunked)
    for i, pair in enumerate(STORY_PAIRS):
        for got, completion, length in (
            (out.chosen_logps[i], pair["chosen_ids"], out.chosen_lengths[i]),
            (out.rejected_logps[i], pair["rejected_ids"], out.rejected_lengths[i]),
        ):
            expected = naive_completion_logp(stories, pair["prompt_ids"], completion)
            assert got.item() == pytest.approx(expected, abs=1e-5, rel=1e-6)
            assert length.item() == len(completion)


@pytest.mark.parametrize("model_type", sorted(CHUNKED_HEAD_MODEL_TYPES))
@pytest.mark.parametrize("layout", list(COLLATORS))
def test_chunked_head_equals_naive_loop_with_a_32k_vocabulary(model_type, layout):
    model = tiny_random_model(model_type)
    assert supports_chunked_head(model)
    pairs = random_pairs(32000, seed=1)
    with torch.no_grad():
        out = pair_logprobs(model, COLLATORS[layout](pairs, pad_token_id=0), chunked_head=True, chunk_size=7)
    for i, pair in enumerate(pairs):
        assert out.chosen_logps[i].item() == pytest.approx(naive_completion_logp(model, pair["prompt_ids"], pair["chosen_ids"]), rel=1e-5)
        assert out.rejected_logps[i].item() == pytest.approx(naive_completion_logp(model, pair["prompt_ids"], pair["rejected_ids"]), rel=1e-5)


def _gradients(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    out = pair_logprobs(model, batch, chunked_head=chunked)
    # A loss that weighs every sequence differently, so a mixed-up plan cannot cancel out.
    weights = torch.linspace(0.5, 1.5, 2 * batch.num_pairs)
    loss = (torch.cat([out.chosen_logps, out.rejected_logps]) * weights).sum()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout, chunked", MODES)
def test_every_mode_gives_the_plain_paths_loss_and_gradients(layout, chunked):
    model = tiny_random_model("llama", seed=3)
    pairs = random_pairs(32000, seed=4, count=4)
    expected_loss, expected = _gradients(model, collate_pairs(pairs, pad_token_id=0), chunked=False)
    loss, grads = _gradients(model, COLLATORS[layout](pairs, pad_token_id=0), chunked=chunked)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        assert (grad - expected[name]).abs().max().item() <= 1e-5 * max(scale, 1e-3), name


def test_pad_token_value_does_not_change_logprobs(stories):
    for collate in COLLATORS.values():
        with torch.no_grad():
            a = pair_logprobs(stories, collate(STORY_PAIRS, pad_token_id=0))
            b = pair_logprobs(stories, collate(STORY_PAIRS, pad_token_id=511))
        torch.testing.assert_close(a.chosen_logps, b.chosen_logps, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.rejected_logps, b.rejected_logps, atol=1e-6, rtol=0)


def test_shared_prefix_mask_hides_chosen_from_rejected_and_is_causal():
    mask = shared_prefix_mask(prompt_length=2, chosen_length=2, rejected_length=2, total_length=7)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],  # chosen sees prompt and earlier chosen
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # rejected sees prompt and earlier rejected, never chosen
        [1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding sees only itself
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_token_logps_match_log_softmax_gather_for_any_chunk_size():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 50, generator=generator) * 4
    targets = torch.randint(0, 50, (40,), generator=generator)
    expected = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    for chunk in (1, 5, 40, 100):
        logps, mean_logits = token_logps(logits, targets, chunk_size=chunk)
        torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(mean_logits, logits.mean(-1), atol=1e-6, rtol=0)
    assert math.isfinite(float(logps.sum()))


def test_models_outside_the_allowlist_use_full_logits():
    model = tiny_random_model("llama")
    model.config.model_type = "gemma2"  # soft-capped logits: the chunked head must not be used
    assert not supports_chunked_head(model)


def test_padding_free_rows_know_their_real_lengths():
    pairs = random_pairs(500, seed=9)
    plain = collate_pairs(pairs, pad_token_id=0).without_padding()
    assert plain.row_lengths == [len(p["prompt_ids"]) + len(p["chosen_ids"]) for p in pairs] + [
        len(p["prompt_ids"]) + len(p["rejected_ids"]) for p in pairs
    ]
    shared = collate_shared_prefix(pairs, pad_token_id=0).without_padding()
    assert shared.row_lengths == [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]


# ----------------------------------------------------------------- several negatives, unpaired rows, LD-DPO, WPO
def _with_negatives(pairs):
    """Each pair gets three negatives: its rejected, its chosen reversed, and the next pair's rejected."""
    return [
        {**pair, "rejected_ids": [pair["rejected_ids"], pair["chosen_ids"][::-1], pairs[(i + 1) % len(pairs)]["rejected_ids"]]}
        for i, pair in enumerate(pairs)
    ]


@pytest.mark.parametrize("layout, chunked", MODES)
def test_several_negatives_equal_a_naive_loop_in_every_layout(stories, layout, chunked):
    examples = _with_negatives(STORY_PAIRS)
    batch = COLLATORS[layout](examples, pad_token_id=0)
    assert batch.num_completions == 4
    with torch.no_grad():
        out = pair_logprobs(stories, batch, chunked_head=chunked)
    assert out.rejected_logps.shape == (3, 3) and out.chosen_logps.shape == (3,)
    for i, example in enumerate(examples):
        assert out.chosen_logps[i].item() == pytest.approx(
            naive_completion_logp(stories, example["prompt_ids"], example["chosen_ids"]), abs=1e-5, rel=1e-6
        )
        for j, negative in enumerate(example["rejected_ids"]):
            expected = naive_completion_logp(stories, example["prompt_ids"], negative)
            assert out.rejected_logps[i, j].item() == pytest.approx(expected, abs=1e-5, rel=1e-6)
            assert out.rejected_lengths[i, j].item() == len(negative)


@pytest.mark.parametrize("layout", list(COLLATORS))
def test_unpaired_rows_score_their_one_completion(stories, layout):
    from preftune.logprobs import completion_logprobs

    rows = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"], "row": p["row"]} for p in STORY_PAIRS]
    batch = COLLATORS[layout](rows, pad_token_id=0)
    with torch.no_grad():
        out = completion_logprobs(stories, batch)
    assert out.logps.shape == (1, 3)
    for i, row in enumerate(rows):
        expected = naive_completion_logp(stories, row["prompt_ids"], row["completion_ids"])
        assert out.logps[0, i].item() == pytest.approx(expected, abs=1e-5, rel=1e-6)


def test_mixed_completion_counts_in_one_batch_are_refused():
    mixed = [STORY_PAIRS[0], _with_negatives(STORY_PAIRS)[1]]
    with pytest.raises(ValueError, match="same number of completions"):
        collate_pairs(mixed, pad_token_id=0)


def _naive_token_logps(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        log_softmax = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    rows = log_softmax[len(prompt_ids) - 1 : len(prompt_ids) + len(completion_ids) - 1]
    logps = rows[torch.arange(len(completion_ids)), torch.tensor(completion_ids)]
    log_sum_sq = torch.logsumexp(2 * rows, dim=-1)
    return logps, log_sum_sq


@pytest.mark.parametrize("layout, chunked", MODES)
def test_ld_dpo_weights_the_longer_completions_excess_by_alpha(stories, layout, chunked):
    alpha = 0.3
    with torch.no_grad():
        out = pair_logprobs(stories, COLLATORS[layout](STORY_PAIRS, pad_token_id=0), chunked_head=chunked, ld_alpha=alpha)
    for i, pair in enumerate(STORY_PAIRS):
        shared = min(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
        for got, completion in ((out.chosen_logps[i], pair["chosen_ids"]), (out.rejected_logps[i], pair["rejected_ids"])):
            token_logps_, _ = _naive_token_logps(stories, pair["prompt_ids"], completion)
            expected = token_logps_[:shared].sum() + alpha * token_logps_[shared:].sum()
            assert got.item() == pytest.approx(float(expected), abs=1e-5, rel=1e-6)


@pytest.mark.parametrize("layout, chunked", MODES)
def test_wpo_alignment_is_the_mean_of_logp_minus_log_sum_of_squared_probs(stories, layout, chunked):
    with torch.no_grad():
        out = pair_logprobs(stories, COLLATORS[layout](STORY_PAIRS, pad_token_id=0), chunked_head=chunked, wpo=True)
    for i, pair in enumerate(STORY_PAIRS):
        for got, completion in ((out.chosen_wpo_logps[i], pair["chosen_ids"]), (out.rejected_wpo_logps[i], pair["rejected_ids"])):
            logps, log_sum_sq = _naive_token_logps(stories, pair["prompt_ids"], completion)
            assert got.item() == pytest.approx(float((logps - log_sum_sq).mean()), abs=1e-5)
    assert out.chosen_wpo_logps.requires_grad is False


def test_branch_mask_hides_every_earlier_branch():
    from preftune.data.collate import branch_mask

    mask = branch_mask(prompt_length=1, branch_lengths=[1, 2, 1], total_length=6)
    # positions: 0 prompt | 1 branch0 | 2,3 branch1 | 4 branch2 | 5 padding
    assert mask[4].tolist() == [True, False, False, False, True, False]
    assert mask[3].tolist() == [True, False, True, True, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]
