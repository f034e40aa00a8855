"""Which rows go into which micro-batch: by pair count, or by a token budget.

By pair count (the default), an epoch's rows are shuffled with a seed and cut into groups of ``batch_size``.

By token budget (``max_tokens_per_batch``, as fairseq's ``max_tokens``), rows are sorted by length once and
packed greedily into micro-batches whose tokens stay within the budget (and whose pairs stay within
``batch_size``); each epoch then shuffles the order of these micro-batches. The partition is the same in every
epoch, so the number of optimizer steps is known before training starts, and rows of similar length share a
batch, which keeps padding small. A row longer than the budget gets a micro-batch of its own.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch

COMPLETION_COLUMNS = ("chosen_ids", "rejected_ids", "completion_ids")


def _column_lengths(column: pa.ChunkedArray | pa.Array) -> list[int]:
    """Token count per row of a list column; list-of-lists columns (several negatives) are summed per row."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_list(array.type.value_type) or pa.types.is_large_list(array.type.value_type):
        inner = pc.list_value_length(array.flatten()).to_numpy(zero_copy_only=False)
        offsets = array.offsets.to_numpy()
        return [int(inner[start:end].sum()) for start, end in zip(offsets[:-1], offsets[1:])]
    return pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(int).tolist()


def row_token_counts(dataset, *, prompt_once: bool) -> list[int]:
    """Tokens each row of a tokenized dataset puts through the forward pass (padding not counted).

    ``prompt_once`` (prefix sharing): the prompt is laid out once per row; otherwise once per completion.
    """
    table = dataset.with_format("arrow")[:]
    prompt = _column_lengths(table.column("prompt_ids"))
    completion_tokens = [0] * len(prompt)
    completions = [0] * len(prompt)
    for name in COMPLETION_COLUMNS:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        nested = pa.types.is_list(column.type.value_type) or pa.types.is_large_list(column.type.value_type)
        counts = pc.list_value_length(column).to_numpy(zero_copy_only=False) if nested else [1] * len(prompt)
        for row, length in enumerate(_column_lengths(column)):
            completion_tokens[row] += length
            completions[row] += int(counts[row])
    return [p + c if prompt_once else p * n + c for p, c, n in zip(prompt, completion_tokens, completions)]


def token_budget_groups(token_counts: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Partition rows into groups of ≤ ``max_tokens`` tokens and ≤ ``max_rows`` rows, longest rows first.

    Rows are ordered by length (ties by index), then filled greedily; a row alone over the budget forms its
    own group. Deterministic: the same counts give the same groups.
    """
    order = sorted(range(len(token_counts)), key=lambda row: (-token_counts[row], row))
    groups: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for row in order:
        tokens = token_counts[row]
        if current and (current_tokens + tokens > max_tokens or len(current) == max_rows):
            groups.append(current)
            current, current_tokens = [], 0
        current.append(row)
        current_tokens += tokens
    if current:
        groups.append(current)
    return groups


def shuffled(items: list, seed: int | None) -> list:
    """``items`` in a seeded random order (unchanged when ``seed`` is None)."""
    if seed is None:
        return list(items)
    permutation = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in permutation]


def plan_batches(
    num_rows: int,
    batch_size: int,
    *,
    shuffle_seed: int | None,
    drop_last: bool,
    token_counts: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Row indices of each micro-batch of one epoch.

    Without ``max_tokens``: rows shuffled by ``shuffle_seed`` (kept in order when None), cut into groups of
    ``batch_size``; ``drop_last`` drops a short last group. With ``max_tokens`` (and ``token_counts``): the
    token-budget partition (see the module docstring), its groups shuffled by ``shuffle_seed``; ``drop_last``
    does not apply (groups differ in size by design).
    """
    if max_tokens is not None:
        if token_counts is None or len(token_counts) != num_rows:
            raise ValueError("token-budget batching needs one token count per row")
        return shuffled(token_budget_groups(token_counts, max_tokens, batch_size), shuffle_seed)
    order = shuffled(list(range(num_rows)), shuffle_seed)
    groups = [order[start : start + batch_size] for start in range(0, num_rows, batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    return groups
