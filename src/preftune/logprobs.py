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

For Mixture-of-Experts models the forward can also return the model's load-balancing auxiliary loss
(``router_aux_loss=True``: the model is asked for its router logits and computes ``outputs.aux_loss``). That loss is
a product of two means over every real token of the forward, so it is not a sum over rows or segments: it is only
returned for one forward over the plain padded layout (``collate_pairs``, no ``padding_free``), where its token set —
prompt + completion of each of the 2B rows, padding excluded by the attention mask — is TRL's.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import Tensor, nn

from preftune.chunked_head import chunked_label_logprobs, rows_per_chunk
from preftune.data.collate import PreferenceBatch, dense_shared_prefix_mask
from preftune.multimodal_positions import needs_rope_index, rope_index_of, shared_rope_position_ids
from preftune.shared_prefix_attention import (
    SharedPrefixLayout,
    has_image_block_attention,
    image_block_shared_masks,
    use_shared_prefix_attention,
)

# Model types whose ForCausalLM forward computes logits as lm_head(hidden_states[:, slice]) and nothing else
# (no logit scaling or soft-capping); each is checked against the full-logits path in tests/test_logprobs.py.
CHUNKED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Vision-language models whose ForConditionalGeneration forward is likewise lm_head(language model's hidden states
# [:, slice]) (LLaVA's whatever its language model: the head is its own; Gemma 3's applies no soft-capping); checked
# in tests/test_vision_layouts.py and tests/test_vision_gemma3.py.
CHUNKED_HEAD_VISION_MODEL_TYPES = frozenset({"qwen2_vl", "qwen3_vl", "llava", "gemma3"})


@dataclass
class PairLogProbs:
    """Log-probs of B examples: chosen tensors ``(B,)``, rejected ``(B,)`` (one negative) or ``(B, M)`` (M negatives).

    Attributes:
        chosen_logps, rejected_logps: summed completion log-probs (nats); carry gradients in training.
        chosen_lengths, rejected_lengths: completion token counts.
        chosen_logits_sum, rejected_logits_sum: Σ over completion tokens of the vocabulary-mean logit
            (detached; for the ``logits/*`` metrics, which are token-weighted means).
        chosen_wpo_logps, rejected_wpo_logps: with ``wpo``: mean over completion tokens of
            ``log p_t − log Σ_v p_v²`` (detached; WPO's weights), else None.
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_logits_sum: Tensor
    rejected_logits_sum: Tensor
    chosen_wpo_logps: Tensor | None = None
    rejected_wpo_logps: Tensor | None = None
    aux_loss: Tensor | None = None  # with ``router_aux_loss``: the forward's MoE load-balancing loss (a scalar)


@dataclass
class CompletionLogProbs:
    """Per-completion sums of a batch, each ``(K, B)``: completion k of example i at ``[k, i]``; with
    ``router_aux_loss``, ``aux_loss`` is the forward's MoE load-balancing loss (a scalar with gradients), else None."""

    logps: Tensor
    lengths: Tensor
    logits_sum: Tensor
    wpo_logps: Tensor | None = None
    aux_loss: Tensor | None = None

    def as_pairs(self) -> PairLogProbs:
        """Completion 0 as chosen, the others as rejected: ``(B,)`` for one negative, ``(B, M)`` for several."""
        split = lambda values: (None, None) if values is None else chosen_and_rejected(values)  # noqa: E731
        (chosen, rejected), (cl, rl), (cs, rs), (cw, rw) = map(split, (self.logps, self.lengths, self.logits_sum, self.wpo_logps))
        return PairLogProbs(chosen, rejected, cl, rl, cs, rs, cw, rw, self.aux_loss)


class ScoredTokens(NamedTuple):
    """What ``scored_token_logps`` returns: per scored token ``(N,)`` values, in forward order.

    Attributes:
        logps: log-prob of each scored token (nats; carries gradients).
        mean_logits: its vocabulary-mean logit.
        log_sum_sq: ``log Σ_v p_v²`` (detached; with ``wpo``), else None.
        order: entry j belongs to the batch's plan entry ``order[j]``.
        aux_loss: the forward's MoE load-balancing loss (scalar; with ``router_aux_loss``), else None.
    """

    logps: Tensor
    mean_logits: Tensor
    log_sum_sq: Tensor | None
    order: Tensor
    aux_loss: Tensor | None = None


def chosen_and_rejected(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per-completion ``(K, B)`` values → chosen ``(B,)`` and rejected ``(B,)`` (K = 2) or ``(B, K − 1)``."""
    if values.shape[0] < 2:
        raise ValueError("a pair needs at least two completions per example (chosen and rejected)")
    rejected = values[1:].T
    return values[0], rejected[:, 0] if rejected.shape[1] == 1 else rejected


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
    supported = CHUNKED_HEAD_MODEL_TYPES | CHUNKED_HEAD_VISION_MODEL_TYPES
    return model_type in supported and isinstance(head, nn.Linear)


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


def token_logps(
    logits: Tensor, targets: Tensor, *, chunk_size: int = 1024, with_log_sum_sq: bool = False,
    max_chunk_bytes: int | None = None,
) -> tuple[Tensor, ...]:
    """Log-prob of each target under ``logits`` and the vocabulary-mean logit, chunk by chunk of tokens (at most
    ``chunk_size``, fewer where one chunk's float32 copy would exceed ``max_chunk_bytes``: ``rows_per_chunk``).

    Args:
        logits: ``(N, V)`` next-token logits (any float dtype; computed in float32).
        targets: ``(N,)`` token ids scored against them.
        with_log_sum_sq: also return ``log Σ_v p_v²`` per token (detached; WPO).

    Returns:
        ``(log_probs, mean_logits)``, each ``(N,)`` float32, plus ``log_sum_sq`` with ``with_log_sum_sq``.
    """
    log_probs, mean_logits, log_sum_sq = [], [], []
    chunk_size = rows_per_chunk(chunk_size, logits.shape[-1], max_chunk_bytes)
    for logit_chunk, target_chunk in zip(logits.split(chunk_size), targets.split(chunk_size)):
        logit_chunk = logit_chunk.float()
        label_logits = logit_chunk.gather(-1, target_chunk.unsqueeze(-1)).squeeze(-1)
        logsumexp = torch.logsumexp(logit_chunk, dim=-1)
        log_probs.append(label_logits - logsumexp)
        mean_logits.append(logit_chunk.detach().mean(-1))
        if with_log_sum_sq:
            log_sum_sq.append((torch.logsumexp(2 * logit_chunk.detach(), dim=-1) - 2 * logsumexp.detach()))
    if not log_probs:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return (empty, empty, empty) if with_log_sum_sq else (empty, empty)
    outputs = (torch.cat(log_probs), torch.cat(mean_logits))
    return outputs + (torch.cat(log_sum_sq),) if with_log_sum_sq else outputs


def _row_segments(batch: PreferenceBatch) -> list[tuple[slice, int]]:
    """``(rows, length)`` of each forward: the whole padded batch, or one row at a time without padding."""
    if batch.row_lengths is None:
        return [(slice(0, batch.input_ids.shape[0]), batch.input_ids.shape[1])]
    return [(slice(row, row + 1), length) for row, length in enumerate(batch.row_lengths)]


def _dense_mask_for(model: nn.Module, mask: Tensor) -> Tensor:
    """A bool 4-D mask as the model's attention takes it: eager attention *adds* the mask to its scores, so it needs
    the additive float form (0 where allowed, the dtype's minimum elsewhere); sdpa takes the bool mask itself."""
    inner = unwrap_model(model)
    if mask.dtype != torch.bool or getattr(getattr(inner, "config", None), "_attn_implementation", None) != "eager":
        return mask
    dtype = next(inner.parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _segment_kwargs(batch: PreferenceBatch, rows: slice, length: int, shared_attention: bool, model: nn.Module) -> dict:
    """Model keywords of one forward. Shared rows (``batch.segments``) go either through the shared-prefix attention
    (their lengths as ``shared_prefix_layout`` and an all-ones mask, for which no mask is built) or, for a model that
    cannot take it, through the dense ``(rows, 1, length, length)`` mask."""
    mask = batch.attention_mask[rows]
    mask = mask[..., :length, :length] if mask.dim() == 4 else mask[:, :length]
    kwargs = {"input_ids": batch.input_ids[rows, :length], "attention_mask": mask, "use_cache": False}
    if batch.segments is not None and shared_attention:
        kwargs["attention_mask"] = torch.ones_like(mask)
        kwargs["shared_prefix_layout"] = SharedPrefixLayout.from_segments(batch.segments[rows])
    elif batch.segments is not None:
        kwargs["attention_mask"] = _dense_mask_for(model, dense_shared_prefix_mask(batch.segments[rows], length).to(mask.device))
    elif mask.dim() == 4:
        kwargs["attention_mask"] = _dense_mask_for(model, mask)
    if batch.position_ids is not None:
        kwargs["position_ids"] = batch.position_ids[rows, :length]
    if batch.model_inputs:  # images: their pixel values belong to the rows of the whole batch, in order
        if (rows.start, rows.stop, length) != (0, batch.input_ids.shape[0], batch.input_ids.shape[1]):
            raise ValueError("a batch with images is forwarded in one piece: padding_free must be off")
        image_block_masks = batch.segments is not None and not shared_attention
        if image_block_masks and not has_image_block_attention(unwrap_model(model)):
            raise ValueError("shared rows with images need the shared-prefix attention (sdpa attention in a supported "
                             "model): use the plain layout (prefix_sharing false)")
        kwargs.update(batch.model_inputs)
        if image_block_masks:  # Gemma 3: dense masks per layer type, each image block seeing itself both ways
            kwargs["attention_mask"] = _image_block_masks(model, batch, length)
        if needs_rope_index(batch):  # multimodal RoPE: each completion at its positions in prompt | completion
            rope_index = rope_index_of(unwrap_model(model))
            if rope_index is None:
                raise ValueError(f"{type(unwrap_model(model)).__name__} takes image grids but has no get_rope_index "
                                 "to place shared rows' completions: use the plain layout (prefix_sharing false)")
            kwargs["position_ids"] = shared_rope_position_ids(rope_index, batch)
    return kwargs


def _image_block_masks(model: nn.Module, batch: PreferenceBatch, length: int) -> dict[str, Tensor]:
    """The attention masks of shared rows for a model with bidirectional image blocks, by layer type, as its
    attention takes them (``image_block_shared_masks``; the blocks from the batch's ``token_type_ids``)."""
    token_types = batch.model_inputs.get("token_type_ids")
    if token_types is None:
        raise ValueError("shared rows for a model with image blocks need the batch's token_type_ids (its processor's "
                         "token types): use the plain layout (prefix_sharing false)")
    shared_mask = dense_shared_prefix_mask(batch.segments, length).to(batch.input_ids.device)
    masks = image_block_shared_masks(shared_mask, token_types, batch.position_ids,
                                     unwrap_model(model).config.text_config)
    return {name: _dense_mask_for(model, mask) for name, mask in masks.items()}


def scored_token_logps(
    model: nn.Module,
    batch: PreferenceBatch,
    *,
    chunked_head: bool = True,
    chunk_size: int = 1024,
    max_chunk_bytes: int | None = None,
    wpo: bool = False,
    router_aux_loss: bool = False,
) -> ScoredTokens:
    """Log-prob of every scored token, its vocabulary-mean logit, its ``log Σ_v p_v²`` (with ``wpo``), the
    permutation back to the batch's plan, and (``router_aux_loss``) the model's MoE load-balancing loss.
    ``chunk_size`` and ``max_chunk_bytes``: rows projected at once and the budget of one chunk's logits.

    Tokens come out grouped by forward segment, so the order may differ from the batch's plan.
    ``router_aux_loss`` needs a batch forwarded in one piece with a 2-D mask (``check_one_padded_forward``).
    """
    if router_aux_loss:
        check_one_padded_forward(batch)
    use_chunked = chunked_head and supports_chunked_head(model)
    keep_logits = _accepts_logits_to_keep(model)
    shared_attention = batch.segments is not None and use_shared_prefix_attention(unwrap_model(model))
    selected, labels, order, aux_loss = [], [], [], None
    with _output_layer_bypassed(model) if use_chunked else nullcontext() as head:
        for rows, length in _row_segments(batch):
            in_segment = (batch.score_rows >= rows.start) & (batch.score_rows < rows.stop)
            score_rows = batch.score_rows[in_segment] - rows.start
            score_positions = batch.score_positions[in_segment]
            kwargs = _segment_kwargs(batch, rows, length, shared_attention, model)
            first = int(score_positions.min()) if keep_logits and score_positions.numel() else 0
            if keep_logits:
                kwargs["logits_to_keep"] = length - first  # positions before the first scored one are never projected
            if router_aux_loss:
                kwargs["output_router_logits"] = True
            outputs = model(**kwargs)
            if router_aux_loss:
                aux_loss = _aux_loss_of(outputs, model)
            outputs = outputs.logits  # hidden states when the output layer is bypassed
            selected.append(outputs[score_rows, score_positions - first])
            labels.append(batch.score_labels[in_segment])
            order.append(in_segment.nonzero().squeeze(1))
            del outputs
        selected, labels, order = torch.cat(selected), torch.cat(labels), torch.cat(order)
        if use_chunked:
            logps, mean_logits, *extra = chunked_label_logprobs(
                selected, head.weight, labels, bias=head.bias, chunk_size=chunk_size, with_log_sum_sq=wpo,
                max_chunk_bytes=max_chunk_bytes,
            )
        else:
            logps, mean_logits, *extra = token_logps(selected, labels, chunk_size=chunk_size, with_log_sum_sq=wpo,
                                                     max_chunk_bytes=max_chunk_bytes)
    return ScoredTokens(logps, mean_logits, (extra[0] if wpo else None), order, aux_loss)


def check_one_padded_forward(batch: PreferenceBatch) -> None:
    """Raise ValueError unless ``batch`` is forwarded in one piece with a 2-D padding mask (the plain layout).

    The MoE load-balancing loss averages router statistics over all real tokens of one forward; row-by-row forwards
    (``padding_free``) would each give a loss over their own tokens only, and the prefix-sharing layout holds each
    prompt once instead of once per completion.
    """
    if batch.row_lengths is not None or batch.attention_mask.dim() != 2 or batch.segments is not None:
        raise ValueError(
            "the MoE router auxiliary loss needs the plain padded layout (one forward per batch): "
            "prefix_sharing and padding_free must be off"
        )


def _aux_loss_of(outputs: object, model: nn.Module) -> Tensor:
    aux_loss = getattr(outputs, "aux_loss", None)
    if not isinstance(aux_loss, Tensor):
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} returned no load-balancing aux_loss although router logits were "
            "requested (output_router_logits=True)"
        )
    return aux_loss


def ld_token_weights(batch: PreferenceBatch, alpha: float) -> Tensor:
    """LD-DPO weights per plan entry (Liu et al. 2024, "Length Desensitization in DPO"): 1 for the first
    ``min(|y_w|, |y_l|)`` tokens of each completion of a pair, ``alpha`` for the longer one's excess."""
    if batch.num_completions != 2:
        raise ValueError("LD-DPO weighting is defined for pairs (one chosen, one rejected)")
    n = batch.num_pairs
    lengths = torch.bincount(batch.score_sequences, minlength=2 * n)
    shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2)
    inside = batch.score_offsets < shared[batch.score_sequences]
    return torch.where(inside, 1.0, float(alpha))


def completion_logprobs(
    model: nn.Module,
    batch: PreferenceBatch,
    *,
    chunked_head: bool = True,
    chunk_size: int = 1024,
    max_chunk_bytes: int | None = None,
    ld_alpha: float | None = None,
    wpo: bool = False,
    router_aux_loss: bool = False,
) -> CompletionLogProbs:
    """Forward the batch once and sum log-probs per completion: ``logps[k, i] = Σ_t w_t log p(y_t)`` over the
    tokens of completion k of example i, with ``w_t = 1`` (or the LD-DPO weights when ``ld_alpha`` is set).

    ``router_aux_loss``: also return the MoE model's load-balancing loss of this forward (``scored_token_logps``);
    only the policy's forward asks for it, never the reference's."""
    logps, mean_logits, log_sum_sq, order, aux_loss = scored_token_logps(
        model, batch, chunked_head=chunked_head, chunk_size=chunk_size, max_chunk_bytes=max_chunk_bytes, wpo=wpo,
        router_aux_loss=router_aux_loss,
    )
    sequences = batch.score_sequences[order]
    count = batch.num_completions * batch.num_pairs
    weighted = logps if ld_alpha is None else logps * ld_token_weights(batch, ld_alpha)[order].to(logps.dtype)
    sums = torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, sequences, weighted)
    logits_sums = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add(0, sequences, mean_logits.float())
    lengths = torch.bincount(sequences, minlength=count)
    wpo_logps = None
    if wpo:  # WPO eq. 2: mean over the completion of (log p_t − log Σ_v p_v²), no gradient
        aligned = (logps.detach() - log_sum_sq).float()
        wpo_logps = torch.zeros(count, dtype=torch.float32, device=logps.device).index_add(0, sequences, aligned)
        wpo_logps = (wpo_logps / lengths.clamp(min=1)).view(batch.num_completions, -1)
    shape = (batch.num_completions, batch.num_pairs)
    return CompletionLogProbs(sums.view(shape), lengths.view(shape), logits_sums.view(shape), wpo_logps, aux_loss)


def pair_logprobs(model: nn.Module, batch: PreferenceBatch, **options) -> PairLogProbs:
    """``completion_logprobs`` (same ``options``) as chosen and rejected of each pair."""
    return completion_logprobs(model, batch, **options).as_pairs()
