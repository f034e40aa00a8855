"""Benchmark preftune's DPO trainer against TRL 1.16 on the same model, data and settings.

    python benchmarks/run.py [--case a|b|c|all] [--repeats 3] [--steps N] [--smoke]
                             [--engines preftune,trl,trl-precompute] [--env KEY=VALUE ...]
    python benchmarks/run.py --case d [--sweep] [--smoke]       # long pairs (case_d.py): markdown tables

Each engine run is its own subprocess (``run.py --worker SPEC``), interleaved per repeat (A B C, A B C, ...), all
with the same environment. A matmul worker measures the float32 matmul ceiling once per repeat. The parent prints
a table of medians and the ratios preftune/TRL, and writes every measurement to benchmarks/results/<time>.json.
See benchmarks/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO_ROOT / "src"))  # measure this checkout's preftune

DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
for _key, _value in DEFAULT_ENV.items():
    os.environ.setdefault(_key, _value)

from cases import CASES, LONG_CASES, build_case, load_case  # noqa: E402
from flops import FORMULA  # noqa: E402

ENGINES = ("preftune", "trl", "trl-precompute")
SUMMARY_METRICS = (
    "pairs_per_second",
    "tokens_per_second",
    "useful_flops_per_second",
    "peak_rss_mib",
    "train_peak_rss_mib",
    "peak_cuda_allocated_mib",
    "setup_seconds",
    "train_seconds",
    "first_loss",
    "final_loss",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="all", help="a, b, c, a comma list, or all (default); d (long pairs) on its own")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per case (default 3; smoke and case d 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run, warm-up included (default 8; case d 3; smoke 2)")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the timing (default 1)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step (default 4)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs kept per case (default 256; smoke 16)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 steps, 1 repeat: checks that it runs")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}; preftune+OPTION[+OPTION] turns preftune boolean options on, e.g. preftune+prefix_sharing")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set in every worker's environment")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    parser.add_argument("--learning-rate", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optim", default="adamw_torch_fused", help="optimizer for both engines (default adamw_torch_fused, TRL 1.16's default)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="turn it on in both engines")
    parser.add_argument("--no-matmul", action="store_true", help="skip the matmul-ceiling worker")
    parser.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--work-dir", type=Path, default=None, help="where cases are built (default: a temp dir)")
    long_pairs = parser.add_argument_group("case d (long pairs, one pair per step; see case_d.py)")
    long_pairs.add_argument("--sweep", action="store_true", help="also run the length sweep (2k, 8k, 16k, 32k tokens per sequence)")
    long_pairs.add_argument("--no-mixes", action="store_true", help="skip the two mixes (with --sweep: the sweep only)")
    long_pairs.add_argument("--mixes", default=None, help="PROMPT+COMPLETION,... (default 14000+1000,500+7000)")
    long_pairs.add_argument("--sweep-lengths", default=None, help="tokens per sequence, comma list (default 2048,8192,16384,32768)")
    long_pairs.add_argument("--sweep-prompt-share", type=float, default=0.5, help="share of each sequence that is prompt (default 0.5)")
    long_pairs.add_argument("--sweep-steps", type=int, default=2, help="steps per sweep run, warm-up included (default 2)")
    long_pairs.add_argument("--memory-cap-gib", type=float, default=20.0, help="stop a worker whose RSS passes this (default 20)")
    long_pairs.add_argument("--memory-reserve-gib", type=float, default=1.0, help="stop a worker when the machine has less available (default 1)")
    long_pairs.add_argument("--step-time-cap", type=float, default=1200.0, help="stop a worker when one step takes longer (s, default 1200)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.cases = list(CASES) if args.case == "all" else [c.strip() for c in args.case.split(",") if c.strip()]
    args.long_pairs = any(case in LONG_CASES for case in args.cases)
    if args.long_pairs and len(args.cases) > 1:
        parser.error("--case: d (long pairs) runs on its own")
    if args.steps is None:
        args.steps = 2 if args.smoke else (3 if args.long_pairs else 8)
    if args.repeats is None:
        args.repeats = 1 if args.smoke or args.long_pairs else 3
    if args.long_pairs and "--engines" not in (argv if argv is not None else sys.argv[1:]):
        from case_d import ENGINES as LONG_PAIR_ENGINES

        args.engines = ",".join(LONG_PAIR_ENGINES)
    if args.smoke and args.long_pairs:
        args.sweep_steps = min(args.sweep_steps, 2)
    args.engine_list = [e.strip() for e in args.engines.split(",") if e.strip()]
    for case in args.cases:
        if case not in CASES + LONG_CASES:
            parser.error(f"--case: unknown case {case!r}; expected a, b, c, all or d")
    for engine in args.engine_list:
        if engine.split("+")[0] not in ENGINES:
            parser.error(f"--engines: unknown engine {engine!r}; expected some of {', '.join(ENGINES)}")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    for item in args.env:
        if "=" not in item or item.startswith("="):
            parser.error(f"--env expects KEY=VALUE, got {item!r}")
    return args


def worker_env(overrides: list[str]) -> dict[str, str]:
    """The environment every worker gets: this one, offline HF defaults, this checkout's src first, --env on top."""
    env = dict(os.environ)
    for key, value in DEFAULT_ENV.items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), str(BENCH_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    for item in overrides:
        key, value = item.split("=", 1)
        env[key] = value
    return env


def run_worker(spec: dict, env: dict[str, str], scratch: Path) -> dict:
    """Run one worker subprocess; return its JSON result (raise with its stderr tail when it fails)."""
    env = dict(env)
    env.setdefault("HF_DATASETS_CACHE", str(scratch / "hf-datasets"))  # no reuse of TRL's precompute cache across runs
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if completed.returncode != 0 or not lines:
        tail = "\n".join(completed.stderr.splitlines()[-40:])
        raise RuntimeError(f"worker {spec.get('engine')} failed (exit {completed.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], matmul: list[dict]) -> dict:
    """Medians per engine, the spread of pairs/s, the matmul ceiling and the preftune/TRL ratios."""
    ceiling = _median([m["best_flops_per_second"] for m in matmul])
    engines = {}
    for engine in dict.fromkeys(r["engine"] for r in runs):
        mine = [r for r in runs if r["engine"] == engine]
        medians = {key: _median([r.get(key) for r in mine]) for key in SUMMARY_METRICS}
        rates = [r["pairs_per_second"] for r in mine]
        medians["pairs_per_second_spread"] = (max(rates) - min(rates)) / medians["pairs_per_second"] if len(rates) > 1 else 0.0
        medians["share_of_matmul_ceiling"] = medians["useful_flops_per_second"] / ceiling if ceiling else None
        medians["batch_check"] = ", ".join(sorted({r["batch_check"] for r in mine}))
        medians["runs"] = len(mine)
        medians["optimizer"] = sorted({o for r in mine for o in r.get("optimizer", [])})
        engines[engine] = medians
    ratios = {}
    for other in ("trl", "trl-precompute"):
        if "preftune" in engines and other in engines:
            mine, theirs = engines["preftune"], engines[other]
            ratio = lambda key: (mine[key] / theirs[key]) if mine.get(key) and theirs.get(key) else None  # noqa: E731
            memory = "peak_cuda_allocated_mib" if mine.get("peak_cuda_allocated_mib") else "peak_rss_mib"
            ratios[f"preftune/{other}"] = {
                "pairs_per_second": ratio("pairs_per_second"),
                "tokens_per_second": ratio("tokens_per_second"),
                "peak_memory": ratio(memory),
                "memory_metric": memory,
            }
    return {"matmul_ceiling_flops_per_second": ceiling, "engines": engines, "ratios": ratios}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(case: str, meta: dict, summary: dict, settings: dict) -> str:
    model = meta["model"]
    ceiling = summary["matmul_ceiling_flops_per_second"]
    lines = [
        f"case {case}: {meta['settings']['description']}",
        f"  model {model['parameters'] / 1e6:.2f} M params (body matmul {model['body_matmul_parameters'] / 1e6:.2f} M, "
        f"d={model['hidden_size']}, L={model['num_layers']}, V={model['vocab_size']}); {meta['pairs']} pairs, "
        f"max_length {meta['settings']['max_length']}; {settings['steps']} steps ({settings['warmup']} warm-up) x "
        f"batch {settings['batch_size']}; device {settings['device']}, torch threads {settings['torch_threads']}; "
        f"medians of {settings['repeats']} interleaved repeats",
        f"  matmul ceiling (fp32 2048^3, best of 10, median over repeats): {_fmt(ceiling and ceiling / 1e9, '.1f')} GFLOP/s",
        "  engine            pairs/s  spread   tokens/s  useful GFLOP/s  %ceiling  peak MiB  train MiB  setup s  loss@1   loss@end  batches",
    ]
    for engine, m in summary["engines"].items():
        memory = m["peak_cuda_allocated_mib"] if m.get("peak_cuda_allocated_mib") else m["peak_rss_mib"]
        lines.append(
            f"  {engine:<16} {_fmt(m['pairs_per_second'], '8.2f')}  {_fmt(100 * m['pairs_per_second_spread'], '5.1f')}%  "
            f"{_fmt(m['tokens_per_second'], '9.0f')}  {_fmt(m['useful_flops_per_second'] and m['useful_flops_per_second'] / 1e9, '14.2f')}  "
            f"{_fmt(m['share_of_matmul_ceiling'] and 100 * m['share_of_matmul_ceiling'], '7.1f')}%  {_fmt(memory, '8.0f')}  "
            f"{_fmt(m.get('train_peak_rss_mib'), '9.0f')}  "
            f"{_fmt(m['setup_seconds'], '8.2f')}  {_fmt(m['first_loss'], '.4f')}   {_fmt(m['final_loss'], '.4f')}    "
            f"{m['batch_check']}"
        )
    for name, r in summary["ratios"].items():
        lines.append(
            f"  {name:<24} pairs/s x{_fmt(r['pairs_per_second'], '.2f')}   tokens/s x{_fmt(r['tokens_per_second'], '.2f')}   "
            f"peak memory x{_fmt(r['peak_memory'], '.2f')} ({r['memory_metric']})"
        )
    lines.append(f"  useful FLOPs per step = {FORMULA}")
    return "\n".join(lines)


def source_fingerprint() -> dict:
    """The git commit and a sha256 of preftune's sources as they are on disk (uncommitted edits included), so a
    result names the code it measured; workers import the sources afresh, so an edit during a run shows here."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "src" / "preftune").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    except OSError:
        commit, dirty = None, ""
    return {"git_commit": commit or None, "src_uncommitted_changes": bool(dirty.strip()), "src_sha256": digest.hexdigest()[:16]}


def code_header(source: dict, versions: dict) -> str:
    """One line naming the code measured: preftune's commit and sources, and the library versions."""
    return (
        f"preftune {source['git_commit'] and source['git_commit'][:10]}{' + uncommitted src changes' if source['src_uncommitted_changes'] else ''}"
        f" (src sha256 {source['src_sha256']}); torch {versions['torch']}, transformers "
        f"{versions['transformers']}, trl {versions['trl']}; CPU {versions.get('cpu_model') or 'unknown'}"
    )


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (ratios between engines differ between CPU models); None elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "cpu_model": cpu_model()}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        from engines import worker_main

        return worker_main(args.worker)

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    env = worker_env(args.env)
    if args.long_pairs:
        from case_d import run_case_d

        with tempfile.TemporaryDirectory(prefix="preftune-bench-d-") as tmp:
            run_case_d(args, env, device, args.work_dir or Path(tmp), code_header(source_fingerprint(), _versions()))
        return 0
    started = dt.datetime.now()
    results = {
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv] if argv is None else ["run.py", *argv],
        "versions": _versions(),
        "preftune_source": source_fingerprint(),
        "env_overrides": args.env,
        "flops_formula": FORMULA,
        "settings": {
            "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "repeats": args.repeats,
            "learning_rate": args.learning_rate, "beta": args.beta, "seed": args.seed, "optim": args.optim,
            "gradient_checkpointing": args.gradient_checkpointing, "device": device, "engines": args.engine_list,
            "smoke": args.smoke, "torch_threads": torch.get_num_threads(),
        },
        "cases": {},
    }
    tables = []
    with tempfile.TemporaryDirectory(prefix="preftune-bench-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        for case in args.cases:
            print(f"[bench] building case {case} ...", file=sys.stderr, flush=True)
            case_dir = build_case(case, work_dir / "cases", pairs=args.pairs, smoke=args.smoke, seed=args.seed)
            meta, _ = load_case(case_dir)
            if args.steps * args.batch_size > meta["pairs"]:
                raise SystemExit(f"case {case}: {args.steps} steps x batch {args.batch_size} need more pairs than the {meta['pairs']} kept; raise --pairs")
            runs, matmul = [], []
            for repeat in range(args.repeats):
                if not args.no_matmul:
                    matmul.append(run_worker({"engine": "matmul", "device": device}, env, Path(tmp)))
                for engine in args.engine_list:
                    spec = {
                        "engine": engine, "case_dir": str(case_dir), "steps": args.steps, "warmup": args.warmup,
                        "batch_size": args.batch_size, "learning_rate": args.learning_rate, "beta": args.beta,
                        "seed": args.seed, "device": device, "optim": args.optim,
                        "gradient_checkpointing": args.gradient_checkpointing,
                        "output_dir": str(Path(tmp) / f"out-{case}-{engine}-{repeat}"),
                    }
                    t0 = time.perf_counter()
                    result = run_worker(spec, env, Path(tmp) / f"scratch-{case}-{engine}-{repeat}")
                    result["repeat"] = repeat
                    result["wall_seconds"] = time.perf_counter() - t0
                    runs.append(result)
                    print(
                        f"[bench] case {case} repeat {repeat + 1}/{args.repeats} {engine}: {result['pairs_per_second']:.2f} pairs/s, "
                        f"{result['tokens_per_second']:.0f} tokens/s, loss {result['first_loss']:.4f} -> {result['final_loss']:.4f}",
                        file=sys.stderr,
                        flush=True,
                    )
            summary = summarize(runs, matmul)
            results["settings"]["torch_threads"] = runs[0]["torch_threads"] if runs else results["settings"]["torch_threads"]
            meta_out = {k: v for k, v in meta.items() if k != "lengths"}
            results["cases"][case] = {"meta": meta_out, "summary": summary, "runs": runs, "matmul": matmul}
            tables.append(format_table(case, meta, summary, {**results["settings"]}))
    source_after = source_fingerprint()
    source = results["preftune_source"]
    header = code_header(source, results["versions"])
    if source_after["src_sha256"] != source["src_sha256"]:
        header += f"\nWARNING: preftune's sources changed during the run (now {source_after['src_sha256']}): runs measured different code"
        results["preftune_source_after"] = source_after
    report = header + "\n\n" + "\n\n".join(tables)
    print(report)
    results["table"] = report
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
