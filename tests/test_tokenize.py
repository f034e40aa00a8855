"""Specs for preftune.data.templates and preftune.data.tokenize.

Expected ids come from independent computations: the tokenizer called on the joined text, TRL 1.16's own
tokenization helpers (`trl.data_utils._tokenize`, `common_prefix_length`) and collator on identical inputs, or
literal strings written from LLaMA-Factory's template slots.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os

import datasets
import pytest
from conftest import shared_asset
from transformers import AutoTokenizer

from preftune.data.templates import (
    TEMPLATES,
    TemplateChoice,
    choose_template,
    end_of_turn_text,
    get_template,
    resolve_chat_template,
    template_names,
)
from preftune.data.tokenize import (
    OUTPUT_COLUMNS,
    TokenizeSettings,
    tokenize_dataset,
    tokenize_pair,
)
from preftune.errors import ConfigError, DataError

GPT2_EOS = "<|endoftext|>"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
STORY_PROMPT = [{"role": "user", "content": "Tell me a story."}]
STORY_CHOSEN = [{"role": "assistant", "content": "Once upon a time"}]
STORY_REJECTED = [{"role": "assistant", "content": "No."}]


@pytest.fixture(scope="module")
def stories():
    """Real Llama SentencePiece-style tokenizer: adds BOS <s>, EOS </s>, no chat template."""
    return AutoTokenizer.from_pretrained(shared_asset("stories260K-hf"))


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2 byte-level BPE: adds no special tokens, BOS = EOS = <|endoftext|>, decode round-trips exactly."""
    return AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))


def ids(tokenizer, text: str, special: bool = True) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def conv_example(row: int = 0) -> dict:
    return {"prompt": STORY_PROMPT, "chosen": STORY_CHOSEN, "rejected": STORY_REJECTED, "row": row}


def text_dataset(rows: list[tuple[str, str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_list(
        [{"prompt": p, "chosen": c, "rejected": r, "row": 100 + i} for i, (p, c, r) in enumerate(rows)]
    )


def hh_rlhf_pairs(limit: int) -> list[dict]:
    """Real hh-rlhf pairs split into a shared prompt (up to the last "\\n\\nAssistant:") and two completions."""
    path = shared_asset("hh-rlhf-test/helpful-base-test.jsonl.gz")
    marker = "\n\nAssistant:"
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            cut_c = record["chosen"].rfind(marker) + len(marker)
            cut_r = record["rejected"].rfind(marker) + len(marker)
            prompt = record["chosen"][:cut_c]
            if prompt != record["rejected"][:cut_r]:
                continue
            pairs.append({"prompt": prompt, "chosen": record["chosen"][cut_c:], "rejected": record["rejected"][cut_r:]})
            if len(pairs) == limit:
                break
    return pairs


def trl_tokenize(example: dict, tokenizer) -> dict:
    """TRL 1.16 DPOTrainer._prepare_dataset (add_eos for text, then tokenize_fn), built from TRL's own helpers."""
    from trl.data_utils import _tokenize, common_prefix_length, is_conversational

    example = dict(example)
    if not is_conversational(example):
        for key in ("chosen", "rejected"):
            if not example[key].endswith(tokenizer.eos_token):
                example[key] = example[key] + tokenizer.eos_token
        prompt_ids = _tokenize(tokenizer, example["prompt"])["input_ids"]
        chosen_ids = _tokenize(tokenizer, example["prompt"] + example["chosen"])["input_ids"]
        rejected_ids = _tokenize(tokenizer, example["prompt"] + example["rejected"])["input_ids"]
    else:
        prompt_ids = _tokenize(tokenizer, example["prompt"], add_generation_prompt=True)["input_ids"]
        chosen_ids = _tokenize(tokenizer, example["prompt"] + example["chosen"])["input_ids"]
        rejected_ids = _tokenize(tokenizer, example["prompt"] + example["rejected"])["input_ids"]
    prompt_len = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return {
        "prompt_ids": list(prompt_ids[:prompt_len]),
        "chosen_ids": list(chosen_ids[prompt_len:]),
        "rejected_ids": list(rejected_ids[prompt_len:]),
    }


def with_template(tokenizer, name: str):
    clone = copy.deepcopy(tokenizer)
    clone.chat_template = get_template(name)
    return clone


# ---------------------------------------------------------------- templates


def test_unknown_template_name_raises_config_error_listing_close_names():
    with pytest.raises(ConfigError) as caught:
        get_template("qwen9")
    assert caught.value.key == "template"
    for name in ("qwen", "qwen3"):
        assert name in str(caught.value)


def test_template_names_include_the_required_ones():
    assert {"qwen", "chatml", "llama3", "default", "llama2", "mistral", "alpaca", "vicuna"} <= set(template_names())


def test_resolve_prefers_explicit_name_then_tokenizer_template_then_none(gpt2):
    assert resolve_chat_template(gpt2, None) is None
    own = with_template(gpt2, "llama3")
    assert resolve_chat_template(own, None) == get_template("llama3")
    assert resolve_chat_template(own, "chatml") == get_template("chatml")
    with pytest.raises(ConfigError):
        resolve_chat_template(own, "nope")


def test_one_rule_chooses_the_name_then_the_given_or_own_jinja_then_default(gpt2):
    own = with_template(gpt2, "llama3")
    assert choose_template(own, "chatml") == TemplateChoice(name="chatml")
    assert choose_template(own, None) == TemplateChoice(jinja=get_template("llama3"))
    assert choose_template(own, None, chat_template="{{ x }}") == TemplateChoice(jinja="{{ x }}")
    assert choose_template(gpt2, None) == TemplateChoice(name="default")  # training's fallback, everywhere
    assert choose_template(gpt2, None).jinja_source == get_template("default")
    with pytest.raises(ConfigError, match="unknown chat template"):
        choose_template(own, "nope")


def test_end_of_turn_markers(gpt2):
    assert end_of_turn_text("qwen", gpt2) == "<|im_end|>"
    assert end_of_turn_text("chatml", gpt2) == "<|im_end|>"
    assert end_of_turn_text("llama3", gpt2) == "<|eot_id|>"
    assert end_of_turn_text("default", gpt2) == GPT2_EOS


MULTI_TURN = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "and?"},
]
SYSTEM = [{"role": "system", "content": "Be nice."}]
E = GPT2_EOS  # GPT-2's BOS and EOS text

# Expected prompt renderings (add_generation_prompt=True), written from LLaMA-Factory's template slots
# (src/llamafactory/data/template.py).
EXPECTED_PROMPTS = {
    ("qwen", False): f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n",
    ("qwen", True): "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n",
    ("chatml", False): "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    "<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n",
    ("llama3", True): f"{E}<|start_header_id|>system<|end_header_id|>\n\nBe nice.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "yo<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nand?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("default", False): f"Human: hi{E}\nAssistant:yo{E}\nHuman: and?{E}\nAssistant:",
    ("default", True): f"System: Be nice.{E}\nHuman: hi{E}\nAssistant:yo{E}\nHuman: and?{E}\nAssistant:",
    ("llama2", True): f"{E}[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nhi [/INST]yo{E}{E}[INST] and? [/INST]",
    ("mistral", True): f"{E}[INST] Be nice.\n\nhi[/INST] yo{E}[INST] and?[/INST]",
    ("alpaca", False): "Below is an instruction that describes a task. Write a response that appropriately "
    f"completes the request.\n\n### Instruction:\nhi\n\n### Response:\nyo{E}\n\n### Instruction:\nand?\n\n"
    "### Response:\n",
    ("vicuna", False): "A chat between a curious user and an artificial intelligence assistant. The assistant "
    f"gives helpful, detailed, and polite answers to the user's questions.USER: hi ASSISTANT:yo{E}"
    "USER: and? ASSISTANT:",
}
EXPECTED_ANSWERS = {
    "qwen": "ok<|im_end|>\n",
    "chatml": "ok<|im_end|>\n",
    "llama3": "ok<|eot_id|>",
    "default": f"ok{E}\n",
    "llama2": f"ok{E}",
    "mistral": f" ok{E}",
    "alpaca": f"ok{E}\n\n",
    "vicuna": f"ok{E}",
}


@pytest.mark.parametrize(("name", "with_system"), sorted(EXPECTED_PROMPTS))
def test_template_renders_llamafactory_text_and_prompt_is_prefix_of_full(gpt2, name, with_system):
    messages = (SYSTEM if with_system else []) + MULTI_TURN
    template = get_template(name)
    prompt = gpt2.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    full = gpt2.apply_chat_template(
        messages + [{"role": "assistant", "content": "ok"}], chat_template=template, tokenize=False
    )
    assert prompt == EXPECTED_PROMPTS[(name, with_system)]
    assert full == prompt + EXPECTED_ANSWERS[name]


def test_every_expected_answer_names_a_template():
    assert set(EXPECTED_ANSWERS) <= set(TEMPLATES)


# ---------------------------------------------------------------- text pairs


@pytest.mark.parametrize("tokenizer_name", ["stories", "gpt2"])
def test_text_pair_prompt_is_prefix_and_completions_end_with_eos(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    prompt, chosen, rejected = "Once upon a time, there was a", " little girl named Lily.", " big dog."
    out = tokenize_pair(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected, "row": 0},
        tokenizer,
        TokenizeSettings(max_length=None),
    )
    eos = tokenizer.eos_token
    assert out["prompt_ids"] == ids(tokenizer, prompt)
    assert out["prompt_ids"] + out["chosen_ids"] == ids(tokenizer, prompt + chosen + eos)
    assert out["prompt_ids"] + out["rejected_ids"] == ids(tokenizer, prompt + rejected + eos)
    assert out["chosen_ids"][-1] == tokenizer.eos_token_id
    assert out["rejected_ids"][-1] == tokenizer.eos_token_id
    assert not out["prefix_mismatch"] and not out["truncated"] and not out["no_room"]


def test_text_completion_already_ending_with_eos_gets_no_second_eos(gpt2):
    out = tokenize_pair(
        {"prompt": "Hi", "chosen": " there" + GPT2_EOS, "rejected": " you", "row": 0}, gpt2, TokenizeSettings()
    )
    assert out["chosen_ids"] == ids(gpt2, " there" + GPT2_EOS)
    assert out["chosen_ids"].count(gpt2.eos_token_id) == 1


def test_stories_prompt_starts_with_one_bos(stories):
    example = {"prompt": "Hello", "chosen": " world", "rejected": " you", "row": 0}
    out = tokenize_pair(example, stories, TokenizeSettings())
    assert out["prompt_ids"][0] == stories.bos_token_id
    assert out["prompt_ids"][1] != stories.bos_token_id


def test_text_prompt_written_with_bos_is_not_given_a_second_bos(stories):
    out = tokenize_pair(
        {"prompt": "<s>Hello", "chosen": " world", "rejected": " you", "row": 0}, stories, TokenizeSettings()
    )
    assert out["prompt_ids"] == ids(stories, "Hello")
    assert out["prompt_ids"].count(stories.bos_token_id) == 1


@pytest.mark.parametrize("tokenizer_name", ["stories", "gpt2"])
def test_text_pairs_match_trl_on_real_hh_rlhf(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    pairs = hh_rlhf_pairs(40)
    assert len(pairs) == 40
    for row, pair in enumerate(pairs):
        ours = tokenize_pair({**pair, "row": row}, tokenizer, TokenizeSettings(max_length=None))
        expected = trl_tokenize(pair, tokenizer)
        assert {key: ours[key] for key in expected} == expected, f"pair {row}"


def test_keep_start_truncation_matches_trl_collator_on_real_hh_rlhf(stories):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    max_length = 64
    pairs = hh_rlhf_pairs(40)
    collator = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode="keep_start")
    compared = 0
    for row, pair in enumerate(pairs):
        ours = tokenize_pair({**pair, "row": row}, stories, TokenizeSettings(max_length=max_length))
        reference = trl_tokenize(pair, stories)
        if len(reference["prompt_ids"]) >= max_length:  # TRL filters these out
            assert ours["no_room"]
            continue
        batch = collator([reference])
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        trl_chosen = batch["input_ids"][0, : lengths[0]].tolist()
        trl_rejected = batch["input_ids"][1, : lengths[1]].tolist()
        assert ours["prompt_ids"] + ours["chosen_ids"] == trl_chosen
        assert ours["prompt_ids"] + ours["rejected_ids"] == trl_rejected
        compared += 1
    assert compared > 5


# ---------------------------------------------------------------- conversational


@pytest.mark.parametrize(
    ("name", "user_turn_end", "answer"),
    [
        ("qwen", "<|im_end|>\n<|im_start|>assistant\n", "Once upon a time<|im_end|>\n"),
        ("chatml", "<|im_end|>\n<|im_start|>assistant\n", "Once upon a time<|im_end|>\n"),
        ("default", f"{GPT2_EOS}\nAssistant:", f"Once upon a time{GPT2_EOS}\n"),
        ("alpaca", "\n\n### Response:\n", f"Once upon a time{GPT2_EOS}\n\n"),
    ],
)
def test_conversational_gpt2_prompt_ends_with_generation_prompt_and_chosen_is_answer(
    gpt2, name, user_turn_end, answer
):
    out = tokenize_pair(conv_example(), gpt2, TokenizeSettings(chat_template=get_template(name)))
    assert not out["prefix_mismatch"]
    assert gpt2.decode(out["prompt_ids"]).endswith("Tell me a story." + user_turn_end)
    assert gpt2.decode(out["chosen_ids"]) == answer
    if name == "qwen":
        assert gpt2.decode(out["prompt_ids"]).startswith(f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n")


def test_conversational_llama3_on_stories_has_exactly_one_bos(stories):
    out = tokenize_pair(conv_example(), stories, TokenizeSettings(chat_template=get_template("llama3")))
    assert out["prompt_ids"][0] == stories.bos_token_id
    assert out["prompt_ids"].count(stories.bos_token_id) == 1
    assert stories.decode(out["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert stories.decode(out["chosen_ids"]) == "Once upon a time<|eot_id|>"
    assert not out["prefix_mismatch"]


def test_conversational_chatml_on_stories_gets_the_tokenizers_bos_once(stories):
    out = tokenize_pair(conv_example(), stories, TokenizeSettings(chat_template=get_template("chatml")))
    rendered = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    assert out["prompt_ids"] == ids(stories, rendered)  # with the tokenizer's own BOS
    assert out["prompt_ids"].count(stories.bos_token_id) == 1
    assert stories.decode(out["chosen_ids"]).startswith("Once upon a time")


def test_conversational_matches_trl_when_no_bos_question_arises(gpt2, stories):
    # GPT-2 adds no special tokens; llama3 writes the BOS itself: both make TRL's add_special_tokens=False identical.
    for tokenizer, name in ((gpt2, "chatml"), (gpt2, "qwen"), (gpt2, "default"), (stories, "llama3")):
        own = with_template(tokenizer, name)
        ours = tokenize_pair(conv_example(), own, TokenizeSettings(chat_template=None))
        assert {key: ours[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} == trl_tokenize(
            conv_example(), own
        ), name


def test_conversational_chatml_on_stories_differs_from_trl_only_by_the_leading_bos(stories):
    own = with_template(stories, "chatml")
    ours = tokenize_pair(conv_example(), own, TokenizeSettings())
    reference = trl_tokenize(conv_example(), own)
    assert ours["prompt_ids"][0] == stories.bos_token_id
    assert ours["prompt_ids"][1:] == reference["prompt_ids"]
    assert ours["chosen_ids"] == reference["chosen_ids"]


def test_conversational_without_any_template_is_a_config_error(gpt2):
    with pytest.raises(ConfigError) as caught:
        tokenize_pair(conv_example(), gpt2, TokenizeSettings())
    assert caught.value.key == "template"


def test_malformed_conversational_message_is_a_data_error_with_row(gpt2):
    example = {**conv_example(row=7), "chosen": [{"role": "assistant"}]}
    with pytest.raises(DataError) as caught:
        tokenize_pair(example, gpt2, TokenizeSettings(chat_template=get_template("chatml")))
    assert caught.value.row == 7 and caught.value.field == "chosen"


def test_text_pair_with_non_string_completion_is_a_data_error(gpt2):
    with pytest.raises(DataError) as caught:
        tokenize_pair({"prompt": "a", "chosen": 3, "rejected": "b", "row": 5}, gpt2, TokenizeSettings())
    assert caught.value.row == 5 and caught.value.field == "chosen"


# ---------------------------------------------------------------- prefix mismatch


def test_token_merging_across_the_boundary_is_counted_and_prompt_cut_to_common_prefix(gpt2):
    # GPT-2: "I am walk" -> [I, am, walk] but "I am walking" -> [I, am, walking]
    out = tokenize_pair(
        {"prompt": "I am walk", "chosen": "ing home", "rejected": "ing away", "row": 0}, gpt2, TokenizeSettings()
    )
    assert ids(gpt2, "I am walk")[:2] == ids(gpt2, "I am")
    assert ids(gpt2, "I am walking home")[:2] == ids(gpt2, "I am")
    assert out["prefix_mismatch"]
    assert out["prompt_ids"] == ids(gpt2, "I am")
    assert out["chosen_ids"] == ids(gpt2, " walking home" + GPT2_EOS)
    assert out["rejected_ids"] == ids(gpt2, " walking away" + GPT2_EOS)


def test_merge_in_one_completion_only_cuts_the_shared_prompt_for_both(gpt2):
    example = {"prompt": "I am walk", "chosen": "ing", "rejected": " away", "row": 0}
    out = tokenize_pair(example, gpt2, TokenizeSettings())
    assert out["prefix_mismatch"]
    assert out["prompt_ids"] == ids(gpt2, "I am")
    assert out["rejected_ids"] == ids(gpt2, " walk away" + GPT2_EOS)
    assert {key: out[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} == trl_tokenize(example, gpt2)


def test_llama3_on_gpt2_splits_the_header_newlines_and_is_counted(gpt2):
    # GPT-2 writes "\n\n" alone as one token but "\n\nOnce" as "\n" + "\n" + "Once"
    out = tokenize_pair(conv_example(), gpt2, TokenizeSettings(chat_template=get_template("llama3")))
    assert out["prefix_mismatch"]
    assert gpt2.decode(out["prompt_ids"]).endswith("<|start_header_id|>assistant<|end_header_id|>")
    assert gpt2.decode(out["chosen_ids"]) == "\n\nOnce upon a time<|eot_id|>"


def test_tokenize_dataset_counts_prefix_mismatches_and_warns_once(gpt2, caplog):
    dataset = text_dataset([("I am walk", "ing home", "ing away"), ("Hello", " world", " you"), ("I run", "ning", "s")])
    with caplog.at_level(logging.WARNING, logger="preftune.data.tokenize"):
        result = tokenize_dataset(dataset, gpt2, TokenizeSettings())
    assert result.stats.prefix_mismatch == 2
    warnings = [record for record in caplog.records if "not a prefix" in record.getMessage()]
    assert len(warnings) == 1 and "2 of 3" in warnings[0].getMessage()


# ---------------------------------------------------------------- truncation

# GPT-2: every word below is one token; with EOS: prompt 4, chosen 4, rejected 2 tokens.
WORDS = ("one two three four", " five six seven", " eight")


def test_word_fixture_lengths(gpt2):
    assert len(ids(gpt2, WORDS[0])) == 4
    assert len(ids(gpt2, WORDS[1] + GPT2_EOS)) == 4
    assert len(ids(gpt2, WORDS[2] + GPT2_EOS)) == 2


def pair(words=WORDS, row=0):
    return {"prompt": words[0], "chosen": words[1], "rejected": words[2], "row": row}


def test_keep_start_cuts_each_completion_end_to_fit(gpt2):
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=6, truncation_mode="keep_start"))
    assert out["prompt_ids"] == ids(gpt2, "one two three four")
    assert out["chosen_ids"] == ids(gpt2, " five six")
    assert out["rejected_ids"] == ids(gpt2, " eight" + GPT2_EOS)
    assert out["truncated"] and not out["no_room"]


def test_keep_start_without_cut_is_not_truncated(gpt2):
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=8, truncation_mode="keep_start"))
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 8
    assert not out["truncated"]


def test_keep_start_prompt_filling_max_length_has_no_room(gpt2):
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=4, truncation_mode="keep_start"))
    assert out["no_room"]
    kept = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=5, truncation_mode="keep_start"))
    assert not kept["no_room"] and kept["chosen_ids"] == ids(gpt2, " five")


def test_keep_end_cuts_the_shared_prompt_start_and_keeps_completions_whole(gpt2):
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=6, truncation_mode="keep_end"))
    # cut = 4 + max(4, 2) - 6 = 2 prompt tokens from the start
    assert out["prompt_ids"] == ids(gpt2, " three four")
    assert out["chosen_ids"] == ids(gpt2, " five six seven" + GPT2_EOS)
    assert out["rejected_ids"] == ids(gpt2, " eight" + GPT2_EOS)
    assert out["truncated"]


def test_keep_end_leaves_one_prompt_token_at_the_limit(gpt2):
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=5, truncation_mode="keep_end"))
    assert out["prompt_ids"] == ids(gpt2, " four")


def test_keep_end_longer_completion_filling_max_length_has_no_room(gpt2):
    out = tokenize_pair(pair(), gpt2, TokenizeSettings(max_length=4, truncation_mode="keep_end"))
    assert out["no_room"]
    assert out["prompt_ids"] == out["chosen_ids"] == out["rejected_ids"] == []


def test_no_max_length_means_no_truncation(gpt2):
    long_prompt = " ".join(["word"] * 3000)
    out = tokenize_pair(
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no", "row": 0}, gpt2, TokenizeSettings(max_length=None)
    )
    assert out["prompt_ids"] == ids(gpt2, long_prompt)
    assert not out["truncated"] and not out["no_room"]


def test_empty_completion_without_eos_has_no_room(gpt2):
    example = {"prompt": "Hi", "chosen": "", "rejected": " yo", "row": 0}
    out = tokenize_pair(example, gpt2, TokenizeSettings(add_eos=False))
    assert out["no_room"]


def test_empty_prompt_with_a_tokenizer_adding_no_bos_has_no_room(gpt2, stories):
    example = {"prompt": "", "chosen": "Hi", "rejected": "Yo", "row": 0}
    assert tokenize_pair(example, gpt2, TokenizeSettings())["no_room"]
    assert tokenize_pair(example, stories, TokenizeSettings())["prompt_ids"] == [stories.bos_token_id]


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError) as caught:
        TokenizeSettings(truncation_mode="keep_middle")
    assert caught.value.key == "truncation_mode"
    with pytest.raises(ConfigError) as caught:
        TokenizeSettings(max_length=1)
    assert caught.value.key == "max_length"


# ---------------------------------------------------------------- tokenize_dataset


def test_tokenize_dataset_drops_no_room_rows_by_row_id_and_keeps_only_id_columns(gpt2):
    dataset = text_dataset(
        [
            WORDS,  # row 100: fits with truncation at max_length=6
            ("a b c d e f g h", " yes", " no"),  # row 101: 8-token prompt, no room
            ("Hi", " there", " you"),  # row 102: fits whole
        ]
    )
    result = tokenize_dataset(dataset, gpt2, TokenizeSettings(max_length=6))
    assert result.dataset.column_names == OUTPUT_COLUMNS
    assert result.dataset["row"][:] == [100, 102]
    assert result.stats.rows_in == 3 and result.stats.rows_out == 2
    assert result.stats.dropped_no_room == [101]
    assert result.stats.truncated == 1
    assert result.dataset[1]["prompt_ids"] == ids(gpt2, "Hi")
    assert result.dataset[1]["chosen_ids"] == ids(gpt2, " there" + GPT2_EOS)


def test_tokenize_dataset_handles_conversational_rows(gpt2):
    dataset = datasets.Dataset.from_list([conv_example(row=5), conv_example(row=6)])
    result = tokenize_dataset(dataset, gpt2, TokenizeSettings(chat_template=get_template("chatml")))
    assert result.dataset["row"][:] == [5, 6]
    assert gpt2.decode(result.dataset[0]["chosen_ids"]) == "Once upon a time<|im_end|>\n"


def test_tokenize_dataset_missing_column_is_a_data_error(gpt2):
    dataset = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "row": 0}])
    with pytest.raises(DataError) as caught:
        tokenize_dataset(dataset, gpt2, TokenizeSettings())
    assert caught.value.field == "rejected"


def cache_file(result) -> str:
    files = result.dataset.cache_files
    assert len(files) == 1
    return files[0]["filename"]


def test_cache_is_reused_for_identical_inputs_and_missed_after_any_change(gpt2, tmp_path):
    rows = [WORDS, ("Hi", " there", " you")]
    settings = TokenizeSettings(max_length=6)
    first = tokenize_dataset(text_dataset(rows), gpt2, settings, cache_dir=str(tmp_path))
    path = cache_file(first)
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith("tokenized-")
    written_at = os.stat(path).st_mtime_ns

    # a new Dataset object with the same content, a tokenizer loaded again: same file, not rewritten
    reloaded = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))
    again = tokenize_dataset(text_dataset(rows), reloaded, settings, cache_dir=str(tmp_path))
    assert cache_file(again) == path
    assert os.stat(path).st_mtime_ns == written_at
    assert again.dataset[:] == first.dataset[:]
    assert again.stats == first.stats

    other_length = tokenize_dataset(text_dataset(rows), gpt2, TokenizeSettings(max_length=7), cache_dir=str(tmp_path))
    changed_rows = [WORDS, ("Hi", " there", " them")]
    other_row = tokenize_dataset(text_dataset(changed_rows), gpt2, settings, cache_dir=str(tmp_path))
    other_tokenizer = tokenize_dataset(
        text_dataset(rows), with_template(gpt2, "chatml"), settings, cache_dir=str(tmp_path)
    )
    paths = {path, cache_file(other_length), cache_file(other_row), cache_file(other_tokenizer)}
    assert len(paths) == 4
    assert other_row.dataset[1]["rejected_ids"] == ids(gpt2, " them" + GPT2_EOS)
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 4
