"""Evaluation: win rate, Wilson interval, KL and reward estimates (hand-computed values), generation-based
evaluation on stories260K, eval_results files and `preftune eval`."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.evaluation import (
    completion_batch,
    evaluate_generations,
    mean_with_stderr,
    outcomes_from_scores,
    per_prompt_mean,
    sampled_kl,
    sequence_logps,
    wilson_interval,
    win_rate,
    write_eval_results,
)
from preftune.generation import SamplingParams, generate_samples

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile

PROMPTS = ["Once upon a time, there was a little girl named Lily.", "Tom had a red ball.", "The sun was shining.",
           "Ben wanted to bake a cake."]


# ---------------------------------------------------------------------------------------------------- statistics
def test_mean_with_stderr_matches_the_textbook_values():
    estimate = mean_with_stderr([1.0, 2.0, 3.0, 4.0])
    # sample variance 5/3, stderr sqrt(5/3 / 4)
    assert estimate.mean == 2.5 and estimate.stderr == pytest.approx(math.sqrt(5 / 12)) and estimate.n == 4
    assert mean_with_stderr([7.0]).stderr is None
    with pytest.raises(ValueError):
        mean_with_stderr([])


def test_sampled_kl_averages_log_ratios_per_prompt_then_over_prompts():
    policy = [[-1.0, -3.0], [-2.0, -2.0]]
    reference = [[-2.0, -2.0], [-5.0, -1.0]]
    # log-ratios [[1, -1], [3, -1]] -> per prompt [0, 1] -> mean 0.5, stderr sd([0, 1]) / sqrt(2) = 0.5
    kl = sampled_kl(policy, reference)
    assert kl.mean == pytest.approx(0.5) and kl.stderr == pytest.approx(0.5) and kl.n == 2
    with pytest.raises(ValueError):
        sampled_kl([[-1.0]], [[-1.0, -2.0]])


def test_reward_is_averaged_per_prompt_first():
    estimate = per_prompt_mean([[1.0, 3.0], [0.0, 0.0], [5.0, 5.0]])  # prompt means 2, 0, 5
    assert estimate.mean == pytest.approx(7 / 3)
    assert estimate.stderr == pytest.approx(math.sqrt(((2 - 7 / 3) ** 2 + (7 / 3) ** 2 + (5 - 7 / 3) ** 2) / 2 / 3))


def test_wilson_interval_matches_hand_computed_bounds():
    # p = 0.5, n = 8: centre 0.5, half-width z*sqrt(1/32 + z^2/256)/(1 + z^2/8)
    half = Z95 * math.sqrt(0.25 / 8 + Z95**2 / 256) / (1 + Z95**2 / 8)
    lower, upper = wilson_interval(0.5, 8)
    assert lower == pytest.approx(0.5 - half) and upper == pytest.approx(0.5 + half)
    assert lower == pytest.approx(0.215216, abs=1e-6)
    # p = 7/8: 0.52911 .. 0.97758 (by hand, 5 decimals)
    assert wilson_interval(7 / 8, 8) == pytest.approx((0.52911, 0.97758), abs=1e-5)


@pytest.mark.parametrize("rate, n", [(0.0, 5), (0.3, 10), (0.875, 8), (1.0, 40)])
def test_wilson_bounds_solve_the_score_equation(rate, n):
    """The Wilson bounds are the p with (rate - p)^2 = z^2 p (1 - p) / n (an independent characterisation)."""
    for bound in wilson_interval(rate, n):
        assert (rate - bound) ** 2 == pytest.approx(Z95**2 * bound * (1 - bound) / n, abs=1e-12)


def test_win_rate_counts_ties_as_half():
    outcomes = outcomes_from_scores([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, 1.0]],
                                    [[1.0, 1.0], [0.0, 0.0], [4.0, 4.0], [0.0, 0.0]])
    assert outcomes == [1.0, 0.5, 0.0, 1.0]
    rate = win_rate(outcomes)
    assert rate.rate == pytest.approx(2.5 / 4)
    assert (rate.wins, rate.ties, rate.losses, rate.n) == (2, 1, 1, 4)
    assert (rate.lower, rate.upper) == pytest.approx(wilson_interval(2.5 / 4, 4))
    assert outcomes_from_scores([[1.0]], [[1.05]], tie_tolerance=0.1) == [0.5]


# ---------------------------------------------------------------------------------------------- with a model
@pytest.fixture
def stories(stories_model_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_model_dir)
    tokenizer.pad_token = tokenizer.unk_token
    return model, tokenizer


def naive_logp(model, prompt_ids, completion_ids) -> float:
    """Σ_t log softmax(logits)[y_t] over the completion, from one unpadded forward (no preftune code)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return float(sum(logprobs[start + t, token] for t, token in enumerate(completion_ids)))


def perturbed(model, scale=0.3, seed=0):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std().clamp(min=1e-3))
    return other


PARAMS = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, num_samples=2, seed=3, batch_size=8)


def test_sequence_logps_match_a_naive_forward_per_sample(stories):
    model, tokenizer = stories
    samples = [s for group in generate_samples(model, tokenizer, PROMPTS, PARAMS, progress=False) for s in group]
    got = sequence_logps(model, [s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                         pad_token_id=tokenizer.pad_token_id, batch_size=3)
    expected = [naive_logp(model, s.prompt_ids, s.completion_ids) for s in samples]
    assert got == pytest.approx(expected, abs=1e-4)
    batch = completion_batch([[1, 2]], [[3, 4, 5]], pad_token_id=0)
    assert batch.score_labels.tolist() == [3, 4, 5] and batch.num_completions == 1


class SentimentJudge:
    name = "test:sentiment"

    def score(self, prompts, responses):
        return [float(r.count("happy") + r.count("good") - r.count("sad")) for r in responses]


def test_identical_policy_and_reference_give_zero_kl_and_all_ties(stories):
    model, tokenizer = stories
    results = evaluate_generations(model, model, tokenizer, PROMPTS, SentimentJudge(), PARAMS, progress=False)
    assert results["kl"]["mean"] == 0.0 and results["kl"]["exact_sampling"] is True
    rate = results["win_rate"]
    assert rate["rate"] == 0.5 and rate["ties"] == len(PROMPTS) and rate["n"] == len(PROMPTS)
    assert results["reward"]["policy"] == results["reward"]["reference"]
    # a separate copy with the same weights: the same up to float error
    copied = evaluate_generations(model, copy.deepcopy(model), tokenizer, PROMPTS, SentimentJudge(), PARAMS, progress=False)
    assert abs(copied["kl"]["mean"]) < 1e-4 and copied["win_rate"]["rate"] == 0.5


def test_a_judge_that_prefers_the_policy_gives_a_win_rate_near_one_and_kl_matches_a_naive_estimate(stories):
    policy, tokenizer = stories
    reference = perturbed(policy)
    policy_samples = generate_samples(policy, tokenizer, PROMPTS, PARAMS, progress=False)
    own = {s.text for group in policy_samples for s in group}

    class PrefersPolicy:
        name = "test:prefers-policy"

        def score(self, prompts, responses):
            return [1.0 if response in own else 0.0 for response in responses]

    results = evaluate_generations(policy, reference, tokenizer, PROMPTS, PrefersPolicy(), PARAMS, progress=False)
    rate = results["win_rate"]
    assert rate["rate"] >= 0.875 and rate["wins"] >= len(PROMPTS) - 1 and rate["losses"] == 0
    assert results["reward"]["policy"]["mean"] == 1.0

    ratios = [[naive_logp(policy, s.prompt_ids, s.completion_ids) - naive_logp(reference, s.prompt_ids, s.completion_ids)
               for s in group] for group in policy_samples]
    prompt_means = [sum(r) / len(r) for r in ratios]
    assert results["kl"]["mean"] == pytest.approx(sum(prompt_means) / len(prompt_means), abs=1e-3)
    assert results["kl"]["mean"] > 0.1


def test_pairwise_labels_decide_the_win_rate_and_unlabelled_prompts_are_left_out(stories):
    from preftune.judges import PairwiseLabels

    policy, tokenizer = stories
    reference = perturbed(policy)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, num_samples=1, seed=5)
    mine = generate_samples(policy, tokenizer, PROMPTS, params, progress=False)
    theirs = generate_samples(reference, tokenizer, PROMPTS, params, progress=False)
    labels = PairwiseLabels.from_rows([
        {"prompt": PROMPTS[0], "response_a": mine[0][0].text, "response_b": theirs[0][0].text, "winner": "a"},
        {"prompt": PROMPTS[1], "response_a": theirs[1][0].text, "response_b": mine[1][0].text, "winner": "tie"},
        {"prompt": PROMPTS[2], "response_a": theirs[2][0].text, "response_b": mine[2][0].text, "winner": "a"},
    ])
    results = evaluate_generations(policy, reference, tokenizer, PROMPTS, labels, params, progress=False)
    assert results["win_rate"]["rate"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert results["win_rate"]["n"] == 3 and results["win_rate_unlabelled_prompts"] == 1
    assert "reward" not in results


def test_lora_policy_against_its_adapter_disabled_base(stories):
    from peft import LoraConfig, get_peft_model

    from preftune.reference import AdapterDisabledReference

    base, tokenizer = stories
    policy = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    reference = AdapterDisabledReference(policy)
    fresh = evaluate_generations(policy, reference, tokenizer, PROMPTS, SentimentJudge(), PARAMS, progress=False)
    assert fresh["kl"]["mean"] == 0.0 and fresh["win_rate"]["rate"] == 0.5  # B = 0: the adapter is the identity
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    trained = evaluate_generations(policy, reference, tokenizer, PROMPTS, SentimentJudge(), PARAMS, progress=False)
    assert trained["kl"]["mean"] > 0.1
    # the reference side really was the base: its samples are the base model's own
    base_samples = generate_samples(base, tokenizer, PROMPTS[:1], PARAMS, progress=False)
    assert trained["examples"][0]["reference"] == base_samples[0][0].text
    assert not any(getattr(m, "disable_adapters", False) for m in policy.modules() if hasattr(m, "lora_B"))


def test_eval_results_files_are_json_with_nulls_and_a_plot(tmp_path):
    results = {"model": "m", "pairs": {"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 1.5, "eval_loss": 0.4},
               "generation": {"judge": "j", "reward": {"policy": {"mean": 1.0, "stderr": 0.1, "n": 4},
                                                      "reference": {"mean": 0.5, "stderr": None, "n": 1}},
                              "win_rate": win_rate([1.0, 1.0, 0.5, 0.0]).to_dict(),
                              "kl": {"mean": 2.0, "stderr": float("nan"), "n": 4}}}
    written = write_eval_results(results, tmp_path)
    assert [p.name for p in written] == ["eval_results.json", "eval_results.png"]
    data = json.loads((tmp_path / "eval_results.json").read_text())
    assert data["generation"]["kl"]["stderr"] is None and data["generation"]["win_rate"]["rate"] == 0.625
    assert (tmp_path / "eval_results.png").stat().st_size > 1000


# -------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def story_pairs_file(tmp_path):
    from test_training import STORY_PAIRS

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in STORY_PAIRS[:4]))
    return path


@pytest.mark.slow
def test_cli_eval_of_an_unchanged_copy_gives_ln2_loss_zero_kl_and_half_win_rate(stories_model_dir, tmp_path,
                                                                                  story_pairs_file, capsys):
    from preftune.cli import main

    policy = tmp_path / "policy"
    shutil.copytree(stories_model_dir, policy)
    code = main(["eval", str(policy), "--ref-model", str(stories_model_dir), "--data", str(story_pairs_file),
                 "--judge", "preftune.judges:sentiment_word_score", "--limit", "3", "--num-samples", "2",
                 "--max-new-tokens", "8", "--output-dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "win rate 0.500" in out and "eval_results.json" in out
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["pairs"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and results["pairs"]["count"] == 4
    assert results["generation"]["prompts"] == 3 and results["generation"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert results["generation"]["win_rate"]["rate"] == 0.5
    assert (tmp_path / "out" / "eval_results.png").is_file()
    assert not (policy / "log_history.json").exists()  # evaluate() logged into a scratch directory


@pytest.mark.slow
def test_cli_eval_of_a_lora_adapter_uses_the_base_with_the_adapter_disabled(stories_model_dir, tmp_path,
                                                                             story_pairs_file, capsys):
    from peft import LoraConfig, get_peft_model

    from preftune.cli import main

    base = AutoModelForCausalLM.from_pretrained(stories_model_dir)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    adapter = tmp_path / "adapter"
    policy.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(stories_model_dir).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(stories_model_dir)

    code = main(["eval", str(adapter), "--data", str(story_pairs_file), "--judge", "preftune.judges:sentiment_word_score",
                 "--limit", "2", "--num-samples", "1", "--max-new-tokens", "6"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((adapter / "eval_results.json").read_text())
    assert results["generation"]["kl"]["mean"] > 0.1
    # the held-out rewards compare the adapted policy with the base: beta * (log pi - log pi_base) of chosen
    tokenizer = AutoTokenizer.from_pretrained(stories_model_dir)
    merged = policy.merge_and_unload().eval()
    plain = AutoModelForCausalLM.from_pretrained(stories_model_dir).eval()
    from test_training import STORY_PAIRS

    rewards = []
    for row in STORY_PAIRS[:4]:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["chosen"] + tokenizer.eos_token)["input_ids"]
        completion = full_ids[len(prompt_ids):]
        rewards.append(0.1 * (naive_logp(merged, prompt_ids, completion) - naive_logp(plain, prompt_ids, completion)))
    assert results["pairs"]["eval_rewards/chosen"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-3)


def test_cli_eval_errors_are_one_line(stories_model_dir, tmp_path, story_pairs_file, capsys):
    from preftune.cli import main

    assert main(["eval", str(tmp_path / "missing"), "--data", str(story_pairs_file)]) == 2
    assert "does not exist" in capsys.readouterr().err
    policy = tmp_path / "policy"
    shutil.copytree(stories_model_dir, policy)
    assert main(["eval", str(policy), "--data", str(story_pairs_file)]) == 2  # no summary.json, no --ref-model
    assert "no reference model: pass --ref-model" in capsys.readouterr().err
    assert main(["eval", str(policy), "--ref-model", str(policy), "--data", str(story_pairs_file)]) == 2
    assert "is the evaluated model itself" in capsys.readouterr().err
    assert main(["eval", str(policy), "--ref-model", str(stories_model_dir), "--judge", "no_such_module:fn"]) == 2
    assert "cannot import module 'no_such_module'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_eval_of_a_config_reproduces_the_trainers_final_eval_and_report_reads_the_run(stories_model_dir, tmp_path,
                                                                                          story_pairs_file, capsys):
    from preftune.cli import main

    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"model_name_or_path: {stories_model_dir}\ndataset: {story_pairs_file}\neval_dataset: {story_pairs_file}\n"
        f"output_dir: {tmp_path / 'run'}\nlearning_rate: 1.0e-3\nmax_steps: 3\nlogging_steps: 1\nbeta: 0.2\n"
        "per_device_train_batch_size: 4\nsave_strategy: 'no'\nmax_length: 64\n"
    )
    assert main(["train", str(config)]) == 0
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    assert main(["eval", str(config)]) == 0
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["beta"] == 0.2 and "generation" not in results
    # a fresh load of the saved policy against model_name_or_path gives the trainer's own final eval
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert results["pairs"][f"eval_{key}"] == pytest.approx(trained[key], abs=1e-5), key
    # the output directory alone: reference, beta and eval set come from its summary.json
    assert main(["eval", str(tmp_path / "run"), "--output-dir", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval_results.json").read_text())
    assert again["pairs"] == results["pairs"] and again["beta"] == 0.2
    history = json.loads((tmp_path / "run" / "log_history.json").read_text())
    assert all(record["step"] <= 3 for record in history)  # the training run's files are untouched
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "beta 0.2" in capsys.readouterr().out
