"""One forward + backward of one long pair in each batch layout: seconds and peak RSS, each in its own process.

Model: a random Qwen2-shaped causal LM (hidden 256, 4 layers, 4 heads / 2 key-value heads, MLP 688, GPT-2's
50257-token vocabulary, fp32, sdpa attention, chunked LM head). Data: one pair of random token ids, prompt P and two
completions of C tokens (or the lengths given). The step is preftune's policy step without the optimizer:
``pair_logprobs`` on the collated batch, ``(chosen - rejected).sum().backward()``.

Layouts:
  plain         ``collate_pairs``: 2 rows prompt + completion (``prefix_sharing: false``)
  shared        ``collate_shared_prefix`` through ``preftune.shared_prefix_attention`` (linear in length; on CPU the
                merged key blocks of ``SharedRowsAttention``)
  shared_replay the same, forced onto the replaying path (the prompt's queries recomputed per extra completion;
                what shared rows ran on CPU before the merged blocks, and what they run off CPU)
  shared_dense  the same rows with the dense (1, 1, T, T) mask (the layout before issue 18; the fallback for models
                without the shared-prefix attention)

Usage (each layout x length in a fresh process; prints a table and, with --json, writes the rows):
  PYTHONPATH=src python benchmarks/long_pairs_layouts.py --lengths 500+7000x2 14000+1000x2 --layouts plain shared
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def parse_lengths(text: str) -> tuple[int, list[int]]:
    """``"500+7000x2"`` → (500, [7000, 7000]); ``"500+7000+6000"`` → (500, [7000, 6000])."""
    prompt, *rest = text.split("+")
    completions: list[int] = []
    for piece in rest:
        length, _, count = piece.partition("x")
        completions += [int(length)] * int(count or 1)
    return int(prompt), completions


def build_model(max_positions: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", vocab_size=50257, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()


def one_step(layout: str, prompt: int, completions: list[int]) -> dict:
    import torch

    from preftune.data.collate import collate_pairs, collate_shared_prefix
    from preftune.logprobs import pair_logprobs

    torch.set_num_threads(int(torch.get_num_threads()))
    generator = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(3, 50257, (n,), generator=generator).tolist()  # noqa: E731
    example = {"prompt_ids": draw(prompt), "chosen_ids": draw(completions[0]),
               "rejected_ids": [draw(n) for n in completions[1:]] if len(completions) > 2 else draw(completions[1])}
    collate = collate_pairs if layout == "plain" else collate_shared_prefix
    batch = collate([example], pad_token_id=0)
    model = build_model(prompt + max(completions) + 8)
    if layout == "shared_dense":  # the model keeps plain sdpa, so the forward builds the dense mask
        import preftune.logprobs as logprobs

        logprobs.use_shared_prefix_attention = lambda model: False
    if layout == "shared_replay":
        import preftune.shared_prefix_attention as attention

        attention.merged_blocks_apply = lambda query, dropout: False
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    start = time.perf_counter()
    out = pair_logprobs(model, batch)
    loss = (out.chosen_logps - out.rejected_logps).sum()
    loss.backward()
    seconds = time.perf_counter() - start
    return {
        "layout": layout, "prompt": prompt, "completions": completions, "seconds": round(seconds, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "rss_before_step_mib": round(rss_before, 1), "loss": float(loss), "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", default=["500+7000x2", "14000+1000x2"])
    parser.add_argument("--layouts", nargs="+", default=["plain", "shared"],
                        choices=["plain", "shared", "shared_replay", "shared_dense"])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--child", nargs=2, metavar=("LAYOUT", "LENGTHS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_step(args.child[0], *parse_lengths(args.child[1]))))
        return 0
    rows = []
    for lengths in args.lengths:
        for layout in args.layouts:
            done = subprocess.run([sys.executable, __file__, "--child", layout, lengths], capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"layout": layout, "lengths": lengths, "error": done.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"lengths": lengths})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'lengths':>16} {'layout':>13} {'s/step':>8} {'peak RSS MiB':>13}")
    for row in rows:
        print(f"{row['lengths']:>16} {row['layout']:>13} {row.get('seconds', 'error')!s:>8} {row.get('peak_rss_mib', '-')!s:>13}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
