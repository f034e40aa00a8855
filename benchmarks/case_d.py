"""Case d, long pairs: one pair per step at long lengths, each engine in its own process under a memory and a time
cap, results as markdown tables.

Two parts, each a list of length points ``(prompt, completion)`` (every pair: a prompt and two completions of that
many tokens, EOS included):

- the mixes: long prompt (14,000 + 2×1,000) and long completion (500 + 2×7,000, reasoning-trace-like);
- the sweep (``--sweep``): 2k, 8k, 16k and 32k tokens per sequence (prompt + one completion), the prompt taking
  ``--sweep-prompt-share`` of it (default one half: 1,024 + 2×1,024 ... 16,384 + 2×16,384).

Per point the engines run one after the other (interleaved), each a fresh ``run.py --worker`` process watched by
``run_capped``: it is stopped when its resident set passes ``--memory-cap-gib``, when the machine's available
memory falls below ``--memory-reserve-gib`` (the machine is shared), or when one step takes longer than
``--step-time-cap`` seconds; the table then says so instead of giving a number. In the sweep an engine stopped at
one length is not started at the longer ones.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cases import build_long_pair_case

RUN = Path(__file__).resolve().parent / "run.py"
MIXES = ((14000, 1000), (500, 7000))
SMOKE_MIXES = ((96, 32), (24, 96))
SWEEP = (2048, 8192, 16384, 32768)
SMOKE_SWEEP = (64, 128)
ENGINES = ("preftune", "preftune+prefix_sharing=false", "trl")
LABELS = {
    "preftune": "preftune default",
    "preftune+prefix_sharing=false": "preftune, `prefix_sharing: false`",
    "trl": "TRL 1.16",
    "trl-precompute": "TRL 1.16, `precompute_ref_log_probs`",
}
STOPPED = {
    "memory cap": "> {memory_cap_gib:g} GiB (stopped)",
    "machine memory": "out of memory (machine below {memory_reserve_gib:g} GiB free)",
    "out of memory": "out of memory",
    "time cap": "> {step_time_cap:g} s/step (stopped)",
    "skipped": "not run (stopped at a shorter length)",
    "failed": "failed",
}


# ------------------------------------------------------------------------------------------ the watched worker
def process_rss_mib(pid: int) -> float:
    """The current resident set size of process ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def machine_available_mib() -> float | None:
    """MemAvailable of this machine in MiB, or None where /proc/meminfo cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _last_progress(path: Path) -> tuple[float | None, int]:
    """(wall time of the last "train"/"step" event, steps finished) from a worker's progress file."""
    try:
        lines = path.read_text().split("\n")
    except OSError:
        return None, 0
    events = [line.split() for line in lines if line.count(" ") == 1]
    if not events:
        return None, 0
    return float(events[-1][1]), sum(1 for name, _ in events if name == "step")


def run_capped(spec: dict, env: dict, scratch: Path, *, memory_cap_mib: float, memory_reserve_mib: float,
               step_time_cap: float, poll_seconds: float = 0.5, worker_command: list[str] | None = None) -> dict:
    """Run one benchmark worker (``run.py --worker SPEC``) and watch it. Returns the worker's result with
    ``status: "ok"``, or ``{"status": reason, ...}`` when it was stopped (``memory cap``: its resident set passed
    ``memory_cap_mib``; ``machine memory``: the machine's available memory fell below ``memory_reserve_mib``;
    ``time cap``: one step (or the wait for the first) took longer than ``step_time_cap`` seconds, counted from the
    start of training) or ended without a result (``out of memory`` when its error says so or the kernel killed it,
    else ``failed``), with the highest resident set seen and the steps finished. ``worker_command`` replaces
    ``python run.py --worker`` (the spec JSON, with ``progress_file`` added, is its last argument)."""
    scratch.mkdir(parents=True, exist_ok=True)
    progress = scratch / "progress.txt"
    progress.unlink(missing_ok=True)
    spec = {**spec, "progress_file": str(progress)}
    env = {**env, "HF_DATASETS_CACHE": str(scratch / "hf-datasets")}
    stdout_path, stderr_path = scratch / "stdout.txt", scratch / "stderr.txt"
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        command = worker_command or [sys.executable, str(RUN), "--worker"]
        process = subprocess.Popen([*command, json.dumps(spec)], env=env, stdout=out, stderr=err)
        seen_rss, stopped = 0.0, None
        while process.poll() is None:
            rss = process_rss_mib(process.pid)
            seen_rss = max(seen_rss, rss)
            available = machine_available_mib()
            last_event, _ = _last_progress(progress)
            if rss > memory_cap_mib:
                stopped = "memory cap"
            elif available is not None and available < memory_reserve_mib:
                stopped = "machine memory"
            elif last_event is not None and time.time() - last_event > step_time_cap:
                stopped = "time cap"
            if stopped:
                process.kill()  # our own child, by its pid
                process.wait()
                break
            time.sleep(poll_seconds)
    _, steps_done = _last_progress(progress)
    lines = [line for line in stdout_path.read_text().splitlines() if line.strip()]
    if stopped is None and process.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "status": "ok", "watched_peak_rss_mib": seen_rss}
    error_tail = stderr_path.read_text(errors="replace").splitlines()[-20:]
    if stopped is None:
        out_of_memory = process.returncode == -9 or any(
            marker in line for line in error_tail for marker in ("can't allocate memory", "MemoryError", "out of memory")
        )
        stopped = "out of memory" if out_of_memory else "failed"
    return {"engine": spec["engine"], "status": stopped, "returncode": process.returncode, "steps_done": steps_done,
            "watched_peak_rss_mib": seen_rss, "error_tail": error_tail}


# ------------------------------------------------------------------------------------------------- the points
def sweep_points(lengths, prompt_share: float) -> list[tuple[int, int]]:
    """(prompt, completion) for each sequence length: the prompt takes ``prompt_share`` of it, the rest is each
    completion."""
    points = []
    for length in lengths:
        prompt = max(1, round(length * prompt_share))
        points.append((prompt, length - prompt))
    return points


def point_label(prompt: int, completion: int) -> str:
    return f"{prompt:,} + 2×{completion:,}"


def summarize_point(runs: list[dict]) -> dict:
    """One engine at one point over its repeats: median s/step and peak RSS of the finished runs, or the reason
    it was stopped (when no run finished)."""
    finished = [r for r in runs if r["status"] == "ok"]
    if not finished:
        return {"status": runs[0]["status"] if runs else "skipped", "runs": len(runs),
                "watched_peak_rss_mib": max((r.get("watched_peak_rss_mib", 0.0) for r in runs), default=None)}
    return {
        "status": "ok",
        "runs": len(runs),
        "finished_runs": len(finished),
        "seconds_per_step": statistics.median(r["median_step_seconds"] for r in finished),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in finished),
        "train_peak_rss_mib": statistics.median(r["train_peak_rss_mib"] for r in finished) if all(r.get("train_peak_rss_mib") for r in finished) else None,
        "batch_check": ", ".join(sorted({r["batch_check"] for r in finished})),
        "first_loss": statistics.median(r["first_loss"] for r in finished if r.get("first_loss") is not None) if any(r.get("first_loss") is not None for r in finished) else None,
    }


# -------------------------------------------------------------------------------------------------- tables
def cell(summary: dict | None, caps: dict) -> str:
    """``"12.3 s/step, 1.64 GiB"``, or the reason there is no number."""
    if summary is None:
        return "–"
    if summary["status"] != "ok":
        return STOPPED.get(summary["status"], summary["status"]).format(**caps)
    return f"{summary['seconds_per_step']:.1f} s/step, {summary['peak_rss_mib'] / 1024:.2f} GiB"


def ratio_cell(mine: dict | None, theirs: dict | None) -> str:
    """How the first engine compares with another: ``×4.70 faster, ×0.51 memory`` (time theirs ÷ mine, memory
    mine ÷ theirs), ``–`` where either has no number."""
    if not mine or not theirs or mine["status"] != "ok" or theirs["status"] != "ok":
        return "–"
    return f"×{theirs['seconds_per_step'] / mine['seconds_per_step']:.2f} speed, ×{mine['peak_rss_mib'] / theirs['peak_rss_mib']:.2f} memory"


def markdown_table(title: str, points: list[tuple[int, int]], engines: list[str], summaries: dict, caps: dict,
                   *, per_sequence: bool = False) -> str:
    """A markdown table: one row per point, one column per engine, then the first engine against each other one."""
    first, others = engines[0], engines[1:]
    head = ["tokens per sequence (prompt + 2 completions)" if per_sequence else "prompt + 2 completions (tokens)"]
    head += [LABELS.get(e, e) for e in engines] + [f"{LABELS.get(first, first)} vs {LABELS.get(o, o)}" for o in others]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for prompt, completion in points:
        key = point_label(prompt, completion)
        row_label = f"{prompt + completion:,} ({key})" if per_sequence else key
        row = [row_label] + [cell(summaries.get(key, {}).get(e), caps) for e in engines]
        row += [ratio_cell(summaries.get(key, {}).get(first), summaries.get(key, {}).get(o)) for o in others]
        lines.append("| " + " | ".join(row) + " |")
    checks = []
    for engine in engines:
        seen = {s["batch_check"] for point in summaries.values() if (s := point.get(engine)) and s["status"] == "ok"}
        losses = [s["first_loss"] for point in summaries.values() if (s := point.get(engine)) and s.get("first_loss") is not None]
        if seen:
            loss_text = f", loss@1 {min(losses):.4f}–{max(losses):.4f}" if losses else ""
            checks.append(f"{LABELS.get(engine, engine)}: batches {', '.join(sorted(seen))}{loss_text}")
    if checks:
        lines += ["", "Checks: " + "; ".join(checks) + "."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the run
def run_case_d(args, env: dict, device: str, work_dir: Path, header: str) -> dict:
    """Run the mixes (unless ``--no-mixes``) and the sweep (with ``--sweep``); write ``<results>/<time>-d.json`` and
    ``.md`` after every worker (a long run can be read while it runs); return the results."""
    started = dt.datetime.now(dt.timezone.utc)
    caps = {"memory_cap_gib": args.memory_cap_gib, "memory_reserve_gib": args.memory_reserve_gib,
            "step_time_cap": args.step_time_cap}
    engines = args.engine_list
    parts = []
    if not args.no_mixes:
        mixes = [tuple(int(x) for x in m.split("+")) for m in args.mixes.split(",")] if args.mixes else list(SMOKE_MIXES if args.smoke else MIXES)
        parts.append(("mixes", "Long pairs, case d: the two mixes", mixes, args.steps, False))
    if args.sweep:
        lengths = [int(x) for x in args.sweep_lengths.split(",")] if args.sweep_lengths else list(SMOKE_SWEEP if args.smoke else SWEEP)
        title = f"Length sweep, case d: prompt = {args.sweep_prompt_share:g} of each sequence"
        parts.append(("sweep", title, sweep_points(lengths, args.sweep_prompt_share), args.sweep_steps, True))
    results = {
        "started_utc": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "header": header,
        "settings": {"engines": engines, "repeats": args.repeats, "warmup": args.warmup, "device": device, "smoke": args.smoke,
                     "batch_size": 1, **caps, "learning_rate": args.learning_rate, "beta": args.beta, "seed": args.seed,
                     "optim": args.optim, "gradient_checkpointing": args.gradient_checkpointing},
        "load_average_start": os.getloadavg(),
        "parts": {},
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"{started.strftime('%Y%m%d-%H%M%S')}-d"

    def write() -> str:
        tables = [markdown_table(p["title"], [tuple(x) for x in p["points"]], engines, p["summaries"], caps,
                                 per_sequence=p["per_sequence"]) for p in results["parts"].values()]
        report = render_report(results, tables)
        results["table"] = report
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        stem.with_suffix(".md").write_text(report + "\n", encoding="utf-8")
        return report

    for name, title, points, steps, per_sequence in parts:
        if steps <= args.warmup:
            raise SystemExit(f"{name}: {steps} steps must exceed --warmup ({args.warmup})")
        part = {"title": title, "points": points, "steps": steps, "per_sequence": per_sequence, "runs": [], "summaries": {}}
        results["parts"][name] = part
        stopped_engines: set[str] = set()
        for prompt, completion in points:
            key = point_label(prompt, completion)
            print(f"[bench] case d {name}: building {key} ...", file=sys.stderr, flush=True)
            case_dir = build_long_pair_case(work_dir / "cases", prompt, completion, pairs=steps, smoke=args.smoke, seed=args.seed)
            runs = {engine: [] for engine in engines}
            for repeat in range(args.repeats):
                for engine in engines:
                    if per_sequence and engine in stopped_engines:
                        runs[engine].append({"engine": engine, "status": "skipped"})
                        continue
                    spec = {
                        "engine": engine, "case_dir": str(case_dir), "steps": steps, "warmup": args.warmup, "batch_size": 1,
                        "learning_rate": args.learning_rate, "beta": args.beta, "seed": args.seed, "device": device,
                        "optim": args.optim, "gradient_checkpointing": args.gradient_checkpointing,
                        "output_dir": str(work_dir / f"out-{name}-{prompt}-{completion}-{engine}-{repeat}"),
                    }
                    t0 = time.perf_counter()
                    result = run_capped(spec, env, work_dir / f"scratch-{name}-{prompt}-{completion}-{engine}-{repeat}",
                                        memory_cap_mib=args.memory_cap_gib * 1024, memory_reserve_mib=args.memory_reserve_gib * 1024,
                                        step_time_cap=args.step_time_cap)
                    result.update(point=key, repeat=repeat, wall_seconds=time.perf_counter() - t0, load_average=os.getloadavg())
                    runs[engine].append(result)
                    part["runs"].append(result)
                    if result["status"] != "ok":
                        stopped_engines.add(engine)
                    part["summaries"][key] = {e: summarize_point(r) for e, r in runs.items() if r}
                    print(f"[bench] case d {name} {key} repeat {repeat + 1}/{args.repeats} {engine}: "
                          f"{cell(summarize_point([result]), caps)} (wall {result['wall_seconds']:.0f} s, load {os.getloadavg()[0]:.1f})",
                          file=sys.stderr, flush=True)
                    write()
    results["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results["load_average_end"] = os.getloadavg()
    report = write()
    print(report)
    print(f"\nresults: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return results


def render_report(results: dict, tables: list[str]) -> str:
    settings = results["settings"]
    command = " ".join(Path(results["command"][1]).name if i == 1 else part for i, part in enumerate(results["command"][1:], 1))
    lines = [
        results["header"],
        f"command: python benchmarks/{command}",
        f"started {results['started_utc']}" + (f", finished {results['finished_utc']}" if "finished_utc" in results else " (running)")
        + f"; load average at start {results['load_average_start'][0]:.1f}" + (f", at end {results['load_average_end'][0]:.1f}" if "load_average_end" in results else "")
        + f"; {os.cpu_count()} CPUs, device {settings['device']}",
        f"one pair per step, fp32, median s/step over the steps after {settings['warmup']} warm-up step(s), peak RSS of the "
        f"worker process (GiB); {settings['repeats']} interleaved repeat(s); caps: {settings['memory_cap_gib']:g} GiB RSS, "
        f"{settings['memory_reserve_gib']:g} GiB left on the machine, {settings['step_time_cap']:g} s per step",
        "",
    ]
    for name, part in results["parts"].items():
        lines.append(f"({name}: {part['steps']} steps per run)")
    return "\n".join(lines) + "\n\n" + "\n\n".join(tables)
