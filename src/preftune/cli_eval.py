"""Subcommands ``preftune eval`` and ``preftune report`` (the library work is in ``preftune.evaluation`` and
``preftune.report``)."""

from __future__ import annotations

import argparse
import json


def _format_estimate(estimate: dict, digits: int = 4) -> str:
    stderr = estimate.get("stderr")
    return f"{estimate['mean']:.{digits}g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def _eval(args: argparse.Namespace) -> int:
    from preftune.evaluation import EvalRequest, run_eval

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
