"""Evaluation of a trained policy against its reference: statistics, generation-based evaluation, result files.

Pure statistics (``win_rate`` with its Wilson interval, ``sampled_kl``, ``per_prompt_mean``: means over prompts,
with standard errors); ``evaluate_generations`` samples from policy and reference (``preftune.generation``), judges
the samples (``preftune.judges``) and scores the policy's samples under both models; ``write_eval_results`` writes
``eval_results.json`` and ``eval_results.png``. The command ``preftune eval`` is ``preftune.cli_eval.run_eval``.

The statistics, their formulas and when the KL estimate is exact: docs/evaluation.md.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from preftune import atomic
from preftune.errors import ConfigError, DataError
from preftune.models import model_device

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
    device = model_device(model)
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
    """The module that samples as the reference: a plain model as it is; a ``preftune.reference`` reference's
    ``sampling_model()`` (e.g. the policy with its adapter disabled, enabled again afterwards)."""
    if isinstance(reference, nn.Module):
        yield reference
    else:
        with reference.sampling_model() as model:
            yield model


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
    atomic.write_json(path, atomic.finite_json(results), default=str)
    written = [path]
    if plot:
        png = plot_eval_results(results, output_dir / "eval_results.png")
        if png is not None:
            written.append(png)
    return written


def plot_eval_results(results: dict[str, Any], path: Path) -> Path | None:
    """Panels: held-out pair metrics (reward accuracy, margin); judge reward of policy and reference (± stderr);
    win rate with its interval (0.5 marked); sampled KL (± stderr). Only the panels with data; None if none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from preftune.metrics import save_figure

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
    save_figure(figure, path)
    return path
