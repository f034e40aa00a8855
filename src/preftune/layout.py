"""Which batch layout a batch runs in when ``prefix_sharing`` is auto: shared rows or plain rows, per batch.

Both layouts give the same log-probs (``preftune.data.collate``); they differ in work and memory. With the
shared-prefix attention (``preftune.shared_prefix_attention``) the shared layout never computes or keeps more than
the plain one:

- position-wise work and activations (embeddings, projections, MLPs): the plain layout runs K·B rows padded to the
  longest ``prompt + completion``, the shared layout B rows padded to the longest ``prompt + Σ completions``, which
  is never longer in total (``layout_work``);
- attention: the shared layout attends over real tokens only, each completion over ``prompt + itself`` (the same
  pairs as a plain row without its padding), and keeps for the backward what one causal sdpa call over its row keeps
  (tests/test_prefix_sharing_linear.py); a padded plain batch carries a ``(K·B, 1, T, T)`` padding mask instead.

What the shared layout adds is a fixed cost per completion and row (its own attention calls in every layer), which
could matter only where rows are short and the prompt saves little. ``shared_prefix_pays`` weighs it with a constant
fitted on CPU (``benchmarks/layout_rule_sweep.py``, docs/layouts.md). Without the shared-prefix attention (eager
attention, a sliding window, another model type) the shared layout needs the dense ``(B, 1, T, T)`` mask, so it is
chosen only while that mask stays small.
"""

from __future__ import annotations

from typing import Callable, Sequence

from preftune.data.collate import PreferenceBatch, collate_pairs, collate_shared_prefix, completions_of

SHARED_ROW_OVERHEAD_TOKENS = 2
"""Fixed cost of one completion of one shared row, in tokens of position-wise work, fitted on CPU by
``benchmarks/layout_rule_sweep.py`` (1.9 tokens; docs/layouts.md): the shared rows were faster at every point
measured, down to 4-token prompts."""

DENSE_ROW_OVERHEAD_TOKENS = 64
"""The same cost for shared rows with the dense mask (models without the shared-prefix attention): their attention
is a masked kernel over the whole row, not fitted; the estimate the auto choice used before the fit."""

DENSE_MASK_MAX_ELEMENTS = 1 << 24
"""Largest dense shared-prefix mask (B·T² booleans, 16 Mi: 16 MiB bool, 64 MiB once made additive float) the auto
choice accepts for a model without the shared-prefix attention."""

Collate = Callable[..., PreferenceBatch]


def layout_work(examples: Sequence[dict]) -> tuple[int, int]:
    """``(plain, shared)`` position-wise work of one batch in tokens: padded rows x padded length of each layout."""
    completions = [completions_of(example) for example in examples]
    prompts = [len(example["prompt_ids"]) for example in examples]
    plain_length = max(p + len(c) for p, cs in zip(prompts, completions) for c in cs)
    shared_length = max(p + sum(map(len, cs)) for p, cs in zip(prompts, completions))
    rows = len(examples)
    return rows * len(completions[0]) * plain_length, rows * shared_length


def shared_prefix_pays(examples: Sequence[dict], *, shared_attention: bool = True) -> bool:
    """Whether the shared layout is the faster one for this batch (the auto rule of ``prefix_sharing``).

    With ``shared_attention`` (the model runs ``preftune.shared_prefix_attention``): shared when its work plus
    ``SHARED_ROW_OVERHEAD_TOKENS`` per row and completion is below the plain layout's work (then its memory is below
    the plain layout's too). Without it: the same with ``DENSE_ROW_OVERHEAD_TOKENS``, and only while the dense mask
    has at most ``DENSE_MASK_MAX_ELEMENTS`` elements (its memory grows like T²).
    """
    plain, shared = layout_work(examples)
    per_completion = SHARED_ROW_OVERHEAD_TOKENS if shared_attention else DENSE_ROW_OVERHEAD_TOKENS
    overhead = per_completion * len(examples) * len(completions_of(examples[0]))
    if not shared_attention and shared * (shared // len(examples)) > DENSE_MASK_MAX_ELEMENTS:
        return False
    return shared + overhead < plain


def collate_auto(
    examples: Sequence[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None, shared_attention: bool = True
) -> PreferenceBatch:
    """``collate_shared_prefix`` where ``shared_prefix_pays``, else ``collate_pairs`` (same contract)."""
    collate = collate_shared_prefix if shared_prefix_pays(examples, shared_attention=shared_attention) else collate_pairs
    return collate(examples, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def collate_for(prefix_sharing: bool | None, *, shared_attention: bool = True) -> Collate:
    """The collate function of a ``prefix_sharing`` setting: True shared, False plain, None (auto) per batch."""
    if prefix_sharing is None:
        return lambda examples, **kwargs: collate_auto(examples, shared_attention=shared_attention, **kwargs)
    return collate_shared_prefix if prefix_sharing else collate_pairs
