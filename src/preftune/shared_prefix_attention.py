"""Prefix-sharing attention with memory linear in length: no ``T × T`` mask, no masked attention kernel.

A shared row is ``prompt | completion 0 | … | completion K-1`` (``preftune.data.collate.collate_shared_prefix``):
completion k must see the prompt and its own earlier tokens, never another completion. A dense 4-D mask says
this with ``T × T`` booleans per row, which transformers turns into a float mask and which forces a masked kernel;
its memory grows like ``T²``. This module computes the same attention from the row's lengths alone:

- ``prompt | completion 0`` is one causal ``scaled_dot_product_attention`` call (``is_causal=True``);
- completion k ≥ 1 is one causal call over the concatenation ``prompt | completion k`` of queries, keys and values,
  of which only the completion's outputs are kept: the prompt's queries are replayed (their attention is
  recomputed, ``P² / 2`` pairs per extra completion) so that every call is square and causal. Their outputs are
  discarded, so no gradient flows through them, and every kept output sees exactly the keys, in the same order, that
  it sees in the plain layout.

Every tensor is ``O(T)`` (per head); the kernels are the causal ones (flash on CPU and CUDA).

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


def _shared_row_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, layout: SharedPrefixLayout, row: int,
    dropout: float, scaling: float | None,
) -> Tensor:
    """``(T, H, d)`` attention output of one shared row (zeros on padding)."""
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
    ``(R, H_kv, T, d)``); with a layout the mask must be None and no cache may be in use.

    Returns:
        ``((R, T, H, d) attention output, None)``; with a layout, padding positions get zeros.

    Raises:
        ValueError: a layout together with a mask, a cache, a sliding window shorter than a row, or a layout that
            does not fit the batch (rows or lengths).
    """
    if shared_prefix_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layout, (rows, _, length, _) = shared_prefix_layout, query.shape
    if attention_mask is not None or key.shape[2] != length:
        raise ValueError("shared-prefix attention takes no attention mask and no cache (the layout replaces both)")
    if len(layout.prompt_lengths) != rows or any(layout.real_length(r) > length for r in range(rows)):
        raise ValueError(f"shared-prefix layout of {len(layout.prompt_lengths)} rows does not fit a batch of {rows} x {length}")
    window = kwargs.get("sliding_window")
    if window is not None and any(layout.real_length(r) > window for r in range(rows)):
        raise ValueError(f"shared-prefix attention does not implement a sliding window ({window} tokens) shorter than a row")
    output = torch.stack(
        [_shared_row_attention(module, query, key, value, layout, r, dropout, scaling) for r in range(rows)]
    )
    return output, None


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
