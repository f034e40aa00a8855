"""The training loop on the real stories260K model: accumulation, reference, saving, outputs, API."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import DPOConfig, DPOTrainer
from preftune.data.collate import collate_pairs
from preftune.logprobs import pair_logprobs

STORY_PAIRS = [
    {"prompt": "Once upon a time, there was a little girl named Lily.", "chosen": " She loved to play outside.",
     "rejected": " The dog ran away and hid."},
    {"prompt": "Tom had a red ball.", "chosen": " He was happy.", "rejected": " It was sad and cold."},
    {"prompt": "The cat sat on the mat. It was", "chosen": " warm and soft.", "rejected": " very big and loud."},
    {"prompt": "One day, Sue went to the park.", "chosen": " She saw a bird.", "rejected": " Bob."},
    {"prompt": "Ben wanted to bake a cake.", "chosen": " His mom helped him.", "rejected": " The oven was broken."},
    {"prompt": "The sun was shining.", "chosen": " The kids played in the garden.", "rejected": " It rained."},
    {"prompt": "Max found a shiny stone.", "chosen": " He gave it to his friend.", "rejected": " He threw it away."},
    {"prompt": "Anna had a little dog.", "chosen": " The dog was very kind.", "rejected": " The dog bit her."},
]


def make_config(tmp_path, **overrides) -> DPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), learning_rate=1e-3, max_steps=1, logging_steps=1, save_strategy="no",
        per_device_train_batch_size=8, gradient_accumulation_steps=1, max_length=64, seed=0, overwrite_cache=True,
    )
    settings.update(overrides)
    return DPOConfig(**settings)


def train_one_step(model_dir, tmp_path, **overrides):
    trainer = DPOTrainer(model=str(model_dir), args=make_config(tmp_path, **overrides), train_dataset=STORY_PAIRS)
    result = trainer.train()
    return trainer, result


def test_gradient_accumulation_matches_one_big_batch(stories_model_dir, tmp_path):
    # Adam's first step is lr·g/(|g|+eps): with eps = 1 it is linear in g, so equal gradients give equal weights
    # (with a tiny eps, float noise in near-zero gradients would flip whole ±lr updates).
    big, big_result = train_one_step(stories_model_dir, tmp_path / "big", per_device_train_batch_size=8, adam_epsilon=1.0)
    small, small_result = train_one_step(
        stories_model_dir, tmp_path / "small", per_device_train_batch_size=1, gradient_accumulation_steps=8,
        adam_epsilon=1.0,
    )
    assert big_result.global_step == small_result.global_step == 1
    assert small_result.training_loss == pytest.approx(big_result.training_loss, abs=1e-6)
    assert big.state.log_history[0]["grad_norm"] == pytest.approx(small.state.log_history[0]["grad_norm"], rel=1e-4)
    for (name, a), (_, b) in zip(big.model.named_parameters(), small.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_first_step_loss_is_ln2_and_the_reference_stays_frozen(stories_model_dir, tmp_path):
    trainer, result = train_one_step(stories_model_dir, tmp_path, max_steps=3)
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    original = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    for (name, ref), (_, orig) in zip(trainer.reference.model.named_parameters(), original.named_parameters()):
        assert torch.equal(ref, orig), f"reference changed: {name}"
    changed = any(not torch.equal(p, o) for p, o in zip(trainer.model.parameters(), original.parameters()))
    assert changed, "the policy did not move"


def test_saved_model_reloads_with_identical_logprobs(stories_model_dir, tmp_path):
    trainer, _ = train_one_step(stories_model_dir, tmp_path, max_steps=2)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run")
    examples = [trainer.data.train.dataset[i] for i in range(4)]
    batch = collate_pairs(examples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        before = pair_logprobs(trainer.model.eval(), batch)
        after = pair_logprobs(reloaded, batch)
    torch.testing.assert_close(before.chosen_logps, after.chosen_logps, atol=1e-6, rtol=0)
    torch.testing.assert_close(before.rejected_logps, after.rejected_logps, atol=1e-6, rtol=0)


def test_typical_trl_script_runs_with_only_the_import_changed(stories_model_dir, tmp_path):
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(stories_model_dir)
    tokenizer.pad_token = tokenizer.unk_token
    dataset = {"train": Dataset.from_list(STORY_PAIRS * 2), "test": Dataset.from_list(STORY_PAIRS[:4])}
    dpo_config = DPOConfig(
        output_dir=str(tmp_path / "trl-style"), beta=0.1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=5e-7, num_train_epochs=1, warmup_ratio=0.1, logging_steps=10, save_strategy="epoch", bf16=True,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref_model, args=dpo_config, train_dataset=dataset["train"],
        eval_dataset=dataset["test"], tokenizer=tokenizer,
    )
    output = trainer.train()
    assert output.global_step == 2  # 16 pairs / (4 x 2) per step, one epoch
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    assert (tmp_path / "trl-style" / "checkpoint-2" / "model.safetensors").exists()
    trainer.save_model(str(tmp_path / "saved"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved") is not None


@pytest.mark.parametrize(
    "speed_mode",
    [
        {"prefix_sharing": True},
        {"chunked_lm_head": True, "prefix_sharing": False, "padding_free": False},
        {"chunked_lm_head": False},
        {"prefix_sharing": True, "chunked_lm_head": False},
        {"padding_free": True},
        {"padding_free": True, "prefix_sharing": True},
    ],
)
def test_speed_modes_follow_the_plain_paths_loss_trajectory(stories_model_dir, tmp_path, speed_mode):
    settings = dict(max_steps=3, per_device_train_batch_size=4, adam_epsilon=1.0)
    plain, _ = train_one_step(
        stories_model_dir, tmp_path / "plain", **settings, prefix_sharing=False, padding_free=False, chunked_lm_head=False
    )
    assert plain.layout.prefix_sharing is False and plain.layout.padding_free is False
    fast, _ = train_one_step(stories_model_dir, tmp_path / "fast", **settings, **speed_mode)
    assert fast.layout.prefix_sharing == speed_mode.get("prefix_sharing")  # auto (None): per batch for llama/sdpa
    expected = [record["loss"] for record in plain.recorder.train_records]
    got = [record["loss"] for record in fast.recorder.train_records]
    assert len(got) == len(expected) == 3
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), fast.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_auto_padding_free_runs_long_rows_one_by_one_and_short_rows_padded():
    from preftune.data.collate import collate_pairs
    from preftune.batches import PADDING_FREE_MIN_MEAN_ROW_TOKENS, padding_free_pays

    long_row = PADDING_FREE_MIN_MEAN_ROW_TOKENS
    long_pairs = [{"prompt_ids": [1] * long_row, "chosen_ids": [5], "rejected_ids": [6, 7]} for _ in range(2)]
    short_pairs = [{"prompt_ids": [1, 2], "chosen_ids": [5], "rejected_ids": [6]} for _ in range(2)]
    assert padding_free_pays(collate_pairs(long_pairs, pad_token_id=0))
    assert not padding_free_pays(collate_pairs(short_pairs, pad_token_id=0))


@pytest.mark.parametrize("optim, fused", [("adamw_torch_fused", True), ("adamw_torch", None)])
def test_optim_selects_the_fused_kernel_or_the_default_with_the_same_updates(stories_model_dir, tmp_path, optim, fused):
    trainer, _ = train_one_step(stories_model_dir, tmp_path / optim, max_steps=2, optim=optim)
    reference, _ = train_one_step(stories_model_dir, tmp_path / "default", max_steps=2)  # default: fused
    assert reference.model is not trainer.model
    losses = [record["loss"] for record in trainer.recorder.train_records]
    assert losses == pytest.approx([record["loss"] for record in reference.recorder.train_records], rel=1e-5)
    for (name, a), (_, b) in zip(reference.model.named_parameters(), trainer.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_optimizer_is_fused_by_default(stories_model_dir, tmp_path):
    trainer = DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path), train_dataset=STORY_PAIRS)
    assert trainer.create_optimizer().defaults["fused"] is True
    trainer = DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path / "b", optim="adamw_torch"), train_dataset=STORY_PAIRS)
    assert not trainer.create_optimizer().defaults["fused"]


def test_torch_compile_follows_the_eager_loss_trajectory(stories_model_dir, tmp_path):
    """The compiled body (one-off compilation: about a minute on 2 CPU cores) gives eager's losses and weights."""
    settings = dict(max_steps=3, per_device_train_batch_size=4, adam_epsilon=1.0)
    eager, _ = train_one_step(stories_model_dir, tmp_path / "eager", **settings)
    compiled, _ = train_one_step(stories_model_dir, tmp_path / "compiled", **settings, torch_compile=True)
    assert compiled.model.model._compiled_call_impl is not None  # the body really is compiled
    got = [record["loss"] for record in compiled.recorder.train_records]
    assert got == pytest.approx([record["loss"] for record in eager.recorder.train_records], rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(eager.model.named_parameters(), compiled.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
