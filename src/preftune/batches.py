"""What the training loop iterates over: micro-batches, grouped into the windows of one optimizer step each.

A ``LazyBatch`` is a micro-batch as row indices into a tokenized dataset, collated only when used. A window is
the micro-batches of one optimizer step over all processes (``gradient_accumulation_steps`` x processes); every
process takes its ``rank_share`` of it. Two sources of windows, one interface (``windows(total_steps)`` yielding
``(epoch, window, epoch_progress)``):

- ``PlannedWindows`` (a ``datasets.Dataset``): each epoch's rows are planned by ``plan_batches`` (shuffled by
  ``seed`` + epoch, or packed by a token budget) and cut into windows; the number of steps per epoch is known
  before training.
- ``StreamingWindows`` (a ``datasets.IterableDataset``): rows are read, checked and tokenized one window at a time,
  in the stream's order (``set_epoch`` is called on each pass, as transformers' Trainer does); an exhausted
  stream starts a new pass. The run's length comes from ``max_steps``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from datasets import concatenate_datasets

from preftune.data.batching import plan_batches, row_token_counts
from preftune.data.collate import PreferenceBatch, mismatched_examples
from preftune.data.images import ImageInputs
from preftune.errors import DataError
from preftune.layout import collate_for

# Below this mean row length, one padded forward beats a loop of short per-row forwards on CPU: the
# quickstart's ~22-token rows ran 3x slower row by row, while 500-token rows (benchmark case a) ran as fast and
# used 13 % less memory.
PADDING_FREE_MIN_MEAN_ROW_TOKENS = 256

Window = list["LazyBatch"]


@dataclass
class LazyBatch:
    """A micro-batch as row indices into a tokenized dataset; ``collate()`` builds its tensors when needed."""

    dataset: Any
    indices: list[int]
    pad_token_id: int
    collate_fn: Callable[..., PreferenceBatch]
    padding_free: bool | None = False
    num_tokens: int = 0  # the collated batch's ``num_tokens`` (known once collated)

    def examples(self) -> list[dict]:
        """The tokenized rows, read from the dataset on each call (nothing is kept between micro-batches)."""
        return list(self.dataset.select(self.indices))

    def source_rows(self) -> list[int]:
        return [int(example.get("row", index)) for example, index in zip(self.examples(), self.indices)]

    def collate(self) -> PreferenceBatch:
        batch = self._layout(self.collate_fn(self.examples(), pad_token_id=self.pad_token_id))
        self.num_tokens = batch.num_tokens
        return batch

    def collate_mismatched(self, max_length: int | None) -> PreferenceBatch:
        """KTO's KL batch: each prompt with the mismatched completion its row carries (``mismatched_examples``)."""
        return self._layout(self.collate_fn(mismatched_examples(self.examples(), max_length), pad_token_id=self.pad_token_id))

    def _layout(self, batch: PreferenceBatch) -> PreferenceBatch:
        if self.padding_free is False:
            return batch
        unpadded = batch.without_padding()
        return unpadded if self.padding_free or padding_free_pays(unpadded) else batch


def padding_free_pays(batch: PreferenceBatch) -> bool:
    """Auto rule for ``padding_free``: forward row by row when rows are long enough to keep matmuls efficient."""
    lengths = batch.row_lengths if batch.row_lengths is not None else batch.without_padding().row_lengths
    return len(lengths) > 1 and sum(lengths) / len(lengths) >= PADDING_FREE_MIN_MEAN_ROW_TOKENS


@dataclass(frozen=True)
class BatchMaker:
    """How a list of row indices becomes a ``LazyBatch``: the layout (prefix sharing, padding-free), padding id,
    and for a vision-language model the image inputs each batch gets (``images``; never padding-free).

    ``prefix_sharing`` None: per batch (``preftune.layout.shared_prefix_pays``), knowing whether the models run the
    shared-prefix attention (``shared_attention``) or need the dense mask."""

    pad_token_id: int
    prefix_sharing: bool | None
    padding_free: bool | None
    shared_attention: bool = True
    images: ImageInputs | None = None

    def __call__(self, dataset: Any, indices: list[int]) -> LazyBatch:
        return LazyBatch(dataset, indices, self.pad_token_id, self.collate_function(), self.padding_free)

    def collate_function(self) -> Callable[..., PreferenceBatch]:
        """``collate(examples, pad_token_id=...)`` of this layout, with the image inputs when there are images."""
        collate = collate_for(self.prefix_sharing, shared_attention=self.shared_attention)
        if self.images is None:
            return collate
        if self.padding_free is not False:
            raise ValueError("batches with images are forwarded in one piece: padding_free off")
        return self.images.wrap(collate)

    def batches(
        self, dataset: Any, batch_size: int, *, shuffle_seed: int | None, drop_last: bool, max_tokens: int | None = None,
        token_counts: list[int] | None = None,
    ) -> list[LazyBatch]:
        """The micro-batches of one pass over ``dataset`` (see ``plan_batches``)."""
        groups = plan_batches(
            len(dataset), batch_size, shuffle_seed=shuffle_seed, drop_last=drop_last, token_counts=token_counts,
            max_tokens=max_tokens,
        )
        return [self(dataset, indices) for indices in groups]


class PlannedWindows:
    """Windows over a ``datasets.Dataset``: each epoch planned by seed + epoch (see the module docstring)."""

    streaming = False

    def __init__(self, dataset: Any, make: BatchMaker, *, batch_size: int, per_step: int, seed: int, drop_last: bool,
                 max_tokens: int | None) -> None:
        self.dataset, self.make, self.batch_size, self.per_step = dataset, make, batch_size, per_step
        self.seed, self.drop_last, self.max_tokens = seed, drop_last, max_tokens
        self._token_counts = row_token_counts(dataset, prompt_once=make.prefix_sharing is True) if max_tokens else None

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    def _batches(self, shuffle_seed: int | None) -> list[LazyBatch]:
        return self.make.batches(self.dataset, self.batch_size, shuffle_seed=shuffle_seed, drop_last=self.drop_last,
                                 max_tokens=self.max_tokens, token_counts=self._token_counts)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass (0 when the data does not fill one micro-batch)."""
        batches = len(self._batches(shuffle_seed=None))
        return -(-batches // self.per_step)

    def windows(self, total_steps: int) -> Iterator[tuple[int, Window, float]]:
        """``(epoch, window, epoch_progress_after_window)`` until ``total_steps`` windows are given."""
        given, epoch = 0, 0
        while given < total_steps:
            batches = self._batches(shuffle_seed=self.seed + epoch)
            windows = [batches[i : i + self.per_step] for i in range(0, len(batches), self.per_step)]
            for index, window in enumerate(windows):
                if given == total_steps:
                    return
                given += 1
                yield epoch, window, epoch + (index + 1) / len(windows)
            epoch += 1


class StreamingWindows:
    """Windows read from a ``datasets.IterableDataset``, ``per_step`` micro-batches of ``batch_size`` rows each.

    ``prepare(rows, first_row)`` turns a list of raw rows into tokenized rows and a report (the data step's
    ``prepare_rows``); rows it drops (bad rows, no room) are replaced by reading on, so every window but the last
    of a pass is full. ``report`` adds up the chunks' counts. The epoch reported is the pass over the stream
    (as transformers' Trainer reports it for an ``IterableDataset``: ``step / max_steps`` within the run).
    """

    streaming = True

    def __init__(self, stream: Any, make: BatchMaker, *, batch_size: int, per_step: int, drop_last: bool,
                 prepare: Callable[[list[dict], int], tuple[Any, dict]]) -> None:
        self.stream, self.make, self.batch_size, self.per_step = stream, make, batch_size, per_step
        self.drop_last, self.prepare = drop_last, prepare
        self.report: dict[str, Any] = {"source": "datasets.IterableDataset (streamed)", "streaming": True}

    def windows(self, total_steps: int) -> Iterator[tuple[int, Window, float]]:
        given, epoch = 0, 0
        while given < total_steps:
            if hasattr(self.stream, "set_epoch"):
                self.stream.set_epoch(epoch)
            produced = False
            for window in self._pass():
                produced = True
                given += 1
                yield epoch, window, given / total_steps
                if given == total_steps:
                    return
            if not produced:
                raise DataError("the training stream has no usable rows", file=self.report["source"])
            epoch += 1

    def _pass(self) -> Iterator[Window]:
        rows = iter(self.stream)
        first_row, wanted = 0, self.batch_size * self.per_step
        while True:
            chunk = list(itertools.islice(rows, wanted))
            if not chunk:
                return
            tokenized, report = self.prepare(chunk, first_row)
            first_row += len(chunk)
            self._add_report(report)
            dataset = tokenized.dataset
            size = len(dataset)
            if size < wanted and len(chunk) == wanted:  # rows were dropped: top up from the stream
                more = list(itertools.islice(rows, wanted - size))
                if more:
                    extra, report = self.prepare(more, first_row)
                    first_row += len(more)
                    self._add_report(report)
                    dataset = concatenate_datasets([dataset, extra.dataset])
            indices = list(range(len(dataset)))
            batches = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            if batches:
                yield [self.make(dataset, group) for group in batches]

    def _add_report(self, chunk: dict) -> None:
        for key, value in chunk.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.report[key] = self.report.get(key, 0) + value
            elif key in ("kind", "num_negatives"):
                self.report[key] = value
