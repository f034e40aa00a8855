"""Collation: tokenized examples → one batch for a single forward pass, plus a plan of which tokens to score.

An example is a prompt with K completions (``completions_of``): a pair is ``[chosen, rejected]`` (K = 2), a
pair with M negatives ``[chosen, rejected_1, …, rejected_M]`` (K = M + 1), an unpaired (KTO) row
``[completion]`` (K = 1). Every example of a batch has the same K.

Two layouts, same contract (``PreferenceBatch``):

- ``collate_pairs`` (plain): K·B right-padded rows; rows ``[kB, (k+1)B)`` hold prompt + completion k.
- ``collate_shared_prefix`` (prefix sharing, Wang & Hegde 2024): B rows ``prompt | completion 0 | … |
  completion K-1``; the prompt is computed once. Each completion's tokens attend to the prompt and to earlier
  tokens of the same completion only, and their position ids restart right after the prompt, so every token sees
  exactly the context and positions it has in the plain layout. The batch says where the pieces are
  (``segments``: the lengths, O(B·K)); the forward turns them into attention either without any mask
  (``preftune.shared_prefix_attention``, memory linear in length) or, for a model that cannot take that, into the
  dense ``(B, 1, T, T)`` mask of ``dense_shared_prefix_mask``.

The scoring plan names, for every completion token, the row and position of the hidden state that predicts it
(the previous token of *its own* sequence — for the first token of a later completion that is the last prompt
token), the sequence it belongs to (completion k of example i → kB + i: chosen of pair i → i, rejected → B + i)
and its index within that completion.
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
        attention_mask: ``(R, T)`` 1 on real tokens (both layouts; with prefix sharing ``segments`` says who sees
            whom), or ``(R, 1, T, T)`` bool, True where a query position may attend to a key position (a dense
            prefix-sharing mask, ``dense_shared_prefix_mask``).
        position_ids: ``(R, T)`` or None (then 0..T-1 per row).
        score_rows, score_positions: ``(N,)`` where the hidden state predicting each scored token is.
        score_labels: ``(N,)`` the scored (completion) token ids.
        score_sequences: ``(N,)`` in ``[0, KB)``: completion k of example i is kB + i (chosen of pair i is i,
            rejected of pair i is B + i).
        score_offsets: ``(N,)`` index of each scored token within its completion (0 for the first).
        num_pairs: B, the examples (pairs, or unpaired rows).
        num_tokens: tokens of prompt + completion summed over the K completions (the plain layout's count,
            whatever the layout, so tokens/s compares across layouts).
        rows: the B source row ids, for messages that name the rows of a bad batch.
        row_lengths: real length of each row; with ``padding_free`` the forward runs one row at a time,
            each cut to its own length, so no padding is ever computed (None: one padded forward).
        num_completions: K, completions per example (2 for a pair, M + 1 with M negatives, 1 unpaired).
        labels: ``(B,)`` bool, desirable or not, for unpaired (KTO) examples; None otherwise.
        ref_logps: ``(K, B)`` precomputed reference log-probs of every completion when the examples carry a
            ``ref_logps`` column (``precompute_ref_log_probs``); None otherwise.
        segments: ``(R, 1 + K)`` with prefix sharing: each row's prompt length, then its completions' lengths
            (the row is ``prompt | completion 0 | … | completion K-1 | padding``); None in the plain layout.
        model_inputs: further inputs of the forward, by keyword, for rows with images (``preftune.data.images``:
            ``pixel_values`` of every row's images in row order, ``image_grid_thw``, ``mm_token_type_ids``
            ``(R, T)``); empty for text. A batch with them is forwarded in one piece.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor | None
    score_rows: Tensor
    score_positions: Tensor
    score_labels: Tensor
    score_sequences: Tensor
    score_offsets: Tensor
    num_pairs: int
    num_tokens: int
    rows: list[int] = field(default_factory=list)
    row_lengths: list[int] | None = None
    num_completions: int = 2
    labels: Tensor | None = None
    ref_logps: Tensor | None = None
    segments: Tensor | None = None
    model_inputs: dict[str, Tensor] = field(default_factory=dict)

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
            score_offsets=move(self.score_offsets),
            labels=move(self.labels),
            ref_logps=move(self.ref_logps),
            segments=move(self.segments),
            model_inputs={key: move(value) for key, value in self.model_inputs.items()},
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
    """Collects scoring entries: (row, position of the predicting hidden state, label, sequence, offset)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.positions: list[int] = []
        self.labels: list[int] = []
        self.sequences: list[int] = []
        self.offsets: list[int] = []

    def add(self, row: int, first_source: int, labels: Sequence[int], sequence: int, *, first_label_source: int | None = None) -> None:
        """Score ``labels``; label k is predicted from position ``first_source + k`` of ``row``.

        ``first_label_source`` overrides the source of label 0 (prefix sharing: the last prompt token).
        """
        for k, label in enumerate(labels):
            self.rows.append(row)
            self.positions.append(first_label_source if (k == 0 and first_label_source is not None) else first_source + k)
            self.labels.append(int(label))
            self.sequences.append(sequence)
            self.offsets.append(k)

    def tensors(self) -> dict[str, Tensor]:
        as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return {
            "score_rows": as_long(self.rows),
            "score_positions": as_long(self.positions),
            "score_labels": as_long(self.labels),
            "score_sequences": as_long(self.sequences),
            "score_offsets": as_long(self.offsets),
        }


def completions_of(example: dict) -> list[Sequence[int]]:
    """The completions of a tokenized example, in sequence order: ``[chosen, rejected…]`` or ``[completion]``."""
    if "completion_ids" in example:
        return [example["completion_ids"]]
    rejected = example["rejected_ids"]
    negatives = list(rejected) if len(rejected) and not isinstance(rejected[0], int) else [rejected]
    return [example["chosen_ids"], *negatives]


def _completions_per_example(examples: Sequence[dict]) -> list[list[Sequence[int]]]:
    completions = [completions_of(ex) for ex in examples]
    counts = {len(c) for c in completions}
    if len(counts) != 1:
        raise ValueError(f"examples of one batch must have the same number of completions, got {sorted(counts)}")
    return completions


def _logical_tokens(examples: Sequence[dict], completions: list[list[Sequence[int]]]) -> int:
    return sum(len(ex["prompt_ids"]) * len(c) + sum(map(len, c)) for ex, c in zip(examples, completions))


def _rows(examples: Sequence[dict]) -> list[int]:
    return [int(ex.get("row", i)) for i, ex in enumerate(examples)]


def _labels(examples: Sequence[dict]) -> Tensor | None:
    return torch.tensor([bool(ex["label"]) for ex in examples]) if "label" in examples[0] else None


def _ref_logps(examples: Sequence[dict]) -> Tensor | None:
    """``(K, B)`` from each example's precomputed ``ref_logps`` (K floats), or None when there are none."""
    if "ref_logps" not in examples[0]:
        return None
    return torch.tensor([list(ex["ref_logps"]) for ex in examples], dtype=torch.float32).T.contiguous()


def mismatched_examples(examples: Sequence[dict], max_length: int | None = None) -> list[dict]:
    """KTO's KL examples: each row's prompt with the mismatched completion it carries (``kl_completion_ids``, another
    row's completion chosen when the data was prepared: ``preftune.data.kto``), cut to fit ``max_length`` with that
    prompt (keeping its start, at least one token, as TRL's collator)."""
    shifted = []
    for i, example in enumerate(examples):
        completion = list(example["kl_completion_ids"])
        if max_length is not None:
            completion = completion[: max(1, max_length - len(example["prompt_ids"]))]
        shifted.append({"prompt_ids": example["prompt_ids"], "completion_ids": completion, "row": example.get("row", i)})
    return shifted


def collate_pairs(examples: Sequence[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Plain layout: for each completion k, a block of B rows prompt + completion k, padded on the right.

    Examples carry ``prompt_ids`` and ``chosen_ids``/``rejected_ids`` (a list of lists for several negatives) or
    ``completion_ids`` (already truncated), and optionally ``row``.
    """
    n = len(examples)
    completions = _completions_per_example(examples)
    k_count = len(completions[0])
    sequences, plan = [], _Plan()
    for k in range(k_count):
        for i, ex in enumerate(examples):
            sequences.append(list(ex["prompt_ids"]) + list(completions[i][k]))
            plan.add(k * n + i, len(ex["prompt_ids"]) - 1, completions[i][k], k * n + i)
    length = _padded_length(max(len(s) for s in sequences), pad_to_multiple_of)
    return PreferenceBatch(
        input_ids=_pad_right(sequences, pad_token_id, length),
        attention_mask=_pad_right([[1] * len(s) for s in sequences], 0, length),
        position_ids=None,
        num_pairs=n,
        num_tokens=_logical_tokens(examples, completions),
        rows=_rows(examples),
        num_completions=k_count,
        labels=_labels(examples),
        ref_logps=_ref_logps(examples),
        **plan.tensors(),
    )


def branch_mask(prompt_length: int, branch_lengths: Sequence[int], total_length: int) -> Tensor:
    """``(T, T)`` bool for ``prompt | branch 0 | branch 1 | …``: causal, except that each branch sees the prompt
    and itself only; padding sees nothing but itself (so that no softmax runs over an empty set)."""
    real = prompt_length + sum(branch_lengths)
    allowed = torch.zeros(total_length, total_length, dtype=torch.bool)
    allowed[:real, :real] = torch.tril(torch.ones(real, real, dtype=torch.bool))
    start = prompt_length
    for length in branch_lengths:
        allowed[start + length : real, start : start + length] = False  # later branches never see this one
        start += length
    padding = torch.arange(real, total_length)
    allowed[padding, padding] = True
    return allowed


def shared_prefix_mask(prompt_length: int, chosen_length: int, rejected_length: int, total_length: int) -> Tensor:
    """``branch_mask`` of one pair: causal, except rejected queries never see chosen keys."""
    return branch_mask(prompt_length, [chosen_length, rejected_length], total_length)


def dense_shared_prefix_mask(segments: Tensor, length: int) -> Tensor:
    """``(R, 1, length, length)`` bool ``branch_mask`` of each shared row from its ``(R, 1 + K)`` segment lengths:
    the mask a model without ``preftune.shared_prefix_attention`` needs (memory ``R·length²``)."""
    rows = segments.tolist()
    return torch.stack([branch_mask(row[0], row[1:], length) for row in rows])[:, None]


def collate_shared_prefix(examples: Sequence[dict], *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> PreferenceBatch:
    """Prefix-sharing layout: one row ``prompt | completion 0 | … | completion K-1`` per example (module docstring)."""
    n = len(examples)
    completions = _completions_per_example(examples)
    sequences, positions, plan = [], [], _Plan()
    for i, ex in enumerate(examples):
        p = len(ex["prompt_ids"])
        sequence, position = list(ex["prompt_ids"]), list(range(p))
        for k, completion in enumerate(completions[i]):
            # Label j (j ≥ 1) follows completion token j-1 at row position start+j-1; label 0 follows the prompt.
            start = len(sequence)
            plan.add(i, start - 1, completion, k * n + i, first_label_source=p - 1)
            sequence += list(completion)
            position += list(range(p, p + len(completion)))
        sequences.append(sequence)
        positions.append(position)
    length = _padded_length(max(len(s) for s in sequences), pad_to_multiple_of)
    position_ids = _pad_right(positions, 0, length)
    for i, seq in enumerate(sequences):  # padding continues the positions; its values never reach real tokens
        position_ids[i, len(seq) :] = torch.arange(len(seq), length)
    segments = torch.tensor([[len(ex["prompt_ids"])] + [len(c) for c in completions[i]] for i, ex in enumerate(examples)])
    return PreferenceBatch(
        input_ids=_pad_right(sequences, pad_token_id, length),
        attention_mask=_pad_right([[1] * len(s) for s in sequences], 0, length),
        segments=segments,
        position_ids=position_ids,
        num_pairs=n,
        num_tokens=_logical_tokens(examples, completions),
        rows=_rows(examples),
        num_completions=len(completions[0]),
        labels=_labels(examples),
        ref_logps=_ref_logps(examples),
        **plan.tensors(),
    )
