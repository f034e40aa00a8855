"""The reference policy π_ref: frozen, evaluated without gradients.

Strategies (later issues add: the policy with its LoRA adapter disabled, and a precomputed cache):
- ``FrozenReference``: a separate frozen model — a copy of the policy as loaded, or one the user gave.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import Tensor, nn

from preftune.data.collate import PreferenceBatch
from preftune.logprobs import chosen_and_rejected, completion_logprobs


class Reference(Protocol):
    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        """Summed log-probs of every completion, ``(K, B)`` (completion k of example i at ``[k, i]``), without
        gradients. ``logprob_options`` are passed to ``completion_logprobs`` (``chunked_head``, ``chunk_size``,
        ``ld_alpha``)."""

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)``: ``(B,)`` and ``(B,)`` (one negative) or ``(B, M)`` (M negatives)."""


class FrozenReference:
    """A reference model kept in eval mode with gradients off; never updated, never re-read from disk."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)

    @classmethod
    def copy_of(cls, policy: nn.Module) -> "FrozenReference":
        """A deep copy of the policy as it is now (i.e. as loaded, before any update)."""
        return cls(copy.deepcopy(policy))

    def to(self, device: torch.device | str) -> "FrozenReference":
        self.model.to(device)
        return self

    @torch.no_grad()
    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        return completion_logprobs(self.model, batch, **logprob_options).logps

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        return chosen_and_rejected(self.completion_logps(batch, **logprob_options))
