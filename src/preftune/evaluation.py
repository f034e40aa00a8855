"""Evaluation of a trained policy against its reference: statistics, generation-based evaluation, result files.

Statistics (pure functions):

- **Win rate** of the policy over the reference, one outcome per prompt: 1 when the policy's responses score
  higher (mean judge score over its samples of that prompt) than the reference's, 0.5 when equal (within
  ``tie_tolerance``), 0 when lower; or, with a pairwise judge, the mean of its known verdicts on that prompt. The
  rate is the mean outcome (ties count half), with a **Wilson score interval** computed from that rate and the
  number of prompts (no bootstrap; deterministic).
- **Sampled KL**: ``KL(π‖π_ref) = E_{y~π(·|x)} Σ_t [log π(y_t|x, y_<t) − log π_ref(y_t|x, y_<t)]`` estimated by the
  mean over the policy's own samples of their summed log-ratio (nats). The samples of one prompt are averaged
  first, and the mean and standard error are taken over prompts (samples of a prompt are not independent). It is
  an unbiased KL estimate only for samples at temperature 1 and top_p 1; otherwise it is the same log-ratio
  averaged over tempered samples (``kl.exact_sampling`` says which).
- **Mean reward**: the judge's score, averaged per prompt, then mean ± standard error over prompts.

Generation-based evaluation (``evaluate_generations``) samples from policy and reference with
``preftune.generation``, scores with a judge (``preftune.judges``), and scores the policy's samples under both
models with ``preftune.logprobs``. ``run_eval`` is what ``preftune eval`` runs: held-out reward metrics through
``DPOTrainer.evaluate()``, generation-based evaluation when a judge is given, then ``eval_results.json`` and
``eval_results.png``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from preftune import atomic
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error (``stdev / sqrt(n)``, sample standard deviation; None for n < 2)."""

    mean: float
    stderr: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "stderr": self.stderr, "n": self.n}


def mean_with_stderr(values: Sequence[float]) -> Estimate:
    """Mean and standard error of ``values`` (ValueError when empty)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = math.fsum(values) / n
    if n < 2:
        return Estimate(mean, None, n)
    variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1)
    return Estimate(mean, math.sqrt(variance / n), n)


def per_prompt_mean(groups: Sequence[Sequence[float]]) -> Estimate:
    """Average each prompt's values, then ``mean_with_stderr`` over prompts."""
    if any(len(group) == 0 for group in groups):
        raise ValueError("a prompt without values")
    return mean_with_stderr([math.fsum(group) / len(group) for group in groups])


def sampled_kl(policy_logps: Sequence[Sequence[float]], reference_logps: Sequence[Sequence[float]]) -> Estimate:
    """KL(π‖π_ref) from the policy's samples: ``policy_logps[i][s]`` and ``reference_logps[i][s]`` are the summed
    log-probs (nats) of sample s of prompt i under each model; the log-ratios are averaged per prompt, then
    over prompts (``per_prompt_mean``)."""
    if len(policy_logps) != len(reference_logps) or any(len(a) != len(b) for a, b in zip(policy_logps, reference_logps)):
        raise ValueError("policy and reference log-probs must have the same shape (prompts x samples)")
    return per_prompt_mean([[p - r for p, r in zip(ps, rs)] for ps, rs in zip(policy_logps, reference_logps)])


def wilson_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``rate`` observed over ``n`` trials:
    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)`` with ``z`` the normal quantile of
    ``(1 + confidence)/2``."""
    if n <= 0:
        raise ValueError("no trials")
    if not 0.0 <= rate <= 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"rate must be in [0, 1] and confidence in (0, 1), got {rate}, {confidence}")
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    denominator = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / denominator
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class WinRate:
    """Win rate of the policy over the reference: ``rate = (wins + ties/2 + partial) / n`` over n prompts, with its
    Wilson interval ``[lower, upper]``. ``wins``/``ties``/``losses`` count outcomes 1, 0.5 and 0 (a pairwise judge's
    per-prompt mean of several verdicts can be another fraction: counted in none of them)."""

    rate: float
    lower: float
    upper: float
    wins: int
    ties: int
    losses: int
    n: int
    confidence: float
    method: str = "wilson"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outcomes_from_scores(
    policy_scores: Sequence[Sequence[float]], reference_scores: Sequence[Sequence[float]], *, tie_tolerance: float = 0.0
) -> list[float]:
    """One outcome per prompt from judge scores ``[prompt][sample]``: 1 when the policy's mean score exceeds the
    reference's by more than ``tie_tolerance``, 0 when it falls short by more, 0.5 otherwise."""
    if len(policy_scores) != len(reference_scores):
        raise ValueError("policy and reference scores must cover the same prompts")
    outcomes = []
    for mine, theirs in zip(policy_scores, reference_scores):
        difference = math.fsum(mine) / len(mine) - math.fsum(theirs) / len(theirs)
        outcomes.append(1.0 if difference > tie_tolerance else 0.0 if difference < -tie_tolerance else 0.5)
    return outcomes


def win_rate(outcomes: Sequence[float], *, confidence: float = 0.95) -> WinRate:
    """``WinRate`` of per-prompt outcomes in [0, 1] (1 win, 0.5 tie, 0 loss)."""
    if not outcomes:
        raise ValueError("no outcomes")
    if any(not 0.0 <= outcome <= 1.0 for outcome in outcomes):
        raise ValueError("outcomes must lie in [0, 1]")
    n = len(outcomes)
    rate = math.fsum(outcomes) / n
    lower, upper = wilson_interval(rate, n, confidence)
    count = lambda value: sum(1 for outcome in outcomes if outcome == value)  # noqa: E731
    return WinRate(rate, lower, upper, count(1.0), count(0.5), count(0.0), n, confidence)


# ------------------------------------------------------------------------------------------ log-probs of samples
def completion_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *, pad_token_id: int):
    """A ``PreferenceBatch`` with one completion per example (plain layout): row i is prompt i + completion i, and
    only the completion's tokens are scored. ``completion_logprobs(model, batch).logps[0]`` gives ``(B,)`` sums."""
    from preftune.data.collate import collate_pairs

    if len(prompt_ids) != len(completion_ids):
        raise ValueError("one completion per prompt")
    examples = [{"prompt_ids": list(p), "completion_ids": list(c), "row": i}
                for i, (p, c) in enumerate(zip(prompt_ids, completion_ids))]
    return collate_pairs(examples, pad_token_id=pad_token_id)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _is_reference(side: Any) -> bool:
    return hasattr(side, "completion_logps") and not isinstance(side, nn.Module)


def sequence_logps(
    scorer: Any, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
    pad_token_id: int, batch_size: int = 16,
) -> list[float]:
    """Summed log-prob (nats) of each completion given its prompt, under ``scorer``: a model, or a
    ``preftune.reference`` reference (its ``completion_logps``); batches of ``batch_size``, no gradients."""
    from preftune.logprobs import completion_logprobs

    model = scorer.model if _is_reference(scorer) else scorer
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompt_ids), batch_size):
                batch = completion_batch(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size],
                                         pad_token_id=pad_token_id).to(device)
                logps = scorer.completion_logps(batch) if _is_reference(scorer) else completion_logprobs(scorer, batch).logps
                out.extend(float(value) for value in logps[0].float().cpu())
    finally:
        model.train(was_training)
    return out


@contextmanager
def reference_for_generation(reference: Any) -> Iterator[nn.Module]:
    """The module that samples as the reference: a plain model as it is; a ``FrozenReference``'s model; for an
    ``AdapterDisabledReference`` the policy with its adapters disabled; for an ``AdapterCopyReference`` the policy
    with the frozen copy active (the trainable adapter is active again afterwards)."""
    from preftune.adapters import peft_model_of
    from preftune.reference import AdapterCopyReference, AdapterDisabledReference

    if isinstance(reference, nn.Module):
        yield reference
    elif isinstance(reference, AdapterDisabledReference):
        peft = peft_model_of(reference.model)
        with peft.disable_adapter():
            yield peft
    elif isinstance(reference, AdapterCopyReference):
        peft = peft_model_of(reference.model)
        peft.set_adapter(reference.adapter_name, inference_mode=True)
        try:
            yield peft
        finally:
            peft.set_adapter(reference.trainable_adapter)
    elif hasattr(reference, "model") and isinstance(reference.model, nn.Module):
        yield reference.model
    else:
        raise ConfigError(f"cannot sample from a {type(reference).__name__} reference (precomputed log-probs hold no "
                          "model); pass a reference model", key="ref_model")


# ------------------------------------------------------------------------------------------ generation-based eval
def _score(judge: Any, prompts: list[Any], responses: list[list[str]]) -> list[list[float]]:
    """Judge scores ``[prompt][sample]`` in one call (flattened), checked for length and finiteness."""
    flat_prompts = [prompt for prompt, group in zip(prompts, responses) for _ in group]
    flat = [response for group in responses for response in group]
    scores = list(judge.score(flat_prompts, flat))
    if len(scores) != len(flat):
        raise ConfigError(f"judge {getattr(judge, 'name', judge)!r} returned {len(scores)} scores for {len(flat)} "
                          "responses", key="judge")
    bad = [s for s in scores if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s)]
    if bad:
        raise ConfigError(f"judge {getattr(judge, 'name', judge)!r} returned non-finite or non-numeric scores, e.g. "
                          f"{bad[0]!r}", key="judge")
    out, position = [], 0
    for group in responses:
        out.append([float(s) for s in scores[position : position + len(group)]])
        position += len(group)
    return out


def _pairwise_outcomes(judge: Any, prompts: list[Any], policy: list[list[str]], reference: list[list[str]]
                       ) -> tuple[list[float], int]:
    """Per prompt, the mean of the pairwise judge's known verdicts on (policy sample s, reference sample s);
    prompts without any known verdict are left out (their count is returned)."""
    outcomes, unknown = [], 0
    for prompt, mine, theirs in zip(prompts, policy, reference):
        verdicts = [judge.compare(prompt, a, b) for a, b in zip(mine, theirs)]
        known = [float(v) for v in verdicts if v is not None]
        if known:
            outcomes.append(math.fsum(known) / len(known))
        else:
            unknown += 1
    return outcomes, unknown


def evaluate_generations(
    policy: nn.Module,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    judge: Any,
    params: Any,
    *,
    template: str | None = None,
    progress: bool = True,
    confidence: float = 0.95,
    tie_tolerance: float = 0.0,
    examples: int = 3,
) -> dict[str, Any]:
    """Sample ``params.num_samples`` responses per prompt from the policy and from the reference (same seeds and
    prompt keys, so identical models give identical samples), judge them, and estimate KL(π‖π_ref) from the
    policy's samples.

    ``reference``: a model, or a ``preftune.reference`` reference (``reference_for_generation``). ``judge``: a
    ``preftune.judges`` judge with ``score(prompts, responses) -> list[float]`` (reward, win rate and KL), or a
    pairwise one with ``compare(prompt, a, b) -> 1.0 | 0.5 | 0.0 | None`` (win rate and KL; no reward).

    Returns ``{"prompts", "num_samples", "sampling", "judge", "reward" (policy/reference/difference estimates,
    score judges only), "win_rate", "kl", "response_tokens", "examples"}``.
    """
    from preftune.generation import generate_samples, render_prompts, sampling_dict

    if not prompts:
        raise DataError("no prompts to evaluate on")
    prompts = list(prompts)
    keys = list(range(len(prompts)))
    was_training = policy.training
    try:
        policy_samples = generate_samples(policy, tokenizer, prompts, params, template=template, keys=keys, progress=progress)
        with reference_for_generation(reference) as reference_model:
            reference_samples = generate_samples(reference_model, tokenizer, prompts, params, template=template,
                                                 keys=keys, progress=progress)
    finally:
        policy.train(was_training)
    rendered = render_prompts(tokenizer, prompts, template)
    policy_text = [[sample.text for sample in group] for group in policy_samples]
    reference_text = [[sample.text for sample in group] for group in reference_samples]

    flat = [sample for group in policy_samples for sample in group]
    prompt_ids, completion_ids = [s.prompt_ids for s in flat], [s.completion_ids for s in flat]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    policy_logps = sequence_logps(policy, prompt_ids, completion_ids, pad_token_id=pad, batch_size=params.batch_size)
    reference_logps = sequence_logps(reference, prompt_ids, completion_ids, pad_token_id=pad, batch_size=params.batch_size)
    n = params.num_samples
    regroup = lambda values: [values[i * n : (i + 1) * n] for i in range(len(prompts))]  # noqa: E731
    kl = sampled_kl(regroup(policy_logps), regroup(reference_logps))

    results: dict[str, Any] = {
        "prompts": len(prompts),
        "num_samples": n,
        "sampling": sampling_dict(params),
        "judge": getattr(judge, "name", type(judge).__name__),
    }
    policy_scores = reference_scores = None
    if hasattr(judge, "score"):  # judges take the prompts as given (a conversation is theirs to render)
        policy_scores = _score(judge, prompts, policy_text)
        reference_scores = _score(judge, prompts, reference_text)
        differences = [[math.fsum(a) / len(a) - math.fsum(b) / len(b)] for a, b in zip(policy_scores, reference_scores)]
        results["reward"] = {
            "policy": per_prompt_mean(policy_scores).to_dict(),
            "reference": per_prompt_mean(reference_scores).to_dict(),
            "difference": per_prompt_mean(differences).to_dict(),
        }
        outcomes, unknown = outcomes_from_scores(policy_scores, reference_scores, tie_tolerance=tie_tolerance), 0
    elif hasattr(judge, "compare"):
        outcomes, unknown = _pairwise_outcomes(judge, prompts, policy_text, reference_text)
    else:
        raise ConfigError(f"{type(judge).__name__} is not a judge: expected score(prompts, responses) or "
                          "compare(prompt, a, b)", key="judge")
    results["win_rate"] = win_rate(outcomes, confidence=confidence).to_dict() if outcomes else None
    if unknown:
        results["win_rate_unlabelled_prompts"] = unknown
    exact = params.temperature == 1 and params.top_p == 1
    results["kl"] = {**kl.to_dict(), "exact_sampling": exact}
    results["response_tokens"] = {
        "policy": mean_with_stderr([len(s.completion_ids) for s in flat]).to_dict(),
        "reference": mean_with_stderr([len(s.completion_ids) for g in reference_samples for s in g]).to_dict(),
    }
    results["examples"] = [
        {"prompt": rendered[i], "policy": policy_text[i][0], "reference": reference_text[i][0],
         **({"policy_score": policy_scores[i][0], "reference_score": reference_scores[i][0]} if policy_scores else {})}
        for i in range(min(examples, len(prompts)))
    ]
    return results


# ----------------------------------------------------------------------------------------------------- files
def write_eval_results(results: dict[str, Any], output_dir: str | Path, *, plot: bool = True) -> list[Path]:
    """``eval_results.json`` (atomically) and, with ``plot``, ``eval_results.png``; returns the paths written."""
    output_dir = Path(output_dir)
    path = output_dir / "eval_results.json"
    atomic.write_json(path, _json_clean(results), default=str)
    written = [path]
    if plot:
        png = plot_eval_results(results, output_dir / "eval_results.png")
        if png is not None:
            written.append(png)
    return written


def _json_clean(value: Any) -> Any:
    """Non-finite floats become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(item) for item in value]
    return value


def plot_eval_results(results: dict[str, Any], path: Path) -> Path | None:
    """Panels: held-out pair metrics (reward accuracy, margin); judge reward of policy and reference (± stderr);
    win rate with its interval (0.5 marked); sampled KL (± stderr). Only the panels with data; None if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    pairs = results.get("pairs") or {}
    if "eval_rewards/accuracies" in pairs:
        panels.append("pairs")
    generation = results.get("generation") or {}
    if generation.get("reward"):
        panels.append("reward")
    if generation.get("win_rate"):
        panels.append("win_rate")
    if generation.get("kl"):
        panels.append("kl")
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    error = lambda estimate: estimate.get("stderr") or 0.0  # noqa: E731
    for axis, panel in zip(axes.flat, panels):
        if panel == "pairs":
            names = [key for key in ("eval_rewards/accuracies", "eval_rewards/margins") if key in pairs]
            axis.bar([name.split("/")[-1] for name in names], [pairs[name] for name in names], color="tab:blue")
            axis.set_title("held-out pairs")
        elif panel == "reward":
            reward = generation["reward"]
            axis.bar(["reference", "policy"], [reward["reference"]["mean"], reward["policy"]["mean"]],
                     yerr=[error(reward["reference"]), error(reward["policy"])], capsize=6, color=["tab:gray", "tab:blue"])
            axis.set_title(f"judge reward ({str(generation.get('judge', '')).rpartition(':')[2][:24]})")
        elif panel == "win_rate":
            rate = generation["win_rate"]
            axis.errorbar([0], [rate["rate"]], yerr=[[rate["rate"] - rate["lower"]], [rate["upper"] - rate["rate"]]],
                          fmt="o", capsize=8, color="tab:blue")
            axis.axhline(0.5, color="tab:gray", linestyle="--", linewidth=1)
            axis.set_xlim(-1, 1)
            axis.set_xticks([])
            axis.set_ylim(0, 1)
            axis.set_title(f"win rate vs reference ({int(rate['confidence'] * 100)}% CI)")
        else:
            kl = generation["kl"]
            axis.bar(["KL(policy||ref)"], [kl["mean"]], yerr=[error(kl)], capsize=6, color="tab:orange")
            axis.set_title("sampled KL (nats)")
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    try:
        with atomic.open_atomic(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
    finally:
        plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------- preftune eval
@dataclass
class EvalRequest:
    """What ``preftune eval`` was asked for (see ``run_eval``)."""

    target: str  # a config YAML (its output_dir holds the trained model) or a trained model / adapter directory
    ref_model: str | None = None
    data: str | None = None
    prompts: list[Any] | None = None  # already read (``preftune.generation.read_prompts``)
    judge: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    limit: int | None = None
    output_dir: str | None = None
    batch_size: int | None = None
    progress: bool = True


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "config.json").is_file() or (path / "adapter_config.json").is_file())


def _config_for(target: Path):
    """``(config, policy_dir)``: from a YAML config (the model is its output_dir), or from a model directory (the
    config in its ``summary.json``, or for a ``checkpoint-N`` folder in its run's, when there is one; else the
    defaults)."""
    from preftune.config import DPOConfig, load_config

    if target.is_file():
        config = load_config(target)
        policy_dir = Path(config.output_dir)
        if not _is_model_dir(policy_dir):
            raise ConfigError(f"no trained model in output_dir {policy_dir} (no config.json or adapter_config.json); "
                              "train first, or pass the model directory", key="output_dir", file=str(target))
        return config, policy_dir
    if not target.exists():
        raise ConfigError(f"'{target}' does not exist; expected a config YAML or a trained model directory", key="target")
    if not _is_model_dir(target):
        raise ConfigError(f"'{target}' holds no model (no config.json or adapter_config.json)", key="target")
    summary = target / "summary.json"
    if not summary.is_file() and target.name.startswith("checkpoint-"):
        summary = target.parent / "summary.json"  # a checkpoint inside a finished run's output_dir
    if summary.is_file():
        try:
            saved = json.loads(summary.read_text(encoding="utf-8")).get("config") or {}
            return DPOConfig(**saved), target
        except ConfigError:
            raise  # a saved config preftune refuses is named, not replaced by defaults
        except (ValueError, TypeError, AttributeError, OSError) as error:
            logger.warning("%s: cannot use the saved config (%s); using the defaults (beta 0.1)", summary, error)
    return DPOConfig(), target


def _eval_sources(config, request: EvalRequest) -> tuple[Any, Any]:
    """``(train_source, eval_source)`` for ``DPOTrainer``: ``--data`` as both (only its eval side is used), the
    config's eval_dataset, or its dataset with val_size (split as in training); ``(None, None)`` without any."""
    if request.data:
        return request.data, request.data
    if config.eval_dataset:
        return config.eval_dataset, config.eval_dataset
    if config.dataset and config.val_size:
        return config.dataset, None
    return None, None


def _reference_path(config, policy_dir: Path, request: EvalRequest) -> str | None:
    candidate = request.ref_model or config.ref_model_name_or_path or config.model_name_or_path
    if candidate and Path(candidate).resolve() == policy_dir.resolve():
        raise ConfigError(f"the reference '{candidate}' is the evaluated model itself; pass --ref-model with the model "
                          "it was trained from", key="ref_model")
    return candidate


@dataclass
class EvalSetup:
    """The evaluated policy and its reference, inside a ``DPOTrainer`` (for ``evaluate()``), and where they came from.

    ``reference`` is what generation-based evaluation samples from and scores with: the trainer's reference, or,
    for a reference-free loss (whose trainer holds none), the base with the adapter disabled or the reference model.
    """

    trainer: Any
    reference: Any
    config: Any
    policy_dir: Path
    eval_source: Any


def build_eval_setup(request: EvalRequest, scratch_dir: str) -> EvalSetup:
    """Load the policy and its reference into a ``DPOTrainer`` whose logs go to ``scratch_dir`` (the training run's
    files are left alone).

    - A full model: the reference is ``--ref-model``, else the config's ``ref_model_name_or_path`` or
      ``model_name_or_path`` (the model it was trained from).
    - A LoRA adapter directory: a fresh adapter with the saved settings is attached to the base model
      (``base_model_name_or_path``), so the reference is the base with the adapter disabled, then the trained
      adapter weights are loaded into it. ``--ref-model`` overrides that (e.g. a merged SFT model, when the adapter
      was trained on top of an SFT adapter).
    """
    from preftune.models import load_causal_lm, load_tokenizer
    from preftune.reference import AdapterDisabledReference, FrozenReference
    from preftune.trainer import DPOTrainer

    config, policy_dir = _config_for(Path(request.target))
    train_source, eval_source = _eval_sources(config, request)
    updates = {"do_train": False, "output_dir": scratch_dir, "precompute_ref_log_probs": False,
               "resume_from_checkpoint": None, "plot_loss": False, "sync_ref_model": False}
    if request.batch_size:
        updates["per_device_eval_batch_size"] = request.batch_size
    has_tokenizer = any((policy_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    tokenizer = load_tokenizer(str(policy_dir), key="target") if has_tokenizer else None
    needs_reference = trainer_needs_reference(config)
    common = dict(train_dataset=train_source, eval_dataset=eval_source, processing_class=tokenizer)
    if (policy_dir / "adapter_config.json").is_file():
        from peft import PeftConfig

        peft_config = PeftConfig.from_pretrained(str(policy_dir))
        base = peft_config.base_model_name_or_path or config.model_name_or_path
        if not base:
            raise ConfigError(f"{policy_dir / 'adapter_config.json'} names no base model", key="target")
        peft_config.inference_mode = True
        eval_config = config.model_copy(update={**updates, "model_name_or_path": base, "finetuning_type": "lora"})
        trainer = DPOTrainer(model=base, ref_model=request.ref_model if needs_reference else None, args=eval_config,
                             peft_config=peft_config, **common)
        _load_adapter_weights(trainer.model, policy_dir)
        reference = trainer.reference
        if reference is None:
            reference = (FrozenReference(load_causal_lm(request.ref_model, key="ref_model")) if request.ref_model
                         else AdapterDisabledReference(trainer.model))
    else:
        ref = _reference_path(config, policy_dir, request)
        if ref is None:
            raise ConfigError("no reference model: pass --ref-model DIR (the model the policy was trained from)",
                              key="ref_model")
        eval_config = config.model_copy(update={**updates, "model_name_or_path": str(policy_dir)})
        trainer = DPOTrainer(model=str(policy_dir), ref_model=ref if needs_reference else None, args=eval_config, **common)
        reference = trainer.reference or FrozenReference(load_causal_lm(ref, key="ref_model"))
    device = trainer.accelerator.device
    trainer.model.to(device)
    reference.to(device)
    return EvalSetup(trainer, reference, config, policy_dir, eval_source)


def trainer_needs_reference(config) -> bool:
    from preftune.losses import LossParams

    return LossParams.from_config(config).needs_reference


def _load_adapter_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Load ``adapter_model.safetensors`` into the model's (fresh, same-shaped) active adapter, refusing weights that
    do not fit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from preftune.adapters import peft_model_of

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{adapter_dir} has no adapter_model.safetensors", key="target")
    result = set_peft_model_state_dict(peft_model_of(model), load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"{weights}: weights this model does not have: {result.unexpected_keys[:3]}", key="target")


def eval_prompts(request: EvalRequest, config, eval_source: Any) -> list[Any]:
    """The prompts for generation: ``--prompts``, else the distinct prompts of the held-out pairs (in order)."""
    if request.prompts:
        return list(request.prompts)[: request.limit] if request.limit else list(request.prompts)
    from preftune.data.formats import load_preference_data
    from preftune.data.pipeline import _split_off_validation

    if eval_source is not None:
        loaded = load_preference_data(eval_source, dataset_dir=config.dataset_dir, on_bad_row="skip")
    elif config.dataset and config.val_size:
        whole = load_preference_data(config.dataset, dataset_dir=config.dataset_dir, max_samples=config.max_samples,
                                     on_bad_row="skip")
        loaded = _split_off_validation(whole, config.val_size, config.seed)[1]
    else:
        raise ConfigError("no prompts to sample from: pass --prompts FILE or --data FILE (held-out pairs)", key="prompts")
    seen, prompts = set(), []
    for prompt in loaded.dataset["prompt"]:
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            prompts.append(prompt)
    return prompts[: request.limit] if request.limit else prompts


def load_eval_judge(spec: str) -> Any:
    """``--judge``: a pairwise-labels file (``.jsonl``/``.json`` rows with prompt, response_a, response_b, winner),
    else ``preftune.judges.load_judge(spec)`` (a ``module:function`` or a reward-model directory)."""
    from preftune import judges

    path = Path(spec)
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        return judges.PairwiseLabels.from_file(path)
    return judges.load_judge(spec)


def run_eval(request: EvalRequest) -> tuple[dict[str, Any], list[Path]]:
    """``preftune eval``: held-out pair metrics (``DPOTrainer.evaluate()``) when there are held-out pairs, and
    generation-based metrics with ``--judge``; writes ``eval_results.json`` and ``eval_results.png`` into
    ``request.output_dir`` (default: the model directory). Returns the results and the paths written."""
    from preftune.generation import SamplingParams

    judge = load_eval_judge(request.judge) if request.judge else None  # fail fast, before loading models
    params = SamplingParams(**request.sampling) if judge is not None else None
    with tempfile.TemporaryDirectory(prefix="preftune-eval-") as scratch:
        setup = build_eval_setup(request, scratch)
        trainer = setup.trainer
        has_pairs = trainer.data is not None and trainer.data.eval is not None
        if not has_pairs and judge is None:
            raise ConfigError("nothing to evaluate: no held-out pairs (pass --data FILE, or set eval_dataset / val_size "
                              "in the config) and no --judge", key="data")
        results: dict[str, Any] = {"model": str(setup.policy_dir), "loss_type": setup.config.loss_type,
                                   "beta": setup.config.beta}
        if has_pairs:
            metrics = trainer.evaluate()
            results["pairs"] = {key: value for key, value in metrics.items() if key != "eval_runtime"}
            results["pairs"]["count"] = len(trainer.data.eval.dataset)
        if judge is not None:
            prompts = eval_prompts(request, setup.config, setup.eval_source)
            results["generation"] = evaluate_generations(
                trainer.model, setup.reference, trainer.tokenizer, prompts, judge, params,
                template=setup.config.template, progress=request.progress,
            )
    output_dir = Path(request.output_dir) if request.output_dir else setup.policy_dir
    return results, write_eval_results(results, output_dir)
