"""Precomputed reference log-probs: score the data with π_ref once, cache the values on disk, reuse them.

With a frozen reference, ``log π_ref(y|x)`` of every completion is a constant of the data, so it can be computed in
one pass before training (no reference model in memory afterwards) and stored:

- ``precompute_reference_logps`` scores the dataset in order and returns a ``(rows, K)`` tensor: row r is dataset
  position r, column k is completion k (0 = chosen, 1… = rejected, or the one unpaired completion);
- the tensor is cached as ``<cache_dir>/<key>.safetensors``, the key a sha256 of everything that decides the
  values: the reference weights (``reference_fingerprint``), the tokenized data (``dataset_fingerprint``), the
  caller's options (``key_parts``: log-prob options, precision…) and ``FORMAT_VERSION``; a rerun on the same
  inputs reads the file, any change computes a new one;
- ``attach_reference_logps`` stores the values as a ``ref_logps`` column, which collation turns into
  ``batch.ref_logps`` (``(K, B)``) for any order or subset of rows; ``PrecomputedReference`` serves it to the
  trainer in place of a reference model.

Cache files are safetensors (no pickle), written atomically (``preftune.atomic``); a file that cannot be read or
does not match is reported, never overwritten or deleted unless ``overwrite`` is set.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from tqdm.auto import tqdm

from preftune import atomic
from preftune.data.collate import PreferenceBatch, completions_of
from preftune.data.images import ImageInputs, image_content_fingerprint
from preftune.data.pipeline import default_cache_dir
from preftune.errors import ConfigError, DataError
from preftune.logprobs import chosen_and_rejected, unwrap_model

logger = logging.getLogger(__name__)

# Bump when the meaning or layout of the cached values changes, so that older files are never reused.
FORMAT_VERSION = 1
CONFIG_KEY = "precompute_ref_log_probs"
COLUMN = "ref_logps"
_TENSOR_NAME = "ref_logps"
_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids")
_FINGERPRINT_ROWS_PER_CHUNK = 8192


# ------------------------------------------------------------------------------------------------- fingerprints
def reference_fingerprint(model: nn.Module, *, exclude: Callable[[str], bool] | None = None) -> str:
    """sha256 (64 hex chars) over ``(name, shape, dtype, bytes)`` of every parameter and buffer, in name order.

    Tied weights count under each of their names. ``exclude(name)`` drops names the reference forward does not
    use (e.g. LoRA adapter weights when the reference is the base model with its adapters disabled).
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        if exclude is not None and exclude(name):
            continue
        tensor = tensors[name].detach()
        header = {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype)}
        hasher.update(json.dumps(header).encode())
        hasher.update(_tensor_bytes(tensor))
    return hasher.hexdigest()


def _tensor_bytes(tensor: Tensor) -> bytes:
    """The raw bytes of a tensor in its own dtype (bfloat16 included: viewed as bytes, not converted)."""
    flat = tensor.cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """sha256 (64 hex chars) of the token ids that decide the log-probs, in row order.

    Covers ``prompt_ids`` and ``chosen_ids`` / ``rejected_ids`` (flat, or a list per row for several negatives) or
    ``completion_ids``: the list lengths at every nesting level and the ids as int64, so the same content gives
    the same fingerprint whatever the Arrow chunking, integer width or ``select`` that produced it. Other columns
    (``row``, ``label``…) do not change a log-prob and are left out. Streams Arrow buffers in chunks of rows.
    """
    columns = [name for name in _ID_COLUMNS if name in dataset.column_names]
    if "prompt_ids" not in columns or len(columns) < 2:
        raise ValueError(
            f"expected a tokenized dataset (prompt_ids and chosen_ids/rejected_ids or completion_ids), "
            f"got columns {dataset.column_names}"
        )
    table = dataset.with_format("arrow")[:].select(columns)
    streams = {name: _ColumnHasher() for name in columns}
    for start in range(0, table.num_rows, _FINGERPRINT_ROWS_PER_CHUNK):
        chunk = table.slice(start, _FINGERPRINT_ROWS_PER_CHUNK)
        for name in columns:
            streams[name].update(chunk.column(name).combine_chunks())
    summary = {"rows": table.num_rows, "columns": {name: stream.digests() for name, stream in streams.items()}}
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


class _ColumnHasher:
    """Streaming sha256 of a (nested) list column: one stream of lengths per nesting level, one of ids.

    Separate streams make the digest independent of where the rows are cut into chunks.
    """

    def __init__(self) -> None:
        self.levels: list = []  # one sha256 per nesting level
        self.values = hashlib.sha256()

    def update(self, array: pa.Array) -> None:
        level = 0
        while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            if len(self.levels) == level:
                self.levels.append(hashlib.sha256())
            lengths = pc.fill_null(pc.list_value_length(array), -1)  # a null list differs from an empty one
            self.levels[level].update(_int64_bytes(lengths))
            array, level = array.flatten(), level + 1
        self.values.update(_int64_bytes(array))

    def digests(self) -> list[str]:
        return [stream.hexdigest() for stream in self.levels] + [self.values.hexdigest()]


def _int64_bytes(array: pa.Array) -> bytes:
    return np.ascontiguousarray(array.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes()


# ------------------------------------------------------------------------------------------------- precompute
@dataclass
class PrecomputedLogps:
    """Reference log-probs of a whole dataset.

    Attributes:
        values: ``(rows, K)`` float32; row r is dataset position r, column k completion k (chosen, rejected…).
        path: the cache file, or None when nothing is stored (no ``cache_dir``).
        reused: True when the values were read from an existing cache file.
    """

    values: Tensor
    path: Path | None
    reused: bool


def precompute_reference_logps(
    score: Callable[[PreferenceBatch], Tensor],
    dataset: datasets.Dataset,
    *,
    collate_fn: Callable[..., PreferenceBatch],
    pad_token_id: int,
    batch_size: int,
    cache_dir: Path | str | None,
    key_parts: dict[str, Any],
    desc: str = "Reference log-probs",
    device: torch.device | str | None = None,
    overwrite: bool = False,
) -> PrecomputedLogps:
    """Reference log-probs ``(rows, K)`` of every completion of a tokenized dataset, from the cache or computed.

    Args:
        score: a batch → its ``(K, B)`` reference log-probs, without gradients (e.g.
            ``lambda b: reference.completion_logps(b, **options)``).
        dataset: tokenized rows (``preftune.data.tokenize``), scored in dataset order.
        collate_fn: ``collate_fn(examples, pad_token_id=...)`` → ``PreferenceBatch`` (either layout).
        batch_size: examples per scored batch (not part of the key: other batches change the float rounding only).
        cache_dir: folder of the cache files; None computes without storing.
        key_parts: JSON-able values that decide the result besides the data: must hold ``"reference"`` (a
            ``reference_fingerprint``) and anything else that changes the values (log-prob options such as
            ``ld_alpha``, the autocast dtype…). The dataset fingerprint and ``FORMAT_VERSION`` are added here.
        device: where batches go before ``score`` (None: left where collate puts them).
        overwrite: recompute and atomically replace an existing cache file, readable or not.

    Returns:
        ``PrecomputedLogps``; ``reused`` tells whether the file was read.

    Raises:
        ConfigError (key ``precompute_ref_log_probs``): the cache file exists but cannot be read, was written for
            other inputs, or holds values of the wrong shape, dtype or non-finite values (and ``overwrite`` is
            off); the file is left as it is.
        DataError: the reference gives a non-finite log-prob for a row (nothing is stored).
    """
    if "reference" not in key_parts:
        raise ValueError('key_parts must include "reference" (a reference_fingerprint of the reference model)')
    completions = _completions_per_row(dataset)
    key = cache_key(key_parts, dataset_fingerprint(dataset))
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.safetensors"
    if path is not None and path.exists() and not overwrite:
        values = _read_cache(path, key, rows=len(dataset), completions=completions)
        logger.info("reusing precomputed reference log-probs from %s", path)
        return PrecomputedLogps(values, path, reused=True)
    values = _score_in_order(score, dataset, collate_fn, pad_token_id, batch_size, completions, desc, device)
    if path is not None:
        _write_cache_file(path, values, key)
        logger.info("wrote precomputed reference log-probs of %d rows to %s", len(dataset), path)
    return PrecomputedLogps(values, path, reused=False)


def cache_key(key_parts: dict[str, Any], data_fingerprint: str) -> str:
    """sha256 of the caller's key parts, the dataset fingerprint and the format version."""
    key = {"parts": key_parts, "dataset": data_fingerprint, "version": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _completions_per_row(dataset: datasets.Dataset) -> int:
    """K: completions per example, from the first row (every row has the same K after tokenization)."""
    if len(dataset) == 0:
        raise ValueError("there are no rows to compute reference log-probs for")
    return len(completions_of(dataset[0]))


def _examples(dataset: datasets.Dataset, start: int, stop: int) -> list[dict]:
    columns = dataset[start:stop]
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*columns.values())]


@torch.no_grad()
def _score_in_order(
    score: Callable[[PreferenceBatch], Tensor],
    dataset: datasets.Dataset,
    collate_fn: Callable[..., PreferenceBatch],
    pad_token_id: int,
    batch_size: int,
    completions: int,
    desc: str,
    device: torch.device | str | None,
) -> Tensor:
    """One pass over the dataset in order; ``(rows, K)`` float32 on the CPU."""
    dataset = dataset.with_format(None)
    parts = []
    with tqdm(total=len(dataset), desc=desc, unit="rows") as progress:
        for start in range(0, len(dataset), batch_size):
            examples = _examples(dataset, start, min(start + batch_size, len(dataset)))
            batch = collate_fn(examples, pad_token_id=pad_token_id)
            batch = batch if device is None else batch.to(device)
            logps = score(batch)
            if tuple(logps.shape) != (completions, len(examples)):
                raise ValueError(
                    f"score must return (K, B) = ({completions}, {len(examples)}) log-probs, got {tuple(logps.shape)}"
                )
            logps = logps.detach().float().cpu().T
            _check_finite(logps, examples)
            parts.append(logps)
            progress.update(len(examples))
    return torch.cat(parts).contiguous()


def _check_finite(logps: Tensor, examples: Sequence[dict]) -> None:
    bad = (~torch.isfinite(logps)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        rows = [int(examples[i].get("row", i)) for i in bad]
        raise DataError(
            f"the reference model gives non-finite log-probs {logps[bad[0]].tolist()} (source rows {rows}); "
            "nothing was cached",
            row=rows[0],
        )


# ------------------------------------------------------------------------------------------------- cache file
def _read_cache(path: Path, key: str, *, rows: int, completions: int) -> Tensor:
    """The ``(rows, K)`` values of a cache file, after checking that they belong to ``key`` (else ConfigError)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            values = handle.get_tensor(_TENSOR_NAME) if _TENSOR_NAME in handle.keys() else None
    except Exception as error:  # noqa: BLE001 — any unreadable file gets the same advice
        raise _bad_cache(path, f"it cannot be read ({type(error).__name__}: {error})") from None
    if values is None:
        raise _bad_cache(path, f"it holds no '{_TENSOR_NAME}' tensor")
    if metadata.get("key") != key or metadata.get("version") != str(FORMAT_VERSION):
        raise _bad_cache(path, "it was written for other inputs (its metadata names another key or version)")
    if values.dtype != torch.float32 or tuple(values.shape) != (rows, completions):
        raise _bad_cache(
            path, f"it holds {values.dtype} values of shape {tuple(values.shape)}, expected float32 ({rows}, {completions})"
        )
    if not torch.isfinite(values).all():
        raise _bad_cache(path, "it holds non-finite values")
    return values


def _bad_cache(path: Path, reason: str) -> ConfigError:
    return ConfigError(
        f"the precomputed reference log-probs file {path} cannot be used: {reason}. Delete it, or set "
        "overwrite_cache: true to recompute it",
        key=CONFIG_KEY,
    )


def _write_cache_file(path: Path, values: Tensor, key: str) -> None:
    """The safetensors file with its metadata, written atomically (``preftune.atomic``)."""
    metadata = {"key": key, "rows": str(values.shape[0]), "K": str(values.shape[1]), "version": str(FORMAT_VERSION)}
    atomic.write_bytes(path, safetensors_bytes({_TENSOR_NAME: values.contiguous()}, metadata=metadata))


# ------------------------------------------------------------------------------------------------- serving
def attach_reference_logps(dataset: datasets.Dataset, values: Tensor) -> datasets.Dataset:
    """The dataset with a ``ref_logps`` column (a list of K float32 per row, row r = ``values[r]``), replacing any
    existing one; collation turns it into ``batch.ref_logps``."""
    if values.dim() != 2 or values.shape[0] != len(dataset):
        raise ValueError(f"expected values of shape ({len(dataset)}, K), got {tuple(values.shape)}")
    if COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(COLUMN)
    flat = values.detach().float().cpu().contiguous()
    fingerprint = hashlib.sha256(dataset._fingerprint.encode() + _tensor_bytes(flat)).hexdigest()[:32]
    return dataset.add_column(
        COLUMN,
        flat.numpy().tolist(),
        feature=datasets.List(datasets.Value("float32")),
        new_fingerprint=fingerprint,
    )


def score_into_column(tokenized: Any, reference: Any, split: str, *, args: Any, accelerator: Any,
                      options: dict[str, Any], collate_fn: Callable, pad_token_id: int,
                      images: ImageInputs | None = None) -> dict[str, Any]:
    """Score ``tokenized``'s rows (a ``TokenizedData``: ``.dataset``) with ``reference`` (or read them from the cache
    under ``$PREFTUNE_CACHE``) and attach them as the ``ref_logps`` column in place; returns where the values are
    cached and whether the cache was reused. ``options``: the run's log-prob options; the cache key holds everything
    besides the weights and the tokens that changes the values: for rows with images (``collate_fn`` gives their
    pixel values), the images' content (``image_content_fingerprint``) and the settings of ``images``' processor."""
    model_config = getattr(unwrap_model(reference.model), "config", None)
    key_parts = {
        "reference": reference.fingerprint(),
        "model_config": model_config.to_json_string() if model_config is not None else None,
        "mixed_precision": accelerator.mixed_precision,
        "ld_alpha": args.ld_alpha,
        "chunked_lm_head": args.chunked_lm_head,
    }
    if "images" in tokenized.dataset.column_names:
        key_parts["images"] = image_content_fingerprint(tokenized.dataset.with_format("arrow")["images"].to_pylist())
        key_parts["image_processor"] = images.settings() if images is not None else None

    def score(batch: PreferenceBatch) -> Tensor:
        with accelerator.autocast():
            return reference.completion_logps(batch, **options)

    result = precompute_reference_logps(
        score, tokenized.dataset, collate_fn=collate_fn, pad_token_id=pad_token_id,
        batch_size=args.precompute_ref_batch_size or args.per_device_eval_batch_size,
        cache_dir=default_cache_dir().parent / "reference", key_parts=key_parts, desc=f"Reference log-probs ({split})",
        device=accelerator.device,
        overwrite=args.overwrite_cache and accelerator.is_local_main_process,  # the other processes reuse it
    )
    tokenized.dataset = attach_reference_logps(tokenized.dataset, result.values)
    return {"cache_file": str(result.path), "reused": result.reused}


class PrecomputedReference:
    """Reference whose log-probs come with the batch (``batch.ref_logps``, filled by collate from the column).

    The values were computed with the log-prob options of the precompute pass (part of the cache key); the
    ``logprob_options`` given here are accepted for the ``Reference`` protocol and ignored.
    """

    model = None
    separate_model = None

    def completion_logps(self, batch: PreferenceBatch, **logprob_options) -> Tensor:
        """``batch.ref_logps``: ``(K, B)``, completion k of example i at ``[k, i]``."""
        values = batch.ref_logps
        if values is None:
            raise ValueError(
                f"batch of source rows {batch.rows} carries no precomputed reference log-probs: its examples need "
                f"a '{COLUMN}' column (attach_reference_logps) when {CONFIG_KEY} is on"
            )
        expected = (batch.num_completions, batch.num_pairs)
        if tuple(values.shape) != expected:
            raise ValueError(f"batch.ref_logps has shape {tuple(values.shape)}, expected (K, B) = {expected}")
        return values

    def logps(self, batch: PreferenceBatch, **logprob_options) -> tuple[Tensor, Tensor]:
        """``(chosen, rejected)``: ``(B,)`` and ``(B,)`` (one negative) or ``(B, M)`` (M negatives)."""
        return chosen_and_rejected(self.completion_logps(batch))

    def to(self, device: torch.device | str) -> "PrecomputedReference":
        return self

    def fingerprint(self) -> str:
        raise ValueError("precomputed reference log-probs have no weights to fingerprint; the cache key holds the "
                         "fingerprint of the reference that computed them")

    def sampling_model(self) -> ContextManager[nn.Module]:
        raise ConfigError("cannot sample from precomputed reference log-probs (they hold no model); pass a reference "
                          "model", key="ref_model")
