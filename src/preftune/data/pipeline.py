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
    """Tokenized splits and the bookkeeping that ``summary.json`` reports.

    ``kind`` ("paired" or "unpaired") and ``num_negatives`` (rejected responses per prompt, M; 1 for classic pairs
    and unpaired data) come from the train data; eval data always has the same.
    """

    train: TokenizedData
    eval: TokenizedData | None
    report: dict[str, Any] = field(default_factory=dict)
    kind: str = "paired"
    num_negatives: int = 1


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
        dataset=dataset,
        source=f"{loaded.source} [{name}]",
        skipped_rows=[],
        is_conversational=loaded.is_conversational,
        kind=loaded.kind,
        num_negatives=loaded.num_negatives,
    )
    return make(split["train"], "train split"), make(split["test"], "validation split")


def _describe(loaded: LoadedData) -> str:
    if loaded.kind == "unpaired":
        return "unpaired (prompt, completion, label)"
    return f"paired with {loaded.num_negatives} rejected response{'s' if loaded.num_negatives > 1 else ''} per prompt"


def _check_eval_matches_train(train: LoadedData, eval_: LoadedData) -> None:
    """Eval rows go through the same loss as train rows, so kind and M must agree."""
    if (eval_.kind, eval_.num_negatives) != (train.kind, train.num_negatives):
        raise ConfigError(
            f"the eval data ({eval_.source}) is {_describe(eval_)} but the train data ({train.source}) is "
            f"{_describe(train)}; expected eval data of the same kind and number of rejected responses",
            key="eval_dataset",
        )


def _split_report(loaded: LoadedData, skipped: list[tuple[int, str]], tokenized: TokenizedData) -> dict[str, Any]:
    report = {
        "source": loaded.source,
        "kind": tokenized.kind,
        "num_negatives": tokenized.num_negatives,
        "rows_read": len(loaded.dataset) + len(skipped),
        "rows_skipped_bad": len(skipped),
        "skipped_rows": [{"row": row, "reason": reason} for row, reason in skipped[:100]],
        "pairs_used": len(tokenized.dataset),
        "rows_dropped_no_room": len(tokenized.stats.dropped_no_room),
        "dropped_no_room_rows": list(tokenized.stats.dropped_no_room[:100]),
        "pairs_truncated": tokenized.stats.truncated,
        "prefix_mismatch": tokenized.stats.prefix_mismatch,
    }
    if tokenized.kind == "unpaired":
        desirable = sum(tokenized.dataset["label"])
        report.update(desirable=desirable, undesirable=len(tokenized.dataset) - desirable)
    return report


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

    ``report[split]`` has source, kind, num_negatives, row counts (read, skipped as bad, used, dropped for no room,
    truncated, prefix mismatches; "pairs_*" count rows for unpaired data) and, for unpaired data, the desirable
    and undesirable counts of the rows used.

    Raises:
        ConfigError: eval data of another kind or number of rejected responses than the train data (key
            "eval_dataset"), a bad val_size, or a split with no row that fits max_length.
        DataError: unreadable data or bad rows (see ``load_preference_data``).
    """
    read = lambda source: load_preference_data(  # noqa: E731
        source, dataset_dir=config.dataset_dir, max_samples=config.max_samples, on_bad_row=config.on_bad_row
    )
    train_loaded = read(train_source)
    eval_loaded = read(eval_source) if eval_source is not None else None
    if eval_loaded is not None:
        _check_eval_matches_train(train_loaded, eval_loaded)
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
                f"no {name} {'row' if loaded.kind == 'unpaired' else 'pair'} fits max_length={config.max_length} "
                f"with truncation_mode={config.truncation_mode}",
                key="max_length",
            )

    report = {
        split: _split_report(loaded, skipped[split], tokenized[split])
        for split, loaded in (("train", train_loaded), ("eval", eval_loaded))
        if loaded is not None
    }
    return PreparedData(
        train=tokenized["train"],
        eval=tokenized.get("eval"),
        report=report,
        kind=train_loaded.kind,
        num_negatives=train_loaded.num_negatives,
    )
