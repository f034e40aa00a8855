"""The loss family inside the trainer on the real stories260K model: the named loss is the loss computed, and a
short run of each family (with a reference, reference-free, unpaired KTO, several negatives) widens the margin."""

from __future__ import annotations

import math

import pytest

from preftune import DPOTrainer
from preftune.errors import ConfigError

from test_training import STORY_PAIRS, make_config

BETA = 0.1
EPSILON = 0.1
LN2 = math.log(2)

# Each reference loss at the first step, where policy = reference and every log-ratio is 0.
LOSS_AT_ZERO_LOGRATIOS = {
    "sigmoid": LN2,
    "robust": LN2,
    "hinge": 1.0,
    "ipo": (1 / (2 * BETA)) ** 2,
    "exo_pair": 0.5 * (math.log(0.5) - math.log1p(-EPSILON)) + 0.5 * (math.log(0.5) - math.log(EPSILON)),
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / BETA) ** 2,
    "aot": LN2,
    "aot_unpaired": LN2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * LN2 + 0.5,
    "sigmoid_norm": LN2,
}
SMOOTHED = {"robust", "exo_pair"}


def _train(model_dir, tmp_path, rows=STORY_PAIRS, **overrides):
    args = make_config(tmp_path, **{"beta": BETA, **overrides})
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=rows)
    trainer.train()
    return trainer


@pytest.mark.parametrize("loss_type", sorted(LOSS_AT_ZERO_LOGRATIOS))
def test_the_named_loss_is_the_loss_computed(stories_model_dir, tmp_path, loss_type):
    smoothing = {"label_smoothing": EPSILON} if loss_type in SMOOTHED else {}
    trainer = _train(stories_model_dir, tmp_path, loss_type=loss_type, learning_rate=0.0, **smoothing)
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(LOSS_AT_ZERO_LOGRATIOS[loss_type], rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_a_loss_list_is_the_weighted_sum_and_logs_each_component(stories_model_dir, tmp_path):
    trainer = _train(
        stories_model_dir, tmp_path, loss_type=["sigmoid", "hinge", "sft"], loss_weights=[1.0, 0.5, 0.1], learning_rate=0.0
    )
    first = trainer.state.log_history[0]
    assert first["loss/sigmoid"] == pytest.approx(LN2, rel=1e-5) and first["loss/hinge"] == pytest.approx(1.0)
    assert first["loss/sft"] > 0
    assert first["loss"] == pytest.approx(LN2 + 0.5 + 0.1 * first["loss/sft"], rel=1e-5)


def test_rpo_adds_the_length_averaged_nll_and_logs_it(stories_model_dir, tmp_path):
    trainer = _train(stories_model_dir, tmp_path, rpo_alpha=0.5, learning_rate=0.0)
    first = trainer.state.log_history[0]
    # The chosen NLL per token is −logps/|y_w| averaged over pairs; with zero log-ratios the DPO term is ln 2.
    assert first["nll_loss"] > 0
    assert first["loss"] == pytest.approx(LN2 + 0.5 * first["nll_loss"], rel=1e-5)


def test_wpo_and_ld_dpo_reach_the_loss_through_the_trainer(stories_model_dir, tmp_path):
    """First step (zero log-ratios): loss = mean of ln 2 · w over pairs, w the WPO weight; logps/chosen LD-weighted."""
    import torch

    from preftune.data.collate import collate_pairs
    from preftune.logprobs import pair_logprobs

    trainer = _train(stories_model_dir, tmp_path, use_weighting=True, ld_alpha=0.25, learning_rate=0.0)
    examples = list(trainer.data.train.dataset)
    with torch.no_grad():
        out = pair_logprobs(trainer.model, collate_pairs(examples, pad_token_id=0), ld_alpha=0.25, wpo=True)
    weights = torch.exp(out.chosen_wpo_logps) * torch.exp(out.rejected_wpo_logps)
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(float((LN2 * weights).mean()), rel=1e-5)
    assert first["logps/chosen"] == pytest.approx(float(out.chosen_logps.mean()), rel=1e-5)
    assert float(weights.max()) < 1.0  # the weights are not all 1: the test would notice if WPO were off


def _margins(trainer) -> list[float]:
    return [record["rewards/margins"] for record in trainer.recorder.train_records]


FAMILIES = {
    "reference": dict(loss_type="sigmoid"),
    "reference+regularisers": dict(loss_type="sigmoid", rpo_alpha=0.2, dpop_lambda=5.0),
    "reference+ld_alpha+wpo": dict(loss_type="sigmoid", ld_alpha=0.5, use_weighting=True, learning_rate=5e-2),
    "reference f-divergence": dict(loss_type="sigmoid", f_divergence_type="js_divergence"),
    "reference-free orpo": dict(loss_type="orpo"),
    "reference-free simpo": dict(loss_type="simpo", beta=2.0),
    "reference-free cpo": dict(loss_type="cpo"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_short_run_of_each_family_widens_the_margin(stories_model_dir, tmp_path, family):
    trainer = _train(stories_model_dir, tmp_path, max_steps=8, **{"learning_rate": 5e-3, **FAMILIES[family]})
    margins = _margins(trainer)
    assert margins[-1] > margins[0] + 1e-3, margins
    if "reference-free" in family:
        assert trainer.reference is None  # no reference model loaded at all


def test_a_reference_free_loss_refuses_a_reference_model(stories_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no reference") as info:
        DPOTrainer(model=str(stories_model_dir), ref_model=str(stories_model_dir), args=make_config(tmp_path, loss_type="orpo"),
                   train_dataset=STORY_PAIRS)
    assert info.value.key == "ref_model"


def _story_negatives():
    """Each story pair with three negatives: its rejected and two other pairs' rejected endings."""
    return [
        {**pair, "rejected": [pair["rejected"], STORY_PAIRS[(i + 1) % 8]["rejected"], STORY_PAIRS[(i + 2) % 8]["rejected"]]}
        for i, pair in enumerate(STORY_PAIRS)
    ]


@pytest.mark.parametrize("loss_type", ["listwise", "sigmoid"])
def test_several_negatives_train_and_average_metrics_over_negatives(stories_model_dir, tmp_path, loss_type):
    trainer = _train(stories_model_dir, tmp_path, rows=_story_negatives(), loss_type=loss_type, max_steps=8, learning_rate=5e-3)
    assert trainer.data.num_negatives == 3
    first = trainer.state.log_history[0]
    expected_first = math.log(4) if loss_type == "listwise" else LN2  # zero log-ratios: softmax over 4 equal scores
    assert first["loss"] == pytest.approx(expected_first, rel=1e-5)
    margins = _margins(trainer)
    assert margins[-1] > margins[0] + 1e-3, margins


def _kto_trainer(model_dir, tmp_path, **overrides):
    from conftest import shared_asset

    args = make_config(
        tmp_path, stage="kto", dataset="kto_en_demo", dataset_dir=str(shared_asset("llamafactory")),
        kto_chosen_weight=1.0, kto_rejected_weight=1.5, **{"max_samples": 96, "max_length": 256, **overrides},
    )
    return DPOTrainer(model=str(model_dir), args=args)


def test_kto_first_step_is_the_weighted_half_and_the_kl_is_zero(stories_model_dir, tmp_path):
    trainer = _kto_trainer(stories_model_dir, tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=128)
    assert trainer.data.kind == "unpaired" and trainer.loss_params.is_unpaired
    trainer.train()
    first = trainer.recorder.train_records[0]
    # policy = reference: every log-ratio and the KL estimate are 0, so each row's loss is w·(1 − σ(0)) = w/2.
    labels = trainer.data.train.dataset["label"]
    expected = sum(0.5 * (1.0 if label else 1.5) for label in labels) / len(labels)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(expected, rel=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)


def test_kto_trains_on_llamafactorys_kto_demo(stories_model_dir, tmp_path):
    trainer = _kto_trainer(stories_model_dir, tmp_path, max_steps=6, logging_steps=3, learning_rate=5e-3)
    trainer.train()
    records = trainer.recorder.train_records
    assert len(records) == 2
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"] + 1e-3
    report = trainer.data.report["train"]
    assert report["desirable"] + report["undesirable"] == len(trainer.data.train.dataset)


def test_unpaired_data_with_a_paired_loss_and_the_reverse_name_the_key(stories_model_dir, tmp_path):
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in STORY_PAIRS]
    with pytest.raises(ConfigError, match="unpaired") as info:
        DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path / "a"), train_dataset=unpaired)
    assert info.value.key == "loss_type"
    with pytest.raises(ConfigError, match="kto needs unpaired rows") as info:
        DPOTrainer(model=str(stories_model_dir), args=make_config(tmp_path / "b", loss_type="kto"), train_dataset=STORY_PAIRS)
    assert info.value.key == "loss_type"
