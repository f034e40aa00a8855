"""Reference strategies: a frozen copy, the LoRA policy with its adapter disabled, a frozen copy of a trained
adapter; choosing between them; vocabulary checks; TR-DPO reference updates."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from preftune.adapters import apply_lora, save_adapter
from preftune.data.collate import collate_pairs
from preftune.errors import ConfigError
from preftune.logprobs import completion_logprobs
from preftune.reference import (
    AdapterCopyReference,
    AdapterDisabledReference,
    FrozenReference,
    adapter_is_fresh,
    build_reference,
    check_reference_compatible,
    sync_reference,
)
from test_logprobs import STORY_PAIRS  # real story text (stories260K ids), 3 pairs


@pytest.fixture(autouse=True)
def single_thread():
    """A 260K-parameter model runs ~10× faster on one thread (thread hand-offs dominate its tiny matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def batch():
    return collate_pairs(STORY_PAIRS, pad_token_id=0)


@pytest.fixture
def load_stories(stories_model_dir):
    return lambda: AutoModelForCausalLM.from_pretrained(stories_model_dir)


def lora(rank: int = 4) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")


def logps_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(model, batch).logps


def train_steps(model, batch, steps: int = 3, lr: float = 0.05) -> None:
    """A few Adam steps on a DPO-like objective (raise chosen over rejected) over the trainable parameters."""
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        logps = completion_logprobs(model, batch).logps
        (logps[1] - logps[0]).sum().backward()
        optimizer.step()


def requires_grad_flags(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def clone_parameters(model, keep=lambda name: True) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if keep(name)}


# ------------------------------------------------------------------------------------- adapter disabled
def test_fresh_adapter_reference_equals_the_base_model_before_and_after_updates(load_stories, batch):
    base_logps = logps_of(load_stories().eval(), batch)
    policy = apply_lora(load_stories(), lora())
    reference = build_reference(policy)
    assert isinstance(reference, AdapterDisabledReference) and reference.model is policy
    torch.testing.assert_close(reference.completion_logps(batch), base_logps, atol=1e-6, rtol=0)
    base_weights = clone_parameters(policy, keep=lambda name: "lora_" not in name)
    flags = requires_grad_flags(policy)

    train_steps(policy, batch)

    policy_logps = logps_of(policy, batch)
    ref_logps = reference.completion_logps(batch)
    torch.testing.assert_close(ref_logps, base_logps, atol=1e-6, rtol=0)
    assert (policy_logps - ref_logps).abs().max() > 1e-3  # the adapter moved; the reference did not
    chosen, rejected = reference.logps(batch)
    torch.testing.assert_close(chosen, ref_logps[0])
    torch.testing.assert_close(rejected, ref_logps[1])
    for name, weight in base_weights.items():
        assert torch.equal(policy.get_parameter(name), weight), name
    assert requires_grad_flags(policy) == flags and policy.training  # restored after each reference forward
    torch.testing.assert_close(logps_of(policy, batch), policy_logps, atol=0, rtol=0)  # adapters enabled again


def test_adapters_are_enabled_again_after_an_error_in_the_reference_forward(load_stories, batch):
    policy = apply_lora(load_stories(), lora())
    train_steps(policy, batch, steps=2)
    reference = AdapterDisabledReference(policy)
    policy.train()
    flags = requires_grad_flags(policy)
    policy_logps = logps_of(policy, batch)

    def fail(*args, **kwargs):
        raise RuntimeError("boom in the reference forward")

    handle = policy.get_base_model().model.layers[2].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        reference.completion_logps(batch)
    handle.remove()

    assert not policy._adapters_disabled
    assert requires_grad_flags(policy) == flags and policy.training
    torch.testing.assert_close(logps_of(policy, batch), policy_logps, atol=0, rtol=0)


def test_reference_forward_runs_without_dropout_and_without_gradients(load_stories, batch):
    policy = apply_lora(load_stories(), LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", task_type="CAUSAL_LM"))
    train_steps(policy, batch, steps=1)
    reference = AdapterCopyReference(policy)
    policy.train()
    first, second = reference.completion_logps(batch), reference.completion_logps(batch)
    assert torch.equal(first, second) and not first.requires_grad
    assert policy.training


# -------------------------------------------------------------------------------------------- adapter copy
@pytest.fixture
def trained_adapter_dir(load_stories, batch, tmp_path):
    """An adapter trained a little (an 'SFT adapter'), saved to disk."""
    policy = apply_lora(load_stories(), lora())
    train_steps(policy, batch, steps=4)
    return save_adapter(policy, None, tmp_path / "sft_adapter")


def test_trained_adapter_reference_is_a_frozen_copy_of_the_loaded_adapter(load_stories, batch, trained_adapter_dir):
    policy = PeftModel.from_pretrained(load_stories(), trained_adapter_dir, is_trainable=True)
    loaded_logps = logps_of(policy, batch)
    base_logps = logps_of(load_stories().eval(), batch)
    assert not adapter_is_fresh(policy)
    flags = requires_grad_flags(policy)

    reference = build_reference(policy)

    assert isinstance(reference, AdapterCopyReference) and reference.model is policy
    assert policy.active_adapter == "default" and set(policy.peft_config) == {"default", "ref"}
    assert requires_grad_flags(policy).items() >= flags.items()  # existing flags untouched by adding the copy
    assert reference.reference_parameters and not any(p.requires_grad for p in reference.reference_parameters)
    copy_values = [p.detach().clone() for p in reference.reference_parameters]
    ref_logps = reference.completion_logps(batch)
    torch.testing.assert_close(ref_logps, loaded_logps, atol=1e-6, rtol=0)
    assert (ref_logps - base_logps).abs().max() > 1e-3  # not the bare base

    flags = requires_grad_flags(policy)
    train_steps(policy, batch, steps=3)
    assert (logps_of(policy, batch) - loaded_logps).abs().max() > 1e-3  # the trainable adapter moved
    torch.testing.assert_close(reference.completion_logps(batch), loaded_logps, atol=1e-6, rtol=0)
    assert requires_grad_flags(policy) == flags
    assert all(torch.equal(p, value) for p, value in zip(reference.reference_parameters, copy_values))
    trainable = [name for name, flag in flags.items() if flag]
    assert trainable and all(".default." in name for name in trainable)


def test_saving_the_policy_adapter_leaves_the_reference_copy_out(load_stories, batch, trained_adapter_dir, tmp_path):
    policy = PeftModel.from_pretrained(load_stories(), trained_adapter_dir, is_trainable=True)
    AdapterCopyReference(policy)
    out = save_adapter(policy, None, tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []
    reloaded = PeftModel.from_pretrained(load_stories(), out)
    torch.testing.assert_close(logps_of(reloaded, batch), logps_of(policy, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", [AdapterDisabledReference, AdapterCopyReference])
def test_reference_forward_keeps_a_partly_frozen_adapter_as_it_was(load_stories, batch, strategy):
    policy = apply_lora(load_stories(), lora())
    train_steps(policy, batch, steps=1)
    reference = strategy(policy)
    for name, parameter in policy.named_parameters():
        if "layers.0." in name and ".lora_A.default" in name:
            parameter.requires_grad_(False)  # the user froze part of the adapter; peft would make it trainable again
    flags = requires_grad_flags(policy)
    reference.completion_logps(batch)
    assert requires_grad_flags(policy) == flags


# ---------------------------------------------------------------------------------------------- choosing
def test_build_reference_for_a_plain_policy_is_a_frozen_copy(load_stories, batch):
    policy = load_stories()
    reference = build_reference(policy)
    assert isinstance(reference, FrozenReference) and reference.model is not policy
    before = reference.completion_logps(batch)
    train_steps(policy, batch, steps=2)
    torch.testing.assert_close(reference.completion_logps(batch), before, atol=0, rtol=0)
    assert not any(p.requires_grad for p in reference.model.parameters())


def test_build_reference_uses_a_given_reference_model(load_stories):
    policy, given = apply_lora(load_stories(), lora()), load_stories()
    reference = build_reference(policy, given)
    assert isinstance(reference, FrozenReference) and reference.model is given


def tiny_llama(vocab: int, tmp_name: str | None = None):
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    config._name_or_path = tmp_name or ""
    return AutoModelForCausalLM.from_config(config)


def test_a_reference_with_another_vocabulary_is_refused_naming_both(load_stories):
    policy = load_stories()
    other = tiny_llama(600, "other-vocab-model")
    with pytest.raises(ConfigError, match="600") as error:
        check_reference_compatible(policy, other)
    assert error.value.key == "ref_model"
    assert "other-vocab-model" in str(error.value) and "stories260K" in str(error.value) and "512" in str(error.value)
    with pytest.raises(ConfigError):
        build_reference(policy, other)
    check_reference_compatible(policy, tiny_llama(512))  # same vocabulary, other sizes: fine


def test_a_resized_output_embedding_counts_as_another_vocabulary(load_stories):
    policy, reference = load_stories(), load_stories()
    reference.resize_token_embeddings(520)
    reference.config.vocab_size = 512  # only the rows differ
    with pytest.raises(ConfigError, match="520"):
        check_reference_compatible(policy, reference)


# ---------------------------------------------------------------------------------------------------- TR-DPO
def _moved_policy_and_reference(load_stories):
    policy = load_stories()
    reference = FrozenReference.copy_of(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return policy, reference


def test_soft_sync_mixes_policy_into_reference_parameter_by_parameter(load_stories):
    policy, reference = _moved_policy_and_reference(load_stories)
    before = clone_parameters(reference.model)
    sync_reference(reference, policy, alpha=0.25)
    policy_params = dict(policy.named_parameters())
    for name, value in reference.model.named_parameters():
        expected = before[name].mul(0.75).add(policy_params[name].detach(), alpha=0.25)
        assert torch.equal(value, expected), name
        torch.testing.assert_close(value, 0.25 * policy_params[name] + 0.75 * before[name], atol=1e-7, rtol=1e-6)
        assert not value.requires_grad


def test_hard_sync_copies_the_policy(load_stories, batch):
    policy, reference = _moved_policy_and_reference(load_stories)
    sync_reference(reference, policy, alpha=1.0)
    policy_params = dict(policy.named_parameters())
    assert all(torch.equal(value, policy_params[name]) for name, value in reference.model.named_parameters())
    assert not any(p.requires_grad for p in reference.model.parameters())
    torch.testing.assert_close(reference.completion_logps(batch), logps_of(policy, batch), atol=0, rtol=0)


def test_sync_refuses_adapter_references_other_models_and_bad_alpha(load_stories, batch, trained_adapter_dir):
    fresh = apply_lora(load_stories(), lora())
    with pytest.raises(ConfigError) as error:
        sync_reference(AdapterDisabledReference(fresh), fresh, alpha=0.5)
    assert error.value.key == "sync_ref_model"
    trained = PeftModel.from_pretrained(load_stories(), trained_adapter_dir, is_trainable=True)
    with pytest.raises(ConfigError) as error:
        sync_reference(AdapterCopyReference(trained), trained, alpha=0.5)
    assert error.value.key == "sync_ref_model"
    with pytest.raises(ConfigError, match="different parameters"):
        sync_reference(FrozenReference(load_stories()), fresh, alpha=0.5)
    with pytest.raises(ConfigError, match="shapes differ|different parameters"):
        sync_reference(FrozenReference(tiny_llama(512)), tiny_llama(600), alpha=0.5)
    with pytest.raises(ConfigError) as error:
        plain = load_stories()
        sync_reference(FrozenReference.copy_of(plain), plain, alpha=0.0)
    assert error.value.key == "ref_model_mixup_alpha"
