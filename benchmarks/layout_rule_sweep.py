"""CPU time of the shared and the plain layout across batch sizes and prompt/completion lengths, and the fit behind
``preftune.layout.SHARED_ROW_OVERHEAD_TOKENS`` (docs/layouts.md).

Model as in ``long_pairs_layouts.py`` (random Qwen2-shaped, hidden 256, 4 layers, GPT-2 vocabulary, fp32). Each
point: a batch of B pairs with prompt P and K completions of C tokens (lengths jittered by ±25 % so rows pad), one
policy forward + backward per layout, layouts interleaved, best of ``--repeats`` after one warm-up of each.

Time is the process's CPU time with one intra-op thread (``time.process_time``), not wall time: the machine this was
written on is shared by several people, and CPU time of a single-threaded step hardly depends on their load.

The fit: the two layouts score the same tokens (the LM head's work cancels), so per point
``t_shared - t_plain = a * (shared_work - plain_work) + b * (B * K)``, with ``layout_work``'s token counts and B*K
the completions the shared rows attend to one by one. Least squares over the points, each equation divided by the
point's plain time (so that every point counts by its relative difference, not by its size: the linear model leaves
out the attention's quadratic work, which only the long points have), gives ``a`` (seconds per token of work) and
``b`` (seconds per row and completion); ``b / a`` is the overhead in tokens.

Usage: PYTHONPATH=src python benchmarks/layout_rule_sweep.py [--repeats 3] [--points B:P:C[:K] ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from long_pairs_layouts import build_model
from preftune.data.collate import collate_pairs, collate_shared_prefix
from preftune.layout import layout_work
from preftune.logprobs import completion_logprobs

POINTS = ["16:4:8", "16:4:32", "8:4:128", "8:16:16", "8:16:64", "8:64:64", "8:256:32", "8:32:256", "4:8:64:4",
          "4:512:512", "1:100:2000", "1:1000:1000"]


def examples(batch: int, prompt: int, completion: int, completions: int = 2, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    jitter = lambda n: max(1, int(n * (0.75 + 0.5 * float(torch.rand(1, generator=generator)))))  # noqa: E731
    draw = lambda n: torch.randint(3, 50257, (jitter(n),), generator=generator).tolist()  # noqa: E731
    rows = []
    for _ in range(batch):
        negatives = [draw(completion) for _ in range(completions - 1)]
        rows.append({"prompt_ids": draw(prompt), "chosen_ids": draw(completion),
                     "rejected_ids": negatives[0] if completions == 2 else negatives})
    return rows


def step_seconds(model, batch) -> float:
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    logps = completion_logprobs(model, batch).logps
    (logps * torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)).sum().backward()
    return time.process_time() - start


def fit(rows: list[dict]) -> tuple[float, float]:
    """Least squares ``t_shared - t_plain = a * (shared_work - plain_work) + b * completions``, relative to each
    point's plain time → (a, b)."""
    design = torch.tensor([[(row["shared_work"] - row["plain_work"]) / row["plain"], row["completions"] / row["plain"]]
                           for row in rows], dtype=torch.float64)
    target = torch.tensor([[(row["shared"] - row["plain"]) / row["plain"]] for row in rows], dtype=torch.float64)
    a, b = torch.linalg.lstsq(design, target).solution.flatten().tolist()
    return a, b


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", nargs="+", default=POINTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(8192)
    results = []
    for point in args.points:
        batch_size, prompt, completion, *count = map(int, point.split(":"))
        completions = count[0] if count else 2
        rows = examples(batch_size, prompt, completion, completions)
        plain_work, shared_work = layout_work(rows)
        batches = {"plain": collate_pairs(rows, pad_token_id=0), "shared": collate_shared_prefix(rows, pad_token_id=0)}
        for batch in batches.values():  # warm-up: first-touch allocations
            step_seconds(model, batch)
        times = {name: [] for name in batches}
        for _ in range(args.repeats):
            for name, batch in batches.items():
                times[name].append(step_seconds(model, batch))
        best = {name: round(min(values), 4) for name, values in times.items()}
        results.append({"point": point, "plain_work": plain_work, "shared_work": shared_work,
                        "completions": batch_size * completions, **best,
                        "shared/plain": round(best["shared"] / best["plain"], 3)})
        print(json.dumps(results[-1]), flush=True)
    a, b = fit(results)
    print(json.dumps({"seconds_per_token": a, "seconds_per_completion": b, "overhead_tokens": round(b / a, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
