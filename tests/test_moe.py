"""The MoE router load-balancing auxiliary loss, against TRL 1.16's DPOTrainer and an independent formula.

Tiny Qwen3-MoE and Mixtral models (2 layers, 4 experts, top-2) are built from configs with the stories260K
tokenizer's 512-token vocabulary; their router weights are drawn larger than the default initialisation so that
routing is far from uniform and the auxiliary loss and its gradient are not near-constant.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from preftune import DPOConfig, DPOTrainer
from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.errors import ConfigError
from preftune.logprobs import pair_logprobs

ROWS = [
    {"prompt": "Once upon a time, there was a little girl named Lily.", "chosen": " She loved to play outside.",
     "rejected": " The dog ran away and hid."},
    {"prompt": "Tom had a red ball.", "chosen": " He was happy.", "rejected": " It was sad and cold, and the sun went down."},
    {"prompt": "The cat sat on the mat. It was", "chosen": " warm.", "rejected": " very very big and loud."},
    {"prompt": "One day, Sue went to the park.", "chosen": " She saw a bird.", "rejected": " Bob."},
]
UNPAIRED_ROWS = [
    {"prompt": "Tom had a red ball.", "completion": " He was happy.", "label": True},
    {"prompt": "The cat sat on the mat. It was", "completion": " very very big and loud.", "label": False},
    {"prompt": "One day, Sue went to the park.", "completion": " She saw a bird.", "label": True},
    {"prompt": "Anna had a little dog.", "completion": " The dog bit her.", "label": False},
]
SHAPE = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, num_experts_per_tok=2, max_position_embeddings=128)  # fmt: skip


def tiny_moe(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random 2-layer, 4-expert, top-2 ``qwen3_moe`` or ``mixtral`` model (``overrides``: config values)."""
    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        config = Qwen3MoeConfig(**SHAPE, num_experts=4, intermediate_size=64, moe_intermediate_size=32, **overrides)
        model = Qwen3MoeForCausalLM(config)
    else:
        model = MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, intermediate_size=32, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):  # the routers: logits of a few units, not ~0.1
                parameter.normal_(0.0, 1.0)
    return model.eval()


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy with Gaussian noise on every weight: a reference that differs from the policy."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return other


def gate_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if name.endswith("gate.weight")}


@pytest.fixture(scope="module")
def tokenizer():
    from conftest import shared_asset

    tokenizer = AutoTokenizer.from_pretrained(shared_asset("stories260K-hf"))
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def preftune_args(tmp_path, coef: float | None = None, **overrides) -> DPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "preftune"), learning_rate=1e-2, adam_epsilon=1.0, max_steps=1, logging_steps=1,
        save_strategy="no", per_device_train_batch_size=len(ROWS), max_length=64, seed=0, overwrite_cache=True,
        beta=0.3, plot_loss=False,
    )
    settings.update(overrides)
    if coef is not None:
        settings["router_aux_loss_coef"] = coef
    return DPOConfig(**settings)


def preftune_trainer(tmp_path, tokenizer, policy, reference=None, coef=None, rows=ROWS, **overrides) -> DPOTrainer:
    return DPOTrainer(
        model=copy.deepcopy(policy), ref_model=None if reference is None else copy.deepcopy(reference),
        args=preftune_args(tmp_path, coef, **overrides), train_dataset=rows, processing_class=tokenizer,
    )


def tokenized(trainer_rows) -> list[tuple]:
    return [tuple(tuple(row[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")) for row in trainer_rows]


# ------------------------------------------------------------------------------------------------- the oracle: TRL
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_one_training_step_matches_trl_loss_aux_loss_rewards_and_updated_weights(tmp_path, tokenizer, kind):
    trl = pytest.importorskip("trl")
    logging.getLogger("trl").setLevel(logging.ERROR)
    policy, coef = tiny_moe(kind), 0.5
    reference = perturbed(policy, seed=1)
    trl_args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], beta=0.3, learning_rate=1e-2,
        adam_epsilon=1.0, max_steps=1, logging_steps=1, save_strategy="no", per_device_train_batch_size=len(ROWS),
        max_length=64, router_aux_loss_coef=coef,
    )
    theirs = trl.DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
        train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
    )
    ours = preftune_trainer(tmp_path, tokenizer, policy, reference, coef=coef)
    assert tokenized(ours.data.train.dataset) == tokenized(theirs.train_dataset)  # same tokens in
    assert theirs.aux_loss_enabled and ours.aux_loss_enabled and ours.router_aux_loss_coef == coef
    theirs.train()
    ours.train()

    expected, got = theirs.state.log_history[0], ours.state.log_history[0]
    assert expected["aux_loss"] > 1.0  # far from zero: the term is really there
    for key in ("loss", "aux_loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    trl_weights = dict(theirs.model.named_parameters())
    for name, parameter in ours.model.named_parameters():
        torch.testing.assert_close(parameter, trl_weights[name], atol=1e-6, rtol=1e-5, msg=name)


def test_eval_logs_the_aux_loss_and_counts_it_in_the_loss_as_trl(tmp_path, tokenizer):
    # Two eval batches of two pairs, in order in both: one aux loss per batch forward, averaged over the batches.
    trl = pytest.importorskip("trl")
    logging.getLogger("trl").setLevel(logging.ERROR)
    policy, coef = tiny_moe("qwen3_moe", seed=2), 0.5
    reference = perturbed(policy, seed=3)
    trl_args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], beta=0.3,
        per_device_eval_batch_size=2, max_length=64, router_aux_loss_coef=coef,
    )
    theirs = trl.DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=trl_args,
        train_dataset=Dataset.from_list(ROWS), eval_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
    )
    ours = DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference),
        args=preftune_args(tmp_path, coef, per_device_eval_batch_size=2), train_dataset=ROWS,
        eval_dataset=ROWS, processing_class=tokenizer,
    )
    expected, got = theirs.evaluate(), ours.evaluate()
    assert expected["eval_aux_loss"] > 1.0
    for key in ("eval_loss", "eval_aux_loss", "eval_rewards/margins"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5), key


# ------------------------------------------------------------------------------------------ coefficient resolution
def test_coefficient_defaults_to_the_model_configs_and_zero_turns_the_loss_off(tmp_path, tokenizer):
    policy = tiny_moe("mixtral", router_aux_loss_coef=0.25)
    default = preftune_trainer(tmp_path / "default", tokenizer, policy)
    assert default.aux_loss_enabled and default.router_aux_loss_coef == 0.25

    off = preftune_trainer(tmp_path / "off", tokenizer, policy, coef=0.0)
    assert not off.aux_loss_enabled and off.router_aux_loss_coef == 0.0
    calls = []
    off.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    off.train()
    record = off.state.log_history[0]
    assert "aux_loss" not in record and calls and all("output_router_logits" not in kwargs for kwargs in calls)
    # The loss is the DPO loss alone: at step 1 the policy is its own reference, so it is ln 2 exactly.
    assert record["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_coefficient_on_a_dense_model_is_a_config_error_and_trl_refuses_it_too(tmp_path, tokenizer):
    trl = pytest.importorskip("trl")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in SHAPE.items() if k != "num_experts_per_tok"},
                                         intermediate_size=64))
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts model") as error:
        preftune_trainer(tmp_path, tokenizer, dense, coef=0.01)
    assert error.value.key == "router_aux_loss_coef"
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        trl.DPOTrainer(
            model=copy.deepcopy(dense), args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[],
                                                          router_aux_loss_coef=0.01),
            train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
        )
    for coef in (None, 0.0):  # unset or zero: a dense model trains as before
        trainer = preftune_trainer(tmp_path / f"dense-{coef}", tokenizer, dense, coef=coef)
        assert not trainer.aux_loss_enabled


@pytest.mark.parametrize("key", ["prefix_sharing", "padding_free"])
def test_a_layout_that_splits_the_forward_is_refused_while_the_loss_is_on(tmp_path, tokenizer, key):
    policy = tiny_moe("qwen3_moe")
    with pytest.raises(ConfigError, match="MoE load-balancing loss") as error:
        preftune_trainer(tmp_path / "on", tokenizer, policy, **{key: True})
    assert error.value.key == key
    assert not preftune_trainer(tmp_path / "off", tokenizer, policy, coef=0.0, **{key: True}).aux_loss_enabled


# ---------------------------------------------------------------------------------------- which forwards ask for it
def test_only_the_policys_forward_requests_router_logits_never_the_references(tmp_path, tokenizer):
    policy = tiny_moe("qwen3_moe")
    trainer = DPOTrainer(
        model=copy.deepcopy(policy), ref_model=perturbed(policy, seed=1),
        args=preftune_args(tmp_path, 0.1, per_device_eval_batch_size=2), train_dataset=ROWS, eval_dataset=ROWS[:2],
        processing_class=tokenizer,
    )
    seen = {"policy": [], "reference": []}
    for role, model in (("policy", trainer.model), ("reference", trainer.reference.model)):
        model.register_forward_pre_hook(
            lambda module, args, kwargs, role=role: seen[role].append(kwargs.get("output_router_logits")),
            with_kwargs=True,
        )
    trainer.train()  # one step, then the final evaluation
    assert seen["policy"] and all(flag is True for flag in seen["policy"])
    assert seen["reference"] and all(flag is None for flag in seen["reference"])
    evals = [record for record in trainer.state.log_history if "eval_loss" in record]
    assert "aux_loss" in trainer.state.log_history[0] and evals and all("eval_aux_loss" in r for r in evals)
    assert "aux_loss" in trainer.state.log_history[-1]  # the end-of-training record carries the run's mean, as TRL's test asks


def test_kto_adds_the_aux_loss_of_the_completion_forward_only(tmp_path, tokenizer):
    policy = tiny_moe("mixtral")
    seen = []
    base = DPOTrainer(
        model=copy.deepcopy(policy), args=preftune_args(tmp_path / "off", 0.0, loss_type="kto"),
        train_dataset=UNPAIRED_ROWS, processing_class=tokenizer,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy), args=preftune_args(tmp_path / "on", 0.5, loss_type="kto"),
        train_dataset=UNPAIRED_ROWS, processing_class=tokenizer,
    )
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("output_router_logits")), with_kwargs=True
    )
    base.train()
    trainer.train()
    # Policy forwards: the completions (with router logits) and the KL estimate's mismatched pairs (without);
    # the reference is a frozen copy with no hook.
    assert seen.count(True) == 1 and seen.count(None) == 1
    batch = collate_pairs(list(trainer.data.train.dataset), pad_token_id=tokenizer.pad_token_id)
    expected_aux = switch_aux_loss(policy, batch)
    record, without = trainer.state.log_history[0], base.state.log_history[0]
    assert record["aux_loss"] == pytest.approx(expected_aux.item(), abs=1e-5)
    assert record["loss"] == pytest.approx(without["loss"] + 0.5 * expected_aux.item(), abs=1e-5)


# ---------------------------------------------------------------------- the value and its gradient, from a formula
def switch_aux_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """The Switch Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6) written out token by token:
    ``E · Σ_e f_e · P_e`` with f_e the share of top-k slots routed to expert e and P_e its mean router probability,
    over every real token of every MoE layer, from the router logits the model records."""
    config = model.config
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    top_k = config.num_experts_per_tok
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    real = batch.attention_mask.reshape(-1).bool()
    assignments = torch.zeros(experts)
    probability_sums = torch.zeros(experts)
    tokens = 0
    for layer_logits in out.router_logits:
        for logits in layer_logits[real]:
            probabilities = torch.softmax(logits.float(), dim=-1)
            for expert in torch.topk(probabilities, top_k).indices.tolist():
                assignments[expert] += 1
            probability_sums = probability_sums + probabilities
            tokens += 1
    return experts * torch.sum((assignments / tokens) * (probability_sums / tokens))


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_aux_loss_and_its_router_gradient_match_the_switch_formula(kind):
    policy = tiny_moe(kind, seed=4)
    examples = [  # ragged rows: padding must not count
        {"prompt_ids": [5, 9, 33, 7, 81], "chosen_ids": [40, 2], "rejected_ids": [11, 12, 13, 14, 2]},
        {"prompt_ids": [3, 8], "chosen_ids": [19, 20, 21, 2], "rejected_ids": [2]},
    ]
    batch = collate_pairs(examples, pad_token_id=0)
    out = pair_logprobs(policy, batch, router_aux_loss=True)
    reference_copy = copy.deepcopy(policy)
    expected = switch_aux_loss(reference_copy, batch)
    assert out.aux_loss.item() == pytest.approx(expected.item(), abs=1e-6)

    # The DPO term left out: the gradient of the aux loss alone reaches every router, as the formula's does.
    out.aux_loss.backward()
    expected.backward()
    ours, theirs = gate_weights(policy), gate_weights(reference_copy)
    assert ours
    for name, weight in ours.items():
        assert weight.grad is not None and weight.grad.abs().sum() > 0, name
        torch.testing.assert_close(weight.grad, theirs[name].grad, atol=1e-7, rtol=1e-5, msg=name)


def test_aux_loss_is_refused_for_a_batch_forwarded_in_pieces():
    policy = tiny_moe("qwen3_moe")
    examples = [{"prompt_ids": [5, 9], "chosen_ids": [40, 2], "rejected_ids": [11, 2]}]
    shared_prefix = collate_shared_prefix(examples, pad_token_id=0)
    padding_free = collate_pairs(examples, pad_token_id=0).without_padding()
    for batch in (shared_prefix, padding_free):
        with pytest.raises(ValueError, match="plain padded layout"):
            pair_logprobs(policy, batch, router_aux_loss=True)
    assert pair_logprobs(policy, collate_pairs(examples, pad_token_id=0)).aux_loss is None  # not asked: none
