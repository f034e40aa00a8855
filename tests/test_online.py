"""Online DPO (`preftune.online`): value-checked against TRL 1.16's experimental OnlineDPOTrainer on the same
completions, and its rules (pair order, ties, missing-EOS penalty, pairwise judges, the reference) on the real
stories260K."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preftune.generation import GeneratedSample, SamplingParams
from preftune.judges import PairwiseLabels
from preftune.losses import LossParams
from preftune.models import load_causal_lm, load_tokenizer
from preftune.online import OnlineDPO, batch_prompts, completion_logps, judge_pairs, run_online

# Two prompts of the same token length: TRL's forward gives left padding no position ids, so unequal prompts would
# be scored at shifted positions there.
PROMPTS = ["Once upon a time, there was a", "The dog ran to the big"]


def letter_score(prompts, completions, **kwargs):
    """Counts of the letter e (blind to the leading space that TRL's decoding of the completion alone drops)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(text.count("e")) for text in texts]


def stop_at_period(model, tokenizer, stops=True):
    """With `stops`, completions also end at "." (so some stop within a few tokens): the model's generation_config,
    which TRL and preftune both read."""
    if stops:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(".")]
    return model


def moved_policy(model_dir, tokenizer, stops=True):
    """The model with seeded noise on every weight: a policy that differs from its reference (the model)."""
    policy = stop_at_period(load_causal_lm(str(model_dir)), tokenizer, stops)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return policy


def make_online(model_dir, *, loss_type="sigmoid", beta=0.1, penalty=None, judge=letter_score, max_new_tokens=12,
                stops=True):
    tokenizer = load_tokenizer(str(model_dir))
    policy = moved_policy(model_dir, tokenizer, stops)
    reference = stop_at_period(load_causal_lm(str(model_dir)), tokenizer, stops)
    return OnlineDPO(policy, tokenizer, judge, loss=LossParams(loss_types=(loss_type,), beta=beta), reference=reference,
                     sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=7),
                     missing_eos_penalty=penalty, max_length=512, learning_rate=1e-3)


def naive_logps(model, sample: GeneratedSample) -> float:
    """Σ log p of the completion, one unpadded sequence and a plain log_softmax."""
    ids = torch.tensor([sample.prompt_ids + sample.completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(sample.prompt_ids)
    logp = logits[start - 1:-1].log_softmax(-1)
    return float(logp.gather(-1, ids[0, start:].unsqueeze(-1)).sum())


# --------------------------------------------------------------------------------------------------- the oracle
def trl_step_one(model_dir, tmp_path, prompts, first, second, *, loss_type, beta, penalty, stops):
    """TRL's OnlineDPOTrainer, one step, its generation replaced by the given completions: (logs, gradients)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = load_tokenizer(str(model_dir))
    model = moved_policy(model_dir, tokenizer, stops)
    reference = stop_at_period(load_causal_lm(str(model_dir)), tokenizer, stops)
    captured: dict = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        def on_log(self, args, state, control, logs=None, **kwargs):
            captured.setdefault("logs", dict(logs))

    args = OnlineDPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(prompts), max_steps=1,
                           logging_steps=1, report_to="none", beta=beta, loss_type=loss_type,
                           missing_eos_penalty=penalty, max_length=512, max_new_tokens=12, use_cpu=True,
                           save_strategy="no", max_grad_norm=0.0, learning_rate=1e-3, seed=0, bf16=False)
    trainer = OnlineDPOTrainer(model=model, ref_model=reference, reward_funcs=letter_score, args=args,
                               train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer,
                               callbacks=[Capture()])
    by_prompt = {prompt: (a, b) for prompt, a, b in zip(prompts, first, second)}
    pad = tokenizer.pad_token_id

    def given_completions(model, batch_prompts, images=None):
        captured["order"] = list(batch_prompts)
        rows = [by_prompt[p][0] for p in batch_prompts] + [by_prompt[p][1] for p in batch_prompts]
        prompt_ids = torch.tensor([row.prompt_ids for row in rows])
        width = max(len(row.completion_ids) for row in rows)
        completion_ids = torch.tensor([row.completion_ids + [pad] * (width - len(row.completion_ids)) for row in rows])
        mask = torch.tensor([[1] * len(row.completion_ids) + [0] * (width - len(row.completion_ids)) for row in rows])
        return prompt_ids, torch.ones_like(prompt_ids), completion_ids, mask, None

    trainer._generate = given_completions
    trainer.train()
    return captured


PADDING_SUMMED_BY_TRL = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward")


@pytest.mark.parametrize("stops, penalty", [(False, None), (True, 2.0)])
def test_step_one_loss_metrics_and_gradients_match_trl_online_dpo(stories_model_dir, tmp_path, stops, penalty):
    """Without stops no completion is padded and every metric equals TRL's; with stops (and the missing-EOS penalty)
    TRL 1.16 sums the log-probs of the padding after a stop into its KL and entropy metrics, preftune does not:
    those four are checked against a naive per-sequence computation instead."""
    online = make_online(stories_model_dir, beta=0.1, penalty=penalty, stops=stops)
    first, second = online.sample(PROMPTS, ["0/a", "0/b"])
    assert len({len(s.prompt_ids) for s in first + second}) == 1, "the test prompts must have equal token lengths"
    assert {s.stopped for s in first + second} == ({False, True} if stops else {False})
    oracle = trl_step_one(stories_model_dir, tmp_path, PROMPTS, first, second, loss_type="sigmoid", beta=0.1,
                          penalty=penalty, stops=stops)
    order = [PROMPTS.index(p) for p in oracle["order"]]  # TRL's sampler may shuffle the batch
    step = online.pair_loss([PROMPTS[i] for i in order], [first[i] for i in order], [second[i] for i in order])
    step.loss.backward()

    logs = oracle["logs"]
    assert step.metrics["loss"] == pytest.approx(logs["loss"], abs=1e-4)  # TRL rounds its logged loss to 4 places
    for key in ("objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "val/contain_eos_token",
                "beta") + (() if stops else PADDING_SUMMED_BY_TRL):
        assert step.metrics[key] == pytest.approx(logs[key], abs=1e-4), key
    samples = first + second
    kl = [naive_logps(online.policy, s) - naive_logps(online.reference, s) for s in samples]
    scores = [float(s.text.count("e")) - (penalty if penalty and not s.stopped else 0.0) for s in samples]
    naive = {"objective/kl": sum(kl) / 4, "objective/entropy": -sum(naive_logps(online.policy, s) for s in samples) / 4,
             "objective/non_score_reward": -0.1 * sum(kl) / 4,
             "objective/rlhf_reward": sum(r - 0.1 * k for r, k in zip(scores, kl)) / 4}
    for key in PADDING_SUMMED_BY_TRL:
        assert step.metrics[key] == pytest.approx(naive[key], abs=1e-4), key
    grads = {n: p.grad for n, p in online.policy.named_parameters() if p.grad is not None}
    assert set(grads) == set(oracle["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, oracle["grads"][name], atol=1e-5, rtol=1e-4, msg=name)


def test_pair_order_ties_and_the_missing_eos_penalty_follow_trl():
    def sample(text, stopped):
        return GeneratedSample(text=text, prompt_ids=[1], completion_ids=[2], stopped=stopped)

    def length_score(prompts, responses):
        return [float(len(r)) for r in responses]

    from preftune.online import resolve_judge

    judge = resolve_judge(length_score)
    first = [sample("aaa", True), sample("a", True), sample("aa", False)]
    second = [sample("a", True), sample("aaa", True), sample("aa", True)]
    plain = judge_pairs(judge, ["p"] * 3, first, second)
    assert plain.first_chosen == [True, False, True]  # a tie goes to the first completion
    penalised = judge_pairs(judge, ["p"] * 3, first, second, missing_eos_penalty=0.5)
    assert penalised.first_chosen == [True, False, False]
    assert penalised.scores == [3.0, 1.0, 1.5, 1.0, 3.0, 2.0]


def test_a_pairwise_judge_chooses_by_its_verdict_and_unlabelled_pairs_are_left_out():
    labels = PairwiseLabels.from_rows([{"prompt": "p", "response_a": "x", "response_b": "y", "winner": "b"},
                                       {"prompt": "q", "response_a": "z", "response_b": "w", "winner": "a"}])

    def sample(text):
        return GeneratedSample(text=text, prompt_ids=[1], completion_ids=[2], stopped=True)

    verdict = judge_pairs(labels, ["p", "q", "r"], [sample("x"), sample("w"), sample("u")],
                          [sample("y"), sample("z"), sample("v")])
    assert verdict.first_chosen == [False, False, False] and verdict.judged == [True, True, False]
    assert verdict.scores is None


def test_completion_logps_equal_a_naive_unpadded_computation(stories_model_dir):
    online = make_online(stories_model_dir, max_new_tokens=10)
    first, second = online.sample(PROMPTS + ["The cat"], ["a", "b", "c"])
    samples = first + second
    sums, lengths = completion_logps(online.policy, samples, pad_id=0)
    for index, sample in enumerate(samples):
        assert sums[index].item() == pytest.approx(naive_logps(online.policy, sample), abs=1e-4)
        assert lengths[index].item() == len(sample.completion_ids)


def test_ipo_uses_preftunes_length_normalised_log_ratios(stories_model_dir):
    online = make_online(stories_model_dir, loss_type="ipo", beta=0.5)
    first, second = online.sample(PROMPTS, ["x", "y"])
    step = online.pair_loss(PROMPTS, first, second)
    expected = []
    for index, (a, b) in enumerate(zip(first, second)):
        chosen, rejected = (a, b) if step.records[index]["chosen"] == 0 else (b, a)
        ratio = [(naive_logps(online.policy, s) - naive_logps(online.reference, s)) / len(s.completion_ids)
                 for s in (chosen, rejected)]
        expected.append((ratio[0] - ratio[1] - 1 / (2 * 0.5)) ** 2)
    assert step.metrics["loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)


@pytest.mark.slow
def test_steps_change_the_policy_not_the_reference_and_are_reproducible(stories_model_dir):
    prompts = [(f"id{i}", p) for i, p in enumerate(PROMPTS + ["The cat sat", "Tom had a"])]
    assert [key for key, _ in batch_prompts(prompts, 1, 3)] == ["id3", "id0", "id1"]  # cycles
    runs = []
    for _ in range(2):
        online = make_online(stories_model_dir, max_new_tokens=6)
        reference = {n: p.clone() for n, p in online.reference.state_dict().items()}
        start = {n: p.detach().clone() for n, p in online.policy.named_parameters()}
        history = run_online(online, prompts, 2, batch_size=2)
        assert [row["step"] for row in history] == [1, 2] and all(math.isfinite(row["loss"]) for row in history)
        for name, value in online.reference.state_dict().items():
            assert torch.equal(value, reference[name]), name
        runs.append((history, {n: p.detach().clone() for n, p in online.policy.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    changed = [n for n, p in runs[0][1].items() if not torch.equal(p, start[n])]
    assert changed
    for name, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][name]), name


# ------------------------------------------------------------------------------------------ `preftune loop` online
def online_loop_config(tmp_path, model_dir, output="out", **loop):
    from test_loop import OPENINGS, loop_config

    assert len(OPENINGS) >= 8
    settings = {"online": True, "rounds": 2, "prompts_per_round": 4, "steps_per_round": 2, "max_new_tokens": 8,
                **loop}
    return loop_config(tmp_path, model_dir, output, **settings)


def test_online_settings_are_checked_before_any_model_loads(tmp_path, monkeypatch):
    import preftune.models
    from preftune.config import DPOConfig
    from preftune.errors import ConfigError
    from preftune.loop import check_loop

    monkeypatch.setattr(preftune.models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as caught:
        DPOConfig(loop={"prompts": "p.jsonl", "judge": "m:f", "missing_eos_penalty": 1.0})
    assert caught.value.key == "loop.missing_eos_penalty"
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt": "p", "response_a": "x", "response_b": "y", "winner": "c"}\n', encoding="utf-8")
    from preftune.errors import DataError

    with pytest.raises(DataError, match="winner"):  # a labels file is read when the loop is checked
        check_loop(online_loop_config(tmp_path, tmp_path, judge=str(labels)))
    with pytest.raises(ConfigError) as caught:  # and is no judge of an iterative loop
        check_loop(online_loop_config(tmp_path, tmp_path, judge=str(labels), online=False))
    assert caught.value.key == "loop.judge"
    for update, key in (({"loss_type": "kto"}, "loss_type"), ({"use_weighting": True}, "use_weighting"),
                        ({"precompute_ref_log_probs": True}, "precompute_ref_log_probs")):
        with pytest.raises(ConfigError) as caught:
            check_loop(online_loop_config(tmp_path, tmp_path).model_copy(update=update))
        assert caught.value.key == key


@pytest.mark.slow
def test_online_rounds_train_step_by_step_and_a_rerun_skips_finished_rounds(stories_model_dir, tmp_path):
    from safetensors.torch import load_file

    from preftune.judges import sentiment_word_score
    from preftune.loop import run_loop

    summary = run_loop(online_loop_config(tmp_path, stories_model_dir, missing_eos_penalty=0.5), progress=False)
    out = tmp_path / "out"
    assert summary["rounds_done"] == 2 and [r["mode"] for r in summary["rounds"]] == ["online", "online"]
    for index in (1, 2):
        steps = [json.loads(line) for line in (out / f"round-{index}" / "online.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2]
        for step in steps:
            assert len(step["records"]) == 2 and math.isfinite(step["loss"])
            for record in step["records"]:  # the judge's score, the penalty, TRL's order
                expected = [score - (0.0 if stopped else 0.5) for score, stopped in
                            zip(sentiment_word_score([""] * 2, record["completions"]), record["stopped"])]
                assert record["scores"] == pytest.approx(expected)
                assert record["chosen"] == (0 if expected[0] >= expected[1] else 1)
        metrics = json.loads((out / f"round-{index}" / "metrics.json").read_text())
        assert metrics["train"]["global_step"] == 2 and metrics["pairs"] == 4
    initial = load_file(str(stories_model_dir / "model.safetensors"))
    round_one = load_file(str(out / "round-1" / "model" / "model.safetensors"))
    assert any(not torch.equal(round_one[name], initial[name]) for name in round_one)
    round_two = (out / "round-2" / "metrics.json").read_text()
    assert json.loads(round_two)["policy"] == str(out / "round-1" / "model")

    # killed while evaluating round 2: its training is not repeated; round 1 is skipped
    (out / "round-2" / "metrics.json").unlink()
    trained = (out / "round-2" / "model" / "model.safetensors").stat().st_mtime_ns
    round_one_metrics, round_two_log = [(out / f"round-{k}" / name).read_text() for k, name in
                                        ((1, "metrics.json"), (2, "online.jsonl"))]
    run_loop(online_loop_config(tmp_path, stories_model_dir, missing_eos_penalty=0.5), progress=False)
    assert (out / "round-1" / "metrics.json").read_text() == round_one_metrics
    assert (out / "round-2" / "model" / "model.safetensors").stat().st_mtime_ns == trained
    assert (out / "round-2" / "online.jsonl").read_text() == round_two_log
    assert json.loads((out / "round-2" / "metrics.json").read_text())["train"] == json.loads(round_two)["train"]


@pytest.mark.slow
def test_an_online_round_killed_mid_way_resumes_from_its_checkpoint_to_the_same_weights(stories_model_dir, tmp_path):
    from safetensors.torch import load_file

    import preftune.online
    from preftune.loop import run_loop

    def config(output):
        return online_loop_config(tmp_path, stories_model_dir, output, rounds=1, steps_per_round=3)

    run_loop(config("whole"), progress=False)
    original = preftune.online.OnlineDPO.step
    calls = []

    def killed_at_step_three(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    preftune.online.OnlineDPO.step = killed_at_step_three
    try:
        with pytest.raises(KeyboardInterrupt):
            run_loop(config("killed"), progress=False)
    finally:
        preftune.online.OnlineDPO.step = original
    folder = tmp_path / "killed" / "round-1"
    assert json.loads((folder / "online-checkpoint" / "state.json").read_text())["step"] == 2
    with open(folder / "online.jsonl", "a", encoding="utf-8") as log:
        log.write('{"step": 3, "torn')  # a line cut by the kill
    run_loop(config("killed"), progress=False)

    assert not (folder / "online-checkpoint").exists()
    whole = tmp_path / "whole" / "round-1"
    assert (folder / "online.jsonl").read_text() == (whole / "online.jsonl").read_text()
    expected = load_file(str(whole / "model" / "model.safetensors"))
    resumed = load_file(str(folder / "model" / "model.safetensors"))
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name


# ------------------------------------------------------------------------------------- reward model, LoRA policy
def test_a_reward_model_directory_orders_each_pair_by_its_logit(stories_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=0)).eval()
    reward.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(stories_model_dir).save_pretrained(tmp_path / "rm")
    rm_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "rm")
    online = make_online(stories_model_dir, judge=str(tmp_path / "rm"))
    prompts = PROMPTS + ["The cat"]
    first, second = online.sample(prompts, ["a", "b", "c"])
    step = online.pair_loss(prompts, first, second)
    with torch.no_grad():  # each text alone: the logit of prompt + response
        for record, prompt in zip(step.records, prompts):
            logits = [reward(**rm_tokenizer(prompt + text, return_tensors="pt")).logits[0, 0].item()
                      for text in record["completions"]]
            assert record["scores"] == pytest.approx(logits, abs=1e-5)
            assert record["chosen"] == (0 if record["scores"][0] >= record["scores"][1] else 1)


def test_a_lora_policy_is_judged_against_its_adapter_disabled_base(stories_model_dir):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(str(stories_model_dir))
    base = load_causal_lm(str(stories_model_dir))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    online = OnlineDPO(policy, tokenizer, letter_score, sampling=SamplingParams(max_new_tokens=8, seed=1),
                       learning_rate=5e-2)
    assert online.reference is None  # no copy: the adapter off is the reference
    first, second = online.sample(PROMPTS, ["a", "b"])
    start = online.pair_loss(PROMPTS, first, second)  # a fresh adapter (B = 0) is the base itself
    assert start.metrics["objective/kl"] == 0.0 and start.metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    online.step(PROMPTS, ["0/a", "0/b"])
    after = online.pair_loss(PROMPTS, first, second)
    assert after.metrics["objective/kl"] != 0.0
    for name, value in online.policy.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, before[name.replace(".base_layer", "")]), name


@pytest.mark.slow
def test_online_lora_rounds_save_the_adapter_and_continue_from_the_merged_model(stories_model_dir, tmp_path):
    from preftune.loop import run_loop

    config = online_loop_config(tmp_path, stories_model_dir, reference="previous", steps_per_round=1).model_copy(
        update={"finetuning_type": "lora", "lora_rank": 4, "learning_rate": 5e-2})
    summary = run_loop(config, progress=False)
    out = tmp_path / "out"
    assert summary["rounds_done"] == 2
    for index in (1, 2):
        assert (out / f"round-{index}" / "model" / "adapter_model.safetensors").is_file()
        assert (out / f"round-{index}" / "merged" / "model.safetensors").is_file()
    assert summary["rounds"][1]["policy"] == str(out / "round-1" / "merged")
    steps = [json.loads(line) for line in (out / "round-2" / "online.jsonl").read_text().splitlines()]
    assert steps[0]["objective/kl"] == 0.0  # previous: the adapter-disabled merged round-1 model is the reference

