"""TRL's DPOTrainer surface, as TRL's own tests and scripts use it: the end-of-training record, evaluate() with new
and named eval sets, streamed datasets, callbacks and TrainerControl, compute_metrics, attributes, resume by
argument. On the real stories260K model (see tests/test_training.py for the shared rows and settings)."""

from __future__ import annotations

import math

import datasets
import pytest
import torch
from transformers import TrainerCallback

from preftune import DPOTrainer
from test_training import STORY_PAIRS, make_config


@pytest.fixture
def model_dir(stories_model_dir):
    return str(stories_model_dir)


def _trainer(model_dir, tmp_path, train=STORY_PAIRS, **overrides):
    return DPOTrainer(model=model_dir, args=make_config(tmp_path, **overrides), train_dataset=train)


def test_the_history_ends_with_transformers_train_summary_record(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path, max_steps=3, per_device_train_batch_size=4)
    result = trainer.train()
    last = trainer.state.log_history[-1]
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "train_loss"} <= set(last)
    step_losses = [record["loss"] for record in trainer.state.log_history if "loss" in record]
    assert len(step_losses) == 3  # every step logged, 4 pairs each: the run's mean loss is their mean
    assert last["train_loss"] == pytest.approx(sum(step_losses) / 3, rel=1e-6)
    assert last["train_loss"] == pytest.approx(result.training_loss)
    assert last["step"] == 3 and last["train_steps_per_second"] > 0
    # total_flos is transformers' estimate: 6 x non-embedding parameters x tokens trained on
    tokens = trainer.state.num_input_tokens_seen
    assert tokens > 0
    assert last["total_flos"] == pytest.approx(6 * trainer.model.num_parameters(exclude_embeddings=True) * tokens)


def test_evaluate_takes_a_new_dataset_and_named_sets(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path)
    first, second = STORY_PAIRS[:4], STORY_PAIRS[4:]
    one = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(first))
    two = trainer.evaluate(eval_dataset=second)
    named = trainer.evaluate(eval_dataset=datasets.DatasetDict(
        {"a": datasets.Dataset.from_list(first), "b": datasets.Dataset.from_list(second)}))
    assert named["eval_a_logps/chosen"] == pytest.approx(one["eval_logps/chosen"], rel=1e-6)
    assert named["eval_b_logps/chosen"] == pytest.approx(two["eval_logps/chosen"], rel=1e-6)
    assert named["eval_a_loss"] == pytest.approx(math.log(2)) == one["eval_loss"]  # untrained: policy = reference
    assert one["eval_logps/chosen"] != pytest.approx(two["eval_logps/chosen"])  # the sets really differ
    renamed = trainer.evaluate(eval_dataset=first, metric_key_prefix="test")
    assert renamed["test_logps/chosen"] == pytest.approx(one["eval_logps/chosen"], rel=1e-6)


def test_named_eval_sets_are_logged_in_turn_during_training(model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS,
                         eval_dataset={"data1": STORY_PAIRS[:3], "data2": STORY_PAIRS[3:6]})
    assert set(trainer.eval_dataset) == {"data1", "data2"}
    assert "prompt_ids" in trainer.eval_dataset["data1"][0]
    trainer.train()
    history = trainer.state.log_history
    assert "eval_data1_loss" in history[-3] and "eval_data2_loss" in history[-2] and "train_loss" in history[-1]
    evals = [r["step"] for r in history if "eval_data1_loss" in r]
    assert evals == [1, 2]


def test_a_stream_trains_like_the_same_rows_in_one_batch(model_dir, tmp_path):
    """With one batch holding every row, the order of rows cannot matter: a streamed run and a map-style run take
    the same steps. The rows reach the batch in another order, so the gradients differ by float rounding; Adam's eps
    = 1 keeps that rounding from flipping whole ±lr updates of near-zero gradients (as in
    test_training.test_gradient_accumulation_matches_one_big_batch)."""
    plain = _trainer(model_dir, tmp_path / "plain", max_steps=3, adam_epsilon=1.0)
    plain.train()
    stream = datasets.Dataset.from_list(STORY_PAIRS).to_iterable_dataset()
    streamed = _trainer(model_dir, tmp_path / "stream", train=stream, max_steps=3, adam_epsilon=1.0)
    assert streamed.train_dataset is stream
    streamed.train()
    expected = [r["loss"] for r in plain.recorder.train_records]
    assert [r["loss"] for r in streamed.recorder.train_records] == pytest.approx(expected, rel=1e-5)
    for (name, a), (_, b) in zip(plain.model.named_parameters(), streamed.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_stream_shorter_than_the_run_is_read_again(model_dir, tmp_path):
    stream = datasets.Dataset.from_list(STORY_PAIRS).to_iterable_dataset()  # 8 rows: 2 steps of 4 per pass
    trainer = _trainer(model_dir, tmp_path, train=stream, max_steps=5, per_device_train_batch_size=4)
    result = trainer.train()
    assert result.global_step == 5
    assert trainer.recorder.train_records[-1]["step"] == 5


def test_a_stream_needs_max_steps_and_cannot_be_precomputed(model_dir, tmp_path):
    stream = datasets.Dataset.from_list(STORY_PAIRS).to_iterable_dataset()
    with pytest.raises(ValueError, match="max_steps"):
        _trainer(model_dir, tmp_path, train=stream, max_steps=-1, num_train_epochs=1)
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        _trainer(model_dir, tmp_path, train=stream, max_steps=2, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        DPOTrainer(model=model_dir, args=make_config(tmp_path, precompute_ref_log_probs=True), train_dataset=STORY_PAIRS,
                   eval_dataset={"eval": stream})


def test_a_streamed_eval_set_is_read_whole(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path)
    streamed = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(STORY_PAIRS[:5]).to_iterable_dataset())
    assert streamed["eval_loss"] == pytest.approx(trainer.evaluate(eval_dataset=STORY_PAIRS[:5])["eval_loss"], rel=1e-6)


class _Recorder(TrainerCallback):
    def __init__(self, stop_at: int | None = None):
        self.events, self.logs, self.stop_at = [], [], stop_at

    def __getattribute__(self, name):
        attribute = object.__getattribute__(self, name)
        if name.startswith("on_") and callable(attribute):
            object.__getattribute__(self, "events").append(name)
        return attribute

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_training_stop = True
        return control


def test_callbacks_see_transformers_events_in_order(model_dir, tmp_path):
    recorder = _Recorder()
    args = make_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                       gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:2],
                         callbacks=[recorder])
    trainer.train()
    events = [event for event in recorder.events if event != "on_substep_end"]
    assert events[:2] == ["on_init_end", "on_train_begin"]
    step = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log"]
    assert events[2:3] == ["on_epoch_begin"] and events[3:8] == step
    second = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_epoch_end", "on_log"]
    assert events[8:] == [*second, "on_log", "on_evaluate", "on_save", "on_log", "on_train_end"]  # 2 steps = 1 epoch
    assert recorder.events.count("on_substep_end") == 2  # the first of two accumulated micro-batches, each step
    logged_steps = [step for step, logs in recorder.logs]
    assert logged_steps == [1, 2, 2, 2] and "eval_loss" in recorder.logs[2][1] and "train_loss" in recorder.logs[3][1]
    assert all("step" not in logs for _, logs in recorder.logs)  # as transformers: the step is the state's


def test_a_callback_stops_training_and_can_be_removed(model_dir, tmp_path):
    stopper = _Recorder(stop_at=2)
    trainer = _trainer(model_dir, tmp_path, max_steps=5)
    trainer.add_callback(stopper)
    assert trainer.train().global_step == 2
    assert trainer.pop_callback(_Recorder) is stopper
    again = _trainer(model_dir, tmp_path / "again", max_steps=3)
    again.add_callback(_Recorder)  # a class is instantiated, as transformers does
    again.remove_callback(_Recorder)
    assert again.train().global_step == 3


def test_compute_metrics_gets_rewards_with_the_chosen_column_preferred(model_dir, tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["predictions"], seen["labels"] = prediction.predictions, prediction.label_ids
        accuracy = float((prediction.predictions.argmax(axis=1) == prediction.label_ids).mean())
        return {"my_accuracy": accuracy}

    trainer = DPOTrainer(model=model_dir, args=make_config(tmp_path), train_dataset=STORY_PAIRS,
                         eval_dataset=STORY_PAIRS, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert seen["predictions"].shape == (len(STORY_PAIRS), 2) and (seen["labels"] == 0).all()
    margins = seen["predictions"][:, 0] - seen["predictions"][:, 1]
    assert metrics["eval_rewards/margins"] == pytest.approx(float(margins.mean()), rel=1e-5, abs=1e-7)
    ties = seen["predictions"][:, 0] == seen["predictions"][:, 1]
    assert not ties.any()  # the trained policy separates the rewards, so argmax and "chosen > rejected" agree
    assert metrics["eval_my_accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"])


def test_trl_attributes(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path)
    assert trainer.processing_class is trainer.tokenizer
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model  # a frozen copy
    assert set(trainer.train_dataset.column_names) >= {"prompt_ids", "chosen_ids", "rejected_ids"}
    assert trainer.eval_dataset is None
    assert {"trl", "dpo"} <= set(trainer.model.model_tags)
    reference_free = _trainer(model_dir, tmp_path / "simpo", loss_type="simpo")
    assert reference_free.ref_model is None


def test_trl_argument_errors_are_value_errors(model_dir, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        DPOTrainer(model=model_dir, args=make_config(tmp_path))
    with pytest.raises(ValueError, match="data_collator"):
        DPOTrainer(model=model_dir, args=make_config(tmp_path), train_dataset=STORY_PAIRS, data_collator=lambda x: x)
    trainer = _trainer(model_dir, tmp_path)
    with pytest.raises(ValueError, match="same object"):
        DPOTrainer(model=trainer.model, ref_model=trainer.model, args=make_config(tmp_path), train_dataset=STORY_PAIRS)


def test_train_resumes_from_the_newest_checkpoint_when_asked_with_true(model_dir, tmp_path):
    settings = dict(max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2)
    whole = _trainer(model_dir, tmp_path / "whole", **settings)
    whole.train()
    cut = _trainer(model_dir, tmp_path / "cut", **settings)
    cut.add_callback(_Recorder(stop_at=2))  # stops after step 2, whose checkpoint is written
    assert cut.train().global_step == 2
    resumed = _trainer(model_dir, tmp_path / "cut", **settings)
    resumed.train(resume_from_checkpoint=True)
    expected = [r["loss"] for r in whole.recorder.train_records]
    assert [r["loss"] for r in resumed.recorder.train_records] == pytest.approx(expected, rel=1e-6)
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_push_to_hub_offline_is_one_clear_error(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    trainer = _trainer(model_dir, tmp_path)
    with pytest.raises(ValueError, match="push_to_hub.*not reachable"):
        trainer.push_to_hub()


def test_early_stopping_callback_stops_when_the_metric_stops_improving(model_dir, tmp_path):
    from transformers import EarlyStoppingCallback

    args = make_config(tmp_path, max_steps=6, learning_rate=0.0, eval_strategy="steps", eval_steps=1,
                       metric_for_best_model="loss")
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:4],
                         callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    # learning rate 0: eval_loss stays at log 2, so the second evaluation does not improve on the first
    assert trainer.train().global_step == 2
    assert trainer.state.best_metric == pytest.approx(math.log(2)) and trainer.state.best_global_step == 1


def _scripted_metric(scores):
    calls = []

    def compute_metrics(prediction):
        calls.append(len(calls))
        return {"score": scores[len(calls) - 1]}

    return compute_metrics


def test_load_best_model_at_end_loads_the_best_checkpoints_weights(model_dir, tmp_path):
    from safetensors.torch import load_file

    args = make_config(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                       load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:2],
                         compute_metrics=_scripted_metric([0.1, 0.9, 0.3]))
    trainer.train()
    assert trainer.state.best_global_step == 2 and trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_file(str(tmp_path / "run" / "checkpoint-2" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    final = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(not torch.equal(best[name], last[name]) for name in best)  # step 3 moved the weights on
    for name, value in best.items():
        torch.testing.assert_close(final[name], value, msg=name)  # the saved model is step 2's


def test_save_strategy_best_saves_only_after_an_improving_evaluation(model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1, save_strategy="best",
                       metric_for_best_model="score", greater_is_better=True)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:2],
                         compute_metrics=_scripted_metric([0.1, 0.9, 0.3]))
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_eval_on_start_and_logging_strategy_no(model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, eval_on_start=True,
                       logging_strategy="no")
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:2])
    trainer.train()
    history = trainer.state.log_history
    assert history[0]["step"] == 0 and "eval_loss" in history[0]
    assert not [record for record in history if "loss" in record]  # no training logs
    assert [record["step"] for record in history if "eval_loss" in record] == [0, 2] and "train_loss" in history[-1]


def test_save_total_limit_never_deletes_the_best_checkpoint(model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                       save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="score",
                       greater_is_better=True)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS, eval_dataset=STORY_PAIRS[:2],
                         compute_metrics=_scripted_metric([0.1, 0.9, 0.3, 0.2]))
    trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


REMOTE_MODELING = '''from transformers import LlamaConfig, LlamaForCausalLM


class RemoteConfig(LlamaConfig):
    model_type = "remote"


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
'''


def test_a_model_with_its_own_code_needs_trust_remote_code(model_dir, tmp_path, monkeypatch):
    import json
    import shutil

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    remote = tmp_path / "remote-model"
    shutil.copytree(model_dir, remote)
    (remote / "modeling_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="remote", architectures=["RemoteForCausalLM"],
                  auto_map={"AutoConfig": "modeling_remote.RemoteConfig",
                            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="custom code"):
        DPOTrainer(model=str(remote), args=make_config(tmp_path), train_dataset=STORY_PAIRS)
    trainer = DPOTrainer(model=str(remote), args=make_config(tmp_path, trust_remote_code=True), train_dataset=STORY_PAIRS)
    assert type(trainer.model).__name__ == "RemoteForCausalLM"


def test_model_init_kwargs_load_the_policy_in_their_dtype(model_dir, tmp_path):
    args = make_config(tmp_path, max_steps=2, model_init_kwargs={"dtype": torch.float16}, learning_rate=1e-3)
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=STORY_PAIRS)
    before = {name: parameter.clone() for name, parameter in trainer.model.named_parameters()}
    trainer.train()
    assert all(math.isfinite(record["loss"]) for record in trainer.recorder.train_records)
    for name, parameter in trainer.model.named_parameters():
        assert parameter.dtype == torch.float16, name
    assert any(not torch.equal(before[name], parameter) for name, parameter in trainer.model.named_parameters())
