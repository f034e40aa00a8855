"""Each loss equals its formula (computed independently in float64 Python) and TRL's on identical inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from preftune.errors import ConfigError
from preftune.losses import LOSSES, preference_loss

logp = st.floats(min_value=-300.0, max_value=-0.01, allow_nan=False)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def as_tensors(*values):
    return [torch.tensor([v], dtype=torch.float64) for v in values]


@settings(max_examples=200, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=st.floats(0.01, 2.0), eps=st.floats(0.0, 0.49))
def test_sigmoid_loss_is_conservative_dpo_formula(pc, pr, rc, rr, beta, eps):
    h = beta * ((pc - rc) - (pr - rr))
    expected = -(1 - eps) * log_sigmoid(h) - eps * log_sigmoid(-h)
    got = preference_loss("sigmoid", *as_tensors(pc, pr, rc, rr), beta=beta, label_smoothing=eps)
    assert got.item() == pytest.approx(expected, abs=1e-6, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=st.floats(0.01, 2.0))
def test_hinge_loss_formula(pc, pr, rc, rr, beta):
    expected = max(0.0, 1 - beta * ((pc - rc) - (pr - rr)))
    got = preference_loss("hinge", *as_tensors(pc, pr, rc, rr), beta=beta)
    assert got.item() == pytest.approx(expected, abs=1e-6, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(pc=logp, pr=logp, rc=logp, rr=logp, beta=st.floats(0.01, 2.0), lc=st.integers(1, 500), lr=st.integers(1, 500))
def test_ipo_loss_is_length_normalised_squared_formula(pc, pr, rc, rr, beta, lc, lr):
    expected = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    got = preference_loss(
        "ipo", *as_tensors(pc, pr, rc, rr), beta=beta,
        chosen_lengths=torch.tensor([lc]), rejected_lengths=torch.tensor([lr]),
    )
    assert got.item() == pytest.approx(expected, abs=1e-6, rel=1e-9)


def test_sigmoid_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([-12.5, -80.0, -3.0])
    other = torch.tensor([-40.0, -2.0, -3.5])
    loss = preference_loss("sigmoid", logps, other, logps.clone(), other.clone(), beta=0.1)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2.0)))


def test_losses_return_one_value_per_example_and_carry_gradients():
    policy_chosen = torch.tensor([-5.0, -6.0], requires_grad=True)
    paired = [name for name, spec in LOSSES.items() if spec.kind != "unpaired"]
    assert len(paired) == len(LOSSES) - 1  # only kto is unpaired
    for name in paired:
        spec = LOSSES[name]
        references = (None, None) if spec.reference_free else (torch.tensor([-5.5, -6.0]), torch.tensor([-7.0, -4.5]))
        loss = preference_loss(
            name, policy_chosen, torch.tensor([-7.0, -4.0]), *references,
            beta=0.2, chosen_lengths=torch.tensor([3, 4]), rejected_lengths=torch.tensor([5, 2]),
            label_smoothing=0.1 if name == "exo_pair" else 0.0,
        )
        assert loss.shape == (2,)
        (grad,) = torch.autograd.grad(loss.sum(), policy_chosen)
        assert torch.isfinite(grad).all()


def test_unknown_loss_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="loss_type.*sigmoid"):
        preference_loss("sigmoidd", *as_tensors(-1, -2, -1, -2), beta=0.1)


def test_ipo_without_lengths_is_refused():
    with pytest.raises(ValueError, match="lengths"):
        preference_loss("ipo", *as_tensors(-1, -2, -1, -2), beta=0.1)
