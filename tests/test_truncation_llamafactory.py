"""A named template truncates as LLaMA-Factory 0.9.5 does (module docstring of preftune.data.tokenize): hand-worked
cases that run without the LLaMA-Factory environment. tests/test_templates_llamafactory.py compares the same rule
with LLaMA-Factory itself (its `infer_seqlen` on a grid of lengths, its pairwise and feedback processors)."""

from __future__ import annotations

import datasets
import pytest
from conftest import shared_asset
from transformers import AutoTokenizer

from preftune.data.tokenize import TokenizeSettings, llamafactory_kept_lengths, tokenize_dataset, tokenize_pair
from preftune.errors import ConfigError

PROMPT = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Tell me a story about a fox and the stars, please."}]
CHOSEN = "Once upon a time a fox counted the stars."
REJECTED = "No."


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2 BPE with ChatML's markers as special tokens (as a Qwen tokenizer has them)."""
    tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def pieces(tokenizer, *texts: str) -> list[int]:
    """Each text tokenized on its own, without special tokens, concatenated: LLaMA-Factory's slot encoding."""
    return [token for text in texts for token in tokenizer.encode(text, add_special_tokens=False)]


def pair(row: int = 0) -> dict:
    return {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}],
            "rejected": [{"role": "assistant", "content": REJECTED}], "row": row}


@pytest.mark.parametrize(("prompt", "response", "cutoff", "kept"), [
    (5, 3, 8, (5, 3)),  # fits: nothing cut
    (10, 3, 8, (5, 3)),  # response under half the cutoff: kept whole, the prompt keeps the rest
    (3, 10, 8, (3, 5)),  # prompt under half: kept whole, the response gets the rest
    (12, 4, 8, (6, 2)),  # both at least half: the response gets int(8 * 4/16) = 2
    (30, 4, 8, (8, 0)),  # int(8 * 4/34) = 0: no response token left
    (14, 30, 22, (8, 14)),  # 22 * 30/44 is 15, but (30/44) * 22 is 14.999... in floating point: LLaMA-Factory keeps 14
])
def test_kept_lengths_favour_the_response_and_share_in_proportion_when_both_are_long(prompt, response, cutoff, kept):
    assert llamafactory_kept_lengths(prompt, response, cutoff) == kept


def test_a_named_template_keeps_a_short_response_whole_and_cuts_the_prompts_end(gpt2):
    full_prompt = pieces(gpt2, "<|im_start|>system\nBe brief.<|im_end|>\n",
                         "<|im_start|>user\nTell me a story about a fox and the stars, please.<|im_end|>\n"
                         "<|im_start|>assistant\n")
    chosen = pieces(gpt2, CHOSEN + "<|im_end|>\n")
    rejected = pieces(gpt2, REJECTED + "<|im_end|>\n")
    max_length = 2 * len(chosen) + 1  # the longer response is under half of it
    assert len(full_prompt) + len(chosen) > max_length
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(template="chatml", max_length=max_length))
    assert out["prompt_ids"] == full_prompt[: max_length - len(chosen)]
    assert (out["chosen_ids"], out["rejected_ids"]) == (chosen, rejected)
    assert out["truncated"] and not out["no_room"]


def test_a_named_template_cuts_every_completion_to_the_longer_ones_share(gpt2):
    full_prompt_length = len(tokenize_pair(pair(), gpt2, TokenizeSettings(template="chatml", max_length=None))[
        "prompt_ids"])
    chosen = pieces(gpt2, CHOSEN + "<|im_end|>\n")
    rejected = pieces(gpt2, REJECTED + "<|im_end|>\n")
    max_length = 2 * len(rejected) + 4  # both the prompt and the longer response (chosen) are at least half of it
    assert min(full_prompt_length, len(chosen)) * 2 >= max_length
    kept_response = int(max_length * (len(chosen) / (full_prompt_length + len(chosen))))
    assert len(rejected) > kept_response > 0  # so the shorter response is cut too
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(template="chatml", max_length=max_length))
    assert (out["chosen_ids"], out["rejected_ids"]) == (chosen[:kept_response], rejected[:kept_response])
    assert len(out["prompt_ids"]) == max_length - kept_response


def test_a_row_whose_response_is_cut_to_nothing_is_dropped_and_counted(gpt2):
    # LLaMA-Factory keeps it with no response token (nothing to learn); preftune drops it
    rows = datasets.Dataset.from_list([pair(row=7)])
    result = tokenize_dataset(rows, gpt2, TokenizeSettings(template="chatml", max_length=2))
    assert (result.stats.rows_out, result.stats.dropped_no_room) == (0, [7])


def test_keep_end_with_a_named_template_is_refused():
    with pytest.raises(ConfigError, match="keep_end does not apply with template 'qwen'") as caught:
        TokenizeSettings(template="qwen", truncation_mode="keep_end")
    assert caught.value.key == "truncation_mode"
