"""Gemma 3 vision-language DPO: a tiny random Gemma 3 and its processor built from configs (the shared GPT-2 tokenizer
with Gemma's image tokens, the PIL image processor: no torchvision, nothing downloaded; tests/test_vision.py builds
them). Gemma 3's image tokens attend to each other both ways, told by ``token_type_ids``, which every batch carries;
its shared rows (``prompt | chosen | rejected``, each image encoded once) go through dense masks holding the image
blocks and the sliding window in plain-row positions (docs/layouts.md). Step-1 loss, rewards and log-probs against
TRL 1.16's DPOTrainer on the same rows and weights in both layouts; log-probs, loss and gradients equal between
layouts; the chunked head against full logits; the reference as a frozen copy, the adapter-disabled policy and
precomputed; LLaMA-Factory's gemma3 template with images (its Gemma3 plugin's image text) and its truncation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_vision import (
    GEMMA3_TEMPLATE,
    assert_same_logps_loss_and_gradients,
    check_parity_with_trl,
    collated,
    dpo_loss_and_gradients,
    tiny_gemma3,
    tiny_gemma3_processor,
    tokenized_batch,
    trl_first_loss_and_metrics,
    trl_rows,
    vision_config,
)

from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.data.formats import load_preference_data
from preftune.data.tokenize import TokenizeSettings, tokenize_dataset
from preftune.errors import ConfigError
from preftune.logprobs import pair_logprobs


@pytest.fixture(scope="module")
def gemma3_processor():
    return tiny_gemma3_processor()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_gemma3_step_one_loss_rewards_and_logps_equal_trl(gemma3_processor, tmp_path, loss_type):
    """Same input ids, pixel values and token_type_ids as TRL's collator; loss, rewards/chosen, rewards/rejected,
    logps/chosen and logps/rejected within 1e-4 in the plain and the shared layout (the chunked head: Gemma 3 is in
    its tested types)."""
    check_parity_with_trl(gemma3_processor, GEMMA3_TEMPLATE, tiny_gemma3, loss_type, tmp_path)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_rows_give_gemma3s_plain_log_probs_loss_and_gradients_encoding_each_image_once(gemma3_processor,
                                                                                              attention):
    """The image blocks lie in the shared prompt and the rows are longer than the 16-token sliding window: shared rows
    reproduce the plain rows' masks (the model's own, from token_type_ids) exactly, with each image encoded once."""
    policy = tiny_gemma3(gemma3_processor, seed=0)
    policy.set_attn_implementation(attention)
    plain, shared = tokenized_batch(gemma3_processor, GEMMA3_TEMPLATE), tokenized_batch(gemma3_processor, GEMMA3_TEMPLATE, collate_shared_prefix)
    window = policy.config.text_config.sliding_window
    assert shared.input_ids.shape[0] * 2 == plain.input_ids.shape[0]
    assert plain.attention_mask.sum(1).min() > window  # the window cuts inside every plain row
    encoded = []
    policy.model.vision_tower.register_forward_hook(
        lambda module, args, kwargs, output: encoded.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        reference = pair_logprobs(tiny_gemma3(gemma3_processor, seed=1), plain)
    fixed = (reference.chosen_logps, reference.rejected_logps)
    expected = dpo_loss_and_gradients(policy, fixed, plain, chunked_head=False)
    got = dpo_loss_and_gradients(policy, fixed, shared, chunked_head=False)
    assert_same_logps_loss_and_gradients(expected, got)
    assert encoded == [10, 5]  # 5 images (one row has two): once per completion in plain rows, once per pair shared


def test_the_batch_marks_gemma3s_image_soft_tokens_and_the_model_attends_over_them_both_ways(gemma3_processor):
    batch = tokenized_batch(gemma3_processor, GEMMA3_TEMPLATE)
    tokenizer = gemma3_processor.tokenizer
    types = batch.model_inputs["token_type_ids"]
    assert "mm_token_type_ids" not in batch.model_inputs and "num_crops" not in batch.model_inputs
    # 1 exactly on <image_soft_token> (4 per image), not on <start_of_image> / <end_of_image>
    assert torch.equal(types.bool(), batch.input_ids == tokenizer.image_token_id)
    assert types.sum(1).tolist() == [4, 8, 4, 4] * 2
    policy = tiny_gemma3(gemma3_processor, seed=0)
    causal = copy.copy(batch)
    causal.model_inputs = {key: value for key, value in batch.model_inputs.items() if key != "token_type_ids"}
    with torch.no_grad():
        both_ways, causal_only = pair_logprobs(policy, batch), pair_logprobs(policy, causal)
    # without the token types the image block is causal: the completions' log-probs change
    assert not torch.allclose(both_ways.chosen_logps, causal_only.chosen_logps, atol=1e-4)


@pytest.mark.parametrize("layout", [collate_pairs, collate_shared_prefix], ids=["plain", "shared"])
def test_the_chunked_head_gives_gemma3s_full_logits_values_and_gradients(gemma3_processor, layout):
    policy = tiny_gemma3(gemma3_processor, seed=0)
    batch = tokenized_batch(gemma3_processor, GEMMA3_TEMPLATE, layout)
    with torch.no_grad():
        reference = pair_logprobs(tiny_gemma3(gemma3_processor, seed=1), batch, chunked_head=False)
    widths = []
    policy.register_forward_hook(lambda module, inputs, output: widths.append(output.logits.shape[-1]))
    fixed = (reference.chosen_logps, reference.rejected_logps)
    full = dpo_loss_and_gradients(policy, fixed, batch, chunked_head=False)
    chunked = dpo_loss_and_gradients(policy, fixed, batch, chunked_head=True, chunk_size=7)
    assert widths == [len(gemma3_processor.tokenizer), policy.config.text_config.hidden_size]  # chunked: no logits
    assert_same_logps_loss_and_gradients(full, chunked)


def test_the_trainers_first_gemma3_step_equals_trl_and_shared_rows_train_as_plain_ones(gemma3_processor, tmp_path):
    """Auto decides per batch (Gemma 3's shared rows use dense masks: the dense-mask rule); with prefix_sharing false
    step 1 equals TRL's; with prefix_sharing true two steps equal the plain ones (step 2 on the updated weights)."""
    trl = pytest.importorskip("trl")
    from preftune import DPOTrainer

    policy, reference = tiny_gemma3(gemma3_processor, seed=0), tiny_gemma3(gemma3_processor, seed=1)
    rows = trl_rows()
    trl_loss, metrics = trl_first_loss_and_metrics(trl, policy, reference, gemma3_processor, tmp_path)

    auto = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=vision_config(tmp_path),
                      train_dataset=rows, processing_class=gemma3_processor)
    assert (auto.layout.prefix_sharing, auto.layout.padding_free, auto.layout.shared_attention) == (None, False, False)
    logged = {}
    for prefix_sharing in (False, True):
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), train_dataset=rows,
                             args=vision_config(tmp_path / str(prefix_sharing), prefix_sharing=prefix_sharing,
                                                max_steps=2), processing_class=gemma3_processor)
        trainer.train()
        logged[prefix_sharing] = [record for record in trainer.state.log_history if "loss" in record]
    first = logged[False][0]
    assert first["loss"] == pytest.approx(trl_loss, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(metrics[key], abs=1e-4), key
    for plain, shared in zip(logged[False], logged[True], strict=True):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen"):
            assert shared[key] == pytest.approx(plain[key], abs=1e-5), key


def test_padding_free_with_gemma3_is_a_config_error(gemma3_processor, tmp_path):
    from preftune import DPOTrainer

    with pytest.raises(ConfigError, match="not supported yet: padding_free with a vision-language model"):
        DPOTrainer(model=tiny_gemma3(gemma3_processor, seed=0), args=vision_config(tmp_path, padding_free=True),
                   train_dataset=trl_rows(), processing_class=gemma3_processor)


def test_gemma3_lora_trains_the_language_model_and_its_reference_is_the_adapter_disabled_model(gemma3_processor,
                                                                                             tmp_path):
    from preftune import DPOTrainer
    from preftune.model_setup import PROJECTOR_KEYS, VISION_TOWER_KEYS, is_under

    trainer = DPOTrainer(model=tiny_gemma3(gemma3_processor, seed=0),
                         args=vision_config(tmp_path, finetuning_type="lora", lora_rank=4, max_steps=2),
                         train_dataset=trl_rows(), processing_class=gemma3_processor)
    adapted = [name for name, _ in trainer.model.named_parameters() if "lora_" in name]
    assert adapted and not any(is_under(name, VISION_TOWER_KEYS + PROJECTOR_KEYS) for name in adapted)
    trainer.train()
    losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy = reference
    assert losses[1] != pytest.approx(math.log(2), abs=1e-6)  # step 2: the adapter has moved


def test_precomputed_reference_log_probs_of_gemma3_rows_are_the_references(gemma3_processor, tmp_path, monkeypatch):
    from preftune import DPOTrainer

    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    policy, reference = tiny_gemma3(gemma3_processor, seed=0), tiny_gemma3(gemma3_processor, seed=1)
    args = vision_config(tmp_path, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(reference), args=args, train_dataset=trl_rows(),
                         processing_class=gemma3_processor)
    assert trainer.ref_model is None
    with torch.no_grad():
        expected = pair_logprobs(reference, tokenized_batch(gemma3_processor, GEMMA3_TEMPLATE), chunked_head=False)
    torch.testing.assert_close(torch.tensor(trainer.train_dataset["ref_logps"]),
                               torch.stack([expected.chosen_logps, expected.rejected_logps], 1), atol=1e-5, rtol=0)


def test_truncation_drops_a_gemma3_pair_rather_than_cut_its_image_block(gemma3_processor):
    """keep_end cuts the shared prompt's start; a pair whose cut reaches an image's tokens is dropped and counted,
    the others keep every <start_of_image> and <image_soft_token>."""
    loaded = load_preference_data(trl_rows())
    settings = TokenizeSettings(max_length=None, chat_template=GEMMA3_TEMPLATE)
    full = tokenize_dataset(loaded.dataset, gemma3_processor, settings).dataset
    tokenizer = gemma3_processor.tokenizer

    def overflow(row):
        return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))

    # row 1 (two images) loses its first <start_of_image>; a row keeps its images while the cut stays before it
    max_length = overflow(full[1]) - full[1]["prompt_ids"].index(tokenizer.boi_token_id) - 1
    expected_kept = [i for i, row in enumerate(full)
                     if max(0, overflow(row) - max_length) <= row["prompt_ids"].index(tokenizer.boi_token_id)]
    assert 1 not in expected_kept and expected_kept
    cut = tokenize_dataset(loaded.dataset, gemma3_processor, TokenizeSettings(
        max_length=max_length, chat_template=GEMMA3_TEMPLATE, truncation_mode="keep_end"))
    assert [row["row"] for row in cut.dataset] == expected_kept
    for row in cut.dataset:
        for token in (tokenizer.boi_token_id, tokenizer.image_token_id, tokenizer.eoi_token_id):
            assert row["prompt_ids"].count(token) == full[row["row"]]["prompt_ids"].count(token)


def test_a_gemma3_model_folder_loads_its_processor_without_torchvision_and_trains(gemma3_processor, tmp_path):
    """Only a model path: Gemma3Processor with its PIL image processor and Gemma's named image tokens, the model
    through AutoModelForImageTextToText; one step on plain rows."""
    from preftune import DPOTrainer

    folder = tmp_path / "tiny-gemma3"
    tiny_gemma3(gemma3_processor, seed=0).save_pretrained(folder)
    gemma3_processor.save_pretrained(folder)
    trainer = DPOTrainer(model=str(folder), args=vision_config(tmp_path), train_dataset=trl_rows())
    loaded = trainer.processing_class
    assert (type(loaded).__name__, type(loaded.image_processor).__name__) == ("Gemma3Processor",
                                                                            "Gemma3ImageProcessorPil")
    assert type(trainer.model).__name__ == "Gemma3ForConditionalGeneration"
    counts = [row["prompt_ids"].count(loaded.tokenizer.image_token_id) for row in trainer.data.train.dataset]
    assert counts == [4, 8, 4, 4]  # every image resized to 28 x 28: 4 soft tokens each
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


# --------------------------------------------------------------------------------- LLaMA-Factory's gemma3 template


def test_images_under_llamafactorys_gemma3_template_become_the_processors_full_image_sequence(gemma3_processor,
                                                                                              tmp_path):
    """LLaMA-Factory's Gemma3 plugin replaces each <image> with ``\\n\\n<start_of_image>`` + the soft tokens +
    ``<end_of_image>\\n\\n`` (written out here) before its gemma3 template encodes the conversation: the ids are those
    of the same conversation with that text in place of <image>, encoded without images."""
    from test_vision_llamafactory import RLHF_V_ROWS, write_rlhf_v

    from preftune.data.templates import encode_conversation

    write_rlhf_v(tmp_path)
    loaded = load_preference_data("rlhf_v", dataset_dir=str(tmp_path))
    tokenized = tokenize_dataset(loaded.dataset, gemma3_processor, TokenizeSettings(max_length=2048,
                                                                                    template="gemma3")).dataset
    image_text = "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n"
    tokenizer = gemma3_processor.tokenizer
    assert len(tokenized) == len(RLHF_V_ROWS)
    for row, (_, _, question, chosen, rejected) in zip(tokenized, RLHF_V_ROWS):
        user = [{"role": "user", "content": question.replace("<image>", image_text)}]
        prompt_ids, chosen_ids = encode_conversation("gemma3", tokenizer, user, [{"role": "assistant",
                                                                                "content": chosen}])
        _, rejected_ids = encode_conversation("gemma3", tokenizer, user, [{"role": "assistant", "content": rejected}])
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (prompt_ids, chosen_ids, rejected_ids)
        assert row["prompt_ids"].count(tokenizer.image_token_id) == 4
    batch = collated(tokenized, gemma3_processor, collate_pairs)
    assert batch.model_inputs["pixel_values"].shape[0] == 2 * len(RLHF_V_ROWS)  # plain rows: images per completion
    assert torch.equal(batch.model_inputs["token_type_ids"].bool(), batch.input_ids == tokenizer.image_token_id)


def test_llamafactory_truncation_that_would_cut_inside_a_gemma3_image_drops_the_pair(gemma3_processor, tmp_path):
    """LLaMA-Factory's cutoff keeps the prompt's start: a cut between <start_of_image> and the last soft token keeps
    the placeholder but not the image's tokens, so the pair is dropped (not trained with a broken image block); a
    cutoff that keeps the image whole keeps the pair."""
    import json

    from test_vision import coloured
    from test_vision_llamafactory import RLHF_V_ENTRY

    (tmp_path / "images").mkdir()
    coloured("red", (28, 28)).save(tmp_path / "images" / "0.png")
    row = {"conversations": [{"from": "human", "value": "Look carefully at this picture, then answer in one word: "
                                                        "<image>Which colour is it?"}],
           "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Blue."},
           "images": ["images/0.png"]}
    (tmp_path / "rlhf_v.json").write_text(json.dumps([row]), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"rlhf_v": RLHF_V_ENTRY}), encoding="utf-8")
    loaded = load_preference_data("rlhf_v", dataset_dir=str(tmp_path))
    full = tokenize_dataset(loaded.dataset, gemma3_processor, TokenizeSettings(max_length=None,
                                                                               template="gemma3")).dataset[0]
    tokenizer = gemma3_processor.tokenizer
    response = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    soft = full["prompt_ids"].index(tokenizer.image_token_id)
    # a response shorter than half the cutoff is kept whole and the prompt keeps cutoff - response tokens
    for kept_prompt, whole in ((soft + 2, False), (soft + 4 + 1, True)):  # 2 of the 4 soft tokens; all and the end
        cutoff = kept_prompt + response
        assert 2 * response < cutoff and kept_prompt < len(full["prompt_ids"])  # the case is the one meant
        cut = tokenize_dataset(loaded.dataset, gemma3_processor, TokenizeSettings(max_length=cutoff,
                                                                                  template="gemma3"))
        assert len(cut.dataset) == int(whole) and cut.stats.dropped_no_room == ([] if whole else [0])
        if whole:
            assert cut.dataset[0]["prompt_ids"] == full["prompt_ids"][:kept_prompt]
