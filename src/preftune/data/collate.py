"""Collation: tokenized pairs → one batch for a single forward pass, plus a plan of which tokens to score.

Two layouts, same contract (``PreferenceBatch``):

- ``collate_pairs`` (plain): 2B right-padded rows, ``[0, B)`` prompt+chosen and ``[B, 2B)`` prompt+rejected.
- ``collate_shared_prefix`` (prefix sharing, Wang & Hegde 2024): B rows ``prompt | chosen | rejected``; the
  prompt is computed once. A 4-D mask lets the rejected tokens attend to the prompt and to earlier rejected
  tokens but not to the chosen response, and their position ids restart right after the prompt, so every
  token sees exactly the context and positions it has in the plain layout.

The scoring plan names, for every completion token, the row and position of the hidden state that predicts it
(the previous token of *its own* sequence — for the first rejected token that is the last prompt token) and
the sequence it belongs to (chosen of pair i → i, rejected of pair i → B + i).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class PreferenceBatch:
    """B preference pairs laid out for one forward pass.

    Attributes:
        input_ids: ``(R, T)`` token ids (R = 2B rows plain, B rows with prefix sharing), right-padded.
        attention_mask: ``(R, T)`` 1 on real tokens (plain), or ``(R, 1, T, T)`` bool, True where a query
            position may attend to a key position (prefix sharing).
        position_ids: ``(R, T)`` or None (then 0..T-1 per row).
        score_rows, score_positions: ``(N,)`` where the hidden state predicting each scored token is.
        score_labels: ``(N,)`` the scored (completion) token ids.
        score_sequences: ``(N,)`` in ``[0, 2B)``: chosen of pair i is i, rejected of pair i is B + i.
        num_pairs: B.
        num_tokens: tokens of prompt+chosen and prompt+rejected (the plain layout's count, whatever the
            layout, so tokens/s compares across layouts).
        rows: the B source row ids, for messages that name the rows of a bad batch.
        row_lengths: real length of each row; with ``padding_free`` the forward runs one row at a time,
            each cut to its own length, so no padding is ever computed (None: one padded forward).
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor | None
    score_rows: Tensor
    score_positions: Tensor
    score_labels: Tensor
    score_sequences: Tensor
    num_pairs: int
    num_tokens: int
    rows: list[int] = field(default_factory=list)
    row_lengths: list[int] | None = None

    def without_padding(self) -> "PreferenceBatch":
        """The same batch, marked to be forwarded row by row at each row's own length."""
        if self.attention_mask.dim() == 2:
            lengths = self.attention_mask.sum(-1)
        else:  # 4-D: every real query attends to key 0 (the first prompt token); padding queries only to themselves
            lengths = self.attention_mask[:, 0, :, 0].sum(-1)
        return replace(self, row_lengths=[int(n) for n in lengths.tolist()])

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids),
            score_rows=move(self.score_rows),
            score_positions=move(self.score_positions),
            score_labels=move(self.score_labels),
            score_sequences=move(self.score_sequences),
        )


def _pad_right(sequences: Sequence[Sequence[int]], value: int, length: int) -> Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return out


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


class _Plan:
    """Collects scoring entries: (row, position of the predicting hidden state, label, sequence)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.positions: list[int] = []
        self.labels: list[int] = []
        self.sequences: list[int] = []

    def add(self, row: int, first_source: int, labels: Sequence[int], sequence: int, *, first_label_source: int | None = None) -> None:
        """Score ``labels``; label k is predicted from position ``first_source + k`` of ``row``.

        ``first_label_source`` overrides the source of label 0 (prefix sharing: the last prompt token).
        """
        for k, label in enumerate(labels):
            self.rows.append(row)
            self.positions.append(first_label_source if (k == 0 and first_label_source is not None) else first_source + k)
            self.labels.append(int(label))
            self.sequences.append(sequence)

    def tensors(self) -> dict[str, Tensor]:
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return {
            "score_rows": as_long(self.rows),
            "score_positions": as_long(self.positions),
            "score_labels": as_long(self.labels),
            "score_sequences": as_long(self.sequences),
        }


def _logical_tokens(examples: Sequence[dict]) -> int:
    return sum(2 * len(ex["prompt_ids"]) + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples)


def collate_pairs(examples: Sequence[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Plain layout: stack prompt+chosen rows, then prompt+rejected rows, padded on the right.

    Examples carry ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (already truncated) and optionally ``row``.
    """
    n = len(examples)
    sequences = [ex["prompt_ids"] + ex["chosen_ids"] for ex in examples]
    sequences += [ex["prompt_ids"] + ex["rejected_ids"] for ex in examples]
    plan = _Plan()
    for i, ex in enumerate(examples):
        prompt_length = len(ex["prompt_ids"])
        plan.add(i, prompt_length - 1, ex["chosen_ids"], i)
        plan.add(n + i, prompt_length - 1, ex["rejected_ids"], n + i)
    length = _padded_length(max(len(s) for s in sequences), pad_to_multiple_of)
    return PreferenceBatch(
        input_ids=_pad_right(sequences, pad_token_id, length),
        attention_mask=_pad_right([[1] * len(s) for s in sequences], 0, length),
        position_ids=None,
        num_pairs=n,
        num_tokens=_logical_tokens(examples),
        rows=[int(ex.get("row", i)) for i, ex in enumerate(examples)],
        **plan.tensors(),
    )


def shared_prefix_mask(prompt_length: int, chosen_length: int, rejected_length: int, total_length: int) -> Tensor:
    """``(T, T)`` bool: causal, except rejected queries never see chosen keys; padding sees nothing but itself.

    Padding rows attend to themselves only, so that no softmax runs over an empty set.
    """
    real = prompt_length + chosen_length + rejected_length
    allowed = torch.zeros(total_length, total_length, dtype=torch.bool)
    allowed[:real, :real] = torch.tril(torch.ones(real, real, dtype=torch.bool))
    chosen_end = prompt_length + chosen_length
    allowed[chosen_end:real, prompt_length:chosen_end] = False
    padding = torch.arange(real, total_length)
    allowed[padding, padding] = True
    return allowed


def collate_shared_prefix(examples: Sequence[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Prefix-sharing layout: one row ``prompt | chosen | rejected`` per pair (see the module docstring)."""
    n = len(examples)
    sequences, positions, plan = [], [], _Plan()
    for i, ex in enumerate(examples):
        p, c, r = len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"])
        sequences.append(ex["prompt_ids"] + ex["chosen_ids"] + ex["rejected_ids"])
        positions.append(list(range(p + c)) + list(range(p, p + r)))
        plan.add(i, p - 1, ex["chosen_ids"], i)
        # Rejected label k (k ≥ 1) follows rejected token k-1 at row position p+c+k-1; label 0 follows the prompt.
        plan.add(i, p + c - 1, ex["rejected_ids"], n + i, first_label_source=p - 1)
    length = _padded_length(max(len(s) for s in sequences), pad_to_multiple_of)
    position_ids = _pad_right(positions, 0, length)
    for i, seq in enumerate(sequences):  # padding continues the positions; its values never reach real tokens
        position_ids[i, len(seq) :] = torch.arange(len(seq), length)
    masks = torch.stack(
        [
            shared_prefix_mask(len(ex["prompt_ids"]), len(ex["chosen_ids"]), len(ex["rejected_ids"]), length)
            for ex in examples
        ]
    )
    return PreferenceBatch(
        input_ids=_pad_right(sequences, pad_token_id, length),
        attention_mask=masks[:, None],
        position_ids=position_ids,
        num_pairs=n,
        num_tokens=_logical_tokens(examples),
        rows=[int(ex.get("row", i)) for i, ex in enumerate(examples)],
        **plan.tensors(),
    )
