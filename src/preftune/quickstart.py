"""The offline quickstart: build a tiny model and a toy preference set, train DPO with eval, report.

Needs no network and no shared assets: the model, tokenizer and data are all built by
``preftune.quickstart_assets``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from preftune.config import DPOConfig
from preftune.quickstart_assets import QUICKSTART_TRAINING, build_quickstart_workspace

logger = logging.getLogger(__name__)

TARGET_EVAL_ACCURACY = 0.9
_DATA_SIZE_KEYS = ("n_train", "n_eval")


def quickstart_config(workspace: dict[str, Path], output_dir: Path) -> DPOConfig:
    """The DPOConfig of the quickstart run over a built workspace."""
    training = {k: v for k, v in QUICKSTART_TRAINING.items() if k not in _DATA_SIZE_KEYS and v is not None}
    return DPOConfig(
        model_name_or_path=str(workspace["model_dir"]),
        dataset=str(workspace["train_file"]),
        eval_dataset=str(workspace["eval_file"]),
        output_dir=str(output_dir),
        save_strategy="no",
        overwrite_cache=True,
        **training,
    )


def run_quickstart(output_dir: str | Path = "output/quickstart") -> dict[str, Any]:
    """Build the workspace under ``output_dir/workspace``, train into ``output_dir/run``, print what happened."""
    from preftune.trainer import DPOTrainer

    output_dir = Path(output_dir)
    start = time.perf_counter()
    workspace = build_quickstart_workspace(output_dir / "workspace")
    config = quickstart_config(workspace, output_dir / "run")
    trainer = DPOTrainer(args=config)
    result = trainer.train()
    elapsed = time.perf_counter() - start

    summary = result.metrics
    accuracy = summary["eval"]["rewards/accuracies"]
    run_dir = Path(config.output_dir)
    lines = [
        "",
        "preftune quickstart: DPO on a toy preference task (polite, helpful answers preferred over rude ones)",
        f"  model     {workspace['model_dir']} (tiny Llama built from scratch, random init)",
        f"  data      {summary['data']['train']['pairs_used']} train / {summary['data']['eval']['pairs_used']} held-out "
        f"pairs in {Path(workspace['train_file']).parent}",
        f"  training  {result.global_step} steps, loss {config.loss_type}, beta {config.beta}, "
        f"{summary['runtime_seconds']:.1f} s training, {elapsed:.1f} s in all",
        f"  held-out  eval_loss {summary['eval']['loss']:.4f}, eval_rewards/accuracies {accuracy:.3f}, "
        f"eval_rewards/margins {summary['eval']['rewards/margins']:.3f}",
        "  outputs:",
    ]
    for name in ("training_metrics.csv", "training_curves.png", "summary.json", "log_history.json", "model.safetensors"):
        lines.append(f"    {run_dir / name}")
    verdict = "reached" if accuracy >= TARGET_EVAL_ACCURACY else "did NOT reach"
    lines.append(f"  held-out accuracy {verdict} the target {TARGET_EVAL_ACCURACY}")
    print("\n".join(lines))
    return summary
