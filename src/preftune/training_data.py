"""The trainer's data: the sources ``DPOTrainer`` takes (a dataset, a ``datasets.IterableDataset`` stream, rows, a
file, named eval sets) read and tokenized, checked against the loss, and the windows of micro-batches the loop
trains on (planned over the tokenized set, or read from the stream as it trains)."""

from __future__ import annotations

import itertools
import math
from typing import Any

from preftune.batches import BatchMaker, PlannedWindows, StreamingWindows
from preftune.data.pipeline import PreparedData, prepare_data, prepare_rows
from preftune.errors import ConfigError
from preftune.losses import LossParams

STREAM_SOURCE = "streamed train_dataset"


def is_stream(source: Any, *, nested: bool = False) -> bool:
    """Whether ``source`` is a ``datasets.IterableDataset`` (with ``nested``: or a mapping holding one)."""
    import datasets

    if isinstance(source, datasets.IterableDataset):
        return True
    return nested and isinstance(source, dict) and any(isinstance(v, datasets.IterableDataset) for v in source.values())


def refuse_precomputing_a_stream(args: Any, source: Any, *, nested: bool = True) -> None:
    """ConfigError when reference log-probs are to be precomputed (``precompute_ref_log_probs``) for a stream: it is
    read once, as it trains."""
    if args.precompute_ref_log_probs and is_stream(source, nested=nested):
        raise ConfigError("precompute_ref_log_probs is not supported with IterableDataset: a stream is read once, as "
                          "it trains; give a datasets.Dataset or set precompute_ref_log_probs: false",
                          key="precompute_ref_log_probs")


def _read_whole(source: Any) -> Any:
    """An eval source with every ``datasets.IterableDataset`` read into a list of rows (eval sets are finite and
    are read whole anyway); dicts of named sets keep their names."""
    import datasets

    if isinstance(source, datasets.IterableDataset):
        return [dict(row) for row in source]
    if isinstance(source, dict):
        return {name: _read_whole(value) for name, value in source.items()}
    return source


def prepare_sources(args: Any, tokenizer: Any, train_source: Any, eval_source: Any) -> PreparedData:
    """Read and tokenize the train and eval data (``prepare_data``); a streamed eval set is read whole first."""
    refuse_precomputing_a_stream(args, eval_source)
    eval_source = _read_whole(eval_source)
    if train_source is None and eval_source is None:
        return PreparedData(train=None, eval=None)
    return prepare_data(args, tokenizer, train_source, eval_source)


def check_data_fits_loss(args: Any, params: LossParams, data: Any) -> None:
    """Refuse data the loss cannot use: unpaired rows with a paired loss and the reverse, several negatives
    with LD-DPO. (KTO runs at any batch size: each row carries its KL completion, ``preftune.data.kto``.)"""
    kind = getattr(data, "kind", "paired")
    if kind == "unpaired" and not params.is_unpaired:
        raise ConfigError(
            f"the data is unpaired (prompt, completion, label), which loss {args.loss_type} cannot use; "
            "set loss_type: kto, or give paired data (prompt, chosen, rejected)",
            key="loss_type",
        )
    if kind != "unpaired" and params.is_unpaired:
        raise ConfigError(
            "loss kto needs unpaired rows (prompt, completion, label: true/false, or LLaMA-Factory's kto_tag); "
            "the data is paired (prompt, chosen, rejected)",
            key="loss_type",
        )
    if getattr(data, "num_negatives", 1) > 1 and args.ld_alpha is not None:
        raise ConfigError("ld_alpha is defined for one rejected response per prompt, not several", key="ld_alpha")


def check_stream(args: Any, tokenizer: Any, params: LossParams, stream: Any, data: PreparedData) -> None:
    """A streamed training set: needs max_steps, cannot have its log-probs precomputed, and its first rows must
    suit the loss (read and tokenized once here; training reads the stream from its start). ``data`` (the eval sets)
    takes the stream's kind when it has no eval set, else must be of it."""
    refuse_precomputing_a_stream(args, stream)
    if args.max_steps <= 0:
        raise ConfigError("a streamed train_dataset (datasets.IterableDataset) has no length: set max_steps > 0",
                          key="max_steps")
    first_rows = list(itertools.islice(iter(stream), args.per_device_train_batch_size))
    if not first_rows:
        raise ConfigError("the streamed train_dataset has no rows", key="dataset")
    sample, _ = prepare_rows(args, tokenizer, first_rows, source=STREAM_SOURCE, first_row=0)
    check_data_fits_loss(args, params, sample)
    if not data.eval_sets:
        data.kind, data.num_negatives = sample.kind, sample.num_negatives
    elif (sample.kind, sample.num_negatives) != (data.kind, data.num_negatives):
        raise ConfigError("the eval data is not of the streamed train data's kind", key="eval_dataset")


def training_windows(args: Any, tokenizer: Any, data: PreparedData, stream: Any, batch_maker: BatchMaker,
                     world_size: int) -> PlannedWindows | StreamingWindows:
    """The source of the loop's windows (``gradient_accumulation_steps x world_size`` micro-batches per step):
    planned over the tokenized train set, or read from ``stream`` (when not None)."""
    per_step = args.gradient_accumulation_steps * world_size
    batch_size = args.per_device_train_batch_size
    if stream is not None:
        prepare = lambda rows, first_row: prepare_rows(  # noqa: E731
            args, tokenizer, rows, source=STREAM_SOURCE, first_row=first_row
        )
        return StreamingWindows(stream, batch_maker, batch_size=batch_size, per_step=per_step,
                                drop_last=args.dataloader_drop_last, prepare=prepare)
    return PlannedWindows(data.train.dataset, batch_maker, batch_size=batch_size, per_step=per_step,
                          seed=args.data_seed if args.data_seed is not None else args.seed,
                          drop_last=args.dataloader_drop_last, max_tokens=args.max_tokens_per_batch)


def total_training_steps(args: Any, windows: PlannedWindows | StreamingWindows) -> tuple[int, int | None]:
    """``(total optimizer steps, steps per epoch)``: ``max_steps`` when set, else ``num_train_epochs`` epochs; a
    stream has no steps per epoch (None). ConfigError when the data does not fill one batch."""
    if windows.streaming:
        return args.max_steps, None
    per_epoch = windows.steps_per_epoch()
    if per_epoch == 0:
        raise ConfigError(f"{windows.num_rows} training pairs do not fill one batch of "
                          f"{args.per_device_train_batch_size}", key="per_device_train_batch_size")
    if args.max_steps > 0:
        return args.max_steps, per_epoch
    return max(1, math.ceil(args.num_train_epochs * per_epoch)), per_epoch
