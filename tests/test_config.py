"""Specification of the config schema: YAML files, overrides and the Python API all give one DPOConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from preftune.config import (
    LATER_LR_SCHEDULERS,
    SUPPORTED_LOSS_TYPES,
    SUPPORTED_LR_SCHEDULERS,
    DPOConfig,
    config_table_markdown,
    interval_to_steps,
    load_config,
    parse_overrides,
)
from preftune.errors import ConfigError

LLAMA_FACTORY_YAML = """\
model_name_or_path: /some/dir
stage: dpo
do_train: true
finetuning_type: full
pref_beta: 0.1
pref_loss: sigmoid
dataset: dpo_en_demo
dataset_dir: /some/data
template: qwen
cutoff_len: 1024
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
num_train_epochs: 2.0
learning_rate: 5.0e-6
bf16: true
output_dir: saves/demo/dpo
"""

LLAMA_FACTORY_EXTRAS = """\
preprocessing_num_workers: 16
dataloader_num_workers: 4
overwrite_cache: true
overwrite_output_dir: true
plot_loss: true
report_to: none
logging_steps: 10
save_steps: 500
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
save_only_model: false
trust_remote_code: true
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
pref_ftx: 0
"""

# Keys of features not implemented yet, each with a value that turns the feature on.
NOT_SUPPORTED_YET = {
    "pref_bco_weight": 0.5,
    "pad_to_multiple_of": 8,
    "pad_token": "<pad>",
    "max_prompt_length": 512,
    "max_completion_length": 512,
    "train_sampling_strategy": "sequential",
    "label_smoothing_factor": 0.1,
    "optim_args": "amsgrad=true",
    "optim_target_modules": ["q_proj"],
    "bf16_full_eval": True,
    "fp16_full_eval": True,
    "auto_find_batch_size": True,
    "use_liger_kernel": True,
    "liger_kernel_config": {"rope": True},
    "neftune_noise_alpha": 5.0,
    "trackio_space_id": "me/space",
    "trackio_bucket_id": "bucket",
    "trackio_static_space_id": "me/static",
    "include_for_metrics": ["inputs"],
    "batch_eval_metrics": True,
    "save_on_each_node": True,
    "enable_jit_checkpoint": True,
    "ignore_data_skip": True,
    "restore_callback_states_from_checkpoint": True,
    "push_to_hub": True,
    "hub_model_id": "me/model",
    "ddp_backend": "gloo",
    "fsdp_config": {"min_num_params": 1000},
    "accelerator_config": {"split_batches": True},
    "parallelism_config": "tp=2",
    "debug": "underflow_overflow",
}


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- YAML ------------------------------------------------------------------------------------------------------------


def test_llama_factory_yaml_loads_with_canonical_names(tmp_path):
    config = load_config(write(tmp_path, LLAMA_FACTORY_YAML))
    assert config.model_name_or_path == "/some/dir"
    assert config.stage == "dpo"
    assert config.do_train is True
    assert config.finetuning_type == "full"
    assert config.beta == 0.1
    assert config.loss_type == "sigmoid"
    assert config.dataset == "dpo_en_demo"
    assert config.dataset_dir == "/some/data"
    assert config.template == "qwen"
    assert config.max_length == 1024
    assert config.per_device_train_batch_size == 1
    assert config.gradient_accumulation_steps == 16
    assert config.num_train_epochs == 2.0
    assert config.learning_rate == 5e-6
    assert config.bf16 is True
    assert config.output_dir == "saves/demo/dpo"  # relative paths are kept as given


def test_llama_factory_extra_keys_load(tmp_path):
    config = load_config(write(tmp_path, LLAMA_FACTORY_YAML + LLAMA_FACTORY_EXTRAS))
    assert config.dataset_num_proc == 16
    assert config.dataloader_num_workers == 4
    assert config.overwrite_cache is True
    assert config.report_to == "none"
    assert config.lr_scheduler_type == "cosine"
    assert config.warmup_ratio == 0.1
    assert config.ddp_timeout == 180000000
    assert config.trust_remote_code is True
    assert config.val_size == 0.1
    assert config.eval_strategy == "steps"
    assert config.eval_steps == 500
    assert config.rpo_alpha is None  # LLaMA-Factory's pref_ftx: 0 means no SFT term


def test_yaml_1_1_exponent_without_dot_is_read_as_a_float(tmp_path):
    # yaml.safe_load gives the *string* "5e-6" here (YAML 1.1); the schema must still read a float.
    config = load_config(write(tmp_path, "learning_rate: 5e-6\nbeta: 1e-1\n"))
    assert config.learning_rate == pytest.approx(5e-6)
    assert isinstance(config.learning_rate, float)
    assert config.beta == pytest.approx(0.1)


def test_the_config_file_is_recorded_but_not_dumped(tmp_path):
    path = write(tmp_path, "beta: 0.2\n")
    config = load_config(path)
    assert config.config_file == str(path)
    assert "config_file" not in config.to_dict() and "_config_file" not in config.to_dict()


def test_an_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")).to_dict() == DPOConfig().to_dict()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- beta\n- 0.1\n", "expected a mapping"),
        ("beta: [0.1\n", "YAML syntax error at line"),
        ("beta: 0.1\nbeta: 0.2\n", "key given twice (line 2)"),
        ("beta: \x1f\n", "YAML syntax error"),
    ],
)
def test_malformed_files_raise_config_error_naming_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value)
    assert f"file {path}" in str(caught.value)
    assert caught.value.file == str(path)


def test_a_missing_file_raises_config_error(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="not found") as caught:
        load_config(path)
    assert caught.value.file == str(path)


def test_a_non_string_key_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not a string"):
        load_config(write(tmp_path, "1: 2\n"))


# ---- Overrides -------------------------------------------------------------------------------------------------------


def test_parse_overrides_reads_values_as_yaml():
    assert parse_overrides(["beta=0.2", "bf16=true", "lora_target=[q_proj,v_proj]", "run_name=a=b", "template="]) == {
        "beta": 0.2,
        "bf16": True,
        "lora_target": ["q_proj", "v_proj"],
        "run_name": "a=b",
        "template": None,
    }


@pytest.mark.parametrize("item", ["beta", "=0.2", "beta=[0.1"])
def test_malformed_overrides_raise_config_error(item):
    with pytest.raises(ConfigError):
        parse_overrides([item])


def test_overrides_change_values_and_types(tmp_path):
    path = write(tmp_path, LLAMA_FACTORY_YAML)
    config = load_config(path, ["learning_rate=1e-5", "bf16=false", "max_steps=20", "save_strategy=epoch"])
    assert config.learning_rate == pytest.approx(1e-5)
    assert config.bf16 is False
    assert config.max_steps == 20 and isinstance(config.max_steps, int)
    assert config.save_strategy == "epoch"
    assert config.beta == 0.1  # untouched keys keep the file's values


def test_an_override_replaces_the_same_setting_given_under_another_name(tmp_path):
    path = write(tmp_path, LLAMA_FACTORY_YAML)  # pref_beta: 0.1, cutoff_len: 1024
    config = load_config(path, ["beta=0.3", "max_length=256"])
    assert config.beta == 0.3
    assert config.max_length == 256


def test_an_unknown_override_key_is_reported_as_from_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "beta: 0.1\n"), ["lerning_rate=1e-5"])
    message = str(caught.value)
    assert "command-line" in message and "did you mean 'learning_rate'" in message


def test_a_bad_override_value_is_reported_as_from_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "beta: 0.1\n"), ["beta=high"])
    assert "command-line" in str(caught.value) and "'high'" in str(caught.value)
    assert caught.value.key == "beta"


# ---- Aliases, conflicts, unknown keys, wrong types -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "name", "value"),
    [
        ("pref_beta", "beta", 0.25),
        ("pref_loss", "loss_type", "hinge"),
        ("cutoff_len", "max_length", 512),
        ("ref_model", "ref_model_name_or_path", "ref/dir"),
        ("dtype", "torch_dtype", "bfloat16"),
        ("preprocessing_num_workers", "dataset_num_proc", 4),
        ("evaluation_strategy", "eval_strategy", "epoch"),
        ("dpo_label_smoothing", "label_smoothing", 0.1),
    ],
)
def test_aliases_set_the_canonical_field(alias, name, value):
    config = DPOConfig(**{alias: value})
    assert getattr(config, name) == value
    assert config.to_dict()[name] == value
    assert alias not in config.to_dict()


def test_giving_a_name_and_its_alias_is_an_error_naming_both(tmp_path):
    path = write(tmp_path, "beta: 0.1\npref_beta: 0.2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "'beta'" in message and "'pref_beta'" in message and f"file {path}" in message


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path):
    path = write(tmp_path, "betta: 0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"file {path}, key 'betta': unknown key; did you mean 'beta'?"
    assert caught.value.key == "betta"


def test_unknown_key_suggestion_includes_aliases(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'cutoff_len'"):
        load_config(write(tmp_path, "cutof_len: 512\n"))


def test_wrong_type_names_key_file_value_and_expected_type(tmp_path):
    path = write(tmp_path, "per_device_train_batch_size: two\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"file {path}" in message
    assert "key 'per_device_train_batch_size'" in message
    assert "'two'" in message
    assert "expected int >= 1" in message


def test_wrong_type_under_an_alias_names_the_alias(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "pref_beta: strong\n"))
    assert caught.value.key == "pref_beta"
    assert "expected float > 0" in str(caught.value)


def test_a_bool_is_not_accepted_as_a_number():
    # pydantic would read True as 1; a YAML `cutoff_len: yes` is a mistake, not a length of 1.
    with pytest.raises(ConfigError, match="expected int >= 1 or null"):
        DPOConfig(max_length=True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta", 0),
        ("beta", float("nan")),
        ("label_smoothing", 0.5),
        ("learning_rate", float("inf")),
        ("logging_steps", 2.5),
        ("save_steps", 0),
        ("val_size", 1.5),
        ("loss_type", "dpo"),
        ("eval_strategy", "always"),
        ("lr_scheduler_type", "cosine_annealing"),
        ("optim", "sgd"),
        ("torch_dtype", "bf16"),
    ],
)
def test_out_of_range_or_unknown_values_are_refused(key, value):
    with pytest.raises(ConfigError) as caught:
        DPOConfig(**{key: value})
    assert caught.value.key == key


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as caught:
        DPOConfig(beta="x", seed="y")
    assert "'beta'" in str(caught.value) and "'seed'" in str(caught.value)


# ---- Features not implemented yet ------------------------------------------------------------------------------------


def test_not_supported_yet_list_covers_every_such_field():
    later = {name for name, info in DPOConfig.model_fields.items() if "Not supported yet" in (info.description or "")}
    assert later == set(NOT_SUPPORTED_YET)


@pytest.mark.parametrize("key", sorted(NOT_SUPPORTED_YET))
def test_not_supported_yet_keys_pass_at_their_default(key, tmp_path):
    default = DPOConfig.model_fields[key].default
    assert getattr(DPOConfig(**{key: default}), key) == default
    assert getattr(load_config(write(tmp_path, json.dumps({key: default}))), key) == default


@pytest.mark.parametrize(("key", "value"), sorted(NOT_SUPPORTED_YET.items()))
def test_not_supported_yet_keys_fail_at_other_values(key, value):
    with pytest.raises(ConfigError, match=f"not supported yet: {key}"):
        DPOConfig(**{key: value})


def test_max_prompt_length_points_to_max_length():
    with pytest.raises(ConfigError, match="use max_length"):
        DPOConfig(max_prompt_length=128)


@pytest.mark.parametrize("value", [0, 0.0, None])
def test_pref_ftx_zero_means_off(value):
    assert DPOConfig(pref_ftx=value).rpo_alpha is None


def test_off_values_of_other_spellings_are_accepted():
    config = DPOConfig(fsdp="", pad_to_multiple_of="auto", lr_scheduler_kwargs={}, report_to=[])
    assert config.report_to == "none"


@pytest.mark.parametrize("value", ["comet_ml", ["swanlab"], ["wandb", "neptune"]])
def test_untested_experiment_trackers_are_not_supported_yet(value):
    with pytest.raises(ConfigError, match="not supported yet: report_to"):
        DPOConfig(report_to=value)


def test_report_to_all_means_the_installed_trackers(monkeypatch):
    import importlib.util

    installed = {"wandb", "trackio"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: real("json") if name in installed else None)
    assert DPOConfig(report_to="all").report_to == ["wandb", "trackio"]
    installed.clear()
    assert DPOConfig(report_to="all").report_to == "none"


def test_kto_pair_is_not_supported_yet():
    with pytest.raises(ConfigError, match="not supported yet: loss_type=kto_pair"):
        DPOConfig(loss_type="kto_pair")


def test_every_loss_name_the_config_accepts_is_registered_in_losses():
    from preftune.losses import LOSSES

    assert set(SUPPORTED_LOSS_TYPES) == set(LOSSES)


def test_unknown_loss_names_the_closest_one():
    with pytest.raises(ConfigError, match="unknown loss 'simpoo' \\(did you mean simpo\\?\\)") as info:
        DPOConfig(loss_type="simpoo")
    assert info.value.key == "loss_type"


def test_trl_style_one_element_loss_list_becomes_a_string_and_longer_lists_stay_lists():
    assert DPOConfig(loss_type=["ipo"]).loss_type == "ipo"
    assert DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2]).loss_type == ["sigmoid", "sft"]


@pytest.mark.parametrize(
    ("settings", "key", "message"),
    [
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights", "loss_weights"),
        ({"loss_type": "exo_pair"}, "label_smoothing", "exo_pair"),
        ({"loss_type": "orpo", "ref_model_name_or_path": "some/model"}, "ref_model_name_or_path", "no reference"),
        ({"loss_type": ["kto", "sigmoid"]}, "loss_type", "kto"),
        ({"stage": "kto", "loss_type": "ipo"}, "loss_type", "stage kto"),
        ({"loss_type": []}, "loss_type", "empty list"),
    ],
)
def test_bad_loss_settings_name_the_key(settings, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        DPOConfig(**settings)
    assert info.value.key == key


def test_bad_loss_settings_in_a_yaml_file_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pref_loss: exo_pair\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path) and info.value.key == "label_smoothing"


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "pt"])
def test_other_llama_factory_stages_are_refused(stage):
    with pytest.raises(ConfigError, match="stages dpo and kto only"):
        DPOConfig(stage=stage)


def test_kto_stage_selects_the_kto_loss():
    assert DPOConfig(stage="kto").loss_type == "kto"
    assert DPOConfig(stage="kto", kto_chosen_weight=2.0).desirable_weight == 2.0


def test_pref_ftx_zero_means_no_nll_term():
    assert DPOConfig(pref_ftx=0).rpo_alpha is None
    assert DPOConfig(pref_ftx=0.5).rpo_alpha == 0.5


def test_freeze_is_not_supported_yet_and_lora_is():
    with pytest.raises(ConfigError, match="not supported yet: finetuning_type=freeze"):
        DPOConfig(finetuning_type="freeze")
    assert DPOConfig(finetuning_type="lora", lora_rank=64, lora_target="all").lora_rank == 64


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"loss_type": "kto", "precompute_ref_log_probs": True}, "precompute_ref_log_probs"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "sync_ref_model"),
        ({"sync_ref_model": True, "finetuning_type": "lora"}, "sync_ref_model"),
        ({"sync_ref_model": True, "loss_type": "simpo"}, "sync_ref_model"),
    ],
)
def test_reference_settings_that_cannot_work_together_name_the_key(settings, key):
    with pytest.raises(ConfigError) as info:
        DPOConfig(**settings)
    assert info.value.key == key


def test_lora_settings_with_full_finetuning_only_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="preftune.config"):
        config = DPOConfig(lora_rank=16, lora_target=["q_proj"])
    assert config.lora_rank == 16
    assert "lora_rank" in caplog.text and "lora_target" in caplog.text and "ignored" in caplog.text


# ---- Combinations ----------------------------------------------------------------------------------------------------


def test_fp16_and_bf16_together_are_refused():
    with pytest.raises(ConfigError, match="fp16 and bf16"):
        DPOConfig(fp16=True, bf16=True)


def test_fp16_alone_is_allowed_by_the_schema():
    assert DPOConfig(fp16=True).fp16 is True


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="nothing to train"):
        DPOConfig(max_steps=0, num_train_epochs=0)
    assert DPOConfig(max_steps=5, num_train_epochs=0).max_steps == 5


def test_evaluation_without_an_eval_set_is_left_to_the_trainer():
    assert DPOConfig(eval_strategy="steps").eval_strategy == "steps"


# ---- Python API ------------------------------------------------------------------------------------------------------


def test_trl_style_keyword_arguments_work():
    config = DPOConfig(
        output_dir="out",
        beta=0.1,
        loss_type="sigmoid",
        save_strategy="epoch",
        bf16=True,
        warmup_ratio=0.1,
        logging_steps=10,
        learning_rate=5e-7,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_length=512,
        remove_unused_columns=False,
    )
    assert (config.output_dir, config.save_strategy, config.bf16) == ("out", "epoch", True)
    assert (config.warmup_ratio, config.logging_steps, config.learning_rate) == (0.1, 10, 5e-7)


def test_unknown_python_keyword_raises_config_error_with_suggestion():
    with pytest.raises(ConfigError) as caught:
        DPOConfig(output_dir="out", learning_rte=1e-6)
    assert str(caught.value) == "key 'learning_rte': unknown key; did you mean 'learning_rate'?"


def test_assignment_is_validated():
    config = DPOConfig()
    config.beta = 0.5
    assert config.beta == 0.5
    with pytest.raises(ConfigError, match="key 'beta'"):
        config.beta = -1.0
    with pytest.raises(ConfigError, match="not supported yet: push_to_hub"):
        config.push_to_hub = True


def test_torch_dtype_objects_are_accepted_and_resolved():
    import torch

    config = DPOConfig(torch_dtype=torch.bfloat16)
    assert config.torch_dtype == "bfloat16"
    assert config.resolved_torch_dtype is torch.bfloat16
    assert DPOConfig(torch_dtype="auto").resolved_torch_dtype == "auto"
    assert DPOConfig().resolved_torch_dtype is None


def test_to_dict_is_json_and_round_trips():
    config = DPOConfig(output_dir="o", beta=0.3, lora_target=["q_proj"], eval_steps=0.25, report_to=["none"])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["beta"] == 0.3 and data["report_to"] == "none" and data["lora_target"] == ["q_proj"]
    assert not set(NOT_SUPPORTED_YET) & set(data)
    assert DPOConfig(**data) == config


# ---- Derived values --------------------------------------------------------------------------------------------------


def test_eval_steps_fall_back_to_logging_steps():
    assert DPOConfig(logging_steps=7).resolved_eval_steps == 7
    assert DPOConfig(logging_steps=7, eval_steps=3).resolved_eval_steps == 3


@pytest.mark.parametrize(("value", "total", "expected"), [(10, 1000, 10), (0.1, 95, 10), (0.001, 50, 1), (1, 3, 1)])
def test_interval_to_steps_reads_whole_numbers_and_fractions(value, total, expected):
    assert interval_to_steps(value, total) == expected


def test_warmup_steps_override_warmup_ratio():
    assert DPOConfig(warmup_ratio=0.1).resolved_warmup_steps(95) == math.ceil(9.5)
    assert DPOConfig(warmup_ratio=0.1, warmup_steps=3).resolved_warmup_steps(95) == 3
    assert DPOConfig(warmup_steps=0.5).resolved_warmup_steps(10) == 5


# ---- Consistency with TRL, transformers and the README ---------------------------------------------------------------


def test_defaults_match_trl_where_preftune_follows_it():
    from trl import DPOConfig as TRLDPOConfig

    trl_fields = {f.name: f for f in dataclasses.fields(TRLDPOConfig)}
    # Differences are deliberate and documented in the field descriptions.
    different = {
        "loss_type", "bf16", "gradient_checkpointing", "optim", "output_dir", "pad_to_multiple_of", "fsdp", "do_train",
        "padding_free",  # preftune: auto (on where supported); TRL: off
    }  # fmt: skip
    compared = 0
    for name, info in DPOConfig.model_fields.items():
        if name in different or name not in trl_fields:
            continue
        trl_field = trl_fields[name]
        trl_default = (
            trl_field.default if trl_field.default is not dataclasses.MISSING else trl_field.default_factory()
        )
        assert info.default == trl_default, name
        compared += 1
    assert compared >= 40
    assert trl_fields["loss_type"].default_factory() == [DPOConfig().loss_type]


def test_scheduler_lists_cover_transformers_scheduler_types():
    from transformers.trainer_utils import SchedulerType

    assert set(SUPPORTED_LR_SCHEDULERS) | set(LATER_LR_SCHEDULERS) == {s.value for s in SchedulerType}


@pytest.mark.parametrize("name", SUPPORTED_LR_SCHEDULERS)
def test_supported_schedulers_build_without_extra_arguments(name):
    import torch
    from transformers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    get_scheduler(DPOConfig(lr_scheduler_type=name).lr_scheduler_type, optimizer, 2, 10)


def test_config_table_lists_every_field_and_alias():
    table = config_table_markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    from preftune.loop_config import LoopConfig

    fields = list(DPOConfig.model_fields)
    loop_keys = [f"loop.{spec.name}" for spec in dataclasses.fields(LoopConfig)]  # rows right after `loop`
    expected = fields[: fields.index("loop") + 1] + loop_keys + fields[fields.index("loop") + 1:]
    assert [row.split("|")[1].strip().strip("`") for row in rows] == expected
    for alias in ("pref_beta", "pref_loss", "cutoff_len", "preprocessing_num_workers", "pref_ftx"):
        assert f"`{alias}`" in table
    assert all(row.count(" | ") >= 4 for row in rows)


# ---- Anything in, ConfigError or a config out ------------------------------------------------------------------------

_KNOWN_KEYS = sorted(
    set(DPOConfig.model_fields)
    | {"pref_beta", "pref_loss", "cutoff_len", "pref_ftx", "ref_model", "dtype", "evaluation_strategy"}
)
_JUNK_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["sigmoid", "hinge", "ipo", "dpo", "steps", "epoch", "no", "none", "auto", "5e-6", "full"]),
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
_KEYS = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=20))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _JUNK_VALUES, max_size=6))
def test_any_keyword_arguments_give_a_config_or_a_config_error(kwargs):
    try:
        config = DPOConfig(**kwargs)
    except ConfigError:
        return
    json.dumps(config.to_dict())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.one_of(_KEYS, st.integers(), st.booleans(), st.none()), _JUNK_VALUES, max_size=6))
def test_any_mapping_gives_a_config_or_a_config_error(mapping):
    try:
        DPOConfig.from_mapping(mapping, file="cfg.yaml")
    except ConfigError as error:
        assert error.file in ("cfg.yaml", None)


_YAML_CHARACTERS = st.sampled_from(list("abetl_: \n-[]{},&*!|>'\"#0123456789.e<?%@`\t\x1f"))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(text=st.text(_YAML_CHARACTERS, max_size=40), overrides=st.lists(st.text(max_size=10), max_size=2))
def test_any_yaml_text_and_overrides_give_a_config_or_a_config_error(tmp_path, text, overrides):
    path = write(tmp_path, text)
    try:
        load_config(path, overrides)
    except ConfigError:
        pass


def test_readme_config_table_is_generated_from_the_schema():
    from pathlib import Path

    from preftune.config import config_table_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- config-table:start -->\n") + len("<!-- config-table:start -->\n")
    end = readme.index("<!-- config-table:end -->")
    assert readme[start:end].strip() == config_table_markdown().strip(), "run `preftune config-keys` and paste it in"
