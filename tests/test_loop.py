"""Iterative DPO (`preftune loop`, `preftune.loop.run_loop`) on the real stories260K with the sentiment-word judge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from preftune.cli import main
from preftune.config import DPOConfig
from preftune.errors import ConfigError
from preftune.judges import sentiment_word_score
from preftune.loop import check_loop, run_loop
from preftune.loop_config import PAIR_MODES

OPENINGS = [
    "Once upon a time, there was a little girl named Lily.", "One day, a boy named Tom went to the park.",
    "The sun was hot and the dog was", "Sam had a big red ball. He", "Mia and her mom went to the store.",
    "There was a small cat who lived in a box.", "Ben wanted to play with his friend.", "The bird sat on the tree and",
]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    return path


def loop_config(tmp_path: Path, model_dir: Path, output: str = "out", **loop) -> DPOConfig:
    prompts = write_prompts(tmp_path / "prompts.jsonl", OPENINGS)
    settings = {"prompts": str(prompts), "judge": "preftune.judges:sentiment_word_score", "rounds": 2,
                "prompts_per_round": 4, "num_samples": 4, "max_new_tokens": 12, "steps_per_round": 3, **loop}
    return DPOConfig(model_name_or_path=str(model_dir), output_dir=str(tmp_path / output), beta=0.1,
                     learning_rate=5e-3, per_device_train_batch_size=2, max_length=64, save_strategy="steps",
                     save_steps=1, logging_steps=1, report_to="none", loop=settings)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


class StartWeights(TrainerCallback):
    """Records the policy's weights when each round's training begins."""

    def __init__(self):
        self.starts: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.starts.append({name: value.detach().clone() for name, value in model.state_dict().items()})


class KillAt(TrainerCallback):
    """Raises (a simulated kill) in the training of round `round_dir` after optimizer step `step` (0: at its start)."""

    def __init__(self, round_dir: str, step: int):
        self.round_dir, self.step = round_dir, step

    def _here(self, args) -> bool:
        return Path(args.output_dir).parent.name == self.round_dir

    def on_train_begin(self, args, state, control, **kwargs):
        if self.step == 0 and self._here(args):
            raise KeyboardInterrupt("simulated kill")

    def on_step_end(self, args, state, control, **kwargs):
        if self.step and self._here(args) and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


# ------------------------------------------------------------------------------------------------ errors first
def test_pair_modes_match_the_judges_module():
    from preftune.judges import PAIR_MODES as JUDGE_MODES

    assert PAIR_MODES == JUDGE_MODES


@pytest.mark.parametrize("loop, key", [
    ({"rounds": 0}, "loop.rounds"),
    ({"num_samples": 1}, "loop.num_samples"),
    ({"reference": "latest"}, "loop.reference"),
    ({"pair_mode": "best"}, "loop.pair_mode"),
    ({"roundz": 2}, "loop.roundz"),
])
def test_bad_loop_settings_name_their_key(tmp_path, loop, key):
    with pytest.raises(ConfigError) as caught:
        DPOConfig(loop={"prompts": "p.jsonl", "judge": "m:f", **loop})
    assert caught.value.key == key


def test_loop_config_errors_name_the_key_and_file_before_any_model_loads(tmp_path, capsys, monkeypatch):
    import preftune.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(preftune.models, "load_causal_lm", no_loading)
    write_prompts(tmp_path / "prompts.jsonl", OPENINGS[:3])
    cases = {
        "judge: preftune.judges:no_such_function": "key 'loop.judge'",
        "judge: preftune.judges:sentiment_word_score\n  prompts_per_round: 2": "key 'loop.prompts_per_round'",
        "judge: preftune.judges:sentiment_word_score\n  eval_prompts: missing.jsonl": "key 'loop.eval_prompts'",
    }
    for body, expected in cases.items():
        config = tmp_path / "loop.yaml"
        config.write_text(f"model_name_or_path: {tmp_path}/no-model\noutput_dir: {tmp_path}/out\nloop:\n"
                          f"  prompts: {tmp_path}/prompts.jsonl\n  rounds: 2\n  {body}\n", encoding="utf-8")
        assert main(["loop", str(config)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and expected in error and str(config) in error, error
    config.write_text(f"model_name_or_path: m\ndataset: pairs.jsonl\nloop:\n  prompts: {tmp_path}/prompts.jsonl\n"
                      "  judge: preftune.judges:sentiment_word_score\n", encoding="utf-8")
    assert main(["loop", str(config)]) == 2
    assert "key 'dataset'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_loop_overrides_set_keys_of_the_loop_section(tmp_path, capsys):
    write_prompts(tmp_path / "prompts.jsonl", OPENINGS)
    config = tmp_path / "loop.yaml"
    config.write_text(f"loop:\n  prompts: {tmp_path}/prompts.jsonl\n  judge: preftune.judges:sentiment_word_score\n",
                      encoding="utf-8")
    from preftune.loop import load_loop_config

    loaded = load_loop_config(str(config), ["loop.rounds=4", "beta=0.3"])
    assert loaded.loop["rounds"] == 4 and loaded.beta == 0.3
    with pytest.raises(ConfigError, match="loop.rounds"):
        load_loop_config(str(config), ["loop.rounds=0"])


def test_fresh_prompts_give_each_round_its_own_slice_and_same_repeats_them(tmp_path):
    fresh = check_loop(loop_config(tmp_path, tmp_path, rounds=2, prompts_per_round=3))
    assert [[p for _, p in r] for r in fresh.round_prompts] == [OPENINGS[0:3], OPENINGS[3:6]]
    same = check_loop(loop_config(tmp_path, tmp_path, rounds=3, prompts_per_round=2, prompt_selection="same"))
    assert [[p for _, p in r] for r in same.round_prompts] == [OPENINGS[0:2]] * 3
    share = check_loop(loop_config(tmp_path, tmp_path, rounds=3, prompts_per_round=None))
    assert [len(r) for r in share.round_prompts] == [2, 2, 2]  # 8 prompts // 3 rounds


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_two_rounds_write_their_files_and_round_two_starts_from_round_one(stories_model_dir, tmp_path):
    write_prompts(tmp_path / "eval.jsonl", OPENINGS[:2])
    config = loop_config(tmp_path, stories_model_dir, eval_prompts=str(tmp_path / "eval.jsonl"))
    starts = StartWeights()
    summary = run_loop(config, callbacks=[starts], progress=False)

    out = tmp_path / "out"
    for index, prompts in ((1, OPENINGS[0:4]), (2, OPENINGS[4:8])):
        folder = out / f"round-{index}"
        candidates = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
        assert [row["prompt"] for row in candidates] == prompts
        assert all(len(row["responses"]) == 4 for row in candidates)
        assert candidates[0]["model"] == (str(stories_model_dir) if index == 1 else str(out / "round-1" / "model"))
        pairs = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
        for pair in pairs:  # best vs worst, scored again here by the judge itself
            row = next(r for r in candidates if r["prompt"] == pair["prompt"])
            scores = sentiment_word_score([pair["prompt"]] * 4, row["responses"])
            assert sentiment_word_score([""], [pair["chosen"]])[0] == max(scores) > min(scores)
            assert sentiment_word_score([""], [pair["rejected"]])[0] == min(scores)
        metrics = json.loads((folder / "metrics.json").read_text())
        flat = [s for row in candidates for s in sentiment_word_score([""] * 4, row["responses"])]
        assert metrics["sample_reward"]["mean"] == pytest.approx(sum(flat) / len(flat))
        assert metrics["pairs"] == len(pairs) and metrics["train"]["global_step"] == 3
        assert metrics["eval_generation"]["prompts"] == 2 and metrics["eval_generation"]["kl"]["mean"] >= -1e-3
        assert (folder / "model" / "model.safetensors").is_file()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rounds_done"] == 2 and [r["round"] for r in on_disk["rounds"]] == [1, 2]
    assert on_disk["rounds"] == summary["rounds"] and (out / "summary.png").stat().st_size > 0

    initial, round_one = load_file(str(stories_model_dir / "model.safetensors")), weights(out / "round-1" / "model")
    assert len(starts.starts) == 2
    saved = sorted(set(starts.starts[0]) & set(initial))  # tied weights (lm_head) are saved once
    assert len(saved) >= len(starts.starts[0]) - 1
    for name in saved:
        assert torch.equal(starts.starts[0][name], initial[name]), name
    changed = [name for name in saved if not torch.equal(starts.starts[1][name], initial[name])]
    assert changed, "round 2 started from the initial weights"
    for name in saved:
        assert torch.equal(starts.starts[1][name], round_one[name]), name
    round_two = json.loads((out / "round-2" / "model" / "summary.json").read_text())["config"]
    assert round_two["model_name_or_path"] == str(out / "round-1" / "model")
    assert round_two["ref_model_name_or_path"] == str(stories_model_dir)  # reference: initial


@pytest.mark.slow
def test_a_loop_killed_mid_round_and_at_a_round_boundary_resumes_to_the_same_weights(stories_model_dir, tmp_path):
    run_loop(loop_config(tmp_path, stories_model_dir, "whole", reference="previous"), progress=False)
    expected = weights(tmp_path / "whole" / "round-2" / "model")

    mid = loop_config(tmp_path, stories_model_dir, "mid", reference="previous")
    with pytest.raises(KeyboardInterrupt):
        run_loop(mid, callbacks=[KillAt("round-2", 2)], progress=False)
    assert not (tmp_path / "mid" / "round-2" / "metrics.json").exists()
    assert (tmp_path / "mid" / "round-2" / "model" / "checkpoint-1").is_dir()
    run_loop(mid, progress=False)

    boundary = loop_config(tmp_path, stories_model_dir, "boundary", reference="previous")
    with pytest.raises(KeyboardInterrupt):
        run_loop(boundary, callbacks=[KillAt("round-2", 0)], progress=False)
    candidates = tmp_path / "boundary" / "round-2" / "candidates.jsonl"
    lines = candidates.read_text(encoding="utf-8").splitlines(keepends=True)
    candidates.write_text("".join(lines[:2]) + lines[2][:30], encoding="utf-8")  # sampling killed mid-write
    (tmp_path / "boundary" / "round-2" / "pairs.jsonl").unlink()
    shutil.rmtree(tmp_path / "boundary" / "round-2" / "model", ignore_errors=True)
    round_one_metrics = (tmp_path / "boundary" / "round-1" / "metrics.json").read_text()
    summary = run_loop(boundary, progress=False)

    assert (tmp_path / "boundary" / "round-1" / "metrics.json").read_text() == round_one_metrics  # skipped
    assert summary["rounds_done"] == 2
    whole_candidates = (tmp_path / "whole" / "round-2" / "candidates.jsonl").read_text(encoding="utf-8")
    assert candidates.read_text(encoding="utf-8") == whole_candidates.replace(str(tmp_path / "whole"),
                                                                              str(tmp_path / "boundary"))
    for run in ("mid", "boundary"):
        resumed = weights(tmp_path / run / "round-2" / "model")
        for name, value in expected.items():
            assert torch.equal(resumed[name], value), (run, name)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_lora_rounds_train_an_adapter_each_and_start_from_the_merged_model(stories_model_dir, tmp_path, reference):
    """Round 2's first logged step is taken before any update, with the policy = round 1's merged model: its DPO
    rewards are 0 exactly when the reference is that same model (previous: the adapter-disabled base) and not 0
    when it is the initial model."""
    from preftune.adapters import export_merged

    config = loop_config(tmp_path, stories_model_dir, reference=reference, steps_per_round=2).model_copy(update={
        "finetuning_type": "lora", "lora_rank": 4, "learning_rate": 5e-2})
    summary = run_loop(config, progress=False)
    out = tmp_path / "out"
    assert summary["rounds_done"] == 2
    for index in (1, 2):
        model = out / f"round-{index}" / "model"
        assert (model / "adapter_model.safetensors").is_file() and not (model / "model.safetensors").exists()
        assert (out / f"round-{index}" / "merged" / "model.safetensors").is_file()
    initial, merged = load_file(str(stories_model_dir / "model.safetensors")), weights(out / "round-1" / "merged")
    assert any(not torch.equal(merged[name], initial[name]) for name in initial)
    export_merged(out / "round-1" / "model", tmp_path / "again", base_model=str(stories_model_dir))
    for name, value in weights(tmp_path / "again").items():  # merged onto the round's starting model
        assert torch.equal(merged[name], value), name

    round_two = json.loads((out / "round-2" / "model" / "summary.json").read_text())
    assert round_two["config"]["model_name_or_path"] == str(out / "round-1" / "merged")
    expected_reference = str(stories_model_dir) if reference == "initial" else None
    assert round_two["config"]["ref_model_name_or_path"] == expected_reference
    log = json.loads((out / "round-2" / "model" / "log_history.json").read_text())
    first = next(row for row in log if "rewards/chosen" in row and row["step"] == 1)
    if reference == "previous":
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    else:
        assert first["rewards/chosen"] != 0.0 or first["rewards/rejected"] != 0.0
