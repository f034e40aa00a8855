"""Preference losses: pure functions of per-sequence log-probs.

Conventions (TRL's): log-probs are *summed* over completion tokens, in nats; rewards are
``β · (log π(y|x) − log π_ref(y|x))``; every function returns the per-example loss and the caller takes
the mean. No function here knows about models, batches or trainers.

Layout:

* one pure function per loss (``sigmoid_loss``, ``ipo_loss``, ..., ``kto_loss``), each with its formula and paper;
* ``LOSSES``: the registry. Each ``LossSpec`` says which tensors the loss reads (``inputs``, names of
  ``_PairContext`` entries), which ``LossParams`` fields it takes, and what it needs (reference, lengths,
  the whole batch), so callers ask the spec instead of testing names;
* ``compute_preference_loss(params, inputs)``: builds the shared tensors once (log-ratios, f-divergence
  scores, margins), evaluates each requested loss, applies WPO weighting, averages over several negatives,
  sums the weighted losses and adds the RPO NLL term.

Several negatives: ``policy_rejected_logps`` may be ``(B, M)``. Pairwise losses see the chosen side as
``(B, 1)`` and the rejected side as ``(B, M)``, are evaluated on each (chosen, rejected_j) pair and averaged
over j; ``listwise`` uses all M at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import ConfigError


# ------------------------------------------------------------------------------------------------ numeric helpers
def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``−(1 − ε)·log σ(z) − ε·log σ(−z)``: logistic loss with labels flipped with probability ε."""
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of ``−log 2`` (Mächler 2012).

    x is clamped below 0 (a log-prob of exactly 0 happens in low precision) and each branch is evaluated only
    on its own side, so neither value nor gradient becomes infinite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    split = -math.log(2.0)
    far = torch.log1p(-torch.exp(x.clamp(max=split)))
    near = torch.log(-torch.expm1(x.clamp(min=split)))
    return torch.where(x < split, far, near)


# ------------------------------------------------------------------------------ paired losses (with a reference)
def sigmoid_loss(margin: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), with conservative DPO.

    ``margin = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`` (f-divergence scores when set),
    ``h = β·margin``, ``loss = −(1 − ε)·log σ(h) − ε·log σ(−h)``.

    ε = ``label_smoothing`` is cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): the label is
    assumed flipped with probability ε. ε = 0 is plain DPO. (TRL 1.16's ``sigmoid`` ignores ε.)
    """
    return _smoothed_logistic(beta * margin, label_smoothing)


def robust_loss(margin: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", eq. 6).

    ``h = β·margin``, ``loss = [−(1 − ε)·log σ(h) + ε·log σ(−h)] / (1 − 2ε)``, ε < 1/2: an unbiased
    estimate of the clean-label loss when labels are flipped with probability ε.
    """
    logits = beta * margin
    return (-(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1.0 - 2.0 * label_smoothing
    )


def hinge_loss(margin: Tensor, *, beta: float) -> Tensor:
    """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF"), in DPO's parametrisation.

    ``loss = max(0, 1 − β·margin)``
    """
    return torch.relu(1.0 - beta * margin)


def ipo_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float
) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17).

    ``h = (log π(y_w) − log π_ref(y_w)) / |y_w| − (log π(y_l) − log π_ref(y_l)) / |y_l|``,
    ``loss = (h − 1/(2β))²``.

    The log-ratios are divided by the number of completion tokens (length-normalised), as TRL does and as
    the IPO authors confirmed matches the paper's results; β plays the role of τ.
    """
    return (chosen_scores / chosen_lengths - rejected_scores / rejected_lengths - 1.0 / (2.0 * beta)) ** 2


def exo_pair_loss(margin: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16, K = 2).

    ``KL(q ‖ p)`` between the policy's pair distribution ``q = (σ(h), σ(−h))``, ``h = β·margin``, and the
    smoothed label ``p = (1 − ε, ε)``:
    ``loss = σ(h)·(log σ(h) − log(1 − ε)) + σ(−h)·(log σ(−h) − log ε)``, 0 < ε < 1 (the paper uses 1e-3).
    """
    logits = beta * margin
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-label_smoothing))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(label_smoothing))
    return chosen_term + rejected_term


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", pairwise).

    ``r = β·(log π − log π_ref)``, ``loss = −log σ(r_w) − ½·log σ(−r_w) − ½·log σ(−r_l)``:
    absolute rewards, so the chosen likelihood is not pushed down with the rejected one.
    """
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment").

    ``r = β·(log π − log π_ref)``, ``loss = −log σ(r_w) − log σ(−r_l)``: a binary classifier with chosen as
    positive and rejected as negative (TRL's ``bco_pair``, without the running reward shift δ).
    """
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SPPO, hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.7).

    With the win probability set to 1 for the chosen and 0 for the rejected:
    ``loss = (log π(y_w)/π_ref(y_w) − 1/(2β))² + (log π(y_l)/π_ref(y_l) + 1/(2β))²``.
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def aot_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport").

    Batch-level: sort ``ρ = log π(y_w) − log π(y_l)`` and ``ρ_ref`` over the batch (dim 0) independently,
    ``h = β·(sort(ρ) − sort(ρ_ref))``, ``loss = −(1 − ε)·log σ(h) − ε·log σ(−h)``: first-order stochastic
    dominance of the policy's margins over the reference's. Row i of the result belongs to the i-th
    quantile, not to pair i.
    """
    policy_margins, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
    ref_margins, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return _smoothed_logistic(beta * (policy_margins - ref_margins), label_smoothing)


def aot_unpaired_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport").

    Batch-level: sort the chosen and the rejected log-ratios over the batch (dim 0) independently,
    ``h = β·(sort(log π/π_ref)(y_w) − sort(log π/π_ref)(y_l))``, ``loss = −(1 − ε)·log σ(h) − ε·log σ(−h)``.
    """
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 7).

    ``loss = 1 − σ(β·log π/π_ref(y_w)) + σ(β·log π/π_ref(y_l))``: raise the chosen, lower the rejected
    (for chosen outputs better than the model's own).
    """
    return 1.0 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)


def apo_down_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 8).

    ``loss = σ(β·log π/π_ref(y_w)) + 1 − σ(β·(log π/π_ref(y_w) − log π/π_ref(y_l)))``: lower both, the
    rejected more (for chosen outputs worse than the model's own).
    """
    return torch.sigmoid(beta * chosen_logratios) + 1.0 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))


def discopop_loss(margin: Tensor, *, beta: float, discopop_tau: float) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Lu et al. 2024, "Discovering Preference Optimization Algorithms
    with and for Large Language Models", eq. 5).

    ``h = β·margin``, ``m = σ(h/τ)``, ``loss = (1 − m)·(−log σ(h)) + m·exp(−h)``.

    ``m·exp(−h)`` is evaluated as ``exp(log σ(h/τ) − h)`` so that it is 0, not ``0·∞``, for very negative h.
    """
    logits = beta * margin
    modulation = torch.sigmoid(logits / discopop_tau)
    exponential = torch.exp(F.logsigmoid(logits / discopop_tau) - logits)
    return (1.0 - modulation) * -F.logsigmoid(logits) + exponential


def sigmoid_norm_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float
) -> Tensor:
    """Length-normalised DPO (TRL ``sigmoid_norm``; "dpo_norm" of Lambert et al. 2024, "Tülu 3", eq. 5).

    ``h = β·[(log π(y_w) − log π_ref(y_w)) / |y_w| − (log π(y_l) − log π_ref(y_l)) / |y_l|]``,
    ``loss = −log σ(h)``.
    """
    return -F.logsigmoid(beta * (chosen_scores / chosen_lengths - rejected_scores / rejected_lengths))


def sft_loss(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Supervised NLL of the chosen completions, token mean over the whole batch (as TRL's ``sft`` loss type).

    ``loss = −Σ_b log π(y_w,b) / Σ_b |y_w,b|``, the same value for every example (batch-level).
    """
    return (-chosen_logps.sum() / chosen_lengths.sum()).expand_as(chosen_logps)


def listwise_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """Listwise / InfoNCE DPO: Plackett–Luce top-1 likelihood of the chosen among M + 1 candidates
    (Rafailov et al. 2023, "Direct Preference Optimization", App. A.3, K > 2, top-1 term; Oord et al. 2018 InfoNCE).

    ``r = β·(log π − log π_ref)``, ``loss = −log softmax([r_w, r_l,1, ..., r_l,M])_w``. Equals ``sigmoid`` when M = 1.
    Takes ``(B, 1)`` chosen and ``(B, M)`` rejected; returns ``(B,)``.
    """
    rewards = beta * torch.cat([chosen_logratios, rejected_logratios], dim=1)
    return -torch.log_softmax(rewards, dim=1)[:, 0]


# --------------------------------------------------------------------------------------- reference-free losses
def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float) -> Tensor:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 6-7).

    On length-averaged log-probs ``ℓ = log π(y|x) / |y|``: ``log odds(y) = ℓ − log(1 − exp ℓ)``,
    ``loss = −ℓ_w − λ·log σ(log odds(y_w) − log odds(y_l))`` with λ = β. The NLL term is the per-example
    token average (LLaMA-Factory); TRL's ORPOTrainer uses the batch token mean instead.
    """
    log_odds = (chosen_avg_logps - _log1mexp(chosen_avg_logps)) - (rejected_avg_logps - _log1mexp(rejected_avg_logps))
    return -chosen_avg_logps - beta * F.logsigmoid(log_odds)


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6).

    On length-averaged log-probs: ``h = β·(ℓ_w − ℓ_l) − γ``, ``loss = −(1 − ε)·log σ(h) − ε·log σ(−h)``
    (label smoothing as TRL's CPO ``simpo``; TRL writes γ as ``β·gamma_beta_ratio``). No NLL term.
    """
    return _smoothed_logistic(beta * (chosen_avg_logps - rejected_avg_logps) - simpo_gamma, label_smoothing)


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_avg_logps: Tensor,
    *,
    beta: float,
    cpo_alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance
    in Machine Translation", eq. 3 + the NLL term of §3).

    On summed log-probs: ``h = β·(log π(y_w) − log π(y_l))``,
    ``loss = −(1 − ε)·log σ(h) − ε·log σ(−h) + α·(−log π(y_w) / |y_w|)``, α = ``cpo_alpha``.
    """
    return _smoothed_logistic(beta * (chosen_logps - rejected_logps), label_smoothing) - cpo_alpha * chosen_avg_logps


# --------------------------------------------------------------------------------------------- unpaired losses
def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    kl: Tensor,
    labels: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eqs. 7-8).

    ``r = log π(y|x) − log π_ref(y|x)``; desirable (``labels`` True): ``w_d·(1 − σ(β·(r − z)))``; undesirable:
    ``w_u·(1 − σ(β·(z − r)))``, with ``kl`` the reference point ``z`` (``kto_kl_estimate``, no gradient).

    ``policy_logps``, ``ref_logps``, ``labels``: ``(B,)`` (summed log-probs); returns ``(B,)``, one loss per example
    in input order (TRL's micro-batch loss is their mean).
    """
    logratios = policy_logps - ref_logps
    kl = kl.detach()
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels.bool(), desirable, undesirable)


def kto_kl_estimate(kl_logratios: Tensor) -> Tensor:
    """KTO's reference point ``z = max(0, mean(kl_logratios))``, 0-dim and detached.

    ``kl_logratios``: ``log π(y'|x) − log π_ref(y'|x)`` of a micro-batch's mismatched pairs (x, y'), or, with several
    processes, each process's mean of them (TRL and LLaMA-Factory average the per-process means, then clamp).
    """
    return kl_logratios.detach().mean().clamp(min=0)


def kto_sft_loss(avg_logps: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """LLaMA-Factory's SFT term for KTO (``pref_ftx`` = α), per row, to add to ``kto_loss``'s per-row losses.

    LLaMA-Factory adds ``α·mean_d(−log π(y|x)/|y|)·B/n_d`` to a micro-batch's mean KTO loss (mean over its n_d
    desirable rows, B rows in all; nothing when n_d = 0). As a per-row term, whose mean over the B rows is that:
    ``α·(B/n_d)²·(−log π(y|x)/|y|)`` on desirable rows, 0 on the others. At batch size 1, or when every row is
    desirable, this is ``α·(−log π(y|x)/|y|)`` on each desirable row.

    ``avg_logps``: ``(B,)`` length-averaged log-probs (with gradients); ``labels``: ``(B,)`` bool.
    """
    desirable = labels.bool()
    count = int(desirable.sum())
    if count == 0:
        return torch.zeros_like(avg_logps)
    scale = alpha * (desirable.numel() / count) ** 2
    return torch.where(desirable, -scale * avg_logps, torch.zeros_like(avg_logps))


# ------------------------------------------------------------------------------------------------- f-divergences
def _alpha_divergence_scores(logratios: Tensor, alpha: float) -> Tensor:
    """``f'(t) = (t^(α−1) − 1)/(α − 1)`` at ``t = π/π_ref``; the exponent is clamped at 80 (11 in float16), as TRL."""
    if abs(alpha - 1.0) < 1e-6:  # the α → 1 limit is log t: reverse KL
        return logratios
    exponent = (alpha - 1.0) * logratios
    dtype = exponent.dtype
    compute_dtype = torch.promote_types(dtype, torch.float32)
    exponent = exponent.to(compute_dtype).clamp(max=11.0 if dtype == torch.float16 else 80.0)
    return (torch.exp(exponent) - 1.0).to(dtype) / (alpha - 1.0)


# f-DPO (Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
# Divergence Constraints", Table 1): the log-ratio log t is replaced by f'(t) before the loss.
F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda logratios, alpha: logratios,  # f'(t) = log t + 1 (the constant cancels)
    "forward_kl": lambda logratios, alpha: _alpha_divergence_scores(logratios, 0.0),  # f'(t) = 1 − 1/t
    "js_divergence": lambda logratios, alpha: math.log(2.0) + F.logsigmoid(logratios),  # log(2t/(1+t))
    "alpha_divergence": _alpha_divergence_scores,
}


# ----------------------------------------------------------------------------------------------------- registry
# Entries of _PairContext (see _BUILDERS) that a loss may read, grouped by what they need.
_REFERENCE_INPUTS = frozenset(
    {"ref_chosen_logps", "ref_rejected_logps", "chosen_logratios", "rejected_logratios",
     "chosen_scores", "rejected_scores", "margin", "dpop_margin"}
)  # fmt: skip
_LENGTH_INPUTS = frozenset({"chosen_lengths", "rejected_lengths", "chosen_avg_logps", "rejected_avg_logps"})


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: how to call it and what it needs.

    Attributes:
        fn: the pure loss function; called as ``fn(*[context[i] for i in inputs], **{p: params.p for p in params})``.
        inputs: names of the tensors it reads (``_PairContext`` entries); ``dpop_margin`` means DPOP applies.
        params: ``LossParams`` fields it takes as keywords; ``label_smoothing`` among them means it uses ε.
        kind: ``pairwise`` (returns ``(B, M)``, averaged over the M negatives), ``listwise`` (returns ``(B,)``)
            or ``unpaired`` (KTO: called through ``kto_loss``, not ``compute_preference_loss``).
        reference_free: a loss without reference that must not be mixed with reference losses.
        batch_level: the value of one example depends on the other examples of the batch (sorting, batch means).
        f_divergence: defined for ``f_divergence_type`` other than ``reverse_kl`` (TRL's list).
        weightable: WPO weighting is defined for it.
        has_nll: the loss contains an NLL term on the chosen completion (reported as ``LossOutput.nll``).
        reward_source: reference-free losses: the log-probs (``logps`` or ``avg_logps``) whose β-multiple is
            the logged reward.
    """

    name: str
    needs_reference: bool
    needs_lengths: bool
    fn: Callable[..., Tensor]
    inputs: tuple[str, ...] = ()
    params: tuple[str, ...] = ("beta",)
    kind: str = "pairwise"
    reference_free: bool = False
    batch_level: bool = False
    f_divergence: bool = False
    weightable: bool = True
    has_nll: bool = False
    reward_source: str | None = None

    @property
    def uses_label_smoothing(self) -> bool:
        return "label_smoothing" in self.params

    @property
    def supports_dpop(self) -> bool:
        return "dpop_margin" in self.inputs


def _spec(name: str, fn: Callable[..., Tensor], inputs: tuple[str, ...], **options: Any) -> LossSpec:
    """A LossSpec whose ``needs_reference``/``needs_lengths`` follow from the tensors it reads."""
    return LossSpec(
        name,
        needs_reference=not _REFERENCE_INPUTS.isdisjoint(inputs),
        needs_lengths=not _LENGTH_INPUTS.isdisjoint(inputs),
        fn=fn,
        inputs=inputs,
        **options,
    )


_SMOOTHED = ("beta", "label_smoothing")
_SCORES_AND_LENGTHS = ("chosen_scores", "rejected_scores", "chosen_lengths", "rejected_lengths")
_LOGRATIOS = ("chosen_logratios", "rejected_logratios")

LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        _spec("sigmoid", sigmoid_loss, ("dpop_margin",), params=_SMOOTHED, f_divergence=True),
        _spec("robust", robust_loss, ("dpop_margin",), params=_SMOOTHED, f_divergence=True),
        _spec("hinge", hinge_loss, ("margin",), f_divergence=True),
        _spec("ipo", ipo_loss, _SCORES_AND_LENGTHS, f_divergence=True),
        _spec("exo_pair", exo_pair_loss, ("dpop_margin",), params=_SMOOTHED, f_divergence=True),
        _spec("nca_pair", nca_pair_loss, _LOGRATIOS),
        _spec("bco_pair", bco_pair_loss, _LOGRATIOS),
        _spec("sppo_hard", sppo_hard_loss, _LOGRATIOS),
        _spec(
            "aot", aot_loss, ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"),
            params=_SMOOTHED, batch_level=True, weightable=False,
        ),
        _spec("aot_unpaired", aot_unpaired_loss, _LOGRATIOS, params=_SMOOTHED, batch_level=True, weightable=False),
        _spec("apo_zero", apo_zero_loss, _LOGRATIOS),
        _spec("apo_down", apo_down_loss, _LOGRATIOS),
        _spec("discopop", discopop_loss, ("dpop_margin",), params=("beta", "discopop_tau"), f_divergence=True),
        _spec("sigmoid_norm", sigmoid_norm_loss, _SCORES_AND_LENGTHS, f_divergence=True),
        _spec("sft", sft_loss, ("chosen_logps", "chosen_lengths"), params=(), batch_level=True, f_divergence=True),
        _spec("listwise", listwise_loss, _LOGRATIOS, kind="listwise", weightable=False),
        _spec(
            "orpo", orpo_loss, ("chosen_avg_logps", "rejected_avg_logps"),
            reference_free=True, has_nll=True, reward_source="avg_logps",
        ),
        _spec(
            "simpo", simpo_loss, ("chosen_avg_logps", "rejected_avg_logps"),
            params=("beta", "simpo_gamma", "label_smoothing"), reference_free=True, reward_source="avg_logps",
        ),
        _spec(
            "cpo", cpo_loss, ("chosen_logps", "rejected_logps", "chosen_avg_logps"),
            params=("beta", "cpo_alpha", "label_smoothing"), reference_free=True, has_nll=True, reward_source="logps",
        ),
        LossSpec(
            "kto", needs_reference=True, needs_lengths=False, fn=kto_loss, kind="unpaired", weightable=False,
            params=("beta", "desirable_weight", "undesirable_weight"),
        ),
    )
}  # fmt: skip


def get_loss_spec(loss_type: str) -> LossSpec:
    """The registered loss called ``loss_type``; a ConfigError listing the valid names otherwise."""
    try:
        return LOSSES[loss_type]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown loss '{loss_type}'; expected one of {sorted(LOSSES)}", key="loss_type") from None


# ------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class LossParams:
    """Which losses to combine and their hyper-parameters (names as TRL's / preftune's config keys).

    ``loss_types`` with several names gives ``Σ_k w_k·loss_k`` (``loss_weights``, default all 1).
    ``rpo_alpha`` adds ``α·(−log π(y_w)/|y_w|)`` per example (RPO, Pang et al. 2024; LLaMA-Factory ``pref_ftx``);
    with kto, LLaMA-Factory's SFT term on desirable rows (``kto_sft_loss``).
    ``dpop_lambda`` subtracts the DPOP penalty from the margin inside sigmoid, robust, exo_pair and discopop
    (the losses reading ``dpop_margin``; others refuse it). ``use_weighting`` multiplies each pair's loss by
    its WPO weight. ``desirable_weight``/``undesirable_weight`` are KTO's.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    rpo_alpha: float | None = None
    dpop_lambda: float | None = None
    use_weighting: bool = False
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        # Accept a single name or a list (as configs write them); keep the dataclass hashable.
        loss_types = (self.loss_types,) if isinstance(self.loss_types, str) else tuple(self.loss_types)
        object.__setattr__(self, "loss_types", loss_types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(weight) for weight in self.loss_weights))

    @classmethod
    def from_config(cls, config: Any) -> "LossParams":
        """Read the fields from ``config`` attributes of the same names (``loss_type`` for ``loss_types``, a str or
        a list of str); a missing attribute keeps its default."""
        defaults = cls()
        values = {f.name: getattr(config, f.name, getattr(defaults, f.name)) for f in fields(cls)}
        values["loss_types"] = getattr(config, "loss_type", defaults.loss_types)
        return cls(**values)

    @property
    def specs(self) -> tuple[LossSpec, ...]:
        return tuple(get_loss_spec(name) for name in self.loss_types)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_reference(self) -> bool:
        return any(spec.needs_reference for spec in self.specs)

    @property
    def is_unpaired(self) -> bool:
        return self.loss_types == ("kto",)

    def validate(self) -> None:
        """Raise ConfigError, naming the key, for any combination that is not well defined. The checks run once per
        instance (the instance is frozen): the loss entry point calls this on every micro-batch."""
        if self.__dict__.get("_valid"):
            return
        self._validate_loss_types()
        specs = self.specs
        self._validate_scalars()
        self._validate_label_smoothing(specs)
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ConfigError(
                f"unknown f_divergence_type '{self.f_divergence_type}'; expected one of {sorted(F_DIVERGENCES)}",
                key="f_divergence_type",
            )
        if self.f_divergence_type != "reverse_kl" and not all(spec.f_divergence for spec in specs):
            allowed = sorted(name for name, spec in LOSSES.items() if spec.f_divergence)
            message = f"f_divergence_type '{self.f_divergence_type}' is only defined for losses {allowed}"
            raise ConfigError(message, key="f_divergence_type")
        if self.use_weighting and not all(spec.weightable for spec in specs):
            unweightable = [spec.name for spec in specs if not spec.weightable]
            raise ConfigError(f"WPO weighting is not defined for {unweightable}", key="use_weighting")
        if self.dpop_lambda is not None and not all(spec.supports_dpop for spec in specs):
            allowed = sorted(name for name, spec in LOSSES.items() if spec.supports_dpop)
            raise ConfigError(f"the DPOP penalty applies only to losses {allowed}", key="dpop_lambda")
        object.__setattr__(self, "_valid", True)  # not a field: equality, hashing and repr ignore it

    def _validate_loss_types(self) -> None:
        if not self.loss_types:
            raise ConfigError(f"no loss given; expected one or more of {sorted(LOSSES)}", key="loss_type")
        specs = self.specs  # unknown names raise here
        if len(set(self.loss_types)) != len(self.loss_types):
            raise ConfigError(f"a loss is listed twice in {list(self.loss_types)}", key="loss_type")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_types):
            raise ConfigError(
                f"{len(self.loss_weights)} loss_weights for {len(self.loss_types)} loss types {list(self.loss_types)}",
                key="loss_weights",
            )
        if "kto" in self.loss_types and len(self.loss_types) > 1:
            raise ConfigError("kto is unpaired and cannot be combined with paired losses", key="loss_type")
        reference_free = [spec.name for spec in specs if spec.reference_free]
        with_reference = [spec.name for spec in specs if spec.needs_reference]
        if reference_free and with_reference:
            raise ConfigError(
                f"reference-free losses {reference_free} cannot be mixed with reference losses {with_reference}",
                key="loss_type",
            )

    def _validate_scalars(self) -> None:
        positive = {
            "beta": self.beta,
            "discopop_tau": self.discopop_tau,
            "desirable_weight": self.desirable_weight,
            "undesirable_weight": self.undesirable_weight,
        }
        non_negative = {"cpo_alpha": self.cpo_alpha, "rpo_alpha": self.rpo_alpha, "dpop_lambda": self.dpop_lambda}
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a finite number > 0, got {value}", key=key)
        for key, value in non_negative.items():
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"must be a finite number >= 0, got {value}", key=key)
        if not all(math.isfinite(weight) for weight in self.weights):
            raise ConfigError(f"must be finite numbers, got {list(self.weights)}", key="loss_weights")
        if not math.isfinite(self.f_alpha_divergence_coef):
            raise ConfigError(f"must be finite, got {self.f_alpha_divergence_coef}", key="f_alpha_divergence_coef")

    def _validate_label_smoothing(self, specs: tuple[LossSpec, ...]) -> None:
        epsilon = self.label_smoothing
        if not 0.0 <= epsilon < 1.0:
            raise ConfigError(f"must be in [0, 1), got {epsilon}", key="label_smoothing")
        if epsilon and not any(spec.uses_label_smoothing for spec in specs):
            users = sorted(name for name, spec in LOSSES.items() if spec.uses_label_smoothing)
            message = f"label_smoothing is only used by losses {users}, not {list(self.loss_types)}"
            raise ConfigError(message, key="label_smoothing")
        if "exo_pair" in self.loss_types and epsilon == 0.0:
            message = "exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3)"
            raise ConfigError(message, key="label_smoothing")
        if "robust" in self.loss_types and epsilon >= 0.5:
            raise ConfigError(f"robust needs label_smoothing < 0.5, got {epsilon}", key="label_smoothing")


# ---------------------------------------------------------------------------------------------- inputs/outputs
@dataclass
class LossInputs:
    """Per-sequence quantities of a batch of preference pairs (log-probs summed over completion tokens, nats).

    ``policy_chosen_logps`` is ``(B,)``; the rejected side is ``(B,)`` or ``(B, M)`` for M negatives per prompt.
    Reference log-probs are None for reference-free losses; lengths are completion token counts; the WPO
    inputs are the detached per-sequence means of ``log p_t − log Σ_v p_v²`` (WPO eq. 2).
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    chosen_wpo_logps: Tensor | None = None
    rejected_wpo_logps: Tensor | None = None


@dataclass
class LossOutput:
    """Result of ``compute_preference_loss``.

    Attributes:
        per_example: ``(B,)`` total loss per example; the caller averages or sums over pairs.
        components: ``(B,)`` per loss type before its ``loss_weights`` factor (WPO-weighted, averaged over
            negatives) when several loss types are combined, else empty.
        nll: ``(B,)`` detached per-example length-averaged NLL of the chosen completion when an NLL term is
            on (``rpo_alpha``, ``orpo``, ``cpo``), else None.
        chosen_rewards, rejected_rewards: detached ``β·(log π − log π_ref)`` (reference-free losses:
            ``β·log π`` of what the loss uses); shapes of the policy log-probs.
    """

    per_example: Tensor
    components: dict[str, Tensor]
    nll: Tensor | None
    chosen_rewards: Tensor
    rejected_rewards: Tensor


# ------------------------------------------------------------------------------------------ shared pair tensors
class _PairContext:
    """The tensors losses read, built on first use from ``LossInputs``: chosen side ``(B, 1)``, rejected ``(B, M)``.

    A missing source or a non-positive length raises ValueError naming the ``LossInputs`` field.
    """

    def __init__(self, inputs: LossInputs, params: LossParams) -> None:
        self.inputs = inputs
        self.params = params
        self._values: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._values:
            self._values[name] = _BUILDERS[name](self)
        return self._values[name]

    def source(self, field: str) -> Tensor:
        """``LossInputs.<field>`` as a matrix: ``(B,)`` becomes ``(B, 1)``, ``(B, M)`` stays."""
        value = getattr(self.inputs, field)
        if value is None:
            raise ValueError(f"{field} is required but was not given")
        return value.unsqueeze(1) if value.dim() == 1 else value

    def lengths(self, field: str) -> Tensor:
        """Completion lengths as floats, refusing non-positive ones (they would divide by zero)."""
        lengths = self.source(field)
        if not bool((lengths > 0).all()):
            rows = sorted({index[0] for index in (lengths <= 0).nonzero().tolist()})
            raise ValueError(f"{field} must be >= 1 for a length-normalised loss; rows {rows} have none")
        return lengths.to(self.inputs.policy_chosen_logps.dtype)


def _scores(context: _PairContext, side: str) -> Tensor:
    transform = F_DIVERGENCES[context.params.f_divergence_type]
    return transform(context[f"{side}_logratios"], context.params.f_alpha_divergence_coef)


def _dpop_margin(context: _PairContext) -> Tensor:
    """DPOP (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive", eq. 3):
    ``margin − λ·max(0, log π_ref(y_w) − log π(y_w))``, so that ``h = β·(that)`` in sigmoid, robust, exo_pair
    and discopop; it penalises lowering the chosen likelihood below the reference's."""
    if context.params.dpop_lambda is None:
        return context["margin"]
    penalty = torch.relu(context["ref_chosen_logps"] - context["chosen_logps"])
    return context["margin"] - context.params.dpop_lambda * penalty


_BUILDERS: dict[str, Callable[[_PairContext], Tensor]] = {
    "chosen_logps": lambda c: c.source("policy_chosen_logps"),
    "rejected_logps": lambda c: c.source("policy_rejected_logps"),
    "ref_chosen_logps": lambda c: c.source("ref_chosen_logps"),
    "ref_rejected_logps": lambda c: c.source("ref_rejected_logps"),
    "chosen_lengths": lambda c: c.lengths("chosen_lengths"),
    "rejected_lengths": lambda c: c.lengths("rejected_lengths"),
    "chosen_logratios": lambda c: c["chosen_logps"] - c["ref_chosen_logps"],
    "rejected_logratios": lambda c: c["rejected_logps"] - c["ref_rejected_logps"],
    "chosen_avg_logps": lambda c: c["chosen_logps"] / c["chosen_lengths"],
    "rejected_avg_logps": lambda c: c["rejected_logps"] / c["rejected_lengths"],
    "chosen_scores": lambda c: _scores(c, "chosen"),
    "rejected_scores": lambda c: _scores(c, "rejected"),
    "margin": lambda c: c["chosen_scores"] - c["rejected_scores"],
    "dpop_margin": _dpop_margin,
}


def _check_shapes(inputs: LossInputs) -> None:
    chosen, rejected = inputs.policy_chosen_logps, inputs.policy_rejected_logps
    if chosen.dim() != 1 or rejected.dim() not in (1, 2) or rejected.shape[0] != chosen.shape[0]:
        raise ValueError(
            f"policy_chosen_logps must be (B,) and policy_rejected_logps (B,) or (B, M); "
            f"got {tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    for field in fields(LossInputs):
        value = getattr(inputs, field.name)
        expected = chosen.shape if field.name.startswith(("policy_chosen", "ref_chosen", "chosen")) else rejected.shape
        if value is not None and value.shape != expected:
            raise ValueError(f"{field.name} must have shape {tuple(expected)}, got {tuple(value.shape)}")


# --------------------------------------------------------------------------------------------------- dispatch
def _wpo_weights(inputs: LossInputs) -> Tensor:
    """WPO (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", eq. 2):
    ``w = exp(ℓ̄_w)·exp(ℓ̄_l)``, ℓ̄ the mean over completion tokens of ``log p_t − log Σ_v p_v²``; ``(B, M)``."""
    if inputs.chosen_wpo_logps is None or inputs.rejected_wpo_logps is None:
        raise ValueError("use_weighting needs chosen_wpo_logps and rejected_wpo_logps")
    rejected = inputs.rejected_wpo_logps.detach()
    rejected = rejected.unsqueeze(1) if rejected.dim() == 1 else rejected
    return torch.exp(inputs.chosen_wpo_logps.detach().unsqueeze(1) + rejected)


def _bound_call(spec: LossSpec, context: _PairContext, params: LossParams) -> Tensor:
    """``spec.fn`` on the tensors and parameters its spec names."""
    try:
        tensors = [context[name] for name in spec.inputs]
    except ValueError as error:
        raise ValueError(f"loss '{spec.name}': {error}") from None
    return spec.fn(*tensors, **{name: getattr(params, name) for name in spec.params})


def _component(spec: LossSpec, context: _PairContext, params: LossParams, weights: Tensor | None) -> Tensor:
    """One loss type's ``(B,)`` value: pairwise losses are WPO-weighted per pair, then averaged over negatives."""
    loss = _bound_call(spec, context, params)
    if spec.kind == "listwise":
        return loss
    loss = torch.broadcast_to(loss, context["rejected_logps"].shape)
    if weights is not None:
        loss = loss * weights
    return loss.mean(dim=1)


def _rewards(params: LossParams, context: _PairContext, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    source = next((spec.reward_source for spec in params.specs if spec.reference_free), None)
    if source is None:
        has_reference = inputs.ref_chosen_logps is not None and inputs.ref_rejected_logps is not None
        source = "logratios" if has_reference else "logps"
    with torch.no_grad():
        chosen = params.beta * context[f"chosen_{source}"].squeeze(1)
        rejected = params.beta * context[f"rejected_{source}"].reshape(inputs.policy_rejected_logps.shape)
    return chosen, rejected


def _chosen_nll(context: _PairContext, reason: str) -> Tensor:
    """``−log π(y_w) / |y_w|``, ``(B,)``."""
    try:
        return -context["chosen_avg_logps"].squeeze(1)
    except ValueError as error:
        raise ValueError(f"{reason}: {error}") from None


def compute_preference_loss(params: LossParams, inputs: LossInputs) -> LossOutput:
    """The per-example loss of ``params.loss_types`` on ``inputs``, with components, NLL and rewards.

    ``per_example = Σ_k w_k · mean_j(wpo_j · loss_k(chosen, rejected_j)) + rpo_alpha · NLL_avg(chosen)``.
    Raises ConfigError for invalid params and ValueError for missing or malformed inputs (including
    non-positive lengths where a loss divides by them). KTO is unpaired: use ``kto_loss``.
    """
    params.validate()
    if params.is_unpaired:
        raise ValueError("kto is unpaired: compute it with kto_loss(...)")
    _check_shapes(inputs)
    context = _PairContext(inputs, params)
    weights = _wpo_weights(inputs) if params.use_weighting else None
    components = {spec.name: _component(spec, context, params, weights) for spec in params.specs}
    per_example = sum(weight * components[name] for name, weight in zip(params.loss_types, params.weights))
    nll = None
    if params.rpo_alpha is not None:
        nll = _chosen_nll(context, "rpo_alpha")
        per_example = per_example + params.rpo_alpha * nll
    elif any(spec.has_nll for spec in params.specs):
        nll = _chosen_nll(context, "nll")
    chosen_rewards, rejected_rewards = _rewards(params, context, inputs)
    return LossOutput(
        per_example=per_example,
        components=components if len(components) > 1 else {},
        nll=nll.detach() if nll is not None else None,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )


def preference_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **params: Any,
) -> Tensor:
    """Per-example loss ``(B,)`` of one registered paired loss; a shortcut for ``compute_preference_loss``.

    Args:
        loss_type: a name registered in ``LOSSES``.
        policy_chosen_logps, policy_rejected_logps: log π(y|x) summed over completion tokens (nats).
        ref_chosen_logps, ref_rejected_logps: the same under the reference; required when the loss needs one.
        beta: the KL-regularisation strength β (τ for IPO, λ for ORPO).
        label_smoothing: ε, for the losses that use it.
        chosen_lengths, rejected_lengths: completion token counts, required by length-normalised losses.
        params: further ``LossParams`` fields (``simpo_gamma=``, ``f_divergence_type=``, ...).
    """
    loss_params = LossParams(loss_types=(loss_type,), beta=beta, label_smoothing=label_smoothing, **params)
    inputs = LossInputs(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    return compute_preference_loss(loss_params, inputs).per_example
