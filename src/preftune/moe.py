"""The Mixture-of-Experts load-balancing auxiliary loss, added to the policy's loss as TRL's DPOTrainer adds it.

MoE models (their config has ``output_router_logits``) return, when asked for their router logits, the Switch
Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6): ``E · Σ_e f_e · P_e`` over the E experts, with
``f_e`` the fraction of top-k assignments to expert e and ``P_e`` its mean router probability, both over every
real token (prompt and completions) of every layer. The training loss becomes
``mean over pairs of the preference loss + router_aux_loss_coef · aux_loss``, once per batch forward.

The coefficient is ``router_aux_loss_coef`` when set, else the model config's own (0.001 for Mixtral and
Qwen3-MoE), else 0.0; 0.0 turns the loss off.

The value is the model's own ``outputs.aux_loss`` of the policy's padded forward over ``[chosen; rejected]`` rows
(padding masked out), the token set of TRL's forward. TRL computes it with Mixtral's function for every family;
for Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS and the other families that share that function the two are the same.
"""

from __future__ import annotations

import inspect
import logging

from torch import nn

from preftune.errors import ConfigError
from preftune.logprobs import unwrap_model

logger = logging.getLogger(__name__)


def _text_config(model: nn.Module):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_moe_model(model: nn.Module) -> bool:
    """Whether the model returns router logits on request (its config declares ``output_router_logits``)."""
    return hasattr(_text_config(model), "output_router_logits")


def resolve_router_aux_loss_coef(coef: float | None, model: nn.Module) -> float:
    """The coefficient of the load-balancing loss for ``model``: ``coef`` when given, else the model config's
    ``router_aux_loss_coef`` (0.0 when it declares none); always 0.0 for a model that is not MoE.

    Raises ConfigError when a non-zero ``coef`` is given for a model that is not MoE (there is no loss to weight),
    or for an MoE model whose forward takes no ``output_router_logits`` (it computes no load-balancing loss).
    """
    text_config = _text_config(model)
    name = type(unwrap_model(model)).__name__
    if coef and not is_moe_model(model):
        raise ConfigError(
            f"router_aux_loss_coef is {coef} but {name} is not a Mixture-of-Experts model that returns its router "
            "logits: there is no auxiliary loss to weight; leave router_aux_loss_coef unset",
            key="router_aux_loss_coef",
        )
    if not is_moe_model(model):
        return 0.0
    resolved = float(getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef)
    if resolved and not _computes_aux_loss(model):
        if coef is None:  # e.g. Llama 4: the config declares a coefficient its forward never uses
            logger.warning("%s declares router_aux_loss_coef %g but computes no load-balancing loss; training "
                           "without it", name, resolved)
            return 0.0
        raise ConfigError(
            f"router_aux_loss_coef is {coef} but {name} computes no load-balancing loss (its forward takes no "
            "output_router_logits); set router_aux_loss_coef: 0",
            key="router_aux_loss_coef",
        )
    return resolved


def _computes_aux_loss(model: nn.Module) -> bool:
    try:
        return "output_router_logits" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def resolve_router_aux_loss(args: object, model: nn.Module, layout: object) -> float:
    """The trainer's set-up: the coefficient (``resolve_router_aux_loss_coef`` of ``args.router_aux_loss_coef``)
    for ``model``, checked against the batch ``layout`` (its ``prefix_sharing`` and ``padding_free``): with the loss
    on, each batch is forwarded once, padded, one row per completion, so that the loss is TRL's (see
    ``logprobs.check_one_padded_forward``). Raises ConfigError naming the key that conflicts."""
    coef = resolve_router_aux_loss_coef(getattr(args, "router_aux_loss_coef", None), model)
    if coef:
        for key in ("prefix_sharing", "padding_free"):
            if getattr(layout, key) is not False:
                raise ConfigError(
                    f"{key} cannot be used with the MoE load-balancing loss (router_aux_loss_coef {coef:g}): that "
                    f"loss averages over all tokens of one padded forward per batch; set {key}: false, or "
                    "router_aux_loss_coef: 0 to train without the auxiliary loss",
                    key=key,
                )
    return coef
