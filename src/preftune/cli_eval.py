"""Subcommands ``preftune eval`` and ``preftune report``: their arguments, and ``run_eval``, what ``preftune eval``
runs (the model and its reference found from a config or a model folder, loaded into a ``DPOTrainer`` for the
held-out pairs, then judged samples). The statistics and the result files are ``preftune.evaluation``'s, the report
``preftune.report``'s.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


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
    needs_reference = _needs_reference(config)
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


def _needs_reference(config) -> bool:
    from preftune.losses import LossParams

    return LossParams.from_config(config).needs_reference


def _load_adapter_weights(model, adapter_dir: Path) -> None:
    """The trained adapter's weights into the model's fresh adapter of the same shape (``--target`` names it)."""
    from preftune.adapters import load_trainable_weights

    try:
        load_trainable_weights(model, adapter_dir)
    except CheckpointError as error:
        raise ConfigError(error.message, key="target") from None


def eval_prompts(request: EvalRequest, config, eval_source: Any) -> list[Any]:
    """The prompts for generation: ``--prompts``, else the distinct prompts of the held-out pairs (in order)."""
    if request.prompts:
        return list(request.prompts)[: request.limit] if request.limit else list(request.prompts)
    from preftune.data.formats import load_preference_data
    from preftune.data.pipeline import split_off_validation

    if eval_source is not None:
        loaded = load_preference_data(eval_source, dataset_dir=config.dataset_dir, on_bad_row="skip")
    elif config.dataset and config.val_size:
        whole = load_preference_data(config.dataset, dataset_dir=config.dataset_dir, max_samples=config.max_samples,
                                     on_bad_row="skip")
        loaded = split_off_validation(whole, config.val_size, config.seed)[1]
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
    from preftune.evaluation import evaluate_generations, write_eval_results
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


# ------------------------------------------------------------------------------------------------ command line
def _format_estimate(estimate: dict, digits: int = 4) -> str:
    stderr = estimate.get("stderr")
    return f"{estimate['mean']:.{digits}g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def _eval(args: argparse.Namespace) -> int:
    prompts = None
    if args.prompts:
        from preftune.generation import read_prompts

        prompts = [prompt for _, prompt in read_prompts(args.prompts)]
    sampling = {key: value for key, value in {
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
        "num_samples": args.num_samples, "seed": args.seed, "batch_size": args.batch_size,
    }.items() if value is not None}
    request = EvalRequest(
        target=args.target, ref_model=args.ref_model, data=args.data, prompts=prompts, judge=args.judge,
        sampling=sampling, limit=args.limit, output_dir=args.output_dir, batch_size=args.batch_size,
    )
    results, written = run_eval(request)
    pairs = results.get("pairs")
    if pairs:
        print(f"held-out pairs ({pairs['count']}): " + ", ".join(
            f"{key[5:]} {pairs[key]:.4f}" for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
            if key in pairs))
    generation = results.get("generation")
    if generation:
        line = [f"generation ({generation['prompts']} prompts x {generation['num_samples']} samples, judge {generation['judge']}):"]
        if generation.get("reward"):
            reward = generation["reward"]
            line.append(f"reward policy {_format_estimate(reward['policy'])} vs reference {_format_estimate(reward['reference'])};")
        rate = generation.get("win_rate")
        if rate:
            line.append(f"win rate {rate['rate']:.3f} [{rate['lower']:.3f}, {rate['upper']:.3f}];")
        line.append(f"KL {_format_estimate(generation['kl'])} nats")
        print(" ".join(line))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _report(args: argparse.Namespace) -> int:
    from preftune.report import build_report

    report = build_report(args.output_dir)
    print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if args.json else report.format())
    return 0


def add_commands(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a trained model against its reference (held-out pairs; judged samples, win rate, KL)",
        description="Reward metrics on held-out pairs (the config's eval set or --data) and, with --judge, "
        "generation-based evaluation: sample from policy and reference, judge, win rate with a 95%% Wilson interval, "
        "and KL(policy||reference) from the policy's samples. Writes eval_results.json and eval_results.png.",
    )
    evaluate.add_argument("target", help="a training config YAML (the model in its output_dir) or a trained model / "
                          "LoRA adapter directory")
    evaluate.add_argument("--ref-model", default=None, help="reference model directory (default: the model it was "
                          "trained from; for a LoRA adapter, the base with the adapter disabled)")
    evaluate.add_argument("--data", default=None, help="held-out preference pairs (any format `preftune train` reads)")
    evaluate.add_argument("--prompts", default=None, help="prompts to sample from: JSONL/JSON rows with 'prompt' or "
                          "'messages' (default: the held-out pairs' prompts)")
    evaluate.add_argument("--judge", default=None, help="'package.module:function', a reward-model directory, or a "
                          "pairwise labels .jsonl file; enables generation-based evaluation")
    evaluate.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0: the "
                          "KL estimate is exact only at 1.0 with top-p 1.0)")
    evaluate.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 1.0)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None, help="tokens per response (default 64)")
    evaluate.add_argument("--num-samples", type=int, default=None, help="responses per prompt and model (default 2)")
    evaluate.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
    evaluate.add_argument("--batch-size", type=int, default=None, help="sequences per batch for sampling and scoring")
    evaluate.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    evaluate.add_argument("--output-dir", default=None, help="where eval_results.* go (default: the model directory)")
    evaluate.set_defaults(run=_eval)

    report = commands.add_parser(
        "report", help="tell the story of a training run from its output_dir (trends, warnings, what to try next)",
        description="Read log_history.json (and summary.json) of a training run and print the margins, accuracy "
        "and log-prob trends, likelihood-displacement warnings, grad-norm spikes, beta and learning rate, and advice.",
    )
    report.add_argument("output_dir", help="a training run's output_dir")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.set_defaults(run=_report)
