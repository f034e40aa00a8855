"""Sampling (preftune.generation): the sampler's distribution, greedy decoding against HF, seeds, batching, stops,
chat-template prompts, and the candidates file."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.errors import ConfigError, DataError
from preftune.generation import (
    PerRowGumbelSampling,
    SamplingParams,
    append_candidates,
    generate,
    generate_samples,
    read_candidates,
    render_prompts,
    sample_seed,
)

PROMPTS = ["Once upon a time", "Tom had a red ball. He", "The cat"]


@pytest.fixture(scope="module")
def stories():
    from conftest import shared_asset

    path = shared_asset("stories260K-hf")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("key, value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_new_tokens", 0),
                                        ("num_samples", 0), ("batch_size", 0), ("seed", -1), ("num_samples", 1.5)])
def test_sampling_params_refuse_out_of_range_values_naming_the_key(key, value):
    with pytest.raises(ConfigError) as error:
        SamplingParams(**{key: value})
    assert error.value.key == key


def _draw_frequencies(scores: torch.Tensor, temperature: float, top_p: float, draws: int) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(seed) for seed in range(draws)]
    sampler = PerRowGumbelSampling(temperature, top_p, generators)
    perturbed = sampler(torch.zeros(draws, 1, dtype=torch.long), scores.expand(draws, -1).clone())
    return torch.bincount(perturbed.argmax(-1), minlength=scores.shape[-1]).float() / draws


def test_the_argmax_of_perturbed_scores_follows_the_tempered_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    frequencies = _draw_frequencies(scores, temperature=0.7, top_p=1.0, draws=20000)
    expected = torch.softmax(scores[0] / 0.7, dim=-1)
    torch.testing.assert_close(frequencies, expected, atol=0.012, rtol=0)


def test_top_p_keeps_only_the_nucleus_renormalised():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    probs = torch.softmax(scores[0], dim=-1)
    # nucleus by hand: the most likely tokens until their mass reaches 0.8
    order = probs.argsort(descending=True).tolist()
    nucleus, mass = [], 0.0
    for token in order:
        nucleus.append(token)
        mass += probs[token].item()
        if mass >= 0.8:
            break
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    frequencies = _draw_frequencies(scores, temperature=1.0, top_p=0.8, draws=20000)
    assert frequencies[[t for t in range(5) if t not in nucleus]].sum() == 0
    torch.testing.assert_close(frequencies, expected, atol=0.012, rtol=0)


def test_greedy_matches_hf_generate_prompt_by_prompt(stories):
    model, tokenizer = stories
    ours = generate(model, tokenizer, PROMPTS, SamplingParams(temperature=0, num_samples=2, max_new_tokens=20),
                    progress=False)
    for prompt, responses in zip(PROMPTS, ours):  # batched, left-padded vs one unpadded prompt at a time
        encoded = tokenizer(prompt, return_tensors="pt")
        reference = model.generate(**encoded, do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=2)
        full = tokenizer.decode(reference[0], skip_special_tokens=True)
        assert responses == [full[len(prompt):]] * 2
        assert responses[0].startswith((" ", ",")), "the space before the first word is kept"


def test_the_models_own_generation_settings_do_not_change_what_is_sampled(stories):
    model, tokenizer = stories
    params = SamplingParams(num_samples=2, max_new_tokens=16, seed=5)
    plain = generate(model, tokenizer, PROMPTS, params, progress=False)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=16, top_k=1)
    try:
        assert generate(model, tokenizer, PROMPTS, params, progress=False) == plain
    finally:
        model.generation_config = saved


def test_same_seed_same_samples_whatever_the_batch_size_and_neighbours(stories):
    model, tokenizer = stories
    params = dict(temperature=1.0, num_samples=3, max_new_tokens=10, seed=7)
    big = generate(model, tokenizer, PROMPTS, SamplingParams(batch_size=16, **params), progress=False)
    small = generate(model, tokenizer, PROMPTS, SamplingParams(batch_size=1, **params), progress=False)
    assert big == small
    alone = generate(model, tokenizer, PROMPTS[2:], SamplingParams(**params), keys=[2], progress=False)
    assert alone[0] == big[2]
    other_seed = generate(model, tokenizer, PROMPTS, SamplingParams(**{**params, "seed": 8}), progress=False)
    assert other_seed != big
    assert len(set(big[0])) > 1, "the samples of one prompt differ from each other"


def test_sampling_stops_at_the_stop_token_and_keeps_it_in_the_ids(stories):
    model, tokenizer = stories
    period = tokenizer.convert_tokens_to_ids(".")
    params = SamplingParams(num_samples=4, max_new_tokens=40, stop_token_ids=(period,), seed=3)
    samples = generate_samples(model, tokenizer, PROMPTS, params, progress=False)
    flat = [sample for prompt_samples in samples for sample in prompt_samples]
    assert any(sample.stopped for sample in flat)
    for sample in flat:
        assert sample.completion_ids.count(period) == (1 if sample.stopped else 0)
        if sample.stopped:
            assert sample.completion_ids[-1] == period
        else:
            assert len(sample.completion_ids) == 40
        body = sample.completion_ids[:-1] if sample.stopped else sample.completion_ids
        prompt_text = tokenizer.decode(sample.prompt_ids, skip_special_tokens=True)
        assert prompt_text + sample.text == tokenizer.decode(sample.prompt_ids + body, skip_special_tokens=True)


def test_conversation_prompts_are_rendered_with_the_named_template(stories):
    _, tokenizer = stories
    prompts = ["plain text", [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]]
    rendered = render_prompts(tokenizer, prompts, "chatml")
    assert rendered == ["plain text",
                        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]


def test_a_conversation_without_any_chat_template_is_sampled_from_training_prompt_ids(stories, tmp_path):
    """One rule (templates.choose_template): no `template` and a tokenizer without one → the named template
    "default", as training uses it; the sampled prompt ids are the ones training tokenizes."""
    from preftune.config import DPOConfig
    from preftune.data.pipeline import prepare_rows

    model, tokenizer = stories
    assert tokenizer.chat_template is None
    conversation = [{"role": "user", "content": "Hi"}]
    assert render_prompts(tokenizer, [conversation], None) == [f"Human: Hi{tokenizer.eos_token}\nAssistant:"]
    row = {"prompt": conversation, "chosen": [{"role": "assistant", "content": "Yes."}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    trained, _ = prepare_rows(DPOConfig(output_dir=str(tmp_path), max_length=None), tokenizer, [row], source="t",
                              first_row=0)
    sampled = generate_samples(model, tokenizer, [conversation], SamplingParams(num_samples=1, max_new_tokens=2),
                               progress=False)
    assert sampled[0][0].prompt_ids == trained.dataset[0]["prompt_ids"]


def test_conversation_prompt_errors(stories):
    _, tokenizer = stories
    with pytest.raises(ConfigError, match="unknown chat template 'nope'"):
        render_prompts(tokenizer, [[{"role": "user", "content": "Hi"}]], "nope")
    with pytest.raises(DataError, match="assistant turn") as error:
        render_prompts(tokenizer, ["ok", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]],
                       "chatml")
    assert error.value.row == 1


def test_sample_seeds_are_distinct_per_prompt_and_sample():
    seeds = {sample_seed(0, key, s) for key in ("a", "b", 0, 1) for s in range(4)}
    assert len(seeds) == 16 and all(0 <= seed < 2**63 for seed in seeds)


def test_candidates_file_round_trip_and_torn_last_line(tmp_path, caplog):
    path = tmp_path / "c.jsonl"
    rows = [{"prompt_id": str(i), "prompt": f"p{i}", "responses": ["a", "b"], "model": "m", "sampling": {}}
            for i in range(3)]
    append_candidates(path, rows[:2])
    append_candidates(path, rows[2:])
    assert read_candidates(path) == rows
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"prompt_id": "3", "prompt": "p3", "respo')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING):
        assert read_candidates(path) == rows
    assert "incomplete last line" in caplog.text
    assert path.read_bytes() != whole, "reading alone leaves the file as it is"
    assert read_candidates(path, repair=True) == rows
    assert path.read_bytes() == whole
    append_candidates(path, [{**rows[0], "prompt_id": "3"}])
    assert [row["prompt_id"] for row in read_candidates(path)] == ["0", "1", "2", "3"]


def test_a_broken_line_before_the_end_is_an_error_naming_the_row(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt_id": "0", "prompt": "p", "responses": []}\nnot json\n'
                    '{"prompt_id": "1", "prompt": "p", "responses": []}\n')
    with pytest.raises(DataError) as error:
        read_candidates(path)
    assert error.value.row == 1 and error.value.file == str(path)
    path.write_text(json.dumps({"prompt_id": "0", "prompt": "p", "responses": "ab"}) + "\n")
    with pytest.raises(DataError) as error:
        read_candidates(path)
    assert error.value.field == "responses"
