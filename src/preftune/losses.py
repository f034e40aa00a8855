"""Preference losses: pure functions of per-sequence log-probs.

Conventions (TRL's): log-probs are *summed* over completion tokens, in nats; rewards are
``β · (log π(y|x) − log π_ref(y|x))``; every function returns the per-example loss, shape ``(B,)``,
and the caller takes the mean. No function here knows about models, batches or trainers.

Each loss declares whether it needs a reference model (``LossSpec.needs_reference``) so the
trainer can skip the reference pass for reference-free losses instead of special-casing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import ConfigError


def sigmoid_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7), with conservative DPO.

    ``h = β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]``
    ``loss = −(1 − ε)·log σ(h) − ε·log σ(−h)``

    ε = ``label_smoothing`` is cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): the
    label is assumed flipped with probability ε. ε = 0 is plain DPO.
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, *, beta: float) -> Tensor:
    """SLiC hinge loss (Zhao et al. 2023, "SLiC-HF"), in DPO's parametrisation.

    ``loss = max(0, 1 − β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])``
    """
    return torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", eq. 17).

    ``h = (log π(y_w) − log π_ref(y_w)) / |y_w| − (log π(y_l) − log π_ref(y_l)) / |y_l|``
    ``loss = (h − 1/(2β))²``

    The log-ratios are divided by the number of completion tokens (length-normalised), as TRL does
    and as the IPO authors confirmed matches the paper's results; β plays the role of τ.
    """
    chosen_avg = chosen_logratios / chosen_lengths.clamp(min=1).to(chosen_logratios.dtype)
    rejected_avg = rejected_logratios / rejected_lengths.clamp(min=1).to(rejected_logratios.dtype)
    return (chosen_avg - rejected_avg - 1.0 / (2.0 * beta)) ** 2


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: how to call it and what it needs."""

    name: str
    needs_reference: bool
    needs_lengths: bool
    fn: Callable[..., Tensor]


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec("sigmoid", needs_reference=True, needs_lengths=False, fn=sigmoid_loss),
    "hinge": LossSpec("hinge", needs_reference=True, needs_lengths=False, fn=hinge_loss),
    "ipo": LossSpec("ipo", needs_reference=True, needs_lengths=True, fn=ipo_loss),
}


def get_loss_spec(loss_type: str) -> LossSpec:
    """The registered loss called ``loss_type``; a ConfigError listing the valid names otherwise."""
    try:
        return LOSSES[loss_type]
    except KeyError:
        raise ConfigError(f"unknown loss '{loss_type}'; expected one of {sorted(LOSSES)}", key="loss_type") from None


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
    **params: float,
) -> Tensor:
    """Per-example preference loss, shape ``(B,)``, for summed completion log-probs of shape ``(B,)``.

    Args:
        loss_type: a name registered in ``LOSSES``.
        policy_chosen_logps, policy_rejected_logps: log π(y|x) summed over completion tokens (nats).
        ref_chosen_logps, ref_rejected_logps: the same under the reference; required when the loss
            needs a reference.
        beta: the KL-regularisation strength β (τ for IPO).
        label_smoothing: ε of conservative DPO (``sigmoid`` only).
        chosen_lengths, rejected_lengths: completion token counts, required by length-normalised losses.
        params: loss-specific parameters (none for the losses registered here).
    """
    spec = get_loss_spec(loss_type)
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss '{loss_type}' needs reference log-probs")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    kwargs: dict = {"beta": beta, **params}
    if loss_type == "sigmoid":
        kwargs["label_smoothing"] = label_smoothing
    elif label_smoothing:
        raise ConfigError(f"label_smoothing is only defined for loss 'sigmoid', not '{loss_type}'", key="label_smoothing")
    if spec.needs_lengths:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss '{loss_type}' needs chosen_lengths and rejected_lengths")
        kwargs["chosen_lengths"] = chosen_lengths
        kwargs["rejected_lengths"] = rejected_lengths
    return spec.fn(chosen_logratios, rejected_logratios, **kwargs)
