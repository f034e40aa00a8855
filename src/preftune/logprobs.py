"""Per-sequence completion log-probs from one forward pass over chosen and rejected together.

``log π(y|x) = Σ_t log p(y_t | x, y_<t)`` over completion tokens only (prompt and padding masked),
in nats. The label log-prob is ``logit[label] − logsumexp(logits)``, computed in chunks of positions,
so no full-vocabulary log-softmax copy of the logits is ever materialised.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from preftune.data.collate import PreferenceBatch


@dataclass
class PairLogProbs:
    """Log-probs of B pairs, each tensor of shape ``(B,)``.

    Attributes:
        chosen_logps, rejected_logps: summed completion log-probs (nats); carry gradients in training.
        chosen_lengths, rejected_lengths: completion token counts.
        chosen_logits_sum, rejected_logits_sum: Σ over completion tokens of the vocabulary-mean logit
            (detached; for the ``logits/*`` metrics, which are token-weighted means).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_logits_sum: Tensor
    rejected_logits_sum: Tensor


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (most transformers causal LMs do)."""
    inner = model
    while True:  # unwrap DDP/accelerate (.module) and PEFT (.base_model.model)
        if hasattr(inner, "module") and isinstance(inner.module, nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model") and callable(inner.get_base_model):
            inner = inner.get_base_model()
        else:
            break
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def token_logps(logits: Tensor, targets: Tensor, *, chunk_size: int = 128) -> tuple[Tensor, Tensor]:
    """Log-prob of each target under ``logits`` and the vocabulary-mean logit, position by position.

    Args:
        logits: ``(N, T, V)`` next-token logits (any float dtype; computed in float32).
        targets: ``(N, T)`` token ids scored against them.
        chunk_size: positions per chunk; bounds the float32 temporary to ``N·chunk_size·V``.

    Returns:
        ``(log_probs, mean_logits)``, each ``(N, T)`` float32.
    """
    log_probs, mean_logits = [], []
    for logit_chunk, target_chunk in zip(logits.split(chunk_size, dim=1), targets.split(chunk_size, dim=1)):
        logit_chunk = logit_chunk.float()
        label_logits = logit_chunk.gather(-1, target_chunk.unsqueeze(-1)).squeeze(-1)
        log_probs.append(label_logits - torch.logsumexp(logit_chunk, dim=-1))
        mean_logits.append(logit_chunk.detach().mean(-1))
    return torch.cat(log_probs, dim=1), torch.cat(mean_logits, dim=1)


def pair_logprobs(model: nn.Module, batch: PreferenceBatch) -> PairLogProbs:
    """Forward chosen and rejected in one pass and sum completion log-probs per sequence.

    Logits are requested only from the first completion position of the batch onward
    (``logits_to_keep``) when the model supports it; prompt positions before it are never projected
    onto the vocabulary.
    """
    input_ids, completion_mask = batch.input_ids, batch.completion_mask
    seq_len = input_ids.shape[1]
    first_completion = int(completion_mask.any(dim=0).nonzero()[0]) if completion_mask.any() else 1
    first_completion = max(first_completion, 1)  # token 0 has no prediction
    kwargs = {"input_ids": input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = seq_len - first_completion + 1
        logits = model(**kwargs).logits[:, :-1]
    else:
        logits = model(**kwargs).logits[:, first_completion - 1 : -1]
    targets = input_ids[:, first_completion:]
    mask = completion_mask[:, first_completion:].to(torch.float32)
    per_token_logps, per_token_mean_logits = token_logps(logits, targets)
    del logits
    logps = (per_token_logps * mask).sum(-1)
    logits_sum = (per_token_mean_logits * mask).sum(-1)
    lengths = completion_mask.sum(-1)
    n = batch.num_pairs
    return PairLogProbs(
        chosen_logps=logps[:n],
        rejected_logps=logps[n:],
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
        chosen_logits_sum=logits_sum[:n],
        rejected_logits_sum=logits_sum[n:],
    )
