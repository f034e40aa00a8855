"""The benchmark command runs end to end and reports comparable numbers for preftune and TRL.

Runs ``python benchmarks/run.py --smoke`` (two steps, one repeat) on the real stories260K model with HH-RLHF
pairs, then reads the results JSON it wrote. Independent checks: at step 1 the policy equals the reference, so the
DPO loss of every pair is -log σ(0) = ln 2 in both engines; both engines were fed the same batches (real tokens per
step, counted by a hook on the policy, equal the counts from the case's own tokenization).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, SHARED_DIR, shared_asset

RUN = REPO_ROOT / "benchmarks" / "run.py"
HAS_TRL = importlib.util.find_spec("trl") is not None  # the oracle (dev extra); without it nothing to compare

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from cases import split_hh_pair  # noqa: E402
from flops import step_flops  # noqa: E402


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> tuple[dict, str]:
    shared_asset("stories260K-hf")
    shared_asset("hh-rlhf-test/helpful-base-test.jsonl.gz")
    if not HAS_TRL:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    results_dir = tmp_path_factory.mktemp("bench-results")
    env = {**os.environ, "PREFTUNE_SHARED": str(SHARED_DIR), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(RUN), "--smoke", "--case", "c", "--engines", "preftune,trl", "--results-dir", str(results_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    written = sorted(results_dir.glob("*.json"))
    assert len(written) == 1, f"expected one results file in {results_dir}, found {written}"
    return json.loads(written[0].read_text()), completed.stdout


@pytest.mark.slow
def test_smoke_run_reports_both_engines_with_finite_numbers(smoke_results):
    results, stdout = smoke_results
    case = results["cases"]["c"]
    assert {run["engine"] for run in case["runs"]} == {"preftune", "trl"}
    for engine in ("preftune", "trl"):
        summary = case["summary"]["engines"][engine]
        for key in ("pairs_per_second", "tokens_per_second", "useful_flops_per_second", "peak_rss_mib", "train_seconds"):
            assert summary[key] is not None and math.isfinite(summary[key]) and summary[key] > 0, (engine, key, summary[key])
    ratio = case["summary"]["ratios"]["preftune/trl"]
    assert math.isfinite(ratio["pairs_per_second"]) and ratio["pairs_per_second"] > 0
    assert case["summary"]["matmul_ceiling_flops_per_second"] > 0
    # the printed table names both engines and the ratio line
    assert "preftune " in stdout and "trl " in stdout and "preftune/trl" in stdout


@pytest.mark.slow
def test_smoke_run_first_step_loss_is_ln2_in_both_engines(smoke_results):
    results, _ = smoke_results
    for run in results["cases"]["c"]["runs"]:
        assert run["first_loss"] == pytest.approx(math.log(2), abs=1e-5), run["engine"]
        assert math.isfinite(run["final_loss"])


@pytest.mark.slow
def test_smoke_run_feeds_both_engines_the_same_batches(smoke_results):
    results, _ = smoke_results
    runs = {run["engine"]: run for run in results["cases"]["c"]["runs"]}
    assert runs["preftune"]["expected_step_tokens"] == runs["trl"]["expected_step_tokens"]
    assert runs["trl"]["batch_check"] == "same"
    assert runs["preftune"]["batch_check"] in ("same", "same (prefix-shared)")
    timed = runs["trl"]["expected_step_tokens"][runs["trl"]["warmup_steps"] :]
    assert runs["trl"]["tokens"] == sum(timed) == runs["preftune"]["tokens"]


def test_hh_pair_prompt_runs_through_the_last_shared_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this"
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: no"
    assert split_hh_pair(chosen, rejected) == {
        "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:",
        "chosen": " like this",
        "rejected": " no",
    }
    assert split_hh_pair("\n\nHuman: hi\n\nAssistant: a", "\n\nHuman: hi\n\nAssistant:  ") is None


def test_step_flops_counts_body_head_and_causal_attention_per_real_token():
    model = {"body_matmul_parameters": 1000, "hidden_size": 8, "vocab_size": 50, "num_layers": 2, "attention_width": 8}
    pairs = [(3, 2, 1)]  # sequences of 5 and 4 tokens, 3 completion tokens
    forward = 2 * 1000 * 9 + 2 * 8 * 50 * 3 + 2 * 2 * 8 * (25 + 16)
    assert step_flops(model, pairs, reference_in_step=True) == 4 * forward
    assert step_flops(model, pairs, reference_in_step=False) == 3 * forward


# ------------------------------------------------------------------------------------------ case d (long pairs)
def test_long_pair_rows_tokenize_to_the_requested_lengths():
    shared_asset("gpt2-tokenizer")
    from cases import gpt2_tokenizer_with_pad, long_pair_rows

    tokenizer = gpt2_tokenizer_with_pad()
    rows = long_pair_rows(tokenizer, 2, 300, 120)
    for row in rows:
        assert len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) == 300
        for key in ("chosen", "rejected"):  # completion words + the EOS the engines append
            full = tokenizer(row["prompt"] + row[key] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            assert len(full) == 300 + 120
            assert full[-1] == tokenizer.eos_token_id
    assert rows[0]["chosen"] != rows[0]["rejected"] and rows[0]["prompt"] != rows[1]["prompt"]


def test_sweep_points_split_each_sequence_by_the_prompt_share():
    from case_d import sweep_points

    assert sweep_points([2048, 8192], 0.5) == [(1024, 1024), (4096, 4096)]
    assert sweep_points([1000], 0.25) == [(250, 750)]


def test_case_d_table_gives_ratios_and_says_why_a_number_is_missing():
    from case_d import markdown_table

    ok = lambda s, mib: {"status": "ok", "seconds_per_step": s, "peak_rss_mib": mib, "batch_check": "same", "first_loss": 0.6931}  # noqa: E731
    summaries = {
        "100 + 2×50": {"preftune": ok(10.0, 1024.0), "trl": ok(40.0, 4096.0)},
        "200 + 2×100": {"preftune": ok(20.0, 2048.0), "trl": {"status": "time cap"}},
        "400 + 2×200": {"preftune": {"status": "memory cap"}, "trl": {"status": "skipped"}},
    }
    caps = {"memory_cap_gib": 20.0, "memory_reserve_gib": 1.0, "step_time_cap": 600.0}
    table = markdown_table("t", [(100, 50), (200, 100), (400, 200)], ["preftune", "trl"], summaries, caps)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0] == "| 100 + 2×50 | 10.0 s/step, 1.00 GiB | 40.0 s/step, 4.00 GiB | ×4.00 speed, ×0.25 memory |"
    assert rows[1] == "| 200 + 2×100 | 20.0 s/step, 2.00 GiB | > 600 s/step (stopped) | – |"
    assert rows[2] == "| 400 + 2×200 | > 20 GiB (stopped) | not run (stopped at a shorter length) | – |"


FAKE_WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[-1])
if spec["engine"] == "hog":  # memory first, so that a slow machine cannot hit the step-time cap before the memory cap
    blocks = [b"\x01" * (16 * 2**20) for _ in range(16)]  # 256 MiB, written (so resident)
with open(spec["progress_file"], "a") as f:
    f.write(f"train {time.time()}\n")
print(json.dumps({"engine": spec["engine"], "done": True}), flush=True) if spec["engine"] == "quick" else time.sleep(60)
"""


@pytest.mark.parametrize(("engine", "status"), [("quick", "ok"), ("hog", "memory cap"), ("sleeper", "time cap")])
def test_watched_worker_is_stopped_by_the_memory_and_step_time_caps(tmp_path, engine, status):
    from case_d import run_capped

    started = time.perf_counter()
    result = run_capped({"engine": engine}, dict(os.environ), tmp_path, memory_cap_mib=128, memory_reserve_mib=0,
                        step_time_cap=2.0, poll_seconds=0.1, worker_command=[sys.executable, "-c", FAKE_WORKER])
    assert result["status"] == status, result
    assert time.perf_counter() - started < 30  # stopped, not waited out (the fake sleeps 60 s)
    if status == "memory cap":
        assert result["watched_peak_rss_mib"] > 128


@pytest.fixture(scope="module")
def case_d_smoke(tmp_path_factory) -> tuple[dict, str]:
    shared_asset("gpt2-tokenizer")
    if not HAS_TRL:
        pytest.skip("trl is not installed (pip install -e '.[dev]')")
    results_dir = tmp_path_factory.mktemp("bench-d-results")
    env = {**os.environ, "PREFTUNE_SHARED": str(SHARED_DIR), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(RUN), "--case", "d", "--smoke", "--mixes", "24+40", "--sweep", "--sweep-lengths", "64",
         "--engines", "preftune,preftune+prefix_sharing=false,trl", "--results-dir", str(results_dir)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=1200,  # 6 processes: ~1.5 min on a quiet machine
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    written = sorted(results_dir.glob("*-d.json"))
    assert len(written) == 1 and written[0].with_suffix(".md").exists(), written
    return json.loads(written[0].read_text()), completed.stdout


@pytest.mark.slow
def test_case_d_smoke_runs_every_engine_at_every_point_on_the_same_pairs(case_d_smoke):
    results, stdout = case_d_smoke
    engines = ["preftune", "preftune+prefix_sharing=false", "trl"]
    assert set(results["parts"]) == {"mixes", "sweep"}
    for part in results["parts"].values():
        assert len(part["runs"]) == len(engines) * len(part["points"])
        for run in part["runs"]:
            assert run["status"] == "ok", run
            assert run["first_loss"] == pytest.approx(math.log(2), abs=1e-5), run["engine"]
            assert run["batch_size"] == 1 and run["median_step_seconds"] > 0 and run["peak_rss_mib"] > 0
            assert run["batch_check"] in ("same", "same (prefix-shared)"), run["engine"]
            prompt, completion = (int(n.replace(",", "")) for n in run["point"].split(" + 2×"))
            assert run["expected_step_tokens"] == [2 * prompt + 2 * completion] * run["steps"]
        assert {run["engine"] for run in part["runs"]} == set(engines)
    assert "| 32 + 2×32 |" not in stdout and "| 64 (32 + 2×32) |" in stdout  # the sweep row names the sequence length
    assert "prefix_sharing: false" in stdout and "TRL 1.16" in stdout
