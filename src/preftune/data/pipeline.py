"""From configuration to tokenized train/eval sets: read → (split) → template → tokenize, with counts of what was dropped."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from preftune.data.formats import LoadedData, canonicalize_records, load_preference_data
from preftune.data.kto import with_kl_completions
from preftune.data.templates import choose_template
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

    train: TokenizedData | None
    eval: TokenizedData | None
    report: dict[str, Any] = field(default_factory=dict)
    kind: str = "paired"
    num_negatives: int = 1
    eval_sets: dict[str | None, TokenizedData] = field(default_factory=dict)  # by name; None: the unnamed set


def default_cache_dir() -> Path:
    """Where tokenized datasets are cached: ``$PREFTUNE_CACHE`` or ``~/.cache/preftune``."""
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune")) / "tokenized"


def split_off_validation(loaded: LoadedData, val_size: float, seed: int) -> tuple[LoadedData, LoadedData]:
    """``(train, validation)``: ``val_size`` rows (a fraction when < 1, else a count) drawn at random with ``seed``
    (``datasets.train_test_split``), as training splits them; ConfigError when either side would be empty."""
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


def _describe(kind: str, num_negatives: int) -> str:
    if kind == "unpaired":
        return "unpaired (prompt, completion, label)"
    return f"paired with {num_negatives} rejected response{'s' if num_negatives > 1 else ''} per prompt"


def _check_eval_matches_train(kind: str, num_negatives: int, train_source: str, eval_: LoadedData) -> None:
    """Eval rows go through the same loss as train rows, so kind and M must agree."""
    if (eval_.kind, eval_.num_negatives) != (kind, num_negatives):
        raise ConfigError(
            f"the eval data ({eval_.source}) is {_describe(eval_.kind, eval_.num_negatives)} but the train data "
            f"({train_source}) is {_describe(kind, num_negatives)}; expected eval data of the same kind and number "
            "of rejected responses",
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


def _template_settings(loaded: LoadedData, tokenizer, template_name: str | None) -> dict[str, str]:
    """TokenizeSettings fields for conversational data, by ``templates.choose_template``'s rule: the named template,
    else the tokenizer's own Jinja chat template, else the named template 'default' (with a warning)."""
    if not loaded.is_conversational:
        return {}
    choice = choose_template(tokenizer, template_name)
    return {"template": choice.name} if choice.name is not None else {"chat_template": choice.jinja}


def prepare_data(config, tokenizer, train_source: Any, eval_source: Any = None) -> PreparedData:
    """Read, split and tokenize the train (and eval) data described by ``config``.

    ``train_source``/``eval_source`` are whatever ``load_preference_data`` accepts (a path, a registered
    dataset name, a list of dicts, a ``datasets.Dataset``); ``eval_source`` may also be a mapping of names to such
    sources (TRL's named eval sets: a dict or a ``DatasetDict``). Eval falls back to a ``val_size`` split.
    ``train_source`` None prepares eval data only (``train`` is then None).

    ``eval_sets`` maps each eval set's name to its tokenized data (None for a single unnamed set, which is also
    ``eval``; named sets leave ``eval`` None). ``report`` has one entry per split, keyed "train", "eval" or
    "eval_<name>" (``eval_key``): source, kind, num_negatives, row counts (read, skipped as bad, used, dropped for no room,
    truncated, prefix mismatches; "pairs_*" count rows for unpaired data) and, for unpaired data, the desirable and
    undesirable counts of the rows used.

    Unpaired (KTO) data also gets ``kl_completion_ids``, each row's mismatched completion
    (``preftune.data.kto.with_kl_completions``, in groups of the per-device train or eval batch size).

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
    splits: dict[str, _ReadSplit] = {}
    if train_source is not None:
        splits["train"] = _read_split(config, train_source)
    first = splits.get("train")
    for name, source in eval_sources(eval_source).items():
        splits[eval_key(name)] = split = _read_split(config, source)
        first = first or split
        _check_eval_matches_train(first.loaded.kind, first.loaded.num_negatives, first.loaded.source, split.loaded)
    if "train" in splits and len(splits) == 1 and config.val_size:
        train, validation = split_off_validation(splits["train"].loaded, config.val_size, config.seed)
        splits["train"] = replace(splits["train"], loaded=train)
        splits["eval"] = _ReadSplit(validation, [], [])

    tokenized = {name: _tokenize_split(config, tokenizer, split.loaded, name) for name, split in splits.items()}
    if first is not None and first.loaded.kind == "unpaired":  # KTO: each row carries the completion its KL term scores
        for name, data in tokenized.items():
            group = config.per_device_train_batch_size if name == "train" else config.per_device_eval_batch_size
            kl_dataset = with_kl_completions(data.dataset, group, source=splits[name].loaded.source)
            tokenized[name] = replace(data, dataset=kl_dataset)
    report = {
        name: _split_report(split.loaded, split.skipped, tokenized[name], split.failed, config.on_bad_row == "skip")
        for name, split in splits.items()
    }
    return PreparedData(
        train=tokenized.get("train"),
        eval=tokenized.get("eval"),
        report=report,
        kind=first.loaded.kind if first else "paired",
        num_negatives=first.loaded.num_negatives if first else 1,
        eval_sets={_eval_name(key): data for key, data in tokenized.items() if key != "train"},
    )


def _eval_name(key: str) -> str | None:
    return None if key == "eval" else key.removeprefix("eval_")


def eval_sources(eval_source: Any) -> dict[str | None, Any]:
    """The eval sources by name: ``{}`` for None, ``{None: source}`` for one unnamed source, and ``{name: source}``
    for each entry of a mapping of named sources (a dict or a ``datasets.DatasetDict``, as TRL takes them)."""
    if eval_source is None:
        return {}
    if isinstance(eval_source, Mapping):
        return {str(name): source for name, source in eval_source.items()}
    return {None: eval_source}


def eval_key(name: str | None) -> str:
    """The metric prefix and report key of an eval set: ``eval`` for the unnamed set, ``eval_<name>`` otherwise."""
    return "eval" if name is None else f"eval_{name}"


def prepare_rows(config, tokenizer, rows: list[dict], *, source: str, first_row: int) -> tuple[TokenizedData, dict]:
    """Read, check and tokenize a list of raw rows, as ``prepare_data`` does a file: one chunk of a stream.

    Rows are numbered from ``first_row`` in messages and in the ``row`` column. Returns the tokenized rows and this
    chunk's report (the counts of ``prepare_data``'s report).
    """
    loaded = canonicalize_records(rows, source=source, on_bad_row=config.on_bad_row, first_row=first_row)
    split = _checked(config, loaded)
    tokenized = _tokenize_split(config, tokenizer, split.loaded, "train", cache=False)
    report = _split_report(split.loaded, split.skipped, tokenized, split.failed, config.on_bad_row == "skip")
    if tokenized.kind == "unpaired":
        kl_dataset = with_kl_completions(tokenized.dataset, config.per_device_train_batch_size, source=source)
        tokenized = replace(tokenized, dataset=kl_dataset)
    return tokenized, report


@dataclass
class _ReadSplit:
    """One split as read: its canonical rows, the rows skipped as bad and those that failed the cheap checks."""

    loaded: LoadedData
    skipped: list[tuple[int, str]]
    failed: list[dict[str, Any]]


def _read_split(config, source: Any) -> _ReadSplit:
    loaded = load_preference_data(
        source, dataset_dir=config.dataset_dir, max_samples=config.max_samples, on_bad_row=config.on_bad_row,
        media_dir=getattr(config, "media_dir", None),
    )
    return _checked(config, loaded)


def _checked(config, loaded: LoadedData) -> _ReadSplit:
    skipped = list(loaded.skipped_rows)
    checked, failed = _apply_cheap_checks(loaded, config.on_bad_row)
    return _ReadSplit(checked, skipped, failed)


def _tokenize_split(config, tokenizer, loaded: LoadedData, name: str, *, cache: bool = True) -> TokenizedData:
    settings = TokenizeSettings(
        max_length=config.max_length,
        truncation_mode=config.truncation_mode,
        **_template_settings(loaded, tokenizer, config.template),
        enable_thinking=config.enable_thinking,
    )
    cache_dir = None if config.overwrite_cache or not cache else str(default_cache_dir())
    tokenized = tokenize_dataset(loaded.dataset, tokenizer, settings, cache_dir=cache_dir, desc=f"Tokenizing {name} data")
    if len(tokenized.dataset) == 0:
        raise ConfigError(
            f"no {name} {'row' if loaded.kind == 'unpaired' else 'pair'} fits max_length={config.max_length} "
            f"with truncation_mode={config.truncation_mode}",
            key="max_length",
        )
    return tokenized
