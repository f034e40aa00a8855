"""A run's optimizer and learning-rate schedule, built as transformers' Trainer builds them."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import get_scheduler

from preftune.config import DPOConfig

logger = logging.getLogger(__name__)


def build_adamw(model: nn.Module, args: DPOConfig) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters, without weight decay on biases and normalisation weights;
    ``optim: adamw_torch_fused`` uses torch's fused kernel where the device and dtype have it (else a warning and
    the default implementation)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [  # no empty group: DeepSpeed's ZeRO-3 drops them, and the schedule must see the same groups
        group
        for group in ({"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if group["params"]
    ]
    settings = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if args.optim == "adamw_torch_fused":
        try:
            return torch.optim.AdamW(groups, fused=True, **settings)
        except (RuntimeError, ValueError) as error:  # a device or dtype without the fused kernel
            logger.warning("fused AdamW unavailable (%s); using the default implementation", error)
    return torch.optim.AdamW(groups, **settings)


def build_scheduler(optimizer: torch.optim.Optimizer, args: DPOConfig, num_training_steps: int) -> Any:
    """``lr_scheduler_type`` (with ``lr_scheduler_kwargs``) and its warm-up over ``num_training_steps``."""
    return get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.resolved_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
