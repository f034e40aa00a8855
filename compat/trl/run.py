"""Run TRL's own DPO test module offline against TRL and against preftune, and compare the results.

    python compat/trl/run.py --trl-tests PATH [--engines trl,preftune] [--assets DIR] [--out DIR]
                             [-k EXPR] [-x] [-- EXTRA_PYTEST_ARGS]

PATH is TRL's ``tests/test_dpo_trainer.py`` (from a TRL checkout; see README.md). For each engine the script
builds the assets if needed (build_assets.py), writes the ported module to ``OUT/ENGINE/trl_tests/`` (port.py) and
runs pytest on it with the hub offline and this checkout's ``src`` first on ``PYTHONPATH``; pytest's output goes
to ``OUT/ENGINE/pytest.log`` and its results to ``OUT/ENGINE/junit.xml``. It then prints, per test, the result
under TRL and under preftune (with the first line of preftune's error), the totals, and the tests TRL passes but
preftune does not, and writes the same to ``OUT/results.json`` and ``OUT/results.md``.

An engine not run this time keeps its previous junit.xml in OUT, so ``--engines preftune`` re-measures preftune
against the TRL results of an earlier run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from build_assets import DEFAULT_ASSETS, ensure_assets  # noqa: E402
from port import ENGINE_IMPORTS, port  # noqa: E402

DEFAULT_OUT = Path("/tmp/trl-compat-run")
PACKAGE = "trl_tests"  # folder of the ported module; a package so that `from .testing_utils import` works
ENGINES = ("trl", "preftune")


@dataclass
class Outcome:
    """One test's result under one engine. `status`: passed, failed, error, skipped, xfailed or not run."""

    status: str
    message: str = ""  # failure, error or skip message (first 2,000 characters)
    seconds: float = 0.0

    @property
    def first_line(self) -> str:
        return first_error_line(self.message)


def first_error_line(message: str) -> str:
    """The first non-empty line of a pytest failure message; for a `pytest.raises(match=...)` mismatch, the
    line giving the actual message is added, since "Regex pattern did not match." alone says nothing."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    if "Regex pattern did not match" in first:
        actual = next((line for line in lines if line.startswith("Input:") or line.startswith("Actual message:")), "")
        first = f"{first} {actual}".strip()
    return first[:300]


# -- running one engine -----------------------------------------------------------------------------------------


def engine_dir(out: Path, engine: str) -> Path:
    return out / engine


def pytest_env(out: Path, engine: str) -> dict[str, str]:
    """Hub and dataset downloads off, caches inside OUT, this checkout's preftune first on the path."""
    env = dict(os.environ)
    pythonpath = [str(REPO_ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(engine_dir(out, engine) / "hf_home"),
        PREFTUNE_CACHE=str(engine_dir(out, engine) / "preftune_cache"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",  # pytest's progress reaches the log as it happens
        PYTHONPATH=os.pathsep.join(pythonpath),
    )
    # The models are tiny: one thread per process is as fast and leaves the other cores to their owners.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_engine(engine: str, trl_tests: Path, assets: Path, out: Path, pytest_args: list[str]) -> int:
    """Port the module for `engine`, run pytest on it (output teed to pytest.log); returns pytest's exit code."""
    directory = engine_dir(out, engine)
    directory.mkdir(parents=True, exist_ok=True)
    module = directory / PACKAGE / trl_tests.name
    port(trl_tests, module, engine, assets)
    junit = directory / "junit.xml"
    junit.unlink(missing_ok=True)
    meta = {"trl_tests": str(trl_tests), "trl_tests_sha256": hashlib.sha256(trl_tests.read_bytes()).hexdigest(),
            "pytest_args": pytest_args, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "packages": installed_versions()}  # fmt: skip
    (directory / "run_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    command = [
        sys.executable, "-m", "pytest", str(module),
        "-c", str(module.parent / "pytest.ini"), "--rootdir", str(directory),
        "-p", "no:cacheprovider", "--basetemp", str(directory / "tmp"),
        f"--junitxml={junit}", "-o", "junit_family=xunit2",
        "-q", "-rfEs", *pytest_args,
    ]  # fmt: skip
    print(f"run: [{engine}] {' '.join(command)}", flush=True)
    started = time.monotonic()
    with open(directory / "pytest.log", "w") as log:
        process = subprocess.Popen(
            command, cwd=directory, env=pytest_env(out, engine), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace",
        )  # fmt: skip
        for line in process.stdout:
            log.write(line)
            if _is_progress_line(line):
                print(f"  [{engine}] {line.rstrip()}", flush=True)
        code = process.wait()
    print(f"run: [{engine}] pytest exit code {code} after {time.monotonic() - started:.0f} s", flush=True)
    if installed_versions() != meta["packages"]:
        print(f"run: [{engine}] warning: installed packages changed during the run: {meta['packages']} -> "
              f"{installed_versions()}; rerun this engine", flush=True)  # fmt: skip
    return code


RECORDED_PACKAGES = ("trl", "transformers", "torch", "peft", "accelerate", "datasets", "tokenizers", "wandb",
                     "bitsandbytes", "liger-kernel", "kernels")  # fmt: skip


def installed_versions() -> dict[str, str | None]:
    """Versions of the packages the results depend on (None: not installed), recorded with each run: the venv is
    shared, and a package installed while a run goes on changes what it measures."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def _is_progress_line(line: str) -> bool:
    """pytest -q's progress lines (dots and letters, then [ nn%]) and its summary lines; not the log noise."""
    return bool(re.match(r"^[.FEsxX]+\s+\[\s*\d+%\]$", line.strip())) or line.startswith(("FAILED", "ERROR", "=="))


# -- reading results --------------------------------------------------------------------------------------------


def read_junit(junit: Path, assets: Path) -> dict[str, Outcome]:
    """test id -> outcome, ids written as in TRL (``Class::test[params]``, local asset paths back to hub ids)."""
    outcomes: dict[str, Outcome] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        test_id = test_id_of(case.get("classname", ""), case.get("name", ""), assets)
        seconds = float(case.get("time") or 0.0)
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                status, message = ("failed" if child.tag == "failure" else "error"), child.get("message") or ""
                if not message.strip():
                    message = (child.text or "").strip().splitlines()[-1] if (child.text or "").strip() else ""
                break
            if child.tag == "skipped":
                status = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message") or ""
                break
        outcomes[test_id] = Outcome(status, _localise(message, assets)[:2000], seconds)
    return outcomes


def test_id_of(classname: str, name: str, assets: Path) -> str:
    cls = classname.rsplit(".", 1)[-1]
    return _localise(f"{cls}::{name}" if cls and not cls.startswith("test_") else name, assets)


def _localise(text: str, assets: Path) -> str:
    """Write local asset paths back as the hub ids the test file names."""
    return text.replace(f"{assets.resolve()}/", "")


# -- comparing --------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    rows: list[dict]  # {"test", "trl", "preftune", "preftune_error"}
    trl_passed: int
    both_passed: int
    trl_passed_preftune_not: list[str]
    counts: dict[str, dict[str, int]]  # engine -> status -> count
    preftune_failures_by_error: dict[str, list[str]]  # first error line -> tests (among TRL-passing tests)


def compare(results: dict[str, dict[str, Outcome]]) -> Comparison:
    trl, preftune = results.get("trl", {}), results.get("preftune", {})
    not_run = Outcome("not run")
    rows, regressions, by_error = [], [], {}
    for test in _ordered(list(trl) + [t for t in preftune if t not in trl]):
        mine, theirs = preftune.get(test, not_run), trl.get(test, not_run)
        rows.append({
            "test": test,
            "trl": theirs.status,
            "preftune": mine.status,
            "preftune_error": mine.first_line if mine.status in ("failed", "error") else "",
            "skip_reason": (theirs if theirs.status == "skipped" else mine).first_line
            if "skipped" in (theirs.status, mine.status) else "",
        })  # fmt: skip
        if theirs.status == "passed" and mine.status != "passed":
            regressions.append(test)
            by_error.setdefault(mine.first_line or mine.status, []).append(test)
    counts = {engine: _count(outcomes) for engine, outcomes in results.items()}
    trl_passed = [t for t, o in trl.items() if o.status == "passed"]
    both = [t for t in trl_passed if preftune.get(t, not_run).status == "passed"]
    by_error = dict(sorted(by_error.items(), key=lambda item: -len(item[1])))
    return Comparison(rows, len(trl_passed), len(both), regressions, counts, by_error)


def _ordered(tests: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for test in tests:
        seen.setdefault(test, None)
    return list(seen)


def _count(outcomes: dict[str, Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return counts


def format_report(comparison: Comparison, markdown: bool) -> str:
    """The per-test table, the totals and the TRL-passing tests preftune fails, as plain text or Markdown."""
    width = max((len(row["test"]) for row in comparison.rows), default=4)
    lines = []
    if markdown:
        lines += ["| test | TRL | preftune | preftune error (first line) |", "|---|---|---|---|"]
        for row in comparison.rows:
            error = row["preftune_error"].replace("|", "\\|")
            lines.append(f"| `{row['test']}` | {row['trl']} | {row['preftune']} | {error} |")
    else:
        lines.append(f"{'test':<{width}}  {'TRL':<8} {'preftune':<8} preftune error (first line)")
        for row in comparison.rows:
            lines.append(f"{row['test']:<{width}}  {row['trl']:<8} {row['preftune']:<8} {row['preftune_error']}")
    lines += [
        "",
        "Totals: " + "; ".join(
            f"{engine}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            for engine, counts in comparison.counts.items()
        ),  # fmt: skip
        f"Tests TRL passes: {comparison.trl_passed}; of those preftune passes: {comparison.both_passed}; "
        f"fails or skips: {len(comparison.trl_passed_preftune_not)}",
        "",
        "TRL-passing tests that preftune does not pass, by preftune's first error line:",
    ]
    for error, tests in comparison.preftune_failures_by_error.items():
        lines.append(f"{'- ' if markdown else '  '}[{len(tests)}] {error}")
        lines += [f"{'  - ' if markdown else '      '}{test}" for test in tests]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-tests", type=Path, required=True, help="TRL's tests/test_dpo_trainer.py")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, run in this order")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--gpt2-tokenizer", type=Path, default=None, help="for building the assets")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("-x", dest="exitfirst", action="store_true", help="stop at the first failure")
    parser.add_argument("--report-only", action="store_true", help="run nothing; compare the results already in --out")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINE_IMPORTS]
    if unknown:
        parser.error(f"unknown engine(s) {unknown}; expected {sorted(ENGINE_IMPORTS)}")
    if not args.trl_tests.is_file():
        parser.error(f"--trl-tests: no such file: {args.trl_tests}")
    assets, out = args.assets.resolve(), args.out.resolve()
    trl_tests = args.trl_tests.resolve()

    if args.report_only:
        engines = []
    else:
        ensure_assets(assets, args.gpt2_tokenizer)
    pytest_args = (["-k", args.keyword] if args.keyword else []) + (["-x"] if args.exitfirst else []) + extra
    for engine in engines:
        run_engine(engine, trl_tests, assets, out, pytest_args)

    results, metas = {}, {}
    for engine in ENGINES:
        junit = engine_dir(out, engine) / "junit.xml"
        if junit.is_file():
            results[engine] = read_junit(junit, assets)
            meta_file = engine_dir(out, engine) / "run_meta.json"
            metas[engine] = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if len({json.dumps([m.get("trl_tests_sha256"), m.get("pytest_args")]) for m in metas.values()}) > 1:
        print("run: warning: the engines' results come from runs of different test files or pytest arguments: "
              + "; ".join(f"{e}: {m}" for e, m in metas.items()))  # fmt: skip
    comparison = compare(results)
    print()
    print(format_report(comparison, markdown=False))
    (out / "results.md").write_text(format_report(comparison, markdown=True) + "\n")
    payload = {
        "trl_tests": str(trl_tests),
        "assets": str(assets),
        "engines_run_now": engines,
        "runs": metas,
        "outcomes": {engine: {t: asdict(o) for t, o in outcomes.items()} for engine, outcomes in results.items()},
        **asdict(comparison),
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    print(f"\nrun: wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
