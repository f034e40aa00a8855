"""Keys from LLaMA-Factory YAMLs (and older transformers) are known: implemented under an alias, or refused by name
with what to write instead; only a key known nowhere is an "unknown key", with a useful suggestion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.config import OTHER_KNOWN_KEYS, DPOConfig, is_known_key, load_config
from preftune.errors import ConfigError

KEY_TABLE = json.loads((Path(__file__).parent / "data" / "llama_factory_keys.json").read_text(encoding="utf-8"))
PREFERENCE_EXAMPLES = {
    path: keys
    for path, keys in KEY_TABLE["examples"].items()
    if any(word in path for word in ("dpo", "kto", "orpo", "simpo"))
}

# LLaMA-Factory's examples/train_lora/qwen3_lora_dpo.yaml, as given (a key: value file is data, not code).
QWEN3_LORA_DPO = """\
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]
dataset: dpo_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4
output_dir: saves/qwen3-4b/lora/dpo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def all_table_keys() -> set[str]:
    keys = {key for group in ("examples", "hparams") for listed in KEY_TABLE[group].values() for key in listed}
    return keys | set(KEY_TABLE["transformers_4_55_training_args"])


def test_the_key_table_holds_the_preference_examples():
    assert {"examples/train_lora/qwen3_lora_dpo.yaml", "examples/train_lora/qwen3_lora_kto.yaml",
            "examples/train_lora/qwen3vl_lora_dpo.yaml", "examples/v1/train_lora/train_lora_dpo.yaml"} <= set(
        PREFERENCE_EXAMPLES)  # fmt: skip


@pytest.mark.parametrize("key", sorted(all_table_keys()))
def test_every_llama_factory_and_transformers_key_is_known(key):
    assert is_known_key(key)
    try:
        DPOConfig(**{key: "an unlikely value 值"})
    except ConfigError as error:
        assert "unknown key" not in str(error)


@pytest.mark.parametrize("path", sorted(PREFERENCE_EXAMPLES))
def test_preference_example_keys_at_their_defaults_are_never_unknown(path):
    for key in PREFERENCE_EXAMPLES[path]:
        known = OTHER_KNOWN_KEYS.get(key)
        if known is not None and known.accepted and repr(known.accepted[0]) != "any value":
            assert DPOConfig.from_mapping({key: known.accepted[0]}) is not None


def test_llama_factory_dpo_example_loads(tmp_path):
    config = load_config(write(tmp_path, QWEN3_LORA_DPO))
    assert (config.model_name_or_path, config.finetuning_type, config.lora_rank, config.beta) == (
        "Qwen/Qwen3-4B-Instruct-2507", "lora", 8, 0.1)  # fmt: skip
    assert (config.max_length, config.max_samples, config.dataset_num_proc, config.ddp_timeout) == (2048, 1000, 16,
                                                                                                    180000000)


def test_llama_factory_kto_example_loads(tmp_path):
    text = QWEN3_LORA_DPO.replace("stage: dpo", "stage: kto").replace("pref_loss: sigmoid", "").replace(
        "dpo_en_demo", "kto_en_demo")  # fmt: skip
    assert load_config(write(tmp_path, text)).loss_type == "kto"


@pytest.mark.parametrize("key", ["eval_strategy", "save_strategy", "logging_strategy"])
def test_strategy_no_is_read_although_yaml_makes_it_false(tmp_path, key):
    assert getattr(load_config(write(tmp_path, f"{key}: no\n")), key) == "no"
    assert getattr(load_config(write(tmp_path, ""), [f"{key}=no"]), key) == "no"


@pytest.mark.parametrize(("stage", "expected"), [("orpo", "stage: dpo with pref_loss: orpo"),
                                                 ("simpo", "stage: dpo with pref_loss: simpo"),
                                                 ("sft", "stages dpo and kto only"), ("rm", "stages dpo and kto only")])
def test_other_stages_say_what_to_write(tmp_path, stage, expected):
    with pytest.raises(ConfigError, match=expected) as caught:
        load_config(write(tmp_path, f"stage: {stage}\n"))
    assert caught.value.key == "stage"


@pytest.mark.parametrize(("key", "value"), [("image_do_pan_and_scan", True), ("freeze_language_model", True)])
def test_vision_keys_not_built_yet_are_not_supported_and_say_so(tmp_path, key, value):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, f"{key}: {json.dumps(value)}\n"))
    assert "not supported yet: " + key in str(caught.value)
    assert "vision-language DPO takes images only" in str(caught.value) and caught.value.key == key


def test_video_keys_load_at_any_value_as_video_columns_are_refused_anyway(tmp_path):
    """LLaMA-Factory's qwen3vl_lora_dpo.yaml sets video_max_pixels: 16384; they only act on video inputs."""
    config = load_config(write(tmp_path, "video_max_pixels: 16384\nvideo_fps: 1.0\nvideo_maxlen: 4\n"))
    assert config.beta == 0.1


@pytest.mark.parametrize(("key", "value"), [("image_max_pixels", 262144), ("image_min_pixels", 1024),
                                            ("freeze_vision_tower", False), ("freeze_multi_modal_projector", False),
                                            ("media_dir", "images/")])
def test_image_keys_are_fields(tmp_path, key, value):
    assert getattr(load_config(write(tmp_path, f"{key}: {json.dumps(value)}\n")), key) == value


def test_vision_and_other_llama_factory_keys_at_their_defaults_are_accepted(tmp_path):
    text = "freeze_vision_tower: true\nimage_max_pixels: 589824\nuse_galore: false\nenable_thinking: true\n"
    assert load_config(write(tmp_path, text)).beta == 0.1


def test_llama_factory_key_overrides_are_checked_like_file_keys(tmp_path):
    with pytest.raises(ConfigError, match="not supported yet: use_galore=true") as caught:
        load_config(write(tmp_path, "use_galore: false\n"), ["use_galore=true"])
    assert "command-line" in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "field", "value"),
    [
        ({"disable_gradient_checkpointing": True}, "gradient_checkpointing", False),
        ({"disable_gradient_checkpointing": False}, "gradient_checkpointing", True),
        ({"moe_aux_loss_coef": 0.0}, "router_aux_loss_coef", 0.0),
        ({"no_cuda": True}, "use_cpu", True),
        ({"model": "path/to/model"}, "model_name_or_path", "path/to/model"),
        ({"micro_batch_size": 2}, "per_device_train_batch_size", 2),
        ({"dist_timeout": 60}, "ddp_timeout", 60),
        ({"enable_activation_checkpointing": True}, "gradient_checkpointing", True),
    ],
)
def test_llama_factory_and_older_names_set_their_fields(settings, field, value):
    assert getattr(DPOConfig(**settings), field) == value


def test_errors_show_chinese_values_and_paths_as_written(tmp_path):
    path = write(tmp_path, "default_system: 你是一个乐于助人的助手\n", name="配置/训练.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "你是一个乐于助人的助手" in message and "配置/训练.yaml" in message and "\\u" not in message
    with pytest.raises(ConfigError, match="unknown loss '西格玛'"):
        load_config(write(tmp_path, "pref_loss: 西格玛\n"))
    with pytest.raises(ConfigError, match="not supported yet: push_to_hub=true"):
        DPOConfig(push_to_hub=True, hub_model_id="我/模型")


# ---- Suggestions for unknown keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("betta", "beta"),
        ("lr", "learning_rate"),
        ("batch_size", "per_device_train_batch_size"),
        ("lerning_rate", "learning_rate"),
        ("Beta", "beta"),
        ("learning-rate", "learning_rate"),
        ("epochs", "num_train_epochs"),
        ("model_name", "model_name_or_path"),
        ("cutof_len", "cutoff_len"),
        ("eval_stratgy", "eval_strategy"),
        ("lora_r", "lora_rank"),
        ("max_seq_length", "max_length"),
        ("gradient_accumulation", "gradient_accumulation_steps"),
        ("warmup", "warmup_steps"),
        ("save_step", "save_steps"),
        ("local_rnak", "local_rank"),
        ("ref_model_name", "ref_model_name_or_path"),
    ],
)
def test_unknown_keys_get_the_intended_suggestion(typo, suggestion):
    with pytest.raises(ConfigError) as caught:
        DPOConfig(**{typo: 1})
    assert str(caught.value).endswith(f"unknown key; did you mean '{suggestion}'?")


def test_former_wrong_suggestions_are_now_real_keys():
    assert DPOConfig(local_rank=0).local_rank == 0
    assert DPOConfig(model="m").model_name_or_path == "m"
