"""The DPO loss family: each loss against an independent formula (mpmath, 50 digits), against TRL 1.16's own
code where TRL has it, gradients, several negatives, dispatch and configuration errors.

The reference formulas below are written from the papers / the docstrings' formulas, per pair, in plain
Python with mpmath; they never call preftune.losses.
"""

from __future__ import annotations

import math
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass, replace
from types import SimpleNamespace

import mpmath as mp
import pytest
import torch

from preftune.errors import ConfigError
from preftune.losses import LOSSES, LossInputs, LossParams, compute_preference_loss, get_loss_spec, kto_kl_estimate, kto_loss

mp.mp.dps = 50
EXTREME = 1e4  # log-ratio magnitude of the extreme rows

PAIRED_NAMES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "listwise", "orpo", "simpo", "cpo",
)  # fmt: skip
REFERENCE_FREE = ("orpo", "simpo", "cpo")
USES_SMOOTHING = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


# ------------------------------------------------------------------------------------ independent formulas
def lsig(x) -> mp.mpf:
    """log σ(x)."""
    return -mp.log1p(mp.exp(-mp.mpf(x)))


def sig(x) -> mp.mpf:
    return 1 / (1 + mp.exp(-mp.mpf(x)))


def smoothed(h, eps) -> mp.mpf:
    return -(1 - mp.mpf(eps)) * lsig(h) - mp.mpf(eps) * lsig(-h)


def f_score(u, p: LossParams) -> mp.mpf:
    """f'(π/π_ref) of f-DPO (Wang et al. 2023, Table 1), exponent clamped at 80 as documented."""
    u = mp.mpf(u)
    kind = p.f_divergence_type
    if kind == "reverse_kl":
        return u
    if kind == "js_divergence":
        return mp.log(2) + lsig(u)
    alpha = mp.mpf(0) if kind == "forward_kl" else mp.mpf(p.f_alpha_divergence_coef)
    if abs(alpha - 1) < 1e-6:
        return u
    return (mp.exp(min((alpha - 1) * u, mp.mpf(80))) - 1) / (alpha - 1)


def pair_terms(pc, pr, rc, rr, lc, lr, p: LossParams) -> SimpleNamespace:
    """Everything the pair formulas use, for chosen (pc, rc, lc) against one rejected (pr, rr, lr)."""
    pc, pr, rc, rr, lc, lr = (mp.mpf(v) for v in (pc, pr, rc, rr, lc, lr))
    cl, rl = pc - rc, pr - rr
    cs, rs = f_score(cl, p), f_score(rl, p)
    margin = cs - rs
    dpop = margin - (mp.mpf(p.dpop_lambda) * max(mp.mpf(0), rc - pc) if p.dpop_lambda is not None else 0)
    return SimpleNamespace(
        pc=pc, pr=pr, cl=cl, rl=rl, cs=cs, rs=rs, m=margin, dm=dpop, lc=lc, lr=lr, ca=pc / lc, ra=pr / lr
    )  # fmt: skip


def log_odds(avg) -> mp.mpf:
    return avg - mp.log(1 - mp.exp(avg))


PAIR_FORMULAS = {
    "sigmoid": lambda t, p: smoothed(p.beta * t.dm, p.label_smoothing),
    "robust": lambda t, p: (-(1 - p.label_smoothing) * lsig(p.beta * t.dm) + p.label_smoothing * lsig(-p.beta * t.dm))
    / (1 - 2 * mp.mpf(p.label_smoothing)),
    "hinge": lambda t, p: max(mp.mpf(0), 1 - p.beta * t.m),
    "ipo": lambda t, p: (t.cs / t.lc - t.rs / t.lr - 1 / (2 * mp.mpf(p.beta))) ** 2,
    "exo_pair": lambda t, p: sig(p.beta * t.dm) * (lsig(p.beta * t.dm) - mp.log(1 - mp.mpf(p.label_smoothing)))
    + sig(-p.beta * t.dm) * (lsig(-p.beta * t.dm) - mp.log(p.label_smoothing)),
    "nca_pair": lambda t, p: -lsig(p.beta * t.cl) - lsig(-p.beta * t.cl) / 2 - lsig(-p.beta * t.rl) / 2,
    "bco_pair": lambda t, p: -lsig(p.beta * t.cl) - lsig(-p.beta * t.rl),
    "sppo_hard": lambda t, p: (t.cl - 1 / (2 * mp.mpf(p.beta))) ** 2 + (t.rl + 1 / (2 * mp.mpf(p.beta))) ** 2,
    "apo_zero": lambda t, p: 1 - sig(p.beta * t.cl) + sig(p.beta * t.rl),
    "apo_down": lambda t, p: sig(p.beta * t.cl) + 1 - sig(p.beta * (t.cl - t.rl)),
    "discopop": lambda t, p: (1 - sig(p.beta * t.dm / p.discopop_tau)) * -lsig(p.beta * t.dm)
    + sig(p.beta * t.dm / p.discopop_tau) * mp.exp(-p.beta * t.dm),
    "sigmoid_norm": lambda t, p: -lsig(p.beta * (t.cs / t.lc - t.rs / t.lr)),
    "orpo": lambda t, p: -t.ca - p.beta * lsig(log_odds(t.ca) - log_odds(t.ra)),
    "simpo": lambda t, p: smoothed(p.beta * (t.ca - t.ra) - p.simpo_gamma, p.label_smoothing),
    "cpo": lambda t, p: smoothed(p.beta * (t.pc - t.pr), p.label_smoothing) - p.cpo_alpha * t.ca,
}


@dataclass
class Sample:
    """A batch as Python floats: chosen per row, rejected per row and negative (M of them)."""

    pc: list[float]
    rc: list[float]
    lc: list[int]
    pr: list[list[float]]
    rr: list[list[float]]
    lr: list[list[int]]
    wc: list[float]
    wr: list[list[float]]
    flat: bool  # M == 1 given as (B,) tensors

    @property
    def size(self) -> tuple[int, int]:
        return len(self.pc), len(self.pr[0])

    def inputs(self, dtype=torch.float64, *, reference: bool = True, requires_grad: bool = False) -> LossInputs:
        def matrix(values, tensor_dtype=dtype):
            tensor = torch.tensor(values, dtype=tensor_dtype)
            return tensor[:, 0].contiguous() if self.flat else tensor

        def vector(values, tensor_dtype=dtype):
            return torch.tensor(values, dtype=tensor_dtype)

        policy_chosen = vector(self.pc).requires_grad_(requires_grad)
        policy_rejected = matrix(self.pr).requires_grad_(requires_grad)
        return LossInputs(
            policy_chosen, policy_rejected,
            vector(self.rc) if reference else None, matrix(self.rr) if reference else None,
            vector(self.lc, torch.long), matrix(self.lr, torch.long),
            vector(self.wc), matrix(self.wr),
        )  # fmt: skip

    def column(self, j: int) -> "Sample":
        """The sample with only negative j, flat."""
        take = lambda rows: [[row[j]] for row in rows]  # noqa: E731
        return replace(self, pr=take(self.pr), rr=take(self.rr), lr=take(self.lr), wr=take(self.wr), flat=True)


def random_logp_pair(rng: random.Random, extreme: bool) -> tuple[float, float]:
    """(policy, reference) summed log-probs, both <= 0, with a log-ratio up to ±EXTREME."""
    base = -rng.uniform(0.5, 30.0)
    ratio = rng.choice([-1, 1]) * EXTREME * rng.uniform(0.9, 1.0) if extreme else rng.uniform(-8.0, 8.0)
    return (base, base - ratio) if ratio >= 0 else (base + ratio, base)


def make_sample(seed: int, negatives: int, *, flat: bool = False, extreme_share: float = 0.35, rows: int = 8) -> Sample:
    rng = random.Random(seed)
    pairs = lambda: random_logp_pair(rng, rng.random() < extreme_share)  # noqa: E731
    chosen = [pairs() for _ in range(rows)]
    rejected = [[pairs() for _ in range(negatives)] for _ in range(rows)]
    return Sample(
        pc=[c[0] for c in chosen], rc=[c[1] for c in chosen], lc=[rng.randint(1, 40) for _ in range(rows)],
        pr=[[r[0] for r in row] for row in rejected], rr=[[r[1] for r in row] for row in rejected],
        lr=[[rng.randint(1, 40) for _ in range(negatives)] for _ in range(rows)],
        wc=[-rng.uniform(0.0, 2.0) for _ in range(rows)],
        wr=[[-rng.uniform(0.0, 2.0) for _ in range(negatives)] for _ in range(rows)],
        flat=flat,
    )  # fmt: skip


def formula_per_example(name: str, s: Sample, p: LossParams) -> list[mp.mpf]:
    """Loss ``name`` per example, from the formulas: mean over negatives of (WPO weight ·) the pair loss."""
    rows, negatives = s.size
    terms = [[pair_terms(s.pc[i], s.pr[i][j], s.rc[i], s.rr[i][j], s.lc[i], s.lr[i][j], p) for j in range(negatives)]
             for i in range(rows)]  # fmt: skip
    if name == "listwise":
        result = []
        for i in range(rows):
            rewards = [p.beta * terms[i][0].cl] + [p.beta * t.rl for t in terms[i]]
            result.append(-(rewards[0] - mp.log(mp.fsum(mp.exp(r) for r in rewards))))
        return result
    if name == "sft":
        value = -mp.fsum(map(mp.mpf, s.pc)) / sum(s.lc)
        pair = [[value] * negatives for _ in range(rows)]
    elif name in ("aot", "aot_unpaired"):
        pair = [[None] * negatives for _ in range(rows)]
        for j in range(negatives):
            if name == "aot":
                policy = sorted(mp.mpf(s.pc[i]) - s.pr[i][j] for i in range(rows))
                reference = sorted(mp.mpf(s.rc[i]) - s.rr[i][j] for i in range(rows))
                deltas = [a - b for a, b in zip(policy, reference)]
            else:
                chosen = sorted(terms[i][j].cl for i in range(rows))
                rejected = sorted(terms[i][j].rl for i in range(rows))
                deltas = [a - b for a, b in zip(chosen, rejected)]
            for i, delta in enumerate(deltas):
                pair[i][j] = smoothed(p.beta * delta, p.label_smoothing)
    else:
        pair = [[PAIR_FORMULAS[name](t, p) for t in row] for row in terms]
    if p.use_weighting:
        pair = [[v * mp.exp(mp.mpf(s.wc[i]) + s.wr[i][j]) for j, v in enumerate(row)] for i, row in enumerate(pair)]
    return [mp.fsum(row) / negatives for row in pair]


def formula_total(s: Sample, p: LossParams) -> list[mp.mpf]:
    """Σ_k w_k·loss_k + rpo_alpha·(−log π(y_w)/|y_w|), per example."""
    weights = p.loss_weights or (1.0,) * len(p.loss_types)
    parts = [formula_per_example(name, s, p) for name in p.loss_types]
    total = [mp.fsum(w * part[i] for w, part in zip(weights, parts)) for i in range(len(s.pc))]
    if p.rpo_alpha is not None:
        total = [v + p.rpo_alpha * (-mp.mpf(s.pc[i]) / s.lc[i]) for i, v in enumerate(total)]
    return total


def assert_matches(got, expected, *, abs_tol=1e-6, rel_tol=1e-9):
    got = got.detach().tolist()
    assert len(got) == len(expected)
    for index, (value, reference) in enumerate(zip(got, expected)):
        assert math.isfinite(value), f"row {index}: {value}"
        close = math.isclose(value, float(reference), rel_tol=rel_tol, abs_tol=abs_tol)
        assert close, f"row {index}: {value} vs {reference}"


# ----------------------------------------------------------------------------------- formula (mpmath) tests
LOSS_CASES = [
    ("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.25, "beta": 1.5}),
    ("robust", {"label_smoothing": 0.2}), ("robust", {"label_smoothing": 0.45, "beta": 0.02}),
    ("hinge", {}), ("hinge", {"beta": 2.0}),
    ("ipo", {}), ("ipo", {"beta": 0.7}),
    ("exo_pair", {"label_smoothing": 1e-3}), ("exo_pair", {"label_smoothing": 0.3, "beta": 1.0}),
    ("nca_pair", {}), ("bco_pair", {"beta": 0.5}), ("sppo_hard", {}), ("sppo_hard", {"beta": 2.0}),
    ("aot", {}), ("aot", {"label_smoothing": 0.1, "beta": 0.5}),
    ("aot_unpaired", {}), ("aot_unpaired", {"label_smoothing": 0.2}),
    ("apo_zero", {}), ("apo_down", {"beta": 0.4}),
    ("discopop", {}), ("discopop", {"discopop_tau": 0.7, "beta": 0.3}),
    ("sigmoid_norm", {}), ("sigmoid_norm", {"beta": 3.0}),
    ("sft", {}), ("listwise", {}), ("listwise", {"beta": 1.2}),
    ("orpo", {}), ("orpo", {"beta": 0.8}),
    ("simpo", {"beta": 2.0}), ("simpo", {"beta": 2.5, "simpo_gamma": 1.4, "label_smoothing": 0.1}),
    ("cpo", {}), ("cpo", {"cpo_alpha": 0.3, "label_smoothing": 0.05, "beta": 0.5}),
]  # fmt: skip


def test_every_registered_loss_is_covered():
    assert set(PAIRED_NAMES) | {"kto"} == set(LOSSES)
    assert {name for name, _ in LOSS_CASES} == set(PAIRED_NAMES)


@pytest.mark.parametrize("shape", ["flat", "negatives"])
@pytest.mark.parametrize(("name", "options"), LOSS_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_loss_matches_independent_formula_including_extremes(name, options, shape):
    params = LossParams(loss_types=(name,), **options)
    seed = zlib.crc32(f"{name}{options}".encode())
    sample = make_sample(seed, 1 if shape == "flat" else 3, flat=shape == "flat")
    out = compute_preference_loss(params, sample.inputs(reference=name not in REFERENCE_FREE))
    assert out.per_example.shape == (8,)
    assert_matches(out.per_example, formula_per_example(name, sample, params))


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence", "alpha_one"])
@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
def test_f_divergences_match_formula_including_extremes(name, divergence):
    options = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    coef = 1.0 if divergence == "alpha_one" else 0.3
    divergence = "alpha_divergence" if divergence == "alpha_one" else divergence
    params = LossParams((name,), beta=0.2, f_divergence_type=divergence, f_alpha_divergence_coef=coef, **options)
    sample = make_sample(7, 2)
    out = compute_preference_loss(params, sample.inputs())
    assert_matches(out.per_example, formula_per_example(name, sample, params))


@pytest.mark.parametrize("name", ["sigmoid", "robust", "exo_pair", "discopop"])
def test_dpop_penalty_enters_the_margin(name):
    options = {"label_smoothing": 0.1} if name in ("exo_pair", "robust") else {}
    params = LossParams((name,), beta=0.1, dpop_lambda=50.0, **options)
    sample = make_sample(11, 2)
    assert any(sample.rc[i] > sample.pc[i] for i in range(8)), "the penalty must be active somewhere"
    out = compute_preference_loss(params, sample.inputs())
    assert_matches(out.per_example, formula_per_example(name, sample, params))
    plain = compute_preference_loss(replace(params, dpop_lambda=None), sample.inputs()).per_example
    assert not torch.allclose(out.per_example, plain)


@pytest.mark.parametrize("names", [("sigmoid",), ("ipo", "sft"), ("simpo",), ("hinge", "nca_pair", "sppo_hard")])
def test_wpo_weights_each_pair_before_averaging(names):
    params = LossParams(names, beta=0.3, use_weighting=True, loss_weights=tuple(0.5 + k for k in range(len(names))))
    sample = make_sample(5, 3, extreme_share=0.0)
    out = compute_preference_loss(params, sample.inputs(reference=names != ("simpo",)))
    assert_matches(out.per_example, formula_total(sample, params))


def test_rpo_adds_the_length_averaged_nll_of_chosen():
    params = LossParams(("sigmoid",), beta=0.1, rpo_alpha=0.7)
    sample = make_sample(3, 2)
    out = compute_preference_loss(params, sample.inputs())
    assert_matches(out.per_example, formula_total(sample, params))
    assert_matches(out.nll, [-mp.mpf(sample.pc[i]) / sample.lc[i] for i in range(8)])
    assert not out.nll.requires_grad


def test_several_loss_types_sum_weighted_components():
    names = ("sigmoid", "sft", "ipo", "apo_zero")
    params = LossParams(names, loss_weights=(1.0, 0.25, 2.0, 0.5), beta=0.2)
    sample = make_sample(9, 2)
    out = compute_preference_loss(params, sample.inputs())
    assert_matches(out.per_example, formula_total(sample, params))
    assert set(out.components) == set(names)
    for name in names:
        assert_matches(out.components[name], formula_per_example(name, sample, params))
    assert compute_preference_loss(LossParams(("sigmoid",)), sample.inputs()).components == {}


def test_nll_is_reported_for_losses_with_an_nll_term_only():
    sample = make_sample(4, 1, flat=True)
    expected = [-mp.mpf(sample.pc[i]) / sample.lc[i] for i in range(8)]
    for name in ("orpo", "cpo"):
        assert_matches(compute_preference_loss(LossParams((name,)), sample.inputs(reference=False)).nll, expected)
    assert compute_preference_loss(LossParams(("simpo",)), sample.inputs(reference=False)).nll is None
    assert compute_preference_loss(LossParams(("sigmoid",)), sample.inputs()).nll is None


def test_rewards_follow_trl_and_llama_factory_conventions():
    sample = make_sample(6, 3, extreme_share=0.0)
    beta = 0.3
    out = compute_preference_loss(LossParams(("sigmoid",), beta=beta), sample.inputs())
    assert out.chosen_rewards.shape == (8,) and out.rejected_rewards.shape == (8, 3)
    assert_matches(out.chosen_rewards, [beta * (mp.mpf(sample.pc[i]) - sample.rc[i]) for i in range(8)])
    assert_matches(out.rejected_rewards[:, 2], [beta * (mp.mpf(sample.pr[i][2]) - sample.rr[i][2]) for i in range(8)])
    for name, average in (("simpo", True), ("orpo", True), ("cpo", False)):
        out = compute_preference_loss(LossParams((name,), beta=beta), sample.inputs(reference=False))
        expected = [beta * mp.mpf(sample.pr[i][1]) / (sample.lr[i][1] if average else 1) for i in range(8)]
        assert_matches(out.rejected_rewards[:, 1], expected)
        assert not out.chosen_rewards.requires_grad


# ------------------------------------------------------------------------------------------- several negatives
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_listwise_with_one_negative_is_sigmoid(beta):
    sample = make_sample(21, 1)
    for flat in (True, False):
        inputs = replace(sample, flat=flat).inputs()
        listwise = compute_preference_loss(LossParams(("listwise",), beta=beta), inputs)
        sigmoid = compute_preference_loss(LossParams(("sigmoid",), beta=beta), inputs)
        torch.testing.assert_close(listwise.per_example, sigmoid.per_example, rtol=1e-12, atol=1e-12)


def test_listwise_differs_from_mean_of_pairs_with_several_negatives():
    sample = make_sample(22, 4, extreme_share=0.0)
    listwise = compute_preference_loss(LossParams(("listwise",), beta=0.5), sample.inputs()).per_example
    pairs = compute_preference_loss(LossParams(("sigmoid",), beta=0.5), sample.inputs()).per_example
    assert (listwise > pairs).all()  # -log softmax over M + 1 >= each pairwise -log σ term


@pytest.mark.parametrize(("name", "options"), [case for case in LOSS_CASES if case[0] != "listwise"],
                         ids=lambda v: v if isinstance(v, str) else "")  # fmt: skip
def test_pairwise_loss_with_negatives_is_the_mean_over_columns(name, options):
    params = LossParams((name,), **options)
    sample = make_sample(31, 3, extreme_share=0.2)
    reference = name not in REFERENCE_FREE
    together = compute_preference_loss(params, sample.inputs(reference=reference))
    columns = [compute_preference_loss(params, sample.column(j).inputs(reference=reference)) for j in range(3)]
    torch.testing.assert_close(together.per_example, torch.stack([c.per_example for c in columns]).mean(0))
    torch.testing.assert_close(together.rejected_rewards, torch.stack([c.rejected_rewards for c in columns], 1))


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", PAIRED_NAMES)
def test_gradcheck_float64(name):
    options = {"label_smoothing": 0.1} if name in ("exo_pair", "robust", "aot") else {}
    params = LossParams((name,), beta=0.3, **options)
    sample = make_sample(41, 2, extreme_share=0.0, rows=4)
    base = sample.inputs(reference=name not in REFERENCE_FREE)
    if name in REFERENCE_FREE:  # keep averaged log-probs in a range where both terms matter
        base.policy_chosen_logps = base.policy_chosen_logps / 10
        base.policy_rejected_logps = base.policy_rejected_logps / 10

    def loss(chosen, rejected):
        inputs = replace(base, policy_chosen_logps=chosen, policy_rejected_logps=rejected)
        return compute_preference_loss(params, inputs)

    chosen = base.policy_chosen_logps.clone().requires_grad_()
    rejected = base.policy_rejected_logps.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, r: loss(c, r).per_example, (chosen, rejected))
    grads = torch.autograd.grad(loss(chosen, rejected).per_example.sum(), (chosen, rejected), allow_unused=True)
    assert grads[0].abs().sum() > 0  # sft alone does not use the rejected side


def test_gradcheck_kto_float64():
    generator = torch.Generator().manual_seed(0)
    policy = (-torch.rand(6, generator=generator, dtype=torch.float64) * 20).requires_grad_()
    ref = policy.detach() + torch.randn(6, generator=generator, dtype=torch.float64)
    kl_policy = -torch.rand(6, generator=generator, dtype=torch.float64) * 20
    kl_ref = kl_policy - 1.0  # mean KL 1 > 0: the clamp is inactive
    labels = torch.tensor([True, False, True, True, False, False])
    assert torch.autograd.gradcheck(
        lambda x: kto_loss(x, ref, kto_kl_estimate(kl_policy - kl_ref), labels, beta=0.2, desirable_weight=1.3), (policy,)
    )


def test_extreme_inputs_give_finite_gradients():
    sample = make_sample(51, 3, extreme_share=1.0)
    for name, options in LOSS_CASES:
        inputs = sample.inputs(reference=name not in REFERENCE_FREE, requires_grad=True)
        out = compute_preference_loss(LossParams((name,), **options), inputs)
        policy = (inputs.policy_chosen_logps, inputs.policy_rejected_logps)
        grads = torch.autograd.grad(out.per_example.sum(), policy, allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads), name
    for divergence in ("forward_kl", "js_divergence", "alpha_divergence"):
        inputs = sample.inputs(requires_grad=True)
        params = LossParams(("sigmoid", "ipo", "discopop"), beta=0.2, f_divergence_type=divergence)
        per_example = compute_preference_loss(params, inputs).per_example
        grads = torch.autograd.grad(per_example.sum(), (inputs.policy_chosen_logps, inputs.policy_rejected_logps))
        assert torch.isfinite(per_example).all() and all(torch.isfinite(g).all() for g in grads), divergence


def test_orpo_is_finite_when_a_log_prob_is_exactly_zero():
    inputs = LossInputs(
        torch.tensor([0.0, -3.0], requires_grad=True), torch.tensor([-2.0, 0.0], requires_grad=True),
        chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([4, 1]),
    )  # fmt: skip
    loss = compute_preference_loss(LossParams(("orpo",)), inputs).per_example
    grads = torch.autograd.grad(loss.sum(), (inputs.policy_chosen_logps, inputs.policy_rejected_logps))
    assert torch.isfinite(loss).all() and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------------- KTO
def kto_formula(policy, ref, kl_policy, kl_ref, labels, beta, wd, wu) -> list[mp.mpf]:
    z = max(mp.mpf(0), mp.fsum(mp.mpf(a) - b for a, b in zip(kl_policy, kl_ref)) / len(kl_policy))
    out = []
    for p, r, desirable in zip(policy, ref, labels):
        ratio = mp.mpf(p) - r
        out.append(wd * (1 - sig(beta * (ratio - z))) if desirable else wu * (1 - sig(beta * (z - ratio))))
    return out


@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])  # negative mean KL is clamped to 0
def test_kto_matches_formula(kl_shift):
    rng = random.Random(int(kl_shift * 10))
    pairs = [random_logp_pair(rng, rng.random() < 0.3) for _ in range(8)]
    policy, ref = [p for p, _ in pairs], [r for _, r in pairs]
    kl_policy = [-rng.uniform(1, 40) for _ in range(8)]
    kl_ref = [v - kl_shift + rng.uniform(-0.5, 0.5) for v in kl_policy]
    labels = [rng.random() < 0.5 for _ in range(8)]
    tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = kto_loss(tensor(policy), tensor(ref), kto_kl_estimate(tensor(kl_policy) - tensor(kl_ref)), torch.tensor(labels),
                   beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)  # fmt: skip
    assert_matches(got, kto_formula(policy, ref, kl_policy, kl_ref, labels, 0.3, 1.5, 0.7))


# ------------------------------------------------------------------------------------------------- dispatch
def test_each_name_dispatches_to_its_own_formula():
    """Every loss's value matches its own formula and no other one's, so a wrong mapping or a silent fallback fails."""
    sample = make_sample(61, 2, extreme_share=0.0, rows=5)
    params = {name: LossParams((name,), beta=0.3, label_smoothing=0.1 if name in USES_SMOOTHING else 0.0)
              for name in PAIRED_NAMES}  # fmt: skip
    expected = {name: [float(v) for v in formula_per_example(name, sample, params[name])] for name in PAIRED_NAMES}
    for name in PAIRED_NAMES:
        got = compute_preference_loss(params[name], sample.inputs(reference=name not in REFERENCE_FREE)).per_example
        matching = [other for other in PAIRED_NAMES if torch.allclose(got, torch.tensor(expected[other]).double())]
        assert matching == [name]
        assert get_loss_spec(name).name == name


def test_registry_flags():
    with_reference = set(PAIRED_NAMES) - set(REFERENCE_FREE) - {"sft"} | {"kto"}
    assert {n for n, s in LOSSES.items() if s.needs_reference} == with_reference
    assert {n for n, s in LOSSES.items() if s.reference_free} == set(REFERENCE_FREE)
    assert {n for n, s in LOSSES.items() if s.batch_level} == {"aot", "aot_unpaired", "sft"}
    assert {n for n, s in LOSSES.items() if s.f_divergence} == set(F_DIVERGENCE_LOSSES)
    assert {n for n, s in LOSSES.items() if s.uses_label_smoothing} == set(USES_SMOOTHING)
    assert {n for n, s in LOSSES.items() if s.needs_lengths} == {"ipo", "sigmoid_norm", "sft", "orpo", "simpo", "cpo"}
    assert LossParams(("orpo",)).needs_reference is False and LossParams(("ipo",)).needs_reference is True
    assert LossParams(("kto",)).is_unpaired and not LossParams(("sigmoid",)).is_unpaired


def test_kto_is_refused_by_the_paired_entry_point():
    with pytest.raises(ValueError, match="kto_loss"):
        compute_preference_loss(LossParams(("kto",)), make_sample(1, 1, flat=True).inputs())


# ------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"loss_types": ("sigmoidd",)}, "loss_type", "sigmoid"),
        ({"loss_types": ()}, "loss_type", "no loss"),
        ({"loss_types": ("sigmoid", "ipo"), "loss_weights": (1.0,)}, "loss_weights", "1 loss_weights for 2"),
        ({"loss_types": ("exo_pair",)}, "label_smoothing", "exo_pair"),
        ({"loss_types": ("robust",), "label_smoothing": 0.5}, "label_smoothing", "robust"),
        ({"loss_types": ("hinge",), "label_smoothing": 0.1}, "label_smoothing", "only used by"),
        ({"loss_types": ("sigmoid",), "label_smoothing": 1.0}, "label_smoothing", r"\[0, 1\)"),
        ({"loss_types": ("kto", "sigmoid")}, "loss_type", "kto"),
        ({"loss_types": ("sigmoid", "sigmoid")}, "loss_type", "twice"),
        ({"loss_types": ("simpo", "sigmoid")}, "loss_type", "reference-free"),
        ({"f_divergence_type": "kl"}, "f_divergence_type", "unknown"),
        ({"loss_types": ("nca_pair",), "f_divergence_type": "js_divergence"}, "f_divergence_type", "only defined"),
        ({"loss_types": ("aot",), "use_weighting": True}, "use_weighting", "aot"),
        ({"loss_types": ("listwise",), "use_weighting": True}, "use_weighting", "listwise"),
        ({"loss_types": ("hinge",), "dpop_lambda": 5.0}, "dpop_lambda", "sigmoid"),
        ({"dpop_lambda": -1.0}, "dpop_lambda", ">= 0"),
        ({"beta": 0.0}, "beta", "> 0"),
        ({"beta": -0.1}, "beta", "> 0"),
        ({"discopop_tau": 0.0}, "discopop_tau", "> 0"),
        ({"rpo_alpha": -0.5}, "rpo_alpha", ">= 0"),
        ({"loss_types": ("kto",), "use_weighting": True}, "use_weighting", "kto"),
        ({"loss_weights": (float("nan"),)}, "loss_weights", "finite"),
    ],
)
def test_invalid_combinations_raise_config_error_naming_the_key(options, key, message):
    params = LossParams(**options)
    with pytest.raises(ConfigError, match=message) as error:
        params.validate()
    assert error.value.key == key
    with pytest.raises(ConfigError):  # the entry point validates too
        compute_preference_loss(params, make_sample(1, 1, flat=True).inputs())


def test_valid_combinations_pass_validation():
    for options in (
        {"loss_types": ("sigmoid", "sft"), "loss_weights": (1.0, 0.1), "use_weighting": True},
        {"loss_types": ("exo_pair",), "label_smoothing": 1e-3, "f_divergence_type": "js_divergence"},
        {"loss_types": ("orpo", "simpo", "cpo")},
        {"loss_types": ("kto",), "desirable_weight": 1.33},
        {"loss_types": ("sigmoid", "robust"), "dpop_lambda": 50.0, "label_smoothing": 0.2},
    ):
        LossParams(**options).validate()


def test_unknown_loss_lists_the_valid_names():
    with pytest.raises(ConfigError) as error:
        LossParams(loss_types=("nope",)).validate()
    assert all(name in str(error.value) for name in PAIRED_NAMES + ("kto",))


def test_from_config_reads_same_named_attributes():
    config = SimpleNamespace(loss_type="ipo", beta=0.25, label_smoothing=0.0, rpo_alpha=None, simpo_gamma=1.0)
    params = LossParams.from_config(config)
    assert params == LossParams(loss_types=("ipo",), beta=0.25, simpo_gamma=1.0)
    config = SimpleNamespace(loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5], use_weighting=True, dpop_lambda=2.0)
    params = LossParams.from_config(config)
    assert params.loss_types == ("sigmoid", "sft") and params.loss_weights == (1.0, 0.5)
    assert params.use_weighting and params.dpop_lambda == 2.0 and params.beta == 0.1


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "sft", "orpo", "simpo", "cpo"])
@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_zero_lengths_are_refused_where_a_loss_divides_by_them(name, side):
    inputs = make_sample(71, 2).inputs(reference=name not in REFERENCE_FREE)
    lengths = getattr(inputs, f"{side}_lengths")
    lengths[2] = 0
    if (name, side) in {("sft", "rejected"), ("cpo", "rejected")}:  # they never divide by rejected lengths
        assert torch.isfinite(compute_preference_loss(LossParams((name,)), inputs).per_example).all()
        return
    with pytest.raises(ValueError, match=f"loss '{name}'.*{side}_lengths.*rows \\[2\\]"):
        compute_preference_loss(LossParams((name,)), inputs)


def test_zero_lengths_are_ignored_by_losses_that_do_not_use_them_but_not_by_rpo():
    inputs = make_sample(72, 1, flat=True).inputs()
    inputs.chosen_lengths[0] = 0
    assert torch.isfinite(compute_preference_loss(LossParams(("sigmoid",)), inputs).per_example).all()
    with pytest.raises(ValueError, match="rpo_alpha.*chosen_lengths"):
        compute_preference_loss(LossParams(("sigmoid",), rpo_alpha=1.0), inputs)


def test_missing_inputs_name_the_field():
    sample = make_sample(73, 1, flat=True)
    with pytest.raises(ValueError, match="loss 'sigmoid'.*ref_chosen_logps"):
        compute_preference_loss(LossParams(("sigmoid",)), sample.inputs(reference=False))
    with pytest.raises(ValueError, match="loss 'ipo'.*chosen_lengths"):
        compute_preference_loss(LossParams(("ipo",)), replace(sample.inputs(), chosen_lengths=None))
    with pytest.raises(ValueError, match="use_weighting.*wpo"):
        compute_preference_loss(LossParams(use_weighting=True), replace(sample.inputs(), chosen_wpo_logps=None))
    with pytest.raises(ValueError, match="rejected_lengths must have shape"):
        compute_preference_loss(LossParams(("ipo",)), replace(sample.inputs(), rejected_lengths=torch.ones(8, 2)))


# ====================================================================================== TRL 1.16 as the oracle
@dataclass
class TokenBatch:
    """Per-token completion log-probs (and WPO's log Σ p²) of B pairs, scored identically by TRL and by us."""

    chosen_tokens: list[list[float]]
    rejected_tokens: list[list[float]]
    chosen_sum_sq: list[list[float]]
    rejected_sum_sq: list[list[float]]
    ref_chosen: list[float]
    ref_rejected: list[float]

    @classmethod
    def random(cls, seed: int, rows: int = 5) -> "TokenBatch":
        rng = random.Random(seed)
        tokens = lambda: [-rng.uniform(0.01, 3.0) for _ in range(rng.randint(1, 8))]  # noqa: E731
        chosen, rejected = [tokens() for _ in range(rows)], [tokens() for _ in range(rows)]
        sum_sq = lambda seqs: [[-rng.uniform(0.0, 2.0) for _ in seq] for seq in seqs]  # noqa: E731
        return cls(
            chosen, rejected, sum_sq(chosen), sum_sq(rejected),
            ref_chosen=[sum(seq) + rng.uniform(-3, 3) for seq in chosen],
            ref_rejected=[sum(seq) + rng.uniform(-3, 3) for seq in rejected],
        )  # fmt: skip

    def loss_inputs(self, dtype=torch.float64, *, reference: bool = True) -> LossInputs:
        def wpo(seqs, sum_sq):
            return torch.tensor([sum(a - b for a, b in zip(s, q)) / len(s) for s, q in zip(seqs, sum_sq)], dtype=dtype)

        tensor = lambda values: torch.tensor(values, dtype=dtype)  # noqa: E731
        return LossInputs(
            tensor([sum(s) for s in self.chosen_tokens]), tensor([sum(s) for s in self.rejected_tokens]),
            tensor(self.ref_chosen) if reference else None, tensor(self.ref_rejected) if reference else None,
            torch.tensor([len(s) for s in self.chosen_tokens]), torch.tensor([len(s) for s in self.rejected_tokens]),
            wpo(self.chosen_tokens, self.chosen_sum_sq), wpo(self.rejected_tokens, self.rejected_sum_sq),
        )  # fmt: skip

    def trl_dpo_inputs(self, dtype) -> tuple[dict, "FakeCausalLM"]:
        """TRL's collated layout (rows [chosen..., rejected...], completion right-aligned) and a model whose outputs
        carry exactly these per-token log-probs."""
        sequences = self.chosen_tokens + self.rejected_tokens
        sum_sq = self.chosen_sum_sq + self.rejected_sum_sq
        width = max(map(len, sequences)) + 3  # at least two prompt tokens
        completion_mask = torch.zeros(len(sequences), width, dtype=torch.long)
        log_probs = torch.zeros(len(sequences), width - 1, dtype=dtype)
        log_sum_sq = torch.zeros(len(sequences), width - 1, dtype=dtype)
        for row, (seq, sq) in enumerate(zip(sequences, sum_sq)):
            completion_mask[row, width - len(seq) :] = 1
            log_probs[row, width - 1 - len(seq) :] = torch.tensor(seq, dtype=dtype)  # position t predicts token t + 1
            log_sum_sq[row, width - 1 - len(seq) :] = torch.tensor(sq, dtype=dtype)
        inputs = {
            "input_ids": torch.ones(len(sequences), width, dtype=torch.long),
            "attention_mask": torch.ones(len(sequences), width, dtype=torch.long),
            "completion_mask": completion_mask,
            "ref_chosen_logps": torch.tensor(self.ref_chosen, dtype=dtype),
            "ref_rejected_logps": torch.tensor(self.ref_rejected, dtype=dtype),
        }
        return inputs, FakeCausalLM({1: log_probs}, log_sum_sq)


class FakeCausalLM:
    """Stands in for TRL's patched model: returns the given per-token log-probs for input ids filled with a key."""

    training = True

    def __init__(self, log_probs_by_id: dict[int, torch.Tensor], log_sum_sq: torch.Tensor | None = None):
        self.log_probs_by_id = log_probs_by_id
        self.log_sum_sq = log_sum_sq

    def __call__(self, input_ids, **kwargs):
        log_probs = self.log_probs_by_id[int(input_ids[0, 0])]
        shape = log_probs.shape
        return SimpleNamespace(
            log_probs=log_probs,
            mean_logits=torch.zeros(shape, dtype=log_probs.dtype),
            entropy=torch.zeros(shape, dtype=log_probs.dtype),
            is_top1=torch.zeros(shape, dtype=torch.bool),
            log_sum_sq_probs=self.log_sum_sq if self.log_sum_sq is not None else torch.zeros_like(log_probs),
        )


class IdentityAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(value):
        return value

    gather = gather_for_metrics


def trl_stand_in(model, **attributes) -> SimpleNamespace:
    """The attributes TRL's loss code reads from ``self``, without building a trainer."""
    return SimpleNamespace(
        model=model, accelerator=IdentityAccelerator(), aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, **attributes,
    )  # fmt: skip


def trl_dpo(batch: TokenBatch, params: LossParams, dtype=torch.float64) -> tuple[float, dict]:
    """TRL 1.16's ``DPOTrainer._compute_loss`` on ``batch`` (precomputed reference log-probs), and its metrics."""
    from trl import DPOTrainer

    inputs, model = batch.trl_dpo_inputs(dtype)
    stand_in = trl_stand_in(
        model, ld_alpha=None, precompute_ref_logps=True, beta=params.beta, loss_types=list(params.loss_types),
        loss_weights=list(params.weights), label_smoothing=params.label_smoothing, use_weighting=params.use_weighting,
        f_divergence_type=params.f_divergence_type, f_alpha_divergence_coef=params.f_alpha_divergence_coef,
        args=SimpleNamespace(discopop_tau=params.discopop_tau),
    )  # fmt: skip
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)
    return loss.item(), {key: values[-1] for key, values in stand_in._metrics["train"].items()}


TRL_DPO_CASES = [
    ("sigmoid", {}), ("sigmoid", {"beta": 1.3}), ("hinge", {}), ("ipo", {"beta": 0.5}),
    ("robust", {"label_smoothing": 0.2}), ("exo_pair", {"label_smoothing": 1e-3}),
    ("exo_pair", {"label_smoothing": 0.3}), ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}),
    ("aot", {}), ("aot", {"label_smoothing": 0.15}), ("aot_unpaired", {"label_smoothing": 0.1}),
    ("apo_zero", {}), ("apo_down", {}), ("discopop", {}), ("discopop", {"discopop_tau": 0.5, "beta": 0.8}),
    ("sigmoid_norm", {"beta": 2.0}), ("sft", {}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "options"), TRL_DPO_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_loss_matches_trl_dpo_trainer(name, options):
    options = {"beta": 0.3, **options}
    params = LossParams((name,), **options)
    rel = 1e-6 if name == "exo_pair" else 1e-9  # TRL holds EXO's ε in a float32 tensor
    for seed in range(3):
        batch = TokenBatch.random(seed)
        trl_loss, metrics = trl_dpo(batch, params)
        out = compute_preference_loss(params, batch.loss_inputs())
        assert out.per_example.mean().item() == pytest.approx(trl_loss, rel=rel, abs=1e-10)
        assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-9, abs=1e-10)
        assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence", "alpha_one"])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust", "discopop", "sigmoid_norm"])
def test_f_divergences_match_trl(name, divergence):
    coef = 1.0 if divergence == "alpha_one" else 0.3
    divergence = "alpha_divergence" if divergence == "alpha_one" else divergence
    options = {"label_smoothing": 0.1} if name == "robust" else {}
    params = LossParams((name,), beta=0.4, f_divergence_type=divergence, f_alpha_divergence_coef=coef, **options)
    dtype = torch.float32 if divergence == "alpha_divergence" else torch.float64  # TRL's clamp table lacks float64
    batch = TokenBatch.random(5)
    trl_loss, _ = trl_dpo(batch, params, dtype)
    ours = compute_preference_loss(params, batch.loss_inputs(dtype)).per_example.mean().item()
    assert ours == pytest.approx(trl_loss, rel=1e-5 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize(
    ("names", "weights", "use_weighting"),
    [(("sigmoid", "sft"), (1.0, 0.4), False), (("ipo", "apo_zero", "bco_pair"), (0.5, 2.0, 1.0), False),
     (("sigmoid",), None, True), (("hinge", "nca_pair", "discopop"), (1.0, 0.3, 0.7), True)],
)  # fmt: skip
def test_weighted_combinations_and_wpo_match_trl(names, weights, use_weighting):
    params = LossParams(names, loss_weights=weights, beta=0.3, use_weighting=use_weighting)
    batch = TokenBatch.random(8)
    trl_loss, _ = trl_dpo(batch, params)
    assert compute_preference_loss(params, batch.loss_inputs()).per_example.mean().item() == pytest.approx(trl_loss)


def test_sigmoid_label_smoothing_is_cdpo_where_trl_ignores_it():
    batch = TokenBatch.random(9)
    smoothed_params = LossParams(("sigmoid",), beta=0.3, label_smoothing=0.2)
    trl_loss, _ = trl_dpo(batch, smoothed_params)
    ours = compute_preference_loss(smoothed_params, batch.loss_inputs()).per_example.mean().item()
    assert ours != pytest.approx(trl_loss)
    plain = compute_preference_loss(replace(smoothed_params, label_smoothing=0.0), batch.loss_inputs())
    assert plain.per_example.mean().item() == pytest.approx(trl_loss)


def averaged_float32(batch: TokenBatch) -> tuple[LossInputs, torch.Tensor, torch.Tensor]:
    inputs = batch.loss_inputs(torch.float32, reference=False)
    chosen_avg = inputs.policy_chosen_logps / inputs.chosen_lengths
    rejected_avg = inputs.policy_rejected_logps / inputs.rejected_lengths
    return inputs, chosen_avg, rejected_avg


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_orpo_matches_trl_odds_ratio_loss(beta):
    from trl.experimental.orpo import ORPOTrainer

    inputs, chosen_avg, rejected_avg = averaged_float32(TokenBatch.random(12, rows=6))
    trl_losses, trl_chosen_rewards, trl_rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        trl_stand_in(None, beta=beta), chosen_avg, rejected_avg
    )
    out = compute_preference_loss(LossParams(("orpo",), beta=beta), inputs)
    torch.testing.assert_close(out.per_example - out.nll, -trl_losses)  # TRL returns +β·log σ(log odds ratio)
    torch.testing.assert_close(out.nll, -chosen_avg)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected_rewards)


@pytest.mark.parametrize(("name", "beta", "gamma", "smoothing", "alpha"),
                         [("simpo", 2.0, 0.5, 0.0, 1.0), ("simpo", 2.5, 1.4, 0.1, 0.0),
                          ("cpo", 0.1, 0.5, 0.0, 1.0), ("cpo", 0.5, 0.5, 0.2, 0.3)])  # fmt: skip
def test_simpo_and_cpo_match_trl_cpo_loss(name, beta, gamma, smoothing, alpha):
    from trl.experimental.cpo import CPOTrainer

    inputs, chosen_avg, rejected_avg = averaged_float32(TokenBatch.random(13, rows=6))
    simpo = name == "simpo"
    loss_type = "simpo" if simpo else "sigmoid"
    stand_in = trl_stand_in(
        None, alpha=0.0, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma, loss_type=loss_type
    )
    # TRL's CPO takes length-averaged log-probs for simpo and summed ones for sigmoid (= CPO)
    trl_logps = (chosen_avg, rejected_avg) if simpo else (inputs.policy_chosen_logps, inputs.policy_rejected_logps)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = CPOTrainer.cpo_loss(stand_in, *trl_logps)
    params = LossParams((name,), beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, cpo_alpha=alpha)
    out = compute_preference_loss(params, inputs)
    preference_part = out.per_example if simpo else out.per_example - alpha * out.nll  # TRL adds its NLL outside
    torch.testing.assert_close(preference_part, trl_losses)
    torch.testing.assert_close(out.chosen_rewards, trl_chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, trl_rejected_rewards)


@pytest.mark.parametrize(("kl_shift", "weights"), [(1.5, (1.0, 1.0)), (-2.0, (1.33, 0.8))])
def test_kto_matches_trl_kto_trainer(kl_shift, weights):
    from trl import KTOTrainer

    rng = random.Random(14)
    rows, width = 6, 7
    mask = torch.zeros(rows, width, dtype=torch.long)
    log_probs = torch.zeros(rows, width - 1, dtype=torch.float64)
    kl_log_probs = torch.zeros_like(log_probs)
    for row in range(rows):
        length = rng.randint(1, width - 2)
        mask[row, width - length :] = 1
        log_probs[row, width - 1 - length :] = torch.tensor([-rng.uniform(0.01, 3) for _ in range(length)])
        kl_log_probs[row, width - 1 - length :] = torch.tensor([-rng.uniform(0.01, 3) for _ in range(length)])
    policy, kl_policy = log_probs.sum(1), kl_log_probs.sum(1)
    ref = policy + torch.tensor([rng.uniform(-3, 3) for _ in range(rows)], dtype=torch.float64)
    ref_kl = kl_policy - kl_shift + torch.tensor([rng.uniform(-0.5, 0.5) for _ in range(rows)], dtype=torch.float64)
    labels = torch.tensor([True, False, False, True, True, False])
    ones = torch.ones(rows, width, dtype=torch.long)
    batch = {  # main rows have input ids 1, KL rows 2: FakeCausalLM answers each with its log-probs
        "input_ids": ones, "attention_mask": ones, "completion_mask": mask,
        "KL_input_ids": 2 * ones, "KL_attention_mask": ones, "KL_completion_mask": mask,
        "label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl,
    }  # fmt: skip
    model = FakeCausalLM({1: log_probs, 2: kl_log_probs})
    weight_options = {"desirable_weight": weights[0], "undesirable_weight": weights[1]}
    stand_in = trl_stand_in(
        model, calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.2, **weight_options
    )
    stand_in._compute_kl_logps = KTOTrainer._compute_kl_logps.__get__(stand_in)
    with torch.no_grad():
        trl_loss = KTOTrainer._compute_loss(stand_in, model, batch, return_outputs=False).item()
    ours = kto_loss(policy, ref, kto_kl_estimate(kl_policy - ref_kl), labels, beta=0.2, **weight_options)
    assert ours.mean().item() == pytest.approx(trl_loss, rel=1e-9)
    assert ((kl_policy - ref_kl).mean() > 0) == (kl_shift > 0)  # the second case exercises the clamp at 0
