"""Iterative DPO (`preftune loop`): rounds of sample → judge → pairs → DPO → evaluate, each from the last round's model.

With `loop.online: true` a round is online DPO instead (`run_online_round`, `preftune.online`): each optimizer
step samples two responses per prompt of its batch from the current policy, judges them and takes the DPO step;
the round writes `online.jsonl` (per step) and `model/`, then evaluates as below.

Round K (1-based) of `run_loop(config)` works in `output_dir/round-K/`:

1. `candidates.jsonl`: `loop.num_samples` responses per prompt of the round's prompts, sampled from the round's
   starting policy (the initial model for round 1, `round-(K-1)/model` after), seed `sampling_seed + K - 1`
   (`preftune.generation`: each sample is seeded by its prompt id, so a resumed round draws the same samples).
2. `pairs.jsonl`: every response scored by `loop.judge`, pairs by `loop.pair_mode` and `loop.min_gap`
   (`preftune.judges.pairs_from_candidates`).
3. `model/`: DPO on the pairs with the config's training settings (any loss), for `loop.steps_per_round` steps
   (or the config's `max_steps` / `num_train_epochs`), starting from the round's starting policy; the reference is
   the initial model (`loop.reference: initial`) or the round's starting policy (`previous`). With
   `finetuning_type: lora`, `model/` holds the round's adapter (trained fresh on the round's starting model) and
   `merged/` the starting model with it merged in: the next round's policy. The reference is then the
   adapter-disabled starting model where that is the reference asked for (`previous`, and `initial` in round 1),
   else the initial model loaded as a separate reference.
4. `metrics.json`: the mean judge score of the round's samples, pair counts, the training loss, the held-out pair
   metrics (the config's `eval_dataset`) and, with `loop.eval_prompts`, the sampled evaluation against the initial
   model (`preftune.evaluation.evaluate_generations`: judge reward, win rate, KL). Written last: a round with a
   `metrics.json` is complete.

`output_dir/summary.json` (and `summary.png`) collect the rounds' metrics after each round.

Resuming: rerunning the same config skips complete rounds; in the round where it stopped, sampling continues after
the prompts already in `candidates.jsonl` (a torn last line is cut off), the pairs are kept if written, training
continues from the newest checkpoint in `round-K/model/` (exact resume, `save_strategy`/`save_steps` decide how
often one is written) and a finished model is not trained again.

Errors first: `check_loop` validates the loop settings, the prompts files, the judge spec and the settings the loop
cannot run with before any model loads.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from preftune import atomic
from preftune.config import DPOConfig, load_config, parse_overrides
from preftune.errors import ConfigError, DataError
from preftune.loop_config import LoopConfig

logger = logging.getLogger(__name__)

ROUND_COMPLETE = "metrics.json"


@dataclass(frozen=True)
class RoundFiles:
    """Where round `index` (1-based) keeps its files."""

    index: int
    folder: Path

    @property
    def candidates(self) -> Path:
        return self.folder / "candidates.jsonl"

    @property
    def pairs(self) -> Path:
        return self.folder / "pairs.jsonl"

    @property
    def model(self) -> Path:
        return self.folder / "model"

    @property
    def merged(self) -> Path:
        """With LoRA: the round's starting model with the round's adapter merged in (the next round's policy)."""
        return self.folder / "merged"

    @property
    def metrics(self) -> Path:
        return self.folder / ROUND_COMPLETE


def round_files(output_dir: str | Path, index: int) -> RoundFiles:
    return RoundFiles(index, Path(output_dir) / f"round-{index}")


@dataclass(frozen=True)
class LoopPlan:
    """What `check_loop` found: the settings, and each round's prompts as (prompt_id, prompt)."""

    config: DPOConfig
    settings: LoopConfig
    round_prompts: list[list[tuple[str, Any]]]
    eval_prompts: list[Any] | None

    @property
    def initial_model(self) -> str:
        return str(self.config.model_name_or_path)

    @property
    def initial_reference(self) -> str:
        return str(self.config.ref_model_name_or_path or self.config.model_name_or_path)

    @property
    def lora(self) -> bool:
        return self.config.finetuning_type == "lora"

    def trained_policy(self, files: RoundFiles) -> Path:
        """The full model a finished round leaves: its training output, or with LoRA the merged model."""
        return files.merged if self.lora else files.model


# ---------------------------------------------------------------------------------------------------------- checks
def check_loop(config: DPOConfig) -> LoopPlan:
    """Everything checkable before a model loads: ConfigError naming the key (`loop.<key>` for the loop section)
    and the config file, DataError naming a prompts file's row."""
    from preftune.generation import read_prompts

    file = config.config_file
    if config.loop is None:
        raise ConfigError("no loop section; expected `loop:` with at least `prompts` and `judge`", key="loop", file=file)
    settings = LoopConfig.from_mapping(config.loop, file=file)
    if not config.model_name_or_path:
        raise ConfigError("the initial policy is missing: set model_name_or_path", key="model_name_or_path", file=file)
    refused = {
        "dataset": (config.dataset is not None, "the loop builds each round's pairs itself; remove dataset"),
        "resume_from_checkpoint": (config.resume_from_checkpoint is not None,
                                   "the loop resumes by itself when run again; remove resume_from_checkpoint"),
        "nproc": ((config.nproc or 1) > 1, "not supported yet: preftune loop runs in one process"),
        "sync_ref_model": (config.sync_ref_model, "the loop sets each round's reference (loop.reference); remove "
                           "sync_ref_model"),
    }
    if settings.online:
        refused.update(online_refusals(config))
    for key, (refuse, reason) in refused.items():
        if refuse:
            raise ConfigError(reason, key=key, file=file)
    _check_judge_spec(settings.judge, file, labels_allowed=settings.online)
    prompts = read_prompts(_existing(settings.prompts, "loop.prompts", file))
    eval_prompts = None
    if settings.eval_prompts is not None:
        eval_prompts = [prompt for _, prompt in read_prompts(_existing(settings.eval_prompts, "loop.eval_prompts", file))]
    return LoopPlan(config, settings, _split_prompts(prompts, settings, file), eval_prompts)


def online_refusals(config: DPOConfig) -> dict[str, tuple[bool, str]]:
    """What online rounds cannot run with: {key: (refused, reason)}."""
    from preftune.losses import LossParams

    params = LossParams.from_config(config)
    return {
        "loss_type": (params.is_unpaired, "online DPO trains on pairs; kto is unpaired"),
        "use_weighting": (config.use_weighting, "not supported with loop.online: WPO weighting"),
        "precompute_ref_log_probs": (config.precompute_ref_log_probs, "online DPO samples new responses every step; "
                                     "their reference log-probs cannot be precomputed"),
    }


def _existing(path: str, key: str, file: str | None) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"no such file: '{path}'; expected a JSONL or JSON prompts file", key=key, file=file)
    return path


def _check_judge_spec(spec: str, file: str | None, *, labels_allowed: bool = False) -> None:
    """A reward-model directory must hold a config.json; a function spec is imported now (cheap, and a typo is
    named before any model loads); with `labels_allowed` (online DPO) a `.jsonl`/`.json` pairwise-labels file is
    read now."""
    from preftune.judges import PairwiseLabels, load_judge

    path = Path(spec)
    if labels_allowed and path.is_file() and path.suffix in (".jsonl", ".json"):
        PairwiseLabels.from_file(path)
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"'{spec}' has no config.json; expected a reward-model directory or "
                              "'package.module:function'", key="loop.judge", file=file)
        return
    try:
        load_judge(spec)
    except ConfigError as error:
        raise ConfigError(error.message, key="loop.judge", file=file) from None


def _split_prompts(prompts: list[tuple[str, Any]], settings: LoopConfig, file: str | None
                   ) -> list[list[tuple[str, Any]]]:
    """Each round's prompts: the K-th slice (`fresh`) or the same first ones (`same`)."""
    rounds, available = settings.rounds, len(prompts)
    if settings.prompt_selection == "same":
        count = settings.prompts_per_round or available
        if count > available:
            raise ConfigError(f"prompts_per_round is {count} but {settings.prompts} holds {available} prompts",
                              key="loop.prompts_per_round", file=file)
        return [prompts[:count] for _ in range(rounds)]
    count = settings.prompts_per_round or available // rounds
    if count < 1 or count * rounds > available:
        raise ConfigError(f"{rounds} rounds of {count or 1} fresh prompts need {rounds * max(count, 1)} prompts; "
                          f"{settings.prompts} holds {available} (lower prompts_per_round or use prompt_selection: "
                          "same)", key="loop.prompts_per_round", file=file)
    return [prompts[k * count: (k + 1) * count] for k in range(rounds)]


# ------------------------------------------------------------------------------------------------------- the loop
def run_loop(config: DPOConfig, *, callbacks: Sequence[Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every round of `config.loop`; returns the summary written to `output_dir/summary.json`.

    `callbacks` (transformers `TrainerCallback`s) go to every round's `DPOTrainer`.
    """
    plan = check_loop(config)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    for index in range(1, plan.settings.rounds + 1):
        files = round_files(output_dir, index)
        if files.metrics.is_file():
            logger.info("round %d: complete (%s), skipped", index, files.metrics)
            rounds.append(_read_json(files.metrics))
            continue
        files.folder.mkdir(parents=True, exist_ok=True)
        policy = plan.initial_model if index == 1 else str(plan.trained_policy(round_files(output_dir, index - 1)))
        metrics = run_round(plan, files, policy, callbacks=callbacks, progress=progress)
        atomic.write_json(files.metrics, atomic.finite_json(metrics))
        rounds.append(metrics)
        write_summary(plan, rounds)
    return write_summary(plan, rounds)


def run_round(plan: LoopPlan, files: RoundFiles, policy: str, *, callbacks: Sequence[Any] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """One round: sample from `policy`, judge, write pairs, train `files.model` from `policy`, evaluate."""
    from preftune.judges import load_judge, pairs_from_candidates, score_candidates

    settings, index = plan.settings, files.index
    if settings.online:
        return run_online_round(plan, files, policy, progress=progress)
    rows = sample_round(plan, files, policy, progress=progress)
    judge = load_judge(settings.judge, device=_device(plan.config))
    scores = score_candidates(judge, rows)
    pairs, stats = pairs_from_candidates(rows, scores, mode=settings.pair_mode, min_gap=settings.min_gap)
    if not pairs:
        raise DataError(f"round {index}: every pair was a tie (score gap <= {settings.min_gap}); nothing to train on",
                        file=str(files.candidates))
    if not files.pairs.is_file():  # kept once written: the training run being resumed read this file
        atomic.write_jsonl(files.pairs, pairs)
    flat = [value for row in scores for value in row]
    metrics: dict[str, Any] = {
        "round": index, "policy": policy, "prompts": len(rows), "responses": len(flat),
        "sample_reward": {"mean": math.fsum(flat) / len(flat),
                          "per_prompt_best": math.fsum(max(row) for row in scores) / len(scores)},
        "pairs": stats.pairs, "ties_skipped": stats.ties_skipped,
    }
    round_config = round_training_config(plan, files, policy)
    metrics["train"] = train_round(round_config, files, callbacks=callbacks)
    if plan.lora and not (files.merged / "model.safetensors").is_file():
        from preftune.adapters import export_merged

        export_merged(files.model, files.merged, base_model=policy)
    metrics.update(evaluate_round(plan, round_config, files, judge, progress=progress))
    return metrics


def sample_round(plan: LoopPlan, files: RoundFiles, policy: str, *, progress: bool = True) -> list[dict]:
    """The round's candidates: sampled now for the prompts not yet in `files.candidates` (appended after each
    batch), then read back in the round's prompt order."""
    from preftune.generation import append_candidates, candidate_row, iter_generate, read_candidates
    from preftune.models import load_causal_lm, load_tokenizer

    prompts = plan.round_prompts[files.index - 1]
    params = round_sampling(plan, files.index)
    done = _sampled_ids(files.candidates, params)
    todo = [(key, prompt) for key, prompt in prompts if key not in done]
    if todo:
        tokenizer = load_tokenizer(plan.config.tokenizer_name_or_path or policy, key="model_name_or_path")
        model = load_causal_lm(policy, key="model_name_or_path").to(_device(plan.config))
        keys = [key for key, _ in todo]
        for indices, samples in iter_generate(model, tokenizer, [p for _, p in todo], params,
                                              template=plan.config.template, keys=keys, progress=progress):
            append_candidates(files.candidates, [
                candidate_row(keys[i], todo[i][1], [s.text for s in group], policy, params)
                for i, group in zip(indices, samples)])
        del model
    by_id = {row["prompt_id"]: row for row in read_candidates(files.candidates)}
    return [by_id[key] for key, _ in prompts]


def round_sampling(plan: LoopPlan, index: int):
    """The round's `SamplingParams` (seed `sampling_seed + index - 1`)."""
    from preftune.generation import SamplingParams

    settings = plan.settings
    seed = settings.sampling_seed if settings.sampling_seed is not None else plan.config.seed
    return SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                          max_new_tokens=settings.max_new_tokens, num_samples=settings.num_samples,
                          seed=seed + index - 1, batch_size=settings.sampling_batch_size)


def _sampled_ids(path: Path, params) -> set[str]:
    """Prompt ids already in a round's candidates file (a torn last line cut off); a row sampled with other
    settings is a ConfigError (the loop's config changed between runs)."""
    from preftune.generation import read_candidates

    if not path.is_file():
        return set()
    rows = read_candidates(path, repair=True)
    for row in rows:
        if row.get("sampling") != params.record() or len(row["responses"]) != params.num_samples:
            raise ConfigError(f"{path} holds candidates sampled with {row.get('sampling')} x {len(row['responses'])}; "
                              f"this run samples with {params.record()} x {params.num_samples}. Restore the "
                              "loop settings or use another output_dir", key="loop")
    if rows:
        logger.info("round %s: resuming sampling, %d prompts already in %s", path.parent.name, len(rows), path)
    return {row["prompt_id"] for row in rows}


def round_training_config(plan: LoopPlan, files: RoundFiles, policy: str) -> DPOConfig:
    """The config that trains round `files.index`: the loop config's training settings on the round's pairs."""
    from preftune.losses import LossParams

    config = plan.config
    needs_reference = LossParams.from_config(config).needs_reference
    reference = (plan.initial_reference if plan.settings.reference == "initial" else policy) if needs_reference else None
    if plan.lora and reference == policy and not config.ref_model_name_or_path:
        reference = None  # the adapter-disabled policy is the round's starting model: no second copy
    updates: dict[str, Any] = {
        "model_name_or_path": policy, "ref_model_name_or_path": reference, "dataset": str(files.pairs),
        "dataset_dir": None, "output_dir": str(files.model), "loop": None, "do_train": True,
        "tokenizer_name_or_path": config.tokenizer_name_or_path or plan.initial_model,
    }
    if plan.settings.steps_per_round is not None:
        updates["max_steps"] = plan.settings.steps_per_round
    return config.model_copy(update=updates)


def train_round(config: DPOConfig, files: RoundFiles, *, callbacks: Sequence[Any] | None = None) -> dict[str, Any]:
    """Train the round's model unless it is finished (its `summary.json` and weights exist); resume from the
    newest checkpoint in `files.model` when there is one. Returns the run's `summary.json` metrics."""
    from preftune.trainer import DPOTrainer

    if not _model_finished(files.model):
        resume = "latest" if any(files.model.glob("checkpoint-*")) else None
        if resume:
            logger.info("round %d: resuming training from the newest checkpoint in %s", files.index, files.model)
        trainer = DPOTrainer(args=config.model_copy(update={"resume_from_checkpoint": resume}),
                             callbacks=list(callbacks or []))
        trainer.train()
        del trainer
    summary = _read_json(files.model / "summary.json")
    last = summary.get("train") or {}
    return {"global_step": summary.get("global_step"), "train_loss": summary.get("training_loss_mean"),
            "last_step": {key: last[key] for key in ("loss", "rewards/margins", "rewards/accuracies") if key in last},
            "summary": str(files.model / "summary.json")}


def _model_finished(folder: Path) -> bool:
    weights = ("model.safetensors", "adapter_model.safetensors")
    return (folder / "summary.json").is_file() and any((folder / name).is_file() for name in weights)


# ---------------------------------------------------------------------------------------------- online rounds
def online_steps(plan: LoopPlan, index: int) -> int:
    """Optimizer steps of an online round: `loop.steps_per_round`, else `max_steps` (> 0), else enough batches of
    `per_device_train_batch_size × gradient_accumulation_steps` prompts for `num_train_epochs` passes."""
    config = plan.config
    if plan.settings.steps_per_round is not None:
        return plan.settings.steps_per_round
    if config.max_steps > 0:
        return config.max_steps
    prompts = len(plan.round_prompts[index - 1])
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return max(1, math.ceil(prompts * config.num_train_epochs / per_step))


def run_online_round(plan: LoopPlan, files: RoundFiles, policy: str, *, progress: bool = True) -> dict[str, Any]:
    """An online-DPO round (`preftune.online`): `online_steps` steps from `policy`, each sampling two responses per
    prompt of its batch (the round's prompts in order, cycled; seeds keyed by step and prompt id), judging them
    and taking the DPO step. Writes `online.jsonl` (one line per step: metrics and each prompt's responses,
    scores and choice) and the model to `files.model` (with LoRA: the adapter there, the merged model in
    `files.merged`); then evaluates as an iterative round does.

    With `save_strategy: steps`, `online-checkpoint/` is replaced every `save_steps` steps; an interrupted round
    continues after it (exactly: the samples are seeded by step and prompt), or from its first step without one.
    A round whose training finished (its model written) is not trained again."""
    from preftune.online import resolve_judge

    settings, index = plan.settings, files.index
    config = round_training_config(plan, files, policy)
    log = files.folder / "online.jsonl"
    trained = files.model.is_dir() and (not plan.lora or (files.merged / "model.safetensors").is_file())
    if trained:
        logger.info("round %d: online training finished earlier (%s)", index, files.model)
        done = _online_log(log)
        records = [record for row in done for record in row["records"]]
        history = [{key: value for key, value in row.items() if key != "records"} for row in done]
        judge = resolve_judge(settings.judge, device=_device(config))
    else:
        judge, records, history = train_online_round(plan, config, files, policy, progress=progress)
    return {"round": index, "policy": policy, "mode": "online", **online_round_metrics(records, history),
            **evaluate_round(plan, config, files, judge, progress=progress)}


def train_online_round(plan: LoopPlan, config: DPOConfig, files: RoundFiles, policy: str, *, progress: bool = True
                       ) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """Train an online round's model (from its checkpoint when there is one): (the judge, every prompt's record,
    every step's metrics)."""
    import shutil

    import torch

    from preftune.generation import append_candidates
    from preftune.losses import LossParams
    from preftune.models import disable_dropout, load_causal_lm, load_tokenizer
    from preftune.online import OnlineDPO, load_checkpoint, resolve_judge, run_online, save_checkpoint
    from preftune.optim import build_adamw, build_scheduler

    settings, index = plan.settings, files.index
    device = _device(config)
    tokenizer = load_tokenizer(str(config.tokenizer_name_or_path), key="model_name_or_path")
    torch.manual_seed(config.seed)
    model = load_causal_lm(policy, key="model_name_or_path").to(device)
    reference = None
    if config.ref_model_name_or_path:
        reference = load_causal_lm(config.ref_model_name_or_path, key="ref_model_name_or_path").to(device)
    if config.disable_dropout:
        for loaded in (model, reference):
            if loaded is not None:
                disable_dropout(loaded)
    if plan.lora:  # a fresh adapter; without a reference model given, the adapter-disabled model is the reference
        from preftune.adapters import apply_lora, lora_config_from_args

        model = apply_lora(model, lora_config_from_args(config))
    judge = resolve_judge(settings.judge, device=device)
    steps = online_steps(plan, index)
    optimizer = build_adamw(model, config)
    trainer = OnlineDPO(model, tokenizer, judge, loss=LossParams.from_config(config),
                        sampling=round_sampling(plan, index), reference=reference, optimizer=optimizer,
                        scheduler=build_scheduler(optimizer, config, steps),
                        missing_eos_penalty=settings.missing_eos_penalty, max_length=config.max_length,
                        max_grad_norm=config.max_grad_norm, template=config.template)
    log, checkpoint = files.folder / "online.jsonl", files.folder / "online-checkpoint"
    start = load_checkpoint(trainer, checkpoint) if checkpoint.is_dir() else 0
    if start:
        logger.info("round %d: resuming online training after step %d (%s)", index, start, checkpoint)
    done = [row for row in _online_log(log) if row["step"] <= start]
    atomic.write_jsonl(log, done)  # steps after the checkpoint (or all, without one) are taken again
    records = [record for row in done for record in row["records"]]
    history = [{key: value for key, value in row.items() if key != "records"} for row in done]
    every = config.save_steps if config.save_steps >= 1 else math.ceil(config.save_steps * steps)

    def write_step(step: int, result) -> None:
        records.extend(result.records)
        append_candidates(log, [atomic.finite_json({"step": step, **result.metrics, "records": result.records})])
        if config.save_strategy == "steps" and step % every == 0 and step < steps:
            save_checkpoint(trainer, checkpoint, step)
        if progress:
            logger.info("round %d step %d/%d: loss %.4f", index, step, steps, result.metrics.get("loss", float("nan")))

    history += run_online(trainer, plan.round_prompts[index - 1], steps, batch_size=config.per_device_train_batch_size,
                          accumulation=config.gradient_accumulation_steps, on_step=write_step, start=start)

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    atomic.write_folder(files.model, save)  # with LoRA: the adapter
    if plan.lora:
        from preftune.adapters import merge_and_save

        merge_and_save(model, tokenizer, files.merged)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return judge, records, history


def _online_log(path: Path) -> list[dict[str, Any]]:
    """The whole step lines of an online round's log (a line torn by a kill, and anything after it, dropped)."""
    import json

    rows: list[dict[str, Any]] = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def online_round_metrics(records: list[dict[str, Any]], history: list[dict[str, Any]]) -> dict[str, Any]:
    """An online round's counts, the mean score of its samples (scoring judges) and its training summary."""
    pairs = [record["scores"] for record in records if record["scores"] is not None]
    flat = [score for pair in pairs for score in pair]
    losses = [row["loss"] for row in history if "loss" in row]
    return {
        "prompts": len(records), "responses": 2 * len(records),
        "sample_reward": {"mean": math.fsum(flat) / len(flat),
                          "per_prompt_best": math.fsum(max(pair) for pair in pairs) / len(pairs)} if pairs else None,
        "pairs": sum(record["chosen"] is not None for record in records), "ties_skipped": 0,
        "train": {"global_step": len(history), "train_loss": math.fsum(losses) / len(losses) if losses else None,
                  "last_step": {key: value for key, value in history[-1].items() if key != "step"} if history else {}},
    }


def evaluate_round(plan: LoopPlan, round_config: DPOConfig, files: RoundFiles, judge: Any, *,
                   progress: bool = True) -> dict[str, Any]:
    """`{"eval_pairs": ...}` (held-out pairs, when the config has `eval_dataset`) and `{"eval_generation": ...}`
    (with `loop.eval_prompts`: sampled from the round's model and the initial model, judged, KL to the initial
    model) for the round's finished model."""
    from preftune.evaluation import evaluate_generations
    from preftune.losses import LossParams
    from preftune.models import load_causal_lm, load_tokenizer

    results: dict[str, Any] = {}
    if plan.config.eval_dataset:
        from preftune.trainer import DPOTrainer

        reference = round_config.ref_model_name_or_path
        if plan.lora and reference is None and LossParams.from_config(round_config).needs_reference:
            reference = round_config.model_name_or_path  # what the adapter-disabled reference was
        eval_config = round_config.model_copy(update={
            "model_name_or_path": str(plan.trained_policy(files)), "ref_model_name_or_path": reference,
            "finetuning_type": "full", "do_train": False, "dataset": None,
            "output_dir": str(files.folder / "eval"), "precompute_ref_log_probs": False, "plot_loss": False})
        trainer = DPOTrainer(args=eval_config, eval_dataset=plan.config.eval_dataset)
        metrics = trainer.evaluate()
        results["eval_pairs"] = {key: value for key, value in metrics.items() if key != "eval_runtime"}
        del trainer
    if plan.eval_prompts:
        device = _device(plan.config)
        tokenizer = load_tokenizer(round_config.tokenizer_name_or_path or plan.initial_model, key="model_name_or_path")
        policy = load_causal_lm(str(plan.trained_policy(files)), key="model_name_or_path").to(device)
        reference = load_causal_lm(plan.initial_model, key="model_name_or_path").to(device)
        settings = plan.settings
        params = round_sampling(plan, 1)  # the same seeds every round: rounds differ by their model only
        params = type(params)(temperature=params.temperature, top_p=params.top_p, max_new_tokens=params.max_new_tokens,
                              num_samples=settings.eval_num_samples, seed=params.seed, batch_size=params.batch_size)
        results["eval_generation"] = evaluate_generations(policy, reference, tokenizer, plan.eval_prompts, judge, params,
                                                          template=plan.config.template, progress=progress)
    return results


# --------------------------------------------------------------------------------------------------------- summary
def write_summary(plan: LoopPlan, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """`output_dir/summary.json` (every finished round's metrics, the loop settings and the config) and
    `summary.png` (sample reward per round; eval reward and KL when measured)."""
    output_dir = Path(plan.config.output_dir)
    summary = {"rounds_planned": plan.settings.rounds, "rounds_done": len(rounds), "loop": plan.settings.to_dict(),
               "rounds": rounds, "config": plan.config.to_dict()}
    summary = atomic.finite_json(summary)
    atomic.write_json(output_dir / "summary.json", summary, default=str)
    plot_summary(rounds, output_dir / "summary.png")
    return summary


def plot_summary(rounds: list[dict[str, Any]], path: Path) -> Path | None:
    """Panels by round: mean judge score of the round's samples (and of the eval samples); sampled KL to the initial
    model when measured. None when there are no rounds."""
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from preftune.metrics import save_figure

    xs = [r["round"] for r in rounds]
    generation = [r.get("eval_generation") or {} for r in rounds]
    has_kl = all(g.get("kl") for g in generation)
    figure, axes = plt.subplots(1, 2 if has_kl else 1, figsize=(9 if has_kl else 5, 3.5), squeeze=False)
    reward = axes[0][0]
    if all(r.get("sample_reward") for r in rounds):  # none with a pairwise judge
        reward.plot(xs, [r["sample_reward"]["mean"] for r in rounds], "o-", label="round samples (while training)"
                    if rounds[0].get("mode") == "online" else "round samples (before training)")
    if all(g.get("reward") for g in generation):
        reward.errorbar(xs, [g["reward"]["policy"]["mean"] for g in generation],
                        yerr=[g["reward"]["policy"].get("stderr") or 0 for g in generation], fmt="s-",
                        label="eval samples (after training)", capsize=3)
    reward.set_xlabel("round")
    reward.set_ylabel("mean judge score")
    reward.legend(fontsize=8)
    if has_kl:
        kl = axes[0][1]
        kl.errorbar(xs, [g["kl"]["mean"] for g in generation], yerr=[g["kl"].get("stderr") or 0 for g in generation],
                    fmt="o-", capsize=3)
        kl.set_xlabel("round")
        kl.set_ylabel("KL to the initial model (nats)")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)
    return path


def load_loop_config(path: str, overrides: Sequence[str]) -> DPOConfig:
    """The config with ``key=value`` overrides; ``loop.<key>=value`` ones set keys of the loop section."""
    loop_items = [item for item in overrides if item.startswith("loop.")]
    config = load_config(path, [item for item in overrides if not item.startswith("loop.")])
    if not loop_items:
        return config
    section = dict(config.loop or {})
    section.update({key[len("loop."):]: value for key, value in parse_overrides(loop_items).items()})
    return config.model_copy(update={"loop": LoopConfig.from_mapping(section, file=path).to_dict()})


# --------------------------------------------------------------------------------------------------------- helpers
def _device(config: DPOConfig) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read ({error})", file=str(path)) from None


