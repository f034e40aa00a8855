"""Reference strategies inside the trainer on stories260K: precomputed log-probs (same trajectory, cache reuse),
LoRA with the adapter-disabled reference (LLaMA-Factory YAML), merged export, TR-DPO."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune import DPOTrainer
from preftune.config import load_config
from preftune.errors import ConfigError

from test_training import STORY_PAIRS, make_config

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("PREFTUNE_CACHE", str(path))
    return path

def _losses(trainer) -> list[float]:
    return [record["loss"] for record in trainer.recorder.train_records]

def test_precomputed_reference_gives_the_on_the_fly_trajectory_and_holds_no_reference(stories_model_dir, tmp_path, cache_dir):
    settings = dict(max_steps=4, per_device_train_batch_size=4, adam_epsilon=1.0, eval_strategy="steps", eval_steps=2)
    live = DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path / "live", **settings),
                      train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:4])
    live.train()
    pre = DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path / "pre", precompute_ref_log_probs=True, **settings),
                     train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:4])
    assert pre.reference.model is None  # no reference model kept
    assert pre.data.report["train"]["reference_logps"]["reused"] is False
    pre.train()
    assert _losses(pre) == pytest.approx(_losses(live), rel=1e-5, abs=1e-6)
    live_eval = [r["eval_loss"] for r in live.recorder.eval_records]
    assert [r["eval_loss"] for r in pre.recorder.eval_records] == pytest.approx(live_eval, rel=1e-5)
    for (name, a), (_, b) in zip(live.model.named_parameters(), pre.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

def test_precompute_cache_is_reused_and_missed_after_a_data_change(stories_model_dir, tmp_path, cache_dir):
    def build(rows, name, **overrides):
        args = make_config(tmp_path / name, precompute_ref_log_probs=True, **overrides)
        return DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=rows)

    first = build(STORY_PAIRS, "a", overwrite_cache=False)
    again = build(STORY_PAIRS, "b", overwrite_cache=False)
    assert first.data.report["train"]["reference_logps"]["reused"] is False
    assert again.data.report["train"]["reference_logps"]["reused"] is True
    changed = [dict(row) for row in STORY_PAIRS]
    changed[3]["rejected"] = " A different ending."
    other = build(changed, "c", overwrite_cache=False)
    assert other.data.report["train"]["reference_logps"]["reused"] is False
    shorter = build(STORY_PAIRS, "d", overwrite_cache=False, max_length=12)
    assert shorter.data.report["train"]["reference_logps"]["reused"] is False

LLAMA_FACTORY_LORA_YAML = """\
model_name_or_path: {model}
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 64
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid
dataset: dpo_en_demo
dataset_dir: {dataset_dir}
cutoff_len: 256
max_samples: 24
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
max_steps: 3
learning_rate: 1.0e-3
logging_steps: 1
save_strategy: "no"
output_dir: {output}
overwrite_cache: true
"""

def test_lora_on_the_llama_factory_yaml_trains_and_the_adapter_and_merged_model_reload(stories_model_dir, tmp_path):
    from peft import PeftModel

    from conftest import shared_asset
    from preftune.cli import main
    from preftune.reference import AdapterDisabledReference

    output = tmp_path / "lora"
    config_file = tmp_path / "lora.yaml"
    config_file.write_text(
        LLAMA_FACTORY_LORA_YAML.format(model=stories_model_dir, dataset_dir=shared_asset("llamafactory"), output=output)
    )
    trainer = DPOTrainer(args=load_config(config_file))
    assert isinstance(trainer.reference, AdapterDisabledReference)
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    assert len(trainer.recorder.train_records) == 3
    for name, value in trainer.model.named_parameters():  # the base (= the reference) never moves
        if "lora_" not in name:
            assert torch.equal(value, base_before[name]), name
    assert (output / "adapter_model.safetensors").exists() and (output / "adapter_config.json").exists()

    base = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    reloaded = PeftModel.from_pretrained(base, output).eval()
    merged_dir = tmp_path / "merged"
    assert main(["export", str(output), str(merged_dir), "--base-model", str(stories_model_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits)  # the adapter did something

def test_tr_dpo_hard_sync_makes_the_reference_the_policy(stories_model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0)
    trainer = DPOTrainer(model=str(stories_model_dir), args=args, train_dataset=STORY_PAIRS)
    trainer.train()
    for (name, ref), (_, policy) in zip(trainer.reference.model.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(ref, policy), name
    # the second step ran against the synced reference: its rewards start from zero margins again
    assert trainer.recorder.train_records[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)

def test_a_reference_with_another_vocabulary_is_refused(stories_model_dir, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(stories_model_dir)
    config.vocab_size = config.vocab_size + 8
    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ConfigError) as info:
        DPOTrainer(model=str(stories_model_dir), ref_model=other, args=make_config(tmp_path), train_dataset=STORY_PAIRS)
    assert info.value.key == "ref_model"


def test_training_an_already_trained_adapter_uses_a_frozen_copy_of_it_as_reference(stories_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from preftune.reference import AdapterCopyReference

    base = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    sft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # an adapter that is not at its initial (zero) state: a trained SFT adapter
        for name, parameter in sft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    sft.save_pretrained(tmp_path / "sft")
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stories_model_dir), tmp_path / "sft", is_trainable=True)
    trainer = DPOTrainer(model=policy, args=make_config(tmp_path / "dpo", max_steps=2), train_dataset=STORY_PAIRS)
    assert isinstance(trainer.reference, AdapterCopyReference)
    trainer.train()
    first = trainer.recorder.train_records[0]
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # reference = the SFT adapter, not the bare base
    saved = sorted(path.name for path in (tmp_path / "dpo" / "run").iterdir())
    assert "adapter_model.safetensors" in saved and "ref" not in saved  # only the trained adapter is saved
