"""From configuration to tokenized train/eval sets: read → (split) → template → tokenize, with counts of what was dropped."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from preftune.data.formats import LoadedData, load_preference_data
from preftune.data.kto import with_kl_completions
from preftune.data.templates import get_template, resolve_chat_template
from preftune.data.tokenize import TokenizedData, TokenizeSettings, tokenize_dataset
from preftune.data.validate import CHEAP_RULES, RULES, find_problems
from preftune.errors import ConfigError, DataError

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


def _apply_cheap_checks(loaded: LoadedData, on_bad_row: str) -> tuple[LoadedData, list[dict[str, Any]]]:
    """Run the cheap data checks (validate.CHEAP_RULES: identical pairs, empty responses, exact duplicates).

    on_bad_row "error" raises DataError naming the file, the first failing row and its rule; "skip" drops the
    failing rows; "warn" logs their counts and keeps them. Exact duplicates alone never stop a run: they are
    well-formed rows and common in published sets (LLaMA-Factory's dpo_en_demo has 5), so under "error" they are
    kept with a warning. Returns the (possibly smaller) data and one {"row", "rule"} entry per failing row (its
    first failing rule), in row order.
    """
    problems = find_problems(loaded, rules=CHEAP_RULES)
    failing: dict[int, str] = {}
    for rule in CHEAP_RULES:
        for position in problems[rule]:
            failing.setdefault(position, rule)
    if not failing:
        return loaded, []
    rows = loaded.dataset.with_format("arrow")["row"].to_pylist()
    fatal = [position for position, rule in failing.items() if rule != "duplicate"]
    if on_bad_row == "error" and fatal:
        position = min(fatal)
        raise DataError(f"fails the data check '{failing[position]}': {RULES[failing[position]]}; remove such rows "
                        "(`preftune data check <data> --fix clean.jsonl`) or set on_bad_row: skip (drop them) or warn "
                        "(keep them)", file=loaded.source, row=rows[position])
    entries = [{"row": rows[position], "rule": failing[position]} for position in sorted(failing)]
    counts = ", ".join(f"{rule}: {count}" for rule, count in Counter(failing.values()).items())
    if on_bad_row != "skip":
        logger.warning("%s: %d rows fail the data checks (%s); keeping them (on_bad_row: %s)", loaded.source,
                       len(failing), counts, on_bad_row)
        return loaded, entries
    if len(failing) == len(loaded.dataset):
        raise DataError(f"no usable rows: all {len(failing)} rows fail the data checks ({counts})", file=loaded.source)
    logger.info("%s: dropping %d rows that fail the data checks (%s)", loaded.source, len(failing), counts)
    kept = [position for position in range(len(loaded.dataset)) if position not in failing]
    return replace(loaded, dataset=loaded.dataset.select(kept)), entries


def _split_report(loaded: LoadedData, skipped: list[tuple[int, str]], tokenized: TokenizedData,
                  failed: list[dict[str, Any]], dropped_failed: bool) -> dict[str, Any]:
    report = {
        "source": loaded.source,
        "kind": tokenized.kind,
        "num_negatives": tokenized.num_negatives,
        "rows_read": len(loaded.dataset) + len(skipped) + (len(failed) if dropped_failed else 0),
        "rows_skipped_bad": len(skipped),
        "skipped_rows": [{"row": row, "reason": reason} for row, reason in skipped[:100]],
        "rows_failed_checks": len(failed),
        "failed_checks": dict(Counter(entry["rule"] for entry in failed)),
        "failed_check_rows": failed[:100],
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

    Unpaired (KTO) data also gets ``kl_completion_ids``, each row's mismatched completion
    (``preftune.data.kto.with_kl_completions``, in groups of the per-device train or eval batch size).

    ``report[split]`` has source, kind, num_negatives, row counts (read, skipped as bad, used, dropped for no room,
    truncated, prefix mismatches; "pairs_*" count rows for unpaired data) and, for unpaired data, the desirable
    and undesirable counts of the rows used.

    The cheap data checks (identical chosen/rejected, empty responses, exact duplicates; ``preftune.data.validate``)
    run on the rows read, under ``config.on_bad_row``: "error" raises DataError naming file, row and check (exact
    duplicates only warn); "skip" drops the rows; "warn" keeps them with a warning. ``report[split]`` then has
    ``rows_failed_checks`` (rows flagged), ``failed_checks`` ({check: rows}) and ``failed_check_rows`` (the first 100
    {"row", "rule"}).

    Raises:
        ConfigError: eval data of another kind or number of rejected responses than the train data (key
            "eval_dataset"), a bad val_size, or a split with no row that fits max_length.
        DataError: unreadable data or bad rows (see ``load_preference_data``), a row failing a data check under
            on_bad_row "error", no row left after dropping them, or unpaired data with fewer than 2 rows.
    """
    read = lambda source: load_preference_data(  # noqa: E731
        source, dataset_dir=config.dataset_dir, max_samples=config.max_samples, on_bad_row=config.on_bad_row
    )
    train_loaded, train_failed = _apply_cheap_checks(read(train_source), config.on_bad_row)
    eval_loaded, eval_failed = (_apply_cheap_checks(read(eval_source), config.on_bad_row) if eval_source is not None
                                else (None, []))
    failed = {"train": train_failed, "eval": eval_failed}
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
    if train_loaded.kind == "unpaired":  # KTO: each row carries the mismatched completion its KL term scores
        group_sizes = {"train": config.per_device_train_batch_size, "eval": config.per_device_eval_batch_size}
        sources = {"train": train_loaded.source, "eval": eval_loaded.source if eval_loaded is not None else None}
        for name, data in tokenized.items():
            kl_dataset = with_kl_completions(data.dataset, group_sizes[name], source=sources[name])
            tokenized[name] = replace(data, dataset=kl_dataset)

    report = {
        split: _split_report(loaded, skipped[split], tokenized[split], failed[split], config.on_bad_row == "skip")
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
