"""`preftune sample` (responses from a model → candidates JSONL) and `preftune judge` (candidates → TRL pairs)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from preftune import atomic
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# preftune sample
# --------------------------------------------------------------------------------------------------------------


def _sampling_params(args: argparse.Namespace):
    from preftune.generation import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _done_prompt_ids(out: Path, params) -> set[str]:
    """Prompt ids already in an existing output file (torn last line cut off); refuses different settings."""
    from preftune.generation import read_candidates

    if not out.exists():
        return set()
    rows = read_candidates(out, repair=True)
    for index, row in enumerate(rows):
        if row.get("sampling") != params.record() or len(row["responses"]) != params.num_samples:
            raise ConfigError(
                f"{out} already holds candidates sampled with {row.get('sampling')} and {len(row['responses'])} "
                f"responses (row {index}); expected {params.record()} and {params.num_samples} to resume it. "
                "Use the same settings or another --out", key="out")
    if rows:
        logger.info("resuming %s: %d prompts already sampled", out, len(rows))
    return {row["prompt_id"] for row in rows}


def run_sample(args: argparse.Namespace) -> int:
    from preftune.generation import append_candidates, candidate_row, iter_generate, read_candidates, read_prompts
    from preftune.models import load_causal_lm, load_tokenizer

    params = _sampling_params(args)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"expected an integer >= 1, got {args.limit}", key="limit")
    prompts = read_prompts(args.prompts)[: args.limit]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done_prompt_ids(out, params)
    todo = [(key, prompt) for key, prompt in prompts if key not in done]
    if todo:
        tokenizer = load_tokenizer(args.tokenizer or args.model, key="tokenizer" if args.tokenizer else "model")
        model = load_causal_lm(args.model, key="model").to(_device(args.device))
        keys = [key for key, _ in todo]
        for indices, samples in iter_generate(model, tokenizer, [p for _, p in todo], params, template=args.template,
                                              keys=keys, progress=not args.no_progress):
            rows = [candidate_row(keys[i], todo[i][1], [s.text for s in prompt_samples], args.model, params)
                    for i, prompt_samples in zip(indices, samples)]
            append_candidates(out, rows)
    print(f"sampled {len(todo)} prompts x {params.num_samples} responses ({len(prompts) - len(todo)} already in "
          f"{out}); candidates in {out}")
    if args.store:
        from preftune.labeling.store import import_candidates  # helper module of the labeling app

        created = import_candidates(args.store, read_candidates(out), source=str(out))
        print(f"imported into {args.store}: {created} new pairs to label")
    return 0


# --------------------------------------------------------------------------------------------------------------
# preftune judge
# --------------------------------------------------------------------------------------------------------------


def run_judge(args: argparse.Namespace) -> int:
    from preftune.generation import read_candidates
    from preftune.judges import load_judge, pairs_from_candidates, score_candidates

    rows = read_candidates(args.candidates)
    if not rows:
        raise DataError("no candidates; expected rows written by `preftune sample`", file=args.candidates)
    judge = load_judge(args.judge, device=_device(args.device), batch_size=args.batch_size,
                       per_item=True if args.per_item else None)
    scores = score_candidates(judge, rows)
    pairs, stats = pairs_from_candidates(rows, scores, mode=args.mode, min_gap=args.min_gap)
    atomic.write_jsonl(Path(args.out), pairs)
    mean = sum(map(sum, scores)) / max(1, sum(map(len, scores)))
    print(f"scored {stats.responses} responses to {stats.prompts} prompts with {args.judge} (mean {mean:.4f}); "
          f"wrote {stats.pairs} pairs to {args.out}; skipped {stats.ties_skipped} ties (gap <= {args.min_gap})"
          + (f" and {stats.too_few_responses} prompts with fewer than 2 responses" if stats.too_few_responses else ""))
    return 0


# --------------------------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------------------------


def add_commands(commands) -> None:
    """Add `sample` and `judge` to the `preftune` subcommands."""
    sample = commands.add_parser(
        "sample", help="sample k responses per prompt from a model into a candidates JSONL (resumable)",
        description="Sample --num-samples responses per prompt (chat template applied to 'messages' prompts) and "
        "append one candidates row per prompt to --out, flushed after each batch. Rerunning with the same --out "
        "skips the prompts already there.",
    )
    sample.add_argument("--model", required=True, help="causal LM directory (safetensors)")
    sample.add_argument("--prompts", required=True, help="JSONL/JSON rows with 'prompt' or 'messages' (+ optional 'id')")
    sample.add_argument("--out", required=True, help="candidates JSONL (appended to; resumable)")
    sample.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    sample.add_argument("--template", default=None, help="chat template name for 'messages' prompts (default: the tokenizer's)")
    sample.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    sample.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    sample.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    sample.add_argument("--num-samples", type=int, default=2, help="responses per prompt (default 2)")
    sample.add_argument("--seed", type=int, default=0, help="default 0; samples do not depend on --batch-size")
    sample.add_argument("--batch-size", type=int, default=16, help="sequences per forward batch (default 16)")
    sample.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    sample.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
    sample.add_argument("--store", default=None, metavar="DB.sqlite", help="also import the candidates into this labeling store")
    sample.add_argument("--no-progress", action="store_true", help="no progress bar")
    sample.set_defaults(run=run_sample)

    judge = commands.add_parser(
        "judge", help="score candidates with a judge and write preference pairs (TRL JSONL)",
        description="Score every response of a candidates file with a judge (a reward model directory or "
        "'package.module:function') and write TRL pairs {prompt, chosen, rejected, score_chosen, score_rejected} "
        "that `preftune train` reads.",
    )
    judge.add_argument("--candidates", required=True, help="candidates JSONL from `preftune sample`")
    judge.add_argument("--judge", required=True, help="reward model directory or package.module:function "
                       "(e.g. preftune.judges:sentiment_word_score)")
    judge.add_argument("--out", required=True, help="pairs JSONL (written atomically)")
    judge.add_argument("--mode", choices=("best_vs_worst", "all_pairs"), default="best_vs_worst",
                       help="one pair per prompt (best over worst) or every pair (default best_vs_worst)")
    judge.add_argument("--min-gap", type=float, default=0.0, help="skip pairs whose score gap is <= this (ties; default 0)")
    judge.add_argument("--per-item", action="store_true", help="the function scores one (prompt, response) per call")
    judge.add_argument("--batch-size", type=int, default=16, help="reward model batch size (default 16)")
    judge.add_argument("--device", default="auto", help="device of a reward model (default: cuda if available)")
    judge.set_defaults(run=run_judge)
