"""From configuration to tokenized train/eval sets: read → (split) → template → tokenize, with counts of what was dropped."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.formats import LoadedData, load_preference_data
from preftune.data.templates import get_template, resolve_chat_template
from preftune.data.tokenize import TokenizedData, TokenizeSettings, tokenize_dataset
from preftune.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Tokenized splits and the bookkeeping that ``summary.json`` reports."""

    train: TokenizedData
    eval: TokenizedData | None
    report: dict[str, Any] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """Where tokenized datasets are cached: ``$PREFTUNE_CACHE`` or ``~/.cache/preftune``."""
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")) / "tokenized"


def _split_off_validation(loaded: LoadedData, val_size: float, seed: int) -> tuple[LoadedData, LoadedData]:
    rows = len(loaded.dataset)
    count = int(round(val_size * rows)) if val_size < 1 else int(val_size)
    if not 0 < count < rows:
        raise ConfigError(f"val_size={val_size} leaves no train or no eval rows out of {rows}", key="val_size")
    split = loaded.dataset.train_test_split(test_size=count, seed=seed, shuffle=True)
    make = lambda dataset, name: LoadedData(  # noqa: E731
        dataset=dataset, source=f"{loaded.source} [{name}]", skipped_rows=[], is_conversational=loaded.is_conversational
    )
    return make(split["train"], "train split"), make(split["test"], "validation split")


def _chat_template_for(loaded: LoadedData, tokenizer, template_name: str | None) -> str | None:
    if not loaded.is_conversational:
        return None
    template = resolve_chat_template(tokenizer, template_name)
    if template is None:
        logger.warning("the tokenizer has no chat template and no `template` was set; using template 'default'")
        template = get_template("default")
    return template


def prepare_data(config, tokenizer, train_source: Any, eval_source: Any = None) -> PreparedData:
    """Read, split and tokenize the train (and eval) data described by ``config``.

    ``train_source``/``eval_source`` are whatever ``load_preference_data`` accepts (a path, a registered
    dataset name, a list of dicts, a ``datasets.Dataset``); eval falls back to a ``val_size`` split.
    """
    read = lambda source: load_preference_data(  # noqa: E731
        source, dataset_dir=config.dataset_dir, max_samples=config.max_samples, on_bad_row=config.on_bad_row
    )
    train_loaded = read(train_source)
    eval_loaded = read(eval_source) if eval_source is not None else None
    skipped = {"train": list(train_loaded.skipped_rows), "eval": list(eval_loaded.skipped_rows) if eval_loaded else []}
    if eval_loaded is None and config.val_size:
        train_loaded, eval_loaded = _split_off_validation(train_loaded, config.val_size, config.seed)

    cache_dir = None if config.overwrite_cache else str(default_cache_dir())
    tokenized = {}
    for name, loaded in (("train", train_loaded), ("eval", eval_loaded)):
        if loaded is None:
            continue
        settings = TokenizeSettings(
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
            chat_template=_chat_template_for(loaded, tokenizer, config.template),
        )
        tokenized[name] = tokenize_dataset(
            loaded.dataset, tokenizer, settings, cache_dir=cache_dir, desc=f"Tokenizing {name} data"
        )
        if len(tokenized[name].dataset) == 0:
            raise ConfigError(
                f"no {name} pair fits max_length={config.max_length} with truncation_mode={config.truncation_mode}",
                key="max_length",
            )

    report = {
        split: {
            "source": loaded.source,
            "rows_read": len(loaded.dataset) + len(skipped[split]),
            "rows_skipped_bad": len(skipped[split]),
            "skipped_rows": [{"row": row, "reason": reason} for row, reason in skipped[split][:100]],
            "pairs_used": len(tokenized[split].dataset),
            "rows_dropped_no_room": len(tokenized[split].stats.dropped_no_room),
            "dropped_no_room_rows": list(tokenized[split].stats.dropped_no_room[:100]),
            "pairs_truncated": tokenized[split].stats.truncated,
            "prefix_mismatch": tokenized[split].stats.prefix_mismatch,
        }
        for split, loaded in (("train", train_loaded), ("eval", eval_loaded))
        if loaded is not None
    }
    return PreparedData(train=tokenized["train"], eval=tokenized.get("eval"), report=report)
