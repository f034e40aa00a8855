"""DPOConfig as TRL's scripts and transformers' callbacks see it: dataclass fields, TrlParser flags, every TRL 1.16
field, model_init_kwargs, and the TrainingArguments attributes the callbacks read. TRL and transformers are the
oracles (imported here only)."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
from unittest import mock

import pytest

from preftune.config import FIELD_POLICY, LATER, NO_OP, NOT_FLAGS, TRAINER, DPOConfig, flag_fields, load_config
from preftune.errors import ConfigError, DataError, PreftuneError

trl = pytest.importorskip("trl")
from transformers import HfArgumentParser  # noqa: E402
from trl import ModelConfig, ScriptArguments, TrlParser  # noqa: E402
from trl.scripts.utils import DatasetMixtureConfig  # noqa: E402

# The flags of the two commands in the docstring of TRL 1.16's trl/scripts/dpo.py.
DPO_SCRIPT_FULL = (
    "--dataset_name trl-lib/ultrafeedback_binarized --model_name_or_path Qwen/Qwen2-0.5B-Instruct "
    "--learning_rate 5.0e-7 --num_train_epochs 1 --per_device_train_batch_size 2 --max_steps 1000 "
    "--gradient_accumulation_steps 8 --eval_strategy steps --eval_steps 50 --output_dir Qwen2-0.5B-DPO "
    "--no_remove_unused_columns"
).split()
DPO_SCRIPT_LORA = [*DPO_SCRIPT_FULL, "--use_peft", "--lora_r", "32", "--lora_alpha", "16"]


def trl_default(spec: dataclasses.Field):
    return spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()


def dpo_script_parser() -> TrlParser:
    """The parser of trl/scripts/dpo.py with its DPOConfig replaced by preftune's."""
    return TrlParser((ScriptArguments, DPOConfig, ModelConfig, DatasetMixtureConfig))


# ---- Every field of TRL's DPOConfig ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", dataclasses.fields(trl.DPOConfig), ids=lambda spec: spec.name)
def test_every_trl_field_is_accepted_at_trl_default_and_is_a_flag(spec):
    config = DPOConfig(**{spec.name: trl_default(spec)})
    assert spec.name in flag_fields()
    assert spec.name in {f.name for f in dataclasses.fields(DPOConfig)}
    assert spec.name in FIELD_POLICY
    assert hasattr(config, spec.name)


def test_the_policy_table_has_one_entry_per_field():
    assert set(FIELD_POLICY) == set(DPOConfig.model_fields)
    assert {policy.kind for policy in FIELD_POLICY.values()} <= {"preftune", TRAINER, NO_OP, LATER}


# A value other than the default for each field that has no effect in preftune.
NO_OP_VALUES = {
    "do_predict": True, "remove_unused_columns": False, "label_names": ["labels"], "length_column_name": "n",
    "dataloader_num_workers": 4, "dataloader_pin_memory": False, "dataloader_persistent_workers": True,
    "dataloader_prefetch_factor": 2, "dataloader_multiprocessing_context": "spawn", "dataloader_in_order": False,
    "use_cache": True, "average_tokens_across_devices": False, "logging_nan_inf_filter": False,
    "log_on_each_node": False, "skip_memory_metrics": False, "prediction_loss_only": True,
    "eval_do_concat_batches": False, "eval_use_gather_object": True, "eval_accumulation_steps": 4, "hub_token": "t",
    "hub_private_repo": True, "hub_strategy": "end", "hub_always_push": True, "hub_revision": "dev", "local_rank": 3,
}  # fmt: skip


def test_no_op_values_cover_every_no_op_field():
    assert set(NO_OP_VALUES) == {name for name, policy in FIELD_POLICY.items() if policy.kind == NO_OP}


@pytest.mark.parametrize(("name", "value"), sorted(NO_OP_VALUES.items()))
def test_no_op_fields_take_other_values_of_their_type(name, value):
    assert getattr(DPOConfig(**{name: value}), name) == value
    assert "No effect in preftune" in DPOConfig.model_fields[name].description


@pytest.mark.parametrize("name", [name for name, policy in FIELD_POLICY.items() if policy.kind == LATER])
def test_not_supported_yet_messages_name_key_and_value(name):
    value = {"pad_to_multiple_of": 64, "debug": "underflow_overflow", "ddp_backend": "gloo"}.get(name, "on")
    if DPOConfig.model_fields[name].annotation is bool:
        value = True
    with pytest.raises(ConfigError) as caught:
        DPOConfig(**{name: value})
    shown = "true" if value is True else str(value)
    assert f"not supported yet: {name}={shown}" in str(caught.value)
    assert caught.value.key == name


def test_preftune_only_fields_that_collide_with_model_config_are_not_flags_but_stay_settable():
    model_config_flags = {f.name for f in dataclasses.fields(ModelConfig)}
    colliding = {name for name in DPOConfig.model_fields if name in model_config_flags} - {
        f.name for f in dataclasses.fields(trl.DPOConfig)
    }
    assert colliding and colliding <= NOT_FLAGS
    assert not NOT_FLAGS & set(flag_fields())
    config = DPOConfig(model_name_or_path="m", lora_alpha=16, lora_dropout=0.1, finetuning_type="lora")
    assert (config.model_name_or_path, config.lora_alpha, config.lora_dropout) == ("m", 16, 0.1)


def test_dataclass_functions_see_the_flags():
    assert dataclasses.is_dataclass(DPOConfig) and dataclasses.is_dataclass(DPOConfig(beta=0.3))
    as_dict = dataclasses.asdict(DPOConfig(beta=0.3))
    assert as_dict["beta"] == 0.3 and set(as_dict) == set(flag_fields())


# ---- TRL's parser ----------------------------------------------------------------------------------------------------


def test_trl_dpo_script_flags_parse_into_preftune_config():
    script, training, model, dataset = dpo_script_parser().parse_args_and_config(DPO_SCRIPT_FULL)
    assert isinstance(training, DPOConfig)
    assert script.dataset_name == "trl-lib/ultrafeedback_binarized"
    assert model.model_name_or_path == "Qwen/Qwen2-0.5B-Instruct"
    assert training.learning_rate == 5e-7 and training.num_train_epochs == 1 and training.max_steps == 1000
    assert training.per_device_train_batch_size == 2 and training.gradient_accumulation_steps == 8
    assert training.eval_strategy == "steps" and training.eval_steps == 50 and training.output_dir == "Qwen2-0.5B-DPO"
    assert training.remove_unused_columns is False
    assert training.model_name_or_path is None  # the model flag belongs to ModelConfig


def test_trl_dpo_script_lora_flags_go_to_model_config():
    _, training, model, _ = dpo_script_parser().parse_args_and_config(DPO_SCRIPT_LORA)
    assert (model.use_peft, model.lora_r, model.lora_alpha) == (True, 32, 16)
    assert training.lora_alpha is None and training.finetuning_type == "full"


def test_parsed_defaults_equal_python_defaults():
    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses([])
    assert parsed.to_dict() == DPOConfig().to_dict()


def test_flags_parse_as_trl_parses_them():
    """The same flags through TRL's DPOConfig and preftune's give the same values."""
    flags = (
        "--beta 0.25 --loss_type sigmoid sft --loss_weights 1.0 0.5 --eval_strategy steps --eval_steps 50 "
        "--lr_scheduler_type cosine --warmup_steps 0.1 --bf16 true --use_cpu --max_length 512 --dataset_num_proc 2 "
        "--gradient_checkpointing --lr_scheduler_kwargs {\"num_cycles\":0.5} --report_to none --seed 7 "
        "--logging_steps 5 --save_strategy epoch --precompute_ref_log_probs --padding_free false "
        "--truncation_mode keep_start --disable_dropout false --ld_alpha 0.5"
    ).split()
    (ours,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(flags)
    (theirs,) = HfArgumentParser(trl.DPOConfig).parse_args_into_dataclasses([*flags, "--output_dir", "o"])
    for name in ("beta", "loss_type", "loss_weights", "eval_steps", "warmup_steps", "bf16", "max_length", "seed",
                 "dataset_num_proc", "gradient_checkpointing", "lr_scheduler_kwargs", "logging_steps",
                 "precompute_ref_log_probs", "padding_free", "truncation_mode", "disable_dropout", "ld_alpha"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in ("eval_strategy", "save_strategy", "lr_scheduler_type"):
        assert getattr(ours, name) == getattr(theirs, name).value, name


def test_a_bool_flag_with_default_true_has_its_no_form():
    (config,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--no_disable_dropout", "--no-chunked-lm-head"])
    assert config.disable_dropout is False and config.chunked_lm_head is False


def test_optional_flags_parse_and_default_to_none():
    (config,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--max_tokens_per_batch", "4096"])
    assert config.max_tokens_per_batch == 4096 and config.precompute_ref_batch_size is None


def test_fsdp_flag_alone_means_full_shard_as_in_transformers():
    (bare,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--fsdp"])
    (named,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--fsdp", "shard_grad_op auto_wrap"])
    assert bare.fsdp == "full_shard" and named.fsdp == "shard_grad_op auto_wrap"


def test_a_bad_value_from_a_flag_is_one_config_error_naming_the_key():
    with pytest.raises(ConfigError) as caught:
        HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--beta", "-1"])
    assert caught.value.key == "beta" and "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_trl_config_file_sets_values_and_flags_override_it(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text("beta: 0.3\nlearning_rate: 2.0e-6\nsave_strategy: epoch\nloss_type: [ipo]\nenv:\n  X_PREFTUNE_TEST: 1\n")
    with mock.patch.dict("os.environ"):
        _, training, _, _ = dpo_script_parser().parse_args_and_config(
            ["--config", str(path), "--eval_strategy", "steps", "--eval_steps", "50", "--learning_rate", "3e-6"]
        )
    assert training.beta == 0.3 and training.loss_type == "ipo" and training.save_strategy == "epoch"
    assert training.learning_rate == 3e-6 and training.eval_steps == 50


def test_help_text_comes_from_the_descriptions(capsys):
    with pytest.raises(SystemExit):
        dpo_script_parser().parse_args_and_config(["--help"])
    text = capsys.readouterr().out
    assert "--beta" in text and "implicit KL penalty" in text and "--no_remove_unused_columns" in text
    assert "--keep_freed_cpu_memory" in text  # its description holds a "%"


# ---- What trl/scripts/dpo.py does after parsing ----------------------------------------------------------------------


def test_model_init_kwargs_set_as_the_dpo_script_sets_them():
    _, training, model, _ = dpo_script_parser().parse_args_and_config([*DPO_SCRIPT_FULL, "--dtype", "bfloat16"])
    model_init_kwargs = dict(
        revision=model.model_revision,
        trust_remote_code=training.trust_remote_code,
        attn_implementation=model.attn_implementation,
        dtype=model.dtype,
    )
    if training.model_init_kwargs is not None:
        model_init_kwargs.update(training.model_init_kwargs)
    training.model_init_kwargs = model_init_kwargs
    import torch

    kwargs = training.from_pretrained_kwargs()
    assert kwargs == {"revision": "main", "trust_remote_code": False, "dtype": torch.bfloat16}
    assert training.resolved_torch_dtype is torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_map": "auto", "quantization_config": {}}, "model_init_kwargs key 'quantization_config'; use quantization_bit"),
        ({"revison": "main"}, "model_init_kwargs key 'revison'"),
        ({"dtype": "bf16"}, "dtype: got bf16"),
        ({"trust_remote_code": "yes"}, "trust_remote_code: got yes"),
        ({"attn_implementation": "kernels-community/flash-attn"}, "attn_implementation: got"),
        ({"dtype": "float16", "torch_dtype": "bfloat16"}, "keep one"),
    ],
)
def test_bad_model_init_kwargs_are_refused_by_key(kwargs, message):
    with pytest.raises(ConfigError, match=message) as caught:
        DPOConfig(model_init_kwargs=kwargs)
    assert caught.value.key == "model_init_kwargs"


def test_model_init_kwargs_from_a_json_flag_and_their_conflicts_with_fields():
    (config,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--model_init_kwargs", '{"dtype": "float16", "low_cpu_mem_usage": "true", "device_map": "cpu"}']
    )
    assert config.model_init_kwargs == {"dtype": "float16", "low_cpu_mem_usage": True, "device_map": "cpu"}
    with pytest.raises(ConfigError, match="torch_dtype=bfloat16"):
        DPOConfig(torch_dtype="bfloat16", model_init_kwargs={"dtype": "float16"})
    with pytest.raises(ConfigError, match="not valid|expected a JSON object"):
        DPOConfig(model_init_kwargs="{not json")


def test_flash_attn_and_revision_reach_from_pretrained():
    config = DPOConfig(flash_attn="sdpa", model_revision="v2", trust_remote_code=True)
    assert config.from_pretrained_kwargs() == {"attn_implementation": "sdpa", "revision": "v2", "trust_remote_code": True}
    assert DPOConfig().from_pretrained_kwargs() == {"trust_remote_code": False}


# ---- Settings the trainer implements: their resolution and checks (as transformers) --------------------------------


def test_best_model_settings_resolve_as_transformers_resolves_them():
    from transformers import TrainingArguments

    for settings in (
        {"load_best_model_at_end": True, "eval_strategy": "steps", "save_steps": 100, "eval_steps": 50},
        {"load_best_model_at_end": True, "eval_strategy": "epoch", "save_strategy": "epoch",
         "metric_for_best_model": "rewards/accuracies"},
        {"metric_for_best_model": "eval_loss"},
    ):  # fmt: skip
        ours = DPOConfig(**settings)
        theirs = TrainingArguments(output_dir="o", **settings)
        assert (ours.metric_for_best_model, ours.greater_is_better) == (
            theirs.metric_for_best_model,
            theirs.greater_is_better,
        ), settings


@pytest.mark.parametrize(
    "settings",
    [
        {"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "epoch"},
        {"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 30, "save_steps": 100},
    ],
)
def test_best_model_settings_transformers_refuses_are_refused(settings):
    from transformers import TrainingArguments

    with pytest.raises(ValueError):
        TrainingArguments(output_dir="o", **settings)
    with pytest.raises(ConfigError) as caught:
        DPOConfig(**settings)
    assert caught.value.key == "load_best_model_at_end"


def test_lr_scheduler_kwargs_are_checked_against_the_schedule():
    assert DPOConfig(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 2}).lr_scheduler_kwargs
    with pytest.raises(ConfigError, match="takes no argument 'num_cycles'; it takes lr_end, power$"):
        DPOConfig(lr_scheduler_type="polynomial", lr_scheduler_kwargs={"num_cycles": 2})


def test_gradient_checkpointing_kwargs_and_the_new_activation_names():
    config = DPOConfig(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    assert config.gradient_checkpointing is True and config.gradient_checkpointing_kwargs == {"use_reentrant": False}
    config.gradient_checkpointing = False
    assert config.activation_checkpointing is False
    with pytest.raises(ConfigError, match="unknown argument 'reentrant'"):
        DPOConfig(gradient_checkpointing_kwargs={"reentrant": False})
    with pytest.raises(ConfigError, match="keep activation_checkpointing"):
        DPOConfig(gradient_checkpointing=True, activation_checkpointing=False)


def test_strategies_and_tokens_seen_read_yaml_and_transformers_spellings():
    from transformers.trainer_utils import IntervalStrategy

    config = DPOConfig(eval_strategy=False, save_strategy=False, logging_strategy=IntervalStrategy.EPOCH,
                       include_num_input_tokens_seen=True)  # fmt: skip
    assert (config.eval_strategy, config.save_strategy, config.logging_strategy) == ("no", "no", "epoch")
    assert config.include_num_input_tokens_seen == "all"
    assert DPOConfig(torch_compile_mode="reduce-overhead").torch_compile is True


def test_trackers_are_named_in_a_list_and_hub_tokens_never_reach_to_dict():
    config = DPOConfig(report_to="wandb,tensorboard", hub_token="hf_secret")
    assert config.report_to == ["wandb", "tensorboard"]
    assert "hf_secret" not in config.to_json_string() and config.to_dict()["hub_token"] == "<HUB_TOKEN>"


# ---- ConfigError and DataError are ValueErrors (TRL users catch ValueError) -----------------------------------------


def test_preftune_errors_are_value_errors_and_preftune_errors():
    for error in (ConfigError("x", key="beta"), DataError("y", file="f")):
        assert isinstance(error, ValueError) and isinstance(error, PreftuneError)
    with pytest.raises(ValueError):
        DPOConfig(beta="high")


# ---- transformers' callbacks given a preftune config -----------------------------------------------------------------


def _callback_events(callback, config: DPOConfig) -> None:
    from transformers import TrainerControl, TrainerState

    state = TrainerState(max_steps=10, logging_steps=1, eval_steps=2, save_steps=5, is_world_process_zero=True,
                         is_local_process_zero=True)  # fmt: skip
    control = TrainerControl()
    callback.on_init_end(config, state, control)
    callback.on_train_begin(config, state, control)
    state.global_step = 1
    state.epoch = 0.1
    callback.on_step_end(config, state, control)
    callback.on_log(config, state, control, logs={"loss": 0.69, "rewards/accuracies": 0.5})
    callback.on_evaluate(config, state, control, metrics={"eval_loss": 0.6, "eval_rewards/accuracies": 0.7})
    callback.on_train_end(config, state, control)


def _fake_module(name: str, **attributes) -> types.ModuleType:
    module = mock.MagicMock(name=name)
    for key, value in attributes.items():
        setattr(module, key, value)
    module.__spec__ = mock.MagicMock()
    return module


def test_progress_printer_and_flow_callbacks_run_with_a_preftune_config(capsys):
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    config = DPOConfig(eval_strategy="steps", eval_steps=2, logging_steps=1, save_steps=5)
    for callback in (ProgressCallback(), PrinterCallback(), DefaultFlowCallback()):
        _callback_events(callback, config)


def test_early_stopping_callback_reads_the_best_model_settings():
    from transformers import EarlyStoppingCallback, TrainerControl, TrainerState

    config = DPOConfig(load_best_model_at_end=True, eval_strategy="steps", eval_steps=2, save_steps=4)
    callback = EarlyStoppingCallback(early_stopping_patience=1)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(config, state, control)
    state.best_metric = 0.5
    callback.on_evaluate(config, state, control, metrics={"eval_loss": 0.6})
    assert control.should_training_stop  # loss rose (greater_is_better False) with patience 1
    with pytest.raises(AssertionError):  # transformers' own check: the callback needs load_best_model_at_end
        EarlyStoppingCallback().on_train_begin(DPOConfig(), TrainerState(), TrainerControl())


def test_tensorboard_callback_logs_the_config_and_metrics(monkeypatch, tmp_path):
    from transformers.integrations import integration_utils

    writers = []

    class SummaryWriter:
        def __init__(self, log_dir=None):
            self.log_dir, self.texts, self.scalars = log_dir, {}, {}
            writers.append(self)

        def add_text(self, name, text):
            self.texts[name] = text

        def add_scalar(self, name, value, step):
            self.scalars[name] = (value, step)

        def add_hparams(self, *args, **kwargs):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    config = DPOConfig(output_dir=str(tmp_path), beta=0.3)
    callback = integration_utils.TensorBoardCallback()
    callback._SummaryWriter = SummaryWriter  # the recording writer, whether or not tensorboard is installed
    callback.logging_dir = config.resolved_logging_dir()
    _callback_events(callback, config)
    writer = writers[0]
    assert writer.log_dir.startswith(str(tmp_path / "runs"))
    assert json.loads(writer.texts["args"])["beta"] == 0.3
    assert writer.scalars["train/loss"] == (0.69, 1)
    assert config.resolved_logging_dir() == writer.log_dir  # computed once


@pytest.mark.parametrize(
    ("module_name", "callback_name", "available", "attributes"),
    [
        ("wandb", "WandbCallback", "is_wandb_available", {}),
        ("mlflow", "MLflowCallback", "is_mlflow_available", {"__version__": "2.9.0"}),
        ("trackio", "TrackioCallback", "is_trackio_available", {"__version__": "0.5.0"}),
    ],
)
def test_tracker_callbacks_get_the_config_as_hyperparameters(monkeypatch, module_name, callback_name, available,
                                                             attributes):  # fmt: skip
    from transformers.integrations import integration_utils

    fake = _fake_module(module_name, **attributes)
    monkeypatch.setitem(sys.modules, module_name, fake)
    if module_name == "wandb":  # the callback imports wandb.sdk.lib.config_util.ConfigError
        for sub in ("sdk", "sdk.lib", "sdk.lib.config_util"):
            monkeypatch.setitem(sys.modules, f"wandb.{sub}", getattr(fake, sub.split(".")[-1]))
        fake.sdk.lib.config_util.ConfigError = type("WandbConfigError", (Exception,), {})
    if module_name == "mlflow":
        fake.utils.validation.MAX_PARAM_VAL_LENGTH = 6000
        fake.utils.validation.MAX_PARAMS_TAGS_PER_BATCH = 100
    monkeypatch.setattr(integration_utils, available, lambda: True)
    config = DPOConfig(beta=0.3, run_name="run-1", report_to=module_name if module_name != "trackio" else "trackio")
    callback = getattr(integration_utils, callback_name)()
    _callback_events(callback, config)
    logged = json.dumps([str(call) for call in fake.mock_calls])
    assert "run-1" in logged and "0.3" in logged


def test_process_helpers_follow_the_launcher_environment(monkeypatch):
    config = DPOConfig(log_level="info", log_level_replica="error")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (config.process_index, config.local_process_index, config.world_size) == (0, 0, 1)
    assert config.should_log and config.should_save and config.get_process_log_level() == logging.INFO
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (config.process_index, config.local_process_index, config.world_size) == (3, 1, 4)
    assert not config.should_log and not config.should_save and config.get_process_log_level() == logging.ERROR
    sanitized = config.to_sanitized_dict()
    assert sanitized["train_batch_size"] == 8 and all(type(v) in (bool, int, float, str) for v in sanitized.values())


def test_a_summary_config_loads_back(tmp_path):
    config = DPOConfig(report_to=["tensorboard"], load_best_model_at_end=True, eval_strategy="steps", eval_steps=50,
                       save_steps=100, activation_checkpointing=True, hub_token="t")  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config.to_dict()))
    again = load_config(path)
    assert again.to_dict() == config.to_dict()
