"""Dataset readers: every supported preference format becomes one canonical form.

`load_preference_data` (a file, a folder, a registered dataset name, rows or a `datasets.Dataset`) and
`canonicalize_records` return `LoadedData`: TRL's explicit-prompt rows, text or conversational (`rejected` a
list of M responses for several negatives; `prompt`/`completion`/`label` for unpaired KTO rows), each with
`row`, the index of its source row, so later stages can name the row a problem came from. A bad row is skipped or
raised (`on_bad_row`) as a `DataError` naming file, row and field.

The canonical form, tool calls and reasoning fields, and every recognised row shape (TRL's, Anthropic HH,
LLaMA-Factory's alpaca and sharegpt): docs/data-formats.md.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets

from preftune.data.images import IMAGE_FEATURE, IMAGE_PLACEHOLDER, messages_as_text, placed_in_prompt, row_images
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

ON_BAD_ROW_CHOICES = ("error", "skip", "warn")
MAX_LOGGED_BAD_ROWS = 20
REGISTRY_FILE = "dataset_info.json"
DATA_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".json.gz", ".parquet", ".csv")
HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_INPUT_COLUMNS = ("tools", "chat_template_kwargs")
# Message fields beyond role and content that are kept, by role: what chat templates read for tool use and reasoning
# (Qwen, DeepSeek: reasoning_content; gpt-oss: thinking; Gemma: reasoning, tool_responses; tool results: the
# function's name, or the id of the call they answer). Any other field is dropped.
TEMPLATE_MESSAGE_FIELDS = {
    "assistant": ("tool_calls", "thinking", "reasoning_content", "reasoning", "tool_responses"),
    "tool": ("name", "tool_call_id"),
}
# apply_chat_template arguments that tokenization sets itself (or that change what it returns), so a row's
# chat_template_kwargs may not set them; tools come from the "tools" column.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "chat_template", "add_generation_prompt", "continue_final_message", "tokenize",
    "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
})

# Chinese text that is not UTF-8 is nearly always GBK / GB18030 (what Excel and Notepad on Chinese Windows save).
NOT_UTF8_HINT = ("expected UTF-8 text; a file saved as GBK / GB18030 (by Excel or Notepad on Chinese Windows) "
                 "converts with `iconv -f GB18030 -t UTF-8 IN > OUT`")

# json.loads recurses once per nesting level, so a deeper value raises RecursionError instead of JSONDecodeError.
TOO_DEEP = "nests lists/objects too deeply to read (Python's JSON reader stops near 1,000 levels)"

LABEL_TEXTS = {"true": True, "false": False, "1": True, "0": False}

# Columns of video or audio inputs (LLaMA-Factory: "videos", "audios"), by the kind of input they hold. preftune
# trains on text and images only, so data that has any is refused: dropping the column would train a multimodal model
# on the rest without a word. Images ("images" or "image"): preftune.data.images.
MEDIA_COLUMNS = {"videos": "video", "video": "video", "audios": "audio", "audio": "audio"}

Message = dict[str, Any]
RowItem = tuple[int, Any]  # (row index, record dict, or an unraised DataError for an unreadable row)


@dataclass
class LoadedData:
    """A preference dataset in canonical form.

    Attributes:
        dataset: paired: columns prompt, chosen, rejected (all text, or all message lists; rejected is a list of
            num_negatives responses when num_negatives >= 2) and row (int, 0-based index of the source row in its
            file). Unpaired: columns prompt, completion (text, or all message lists), label (bool, True =
            desirable) and row. Conversational data may also have the columns tools and chat_template_kwargs
            (TEMPLATE_INPUT_COLUMNS; null in rows without them); the Json columns: docs/data-formats.md.
        source: the file path(s) or dataset name(s), for messages.
        skipped_rows: (row, reason) for each row skipped under on_bad_row "skip" or "warn"; the reason is the
            full error message, naming the file.
        is_conversational: True when prompt and the responses are message lists.
        kind: "paired" (chosen/rejected) or "unpaired" (completion/label).
        num_negatives: rejected responses per prompt (M); 1 for classic pairs and for unpaired data.
    """

    dataset: datasets.Dataset
    source: str
    skipped_rows: list[tuple[int, str]]
    is_conversational: bool
    kind: str = "paired"
    num_negatives: int = 1


@dataclass
class _Example:
    """One converted, validated row: paired (chosen and a list of one or more rejected) or unpaired."""

    prompt: Any
    chosen: Any = None
    rejected: list | None = None
    completion: Any = None
    label: bool | None = None
    tools: list | None = None
    chat_template_kwargs: dict | None = None

    @property
    def kind(self) -> str:
        return "paired" if self.rejected is not None else "unpaired"

    @property
    def negatives(self) -> int:
        return len(self.rejected) if self.rejected is not None else 1


class _BadRow(Exception):
    """A row cannot be converted; the caller adds file and row."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def load_preference_data(
    source: str | list | datasets.Dataset,
    *,
    dataset_dir: str | None = None,
    split: str = "train",
    max_samples: int | None = None,
    on_bad_row: str = "error",
    media_dir: str | None = None,
) -> LoadedData:
    """Read preference data from any supported source into canonical form.

    Args:
        source: one of
            - a path to a JSON (list of row objects), JSON Lines (.jsonl, .ndjson, .jsonl.gz, .json.gz), Parquet or
              CSV file; a directory written by `datasets.save_to_disk` (a DatasetDict gives `split`); or a
              directory of such data files (read in name order);
            - a dataset name registered in `<dataset_dir>/dataset_info.json` (LLaMA-Factory registry; only
              `"ranking": true` entries (paired) and entries with a `kto_tag` column (unpaired) are preference
              data);
            - several of the above, comma-separated or as a list of strings: concatenated, all in the same form;
            - a list of row dicts, or a `datasets.Dataset`;
            - otherwise a Hugging Face Hub dataset id, read with `datasets.load_dataset(id, split=split)`.
            Relative paths resolve against dataset_dir when the file exists there, else against the cwd.
        dataset_dir: folder of the registry and of relative paths.
        split: split to take from a saved DatasetDict or a hub dataset.
        max_samples: keep the first N canonical rows (reading stops once N are collected, so skipped_rows then
            covers only the rows read).
        on_bad_row: "error" raises DataError on the first bad row; "skip" drops bad rows silently and "warn"
            drops them with a logged warning (the first MAX_LOGGED_BAD_ROWS); both record them in skipped_rows.
        media_dir: folder of relative image paths (``images`` / ``image`` columns); None: dataset_dir, else the
            data file's folder, else the working directory.

    Raises:
        DataError: unreadable or missing source, a bad row under on_bad_row="error" (including a row whose form,
            kind or number of rejected responses differs from the earlier rows'), sources that differ in form,
            kind or number of rejected responses, or no usable rows.
        ConfigError: on_bad_row or max_samples out of range.
    """
    _check_options(on_bad_row, max_samples)
    image_dir = media_dir or dataset_dir
    if isinstance(source, datasets.Dataset):
        return _canonicalize(_iter_records(source), source="in-memory datasets.Dataset", on_bad_row=on_bad_row,
                             convert=_convert_trl_row, limit=max_samples, image_dir=image_dir)
    if isinstance(source, list):
        if all(isinstance(item, str) for item in source) and source:
            return _load_many(source, dataset_dir, split, on_bad_row, max_samples, image_dir)
        if all(isinstance(item, dict) for item in source):
            return _canonicalize(enumerate(source), source="in-memory list", on_bad_row=on_bad_row,
                                 convert=_convert_trl_row, limit=max_samples, image_dir=image_dir)
        raise DataError("a list source must hold only row dicts or only source names/paths", file="in-memory list")
    if not isinstance(source, str):
        raise DataError(f"unsupported source type {type(source).__name__}; expected a path, a dataset name, "
                        "a list of rows or a datasets.Dataset")
    if _resolve_path(source, dataset_dir)[0] is None and "," in source:
        return _load_many([part.strip() for part in source.split(",") if part.strip()], dataset_dir, split,
                          on_bad_row, max_samples, image_dir)
    return _load_one(source.strip(), dataset_dir, split, on_bad_row, max_samples, image_dir)


def canonicalize_records(
    records: Iterable[dict], *, source: str, on_bad_row: str = "error", first_row: int = 0
) -> LoadedData:
    """Convert row dicts (any recognised row shape) into canonical form; row i of the input is "row"
    ``first_row + i`` (a chunk of a stream numbers its rows from where the previous chunk ended).

    Raises DataError for a bad row (under on_bad_row="error"; a row whose text/conversational form, paired/unpaired
    kind or number of rejected responses differs from the earlier rows' is a bad row), and when no usable rows
    remain.
    """
    _check_options(on_bad_row, None)
    return _canonicalize(enumerate(records, start=first_row), source=source, on_bad_row=on_bad_row,
                         convert=_convert_trl_row)


def locate_sources(source: str | list[str], *, dataset_dir: str | None = None) -> list[tuple[str, Path | None]]:
    """Where each name of ``source`` (a string, comma-separated names, or a list of them) would be read from, found
    as ``load_preference_data`` finds it but without reading a row: ``(name, path)`` for a registered dataset's file
    or a local path, ``(name, None)`` for a name left to the Hugging Face Hub.

    Raises:
        DataError: a name that looks like a path but is not there (naming the places looked at), a registered
            dataset whose file is missing, or an unreadable registry.
    """
    names = source if isinstance(source, list) else (
        [part.strip() for part in source.split(",") if part.strip()]
        if _resolve_path(source, dataset_dir)[0] is None and "," in source else [source.strip()]
    )
    registry, _ = _read_registry(dataset_dir)
    located: list[tuple[str, Path | None]] = []
    for name in names:
        if registry is not None and name in registry:
            entry = registry[name]
            file_name = entry.get("file_name") if isinstance(entry, dict) else None
            if isinstance(file_name, str) and file_name:
                path = Path(dataset_dir or ".") / file_name
                if not _exists(path):
                    raise DataError(f"dataset '{name}': file not found; expected it at {path}", file=str(path))
                located.append((name, path))
            else:
                located.append((name, None))  # a hub entry, or one load_preference_data will refuse with its reason
            continue
        path, looked = _resolve_path(name, dataset_dir)
        if path is None and _looks_like_path(name):
            raise DataError(f"file not found; looked at {', '.join(looked)}", file=name)
        located.append((name, path))
    return located


def _check_options(on_bad_row: str, max_samples: int | None) -> None:
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ConfigError(f"got {on_bad_row!r}; expected one of {', '.join(ON_BAD_ROW_CHOICES)}", key="on_bad_row")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ConfigError(f"got {max_samples!r}; expected a positive integer or None", key="max_samples")


# --------------------------------------------------------------------------------------------------------------
# Resolving a source
# --------------------------------------------------------------------------------------------------------------


def _load_many(names: list[str], dataset_dir: str | None, split: str, on_bad_row: str,
               limit: int | None, image_dir: str | None = None) -> LoadedData:
    """Load each source in turn and concatenate; the limit counts rows over all sources."""
    parts: list[LoadedData] = []
    for name in names:
        remaining = None if limit is None else limit - sum(len(part.dataset) for part in parts)
        if remaining is not None and remaining <= 0:
            break
        parts.append(_load_one(name, dataset_dir, split, on_bad_row, remaining, image_dir))
    return _concatenate(parts)


def _concatenate(parts: list[LoadedData]) -> LoadedData:
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    all_sources = ", ".join(p.source for p in parts)
    for part in parts[1:]:
        if part.kind != first.kind:
            raise DataError(f"cannot mix {first.kind} data ({first.source}) with {part.kind} data ({part.source}); "
                            "expected every source of the same kind", file=all_sources)
        if part.num_negatives != first.num_negatives:
            raise DataError(f"cannot mix data with {first.num_negatives} rejected responses per prompt "
                            f"({first.source}) and data with {part.num_negatives} ({part.source}); expected the "
                            "same number in every source", file=all_sources)
        if part.is_conversational != first.is_conversational:
            text, chat = (first, part) if part.is_conversational else (part, first)
            raise DataError(f"cannot mix text-form data ({text.source}) with conversational data ({chat.source}); "
                            "expected every source in the same form", file=all_sources)
    return LoadedData(
        dataset=datasets.concatenate_datasets(_aligned([part.dataset for part in parts])),
        source=", ".join(part.source for part in parts),
        skipped_rows=[skip for part in parts for skip in part.skipped_rows],
        is_conversational=first.is_conversational,
        kind=first.kind,
        num_negatives=first.num_negatives,
    )


def _aligned(parts: list[datasets.Dataset]) -> list[datasets.Dataset]:
    """The parts with the same columns and features, so they concatenate: a template-input column missing from a
    part is added as nulls, and a column stored as Json in any part is Json in all."""
    for name in TEMPLATE_INPUT_COLUMNS:
        if any(name in part.column_names for part in parts):
            parts = [part if name in part.column_names
                     else part.add_column(name, [None] * len(part), feature=datasets.Json()) for part in parts]
    if any("images" in part.column_names for part in parts):
        parts = [part if "images" in part.column_names
                 else part.add_column("images", [[]] * len(part), feature=IMAGE_FEATURE) for part in parts]
    json_columns = {name for part in parts for name, feature in part.features.items()
                    if isinstance(feature, datasets.Json)}
    if not json_columns:
        return parts
    features = datasets.Features({name: datasets.Json() if name in json_columns else feature
                                  for name, feature in parts[0].features.items()})
    return [part.select_columns(list(features)).cast(features) for part in parts]


def _load_one(name: str, dataset_dir: str | None, split: str, on_bad_row: str, limit: int | None,
              image_dir: str | None = None) -> LoadedData:
    """One name: a registered dataset, else a local path, else a hub dataset id. Relative image paths resolve
    against ``image_dir`` (None: the data file's folder)."""
    registry, registry_path = _read_registry(dataset_dir)
    if registry is not None and name in registry:
        return _load_registered(name, registry[name], registry_path, dataset_dir, split, on_bad_row, limit, image_dir)

    path, looked = _resolve_path(name, dataset_dir)
    if path is not None:
        return _load_path(path, split, on_bad_row, limit, convert=_convert_trl_row, source=str(path),
                          image_dir=image_dir)
    if _looks_like_path(name):
        raise DataError(f"file not found; looked at {', '.join(looked)}", file=name)

    try:
        hub_dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - any failure means "not on the hub" to the user
        registry_note = f"not registered in {registry_path}" if registry is not None else "no registry (dataset_dir)"
        raise DataError(
            f"'{name}' is neither a local file (looked at {', '.join(looked)}) nor a registered name "
            f"({registry_note}) nor reachable on the hub ({type(err).__name__}: {err})", file=name) from None
    return _canonicalize(_iter_records(hub_dataset), source=name, on_bad_row=on_bad_row,
                         convert=_convert_trl_row, limit=limit, image_dir=image_dir)


def _exists(path: Path) -> bool:
    """``path.exists()``, False also for a name the OS cannot look up (too long, say: Python 3.11 raises there)."""
    try:
        return path.exists()
    except OSError:
        return False


def _resolve_path(name: str, dataset_dir: str | None) -> tuple[Path | None, list[str]]:
    """The existing path `name` refers to (dataset_dir first for relative names) and the places looked."""
    candidate = Path(os.path.expanduser(name))
    if candidate.is_absolute():
        return (candidate if _exists(candidate) else None), [str(candidate)]
    places = ([Path(dataset_dir) / candidate] if dataset_dir else []) + [Path.cwd() / candidate]
    for place in places:
        if _exists(place):
            return place, [str(p) for p in places]
    return None, [str(p) for p in places]


def _looks_like_path(name: str) -> bool:
    return (name.lower().endswith(DATA_FILE_SUFFIXES) or name.startswith(("/", "./", "../", "~"))
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _load_path(path: Path, split: str, on_bad_row: str, limit: int | None,
               convert: Callable[[Any], _Example], source: str, images_column: str | None = None,
               image_dir: str | None = None) -> LoadedData:
    """A data file, a save_to_disk directory, or a directory of data files (read in name order). Relative image
    paths resolve against ``image_dir``, else the data's folder."""
    if image_dir is None:
        image_dir = str(path if path.is_dir() else path.parent)
    media = {"images_column": images_column, "image_dir": image_dir}
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            return _canonicalize(_iter_records(_load_saved(path, split)), source=source, on_bad_row=on_bad_row,
                                 convert=convert, limit=limit, **media)
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(DATA_FILE_SUFFIXES))
        if not files:
            raise DataError(f"directory holds neither a datasets.save_to_disk dataset nor data files "
                            f"({', '.join(DATA_FILE_SUFFIXES)})", file=source)
        parts: list[LoadedData] = []
        for file in files:
            remaining = None if limit is None else limit - sum(len(part.dataset) for part in parts)
            if remaining is not None and remaining <= 0:
                break
            parts.append(_load_path(file, split, on_bad_row, remaining, convert, str(file), **media))
        return _concatenate(parts)
    return _canonicalize(iter_file_rows(path, source), source=source, on_bad_row=on_bad_row, convert=convert,
                         limit=limit, **media)


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot read the saved dataset ({type(err).__name__}: {err})", file=str(path)) from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"split '{split}' not found; available splits: {', '.join(saved)}", file=str(path))
        return saved[split]
    return saved


# --------------------------------------------------------------------------------------------------------------
# Readers: each yields (row index, record dict or unraised DataError); whole-file problems raise DataError.
# --------------------------------------------------------------------------------------------------------------


def iter_file_rows(path: Path, source: str) -> Iterator[RowItem]:
    """``(row index, record)`` for each row of a JSON Lines, JSON, Parquet or CSV file (chosen by the suffix; ``.gz``
    for JSON), in file order; an unreadable row comes as an unraised ``DataError`` in place of its record, so the
    caller decides whether to skip it. A file that cannot be read at all raises ``DataError`` naming ``source``."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return _iter_jsonl(path, source)
    if name.endswith((".json", ".json.gz")):
        return _iter_json(path, source)
    if name.endswith(".parquet"):
        return _iter_parquet(path, source)
    if name.endswith(".csv"):
        return _iter_csv(path, source)
    raise DataError(f"unsupported file type; expected one of {', '.join(DATA_FILE_SUFFIXES)}, "
                    "a datasets.save_to_disk directory, or a registered dataset name", file=source)


def _read_text(path: Path, source: str) -> str:
    try:  # utf-8-sig: a leading byte-order mark (as some Windows editors write) is dropped, not a JSON error
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8-sig") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read file ({type(err).__name__}: {err}); {NOT_UTF8_HINT}", file=source) from None
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read file ({type(err).__name__}: {err}); expected UTF-8 text, "
                        "gzip-compressed when the name ends in .gz", file=source) from None


def _iter_jsonl(path: Path, source: str, text: str | None = None) -> Iterator[RowItem]:
    text = _read_text(path, source) if text is None else text
    # Only "\n" ends a line: str.splitlines() would also split at U+2028, U+0085, ... which JSON allows in strings.
    for line_index, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            yield line_index, json.loads(line)
        except json.JSONDecodeError as err:
            yield line_index, DataError(f"line {line_index + 1} is not valid JSON ({err.msg} at column {err.colno}); "
                                        "expected one JSON object per line", file=source, row=line_index)
        except RecursionError:
            yield line_index, DataError(f"line {line_index + 1} {TOO_DEEP}; expected one JSON object per line",
                                        file=source, row=line_index)


def _iter_json(path: Path, source: str) -> Iterator[RowItem]:
    text = _read_text(path, source)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            yield from _iter_jsonl(path, source, text)
            return
        raise DataError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})", file=source) from None
    except RecursionError:
        raise DataError(f"the document {TOO_DEEP}; expected a JSON list of row objects", file=source) from None
    if not isinstance(document, list):
        kind = "object" if isinstance(document, dict) else type(document).__name__
        keys = f" with keys {', '.join(list(document)[:5])}" if isinstance(document, dict) else ""
        raise DataError(f"the top level is a JSON {kind}{keys}; expected a JSON list of row objects "
                        "(or JSON Lines, one object per line)", file=source)
    yield from enumerate(document)


def _iter_parquet(path: Path, source: str) -> Iterator[RowItem]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batches = list(parquet.iter_batches(batch_size=4096))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read Parquet ({type(err).__name__}: {err})", file=source) from None
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield row, record
            row += 1


def _iter_csv(path: Path, source: str) -> Iterator[RowItem]:
    import csv

    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        as_text = pacsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                       strings_can_be_null=False)  # CSV cells are text: no number guessing
        table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True),
                               convert_options=as_text)
    except Exception as err:  # noqa: BLE001
        if isinstance(err, UnicodeDecodeError) or "invalid UTF8" in str(err):
            raise DataError(f"cannot read CSV ({type(err).__name__}: {err}); {NOT_UTF8_HINT}", file=source) from None
        raise DataError(f"cannot read CSV ({type(err).__name__}: {err}); expected a header row and "
                        "comma-separated, double-quoted values", file=source) from None
    yield from enumerate(table.to_pylist())


def _iter_records(dataset: datasets.Dataset) -> Iterator[RowItem]:
    return enumerate(dataset)


# --------------------------------------------------------------------------------------------------------------
# Canonicalization: convert each row, enforce one form, apply the bad-row policy.
# --------------------------------------------------------------------------------------------------------------


def _canonicalize(rows: Iterable[RowItem], *, source: str, on_bad_row: str, convert: Callable[[Any], _Example],
                  limit: int | None = None, images_column: str | None = None,
                  image_dir: str | None = None) -> LoadedData:
    """Convert rows (``convert``), enforce one form, apply the bad-row policy. ``images_column`` names the rows'
    images column (None: ``images`` or ``image``); relative image paths resolve against ``image_dir``."""
    examples: list[dict[str, Any]] = []
    skipped: list[tuple[int, str]] = []
    first: _Example | None = None  # the first good row decides form, kind and number of rejected responses
    identical = 0
    for row, item in rows:
        if isinstance(item, dict):
            _refuse_media_inputs(item, source, row)
        try:
            if isinstance(item, DataError):
                raise item
            images = _guarded_images(item, images_column, image_dir, source, row)
            if images:
                item = {key: messages_as_text(value) for key, value in item.items()}
            example = _convert_guarded(convert, item, source, row)
            if images:
                example = _with_images_placed(example, len(images), source, row)
            if first is not None:
                _check_like_first(example, first, source, row)
        except DataError as err:
            if on_bad_row == "error":
                raise
            skipped.append((row, str(err)))
            if on_bad_row == "warn" and len(skipped) <= MAX_LOGGED_BAD_ROWS:
                logger.warning("skipping bad row: %s", err)
            continue
        if first is None:
            first = example
        identical += example.kind == "paired" and example.chosen in example.rejected
        examples.append(_canonical_row(example, row) | ({"images": images} if images else {}))
        if limit is not None and len(examples) >= limit:
            break

    if skipped:
        capped = on_bad_row == "warn" and len(skipped) > MAX_LOGGED_BAD_ROWS
        more = f" (first {MAX_LOGGED_BAD_ROWS} logged)" if capped else ""
        logger.log(logging.WARNING if on_bad_row == "warn" else logging.INFO,
                   "%s: skipped %d bad rows%s", source, len(skipped), more)
    if identical:
        logger.warning("%s: %d rows have chosen identical to a rejected response; they carry no preference",
                       source, identical)
    if first is None:
        detail = f"all {len(skipped)} rows were skipped as bad" if skipped else "the source has no rows"
        raise DataError(f"no usable rows ({detail})", file=source)
    return LoadedData(dataset=_canonical_dataset(examples), source=source, skipped_rows=skipped,
                      is_conversational=isinstance(first.prompt, list), kind=first.kind,
                      num_negatives=first.negatives)


def _media_inputs_refusal(column: str) -> str:
    """The message refusing video or audio inputs found in `column` (a key of MEDIA_COLUMNS)."""
    return f"not supported yet: {MEDIA_COLUMNS[column]} inputs (column '{column}'); preftune trains on text and images"


def _guarded_images(record: Any, column: str | None, image_dir: str | None, source: str, row: int) -> list[dict]:
    """The row's images (``images.row_images``), a bad one as a DataError naming file, row and column."""
    if not isinstance(record, dict):
        return []
    try:
        return row_images(record, column, image_dir)
    except DataError as error:
        raise DataError(error.message, file=source, row=row, field=error.field) from None


def _with_images_placed(example: _Example, num_images: int, source: str, row: int) -> _Example:
    """The example with its images placed in its (conversational) prompt (``images.placed_in_prompt``)."""
    if not isinstance(example.prompt, list):
        raise DataError("has images but a text prompt; expected a conversational prompt (a list of messages) whose "
                        f"user turn holds the images ({IMAGE_PLACEHOLDER} or {{'type': 'image'}} parts)",
                        file=source, row=row, field="images")
    try:
        example.prompt = placed_in_prompt(example.prompt, num_images)
    except DataError as error:
        raise DataError(error.message, file=source, row=row, field=error.field) from None
    return example


def _refuse_media_inputs(record: dict, source: str, row: int) -> None:
    """Raise DataError when `record` has a video or audio column holding anything (one that is None or empty,
    e.g. `"videos": []`, passes). Raised whatever on_bad_row says: skipping such rows would also train on the rest
    in silence."""
    for column in MEDIA_COLUMNS:
        if not _is_empty_media(record.get(column)):
            raise DataError(_media_inputs_refusal(column), file=source, row=row, field=column)


def _is_empty_media(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (str, bytes, dict)):
        return not value
    if isinstance(value, (list, tuple)):
        return all(_is_empty_media(item) for item in value)
    return False


def _canonical_row(example: _Example, row: int) -> dict[str, Any]:
    """The output columns; a single rejected response is stored bare (the classic pair), several as a list.
    tools / chat_template_kwargs appear only when the row has them (`_canonical_dataset` fills the gaps)."""
    if example.kind == "unpaired":
        columns = {"prompt": example.prompt, "completion": example.completion, "label": example.label, "row": row}
    else:
        rejected = example.rejected[0] if example.negatives == 1 else example.rejected
        columns = {"prompt": example.prompt, "chosen": example.chosen, "rejected": rejected, "row": row}
    extras = {"tools": example.tools, "chat_template_kwargs": example.chat_template_kwargs}
    return columns | {name: value for name, value in extras.items() if value is not None}


def _canonical_dataset(examples: list[dict[str, Any]]) -> datasets.Dataset:
    """The canonical rows as a Dataset: tools / chat_template_kwargs columns when any row has them (null elsewhere),
    stored as Json; message columns as Json when any message has fields beyond role and content; an images column
    (``images.IMAGE_FEATURE``, [] in rows without) when any row has images."""
    if any("images" in example for example in examples):
        images = [example.get("images", []) for example in examples]
        text = _canonical_dataset([{k: v for k, v in example.items() if k != "images"} for example in examples])
        return text.add_column("images", images, feature=IMAGE_FEATURE)
    extras = [name for name in TEMPLATE_INPUT_COLUMNS if any(name in example for example in examples)]
    message_columns = [name for name in ("prompt", "chosen", "rejected", "completion")
                       if any(_has_extra_message_fields(example.get(name)) for example in examples)]
    if not extras and not message_columns:
        return datasets.Dataset.from_list(examples)
    json_columns = set(extras) | set(message_columns)
    rows = [example | {name: example.get(name) for name in extras} for example in examples]
    inferred = datasets.Dataset.from_list([{name: value for name, value in row.items() if name not in json_columns}
                                           for row in rows]).features
    features = datasets.Features({name: datasets.Json() if name in json_columns else inferred[name]
                                  for name in rows[0]})
    return datasets.Dataset.from_list(rows, features=features)


def _has_extra_message_fields(value: Any) -> bool:
    """Whether a message list (or a list of them: several rejected responses) has a message with fields beyond role
    and content."""
    if not isinstance(value, list):
        return False
    return any(_has_extra_message_fields(item) if isinstance(item, list)
               else isinstance(item, dict) and not set(item) <= {"role", "content"} for item in value)


def _check_like_first(example: _Example, first: _Example, source: str, row: int) -> None:
    """A row must match the first good row in kind, number of rejected responses and text/conversational form."""
    if example.kind != first.kind:
        shapes = {"paired": "paired (chosen + rejected)", "unpaired": "unpaired (completion + label)"}
        raise DataError(f"row is {shapes[example.kind]} but earlier rows are {shapes[first.kind]}; expected one kind "
                        "per dataset", file=source, row=row, field="chosen" if example.kind == "paired" else "label")
    if example.negatives != first.negatives:
        raise DataError(f"row has {example.negatives} rejected responses but earlier rows have {first.negatives}; "
                        "expected the same number in every row", file=source, row=row, field="rejected")
    row_is_conversational = isinstance(example.prompt, list)
    if row_is_conversational != isinstance(first.prompt, list):
        this, other = ("conversational", "text") if row_is_conversational else ("text", "conversational")
        raise DataError(f"row is in {this} form but earlier rows are {other}; expected one form per dataset",
                        file=source, row=row, field="prompt")


def _convert_guarded(convert: Callable[[Any], _Example], record: Any, source: str, row: int) -> _Example:
    """Run a row converter; any failure on odd input becomes a DataError naming file and row."""
    try:
        if not isinstance(record, dict):
            raise _BadRow(f"row is of type {type(record).__name__}; expected an object with chosen/rejected fields")
        return convert(record)
    except _BadRow as bad:
        raise DataError(bad.reason, file=source, row=row, field=bad.field) from None
    except DataError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # safety net for odd shapes
        raise DataError(f"cannot read row ({type(err).__name__}: {err})", file=source, row=row) from None


def _convert_trl_row(record: dict) -> _Example:
    """Any recognised row shape to a validated _Example."""
    detected = _detected_llamafactory_columns(record)
    if detected is not None:
        return _llamafactory_converter(detected)(record)
    example = _convert_unpaired_row(record) if _is_unpaired(record) else _convert_trl_pair(record)
    return _with_template_inputs(example, record)


def _convert_trl_pair(record: dict) -> _Example:
    """TRL preference row (explicit or implicit prompt, text or conversational) to a validated _Example."""
    chosen = _required(record, "chosen")
    raw_rejected = _required(record, "rejected")
    rejected = _rejected_responses(raw_rejected, "rejected")
    prompt = record.get("prompt")

    if prompt is None or (isinstance(prompt, str) and isinstance(chosen, list)):
        # implicit prompt (a string prompt beside full conversations repeats their first turn: ignore it)
        if isinstance(chosen, str) and all(isinstance(text, str) for text in rejected):
            prompt, chosen, rejected = _split_implicit_text(chosen, rejected)
        elif isinstance(chosen, list) and all(isinstance(messages, list) for messages in rejected):
            prompt, chosen, rejected = _split_implicit_conversation(chosen, rejected)
        else:
            raise _BadRow(f"chosen is {_kind(chosen)} and rejected is {_kind(raw_rejected)}; expected both strings "
                          "or both message lists", field="rejected")
        return _validated(prompt, chosen, rejected)

    if isinstance(prompt, list):
        chosen = _as_assistant_turn(chosen)
        rejected = [_as_assistant_turn(response) for response in rejected]
    elif not isinstance(prompt, str):
        raise _BadRow(f"prompt is {_kind(prompt)}; expected a string or a list of messages", field="prompt")
    return _validated(prompt, chosen, rejected)


def _with_template_inputs(example: _Example, record: dict) -> _Example:
    """The example with the row's validated tools and chat_template_kwargs (conversational rows only)."""
    example.tools = _validated_tools(record.get("tools"))
    example.chat_template_kwargs = _validated_template_kwargs(record.get("chat_template_kwargs"))
    present = [name for name in TEMPLATE_INPUT_COLUMNS if getattr(example, name)]
    if present and not isinstance(example.prompt, list):
        raise _BadRow(f"is set on a text row; expected {' and '.join(present)} only beside conversational rows (a "
                      "prompt of messages), which are rendered with the chat template", field=present[0])
    return example


def _decoded_json(value: Any, field: str, expected: str) -> Any:
    """A JSON string's value (TRL reads a string tools column with json.loads); any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise _BadRow(f"is a string that is not valid JSON ({err.msg} at column {err.colno}); expected {expected}",
                      field=field) from None
    except RecursionError:
        raise _BadRow(f"{TOO_DEEP}; expected {expected}", field=field) from None


def _validated_tools(value: Any) -> list | None:
    """The row's tools: None, or a list of function-schema objects (given as such, or as one JSON string)."""
    expected = "a list of JSON-schema function objects, or one JSON string of that list"
    tools = _decoded_json(value, "tools", expected)
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _BadRow(f"is {_kind(tools)}; expected {expected}", field="tools")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _BadRow(f"tool {index} is {tool!r:.80}; expected a JSON object (a function schema such as "
                          "{'type': 'function', 'function': {'name': ..., 'parameters': ...}})", field="tools")
    _encodable_value(tools, "tools")
    return tools


def _validated_template_kwargs(value: Any) -> dict | None:
    """The row's chat_template_kwargs: None, or an object (or a JSON string of one) of template variables."""
    expected = "an object of chat template variables such as {\"enable_thinking\": false}"
    kwargs = _decoded_json(value, "chat_template_kwargs", expected)
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise _BadRow(f"is of type {type(kwargs).__name__}; expected {expected}", field="chat_template_kwargs")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
    if reserved:
        hint = " (give tools in the row's 'tools' field)" if "tools" in reserved else ""
        raise _BadRow(f"sets {', '.join(reserved)}, which tokenization sets itself{hint}; expected only chat "
                      "template variables", field="chat_template_kwargs")
    _encodable_value(kwargs, "chat_template_kwargs")
    return kwargs


def _detected_llamafactory_columns(record: dict) -> _LlamaFactoryColumns | None:
    """Columns for a LLaMA-Factory row found in a plain file (no registry), or None for TRL rows."""
    if record.get("prompt") is not None:
        return None
    messages_column = next((name for name in ("conversations", "messages") if name in record), None)
    unpaired = record.get("label") is not None and record.get("chosen") is None
    if messages_column and (isinstance(record.get("chosen"), dict) or unpaired):
        return _sharegpt_columns_for(record, messages_column, kto_tag="label" if unpaired else None)
    has_system, has_history = "system" in record, "history" in record
    if "instruction" in record and isinstance(record.get("chosen"), str):
        return _LlamaFactoryColumns(system="system" if has_system else None,
                                    history="history" if has_history else None)
    if "instruction" in record and unpaired and "output" in record:
        return _LlamaFactoryColumns(system="system" if has_system else None,
                                    history="history" if has_history else None, kto_tag="label")
    return None


def _is_unpaired(record: dict) -> bool:
    """TRL unpaired rows carry completion/label instead of chosen/rejected."""
    no_pair = record.get("chosen") is None and record.get("rejected") is None
    return no_pair and (record.get("completion") is not None or record.get("label") is not None)


def _convert_unpaired_row(record: dict) -> _Example:
    """TRL unpaired row: prompt + completion + label; a completion holding the whole conversation (several
    messages, no separate message-list prompt) splits into prompt = all but its last turn, completion = last turn."""
    completion = _required(record, "completion")
    prompt = record.get("prompt")
    if isinstance(completion, list) and len(completion) > 1 and not isinstance(prompt, list):
        prompt, completion = completion[:-1], completion[-1:]
    if prompt is None:
        _required(record, "prompt", what="field")
    if isinstance(prompt, list):
        completion = _as_assistant_turn(completion)
    elif not isinstance(prompt, str):
        raise _BadRow(f"prompt is {_kind(prompt)}; expected a string or a list of messages", field="prompt")
    return _validated_unpaired(prompt, completion, _coerced_label(record.get("label"), "label"))


def _coerced_label(value: Any, field: str) -> bool:
    """A KTO label as bool: a bool, "true"/"false" in any case, or 0/1 (also as the strings "0"/"1", as CSV
    cells are). True marks a desirable completion."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_TEXTS:
        return LABEL_TEXTS[value.strip().lower()]
    if value is None:
        raise _BadRow("missing; expected a boolean label (true = desirable, false = undesirable)", field=field)
    raise _BadRow(f"is {value!r:.40}; expected a boolean label (true/false, 'true'/'false' in any case, or 0/1)",
                  field=field)


def _required(record: dict, field: str, what: str = "response") -> Any:
    value = record.get(field)
    if value is None:
        present = ", ".join(map(str, record)) or "none"
        raise _BadRow(f"missing; expected a '{field}' {what} (fields present: {present})", field=field)
    return value


def _rejected_responses(value: Any, field: str) -> list:
    """`rejected` as a list of responses: a list holding strings or lists (message lists) is several responses;
    anything else (a string, a message object, a message list) is one."""
    if isinstance(value, list):
        if not value:
            raise _BadRow("is an empty list; expected a response, or a non-empty list of responses", field=field)
        if not all(isinstance(item, dict) for item in value):
            return list(value)
    return [value]


def _as_assistant_turn(value: Any) -> Any:
    """Beside a conversational prompt, a bare string or a single message object means one assistant turn."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [value]
    return value


def _kind(value: Any) -> str:
    return "a message list" if isinstance(value, list) else f"of type {type(value).__name__}"


def _validated(prompt: Any, chosen: Any, rejected: list) -> _Example:
    """A paired row: text (all strings) or conversational (message-list prompt, one-message responses)."""
    if isinstance(prompt, str):
        _validated_prompt_text(prompt)
        return _Example(prompt=prompt, chosen=_validated_text_response(chosen, "chosen"),
                        rejected=_each_rejected(rejected, _validated_text_response))
    return _Example(prompt=_validated_messages(prompt, "prompt"), chosen=_validated_response(chosen, "chosen"),
                    rejected=_each_rejected(rejected, _validated_response))


def _validated_unpaired(prompt: Any, completion: Any, label: bool) -> _Example:
    if isinstance(prompt, str):
        _validated_prompt_text(prompt)
        return _Example(prompt=prompt, completion=_validated_text_response(completion, "completion"), label=label)
    return _Example(prompt=_validated_messages(prompt, "prompt"),
                    completion=_validated_response(completion, "completion"), label=label)


def _each_rejected(responses: list, validate: Callable[[Any, str], Any]) -> list:
    """Validate each rejected response; with several, a problem names the response's 0-based index."""
    if len(responses) == 1:
        return [validate(responses[0], "rejected")]
    checked = []
    for index, response in enumerate(responses):
        try:
            checked.append(validate(response, "rejected"))
        except _BadRow as bad:
            raise _BadRow(f"response {index} {bad.reason}", field=bad.field) from None
    return checked


def _encodable(text: str, field: str) -> str:
    """Refuse a lone surrogate (JSON allows the escape "\\ud800"; Arrow cannot store it), else return `text`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _BadRow(f"holds a lone surrogate {text[err.start]!r} at character {err.start}; expected valid Unicode "
                      "text", field=field) from None
    return text


def _encodable_value(value: Any, field: str) -> None:
    """`_encodable` for every string (keys included) inside nested lists and objects."""
    if isinstance(value, str):
        _encodable(value, field)
    elif isinstance(value, dict):
        for key, item in value.items():
            _encodable_value(key, field)
            _encodable_value(item, field)
    elif isinstance(value, list):
        for item in value:
            _encodable_value(item, field)


def _validated_prompt_text(prompt: str) -> None:
    if not prompt.strip():
        raise _BadRow("prompt is empty; expected non-empty prompt text", field="prompt")
    _encodable(prompt, "prompt")


def _validated_text_response(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _BadRow(f"is {_kind(value)}; expected a string (the prompt is text)", field=field)
    _encodable(value, field)
    if not value.strip():
        raise _BadRow("is empty (whitespace only); expected a non-empty response", field=field)
    return value


def _validated_message(message: Any, field: str, index: int) -> Message:
    """A message with a known role and string content (an assistant tool call may have none), keeping the other
    fields of TEMPLATE_MESSAGE_FIELDS as they are (the chat template reads them) and dropping the rest."""
    tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
    if tool_calls is not None and (message.get("role") != "assistant" or not isinstance(tool_calls, list)
                                   or not all(isinstance(call, dict) for call in tool_calls)):
        raise _BadRow(f"message {index} has tool_calls {tool_calls!r:.80}; expected a list of call objects on an "
                      "assistant message", field=field)
    if not isinstance(message, dict) or "role" not in message or ("content" not in message
                                                                   and not _calls_tools(message)):
        raise _BadRow(f"message {index} is {message!r:.80}; expected an object with 'role' and 'content'", field=field)
    role, content = message["role"], message.get("content")
    if role not in ROLES:
        raise _BadRow(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}", field=field)
    if not isinstance(content, str) and not (content is None and _calls_tools(message)):
        raise _BadRow(f"message {index} content is {_kind(content)}; expected a string", field=field)
    kept = {"role": role, **({"content": content} if "content" in message else {})}
    kept.update((name, message[name]) for name in TEMPLATE_MESSAGE_FIELDS.get(role, ()) if name in message)
    _encodable_value(kept, field)
    return kept


def _calls_tools(message: dict) -> bool:
    """An assistant message with a non-empty tool_calls list."""
    return message.get("role") == "assistant" and isinstance(message.get("tool_calls"), list) \
        and bool(message["tool_calls"])


# The prompt's turn order: the roles that may follow each role (after an optional leading system turn, the first
# turn is the user's). A tool result follows an assistant turn (its call) or another tool result.
PROMPT_NEXT_ROLES = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant", "user")}


def _validated_messages(messages: Any, field: str) -> list[Message]:
    """A prompt: optional leading system turn, then user/assistant alternating from a user turn (tool results after
    an assistant turn), ending on a user turn or a tool result."""
    if not isinstance(messages, list) or not messages:
        raise _BadRow(f"is {_kind(messages)}; expected a non-empty list of messages", field=field)
    clean = [_validated_message(message, field, index) for index, message in enumerate(messages)]
    start = 1 if clean[0]["role"] == "system" else 0
    for index in range(start, len(clean)):
        allowed = ("user",) if index == start else PROMPT_NEXT_ROLES[clean[index - 1]["role"]]
        if clean[index]["role"] not in allowed:
            expected = " or ".join(f"'{role}'" for role in allowed)
            raise _BadRow(f"message {index} has role '{clean[index]['role']}'; expected {expected} (an optional "
                          "leading system turn, then user and assistant turns alternating, tool results after an "
                          "assistant turn)", field=field)
    if len(clean) == start or clean[-1]["role"] not in ("user", "tool"):
        raise _BadRow("does not end on a user turn; expected the last prompt message to be from the user (or a tool "
                      "result)", field=field)
    return clean


def _validated_response(messages: Any, field: str) -> list[Message]:
    """A response: one assistant message, or assistant tool calls each followed by their tool results, ending on an
    assistant message ([assistant+tool_calls, tool, ..., assistant]). Every assistant message has non-empty
    content or tool calls."""
    hint = " (several rejected responses: a list of message lists)" if field == "rejected" else ""
    if not isinstance(messages, list) or not messages:
        shape = "an empty list" if isinstance(messages, list) else _kind(messages)
        raise _BadRow(f"is {shape}; expected one assistant message{hint}", field=field)
    clean = [_validated_message(message, field, index) for index, message in enumerate(messages)]
    if clean[0]["role"] != "assistant":
        raise _BadRow(f"has role '{clean[0]['role']}'; expected 'assistant'", field=field)
    for index, message in enumerate(clean):
        role, calls = message["role"], _calls_tools(message)
        if role not in ("assistant", "tool"):
            raise _BadRow(f"message {index} has role '{role}'; expected 'assistant' or 'tool' inside a response",
                          field=field)
        if role == "assistant" and not calls and not message["content"].strip():
            where = "" if len(clean) == 1 else f"message {index} "
            raise _BadRow(f"{where}is empty (whitespace only); expected a non-empty response", field=field)
        if role != "assistant" or index + 1 == len(clean):
            continue
        following = clean[index + 1]["role"]
        if not calls:
            raise _BadRow(f"is {len(clean)} messages; expected one assistant message{hint}, or assistant tool calls "
                          f"each followed by their 'tool' results and ending on an assistant message (message "
                          f"{index + 1}, '{following}', follows an assistant message without tool_calls)", field=field)
        if following != "tool":
            raise _BadRow(f"message {index + 1} has role '{following}'; expected the 'tool' results of the tool calls "
                          f"in message {index}", field=field)
    if clean[-1]["role"] != "assistant":
        raise _BadRow(f"ends on a '{clean[-1]['role']}' message; expected a response to end on an assistant message",
                      field=field)
    return clean


# --------------------------------------------------------------------------------------------------------------
# Implicit prompts
# --------------------------------------------------------------------------------------------------------------


def _is_hh_dialogue(text: str) -> bool:
    return text.lstrip().startswith("Human:") and HH_ASSISTANT in text


def _split_implicit_text(chosen: str, rejected: list[str]) -> tuple[str, str, list[str]]:
    """Split full texts into (shared prompt, chosen response, rejected responses).

    Anthropic HH dialogues split right after the last "\\n\\nAssistant:" they all share, so each response starts
    after the marker (usually with a space). Other texts split at the last word boundary within their longest
    common prefix (see `implicit_prompt_end`), with the whitespace there going to the responses (as TRL's
    extract_prompt does with one space).
    """
    texts = [chosen, *rejected]
    shared = os.path.commonprefix(texts)
    if all(_is_hh_dialogue(text) for text in texts):
        marker = shared.rfind(HH_ASSISTANT)
        if marker < 0:
            raise _BadRow("chosen and rejected dialogues differ before the first '\\n\\nAssistant:'; expected them to "
                          "share everything up to the final assistant turn", field="chosen")
        end = marker + len(HH_ASSISTANT)
    else:
        end = implicit_prompt_end(texts)
        if end == 0:
            raise _BadRow("chosen and rejected share no leading words, so no prompt can be extracted; expected an "
                          "explicit 'prompt' field or texts that begin with the same prompt", field="prompt")
    return chosen[:end], chosen[end:], [text[end:] for text in rejected]


# Scripts written without spaces between words (Chinese, Japanese): next to one of these characters every character
# boundary is a word boundary. Hangul is not here: Korean puts spaces between words.
_UNSPACED_SCRIPT_RANGES = (
    (0x2E80, 0x2FDF),  # CJK radicals supplement, Kangxi radicals
    (0x2FF0, 0x2FFF),  # ideographic description characters
    (0x3000, 0x303F),  # CJK symbols and punctuation: 、。「」《》〜 (the ideographic space U+3000 is whitespace)
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x3100, 0x312F),  # bopomofo
    (0x31A0, 0x31FF),  # bopomofo extended, CJK strokes, katakana phonetic extensions
    (0x3200, 0x33FF),  # enclosed CJK letters and months, CJK compatibility
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # halfwidth and fullwidth forms: ，！？：（）０-９Ａ-Ｚ, halfwidth katakana
    (0x20000, 0x3FFFF),  # CJK unified ideographs extensions B-H, compatibility ideographs supplement
)
_JOINERS = ("\u200c", "\u200d")  # zero-width non-joiner and joiner bind the characters on either side


def _is_unspaced_script(char: str) -> bool:
    """Whether `char` (one character) belongs to a script written without spaces between words: Han ideographs,
    kana, bopomofo, CJK punctuation and symbols, fullwidth and halfwidth forms."""
    code = ord(char)
    return any(low <= code <= high for low, high in _UNSPACED_SCRIPT_RANGES)


def _attaches_to_previous(char: str) -> bool:
    """A combining mark, variation selector or joiner belongs with the character before it: never cut before it."""
    return unicodedata.category(char) in ("Mn", "Mc", "Me") or char in _JOINERS


def _is_word_boundary(before: str, after: str) -> bool:
    """Whether a cut between the characters `before` and `after` ("" for the end of the text) falls between words:
    at whitespace, at the end of the text, or next to a character of an unspaced script (Chinese, Japanese), where
    every character boundary counts, except before a combining mark and on either side of a joiner."""
    if not after or after.isspace() or before.isspace():
        return True
    if _attaches_to_previous(after) or before in _JOINERS:
        return False
    return _is_unspaced_script(before) or _is_unspaced_script(after)


def implicit_prompt_end(texts: list[str]) -> int:
    """Where the implicit prompt of `texts` (chosen and rejected, each prompt + response) ends: the largest cut
    within their longest common prefix that is a word boundary (`_is_word_boundary`) in every text and leaves no
    whitespace at the prompt's end (whitespace goes to the responses). 0 when there is none.

    For spaced text this is the last whitespace before the texts differ (or the point they differ, when every
    text continues with whitespace there); in Chinese or Japanese text, the last character they share; in mixed
    text, a Latin word is never cut in two: "我喜欢Python" / "我喜欢Pascal" gives "我喜欢". TRL's extract_prompt
    instead cuts where the texts first differ, moving one space into the responses ("A: f" + "our", "我喜欢P" +
    "ython"); on Chinese text with no Latin letter or space at the cut the two agree.
    """
    shared = os.path.commonprefix(texts)
    for end in range(len(shared), 0, -1):
        before = shared[end - 1]
        if not before.isspace() and all(_is_word_boundary(before, text[end:end + 1]) for text in texts):
            return end
    return 0


def _split_implicit_conversation(chosen: list, rejected: list[list]) -> tuple[list, list, list[list]]:
    """Prompt = the longest run of messages all conversations share, backed off to end on a user turn or a tool
    result (so a shared tool call and its result stay in the prompt, as in TRL's extract_prompt); the rest are the
    responses."""
    end = 0
    while end < min(len(chosen), *map(len, rejected)) and all(other[end] == chosen[end] for other in rejected):
        end += 1
    while end > 0 and not (isinstance(chosen[end - 1], dict) and chosen[end - 1].get("role") in ("user", "tool")):
        end -= 1
    if end == 0:
        raise _BadRow("chosen and rejected conversations share no user turn; expected them to begin with the same "
                      "prompt messages, or an explicit 'prompt' field", field="prompt")
    return chosen[:end], chosen[end:], [other[end:] for other in rejected]


# --------------------------------------------------------------------------------------------------------------
# LLaMA-Factory registry and row formats
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LlamaFactoryColumns:
    """Column names and sharegpt tags of one registry entry (LLaMA-Factory's defaults); kto_tag names the label
    column of unpaired data (None for ranking data), response the alpaca completion column of unpaired data."""

    formatting: str = "alpaca"
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str = "output"
    kto_tag: str | None = None
    history: str | None = None
    system: str | None = None
    messages: str = "conversations"
    chosen: str = "chosen"
    rejected: str = "rejected"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str = "observation"
    function_tag: str = "function_call"
    system_tag: str = "system"

    @classmethod
    def from_entry(cls, entry: dict) -> _LlamaFactoryColumns:
        values: dict[str, Any] = {"formatting": entry.get("formatting", "alpaca")}
        columns = entry.get("columns")
        if isinstance(columns, dict):
            # As in LLaMA-Factory, a "columns" block replaces the alpaca prompt/query defaults.
            values.update(prompt=columns.get("prompt"), query=columns.get("query"), history=columns.get("history"),
                          system=columns.get("system"), kto_tag=columns.get("kto_tag"))
            for key in ("messages", "chosen", "rejected", "response"):
                if columns.get(key):
                    values[key] = columns[key]
        tags = entry.get("tags")
        if isinstance(tags, dict):
            names = {f.name for f in fields(cls) if f.name.endswith("_tag") and f.name != "kto_tag"}
            values.update({key: value for key, value in tags.items() if key in names and value})
        return cls(**values)


def _sharegpt_columns_for(record: dict, messages_column: str, kto_tag: str | None = None) -> _LlamaFactoryColumns:
    """Tags for an auto-detected sharegpt row: "from"/"value" style, or "role"/"content" style."""
    messages = record.get(messages_column)
    first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
    if "role" in first or (isinstance(record.get("chosen"), dict) and "role" in record["chosen"]):
        return _LlamaFactoryColumns(formatting="sharegpt", messages=messages_column, role_tag="role",
                                    content_tag="content", user_tag="user", assistant_tag="assistant",
                                    kto_tag=kto_tag)
    return _LlamaFactoryColumns(formatting="sharegpt", messages=messages_column,
                                system="system" if "system" in record else None, kto_tag=kto_tag)


def _read_registry(dataset_dir: str | None) -> tuple[dict | None, str | None]:
    if not dataset_dir:
        return None, None
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.is_file():
        return None, str(path)
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read the dataset registry ({err}); expected a JSON object of dataset entries",
                        file=str(path)) from None
    if not isinstance(registry, dict):
        raise DataError("the dataset registry is not a JSON object; expected {name: entry, ...}", file=str(path))
    return registry, str(path)


def _load_registered(name: str, entry: Any, registry_path: str | None, dataset_dir: str | None, split: str,
                     on_bad_row: str, limit: int | None, image_dir: str | None = None) -> LoadedData:
    """A LLaMA-Factory registry entry from "file_name" (file or folder) or "hf_hub_url": a ranking dataset
    (paired) or a dataset with a kto_tag column (unpaired)."""
    where = f"dataset '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: entry is not an object", file=registry_path)
    columns = _LlamaFactoryColumns.from_entry(entry)
    if entry.get("ranking") and columns.kto_tag:
        raise DataError(f"{where}: sets both \"ranking\": true and a kto_tag column; expected one of them (ranking: "
                        "chosen/rejected pairs; kto_tag: unpaired completions with a label)", file=registry_path)
    if not entry.get("ranking") and not columns.kto_tag:
        raise DataError(f"{where}: not a preference (ranking) dataset; expected \"ranking\": true with chosen and "
                        "rejected columns, or a kto_tag column (unpaired data)", file=registry_path)
    if columns.formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting '{columns.formatting}' is not supported; expected alpaca or sharegpt",
                        file=registry_path)
    if entry.get("num_samples"):
        logger.warning("%s: num_samples is ignored; use max_samples to truncate", where)
    _check_column_names(entry, where, registry_path)
    _refuse_registered_media(entry, where, registry_path)
    columns_block = entry.get("columns")
    images_column = columns_block.get("images") or None if isinstance(columns_block, dict) else None
    convert = _llamafactory_converter(columns)

    if "file_name" in entry:
        if not isinstance(entry["file_name"], str) or not entry["file_name"]:
            raise DataError(f"{where}: file_name is {entry['file_name']!r:.80}; expected a file or folder name "
                            "(a non-empty string)", file=registry_path)
        path = Path(dataset_dir or ".") / entry["file_name"]
        if not _exists(path):
            raise DataError(f"{where}: file not found; expected it at {path}", file=str(path))
        return _load_path(path, split, on_bad_row, limit, convert=convert, source=f"{path} (dataset '{name}')",
                          images_column=images_column, image_dir=image_dir or dataset_dir or ".")
    if "hf_hub_url" in entry:
        hub_id = entry["hf_hub_url"]
        try:
            hub_dataset = datasets.load_dataset(hub_id, name=entry.get("subset"), data_dir=entry.get("folder"),
                                                split=entry.get("split", split))
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{where}: cannot load '{hub_id}' from the hub ({type(err).__name__}: {err})",
                            file=hub_id) from None
        return _canonicalize(_iter_records(hub_dataset), source=f"{hub_id} (dataset '{name}')",
                             on_bad_row=on_bad_row, convert=convert, limit=limit, images_column=images_column,
                             image_dir=image_dir or dataset_dir)
    raise DataError(f"{where}: only 'file_name' and 'hf_hub_url' entries are supported "
                    f"(entry has {', '.join(entry)})", file=registry_path)


def _check_column_names(entry: dict, where: str, registry_path: str | None) -> None:
    """The registry's "columns" and "tags" values name columns and role tags, so each must be a string (or null)."""
    for block in ("columns", "tags"):
        values = entry.get(block)
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{where}: {block}.{key} is {value!r:.80}; expected a column or tag name (a string)",
                                file=registry_path)


def _refuse_registered_media(entry: dict, where: str, registry_path: str | None) -> None:
    """An entry whose "columns" name video or audio columns: refused before reading it."""
    columns = entry.get("columns")
    if not isinstance(columns, dict):
        return
    for key in ("videos", "audios"):
        if columns.get(key):
            raise DataError(f"{where}: {_media_inputs_refusal(key)} (columns.{key} is '{columns[key]}')",
                            file=registry_path, field=f"columns.{key}")


def _llamafactory_converter(columns: _LlamaFactoryColumns) -> Callable[[dict], _Example]:
    """The row converter for a registry entry."""
    if columns.formatting == "sharegpt":
        return lambda record: _convert_sharegpt(record, columns)
    return lambda record: _convert_alpaca(record, columns)


def _convert_alpaca(record: dict, columns: _LlamaFactoryColumns) -> _Example:
    """Alpaca row: prompt = [system], history pairs, then user = instruction + "\\n" + input. Ranking: chosen a
    string, rejected a string or a list of strings. kto_tag: the completion is the response column (a string)."""
    prompt = _alpaca_prompt(record, columns)
    prompt_field = columns.prompt or "instruction"
    if columns.kto_tag:
        completion = _required(record, columns.response)
        if not isinstance(completion, str):
            raise _BadRow(f"is {_kind(completion)}; expected a string response (alpaca format)", field=columns.response)
        label = _coerced_label(record.get(columns.kto_tag), columns.kto_tag)
        renames = {"prompt": prompt_field, "completion": columns.response}
        return _renamed_fields(renames, lambda: _validated_unpaired(prompt, _assistant(completion), label))
    chosen = _required(record, columns.chosen)
    rejected = _rejected_responses(_required(record, columns.rejected), columns.rejected)
    for column, values in ((columns.chosen, [chosen]), (columns.rejected, rejected)):
        for value in values:
            if not isinstance(value, str):
                raise _BadRow(f"is {_kind(value)}; expected a string response (alpaca ranking format)", field=column)
    renames = {"prompt": prompt_field, "chosen": columns.chosen, "rejected": columns.rejected}
    return _renamed_fields(renames, lambda: _validated(prompt, _assistant(chosen),
                                                       [_assistant(response) for response in rejected]))


def _alpaca_prompt(record: dict, columns: _LlamaFactoryColumns) -> list[Message]:
    prompt: list[Message] = []
    system = record.get(columns.system) if columns.system else None
    if system:
        prompt.append({"role": "system", "content": system})
    history = record.get(columns.history) if columns.history else None
    if history:
        if not isinstance(history, list):
            raise _BadRow(f"is {_kind(history)}; expected a list of [user, assistant] pairs", field=columns.history)
        for index, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise _BadRow(f"entry {index} is {pair!r:.80}; expected a [user, assistant] pair",
                              field=columns.history)
            prompt += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    parts = [record.get(column) for column in (columns.prompt, columns.query) if column and record.get(column)]
    if not parts:
        names = " / ".join(column for column in (columns.prompt, columns.query) if column)
        raise _BadRow("is empty or missing; expected the user instruction", field=names or "instruction")
    if not all(isinstance(part, str) for part in parts):
        raise _BadRow("is not text; expected a string instruction", field=columns.prompt)
    prompt.append({"role": "user", "content": "\n".join(parts)})
    return prompt


def _assistant(content: str) -> list[Message]:
    return [{"role": "assistant", "content": content}]


def _convert_sharegpt(record: dict, columns: _LlamaFactoryColumns) -> _Example:
    """Sharegpt row. Ranking: [system] + user/assistant turns ending on user; chosen a message object, rejected
    one or a list of them (one per rejected response). kto_tag: the turns end on the assistant completion;
    everything before is the prompt."""
    turns = _sharegpt_turns(record, columns)
    if columns.kto_tag:
        if turns[-1]["role"] != "assistant":
            raise _BadRow(f"ends on a {turns[-1]['role']} turn; expected the last turn to be the assistant "
                          "completion (kto_tag data)", field=columns.messages)
        label = _coerced_label(record.get(columns.kto_tag), columns.kto_tag)
        renames = {"prompt": columns.messages, "completion": columns.messages}
        return _renamed_fields(renames, lambda: _validated_unpaired(turns[:-1], turns[-1:], label))
    chosen = _sharegpt_response(_required(record, columns.chosen), columns, columns.chosen)
    responses = _required(record, columns.rejected)
    if isinstance(responses, list):  # a list of message objects: one per rejected response
        if not responses:
            raise _BadRow("is an empty list; expected a message object, or a non-empty list of them",
                          field=columns.rejected)
    else:
        responses = [responses]
    rejected = []
    for index, value in enumerate(responses):
        try:
            rejected.append(_sharegpt_response(value, columns, columns.rejected))
        except _BadRow as bad:
            raise (_BadRow(f"response {index} {bad.reason}", field=bad.field) if len(responses) > 1 else bad) from None
    renames = {"prompt": columns.messages, "chosen": columns.chosen, "rejected": columns.rejected}
    return _renamed_fields(renames, lambda: _validated(turns, chosen, rejected))


def _sharegpt_turns(record: dict, columns: _LlamaFactoryColumns) -> list[Message]:
    """The messages column (plus a system column) as role/content messages; tool turns are refused."""
    messages = record.get(columns.messages)
    if not isinstance(messages, list) or not messages:
        raise _BadRow(f"is {_kind(messages)}; expected a non-empty list of turns", field=columns.messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or columns.role_tag not in message or columns.content_tag not in message:
            raise _BadRow(f"turn {index} is {message!r:.80}; expected an object with '{columns.role_tag}' and "
                          f"'{columns.content_tag}'", field=columns.messages)
        if not isinstance(message[columns.role_tag], str):
            raise _BadRow(f"turn {index} has '{columns.role_tag}' {message[columns.role_tag]!r:.80}; expected a "
                          f"string such as '{columns.user_tag}'", field=columns.messages)
    turns: list[Message] = []
    if messages[0][columns.role_tag] == columns.system_tag:
        system = messages[0][columns.content_tag]
        messages = messages[1:]
    else:
        system = record.get(columns.system) if columns.system else None
    if system:
        turns.append({"role": "system", "content": system})
    tag_roles = {columns.user_tag: "user", columns.assistant_tag: "assistant"}
    for message in messages:
        tag = message[columns.role_tag]
        if tag in (columns.observation_tag, columns.function_tag):
            raise _BadRow(f"has a '{tag}' turn; tool calls and observations are not supported yet",
                          field=columns.messages)
        if tag not in tag_roles:
            raise _BadRow(f"has a turn tagged {tag!r}; expected '{columns.user_tag}' or '{columns.assistant_tag}' "
                          f"(and '{columns.system_tag}' only first)", field=columns.messages)
        turns.append({"role": tag_roles[tag], "content": message[columns.content_tag]})
    if not turns:
        raise _BadRow("holds only a system turn; expected user and assistant turns", field=columns.messages)
    return turns


def _sharegpt_response(value: Any, columns: _LlamaFactoryColumns, column: str) -> list[Message]:
    """A chosen/rejected message object as a one-message assistant response."""
    if not isinstance(value, dict) or columns.content_tag not in value:
        raise _BadRow(f"is {_kind(value)}; expected a message object {{'{columns.role_tag}': "
                      f"'{columns.assistant_tag}', '{columns.content_tag}': ...}}", field=column)
    tag = value.get(columns.role_tag, columns.assistant_tag)
    if tag != columns.assistant_tag:
        raise _BadRow(f"has role {tag!r}; expected '{columns.assistant_tag}'", field=column)
    return _assistant(value[columns.content_tag])


def _renamed_fields(renames: dict[str, str], build: Callable[[], _Example]) -> _Example:
    """Run a canonical validation, reporting problems under the source file's own column names."""
    try:
        return build()
    except _BadRow as bad:
        raise _BadRow(bad.reason, field=renames.get(bad.field, bad.field)) from None
