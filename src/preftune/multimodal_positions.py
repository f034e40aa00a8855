"""Position ids of shared rows with images for models with multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

These models give every token three position ids (temporal, height, width): text tokens count up as usual, an
image's tokens take their place in the image's grid, and the text after an image continues from the grid's extent,
not from the number of image tokens. A completion's positions therefore depend on the images in its prompt. The
model computes them itself (its ``get_rope_index``) for a plain row ``prompt | completion``; a shared row
``prompt | completion 0 | … | completion K-1`` must give completion k the positions it has in ``prompt |
completion k``. ``shared_rope_position_ids`` gets them exactly: it lays the shared rows out as the plain rows they
stand for, runs the model's own ``get_rope_index`` on those, and copies each piece's positions into its place in the
shared row. Models with plain 1-D positions (LLaVA) need nothing of this: ``collate_shared_prefix``'s positions are
theirs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from preftune.data.collate import PreferenceBatch

RopeIndex = Callable[..., tuple[Tensor, Tensor]]


def rope_index_of(model: nn.Module) -> RopeIndex | None:
    """The multimodal RoPE index function of a model (unwrapped from DDP/PEFT): ``get_rope_index`` on the model or
    on its inner ``model`` (Qwen-VL's ForConditionalGeneration keeps it there); None for a model without one."""
    for candidate in (model, getattr(model, "model", None)):
        function = getattr(candidate, "get_rope_index", None)
        if callable(function):
            return function
    return None


def needs_rope_index(batch: PreferenceBatch) -> bool:
    """Whether ``batch`` is shared rows with images laid out in grids (``image_grid_thw``: multimodal RoPE)."""
    return batch.segments is not None and "image_grid_thw" in batch.model_inputs


def as_plain_rows(batch: PreferenceBatch) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, mm_token_type_ids, attention_mask)``, each ``(K·B, T')``, of the plain rows ``prompt |
    completion k`` that a shared batch's rows stand for: row ``kB + i`` is example i with completion k, right-padded
    (``collate_pairs``' order)."""
    segments = batch.segments.tolist()
    types = batch.model_inputs["mm_token_type_ids"]
    device = batch.input_ids.device
    pieces: list[tuple[Tensor, Tensor]] = []
    for k in range(batch.num_completions):
        for row, (prompt, *completions) in enumerate(segments):
            start = prompt + sum(completions[:k])
            own = torch.arange(start, start + completions[k], device=device)
            span = torch.cat([torch.arange(prompt, device=device), own])
            pieces.append((batch.input_ids[row, span], types[row, span]))
    length = max(ids.shape[0] for ids, _ in pieces)
    input_ids = batch.input_ids.new_zeros(len(pieces), length)
    type_ids = types.new_zeros(len(pieces), length)
    mask = batch.input_ids.new_zeros(len(pieces), length)
    for index, (ids, kinds) in enumerate(pieces):
        input_ids[index, : ids.shape[0]], type_ids[index, : ids.shape[0]], mask[index, : ids.shape[0]] = ids, kinds, 1
    return input_ids, type_ids, mask


def shared_rope_position_ids(rope_index: RopeIndex, batch: PreferenceBatch) -> Tensor:
    """``(3, B, T)`` position ids of a shared batch with images (``needs_rope_index``): the prompt's and completion
    0's from the plain row ``prompt | completion 0``, completion k's from ``prompt | completion k``, each as the
    model's ``rope_index`` gives them for the plain rows (``as_plain_rows``); 0 on padding (which no real token sees).

    The plain rows hold every example's images once per completion, so ``image_grid_thw`` (the shared batch's grids,
    in example order) is repeated K times, as the plain layout's own batch would carry it.
    """
    input_ids, type_ids, mask = as_plain_rows(batch)
    grids = batch.model_inputs["image_grid_thw"].repeat(batch.num_completions, 1)
    plain, _ = rope_index(input_ids=input_ids, mm_token_type_ids=type_ids, image_grid_thw=grids, attention_mask=mask)
    rows = batch.num_pairs
    positions = plain.new_zeros(plain.shape[0], *batch.input_ids.shape)
    for row, (prompt, *completions) in enumerate(batch.segments.tolist()):
        positions[:, row, : prompt + completions[0]] = plain[:, row, : prompt + completions[0]]
        start = prompt + completions[0]
        for k, length in enumerate(completions[1:], start=1):
            positions[:, row, start : start + length] = plain[:, k * rows + row, prompt : prompt + length]
            start += length
    return positions
