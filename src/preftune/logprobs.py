"""Per-sequence completion log-probs from one forward pass over a ``PreferenceBatch``.

``log π(y|x) = Σ_t log p(y_t | x, y_<t)`` over completion tokens only (prompt and padding are never scored),
in nats. The batch's scoring plan says which hidden state predicts which label, so the same code serves the
plain and the prefix-sharing layouts.

Two ways to get label log-probs:
- chunked LM head (default, for model types whose causal-LM forward is exactly ``lm_head(hidden)``): the
  model's output layer is bypassed for the forward, the final hidden states of the scored positions are
  gathered, and ``chunked_label_logprobs`` projects them onto the vocabulary chunk by chunk with a custom
  backward — no ``(rows, T, V)`` logits tensor and no log-softmax copy ever exist;
- full logits (any other model): logits from the first scored position on (``logits_to_keep``), then
  ``logit[label] − logsumexp`` in chunks of tokens.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from preftune.chunked_head import chunked_label_logprobs
from preftune.data.collate import PreferenceBatch

# Model types whose ForCausalLM forward computes logits as lm_head(hidden_states[:, slice]) and nothing else
# (no logit scaling or soft-capping); each is checked against the full-logits path in tests/test_logprobs.py.
CHUNKED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


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


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/accelerate (``.module``) and PEFT (``get_base_model()``) wrappers."""
    inner = model
    while True:
        if hasattr(inner, "module") and isinstance(inner.module, nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model") and callable(inner.get_base_model):
            inner = inner.get_base_model()
        else:
            return inner


def supports_chunked_head(model: nn.Module) -> bool:
    """Whether the chunked LM head reproduces this model's logits exactly (see ``CHUNKED_HEAD_MODEL_TYPES``)."""
    inner = unwrap_model(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return model_type in CHUNKED_HEAD_MODEL_TYPES and isinstance(head, nn.Linear)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def _output_layer_bypassed(model: nn.Module) -> Iterator[nn.Linear]:
    """Make the output layer return its input, so the model's ``logits`` are the final hidden states.

    The forward still goes through the outer module (DDP hooks and autocast stay in place); the layer's
    weight is used by the caller's chunked projection instead.
    """
    head = unwrap_model(model).get_output_embeddings()
    head.forward = _identity  # an instance attribute shadows Linear.forward
    try:
        yield head
    finally:
        del head.forward


def _identity(hidden: Tensor) -> Tensor:
    return hidden


def token_logps(logits: Tensor, targets: Tensor, *, chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Log-prob of each target under ``logits`` and the vocabulary-mean logit, chunk by chunk of tokens.

    Args:
        logits: ``(N, V)`` next-token logits (any float dtype; computed in float32).
        targets: ``(N,)`` token ids scored against them.

    Returns:
        ``(log_probs, mean_logits)``, each ``(N,)`` float32.
    """
    log_probs, mean_logits = [], []
    for logit_chunk, target_chunk in zip(logits.split(chunk_size), targets.split(chunk_size)):
        logit_chunk = logit_chunk.float()
        label_logits = logit_chunk.gather(-1, target_chunk.unsqueeze(-1)).squeeze(-1)
        log_probs.append(label_logits - torch.logsumexp(logit_chunk, dim=-1))
        mean_logits.append(logit_chunk.detach().mean(-1))
    if not log_probs:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(log_probs), torch.cat(mean_logits)


def _row_segments(batch: PreferenceBatch) -> list[tuple[slice, int]]:
    """``(rows, length)`` of each forward: the whole padded batch, or one row at a time without padding."""
    if batch.row_lengths is None:
        return [(slice(0, batch.input_ids.shape[0]), batch.input_ids.shape[1])]
    return [(slice(row, row + 1), length) for row, length in enumerate(batch.row_lengths)]


def _segment_kwargs(batch: PreferenceBatch, rows: slice, length: int) -> dict:
    mask = batch.attention_mask[rows]
    mask = mask[..., :length, :length] if mask.dim() == 4 else mask[:, :length]
    kwargs = {"input_ids": batch.input_ids[rows, :length], "attention_mask": mask, "use_cache": False}
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids[rows, :length]
    return kwargs


def scored_token_logps(
    model: nn.Module, batch: PreferenceBatch, *, chunked_head: bool = True, chunk_size: int = 1024
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of every scored token, its vocabulary-mean logit, and its sequence id, each ``(N,)``.

    Tokens come out grouped by forward segment, so the order may differ from the batch's plan; the
    sequence ids returned alongside say where each belongs.
    """
    use_chunked = chunked_head and supports_chunked_head(model)
    keep_logits = _accepts_logits_to_keep(model)
    selected, labels, sequences = [], [], []
    with _output_layer_bypassed(model) if use_chunked else nullcontext() as head:
        for rows, length in _row_segments(batch):
            in_segment = (batch.score_rows >= rows.start) & (batch.score_rows < rows.stop)
            score_rows = batch.score_rows[in_segment] - rows.start
            score_positions = batch.score_positions[in_segment]
            kwargs = _segment_kwargs(batch, rows, length)
            first = int(score_positions.min()) if keep_logits and score_positions.numel() else 0
            if keep_logits:
                kwargs["logits_to_keep"] = length - first  # positions before the first scored one are never projected
            outputs = model(**kwargs).logits  # hidden states when the output layer is bypassed
            selected.append(outputs[score_rows, score_positions - first])
            labels.append(batch.score_labels[in_segment])
            sequences.append(batch.score_sequences[in_segment])
            del outputs
        selected, labels, sequences = torch.cat(selected), torch.cat(labels), torch.cat(sequences)
        if use_chunked:
            logps, mean_logits = chunked_label_logprobs(selected, head.weight, labels, bias=head.bias, chunk_size=chunk_size)
        else:
            logps, mean_logits = token_logps(selected, labels, chunk_size=chunk_size)
    return logps, mean_logits, sequences


def pair_logprobs(model: nn.Module, batch: PreferenceBatch, *, chunked_head: bool = True, chunk_size: int = 1024) -> PairLogProbs:
    """Forward the batch once and sum completion log-probs per sequence (chosen and rejected of each pair)."""
    logps, mean_logits, sequences = scored_token_logps(model, batch, chunked_head=chunked_head, chunk_size=chunk_size)
    n = batch.num_pairs
    sums = torch.zeros(2 * n, dtype=logps.dtype, device=logps.device).index_add(0, sequences, logps)
    logits_sums = torch.zeros(2 * n, dtype=torch.float32, device=logps.device).index_add(0, sequences, mean_logits.float())
    lengths = torch.bincount(sequences, minlength=2 * n)
    return PairLogProbs(
        chosen_logps=sums[:n],
        rejected_logps=sums[n:],
        chosen_lengths=lengths[:n],
        rejected_lengths=lengths[n:],
        chosen_logits_sum=logits_sums[:n],
        rejected_logits_sum=logits_sums[n:],
    )
