"""Vision-language DPO, the fast paths: prefix sharing (one row ``prompt | chosen | rejected`` per pair, each image
encoded once, Qwen-VL's multimodal RoPE positions stitched per completion), the chunked LM head, and precomputed
reference log-probs keyed by the images' content. Each is checked against the plain layout with full logits, on
tiny random Qwen2-VL, Qwen3-VL and LLaVA models built from configs (nothing downloaded); TRL parity of the shared
layout is in tests/test_vision.py."""

from __future__ import annotations

import copy

import pytest
import torch
from test_vision import (
    LLAVA_TEMPLATE,
    TEMPLATE,
    assert_same_logps_loss_and_gradients,
    collated,
    coloured,
    dpo_loss_and_gradients,
    gpt2_tokenizer_with,
    tiny_llava,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
    tokenized_batch,
    trl_rows,
    trl_rows_with_images_on_disk,
    vision_config,
)
from test_vision import llava_processor, processor, qwen3_vl_processor  # noqa: F401 - the processors' fixtures

from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.logprobs import pair_logprobs
from preftune.multimodal_positions import rope_index_of, shared_rope_position_ids

FAMILIES = {"qwen2_vl": ("processor", tiny_qwen2_vl, TEMPLATE),
            "qwen3_vl": ("qwen3_vl_processor", tiny_qwen3_vl, TEMPLATE),
            "llava": ("llava_processor", tiny_llava, LLAVA_TEMPLATE)}


def family(request, name):
    fixture, build, template = FAMILIES[name]
    vision_processor = request.getfixturevalue(fixture)
    return vision_processor, build, template


@pytest.mark.parametrize("name", list(FAMILIES))
def test_shared_rows_give_the_plain_layouts_log_probs_loss_and_gradients_encoding_each_image_once(request, name):
    vision_processor, build, template = family(request, name)
    policy = build(vision_processor, seed=0)
    plain = tokenized_batch(vision_processor, template, collate_pairs)
    shared = tokenized_batch(vision_processor, template, collate_shared_prefix)
    assert shared.input_ids.shape[0] == plain.input_ids.shape[0] // 2  # one row per pair
    encoded = []
    encoder = policy.model.visual if hasattr(policy.model, "visual") else policy.model.vision_tower
    encoder.register_forward_hook(lambda module, inputs, output: encoded.append(inputs[0].shape[0]))
    with torch.no_grad():
        reference = pair_logprobs(build(vision_processor, seed=1), plain)
    fixed = (reference.chosen_logps, reference.rejected_logps)
    expected = dpo_loss_and_gradients(policy, fixed, plain, chunked_head=False)
    got = dpo_loss_and_gradients(policy, fixed, shared, chunked_head=False)
    assert_same_logps_loss_and_gradients(expected, got)
    assert encoded[1] * 2 == encoded[0]  # the shared forward encodes half the patches (images): once per pair


def test_qwen2_vl_shared_rows_take_the_multimodal_rope_positions_not_the_token_count(request):
    """The case is the one meant: after an image, Qwen-VL's text positions follow the image grid's extent, so a
    completion's positions are not ``prompt length + offset``; the stitched ones are those of the plain rows."""
    vision_processor = request.getfixturevalue("processor")
    policy = tiny_qwen2_vl(vision_processor, seed=0)
    shared = tokenized_batch(vision_processor, TEMPLATE, collate_shared_prefix)
    plain = tokenized_batch(vision_processor, TEMPLATE, collate_pairs)
    stitched = shared_rope_position_ids(rope_index_of(policy), shared)
    assert stitched.shape == (3, *shared.input_ids.shape)
    real = shared.attention_mask.bool()
    assert not torch.equal(stitched[0][real], shared.position_ids[real])  # 1-D positions would be wrong
    plain_positions, _ = policy.model.get_rope_index(plain.input_ids, plain.model_inputs["mm_token_type_ids"],
                                                     plain.model_inputs["image_grid_thw"],
                                                     attention_mask=plain.attention_mask)
    pairs = shared.input_ids.shape[0]
    for row, (prompt, chosen, rejected) in enumerate(shared.segments.tolist()):
        rejected_in_plain = plain_positions[:, pairs + row, prompt : prompt + rejected]
        assert torch.equal(stitched[:, row, prompt + chosen : prompt + chosen + rejected], rejected_in_plain)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_chunked_head_gives_the_full_logits_values_without_making_the_logits(request, name):
    vision_processor, build, template = family(request, name)
    policy = build(vision_processor, seed=0)
    widths = []
    policy.register_forward_hook(lambda module, inputs, output: widths.append(output.logits.shape[-1]))
    with torch.no_grad():
        reference = pair_logprobs(build(vision_processor, seed=1), tokenized_batch(vision_processor, template, collate_pairs),
                                  chunked_head=False)
    fixed = (reference.chosen_logps, reference.rejected_logps)
    for layout in (collate_pairs, collate_shared_prefix):
        batch = tokenized_batch(vision_processor, template, layout)
        widths.clear()
        full = dpo_loss_and_gradients(policy, fixed, batch, chunked_head=False)
        chunked = dpo_loss_and_gradients(policy, fixed, batch, chunked_head=True, chunk_size=7)
        assert_same_logps_loss_and_gradients(full, chunked)
        hidden = policy.config.text_config.hidden_size
        assert widths == [len(vision_processor.tokenizer), hidden]  # chunked: the forward returns hidden states only


def test_prefix_sharing_auto_shares_vision_rows_and_encodes_each_image_once(tmp_path):
    """With the fitted rule (2 tokens of overhead per completion) any chat prompt of tens of tokens pays."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from preftune import DPOTrainer
    from preftune.models import image_only_processor

    tokenizer = gpt2_tokenizer_with("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
                                    "<|im_start|>", "<|im_end|>")
    vision_processor = image_only_processor(Qwen2VLProcessor, Qwen2VLImageProcessorPil(min_pixels=28 * 28,
                                     max_pixels=448 * 448), tokenizer, chat_template=TEMPLATE)
    rows = trl_rows()[:2]
    rows[0]["images"] = [coloured("red", (448, 448))]  # 32 x 32 patches merged 2 x 2: 256 image tokens
    rows[1]["images"] = [coloured("green", (28, 28)), coloured("blue", (28, 28))]  # 1 token each
    trainer = DPOTrainer(model=tiny_qwen2_vl(vision_processor, seed=0), args=vision_config(tmp_path),
                         train_dataset=rows, processing_class=vision_processor)
    assert (trainer.layout.prefix_sharing, trainer.layout.padding_free, trainer.layout.shared_attention) == (
        None, False, True)
    long_prompt, short_prompt = (trainer.batch_maker(trainer.train_dataset, [i]).collate() for i in (0, 1))
    assert long_prompt.segments is not None and short_prompt.segments is not None
    assert long_prompt.model_inputs["pixel_values"].shape[0] == 32 * 32  # the image's patches, once
    assert short_prompt.model_inputs["pixel_values"].shape[0] == 2 * 2 * 2  # two images of 2 x 2 patches, once each
    trainer.train()
    assert trainer.state.log_history[0]["loss"] > 0


@pytest.mark.slow
def test_a_lora_training_step_on_shared_rows_equals_one_on_plain_rows(request, tmp_path):
    """The trainer's wiring: LoRA (the reference is the adapter-disabled policy), images with each layout, one step."""
    from preftune import DPOTrainer

    vision_processor = request.getfixturevalue("processor")
    policy = tiny_qwen2_vl(vision_processor, seed=0)
    logged = {}
    for prefix_sharing in (False, True):
        args = vision_config(tmp_path / str(prefix_sharing), finetuning_type="lora", lora_rank=4, max_steps=2,
                             prefix_sharing=prefix_sharing)
        trainer = DPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=trl_rows(),
                             processing_class=vision_processor)
        assert trainer.layout.prefix_sharing is prefix_sharing
        trainer.train()
        logged[prefix_sharing] = [record for record in trainer.state.log_history if "loss" in record]
    for plain, shared in zip(logged[False], logged[True], strict=True):  # step 2 runs on the updated adapter
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/chosen"):
            assert shared[key] == pytest.approx(plain[key], abs=1e-5), key


def test_padding_free_and_prefix_sharing_without_the_shared_attention_are_config_errors(request, tmp_path):
    from preftune import DPOTrainer
    from preftune.errors import ConfigError

    vision_processor = request.getfixturevalue("processor")
    with pytest.raises(ConfigError, match="not supported yet: padding_free with a vision-language model"):
        DPOTrainer(model=tiny_qwen2_vl(vision_processor, seed=0), args=vision_config(tmp_path, padding_free=True),
                   train_dataset=trl_rows(), processing_class=vision_processor)
    eager = tiny_qwen2_vl(vision_processor, seed=0)
    eager.set_attn_implementation("eager")
    with pytest.raises(ConfigError, match="not supported yet: prefix_sharing with this vision-language model"):
        DPOTrainer(model=eager, args=vision_config(tmp_path, prefix_sharing=True), train_dataset=trl_rows(),
                   processing_class=vision_processor)
    auto = DPOTrainer(model=eager, args=vision_config(tmp_path), train_dataset=trl_rows(),
                      processing_class=vision_processor)
    assert auto.layout.prefix_sharing is False  # auto: plain rows where the shared attention cannot run


# ------------------------------------------------------------------------------------------ precomputed reference


def test_precomputed_reference_log_probs_of_image_rows_are_the_references_and_a_changed_image_is_rescored(
        request, tmp_path, monkeypatch):
    """The cache key holds the images' content: the same rows reuse the file; the same text and token ids with
    one image file repainted (same name, same size) are scored again, and only that row's values change."""
    from preftune import DPOTrainer

    vision_processor = request.getfixturevalue("processor")
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache"))
    media, rows = trl_rows_with_images_on_disk(tmp_path)
    policy, reference = tiny_qwen2_vl(vision_processor, seed=0), tiny_qwen2_vl(vision_processor, seed=1)

    def precomputed():
        args = vision_config(tmp_path, precompute_ref_log_probs=True, overwrite_cache=False, media_dir=str(media))
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=rows, processing_class=vision_processor)
        assert trainer.ref_model is None  # no reference model is kept
        dataset = trainer.train_dataset
        return (torch.tensor(dataset["ref_logps"]), dataset["prompt_ids"],
                trainer.data.report["train"]["reference_logps"]["reused"])

    first, first_ids, reused = precomputed()
    assert not reused
    from preftune.data.formats import load_preference_data
    from preftune.data.tokenize import TokenizeSettings, tokenize_dataset

    loaded = load_preference_data(rows, dataset_dir=str(media))
    settings = TokenizeSettings(max_length=None, chat_template=TEMPLATE)
    tokenized = tokenize_dataset(loaded.dataset, vision_processor, settings)
    with torch.no_grad():
        expected = pair_logprobs(reference, collated(tokenized.dataset, vision_processor), chunked_head=False)
    torch.testing.assert_close(first, torch.stack([expected.chosen_logps, expected.rejected_logps], 1), atol=1e-5,
                               rtol=0)
    again, _, reused = precomputed()
    assert reused and torch.equal(again, first)

    coloured("blue", (56, 56)).save(media / "0-0.png")  # row 0's red square repainted: same size, same tokens
    changed, changed_ids, reused = precomputed()
    assert not reused and changed_ids == first_ids
    assert not torch.allclose(changed[0], first[0])
    torch.testing.assert_close(changed[1:], first[1:], atol=1e-6, rtol=0)


def test_the_image_content_fingerprint_follows_the_pixels_not_the_names(tmp_path):
    from preftune.data.images import image_content_fingerprint

    coloured("red", (28, 28)).save(tmp_path / "a.png")
    red = (tmp_path / "a.png").read_bytes()
    coloured("green", (28, 28)).save(tmp_path / "b.png")
    by_path = image_content_fingerprint([[{"bytes": None, "path": str(tmp_path / "a.png")}], []])
    assert by_path == image_content_fingerprint([[{"bytes": red, "path": None}], []])  # same bytes, same key
    assert by_path != image_content_fingerprint([[{"bytes": None, "path": str(tmp_path / "b.png")}], []])
    assert by_path != image_content_fingerprint([[], [{"bytes": red, "path": None}]])  # another row's image
