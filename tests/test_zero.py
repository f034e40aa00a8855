"""DeepSpeed ZeRO (preftune.parallel.zero): the config's "auto" values and refusals, and 2 CPU processes (gloo) under
ZeRO-2 and ZeRO-3 (with optimizer and parameter offload) giving the losses, metrics and final weights of one plain
process with the same global batch."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from preftune import DPOConfig
from preftune.checkpoint import read_checkpoint
from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.parallel.deepspeed_config import read_deepspeed_config, resolve_deepspeed_config, zero_stage
from preftune.parallel.zero import start_deepspeed

from test_distributed import EXAMPLES, _assert_same_history, _assert_same_weights, _run_two_processes, _train_one_process, _write_config

ARGS = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5, bf16=False,
                       fp16=False)
# LLaMA-Factory's examples/deepspeed/ds_z3_offload_config.json, as shipped
LLAMA_FACTORY_Z3_OFFLOAD = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16, "hysteresis": 2,
             "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": False, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    },
}


# ------------------------------------------------------------------------------------------ the config
def test_auto_values_are_filled_from_the_preftune_config():
    config = resolve_deepspeed_config(LLAMA_FACTORY_Z3_OFFLOAD, ARGS, world_size=4, hidden_size=64)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 1  # the trainer marks the accumulation boundaries itself
    assert config["train_batch_size"] == 2 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert config["zero_force_ds_cpu_optimizer"] is False  # preftune's own AdamW, also with offload
    assert LLAMA_FACTORY_Z3_OFFLOAD["gradient_clipping"] == "auto"  # the given dict is not changed
    assert zero_stage(config) == 3 and zero_stage({}) == 0


def test_clipping_is_never_deepspeeds_silent_default():
    config = resolve_deepspeed_config({"zero_optimization": {"stage": 2}}, ARGS, world_size=2, hidden_size=None)
    assert config["gradient_clipping"] == 0.5  # DeepSpeed's own default would be 1.0
    assert config["train_batch_size"] == 4


@pytest.mark.parametrize("given, message", [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu is 8 but per_device_train_batch_size is 2"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps 4 differs"),
    ({"train_batch_size": 7}, "train_batch_size 7 is not per_device_train_batch_size x processes"),
    ({"gradient_clipping": 1.0}, "gradient_clipping is 1.0 but max_grad_norm is 0.5"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is True but bf16 is False"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, "cannot fill \"auto\" for zero_optimization.sub_group_size"),
])
def test_values_that_disagree_with_the_preftune_config_are_refused(given, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_deepspeed_config(given, ARGS, world_size=2, hidden_size=64)
    assert info.value.key == "deepspeed"


def test_agreeing_explicit_values_are_kept():
    given = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": 12,
             "gradient_clipping": 0.5}
    assert resolve_deepspeed_config(given, ARGS, world_size=2, hidden_size=None)["train_batch_size"] == 4


def test_unreadable_files_and_refused_sections_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such DeepSpeed config file .*missing.json"):
        DPOConfig(deepspeed=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}')
    with pytest.raises(ConfigError, match=f"cannot read {broken} as JSON"):
        DPOConfig(deepspeed=str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, expected an object"):
        read_deepspeed_config(listed)
    with_optimizer = tmp_path / "opt.json"
    with_optimizer.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}))
    with pytest.raises(ConfigError, match=f"{with_optimizer} has a 'optimizer' section; preftune builds AdamW"):
        DPOConfig(deepspeed=str(with_optimizer))
    with pytest.raises(ConfigError, match="zero_optimization.stage must be 0, 1, 2 or 3"):
        DPOConfig(deepspeed={"zero_optimization": {"stage": 4}})


@pytest.mark.parametrize("settings, key", [
    ({"fsdp": "full_shard"}, "fsdp"),
    ({"padding_free": True}, "padding_free"),
    ({"sync_ref_model": True}, "sync_ref_model"),
    ({"nonfinite_loss": "skip"}, "nonfinite_loss"),
])
def test_options_deepspeed_cannot_run_with_are_refused(settings, key):
    with pytest.raises(ConfigError, match=f"deepspeed cannot run with {key}=") as info:
        DPOConfig(deepspeed={"zero_optimization": {"stage": 2}}, **settings)
    assert info.value.key == key


def test_the_example_deepspeed_configs_resolve():
    for name in ("ds_z2_config.json", "ds_z3_config.json", "ds_z3_offload_config.json"):
        raw = read_deepspeed_config(EXAMPLES / name)
        assert resolve_deepspeed_config(raw, ARGS, world_size=2, hidden_size=64)["train_batch_size"] == 4
    for name in ("zero2.yaml", "zero3.yaml", "zero3_offload.yaml"):
        assert zero_stage(read_deepspeed_config(load_config(EXAMPLES / name).deepspeed)) in (2, 3)


def test_deepspeed_not_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what an environment without DeepSpeed gives
    with pytest.raises(ConfigError, match="DeepSpeed cannot be imported .*pip install deepspeed") as info:
        start_deepspeed()
    assert info.value.key == "deepspeed"


# ------------------------------------------------------------------------------------------ 2 processes
def _deepspeed_run(stories_model_dir, tmp_path, ds_config: dict, **overrides):
    """2 processes under DeepSpeed, and 1 plain process with the same global batch, with the same history:
    (one-process trainer, the 2-process run's stderr, the config file)."""
    pytest.importorskip("deepspeed")  # a dev dependency: installed by `make test`
    config = _write_config(tmp_path, stories_model_dir, "two", deepspeed=ds_config, eval_steps=3, **overrides)
    run = _run_two_processes(config, cache=tmp_path / "cache")
    one = _train_one_process(config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2")
    _assert_same_history(one.state.log_history, json.loads((tmp_path / "two" / "log_history.json").read_text()))
    return one, run.stderr, config


def _assert_resumes_exactly(config, tmp_path, checkpoint_step: int) -> None:
    """A 2-process run resumed from ``two/checkpoint-<step>`` ends with the history and weights of the whole run."""
    two, resumed = tmp_path / "two", tmp_path / "resumed"
    _run_two_processes(config, f"output_dir={resumed}", f"resume_from_checkpoint={two / f'checkpoint-{checkpoint_step}'}",
                       cache=tmp_path / "cache")
    _assert_same_history(json.loads((two / "log_history.json").read_text()),
                         json.loads((resumed / "log_history.json").read_text()))
    _assert_same_weights(load_file(str(two / "model.safetensors")), load_file(str(resumed / "model.safetensors")))


@pytest.mark.slow
def test_zero2_two_processes_match_one_process_and_resume(stories_model_dir, tmp_path):
    """ZeRO-2 (optimizer states and gradients partitioned), clipping at 0.5 done by DeepSpeed. Its checkpoint holds
    the whole weights and AdamW state (those of the one-process run at that step); resumed, it ends as the whole run."""
    one, stderr, config = _deepspeed_run(stories_model_dir, tmp_path, {"zero_optimization": {"stage": 2}},
                                         max_grad_norm=0.5, save_strategy="steps", save_steps=2, max_steps=4)
    assert "DeepSpeed ZeRO stage 2 over 2 processes" in stderr
    initial = load_file(str(stories_model_dir / "model.safetensors"))
    _assert_same_weights(load_file(str(tmp_path / "one" / "model.safetensors")),
                         load_file(str(tmp_path / "two" / "model.safetensors")), initial=initial)
    ours, theirs = read_checkpoint(tmp_path / "two" / "checkpoint-2"), read_checkpoint(tmp_path / "one" / "checkpoint-2")
    # one process: keyed by position in the optimizer's groups (weights with decay, then biases and norms)
    names = [name for name, value in one.model.named_parameters() if value.requires_grad]
    grouped = [n for n in names if "norm" not in n.lower() and one.model.get_parameter(n).ndim >= 2]
    grouped += [n for n in names if n not in grouped]
    index = {name: position for position, name in enumerate(grouped)}
    assert set(ours["optimizer"]["state"]) == set(index)
    for name, state in ours["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], theirs["optimizer"]["state"][index[name]][key], atol=1e-6, rtol=1e-4,
                                       msg=f"{name} {key}")
        assert float(state["step"]) == 2
    _assert_resumes_exactly(config, tmp_path, 2)


@pytest.mark.slow
def test_zero3_with_offload_two_processes_match_one_process_and_resume(stories_model_dir, tmp_path):
    """ZeRO-3 with optimizer and parameter offload (LLaMA-Factory's config, as shipped): parameters partitioned,
    the separate reference model partitioned too (a forward-only engine), the whole model gathered at the end; a
    run resumed from its checkpoint ends as the whole run."""
    one, stderr, config = _deepspeed_run(stories_model_dir, tmp_path, LLAMA_FACTORY_Z3_OFFLOAD, save_strategy="steps",
                                         save_steps=2, max_steps=4)
    assert "DeepSpeed ZeRO stage 3 over 2 processes" in stderr
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["parallelism"] == "deepspeed zero-3"
    initial = load_file(str(stories_model_dir / "model.safetensors"))
    _assert_same_weights(load_file(str(tmp_path / "one" / "model.safetensors")),
                         load_file(str(tmp_path / "two" / "model.safetensors")), initial=initial)
    _assert_resumes_exactly(config, tmp_path, 2)


@pytest.mark.slow
def test_zero2_bf16_saves_fp32_master_weights_and_resumes_exactly(stories_model_dir, tmp_path):
    """bf16: DeepSpeed runs the model in 16 bits from fp32 master weights; the saved weights are the masters (fp32),
    which are set back from the model's fp32 weights at start and at resume, so a resumed run ends as the whole one."""
    pytest.importorskip("deepspeed")
    config = _write_config(tmp_path, stories_model_dir, "two", deepspeed={"zero_optimization": {"stage": 2}}, bf16=True,
                           eval_strategy="no", save_strategy="steps", save_steps=2, max_steps=4)
    _run_two_processes(config, cache=tmp_path / "cache")
    weights = load_file(str(tmp_path / "two" / "checkpoint-2" / "model.safetensors"))
    assert {value.dtype for value in weights.values()} == {torch.float32}
    # fp32 masters, not bf16 values widened: some weights are not representable in bfloat16
    assert any(not torch.equal(value, value.bfloat16().float()) for value in weights.values())
    _assert_resumes_exactly(config, tmp_path, 2)


@pytest.mark.slow
def test_zero3_lora_two_processes_match_one_process(stories_model_dir, tmp_path):
    """ZeRO-3 over a LoRA policy: the reference is the partitioned policy with its adapter disabled."""
    _deepspeed_run(stories_model_dir, tmp_path, {"zero_optimization": {"stage": 3}}, finetuning_type="lora",
                   lora_rank=4)
    adapter = "adapter_model.safetensors"
    expected = load_file(str(tmp_path / "one" / adapter))
    assert any(bool(value.abs().sum()) for name, value in expected.items() if "lora_B" in name)
    _assert_same_weights(expected, load_file(str(tmp_path / "two" / adapter)))
