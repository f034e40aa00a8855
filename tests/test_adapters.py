"""LoRA adapters: configuration from arguments, attaching, saving, merging, exporting; QLoRA preconditions."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from preftune.adapters import (
    apply_lora,
    check_quantization,
    export_merged,
    is_peft_model,
    lora_config_from_args,
    merge_and_save,
    save_adapter,
)
from preftune.config import DPOConfig
from preftune.data.collate import collate_pairs
from preftune.errors import ConfigError
from preftune.logprobs import completion_logprobs

from test_logprobs import STORY_PAIRS as _STORY_PAIRS
from test_reference import load_stories, single_thread  # noqa: F401 (fixtures)

STORY_PAIRS = _STORY_PAIRS[:2]  # real story text (stories260K ids)

# Summed log-probs are ~-100 here: float32 rounding of W + (α/r)·BA alone moves them by a few 1e-5 absolute.
MERGED_TOLERANCE = {"atol": 1e-5, "rtol": 1e-6}
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture
def batch():
    return collate_pairs(STORY_PAIRS, pad_token_id=0)


@pytest.fixture
def tokenizer(stories_model_dir):
    return AutoTokenizer.from_pretrained(stories_model_dir)


def lora_args(**overrides) -> SimpleNamespace:
    values = {"lora_rank": 4, "lora_alpha": None, "lora_dropout": 0.0, "lora_target": "all"}
    return SimpleNamespace(**{**values, **overrides})


def adapted_module_kinds(model) -> set[str]:
    """Last name part of every module carrying a LoRA adapter."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


def logps_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return completion_logprobs(model.eval(), batch).logps


def train_steps(model, batch, steps: int = 3, lr: float = 0.05) -> None:
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        logps = completion_logprobs(model, batch).logps
        (logps[1] - logps[0]).sum().backward()
        optimizer.step()


@pytest.fixture
def trained_policy(load_stories, batch):
    policy = apply_lora(load_stories(), lora_config_from_args(lora_args()))
    train_steps(policy, batch)
    return policy


# ----------------------------------------------------------------------------------------------- configuration
def test_all_targets_every_linear_layer_but_the_lm_head(load_stories):
    config = lora_config_from_args(lora_args())
    assert config.target_modules == "all-linear" and config.task_type == "CAUSAL_LM"
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)  # alpha defaults to 2 × rank
    model = apply_lora(load_stories(), config)
    assert adapted_module_kinds(model) == ALL_LINEAR


@pytest.mark.parametrize("target", [["q_proj", "v_proj"], "q_proj, v_proj", "q_proj,v_proj,"])
def test_lists_and_comma_separated_names_target_those_modules(load_stories, target):
    model = apply_lora(load_stories(), lora_config_from_args(lora_args(lora_target=target, lora_alpha=3)))
    assert adapted_module_kinds(model) == {"q_proj", "v_proj"}
    assert model.peft_config["default"].lora_alpha == 3


def test_only_adapter_weights_are_trainable(load_stories):
    model = apply_lora(load_stories(), lora_config_from_args(lora_args(lora_dropout=0.1)))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * 5 * len(ALL_LINEAR)  # A and B of every linear layer in 5 blocks
    assert is_peft_model(model) and not is_peft_model(load_stories())


def test_the_configs_defaults_make_a_lora_config():
    config = lora_config_from_args(DPOConfig())
    assert config.target_modules == "all-linear" and config.lora_alpha == 2 * config.r


@pytest.mark.parametrize("target", ["", " , ", ["all", "q_proj"]])
def test_empty_or_mixed_targets_are_refused(target):
    with pytest.raises(ConfigError) as error:
        lora_config_from_args(lora_args(lora_target=target))
    assert error.value.key == "lora_target"


def test_unknown_target_modules_are_a_config_error(load_stories):
    with pytest.raises(ConfigError, match="not_a_module") as error:
        apply_lora(load_stories(), lora_config_from_args(lora_args(lora_target="not_a_module")))
    assert error.value.key == "lora_target"


def test_an_existing_adapter_is_kept_and_made_trainable(load_stories, trained_policy, tmp_path, batch):
    saved = save_adapter(trained_policy, None, tmp_path / "sft")
    frozen = PeftModel.from_pretrained(load_stories(), saved)  # is_trainable=False: everything frozen
    assert not any(p.requires_grad for p in frozen.parameters())
    model = apply_lora(frozen, LoraConfig(r=16, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert model is frozen and model.peft_config["default"].r == 4  # the new settings are not used
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if ".lora_" in name}
    torch.testing.assert_close(logps_of(model, batch), logps_of(trained_policy, batch), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- saving
def test_save_adapter_writes_safetensors_config_and_tokenizer(load_stories, trained_policy, tokenizer, tmp_path, batch):
    out = save_adapter(trained_policy, tokenizer, tmp_path / "adapter")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"]
    reloaded = PeftModel.from_pretrained(load_stories(), out)
    torch.testing.assert_close(logps_of(reloaded, batch), logps_of(trained_policy, batch), atol=1e-6, rtol=0)


def test_merge_and_save_writes_a_plain_model_and_leaves_the_live_one_trainable(trained_policy, tokenizer, tmp_path, batch):
    weights = {name: p.detach().clone() for name, p in trained_policy.named_parameters()}
    flags = {name: p.requires_grad for name, p in trained_policy.named_parameters()}
    out = merge_and_save(trained_policy, tokenizer, tmp_path / "merged")

    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not is_peft_model(merged) and not adapted_module_kinds(merged)
    torch.testing.assert_close(logps_of(merged, batch), logps_of(trained_policy, batch), **MERGED_TOLERANCE)
    assert AutoTokenizer.from_pretrained(out).vocab_size == tokenizer.vocab_size

    assert all(torch.equal(p, weights[name]) for name, p in trained_policy.named_parameters())  # bit-identical
    assert {name: p.requires_grad for name, p in trained_policy.named_parameters()} == flags
    assert adapted_module_kinds(trained_policy) == ALL_LINEAR
    before = logps_of(trained_policy, batch)
    train_steps(trained_policy, batch, steps=1)
    assert (logps_of(trained_policy, batch) - before).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------- export
@pytest.fixture
def saved_adapter(trained_policy, tokenizer, tmp_path):
    return save_adapter(trained_policy, tokenizer, tmp_path / "adapter")


def test_export_merges_the_adapter_into_the_base_named_in_its_config(saved_adapter, trained_policy, tmp_path, batch):
    out = export_merged(saved_adapter, tmp_path / "exported")
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logps_of(merged, batch), logps_of(trained_policy, batch), **MERGED_TOLERANCE)
    assert (out / "tokenizer_config.json").is_file() and not (out / "adapter_config.json").exists()


def test_export_into_a_previous_output_replaces_only_model_files(saved_adapter, stories_model_dir, tmp_path, batch):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # left from an earlier save: would make the folder an adapter
    (out / "notes.txt").write_text("mine")
    export_merged(saved_adapter, out, base_model=str(stories_model_dir), dtype="bfloat16")
    assert not (out / "adapter_config.json").exists() and (out / "notes.txt").read_text() == "mine"
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def save_tiny_llama(path, **sizes):
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=sizes.get("hidden_size", 64), intermediate_size=172,
        num_hidden_layers=sizes.get("num_hidden_layers", 5), num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "sizes, message",
    [({"hidden_size": 32}, "size mismatch"), ({"num_hidden_layers": 2}, "no module in the base"),
     ({"num_hidden_layers": 6}, "not in the adapter")],
)
def test_export_onto_another_base_is_refused_and_writes_nothing(saved_adapter, tmp_path, sizes, message):
    other_base = save_tiny_llama(tmp_path / "other_base", **sizes)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous export")
    with pytest.raises(ConfigError, match=message) as error:
        export_merged(saved_adapter, out, base_model=other_base)
    assert error.value.key == "adapter" and "other_base" in str(error.value)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "exported", "other_base"]


def test_export_errors_name_the_problem(saved_adapter, tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json") as error:
        export_merged(tmp_path, tmp_path / "out")
    assert error.value.key == "adapter"
    with pytest.raises(ConfigError) as error:
        export_merged(saved_adapter, tmp_path / "out", base_model=str(tmp_path / "no_such_base"))
    assert error.value.key == "base_model" and "no_such_base" in str(error.value)
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    (saved_adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ConfigError, match="names no base model") as error:
        export_merged(saved_adapter, tmp_path / "out")
    assert error.value.key == "base_model"
    with pytest.raises(ConfigError) as error:
        export_merged(saved_adapter, saved_adapter, base_model="x")
    assert error.value.key == "output_dir"
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- quantization
def test_quantization_needs_bitsandbytes_and_cuda(monkeypatch):
    import preftune.adapters as adapters

    check_quantization(None, "cpu")
    monkeypatch.setattr(adapters, "_bitsandbytes_installed", lambda: True)
    check_quantization(4, "cuda")
    check_quantization(8, torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="CUDA device.*cpu") as error:
        check_quantization(4, "cpu")
    assert error.value.key == "quantization_bit" and "bitsandbytes" not in error.value.message
    monkeypatch.setattr(adapters, "_bitsandbytes_installed", lambda: False)
    with pytest.raises(ConfigError, match="pip install bitsandbytes") as error:
        check_quantization(8, "cuda")
    assert "CUDA" not in error.value.message
    with pytest.raises(ConfigError, match="bitsandbytes.*and a CUDA device"):
        check_quantization(4, "mps")


@pytest.mark.parametrize("bits", [2, 3, 16, True, "4"])
def test_other_quantization_values_are_refused(bits):
    with pytest.raises(ConfigError, match="4, 8 or null") as error:
        check_quantization(bits, "cuda")
    assert error.value.key == "quantization_bit"
