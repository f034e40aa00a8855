"""Vision-language DPO, preftune vs TRL 1.16: the same tiny Qwen2-VL (the vision quickstart's model, random init),
the same rows (the vision quickstart's training images), the same settings; pairs/s over the timed steps and peak
RSS, each engine in a process of its own, the engines interleaved over the repeats.

    PYTHONPATH=src python benchmarks/vision_vs_trl.py [--steps 12] [--batch 8] [--repeats 3] [--root /tmp/vlm-bench]

Prints one JSON line per run, then the medians and the preftune/TRL ratios. The first two steps are warm-up and not
timed. preftune runs with its defaults (prefix sharing and padding-free auto, so a pair's images are encoded once
where shared rows pay; the chunked LM head); TRL with its own (chosen and rejected as separate rows, each encoding
the images). Both take a frozen copy of the initial model as the reference and train every part of the model
(vision tower and projector included)."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

WARMUP_STEPS = 2


def rows_for_trl(train_file: Path) -> list[dict]:
    """The quickstart rows as TRL reads them: images opened with PIL, prompts with image parts."""
    from PIL import Image

    rows = []
    for line in train_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        question = row["prompt"][0]["content"].replace("<image>", "")
        rows.append({
            "images": [Image.open(train_file.parent / path).convert("RGB") for path in row["images"]],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"][0]["content"]}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text",
                                                             "text": row["rejected"][0]["content"]}]}],
        })
    return rows


class StepClock:
    """Wall time of the steps after the warm-up ones (a transformers TrainerCallback's on_step_end)."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter())


def run_engine(engine: str, workspace: Path, steps: int, batch: int) -> dict:
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(2)
    clock = StepClock()
    callback = type("Clock", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: clock.on_step_end()})()
    common = dict(learning_rate=1e-3, max_steps=steps, per_device_train_batch_size=batch, logging_steps=1000,
                  save_strategy="no", report_to=[], beta=0.1, seed=0, max_length=None)
    model_dir, train_file = workspace / "model", workspace / "data" / "train.jsonl"
    if engine == "preftune":
        from preftune import DPOTrainer
        from preftune.config import DPOConfig

        config = DPOConfig(model_name_or_path=str(model_dir), dataset=str(train_file), output_dir=str(workspace / "pt"),
                           overwrite_cache=True, freeze_vision_tower=False, freeze_multi_modal_projector=False,
                           **common)
        trainer = DPOTrainer(args=config, callbacks=[callback])
    else:
        import datasets
        import trl
        from transformers import Qwen2VLForConditionalGeneration

        from preftune.models import load_processor

        processor = load_processor(str(model_dir))
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        reference = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        args = trl.DPOConfig(output_dir=str(workspace / "trl"), use_cpu=True, bf16=False, **common)
        trainer = trl.DPOTrainer(model=model, ref_model=reference, args=args, processing_class=processor,
                                 train_dataset=datasets.Dataset.from_list(rows_for_trl(train_file)),
                                 callbacks=[callback])
    trainer.train()
    timed = clock.times[WARMUP_STEPS - 1:]
    seconds = timed[-1] - timed[0]
    pairs = (len(timed) - 1) * batch
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"engine": engine, "timed_steps": len(timed) - 1, "pairs_per_s": pairs / seconds,
            "peak_rss_mib": round(peak_rss_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="/tmp/preftune-vlm-bench")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.root)
    if args.engine:
        print(json.dumps(run_engine(args.engine, root / "workspace", args.steps, args.batch)))
        return
    from preftune.quickstart_vision import build_vision_workspace

    build_vision_workspace(root / "workspace")
    runs: dict[str, list[dict]] = {"preftune": [], "trl": []}
    for _ in range(args.repeats):
        for engine in runs:
            out = subprocess.run([sys.executable, __file__, "--engine", engine, "--steps", str(args.steps), "--batch",
                                  str(args.batch), "--root", str(root)], check=True, capture_output=True, text=True)
            runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[engine][-1]))
    medians = {engine: {key: statistics.median(run[key] for run in results) for key in ("pairs_per_s", "peak_rss_mib")}
               for engine, results in runs.items()}
    print(json.dumps({"medians": medians, "repeats": args.repeats,
                      "pairs_per_s_ratio": medians["preftune"]["pairs_per_s"] / medians["trl"]["pairs_per_s"],
                      "peak_rss_ratio": medians["preftune"]["peak_rss_mib"] / medians["trl"]["peak_rss_mib"]}))


if __name__ == "__main__":
    main()
