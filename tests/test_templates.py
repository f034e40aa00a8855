"""Specs for preftune.data.templates: names, LLaMA-Factory's encoding rules, and the tokenizer step's use of them.

Expected ids are written from LLaMA-Factory 0.9.5's template slots and encoding rules (each slot tokenized on its
own, without special tokens); tests/test_templates_llamafactory.py compares every template with LLaMA-Factory
itself.
"""

from __future__ import annotations

import pytest
from conftest import shared_asset
from transformers import AutoTokenizer

from preftune.data.templates import (
    check_template_name,
    encode_conversation,
    encode_prompt,
    end_of_turn_text,
    get_template,
)
from preftune.data.tokenize import TokenizeSettings, tokenize_pair, tokenize_unpaired
from preftune.errors import ConfigError, DataError

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
           "<|user|>", "<|assistant|>", "<|system|>", "<|observation|>", "[gMASK]", "<sop>"]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
PROMPT = [{"role": "user", "content": "Tell me a story."}]


def answer(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2 BPE with the chat markers of the templates below as special tokens (as a model family's tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(shared_asset("gpt2-tokenizer"))
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    return tokenizer


@pytest.fixture(scope="module")
def stories():
    """Llama SentencePiece tokenizer (BOS <s>, EOS </s>), no chat markers."""
    return AutoTokenizer.from_pretrained(shared_asset("stories260K-hf"))


def pieces(tokenizer, *texts: str) -> list[int]:
    """Each text tokenized on its own, without special tokens, concatenated: LLaMA-Factory's slot encoding."""
    return [token for text in texts for token in tokenizer.encode(text, add_special_tokens=False)]


# ---------------------------------------------------------------- names


def test_a_known_name_is_returned_without_loading_anything():
    assert check_template_name("qwen3_nothink") == "qwen3_nothink"


def test_an_unknown_name_is_a_config_error_with_close_matches():
    with pytest.raises(ConfigError) as caught:
        check_template_name("qwen3_no_think")
    assert caught.value.key == "template"
    assert "qwen3_nothink" in str(caught.value)


def test_a_name_without_close_match_lists_all_names():
    with pytest.raises(ConfigError, match="expected one of: .*alpaca.*zephyr"):
        check_template_name("zzzzzzzz")


def test_a_name_removed_from_llamafactory_is_not_supported_yet_with_the_reason():
    with pytest.raises(ConfigError, match=r"not supported yet: template 'baichuan2' \(removed from LLaMA-Factory"):
        check_template_name("baichuan2")


def test_tokenize_settings_check_the_template_name():
    with pytest.raises(ConfigError) as caught:
        TokenizeSettings(template="qwen9")
    assert caught.value.key == "template"


# ---------------------------------------------------------------- encoding rules


def test_qwen_prompt_has_the_default_system_and_the_response_its_end_marker(gpt2):
    prompt_ids, response_ids = encode_conversation("qwen", gpt2, PROMPT, answer("Once upon a time"))
    assert prompt_ids == pieces(gpt2, f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n",
                                "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n")
    assert response_ids == pieces(gpt2, "Once upon a time<|im_end|>\n")


def test_an_empty_system_prompt_uses_the_default_and_a_given_one_replaces_it(gpt2):
    empty = encode_prompt("qwen", gpt2, [{"role": "system", "content": ""}] + PROMPT)
    assert empty == encode_prompt("qwen", gpt2, PROMPT)
    own = encode_prompt("qwen", gpt2, [{"role": "system", "content": "你是助手。"}] + PROMPT)
    assert own[: len(pieces(gpt2, "<|im_start|>system\n你是助手。<|im_end|>\n"))] == pieces(
        gpt2, "<|im_start|>system\n你是助手。<|im_end|>\n")


def test_history_turns_are_encoded_turn_by_turn(gpt2):
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "and?"}]
    prompt_ids, _ = encode_conversation("chatml", gpt2, prompt, answer("ok"))
    assert prompt_ids == pieces(gpt2, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "yo<|im_end|>\n",
                                "<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")


def test_efficient_eos_appends_eos_to_the_response(gpt2):
    prompt_ids, response_ids = encode_conversation("glm4", gpt2, PROMPT, answer("Sure"))
    assert prompt_ids == pieces(gpt2, "[gMASK]<sop>", "<|user|>\nTell me a story.<|assistant|>")
    assert response_ids == pieces(gpt2, "\nSure") + [gpt2.eos_token_id]


def test_llama2_style_templates_put_the_system_prompt_into_the_first_user_turn(stories):
    prompt = [{"role": "system", "content": "Be kind."}] + PROMPT
    prompt_ids, response_ids = encode_conversation("mistral", stories, prompt, answer("Once"))
    assert prompt_ids == [stories.bos_token_id] + pieces(stories, "[INST] Be kind.\n\nTell me a story.[/INST]")
    assert response_ids == pieces(stories, " Once") + [stories.eos_token_id]


def test_slots_are_tokenized_separately_not_as_one_text(stories):
    # SentencePiece gives each separately tokenized piece its own leading-space treatment, so LLaMA-Factory's ids
    # differ from tokenizing the rendered text at once; preftune follows LLaMA-Factory.
    prompt_ids, response_ids = encode_conversation("default", stories, PROMPT, answer("Once upon a time"))
    separately = pieces(stories, "Human: Tell me a story.") + [stories.eos_token_id] + pieces(stories, "\nAssistant:")
    assert prompt_ids == separately
    assert response_ids == pieces(stories, "Once upon a time") + [stories.eos_token_id] + pieces(stories, "\n")
    whole = stories.encode(f"Human: Tell me a story.</s>\nAssistant:Once upon a time</s>\n", add_special_tokens=False)
    assert prompt_ids + response_ids != whole


def test_qwen3_trains_an_empty_thought_in_front_of_a_response_without_one(gpt2):
    _, response_ids = encode_conversation("qwen3", gpt2, PROMPT, answer("Once"))
    assert response_ids == pieces(gpt2, "<think>\n\n</think>\n\n", "Once<|im_end|>\n")
    _, with_thought = encode_conversation("qwen3", gpt2, PROMPT, answer("<think>\nhm\n</think>\n\nOnce"))
    assert with_thought == pieces(gpt2, "<think>\nhm\n</think>\n\nOnce<|im_end|>\n")


def test_qwen3_without_thinking_puts_the_empty_thought_in_the_prompt_and_drops_the_response_thought(gpt2):
    prompt_ids, response_ids = encode_conversation("qwen3", gpt2, PROMPT, answer("<think>\nhm\n</think>\n\nOnce"),
                                                   enable_thinking=False)
    assert prompt_ids == pieces(gpt2, "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n",
                                "<think>\n\n</think>\n\n")
    assert response_ids == pieces(gpt2, "Once<|im_end|>\n")


def test_reasoning_templates_drop_thoughts_from_earlier_turns(gpt2):
    prompt = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nx\n</think>\n\nA1"},
              {"role": "user", "content": "Q2"}]
    prompt_ids, _ = encode_conversation("qwen3", gpt2, prompt, answer("A2"))
    assert prompt_ids == pieces(gpt2, "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "A1<|im_end|>\n",
                                "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_nothink_adds_no_thought(gpt2):
    _, response_ids = encode_conversation("qwen3_nothink", gpt2, PROMPT, answer("Once"))
    assert response_ids == pieces(gpt2, "Once<|im_end|>\n")


def test_a_template_token_the_tokenizer_lacks_is_a_config_error(stories):
    missing = r"writes the token '\[gMASK\]', which this tokenizer does not have"
    with pytest.raises(ConfigError, match=missing) as caught:
        encode_conversation("chatglm3", stories, PROMPT, answer("x"))
    assert caught.value.key == "template"


def test_messages_out_of_order_are_a_data_error_with_the_row(gpt2):
    with pytest.raises(DataError) as caught:
        encode_conversation("qwen", gpt2, [{"role": "assistant", "content": "x"}], answer("y"), row=4)
    assert caught.value.row == 4 and caught.value.field == "prompt"
    with pytest.raises(DataError, match="one assistant message"):
        encode_conversation("qwen", gpt2, PROMPT, answer("a") + answer("b"))


def test_end_of_turn_text_is_what_the_assistant_turn_ends_with(gpt2):
    assert end_of_turn_text("qwen3", gpt2) == "<|im_end|>"
    assert end_of_turn_text("glm4", gpt2) == gpt2.eos_token
    assert end_of_turn_text("gemma", gpt2) == "<end_of_turn>"


def test_jinja_prompt_is_the_same_with_or_without_generation_prompt(gpt2):
    template = get_template("qwen")
    with_prompt = gpt2.apply_chat_template(PROMPT, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert with_prompt == gpt2.apply_chat_template(PROMPT, chat_template=template, tokenize=False)
    assert with_prompt.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- the tokenizer step


def test_tokenize_pair_with_a_named_template_gives_llamafactorys_ids(gpt2):
    example = {"prompt": [{"role": "system", "content": "Be brief."}] + PROMPT, "chosen": answer("A fox."),
               "rejected": answer("No."), "row": 0}
    out = tokenize_pair(example, gpt2, TokenizeSettings(template="qwen", max_length=None))
    assert out["prompt_ids"] == pieces(gpt2, "<|im_start|>system\nBe brief.<|im_end|>\n",
                                       "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n")
    assert out["chosen_ids"] == pieces(gpt2, "A fox.<|im_end|>\n")
    assert out["rejected_ids"] == pieces(gpt2, "No.<|im_end|>\n")
    assert not out["prefix_mismatch"]


def test_a_named_template_adds_no_bos_of_the_tokenizer(stories):
    out = tokenize_pair({"prompt": PROMPT, "chosen": answer("Once"), "rejected": answer("No"), "row": 0}, stories,
                        TokenizeSettings(template="chatml", max_length=None))
    assert stories.bos_token_id not in out["prompt_ids"]


def test_enable_thinking_reaches_the_encoder(gpt2):
    example = {"prompt": PROMPT, "completion": answer("Once"), "label": True, "row": 0}
    thinking = tokenize_unpaired(example, gpt2, TokenizeSettings(template="qwen3", max_length=None))
    quiet = tokenize_unpaired(example, gpt2, TokenizeSettings(template="qwen3", max_length=None,
                                                              enable_thinking=False))
    empty_thought = pieces(gpt2, "<think>\n\n</think>\n\n")
    assert thinking["completion_ids"][: len(empty_thought)] == empty_thought
    assert quiet["prompt_ids"][-len(empty_thought):] == empty_thought
