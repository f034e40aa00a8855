"""Profile one engine's training steps on a benchmark case: where does the step time go?

    python benchmarks/profile_step.py --case a --engine preftune --steps 4 [--work-dir DIR] [--rows 25]
    python benchmarks/profile_step.py --long 500+7000 --engine preftune --steps 3   # case d, one length point

Builds (or reuses, with ``--work-dir``) the case, trains ``--steps`` steps under ``torch.profiler`` and prints
the operators with the most self CPU time, after the first (warm-up) step. For finding work to cut, not for
timings: the profiler adds its own overhead; use ``run.py`` for numbers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import build_case, build_long_pair_case, load_case  # noqa: E402
from engines import RunSpec, load_models, preftune_trainer, trl_trainer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="a")
    parser.add_argument("--engine", default="preftune")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--long", default=None, metavar="PROMPT+COMPLETION", help="case d at this length point instead of --case")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="preftune-profile-"))
    if args.long:
        prompt, completion = (int(part) for part in args.long.split("+"))
        case_dir = build_long_pair_case(work_dir / "cases", prompt, completion, pairs=args.steps)
    else:
        case_dir = work_dir / "cases" / args.case
        if not (case_dir / "case.json").exists():
            case_dir = build_case(args.case, work_dir / "cases")
    meta, rows = load_case(case_dir)
    spec = RunSpec(engine=args.engine, case_dir=str(case_dir), steps=args.steps, output_dir=str(work_dir / "out"))
    policy, reference, tokenizer = load_models(case_dir / "model", "cpu")
    max_length = meta["settings"]["max_length"]
    if args.engine.startswith("preftune"):
        trainer = preftune_trainer(spec, policy, reference, tokenizer, rows, max_length, work_dir / "out")
    else:
        trainer = trl_trainer(spec, policy, reference, tokenizer, rows, max_length, work_dir / "out",
                               precompute=args.engine == "trl-precompute")
    def report(profiler) -> None:
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)

    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=args.steps - 1, repeat=1),
        on_trace_ready=report,
    )
    handle = register_optimizer_step_post_hook(lambda *_: profiler.step())
    with profiler:
        trainer.train()
    handle.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
