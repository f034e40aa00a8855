"""Online DPO: per batch of prompts, two completions from the current policy, judged, one DPO step on the pair.

The semantics are those of TRL's experimental `OnlineDPOTrainer` (Guo et al. 2024, "Direct Language Model
Alignment from Online AI Feedback"):

1. each prompt of the batch gets two completions sampled from the current policy (`preftune.generation`: seeded
   per sample, so a run is reproducible; a completion ends at the first stop token, which it keeps);
2. the judge decides which one is chosen. A scoring judge (a reward function or a reward model,
   `preftune.judges.load_judge`; or any callable `fn(prompts, responses) -> list[float]`) scores both, minus
   `missing_eos_penalty` for a completion that ran to `max_new_tokens` without a stop token; the first is chosen
   when its score is >= the second's (TRL's tie rule). A pairwise judge (`compare(prompt, a, b) -> 1.0 | 0.5 | 0.0 |
   None`, e.g. `preftune.judges.PairwiseLabels`) chooses the first when it returns >= 0.5; a pair it cannot judge
   (None) is left out of the step;
3. the loss is preftune's (`preftune.losses.compute_preference_loss`, any paired `loss_type`) on the log-probs
   summed over the completion tokens under the policy and the reference; `sigmoid` is TRL's loss exactly. TRL's
   `OnlineDPOTrainer` `ipo` uses the summed log-ratios, preftune's `ipo` the length-normalised ones (as TRL's
   `DPOTrainer`);
4. the reference is a frozen copy of the policy as it was before the first step (TRL's `create_reference_model`),
   the adapter-disabled base for a peft policy, or the model given.

Each step's metrics carry TRL's names: `loss`, `objective/kl` (Σ log π − log π_ref over a completion, mean over the
2B completions), `objective/entropy` (−Σ log π, mean), `objective/non_score_reward` (−β·KL), `objective/rlhf_reward`
(score − β·KL), `objective/scores` (mean score), `objective/scores_margin` (chosen − rejected score),
`rewards/chosen|rejected|margins|accuracies`, `logps/chosen|rejected` and `val/contain_eos_token`, and `beta`.

`OnlineDPO` holds the models, judge and optimizer (`step(prompts)`); `run_online` takes several steps;
`save_checkpoint`/`load_checkpoint` write and restore what continuing needs; `preftune.loop` runs it as
`loop.online: true`.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from preftune import atomic
from preftune.errors import CheckpointError, ConfigError, DataError
from preftune.generation import GeneratedSample, SamplingParams, iter_generate
from preftune.judges import FunctionJudge, PairwiseLabels, load_judge
from preftune.logprobs import token_logps
from preftune.losses import LossInputs, LossParams, compute_preference_loss
from preftune.models import model_device

COMPLETIONS_PER_PROMPT = 2


# ------------------------------------------------------------------------------------------------------ judges
def resolve_judge(judge: Any, *, device=None) -> Any:
    """A judge object from what a user gives: a spec string (`package.module:function`, a reward-model directory,
    or a `.jsonl`/`.json` pairwise-labels file), a callable `fn(prompts, responses) -> list[float]`, or an object
    with `score(prompts, responses)` or `compare(prompt, a, b)` (returned as it is)."""
    if isinstance(judge, (str, Path)):
        path = Path(judge)
        if path.is_file() and path.suffix in (".jsonl", ".json"):
            return PairwiseLabels.from_file(path)
        return load_judge(str(judge), device=device)
    if hasattr(judge, "score") or hasattr(judge, "compare"):
        return judge
    if callable(judge):
        return FunctionJudge(name=getattr(judge, "__name__", "reward function"), function=judge)
    raise ConfigError(f"expected a judge: a spec string, a reward function, or an object with score() or compare(); "
                      f"got {type(judge).__name__}", key="judge")


def is_pairwise(judge: Any) -> bool:
    return not hasattr(judge, "score") and hasattr(judge, "compare")


@dataclass
class JudgedPairs:
    """The judge's verdict on a batch: `first_chosen[i]` (the first completion of prompt i wins), `judged[i]`
    (False: a pairwise judge had no verdict; the pair is left out), and the scores of the 2B completions
    (first completions then second ones, penalty applied) for a scoring judge, else None."""

    first_chosen: list[bool]
    judged: list[bool]
    scores: list[float] | None


def judge_pairs(judge: Any, prompts: Sequence[Any], first: Sequence[GeneratedSample],
                second: Sequence[GeneratedSample], *, missing_eos_penalty: float | None = None) -> JudgedPairs:
    """Which completion of each prompt is chosen (see the module docstring for the rules)."""
    if is_pairwise(judge):
        if missing_eos_penalty is not None:
            raise ConfigError("missing_eos_penalty needs a scoring judge (a reward function or model), not "
                              "pairwise labels", key="missing_eos_penalty")
        verdicts = [judge.compare(prompt, a.text, b.text) for prompt, a, b in zip(prompts, first, second)]
        return JudgedPairs([v is not None and v >= 0.5 for v in verdicts], [v is not None for v in verdicts], None)
    samples = list(first) + list(second)
    scores = [float(value) for value in judge.score(list(prompts) * 2, [sample.text for sample in samples])]
    if missing_eos_penalty is not None:
        scores = [score - (0.0 if sample.stopped else missing_eos_penalty) for score, sample in zip(scores, samples)]
    count = len(prompts)
    return JudgedPairs([scores[i] >= scores[count + i] for i in range(count)], [True] * count, scores)


# --------------------------------------------------------------------------------------------------- log-probs
def completion_logps(model: nn.Module, samples: Sequence[GeneratedSample], *, max_length: int | None = None,
                     pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """(Σ log p of each completion's tokens given its prompt, completion token counts), both `(N,)` float32.

    One right-padded forward over prompt + completion rows; a row longer than `max_length` loses prompt tokens
    from the left (TRL's `OnlineDPOTrainer` truncation; the completion is kept whole).
    """
    rows, starts = [], []
    for sample in samples:
        prompt = sample.prompt_ids
        if max_length is not None and len(prompt) + len(sample.completion_ids) > max_length:
            prompt = prompt[max(0, len(prompt) + len(sample.completion_ids) - max_length):]
        if not prompt or not sample.completion_ids:
            raise DataError("a sampled row has no prompt token or no completion token left to score; raise "
                            "max_length or lower max_new_tokens", field="prompt")
        rows.append(list(prompt) + list(sample.completion_ids))
        starts.append(len(prompt))
    device = model_device(model)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], device=device)
    attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    scored = torch.zeros_like(input_ids, dtype=torch.bool)  # positions whose next token is a completion token
    for index, (row, start) in enumerate(zip(rows, starts)):
        scored[index, start - 1: len(row) - 1] = True
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    targets = input_ids[:, 1:][scored[:, :-1]]
    values, _ = token_logps(logits[:, :-1][scored[:, :-1]], targets)
    owners = scored[:, :-1].nonzero()[:, 0]
    sums = torch.zeros(len(rows), device=values.device, dtype=values.dtype).index_add(0, owners, values)
    lengths = torch.tensor([len(s.completion_ids) for s in samples], device=values.device, dtype=values.dtype)
    return sums, lengths


# ------------------------------------------------------------------------------------------------- the trainer
@dataclass
class OnlineStep:
    """One micro-batch: the loss (with its graph; None when no pair was judged), TRL-named metrics, and a record of
    each prompt's completions and verdict."""

    loss: Tensor | None
    metrics: dict[str, float]
    records: list[dict[str, Any]]


class OnlineDPO:
    """Online DPO on a policy in memory.

    Args:
        policy: the causal LM trained (a peft model trains its adapter; the reference is then the base).
        tokenizer: its tokenizer.
        judge: see `resolve_judge`.
        loss: `LossParams` (any paired loss; default DPO's sigmoid at β = 0.1).
        sampling: temperature, top_p, max_new_tokens and seed of the completions (`num_samples` is ignored: two).
        reference: the reference model; None: a frozen copy of `policy` now (adapter disabled for a peft policy).
        optimizer, scheduler: stepped by `step`; None: AdamW at `learning_rate`, no schedule.
        missing_eos_penalty: subtracted from the score of a completion without a stop token (scoring judges).
        max_length: most tokens of prompt + completion scored (prompt cut from the left).
        max_grad_norm: gradient clipping (0 or None: none).
        template: chat template of conversation prompts (as `preftune sample`).
    """

    def __init__(self, policy: nn.Module, tokenizer: Any, judge: Any, *, loss: LossParams | None = None,
                 sampling: SamplingParams | None = None, reference: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 learning_rate: float = 5e-7, missing_eos_penalty: float | None = None,
                 max_length: int | None = None, max_grad_norm: float | None = 1.0, template: str | None = None):
        from preftune.adapters import is_peft_model

        self.policy, self.tokenizer, self.judge = policy, tokenizer, resolve_judge(judge)
        self.loss = loss or LossParams()
        self.loss.validate()
        if self.loss.is_unpaired or self.loss.use_weighting:
            raise ConfigError("online DPO takes a paired loss without WPO weighting (not kto, not use_weighting)",
                              key="loss_type")
        base = sampling or SamplingParams(temperature=0.9)
        self.sampling = SamplingParams(temperature=base.temperature, top_p=base.top_p,
                                       max_new_tokens=base.max_new_tokens, num_samples=COMPLETIONS_PER_PROMPT,
                                       seed=base.seed, batch_size=max(base.batch_size, COMPLETIONS_PER_PROMPT),
                                       stop_token_ids=base.stop_token_ids)
        self.adapter_reference = reference is None and is_peft_model(policy)
        self.reference = None
        if self.loss.needs_reference and not self.adapter_reference:
            self.reference = reference if reference is not None else copy.deepcopy(policy)
            self.reference.eval().requires_grad_(False)
        self.optimizer = optimizer or torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                                        lr=learning_rate)
        self.scheduler = scheduler
        self.missing_eos_penalty = missing_eos_penalty
        self.max_length = max_length
        self.max_grad_norm = max_grad_norm
        self.template = template
        self.pad_id = next(v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if v is not None)

    # -- pieces
    def sample(self, prompts: Sequence[Any], keys: Sequence[object]) -> tuple[list[GeneratedSample], list[GeneratedSample]]:
        """Two completions per prompt from the current policy: (first ones, second ones). `keys` seed the samples
        (give each step's prompts their own keys, e.g. "step/prompt_id")."""
        was_training = self.policy.training
        groups: list[list[GeneratedSample]] = [[] for _ in prompts]
        for indices, samples in iter_generate(self.policy, self.tokenizer, list(prompts), self.sampling,
                                              template=self.template, keys=list(keys), progress=False):
            for index, group in zip(indices, samples):
                groups[index] = group
        self.policy.train(was_training)
        return [group[0] for group in groups], [group[1] for group in groups]

    def pair_loss(self, prompts: Sequence[Any], first: Sequence[GeneratedSample],
                  second: Sequence[GeneratedSample]) -> OnlineStep:
        """Judge the pairs and compute the loss (with its graph) and the step's metrics."""
        verdict = judge_pairs(self.judge, prompts, first, second, missing_eos_penalty=self.missing_eos_penalty)
        samples = list(first) + list(second)
        count = len(prompts)
        logps, lengths = completion_logps(self.policy, samples, max_length=self.max_length, pad_id=self.pad_id)
        ref_logps = self._reference_logps(samples)
        kept = [i for i in range(count) if verdict.judged[i]]
        chosen = torch.tensor([i if verdict.first_chosen[i] else count + i for i in kept], dtype=torch.long,
                              device=logps.device)
        rejected = torch.tensor([count + i if verdict.first_chosen[i] else i for i in kept], dtype=torch.long,
                                device=logps.device)
        records = [{"prompt": prompt, "completions": [a.text, b.text], "stopped": [a.stopped, b.stopped],
                    "scores": None if verdict.scores is None else [verdict.scores[i], verdict.scores[count + i]],
                    "chosen": None if not verdict.judged[i] else (0 if verdict.first_chosen[i] else 1)}
                   for i, (prompt, a, b) in enumerate(zip(prompts, first, second))]
        metrics = self._sequence_metrics(logps, ref_logps, samples, verdict)
        if not kept:
            return OnlineStep(None, {**metrics, "pairs": 0.0}, records)
        inputs = LossInputs(logps[chosen], logps[rejected],
                            None if ref_logps is None else ref_logps[chosen],
                            None if ref_logps is None else ref_logps[rejected],
                            chosen_lengths=lengths[chosen], rejected_lengths=lengths[rejected])
        output = compute_preference_loss(self.loss, inputs)
        loss = output.per_example.mean()
        margins = output.chosen_rewards - output.rejected_rewards
        metrics.update({
            "loss": float(loss.detach()), "pairs": float(len(kept)),
            "rewards/chosen": float(output.chosen_rewards.mean()), "rewards/rejected": float(output.rejected_rewards.mean()),
            "rewards/margins": float(margins.mean()), "rewards/accuracies": float((margins > 0).float().mean()),
            "logps/chosen": float(logps[chosen].detach().mean()), "logps/rejected": float(logps[rejected].detach().mean()),
        })
        if verdict.scores is not None:
            scores = torch.tensor(verdict.scores)
            metrics["objective/scores_margin"] = float((scores[chosen.cpu()] - scores[rejected.cpu()]).mean())
        return OnlineStep(loss, metrics, records)

    def _reference_logps(self, samples: Sequence[GeneratedSample]) -> Tensor | None:
        if not self.loss.needs_reference:
            return None
        with torch.no_grad():
            if self.adapter_reference:
                with self.policy.disable_adapter():
                    return completion_logps(self.policy, samples, max_length=self.max_length, pad_id=self.pad_id)[0]
            return completion_logps(self.reference, samples, max_length=self.max_length, pad_id=self.pad_id)[0]

    def _sequence_metrics(self, logps: Tensor, ref_logps: Tensor | None, samples: Sequence[GeneratedSample],
                          verdict: JudgedPairs) -> dict[str, float]:
        beta = self.loss.beta
        metrics = {"objective/entropy": float(-logps.detach().mean()),
                   "val/contain_eos_token": sum(s.stopped for s in samples) / len(samples), "beta": beta}
        if ref_logps is not None:
            kl = logps.detach() - ref_logps
            metrics.update({"objective/kl": float(kl.mean()), "objective/non_score_reward": float(-beta * kl.mean())})
        if verdict.scores is not None:
            scores = torch.tensor(verdict.scores, dtype=torch.float32)
            metrics["objective/scores"] = float(scores.mean())
            if ref_logps is not None:
                metrics["objective/rlhf_reward"] = float((scores - beta * kl.cpu()).mean())
        return metrics

    # -- one optimizer step
    def step(self, prompts: Sequence[Any], keys: Sequence[object], *, accumulation: int = 1) -> OnlineStep:
        """Sample, judge and take one optimizer step over `accumulation` equal micro-batches of `prompts`
        (gradients of each micro-batch's mean loss / accumulation). Returns the metrics averaged over the
        micro-batches (`grad_norm` and `learning_rate` added) and every prompt's record."""
        self.policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        size = math.ceil(len(prompts) / accumulation)
        parts: list[OnlineStep] = []
        for start in range(0, len(prompts), size):
            chunk, chunk_keys = list(prompts[start: start + size]), list(keys[start: start + size])
            first, second = self.sample(chunk, chunk_keys)
            self.policy.train()
            part = self.pair_loss(chunk, first, second)
            if part.loss is not None:
                (part.loss / accumulation).backward()
            parts.append(part)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm or float("inf"))
        metrics = _mean_metrics([part.metrics for part in parts])
        metrics["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        if any(part.loss is not None for part in parts):
            self.optimizer.step()
            metrics["grad_norm"] = float(norm)
        if self.scheduler is not None:
            self.scheduler.step()
        return OnlineStep(None, metrics, [record for part in parts for record in part.records])


def _mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {key for row in rows for key in row}
    return {key: sum(row[key] for row in rows if key in row) / sum(key in row for row in rows) for key in sorted(keys)}


def batch_prompts(prompts: Sequence[tuple[str, Any]], step: int, size: int) -> list[tuple[str, Any]]:
    """The prompts of optimizer step `step` (0-based): the next `size` (id, prompt) items, cycling through them."""
    return [prompts[(step * size + offset) % len(prompts)] for offset in range(size)]


def run_online(trainer: OnlineDPO, prompts: Sequence[tuple[str, Any]], steps: int, *, batch_size: int,
               accumulation: int = 1, on_step: Callable[[int, OnlineStep], None] | None = None,
               start: int = 0) -> list[dict]:
    """Optimizer steps `start + 1` .. `steps` over `prompts` ((id, prompt) items, taken in order and cycled),
    `batch_size` prompts per micro-batch; completion seeds are keyed by "step/prompt_id", so the steps after a
    resumed checkpoint sample what an uninterrupted run would. Returns each step's metrics (`step`: 1-based);
    `on_step(step, result)` is called after each."""
    history = []
    for step in range(start, steps):
        items = batch_prompts(prompts, step, batch_size * accumulation)
        result = trainer.step([p for _, p in items], [f"{step}/{key}" for key, _ in items], accumulation=accumulation)
        history.append({"step": step + 1, **result.metrics})
        if on_step is not None:
            on_step(step + 1, result)
    return history


# ---------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(trainer: OnlineDPO, folder: str | Path, step: int) -> Path:
    """Write (atomically, replacing `folder`) what continuing after optimizer step `step` needs: the trainable
    weights (`trainable.safetensors`), the optimizer's and the schedule's states and `state.json`. The samples need
    no random state: they are seeded by step and prompt."""
    from safetensors.torch import save_file

    def write(staging: Path) -> None:
        weights = {name: p.detach().cpu().contiguous() for name, p in trainer.policy.named_parameters() if p.requires_grad}
        save_file(weights, str(staging / "trainable.safetensors"))
        torch.save(trainer.optimizer.state_dict(), staging / "optimizer.pt")
        if trainer.scheduler is not None:
            torch.save(trainer.scheduler.state_dict(), staging / "scheduler.pt")
        (staging / "state.json").write_text(json.dumps({"step": step}), encoding="utf-8")

    return atomic.write_folder(folder, write)


def load_checkpoint(trainer: OnlineDPO, folder: str | Path) -> int:
    """Restore a `save_checkpoint` folder into `trainer` (built as for the run that wrote it); returns its step.
    CheckpointError naming the folder when it does not fit the policy or cannot be read."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        step = int(json.loads((folder / "state.json").read_text(encoding="utf-8"))["step"])
        weights = load_file(str(folder / "trainable.safetensors"))
        parameters = {name: p for name, p in trainer.policy.named_parameters() if p.requires_grad}
        if set(weights) != set(parameters):
            raise CheckpointError(f"{folder} holds weights of another model ({len(weights)} trainable tensors, this "
                                  f"policy has {len(parameters)}); remove it to start the round again")
        with torch.no_grad():
            for name, value in weights.items():
                parameters[name].copy_(value)
        device = model_device(trainer.policy)
        trainer.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
        if trainer.scheduler is not None:
            trainer.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"cannot resume from {folder}: {str(error).strip().splitlines()[0]}") from None
    return step

