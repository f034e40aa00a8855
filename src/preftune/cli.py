"""The command line: parses arguments, calls the library, prints library errors as one line."""

from __future__ import annotations

import argparse
import logging
import sys

from preftune.errors import PreftuneError

logger = logging.getLogger("preftune")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import transformers
    import datasets

    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()


def _train(args: argparse.Namespace) -> int:
    """Errors first: every problem found before anything loads is printed, one line each (exit 2)."""
    from preftune.config import load_config
    from preftune.parallel.launch import relaunch, should_relaunch
    from preftune.preflight import PreflightError, run_preflight_checks

    overrides = [*args.overrides, *([f"nproc={args.nproc}"] if getattr(args, "nproc", None) else [])]
    config = load_config(args.config, overrides)
    try:
        if should_relaunch(config.nproc):  # the same command as config.nproc processes under torchrun
            run_preflight_checks(config)  # here once, before the processes start (each checks again, quickly)
            return relaunch(config.nproc, [*(["-v"] if args.verbose else []), "train", args.config, *overrides])
        from preftune.trainer import DPOTrainer

        trainer = DPOTrainer(args=config)  # runs the preflight checks first
    except PreflightError as error:
        for problem in error.problems:
            print(f"preftune: error: {problem}", file=sys.stderr)
        return 2
    stopper = None
    if trainer.world_size == 1:  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, end the run
        from preftune.callbacks import StopOnSignal

        stopper = StopOnSignal()
        trainer.add_callback(stopper)
    if not trainer.accelerator.is_main_process:  # replicas (several processes) run the same calls, print nothing
        if config.do_train:
            trainer.train()
        elif config.do_eval:
            trainer.evaluate()
        return 0
    if config.do_train:
        result = trainer.train()
        eval_metrics = result.metrics.get("eval", {})
        if stopper is not None and stopper.requested is not None:
            print(f"stopped at step {result.global_step} of {trainer.state.max_steps}: checkpoint-{result.global_step} "
                  "saved; resume with resume_from_checkpoint=latest")
        print(f"trained {result.global_step} steps; final train loss {result.metrics['train'].get('loss', float('nan')):.4f}")
        if eval_metrics:
            print(f"eval: loss {eval_metrics['loss']:.4f}, rewards/accuracies {eval_metrics['rewards/accuracies']:.3f}")
        print(f"outputs in {config.output_dir}")
    elif config.do_eval:
        metrics = trainer.evaluate()
        print(" ".join(f"{key}={value:.4f}" for key, value in metrics.items()))
    return 0


def _loop(args: argparse.Namespace) -> int:
    """Iterative DPO; the config (loop section, prompts files, judge) is checked before any model loads."""
    from preftune.loop import check_loop, load_loop_config, run_loop

    config = load_loop_config(args.config, args.overrides)
    check_loop(config)
    summary = run_loop(config, progress=not args.no_progress)
    for record in summary["rounds"]:
        line = (f"round {record['round']}: sample reward {record['sample_reward']['mean']:.4f}, {record['pairs']} pairs, "
                f"{record['train']['global_step']} steps, train loss {record['train']['train_loss']:.4f}")
        generation = record.get("eval_generation") or {}
        if generation.get("reward"):
            line += f"; eval reward {generation['reward']['policy']['mean']:.4f}"
        if generation.get("kl"):
            line += f", KL {generation['kl']['mean']:.4f} nats"
        print(line)
    print(f"summary in {config.output_dir}/summary.json")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    if args.vision:
        from preftune.quickstart_vision import run_vision_quickstart

        run_vision_quickstart(args.output_dir or "output/quickstart-vision")
        return 0
    from preftune.quickstart import run_quickstart

    run_quickstart(args.output_dir or "output/quickstart")
    return 0


def _export(args: argparse.Namespace) -> int:
    from preftune.adapters import export_merged

    path = export_merged(args.adapter, args.output, base_model=args.base_model, dtype=args.dtype)
    print(f"merged model written to {path}")
    return 0


def _config_keys(args: argparse.Namespace) -> int:
    from preftune.config import config_table_markdown

    print(config_table_markdown())
    return 0


def _data_check(args: argparse.Namespace) -> int:
    """Report problem rows of a data file or of a config's dataset/eval_dataset; exit 0 even when rows fail."""
    import json

    from preftune.data.validate import check_target, write_clean

    checked = check_target(args.target, dataset_dir=args.dataset_dir, min_chars=args.min_chars,
                           max_similarity=args.max_similarity, max_length=args.max_length, tokenizer=args.tokenizer,
                           template=args.template)
    if args.json:
        print(json.dumps({split: data.report.to_dict() for split, data in checked.items()}, indent=2,
                         ensure_ascii=False))
    else:
        print("\n\n".join(f"[{split}] {data.report.format_table()}" for split, data in checked.items()))
    if args.fix:
        for split, data in checked.items():
            path = args.fix if split == "train" else _eval_fix_path(args.fix)
            written = write_clean(data, path)
            print(f"wrote {written} of {data.report.rows_read} {split} rows to {path}",
                  file=sys.stderr if args.json else sys.stdout)
    return 0


def _eval_fix_path(path: str) -> str:
    """out.jsonl -> out.eval.jsonl (where --fix writes the cleaned eval_dataset of a config)."""
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}.eval.{suffix}" if dot else f"{path}.eval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference tuning (DPO) for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a YAML config", description="Train from a YAML config; key=value arguments override it.")
    train.add_argument("config", help="YAML config file (TRL or LLaMA-Factory key names)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. max_steps=10 beta=0.2")
    train.add_argument("--nproc", type=int, default=None, metavar="N", help="train with N processes (re-launches under torchrun)")
    train.set_defaults(run=_train)

    loop = commands.add_parser(
        "loop", help="iterative DPO: rounds of sample, judge, train, evaluate (resumable)",
        description="Run the rounds of the config's `loop:` section: sample from the current policy, judge, build "
        "pairs, train DPO from the last round's model, evaluate. Files in output_dir/round-K/ and "
        "output_dir/summary.json; rerunning the same command resumes where it stopped.",
    )
    loop.add_argument("config", help="YAML config with a `loop:` section and the training keys")
    loop.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. beta=0.2 loop.rounds=3")
    loop.add_argument("--no-progress", action="store_true", help="no progress bars")
    loop.set_defaults(run=_loop)

    quickstart = commands.add_parser("quickstart", help="offline demo: build a tiny model and data, train DPO with eval")
    quickstart.add_argument("--output-dir", default=None,
                            help="where the model, data and outputs go (default output/quickstart, or "
                                 "output/quickstart-vision with --vision)")
    quickstart.add_argument("--vision", action="store_true",
                            help="the vision demo: a tiny vision-language model learns to name a square's colour")
    quickstart.set_defaults(run=_quickstart)

    export = commands.add_parser(
        "export", help="merge a LoRA adapter into its base model and save a full model",
        description="Merge a LoRA adapter (a training output_dir or checkpoint) into its base model; the result loads "
        "with AutoModelForCausalLM.from_pretrained.",
    )
    export.add_argument("adapter", help="directory with adapter_config.json and adapter_model.safetensors")
    export.add_argument("output", help="directory for the merged model (written only if the export succeeds)")
    export.add_argument("--base-model", default=None, help="base model path (default: the adapter's base_model_name_or_path)")
    export.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="dtype of the saved weights")
    export.set_defaults(run=_export)

    data = commands.add_parser("data", help="data tools (preftune data check)")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    check = data_commands.add_parser(
        "check", help="report problem rows of a dataset (a data file, a registered name, or a config's dataset)",
        description="Read a preference dataset as training would and report, per rule, how many rows fail, the first "
        "example rows and why. Exits 0 with a report (even when rows fail), 2 when the input cannot be read.",
    )
    check.add_argument("target", help="a config YAML (checks its dataset and eval_dataset) or a data file / dataset name")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--fix", metavar="OUT.jsonl", default=None,
                       help="write the rows without problems as TRL JSON Lines (a config's eval set goes to OUT.eval.jsonl)")
    check.add_argument("--max-similarity", type=float, default=None, help="flag chosen/rejected more similar than this (0-1; default 0.9)")
    check.add_argument("--min-chars", type=int, default=None, help="flag responses shorter than this many characters (default 1: empty ones)")
    check.add_argument("--max-length", type=int, default=None, help="flag prompts longer than this many tokens (needs a tokenizer; default: the config's max_length)")
    check.add_argument("--tokenizer", default=None, help="tokenizer for --max-length (default: the config's tokenizer or model)")
    check.add_argument("--template", default=None, help="chat template name for conversational prompts (default: the config's template)")
    check.add_argument("--dataset-dir", default=None, help="folder of dataset_info.json and relative data paths (default: the config's)")
    check.set_defaults(run=_data_check)

    from preftune.board.cli import add_commands as add_board_commands
    from preftune.cli_eval import add_commands as add_eval_commands
    from preftune.cli_generate import add_commands as add_generate_commands
    from preftune.labeling.cli import add_commands as add_label_commands

    add_label_commands(commands)
    add_generate_commands(commands)
    add_eval_commands(commands)
    add_board_commands(commands)
    keys = commands.add_parser("config-keys", help="print the table of config keys (Markdown)")
    keys.set_defaults(run=_config_keys)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``key=value`` overrides may also follow an option (``train cfg.yaml --nproc 2 beta=0.2``),
    where argparse alone would stop taking positionals."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.run(args)
    except PreftuneError as error:
        print(f"preftune: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions, a vanished file: the message names the path
        if args.verbose:
            raise
        print(f"preftune: error: {error} (run with -v for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
