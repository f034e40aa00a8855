"""Prefix-sharing attention with memory linear in length: no ``T × T`` mask, no masked attention kernel.

A shared row is ``prompt | completion 0 | … | completion K-1`` (``preftune.data.collate.collate_shared_prefix``):
completion k must see the prompt and its own earlier tokens, never another completion. A dense 4-D mask says
this with ``T × T`` booleans per row, which transformers turns into a float mask and which forces a masked kernel;
its memory grows like ``T²``. This module computes the same attention from the row's lengths alone.

On CPU (no attention dropout), the attention of all shared rows is one autograd function, ``SharedRowsAttention``,
built on the flash-attention kernels that return each query's log-sum-exp of scores:

- ``prompt | completion 0`` is one causal call;
- completion k ≥ 1 is two calls, its queries over the prompt's keys (every pair visible) and over its own keys
  (causal), merged exactly through their log-sum-exps (the softmax over both key blocks is the two partial softmaxes
  reweighted by ``exp(lse_block − lse)``);
- it keeps for the backward what one sdpa call of the plain layout keeps: queries, keys, values, the output and one
  log-sum-exp per query and head. The backward runs the flash backward kernel once per key block with the merged
  output and log-sum-exp (with those, each block's gradient is exact: the kernel's probabilities are
  ``exp(score − lse)`` and its softmax correction is ``Σ dout · out`` of the merged output).

So each completion costs the same attention pairs as its plain row (the prompt is never replayed) and no joined or
stacked copies are kept. Elsewhere (CUDA, attention dropout) completion k ≥ 1 is one causal sdpa call over the
concatenation ``prompt | completion k`` of queries, keys and values whose prompt outputs are dropped (the prompt's
queries are replayed, ``P² / 2`` pairs per extra completion, and the joined copies are kept for the backward).

Every tensor is ``O(T)`` (per head); the kernels are the causal ones.

How it is wired into transformers: the function is registered with ``AttentionInterface`` under
``SHARED_PREFIX_ATTENTION`` (its mask function is sdpa's), and ``use_shared_prefix_attention`` switches a supported
model to it. Called without a ``shared_prefix_layout`` keyword it *is* sdpa (same masks, same kernel), so a switched
model behaves as before for every other forward (plain batches, generation). A shared forward passes the row lengths
as ``shared_prefix_layout=SharedPrefixLayout(...)`` (transformers hands unknown forward keywords down to the
attention function) and an all-ones 2-D mask, for which sdpa's mask function creates no mask. The keyword travels
with the layer's inputs, so gradient checkpointing recomputes the same attention. The switch is not saved with the
model (transformers never serializes the attention implementation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SHARED_PREFIX_ATTENTION = "preftune_shared_prefix_sdpa"
"""The attention implementation name preftune registers (sdpa, plus shared rows when told their layout)."""

SHARED_PREFIX_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose attention goes through ``AttentionInterface`` and hands forward keywords down to it, checked
against the plain layout in tests/test_prefix_sharing_linear.py."""

SHARED_PREFIX_VISION_MODEL_TYPES = {
    "qwen2_vl": frozenset({"qwen2_vl_text"}),
    "qwen3_vl": frozenset({"qwen3_vl_text"}),
    "llava": SHARED_PREFIX_MODEL_TYPES,  # LLaVA runs its language model's own base model, keywords passed down
}
"""Vision-language model types and the language-model types (``text_config.model_type``) under them whose shared
rows go through the shared-prefix attention, checked against the plain layout in tests/test_vision_layouts.py
(LLaVA over Llama)."""

BIDIRECTIONAL_IMAGE_MODEL_TYPES = frozenset({"gemma3"})
"""Vision-language model types whose image tokens attend to each other both ways (Gemma 3: each image's block of
tokens marked by ``token_type_ids``) and whose forward takes its attention masks ready-made, one per layer type. The
shared-prefix attention computes a shared row's prompt causally, so their shared rows go through dense masks instead
(``image_block_shared_masks``), exact and ``R·T²`` in memory, as the plain rows' own masks are."""


def has_image_block_attention(model: nn.Module) -> bool:
    """Whether ``model`` (unwrapped) is a vision-language model whose shared rows take ``image_block_shared_masks``:
    a type in ``BIDIRECTIONAL_IMAGE_MODEL_TYPES`` whose language model is causal outside the image blocks."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None)
    return (getattr(config, "model_type", None) in BIDIRECTIONAL_IMAGE_MODEL_TYPES and text_config is not None
            and not getattr(text_config, "use_bidirectional_attention", False))


def image_blocks(token_types: Tensor) -> Tensor:
    """``(R, T)`` block number of each image token (0, 1, … per row, one block per run of consecutive image tokens),
    -1 elsewhere, from ``(R, T)`` token types (1 on image tokens)."""
    is_image = token_types == 1
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


def image_block_shared_masks(shared_mask: Tensor, token_types: Tensor, position_ids: Tensor,
                             text_config: object) -> dict[str, Tensor]:
    """The ``(R, 1, T, T)`` bool attention masks of shared rows for a model with image blocks, by layer type:
    ``full_attention``: the shared rows' mask (``shared_mask``: each completion sees the prompt and itself, causally)
    with every image block's tokens seeing each other; ``sliding_attention`` (when the model has such layers): that
    mask and keys less than ``sliding_window`` positions behind the query, counted in ``position_ids`` (a
    completion's positions are those of its plain row, so the window is the plain row's)."""
    blocks = image_blocks(token_types)
    same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    full = shared_mask | same_block[:, None]
    masks = {"full_attention": full}
    window = getattr(text_config, "sliding_window", None)
    if window is not None and "sliding_attention" in (getattr(text_config, "layer_types", None) or ()):
        behind = position_ids[:, :, None] - position_ids[:, None, :]  # query position - key position
        masks["sliding_attention"] = full & (behind < window)[:, None]
    return masks


@dataclass(frozen=True)
class SharedPrefixLayout:
    """Where each shared row's pieces are: row r is ``prompt_lengths[r]`` prompt tokens followed by completions of
    ``completion_lengths[r]`` tokens each, then padding up to the forward's length."""

    prompt_lengths: tuple[int, ...]
    completion_lengths: tuple[tuple[int, ...], ...]

    @classmethod
    def from_segments(cls, segments: Tensor) -> "SharedPrefixLayout":
        """From a batch's ``(R, 1 + K)`` segment lengths (prompt, then each completion)."""
        rows = segments.tolist()
        return cls(tuple(row[0] for row in rows), tuple(tuple(row[1:]) for row in rows))

    def real_length(self, row: int) -> int:
        return self.prompt_lengths[row] + sum(self.completion_lengths[row])


def _causal_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling: float | None) -> Tensor:
    """``(1, H, n, d)`` causal attention of ``n`` queries over ``n`` keys, as transformers' sdpa path runs it."""
    groups = getattr(module, "num_key_value_groups", 1)
    options = {}
    if groups > 1:
        if use_gqa_in_sdpa(None, key, value):
            options["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=query.shape[2] > 1, **options
    )


def _replayed_row_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, layout: SharedPrefixLayout, row: int,
    dropout: float, scaling: float | None,
) -> Tensor:
    """``(T, H, d)`` attention output of one shared row (zeros on padding), replaying the prompt's queries for every
    completion after the first (the path off CPU or with attention dropout)."""
    prompt = layout.prompt_lengths[row]
    q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
    pieces, start = [], prompt
    for index, length in enumerate(layout.completion_lengths[row]):
        if index == 0:  # prompt | completion 0 is contiguous: one causal call, all outputs kept
            span = slice(0, prompt + length)
            pieces.append(_causal_attention(module, q[:, :, span], k[:, :, span], v[:, :, span], dropout, scaling))
        elif length:
            own = slice(start, start + length)
            joined = [torch.cat([t[:, :, :prompt], t[:, :, own]], dim=2) for t in (q, k, v)]
            pieces.append(_causal_attention(module, *joined, dropout, scaling)[:, :, prompt:])
        start += length
    padding = query.shape[2] - start
    if padding:
        pieces.append(query.new_zeros(1, query.shape[1], padding, value.shape[-1]))
    return torch.cat(pieces, dim=2)[0].transpose(0, 1)


Block = tuple[slice, slice, bool]
"""One attention call of a shared row: its queries, its keys (and values), whether it is causal."""


def row_blocks(layout: SharedPrefixLayout, row: int) -> list[list[Block]]:
    """The attention calls of one shared row, grouped by query span (each group's outputs are merged).

    ``prompt | completion 0`` is one causal block; completion k ≥ 1 is a block over the prompt's keys (all visible)
    and a causal block over its own keys. Empty spans are left out.
    """
    prompt = layout.prompt_lengths[row]
    groups, start = [], prompt
    for index, length in enumerate(layout.completion_lengths[row]):
        if index == 0 and prompt + length:
            groups.append([(slice(0, prompt + length), slice(0, prompt + length), True)])
        elif index and length:
            own = slice(start, start + length)
            groups.append(([(own, slice(0, prompt), False)] if prompt else []) + [(own, own, True)])
        start += length
    return groups


_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class SharedRowsAttention(torch.autograd.Function):
    """The attention of shared rows on CPU: ``(R, H, T, d)`` queries, ``(R, H_kv, T, d)`` keys and values (grouped
    query heads allowed) → ``(R, T, H, d)`` output, zeros on padding. Exact; saves queries, keys, values, the output
    and ``(R, H, T)`` log-sum-exps (float32, float64 for float64; see the module docstring)."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, layout: SharedPrefixLayout, scaling: float | None):
        rows, heads, length, _ = query.shape
        out = query.new_zeros(rows, length, heads, value.shape[-1])
        accumulate = torch.promote_types(query.dtype, torch.float32)  # the kernel's log-sum-exp dtype
        lse = query.new_zeros(rows, heads, length, dtype=accumulate)
        out_by_head = out.transpose(1, 2)
        for row in range(rows):
            q, k, v = query[row : row + 1], key[row : row + 1], value[row : row + 1]
            for group in row_blocks(layout, row):
                queries = group[0][0]
                partial = [_flash_forward(q[:, :, queries], k[:, :, keys], v[:, :, keys], 0.0, causal, scale=scaling)
                           for _, keys, causal in group]
                if len(partial) == 1:
                    merged, merged_lse = partial[0]
                else:  # softmax over both key blocks: each block's output weighted by its share of the exp-sum
                    merged_lse = torch.logaddexp(partial[0][1], partial[1][1])
                    merged = sum(o.to(accumulate) * (lse_of_block - merged_lse).exp().unsqueeze(-1)
                                 for o, lse_of_block in partial)
                out_by_head[row : row + 1, :, queries] = merged
                lse[row : row + 1, :, queries] = merged_lse
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.layout, ctx.scaling = layout, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        grad_query = torch.zeros_like(out).transpose(1, 2)  # (R, H, T, d) over (R, T, H, d) memory, as query is
        grad_key, grad_value = torch.zeros_like(key), torch.zeros_like(value)
        grad_by_head, out_by_head = grad_out.transpose(1, 2), out.transpose(1, 2)
        for row in range(query.shape[0]):
            r = slice(row, row + 1)
            for group in row_blocks(ctx.layout, row):
                for queries, keys, causal in group:
                    dq, dk, dv = _flash_backward(
                        grad_by_head[r, :, queries], query[r, :, queries], key[r, :, keys], value[r, :, keys],
                        out_by_head[r, :, queries], lse[r, :, queries], 0.0, causal, scale=ctx.scaling,
                    )
                    grad_query[r, :, queries] += dq
                    grad_key[r, :, keys] += dk
                    grad_value[r, :, keys] += dv
        return grad_query, grad_key, grad_value, None, None


def merged_blocks_apply(query: Tensor, dropout: float) -> bool:
    """Whether ``SharedRowsAttention`` runs these rows: CPU tensors and no attention dropout (the CPU flash kernel's
    limits); otherwise the replaying path does."""
    return query.device.type == "cpu" and dropout == 0.0


def shared_prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    shared_prefix_layout: SharedPrefixLayout | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """A transformers attention function: sdpa, or, given ``shared_prefix_layout``, the attention of shared rows.

    Args: as transformers' ``sdpa_attention_forward`` (``query`` ``(R, H, T, d)``, ``key``/``value``
    ``(R, H_kv, T, d)``); with a layout the mask must be None and no cache may be in use. Under ``torch.compile``
    transformers cannot see that preftune's 2-D mask is all ones and builds the causal mask of it: with a layout that
    mask is dropped (the layout says more), and the attention of the rows runs uncompiled.

    Returns:
        ``((R, T, H, d) attention output, None)``; with a layout, padding positions get zeros.

    Raises:
        ValueError: a layout together with a mask, a cache, a sliding window shorter than a row, or a layout that
            does not fit the batch (rows or lengths).
    """
    if shared_prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layout, (rows, _, length, _) = shared_prefix_layout, query.shape
    if torch.compiler.is_compiling():
        attention_mask = None
    if attention_mask is not None or key.shape[2] != length:
        raise ValueError("shared-prefix attention takes no attention mask and no cache (the layout replaces both)")
    if len(layout.prompt_lengths) != rows or any(layout.real_length(r) > length for r in range(rows)):
        raise ValueError(f"shared-prefix layout of {len(layout.prompt_lengths)} rows does not fit a batch of {rows} x {length}")
    window = kwargs.get("sliding_window")
    if window is not None and any(layout.real_length(r) > window for r in range(rows)):
        raise ValueError(f"shared-prefix attention does not implement a sliding window ({window} tokens) shorter than a row")
    return _shared_rows_output(module, query, key, value, layout, dropout, scaling), None


def _autocast_inputs(query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Query, key and value in one dtype, as ``F.scaled_dot_product_attention`` gets them under autocast.

    Under bf16/fp16 autocast the projections come out in low precision but rotary embeddings promote query and key
    back to float32; the raw flash kernels the merged key blocks call are not autocast ops and refuse mixed dtypes.
    """
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    return query.to(dtype), key.to(dtype), value.to(dtype)


@torch.compiler.disable  # loops over each batch's lengths: compiled, it would recompile for every batch
def _shared_rows_output(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, layout: SharedPrefixLayout, dropout: float,
    scaling: float | None,
) -> Tensor:
    if merged_blocks_apply(query, dropout):
        query, key, value = _autocast_inputs(query, key, value)
        return SharedRowsAttention.apply(query, key, value, layout, scaling)
    rows = query.shape[0]
    return torch.stack(
        [_replayed_row_attention(module, query, key, value, layout, r, dropout, scaling) for r in range(rows)]
    )


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX_ATTENTION, sdpa_mask)


def _sliding_window_in_use(config: object) -> bool:
    if getattr(config, "sliding_window", None) is None:
        return False
    layer_types: Sequence[str] | None = getattr(config, "layer_types", None)
    if layer_types is not None:  # qwen2/qwen3 keep the value but use it only on "sliding_attention" layers
        return any(kind != "full_attention" for kind in layer_types)
    return True


def _language_config(model: nn.Module) -> tuple[object, bool]:
    """``(config of the attention that shared rows go through, whether the model is vision-language)``: a
    vision-language model's ``text_config`` (its vision encoder keeps its own attention), else the model's config."""
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        return config.text_config, True
    return config, False


def supports_shared_prefix_attention(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers causal LM or vision-language model, already unwrapped from DDP/PEFT) can run
    shared rows through ``shared_prefix_attention``: a tested model type (``SHARED_PREFIX_MODEL_TYPES``, or for a
    vision-language model ``SHARED_PREFIX_VISION_MODEL_TYPES`` with its language model's type), sdpa attention in
    the language model (or already switched) and no sliding window in use."""
    config, vision = _language_config(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    tested = SHARED_PREFIX_VISION_MODEL_TYPES.get(model_type, frozenset()) if vision else SHARED_PREFIX_MODEL_TYPES
    return (
        getattr(config, "model_type", None) in tested
        and getattr(config, "_attn_implementation", None) in ("sdpa", SHARED_PREFIX_ATTENTION)
        and not _sliding_window_in_use(config)
    )


def use_shared_prefix_attention(model: nn.Module) -> bool:
    """Switch ``model`` (unwrapped) to ``SHARED_PREFIX_ATTENTION`` when supported; True when it now uses it.

    Idempotent. The switch stays (it must: gradient checkpointing recomputes attention during the backward, after
    the forward has returned) and changes nothing for forwards that pass no ``shared_prefix_layout``. A
    vision-language model switches its language model only: the ``shared_prefix_layout`` keyword also reaches the
    vision encoder's attention, which stays sdpa and ignores it.
    """
    if not supports_shared_prefix_attention(model):
        return False
    config, vision = _language_config(model)
    if config._attn_implementation != SHARED_PREFIX_ATTENTION:
        model.set_attn_implementation({"text_config": SHARED_PREFIX_ATTENTION} if vision else SHARED_PREFIX_ATTENTION)
    return _language_config(model)[0]._attn_implementation == SHARED_PREFIX_ATTENTION
