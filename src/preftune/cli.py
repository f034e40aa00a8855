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
    from preftune.config import load_config
    from preftune.trainer import DPOTrainer

    config = load_config(args.config, args.overrides)
    trainer = DPOTrainer(args=config)
    if config.do_train:
        result = trainer.train()
        eval_metrics = result.metrics.get("eval", {})
        print(f"trained {result.global_step} steps; final train loss {result.metrics['train'].get('loss', float('nan')):.4f}")
        if eval_metrics:
            print(f"eval: loss {eval_metrics['loss']:.4f}, rewards/accuracies {eval_metrics['rewards/accuracies']:.3f}")
        print(f"outputs in {config.output_dir}")
    elif config.do_eval:
        metrics = trainer.evaluate()
        print(" ".join(f"{key}={value:.4f}" for key, value in metrics.items()))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from preftune.quickstart import run_quickstart

    run_quickstart(args.output_dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Preference tuning (DPO) for Hugging Face causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from a YAML config", description="Train from a YAML config; key=value arguments override it.")
    train.add_argument("config", help="YAML config file (TRL or LLaMA-Factory key names)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. max_steps=10 beta=0.2")
    train.set_defaults(run=_train)

    quickstart = commands.add_parser("quickstart", help="offline demo: build a tiny model and data, train DPO with eval")
    quickstart.add_argument("--output-dir", default="output/quickstart", help="where the model, data and outputs go")
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

    keys = commands.add_parser("config-keys", help="print the table of config keys (Markdown)")
    keys.set_defaults(run=_config_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.run(args)
    except PreftuneError as error:
        print(f"preftune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
