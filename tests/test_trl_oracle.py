"""preftune's log-probs + loss against TRL 1.16's DPOTrainer (the oracle) on identical tokenized batches.

TRL tokenizes the rows; both engines then score the same ``prompt_ids/chosen_ids/rejected_ids`` with the
same policy and reference weights (separate copies: TRL patches its models' forward in place).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.data.collate import collate_pairs
from preftune.logprobs import pair_logprobs
from preftune.losses import preference_loss

trl = pytest.importorskip("trl")

ROWS = [
    {"prompt": "Once upon a time, there was a little girl named Lily.", "chosen": " She loved to play outside.",
     "rejected": " The dog ran away and hid."},
    {"prompt": "Tom had a red ball.", "chosen": " He was happy.", "rejected": " It was sad and cold, and the sun went down."},
    {"prompt": "The cat sat on the mat. It was", "chosen": " warm.", "rejected": " very very big and loud."},
    {"prompt": "One day, Sue went to the park.", "chosen": " She saw a bird.", "rejected": " Bob."},
]


def perturbed(model, seed: int, scale: float = 0.05):
    """A copy of ``model`` with Gaussian noise on every weight: a reference that differs from the policy."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return other


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    from conftest import shared_asset

    model_dir = shared_asset("stories260K-hf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = perturbed(policy, seed=0)
    return model_dir, tokenizer, policy, reference, tmp_path_factory.mktemp("trl")


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_and_logps_match_trl_on_identical_batches(trl_setup, loss_type):
    model_dir, tokenizer, policy, reference, tmp = trl_setup
    logging.getLogger("trl").setLevel(logging.ERROR)
    beta = 0.3
    args = trl.DPOConfig(
        output_dir=str(tmp / loss_type), use_cpu=True, bf16=False, report_to=[], loss_type=[loss_type], beta=beta,
        per_device_train_batch_size=len(ROWS), max_length=64,
    )
    trainer = trl.DPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
        train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
    )
    examples = [trainer.train_dataset[i] for i in range(len(ROWS))]
    inputs = trainer.data_collator(examples)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    mode = "train" if trainer.model.training else "eval"
    trl_metrics = {key: values[-1] for key, values in trainer._metrics[mode].items()}

    batch = collate_pairs(examples, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(batch.input_ids, inputs["input_ids"])  # same tokens in, so any difference is the scoring
    with torch.no_grad():
        ours = pair_logprobs(policy.eval(), batch)
        ref = pair_logprobs(reference.eval(), batch)
    losses = preference_loss(
        loss_type, ours.chosen_logps, ours.rejected_logps, ref.chosen_logps, ref.rejected_logps, beta=beta,
        chosen_lengths=ours.chosen_lengths, rejected_lengths=ours.rejected_lengths,
    )
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)
    assert ours.chosen_logps.mean().item() == pytest.approx(trl_metrics["logps/chosen"], abs=1e-4)
    assert ours.rejected_logps.mean().item() == pytest.approx(trl_metrics["logps/rejected"], abs=1e-4)
    rewards_chosen = beta * (ours.chosen_logps - ref.chosen_logps)
    assert rewards_chosen.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], abs=1e-5)
    logits_chosen = ours.chosen_logits_sum.sum() / ours.chosen_lengths.sum()
    assert logits_chosen.item() == pytest.approx(trl_metrics["logits/chosen"], abs=1e-4)
