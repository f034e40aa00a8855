"""`preftune sample` and `preftune judge` end to end on stories260K: candidates, resuming, the labeling store,
pairs that train, clear errors; and the reward/KL frontier example's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.generation import read_candidates

REPO = Path(__file__).resolve().parents[1]

PROMPT_ROWS = [
    {"prompt": "Once upon a time"},
    {"id": "ball", "prompt": "Tom had a red ball."},
    {"messages": [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "dropped"}]},
    {"prompt": "The sun was shining and"},
    {"id": 5, "prompt": "Lily saw a big dog."},
]
SAMPLE_ARGS = ["--num-samples", "3", "--max-new-tokens", "12", "--template", "chatml", "--seed", "1",
               "--no-progress"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPT_ROWS))
    return path


def sample(model_dir, prompts, out, *extra) -> int:
    return main(["sample", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), *SAMPLE_ARGS,
                 *extra])


def test_sample_writes_one_candidates_row_per_prompt(stories_model_dir, prompts_file, tmp_path):
    out = tmp_path / "cand.jsonl"
    assert sample(stories_model_dir, prompts_file, out) == 0
    rows = read_candidates(out)
    assert rows[1]["prompt_id"] == "ball" and rows[4]["prompt_id"] == "5"
    assert rows[2]["prompt"] == [{"role": "user", "content": "Tell me a story."}]  # final assistant turn dropped
    for row in rows:
        assert len(row["responses"]) == 3 and all(isinstance(r, str) for r in row["responses"])
        assert row["model"] == str(stories_model_dir)
        assert row["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 1}
    assert len({row["prompt_id"] for row in rows}) == 5


def test_an_interrupted_sample_resumes_to_the_same_file(stories_model_dir, prompts_file, tmp_path):
    whole = tmp_path / "whole.jsonl"
    assert sample(stories_model_dir, prompts_file, whole, "--batch-size", "6") == 0
    resumed = tmp_path / "resumed.jsonl"
    assert sample(stories_model_dir, prompts_file, resumed, "--limit", "2") == 0
    with open(resumed, "ab") as handle:  # a kill in the middle of the next write
        handle.write(b'{"prompt_id": "x", "prompt": "Tell me')
    assert sample(stories_model_dir, prompts_file, resumed, "--batch-size", "3") == 0
    assert resumed.read_text() == whole.read_text()


def test_resuming_with_other_settings_is_refused(stories_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "cand.jsonl"
    assert sample(stories_model_dir, prompts_file, out, "--limit", "1") == 0
    assert sample(stories_model_dir, prompts_file, out, "--temperature", "0.5") == 2
    assert "already holds candidates sampled with" in capsys.readouterr().err


@pytest.mark.parametrize("row, expected", [
    ({"text": "hi"}, "row 1: expected a 'prompt' (string) or 'messages'"),
    ({"prompt": 3}, "row 1, field 'prompt': expected a non-empty string"),
    ({"messages": [{"role": "user"}]}, "row 1, field 'messages': message 0 must be"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "row 1, field 'messages': no user turn"),
    ({"id": "a", "prompt": "other"}, "row 1, field 'id': id 'a' was already used"),
])
def test_bad_prompt_rows_are_one_line_errors_naming_file_row_field(stories_model_dir, tmp_path, capsys, row, expected):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    assert sample(stories_model_dir, path, tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"preftune: error: file {path}, {expected}") and "\n" not in err


def test_sample_store_imports_the_candidates_into_the_labeling_store(stories_model_dir, prompts_file, tmp_path, capsys):
    pytest.importorskip("preftune.labeling.store")
    out, db = tmp_path / "cand.jsonl", tmp_path / "labels.sqlite"
    assert sample(stories_model_dir, prompts_file, out, "--store", str(db)) == 0
    distinct = sum(len(set(row["responses"])) * (len(set(row["responses"])) - 1) // 2 for row in read_candidates(out))
    assert f"{db}: {distinct} new pairs" in capsys.readouterr().out
    assert sample(stories_model_dir, prompts_file, out, "--store", str(db)) == 0  # nothing new to sample or import
    assert f"{db}: 0 new pairs" in capsys.readouterr().out


def test_judge_writes_pairs_that_train_directly(stories_model_dir, prompts_file, tmp_path, capsys):
    from preftune import DPOConfig, DPOTrainer
    from preftune.data.formats import load_preference_data
    from preftune.judges import sentiment_word_score

    candidates = tmp_path / "cand.jsonl"
    candidates.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt_id": "0", "prompt": "Once", "responses": [" she was happy.", " he was sad.", " a box."]},
        {"prompt_id": "1", "prompt": "Tom", "responses": [" ran.", " sat."]},
        {"prompt_id": "2", "prompt": [{"role": "user", "content": "Hi"}], "responses": ["a kind cat", "a mean cat"]},
    ]))
    out = tmp_path / "pairs.jsonl"
    assert main(["judge", "--candidates", str(candidates), "--judge", "preftune.judges:sentiment_word_score",
                 "--out", str(out), "--mode", "all_pairs"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 pairs" in printed and "skipped 1 ties" in printed
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    for pair in pairs:
        chosen, rejected = (p if isinstance(p, str) else p[0]["content"] for p in (pair["chosen"], pair["rejected"]))
        assert sentiment_word_score([""] * 2, [chosen, rejected]) == [pair["score_chosen"], pair["score_rejected"]]
        assert pair["score_chosen"] > pair["score_rejected"]

    text_pairs = tmp_path / "text_pairs.jsonl"  # the text rows only: one training run needs one form
    text_pairs.write_text("".join(json.dumps(p) + "\n" for p in pairs if isinstance(p["prompt"], str)))
    loaded = load_preference_data(str(text_pairs))
    assert len(loaded.dataset) == 3 and loaded.dataset[0]["chosen"] == " she was happy."
    config = DPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=3,
                       save_strategy="no", logging_steps=1, max_length=64, overwrite_cache=True)
    result = DPOTrainer(model=str(stories_model_dir), args=config, train_dataset=str(text_pairs)).train()
    assert result.global_step == 1


def test_judge_errors_are_one_line(tmp_path, capsys):
    candidates = tmp_path / "cand.jsonl"
    candidates.write_text(json.dumps({"prompt_id": "0", "prompt": "p", "responses": ["a", "b"]}) + "\n")
    assert main(["judge", "--candidates", str(candidates), "--judge", "no_such_module_abc:f", "--out",
                 str(tmp_path / "p.jsonl")]) == 2
    assert "cannot import module 'no_such_module_abc'" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.slow
def test_frontier_example_smoke_run_has_offline_iterative_and_online_points_at_one_judged_budget(tmp_path):
    pytest.importorskip("trl")
    from conftest import shared_asset

    model_dir = shared_asset("stories260K-hf")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "reward_kl_frontier" / "run.py"), "--smoke", "--model", str(model_dir),
         "--output-dir", str(tmp_path), "--methods", "offline", "iterative", "online"],
        capture_output=True, text=True, env=env, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "frontier.json").read_text())
    series = {(point["method"], point["engine"]) for point in results["points"]}
    assert series == {("offline", "preftune"), ("offline", "trl"), ("iterative", "preftune"), ("online", "preftune")}
    for point in results["points"]:
        assert point["kl"] == pytest.approx(point["kl"])  # finite numbers
        assert point["kl_stderr"] >= 0 and point["reward_stderr"] >= 0
    settings = results["settings"]
    budget = settings["train_prompts"] * settings["num_samples"]  # judged samples of the offline run
    (iterative,) = [p for p in results["points"] if p["method"] == "iterative"]
    loop_summary = json.loads((tmp_path / "work" / "iterative_beta0.1" / "summary.json").read_text())
    judged = sum(r["responses"] for r in loop_summary["rounds"])
    assert len(iterative["rounds"]) == settings["rounds"] and judged == budget
    assert loop_summary["rounds"][1]["policy"].endswith("round-1/model")  # round 2 samples from round 1's model
    (online,) = [p for p in results["points"] if p["method"] == "online"]
    assert online["online"]["steps"] * settings["batch_size"] * 2 == budget
    assert (tmp_path / "frontier.png").stat().st_size > 0
    table = (tmp_path / "frontier.md").read_text()
    assert "| offline | preftune |" in table and "| offline | trl |" in table and "reference" in table
    assert "| iterative | preftune |" in table and "| online | preftune |" in table


@pytest.mark.slow
def test_the_scripted_loop_samples_judges_and_trains(tmp_path):
    from conftest import shared_asset

    model_dir = shared_asset("stories260K-hf")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "MODEL": str(model_dir), "OUT": str(tmp_path),
           "PROMPTS": "8", "MAX_NEW_TOKENS": "12", "TRAIN_OVERRIDES": "max_steps=2 per_device_train_batch_size=4",
           "PREFTUNE": f"{sys.executable} -m preftune.cli", "PYTHON": sys.executable,
           "PREFTUNE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", str(REPO / "examples" / "reward_kl_frontier" / "sample_judge_train.sh")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_candidates(tmp_path / "candidates.jsonl")) == 8
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(pair["score_chosen"] > pair["score_rejected"] for pair in pairs)
    summary = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert summary["data"]["train"]["pairs_used"] == len(pairs) and summary["global_step"] == 2
    assert (tmp_path / "dpo" / "model.safetensors").exists()
