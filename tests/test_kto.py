"""KTO at any batch size, against TRL 1.16's KTOTrainer (the oracle) on identical rows and weights.

Each row carries its KL completion, fixed when the data is prepared (``preftune.data.kto``): TRL's +1 rotation within
groups of ``per_device_train_batch_size`` rows. Checked here: the KL completions and token ids equal TRL's; a whole
first step (loss, KL estimate z, rewards, log-probs and the updated weights) equals TRL's at batch 2 and 3; at batch
size 1, which TRL refuses, each one-row micro-batch equals TRL's loss on that row with the same KL completion; with
2 processes z is averaged over the processes' concurrent micro-batches (TRL's gather), a stand-in's left out.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import DPOConfig, DPOTrainer
from preftune.config import load_config
from preftune.data.batching import plan_batches
from preftune.data.kto import kl_partner_rows
from preftune.errors import DataError
from preftune.losses import kto_loss, kto_sft_loss

from conftest import REPO_ROOT, shared_asset

trl = pytest.importorskip("trl")

ROWS = [
    {"prompt": "Once upon a time, there was a girl.", "completion": " She liked cats.", "label": True},
    {"prompt": "Tom had a red ball.", "completion": " It rolled away and was lost.", "label": False},
    {"prompt": "The sun was hot.", "completion": " They went to swim.", "label": True},
    {"prompt": "Sue saw a dog.", "completion": " Bob.", "label": False},
    {"prompt": "A bird sang.", "completion": " The tree was tall and green.", "label": True},
    {"prompt": "Lily had a cake.", "completion": " She ate it all, then she was sad.", "label": False},
]
BETA, LEARNING_RATE = 0.3, 0.01
WEIGHTS = {"desirable_weight": 1.2, "undesirable_weight": 0.8}
# Adam's first update is lr·g/(|g|+eps): with eps = 1 it is linear in g, so gradients equal up to float rounding
# give weights equal up to float rounding.
COMMON = {"beta": BETA, "max_length": 64, "learning_rate": LEARNING_RATE, "adam_epsilon": 1.0, "max_grad_norm": 1.0,
          "weight_decay": 0.0, "lr_scheduler_type": "linear", "max_steps": 1, "logging_steps": 1, **WEIGHTS}
METRICS = ("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def models():
    """stories260K as the policy; a perturbed copy as the reference, so that log-ratios and z are not zero."""
    model_dir = shared_asset("stories260K-hf")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.unk_token
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = copy.deepcopy(policy)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.01)
    logging.getLogger("trl").setLevel(logging.ERROR)
    return policy, reference, tokenizer


def trl_trainer(models, rows, batch_size, output_dir):
    policy, reference, tokenizer = models
    args = trl.KTOConfig(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                         per_device_train_batch_size=batch_size, warmup_steps=0, **COMMON)
    return trl.KTOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def preftune_trainer(models, rows, output_dir, **overrides):
    policy, reference, tokenizer = models
    args = DPOConfig(output_dir=str(output_dir), stage="kto", save_strategy="no", seed=0, overwrite_cache=True,
                     **{**COMMON, "per_device_train_batch_size": 1, **overrides})
    return DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args, train_dataset=rows,
                      processing_class=tokenizer)


def trl_step_metrics(trainer, examples) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's loss (with gradients) and metrics for one micro-batch of tokenized rows."""
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    metrics = {key: values[-1] for key, values in trainer._metrics[mode].items()}
    trainer._metrics[mode].clear()
    return loss, metrics


def assert_weights_equal(expected: torch.nn.Module, got: torch.nn.Module, initial: torch.nn.Module) -> None:
    expected_state, got_state, initial_state = expected.state_dict(), got.state_dict(), initial.state_dict()
    assert any(not torch.equal(value, initial_state[name]) for name, value in expected_state.items())  # it moved
    for name, value in expected_state.items():
        torch.testing.assert_close(got_state[name], value, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ the KL pairs
@pytest.mark.parametrize(("num_rows", "group_size", "expected"), [
    (6, 2, [1, 0, 3, 2, 5, 4]),
    (6, 3, [2, 0, 1, 5, 3, 4]),
    (5, 1, [1, 0, 4, 2, 3]),  # batch size 1: groups of 2; the last single row joins the group before it
    (7, 3, [2, 0, 1, 6, 3, 4, 5]),
    (2, 8, [1, 0]),
])
def test_each_row_takes_the_previous_rows_completion_within_its_group(num_rows, group_size, expected):
    assert kl_partner_rows(num_rows, group_size) == expected


def test_no_row_is_ever_its_own_kl_partner_and_each_group_reuses_its_own_completions():
    for num_rows in range(2, 40):
        for group_size in range(1, 12):
            partners = kl_partner_rows(num_rows, group_size)
            assert all(partner != row for row, partner in enumerate(partners)), (num_rows, group_size)
            assert sorted(partners) == list(range(num_rows))  # every completion is used once


@pytest.mark.parametrize("batch_size", [2, 3])
def test_kl_completions_and_token_ids_are_trls(models, tmp_path, batch_size):
    oracle = trl_trainer(models, ROWS, batch_size, tmp_path / "trl").train_dataset
    ours = preftune_trainer(models, ROWS, tmp_path / "ours", per_device_train_batch_size=batch_size).data.train.dataset
    for column, trl_column in (("prompt_ids", "prompt_ids"), ("completion_ids", "completion_ids"),
                               ("kl_completion_ids", "KL_completion_ids"), ("label", "label")):
        assert ours[column] == oracle[trl_column], column


def test_eval_rows_rotate_within_groups_of_the_eval_batch_size(models, tmp_path):
    policy, reference, tokenizer = models
    args = DPOConfig(output_dir=str(tmp_path / "run"), stage="kto", per_device_train_batch_size=2,
                     per_device_eval_batch_size=3, overwrite_cache=True)
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=ROWS, eval_dataset=ROWS, processing_class=tokenizer)
    completions = trainer.data.eval.dataset["completion_ids"]
    expected = [completions[i] for i in (2, 0, 1, 5, 3, 4)]
    assert trainer.data.eval.dataset["kl_completion_ids"] == expected


def test_llamafactorys_kto_example_keys_train_at_batch_size_one(stories_model_dir, tmp_path):
    """The keys of LLaMA-Factory's examples/train_lora/qwen3_lora_kto.yaml at its batch size 1, on the stories model
    and a slice of kto_en_demo (its chat template qwen3_nothink left out; accumulation 2 instead of 8, for time)."""
    settings = {
        "model_name_or_path": str(stories_model_dir), "trust_remote_code": True, "stage": "kto", "do_train": True,
        "finetuning_type": "lora", "lora_rank": 8, "lora_target": "all", "pref_beta": 0.1,
        "dataset": "kto_en_demo", "dataset_dir": str(shared_asset("llamafactory")), "cutoff_len": 256,
        "max_samples": 16, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "output_dir": str(tmp_path / "run"), "logging_steps": 1, "save_steps": 500, "plot_loss": False,
        "overwrite_output_dir": True, "report_to": "none", "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2, "learning_rate": 5.0e-6, "num_train_epochs": 3.0, "max_steps": 1,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "ddp_timeout": 180000000,
    }
    config = tmp_path / "kto.yaml"
    config.write_text(yaml.safe_dump(settings))
    trainer = DPOTrainer(args=load_config(config))
    trainer.train()
    record = trainer.recorder.train_records[0]
    assert (trainer.args.per_device_train_batch_size, trainer.args.loss_type, trainer.args.beta) == (1, "kto", 0.1)
    assert record["loss"] == pytest.approx(0.5, abs=1e-6)  # first step: LoRA's B is 0, so π = π_ref and z = 0
    assert record["kl"] == 0.0 and all(len(row) for row in trainer.data.train.dataset["kl_completion_ids"])


def test_kto_data_of_one_row_is_refused_naming_the_file(models, tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match="kto needs at least 2 rows") as error:
        preftune_trainer(models, str(path), tmp_path / "run")
    assert "one.jsonl" in str(error.value)


# ------------------------------------------------------------------------------------------ one step against TRL
@pytest.mark.parametrize(("batch_size", "first_row", "clamped"), [(2, 0, False), (3, 3, True)], ids=["z>0", "z=0"])
def test_first_step_matches_trl_kto_trainer(models, tmp_path, batch_size, first_row, clamped):
    """One batch of all the rows (so preftune's shuffle cannot change it): the same loss, z, rewards and log-probs
    as TRL's first micro-batch, and the same weights after TRL's first optimizer step; once with a positive mean KL
    log-ratio, once with a negative one (z clamped at 0)."""
    rows = ROWS[first_row : first_row + batch_size]
    oracle = trl_trainer(models, rows, batch_size, tmp_path / "trl")
    with torch.no_grad():
        trl_loss, trl_metrics = trl_step_metrics(oracle, [oracle.train_dataset[i] for i in range(batch_size)])
    assert (trl_metrics["kl"] == 0) == clamped
    oracle.train()

    ours = preftune_trainer(models, rows, tmp_path / "ours", per_device_train_batch_size=batch_size)
    ours.train()
    record = ours.recorder.train_records[0]
    assert record["loss"] == pytest.approx(trl_loss.item(), rel=1e-5)
    for key in METRICS:
        assert record[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    assert_weights_equal(oracle.model, ours.model, models[0])


def test_batch_size_one_matches_trl_on_each_row_with_its_kl_partner(models, tmp_path):
    """TRL refuses batch size 1, but its loss takes a one-row batch: each row with the KL completion of its partner
    (3 rows, groups of 2: the last row joins the first group, so the partners are 2, 0, 1). Accumulating the three
    micro-batches gives one step: TRL's mean loss, the mean of its per-row z, and an AdamW step on its mean gradient.
    """
    rows, partners = ROWS[:3], [2, 0, 1]
    oracle = trl_trainer(models, rows, 2, tmp_path / "trl")  # batch 2 only to get TRL's tokenized rows
    tokenized = [dict(oracle.train_dataset[i]) for i in range(len(rows))]
    losses, metrics = [], []
    for row, partner in enumerate(partners):
        example = {**tokenized[row], "KL_completion_ids": tokenized[partner]["completion_ids"]}
        loss, step_metrics = trl_step_metrics(oracle, [example])
        (loss / len(rows)).backward()
        losses.append(loss.item())
        metrics.append(step_metrics)
    torch.nn.utils.clip_grad_norm_(oracle.model.parameters(), 1.0)
    torch.optim.AdamW(oracle.model.parameters(), lr=LEARNING_RATE, eps=1.0, weight_decay=0.0).step()

    ours = preftune_trainer(models, rows, tmp_path / "ours", per_device_train_batch_size=1, gradient_accumulation_steps=3)
    ours.train()
    record = ours.recorder.train_records[0]
    assert record["loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert record["kl"] == pytest.approx(sum(m["kl"] for m in metrics) / 3, rel=1e-5, abs=1e-6)
    for side, desirable in (("chosen", True), ("rejected", False)):
        chosen = [m for m, row in zip(metrics, rows) if row["label"] == desirable]
        for key in (f"rewards/{side}", f"logps/{side}"):
            assert record[key] == pytest.approx(sum(m[key] for m in chosen) / len(chosen), rel=1e-5), key
    assert min(m["kl"] for m in metrics) == 0 < max(m["kl"] for m in metrics)  # one z clamped, one not
    assert_weights_equal(oracle.model, ours.model, models[0])


# ------------------------------------------------------------------------------------------ pref_ftx
def test_pref_ftx_adds_llamafactorys_sft_term():
    """LLaMA-Factory's micro-batch loss with pref_ftx α: mean(kto) + α·mean_d(−avg log-prob)/n_d·B."""
    generator = torch.Generator().manual_seed(3)
    policy, ref = -torch.rand(5, generator=generator) * 20, -torch.rand(5, generator=generator) * 20
    lengths = torch.tensor([3.0, 7.0, 2.0, 5.0, 4.0])
    for labels in ([True, False, True, False, False], [True] * 5, [False] * 5, [True]):
        labels = torch.tensor(labels)
        count = len(labels)
        kto = kto_loss(policy[:count], ref[:count], torch.tensor(0.7), labels, beta=0.1)
        avg = policy[:count] / lengths[:count]
        desirable = avg[labels]
        sft = (-desirable).mean() / len(desirable) * count if len(desirable) else torch.tensor(0.0)
        ours = (kto + kto_sft_loss(avg, labels, 0.5)).mean()
        assert ours.item() == pytest.approx((kto.mean() + 0.5 * sft).item(), rel=1e-6)


def naive_logp(model, prompt_ids, completion_ids) -> float:
    """log π(completion | prompt) from the model's full logits, summed over the completion tokens."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:, None]
    return float(logps.gather(1, targets)[len(prompt_ids) - 1 :].sum())


def test_pref_ftx_with_kto_in_the_trainer(models, tmp_path):
    rows = ROWS[:4]
    plain = preftune_trainer(models, rows, tmp_path / "plain", per_device_train_batch_size=4, learning_rate=0.0)
    plain.train()
    with_sft = preftune_trainer(models, rows, tmp_path / "sft", per_device_train_batch_size=4, learning_rate=0.0,
                                pref_ftx=0.5)
    with_sft.train()
    data = plain.data.train.dataset
    avg = [naive_logp(models[0], r["prompt_ids"], r["completion_ids"]) / len(r["completion_ids"]) for r in data if r["label"]]
    expected_sft = 0.5 * (-sum(avg) / len(avg)) / len(avg) * len(rows)
    added = with_sft.recorder.train_records[0]["loss"] - plain.recorder.train_records[0]["loss"]
    assert added == pytest.approx(expected_sft, rel=1e-5)


# ------------------------------------------------------------------------------------------ two processes
def kto_row_loss(logratio: float, z: float, desirable: bool) -> float:
    if desirable:
        return WEIGHTS["desirable_weight"] * (1 - torch.sigmoid(torch.tensor(BETA * (logratio - z))).item())
    return WEIGHTS["undesirable_weight"] * (1 - torch.sigmoid(torch.tensor(BETA * (z - logratio))).item())


@pytest.mark.slow
def test_two_processes_average_z_over_their_concurrent_micro_batches(models, tmp_path):
    """3 rows, batch 1, accumulation 2, 2 processes: one step of 4 micro-batch slots, process 0 runs rows o0 and o1,
    process 1 runs o2 and a zero-weight stand-in. The first micro-batches of both share z = max(0, mean of the KL
    log-ratios of o0 and o2); the second has z = max(0, KL log-ratio of o1), the stand-in left out. Checked against
    the models' full logits, with the rows in preftune's seeded order."""
    policy, reference, tokenizer = models
    reference_dir = tmp_path / "reference"
    reference.save_pretrained(reference_dir)
    rows = [ROWS[0], ROWS[1], ROWS[3]]
    data_file = tmp_path / "kto.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model_name_or_path": str(shared_asset("stories260K-hf")), "ref_model": str(reference_dir), "stage": "kto",
        "dataset": str(data_file), "output_dir": str(tmp_path / "two"), "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2, "max_steps": 1, "logging_steps": 1, "save_strategy": "no",
        "learning_rate": 0.0, "max_length": 64, "seed": 0, "plot_loss": False,
        **{key: COMMON[key] for key in ("beta", *WEIGHTS)},
    }
    config_path = tmp_path / "kto.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / "src"), PREFTUNE_CACHE=str(tmp_path / "cache"))
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "preftune.cli", "train", "--nproc", "2", str(config_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = next(r for r in json.loads((tmp_path / "two" / "log_history.json").read_text()) if "loss" in r)

    tokenized = preftune_trainer(models, str(data_file), tmp_path / "one").data.train.dataset
    logratio = lambda row, key: (naive_logp(policy, row["prompt_ids"], row[key])  # noqa: E731
                                 - naive_logp(reference, row["prompt_ids"], row[key]))
    rewards = [logratio(row, "completion_ids") for row in tokenized]
    kl = [logratio(row, "kl_completion_ids") for row in tokenized]
    o0, o1, o2 = (group[0] for group in plan_batches(3, 1, shuffle_seed=0, drop_last=False))

    def expected(z_first: float, z_second: float) -> tuple[float, float]:
        """(logged kl, logged loss) when o0 and o2 use z_first and o1 uses z_second."""
        uses = ((o0, z_first), (o2, z_first), (o1, z_second))
        loss = sum(kto_row_loss(rewards[row], z, rows[row]["label"]) for row, z in uses) / 3
        return (2 * z_first + z_second) / 3, loss

    want = expected(max(0.0, (kl[o0] + kl[o2]) / 2), max(0.0, kl[o1]))
    assert record["kl"] == pytest.approx(want[0], rel=1e-5, abs=1e-6)
    assert record["loss"] == pytest.approx(want[1], rel=1e-5)
    # the check can fail: z per process (not averaged), or the stand-in counted, give other values
    per_process = sum(max(0.0, kl[row]) for row in (o0, o1, o2)) / 3
    with_stand_in = expected(max(0.0, (kl[o0] + kl[o2]) / 2), max(0.0, (kl[o1] + kl[o0]) / 2))[0]
    assert per_process != pytest.approx(want[0], abs=1e-3) and with_stand_in != pytest.approx(want[0], abs=1e-3)
