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
