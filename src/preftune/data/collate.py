"""Collation: tokenized pairs → one padded batch with chosen and rejected stacked for a single forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class PreferenceBatch:
    """B preference pairs as 2B right-padded sequences: rows ``[0, B)`` are prompt+chosen, ``[B, 2B)`` prompt+rejected.

    Attributes:
        input_ids: ``(2B, T)`` token ids, padded on the right with the pad id.
        attention_mask: ``(2B, T)`` 1 on real tokens, 0 on padding.
        completion_mask: ``(2B, T)`` 1 on completion (response) tokens — the only ones scored.
        rows: the B source row ids, for messages that name the rows of a bad batch.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    rows: list[int] = field(default_factory=list)

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens in the batch, chosen and rejected sequences together."""
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            rows=self.rows,
        )


def _pad_right(sequences: Sequence[list[int]], value: int, length: int) -> Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def collate_pairs(examples: Sequence[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Stack tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, optional ``row``) into a batch.

    Sequences are already truncated by the tokenizer step; here they are only concatenated and padded.
    """
    chosen = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples]
    rejected = [ex["prompt_ids"] + ex["rejected_ids"] for ex in examples]
    masks = [[0] * len(ex["prompt_ids"]) + [1] * len(ex["chosen_ids"]) for ex in examples]
    masks += [[0] * len(ex["prompt_ids"]) + [1] * len(ex["rejected_ids"]) for ex in examples]
    sequences = chosen + rejected
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return PreferenceBatch(
        input_ids=_pad_right(sequences, pad_token_id, length),
        attention_mask=_pad_right([[1] * len(s) for s in sequences], 0, length),
        completion_mask=_pad_right(masks, 0, length),
        rows=[int(ex.get("row", i)) for i, ex in enumerate(examples)],
    )
