"""s/step of the shared (``preftune.shared_prefix_attention``) and the plain layout across prompt/completion lengths.

The measurements behind ``preftune.layout.shared_prefix_pays`` (docs/layouts.md). Model as in
``long_pairs_layouts.py`` (random Qwen2-shaped, hidden 256, 4 layers, GPT-2 vocabulary, fp32). Each point: a batch
of B pairs with prompt P and two completions of C tokens (lengths jittered by ±25 % so rows pad), one policy
forward + backward per layout, layouts interleaved, best of ``--repeats`` after one warm-up of each.

Usage: PYTHONPATH=src python benchmarks/layout_rule_sweep.py [--repeats 3] [--points B:P:C ...]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from long_pairs_layouts import build_model
from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.logprobs import pair_logprobs

POINTS = ["8:16:16", "8:64:64", "8:256:32", "8:32:256", "4:512:512", "1:100:2000", "1:1000:1000", "1:3000:300"]


def examples(batch: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    jitter = lambda n: max(1, int(n * (0.75 + 0.5 * float(torch.rand(1, generator=generator)))))  # noqa: E731
    draw = lambda n: torch.randint(3, 50257, (jitter(n),), generator=generator).tolist()  # noqa: E731
    return [{"prompt_ids": draw(prompt), "chosen_ids": draw(completion), "rejected_ids": draw(completion)} for _ in range(batch)]


def step_seconds(model, batch) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = pair_logprobs(model, batch)
    (out.chosen_logps - out.rejected_logps).sum().backward()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=POINTS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = build_model(8192)
    for point in args.points:
        batch_size, prompt, completion = map(int, point.split(":"))
        rows = examples(batch_size, prompt, completion)
        batches = {"plain": collate_pairs(rows, pad_token_id=0), "shared": collate_shared_prefix(rows, pad_token_id=0)}
        for batch in batches.values():  # warm-up: first-touch allocations
            step_seconds(model, batch)
        times = {name: [] for name in batches}
        for _ in range(args.repeats):
            for name, batch in batches.items():
                times[name].append(step_seconds(model, batch))
        best = {name: round(min(values), 3) for name, values in times.items()}
        print(json.dumps({"B": batch_size, "P": prompt, "C": completion, **best,
                          "shared/plain": round(best["shared"] / best["plain"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
