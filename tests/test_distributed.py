"""Several processes (DDP on CPU, gloo): with the same global batch, 2 processes give the losses, metrics and final
weights of 1 process; only the main process writes; resume works with 2 processes; clear errors."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import DPOConfig, DPOTrainer
from preftune.checkpoint import read_checkpoint
from preftune.config import load_config
from preftune.parallel import build_parallelism
from preftune.parallel.launch import rank_share, relaunch_command, should_relaunch
from preftune.errors import CheckpointError, ConfigError

from conftest import REPO_ROOT
from test_training import STORY_PAIRS

TIMING_KEYS = {"tokens_per_second", "eval_runtime", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
EVAL_PAIRS = STORY_PAIRS[:5]
# 10 pairs in micro-batches of 2 (one step: 2 per process): the third step's window has one micro-batch for 2
# processes, so one process runs a zero-weight stand-in.
TRAIN_PAIRS = STORY_PAIRS + STORY_PAIRS[:2]


# ------------------------------------------------------------------------------------------ pure parts
def test_rank_shares_are_contiguous_and_concatenate_to_the_window():
    window = list(range(7))
    shares = [rank_share(window, rank, 3) for rank in range(3)]  # (item, weight); weight 0: a stand-in
    assert shares == [[(0, 1), (1, 1), (2, 1)], [(3, 1), (4, 1), (5, 1)], [(6, 1), (0, 0), (0, 0)]]
    assert [item for share in shares for item, weight in share if weight] == window
    assert [rank_share([0], rank, 2) for rank in range(2)] == [[(0, 1)], [(0, 0)]]  # a stand-in keeps backward counts equal


def test_relaunch_runs_the_same_command_under_torchrun(monkeypatch):
    command = relaunch_command(2, ["train", "cfg.yaml", "beta=0.2"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in command and command[-5:] == ["-m", "preftune.cli", "train", "cfg.yaml", "beta=0.2"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("PREFTUNE_RELAUNCHED", raising=False)
    assert should_relaunch(2) and not should_relaunch(1) and not should_relaunch(None)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under a launcher: never launch again
    assert not should_relaunch(2)


def test_nproc_in_a_single_python_process_is_refused(stories_model_dir, tmp_path):
    config = load_config(_write_config(tmp_path, stories_model_dir, "run"), ["nproc=2"])
    with pytest.raises(ConfigError, match="nproc: 2 but this is a single process"):
        DPOTrainer(args=config)


@pytest.mark.parametrize("variable, key", [("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp")])
def test_an_accelerate_config_selecting_deepspeed_or_fsdp_is_refused_clearly(stories_model_dir, tmp_path, monkeypatch,
                                                                              variable, key):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch --config_file zero2.yaml` sets
    config = load_config(_write_config(tmp_path, stories_model_dir, "run"))
    with pytest.raises(ConfigError, match=f"not supported yet: training under .*`{key}: ") as info:
        DPOTrainer(args=config)
    assert info.value.key == key




@pytest.mark.parametrize("settings", [{"fsdp": "full_shard"}, {"deepspeed": {"zero_optimization": {"stage": 3}}}])
def test_one_process_ignores_fsdp_and_deepspeed_with_a_warning(settings, caplog):
    one_process = SimpleNamespace(num_processes=1, process_index=0, distributed_type="NO")
    with caplog.at_level(logging.WARNING, logger="preftune.parallel"):
        parallelism = build_parallelism(DPOConfig(**settings), one_process)
    assert "ignored: this run has one process" in caplog.text
    assert parallelism.name == "single"  # what summary.json records
    assert parallelism.allows_padding_free and parallelism.holds_whole_output_layer and not parallelism.lockstep_forwards


@pytest.mark.parametrize("settings, key", [
    ({"fsdp": "full_shard offload"}, "fsdp"),
    ({"fsdp": "full_shard shard_grad_op"}, "fsdp"),
    ({"fsdp": "full_shard", "padding_free": True}, "padding_free"),
    ({"fsdp": "full_shard", "sync_ref_model": True}, "sync_ref_model"),
])
def test_fsdp_options_it_cannot_run_are_refused(settings, key):
    with pytest.raises(ConfigError) as info:
        DPOConfig(**settings)
    assert info.value.key == key


EXAMPLES = REPO_ROOT / "examples" / "distributed"


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.glob("*.yaml") if not path.name.startswith("accelerate")))
def test_example_configs_load_and_show_their_launch_commands(name):
    config = load_config(EXAMPLES / name)
    assert config.output_dir.startswith("output/distributed/")
    assert f"examples/distributed/{name}" in (EXAMPLES / name).read_text()  # the launch command in its header


# ------------------------------------------------------------------------------------------ helpers
def _write_config(tmp_path: Path, model_dir: Path, name: str, train_rows: list[dict] = TRAIN_PAIRS, **overrides) -> Path:
    train, evaluation = tmp_path / "pairs.jsonl", tmp_path / "eval.jsonl"
    if not train.exists():
        train.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
        evaluation.write_text("".join(json.dumps(row) + "\n" for row in EVAL_PAIRS))
    config = {
        "model_name_or_path": str(model_dir), "dataset": str(train), "eval_dataset": str(evaluation),
        "output_dir": str(tmp_path / name), "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 1, "max_steps": 3, "logging_steps": 1, "eval_strategy": "steps",
        "eval_steps": 2, "save_strategy": "no", "max_length": 64, "seed": 0, "plot_loss": False,
        "on_bad_row": "warn",  # the two repeated pairs are exact duplicates
        # Adam's update is lr·g/(|g|+eps): with eps = 1 it is linear in g, so gradients equal up to float rounding
        # give weights equal up to float rounding (with a tiny eps, noise in near-zero gradients flips ±lr updates).
        "learning_rate": 0.05, "adam_epsilon": 1.0, **overrides,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_two_processes(config: Path, *overrides: str, cache: Path) -> subprocess.CompletedProcess:
    """``preftune train CONFIG --nproc 2``: the CLI re-launches itself under torchrun (gloo on CPU)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), PREFTUNE_CACHE=str(cache))
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [sys.executable, "-m", "preftune.cli", "train", "--nproc", "2", str(config), *overrides],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train_one_process(config: Path, *overrides: str) -> DPOTrainer:
    trainer = DPOTrainer(args=load_config(config, list(overrides)))
    trainer.train()
    return trainer


def _comparable(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS} for record in history]


def _assert_same_history(one: list[dict], two: list[dict]) -> None:
    one, two = _comparable(one), _comparable(two)
    assert [sorted(record) for record in one] == [sorted(record) for record in two]
    for expected, got in zip(one, two):
        for key, value in expected.items():
            if key.endswith("rewards/accuracies") and _all_rewards_are_rounding(expected):
                continue  # policy = reference: every margin is float noise, so "chosen > rejected" is a coin flip
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (expected["step"], key)


def _all_rewards_are_rounding(record: dict) -> bool:
    """Whether every logged reward of ``record`` is within float rounding of 0 (the untouched policy at step 1)."""
    rewards = [value for key, value in record.items() if "rewards/" in key and not key.endswith("accuracies")]
    return bool(rewards) and all(abs(value) < 1e-5 for value in rewards)


def _assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], *, initial=None) -> None:
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-5, msg=name)
    if initial is not None:  # the run really moved the weights (else equality proves nothing)
        assert any(not torch.equal(value, initial[name]) for name, value in expected.items())


# ------------------------------------------------------------------------------------------ equivalence
@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(stories_model_dir, tmp_path, monkeypatch):
    """2 processes x batch 2 x accumulation 1 against 1 process x batch 2 x accumulation 2: the same logged losses,
    metrics and eval metrics, and the same final weights. Reference log-probs are precomputed once (by the main
    process) and read by the other; a run resumed from a 2-process checkpoint ends as the uninterrupted one."""
    config = _write_config(
        tmp_path, stories_model_dir, "two", precompute_ref_log_probs=True, save_strategy="steps", save_steps=2,
        max_steps=4,
    )
    _run_two_processes(config, cache=tmp_path / "cache")
    two = tmp_path / "two"
    monkeypatch.setenv("PREFTUNE_CACHE", str(tmp_path / "cache_one"))  # the one-process run computes its own
    one = _train_one_process(config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2")

    history = json.loads((two / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4] and sum("eval_loss" in r for r in history) == 2
    _assert_same_history(one.state.log_history, history)
    initial = load_file(str(stories_model_dir / "model.safetensors"))
    _assert_same_weights(load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(two / "model.safetensors")),
                         initial=initial)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["total_pairs"] == 14  # windows of 4, 4, 2 (epoch end), 4 pairs
    assert summary["data"]["train"]["reference_logps"]["reused"] is False
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2  # train and eval, written once
    assert not list(two.glob(".preftune-write-test-*")) and not list(two.glob("*.tmp"))

    checkpoint = two / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2
    assert read_checkpoint(checkpoint, rank=1)["rng"]["torch"]  # every process's RNG states are kept
    resumed = tmp_path / "resumed"
    _run_two_processes(config, f"output_dir={resumed}", f"resume_from_checkpoint={checkpoint}", cache=tmp_path / "cache")
    _assert_same_history(history, json.loads((resumed / "log_history.json").read_text()))
    _assert_same_weights(load_file(str(two / "model.safetensors")), load_file(str(resumed / "model.safetensors")))

    # the checkpoint cannot resume a run of another process count (its global batch would differ)
    single = DPOTrainer(args=load_config(config, [f"output_dir={tmp_path / 'x'}", f"resume_from_checkpoint={checkpoint}"]))
    with pytest.raises(CheckpointError, match="written by a run of 2 process"):
        single.train()


@pytest.mark.slow
def test_lora_two_processes_match_one_process(stories_model_dir, tmp_path):
    """The reference is the policy with its adapter disabled (the PeftModel inside DDP's wrapper, run without it).
    7 pairs, padding-free: the processes' micro-batches of 2 and 1 rows take 2 and 1 forwards in the same step."""
    config = _write_config(tmp_path, stories_model_dir, "two", train_rows=STORY_PAIRS[:7], finetuning_type="lora",
                           lora_rank=4, eval_steps=3, padding_free=True)
    _run_two_processes(config, cache=tmp_path / "cache")
    one = _train_one_process(config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2")
    _assert_same_history(one.state.log_history, json.loads((tmp_path / "two" / "log_history.json").read_text()))
    adapter = "adapter_model.safetensors"
    expected = load_file(str(tmp_path / "one" / adapter))
    assert any(bool(value.abs().sum()) for name, value in expected.items() if "lora_B" in name)  # B moved off zero
    _assert_same_weights(expected, load_file(str(tmp_path / "two" / adapter)))


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume(stories_model_dir, tmp_path):
    """FSDP2 (full_shard, gloo), the separate reference model sharded too: sharded parameters, gradients and optimizer
    states give the one-process run; the saved model is whole (tied weights once) and loads with from_pretrained; its
    checkpoint (whole weights and optimizer state, keyed by parameter name) resumes to the same end."""
    config = _write_config(tmp_path, stories_model_dir, "two", fsdp="full_shard auto_wrap", eval_steps=3,
                           save_strategy="steps", save_steps=2, max_steps=4)
    run = _run_two_processes(config, cache=tmp_path / "cache")
    assert "FSDP2 (full_shard auto_wrap): 5 decoder layers and the model sharded over 2 processes" in run.stderr
    assert "5 decoder layers and the reference model sharded over 2 processes" in run.stderr
    one = _train_one_process(config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2")  # fsdp ignored
    two = tmp_path / "two"
    history = json.loads((two / "log_history.json").read_text())
    _assert_same_history(one.state.log_history, history)
    initial = load_file(str(stories_model_dir / "model.safetensors"))
    _assert_same_weights(load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(two / "model.safetensors")),
                         initial=initial)
    reloaded = AutoModelForCausalLM.from_pretrained(str(two))
    for name, value in one.model.named_parameters():
        torch.testing.assert_close(reloaded.get_parameter(name), value.detach(), atol=1e-5, rtol=1e-5, msg=name)

    checkpoint = two / "checkpoint-2"
    assert "model.embed_tokens.weight" in read_checkpoint(checkpoint)["optimizer"]["state"]
    assert json.loads((two / "summary.json").read_text())["parallelism"] == "fsdp full_shard auto_wrap"
    resumed = tmp_path / "resumed"
    _run_two_processes(config, f"output_dir={resumed}", f"resume_from_checkpoint={checkpoint}", cache=tmp_path / "cache")
    _assert_same_history(history, json.loads((resumed / "log_history.json").read_text()))
    _assert_same_weights(load_file(str(two / "model.safetensors")), load_file(str(resumed / "model.safetensors")))


@pytest.mark.slow
def test_fsdp_lora_with_a_checkpoint_matches_one_process_and_resumes(stories_model_dir, tmp_path):
    """FSDP2 over a LoRA policy (the reference: the sharded policy with its adapter disabled): the one-process run's
    history and adapter; its checkpoint (whole adapter and optimizer state, keyed by parameter name) holds the
    one-process run's adapter at that step and resumes under FSDP to the same end."""
    config = _write_config(tmp_path, stories_model_dir, "two", fsdp="full_shard", finetuning_type="lora", lora_rank=4,
                           eval_steps=3, save_strategy="steps", save_steps=2, max_steps=4)
    _run_two_processes(config, cache=tmp_path / "cache")
    two = tmp_path / "two"
    one = _train_one_process(config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2")
    history = json.loads((two / "log_history.json").read_text())
    _assert_same_history(one.state.log_history, history)
    adapter = "adapter_model.safetensors"
    expected = load_file(str(tmp_path / "one" / adapter))
    assert any(bool(value.abs().sum()) for name, value in expected.items() if "lora_B" in name)
    _assert_same_weights(expected, load_file(str(two / adapter)))

    checkpoint = two / "checkpoint-2"
    optimizer = read_checkpoint(checkpoint)["optimizer"]
    assert optimizer["state"] and all("lora_" in name for name in optimizer["state"])  # keyed by parameter name
    _assert_same_weights(load_file(str(tmp_path / "one" / "checkpoint-2" / adapter)), load_file(str(checkpoint / adapter)))
    resumed = tmp_path / "resumed"
    _run_two_processes(config, f"output_dir={resumed}", f"resume_from_checkpoint={checkpoint}", cache=tmp_path / "cache")
    _assert_same_history(history, json.loads((resumed / "log_history.json").read_text()))
    _assert_same_weights(load_file(str(two / adapter)), load_file(str(resumed / adapter)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_rehearsed_on_one_machine_match_one_process(stories_model_dir, tmp_path):
    """Two nodes of one process each, each started by its own torchrun (``--nnodes 2 --node_rank R``, a static
    rendezvous at localhost) with its own data cache, as on two machines: the run ends with the losses, metrics and
    weights of one process with twice the gradient accumulation."""
    config = _write_config(tmp_path, stories_model_dir, "two", max_steps=2, ddp_timeout=240)
    port, launchers = _free_port(), []
    try:
        for node in range(2):
            env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), PREFTUNE_CACHE=str(tmp_path / f"cache{node}"))
            env.pop("WORLD_SIZE", None)
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                       "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
                       "-m", "preftune.cli", "train", str(config)]
            log = open(tmp_path / f"node{node}.log", "w")  # files, not pipes: a full pipe would stall a node
            launchers.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        for node, (launcher, log) in enumerate(launchers):
            assert launcher.wait(timeout=300) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    finally:
        for launcher, log in launchers:
            if launcher.poll() is None:
                launcher.kill()
            log.close()
    one = _train_one_process(config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2")
    two = tmp_path / "two"
    history = json.loads((two / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2]
    _assert_same_history(one.state.log_history, history)
    _assert_same_weights(load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(two / "model.safetensors")),
                         initial=load_file(str(stories_model_dir / "model.safetensors")))
    summary = json.loads((two / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["parallelism"] == "ddp"
    for node in range(2):  # each node's first process tokenized the data into that node's own cache
        assert list((tmp_path / f"cache{node}" / "tokenized").iterdir())
