"""Data checks: which rows of a preference dataset carry a problem, as a report, a cleaned copy, and the cheap checks
that run at training start.

A dataset is read with the ordinary readers (`formats.load_preference_data`, on_bad_row="skip"), so every row the
readers refuse (wrong types, missing fields, invalid JSON, broken turn order, empty responses) is reported with the
readers' own reason. The rules then look at the rows that were read (canonical form; paired with one or several
rejected responses, or unpaired KTO rows):

- identical_pair:   chosen equals a rejected response (no preference to learn).
- empty_or_short:   a response (chosen, any rejected, or the completion) with fewer than `min_chars` characters
                    after stripping whitespace; the default 1 flags only empty ones, since one-character answers
                    ("4", "B") are legitimate.
- too_similar:      chosen and a rejected response differ only a little: the normalized Indel similarity
                    1 - (insertions + deletions) / (len(a) + len(b)) (rapidfuzz `fuzz.ratio` / 100) is above
                    `max_similarity` (default 0.9). Identical pairs are counted under identical_pair only.
- turn_order:       a conversation whose roles do not go [system], user, assistant, user, ..., user (tool results may
                    follow an assistant turn, and end the prompt), followed by one assistant response (or assistant
                    tool calls with their tool results, ending on an assistant message).
- prompt_too_long:  the prompt alone is longer than `max_length` tokens after templating (needs a tokenizer).
- duplicate:        the same prompt and responses (and label) as an earlier row; the first copy is kept.
- non_utf8:         a JSON / JSON Lines row holding bytes that are not UTF-8.
- unreadable_row:   any other row the readers refuse.

"Row" numbers are the 0-based row (line) indices in the source file, as in every preftune error message.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from rapidfuzz.distance import Indel

from preftune import atomic
from preftune.data.formats import (
    PROMPT_NEXT_ROLES,
    TEMPLATE_INPUT_COLUMNS,
    LoadedData,
    canonicalize_records,
    load_preference_data,
)
from preftune.errors import ConfigError, DataError

DEFAULT_MIN_CHARS = 1
DEFAULT_MAX_SIMILARITY = 0.9
MAX_EXAMPLES = 10

RULES = {
    "identical_pair": "chosen is identical to a rejected response, so the row carries no preference",
    "empty_or_short": "an empty prompt or response, or a response shorter than min_chars characters (stripped)",
    "too_similar": "chosen and a rejected response are nearly the same text (similarity above max_similarity)",
    "turn_order": "roles must go [system], user, assistant, ..., user (or tool results), then one assistant response "
                  "(or tool calls, their results and an answer)",
    "prompt_too_long": "the templated prompt alone has more than max_length tokens",
    "duplicate": "the same prompt and responses as an earlier row (the first copy is kept)",
    "non_utf8": "the row holds bytes that are not valid UTF-8",
    "unreadable_row": "the readers refuse the row (wrong types, missing fields, invalid JSON, mixed forms)",
}
CHEAP_RULES = ("identical_pair", "empty_or_short", "duplicate")
"""Rules fast enough for every training start (100k rows in about a second): no similarity, no tokenizer."""

_NON_UTF8_REASON = "holds bytes that are not valid UTF-8; expected UTF-8 text"
_UNDECODABLE = range(0xDC80, 0xDD00)  # where errors="surrogateescape" puts each undecodable byte
_REFUSED_PATTERNS = (  # reader reasons -> rule; anything else is unreadable_row
    ("turn_order", ("alternating", "does not end on a user turn", "expected the last turn to be the assistant",
                    "expected 'assistant'")),
    ("empty_or_short", ("is empty (whitespace only)", "prompt is empty")),
)


@dataclass
class CheckSettings:
    """Thresholds of the rules; prompt_too_long runs only with both a tokenizer and max_length.

    template: a named template for conversational prompts (counted with LLaMA-Factory's ids, as training does);
        it wins over chat_template.
    chat_template: Jinja source for conversational prompts (None: the tokenizer's own, else the named "default":
        ``templates.choose_template``).
    tokenizer_note: why no tokenizer is given (shown when prompt_too_long is not checked).
    """

    min_chars: int = DEFAULT_MIN_CHARS
    max_similarity: float = DEFAULT_MAX_SIMILARITY
    max_length: int | None = None
    tokenizer: Any = None
    chat_template: str | None = None
    template: str | None = None
    tokenizer_note: str = "needs a tokenizer and max_length (--tokenizer and --max-length, or a config)"


@dataclass
class RuleResult:
    """One rule's findings: how many rows, the first MAX_EXAMPLES row numbers, and reader reasons where known."""

    name: str
    count: int = 0
    examples: list[int] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    checked: bool = True
    note: str = ""

    @property
    def explanation(self) -> str:
        return RULES[self.name]

    def to_dict(self) -> dict[str, Any]:
        result = {"rule": self.name, "count": self.count, "examples": self.examples, "explanation": self.explanation,
                  "checked": self.checked}
        if self.details:
            result["details"] = self.details
        if self.note:
            result["note"] = self.note
        return result


@dataclass
class DataReport:
    """What `check_data` found in one dataset. rows_ok counts rows that pass every rule (what --fix writes)."""

    source: str
    kind: str
    num_negatives: int
    is_conversational: bool
    rows_read: int
    rows_ok: int
    rules: list[RuleResult]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "num_negatives": self.num_negatives,
                "form": "conversational" if self.is_conversational else "text", "rows_read": self.rows_read,
                "rows_ok": self.rows_ok, "rows_with_problems": self.rows_read - self.rows_ok,
                "rules": [rule.to_dict() for rule in self.rules]}

    def format_table(self) -> str:
        """Plain text: a header line, then per rule its count and explanation, its example rows and reader reasons."""
        form = "conversational" if self.is_conversational else "text"
        negatives = f", {self.num_negatives} rejected per prompt" if self.kind == "paired" else ""
        lines = [f"{self.source}: {self.kind} ({form}{negatives}); {self.rows_read} rows read, {self.rows_ok} ok, "
                 f"{self.rows_read - self.rows_ok} with problems",
                 f"  {'rule':<16} {'rows':>7}  explanation"]
        for rule in self.rules:
            if not rule.checked:
                lines.append(f"  {rule.name:<16} {'-':>7}  not checked: {rule.note}")
                continue
            lines.append(f"  {rule.name:<16} {rule.count:>7}  {rule.explanation}")
            if rule.examples:
                more = ", ..." if rule.count > len(rule.examples) else ""
                lines.append(f"  {'':<16} {'':>7}  rows {', '.join(map(str, rule.examples))}{more}")
            lines.extend(f"  {'':<16} {'':>7}  e.g. {detail}" for detail in rule.details[:3])
        return "\n".join(lines)


@dataclass
class CheckedData:
    """A checked dataset: the report, the rows read, and the positions (in loaded.dataset) that broke a rule."""

    report: DataReport
    loaded: LoadedData
    flagged: set[int]


# --------------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------------


def check_data(source: Any, *, dataset_dir: str | None = None, settings: CheckSettings | None = None) -> CheckedData:
    """Read `source` (anything `load_preference_data` accepts) and run every rule on it.

    Raises DataError when the source cannot be read at all (missing, not JSON, no usable row); a JSON / JSON
    Lines file with non-UTF-8 bytes is read leniently and those rows are reported under non_utf8.
    """
    settings = settings or CheckSettings()
    loaded = _load_leniently(source, dataset_dir)
    positions = find_problems(loaded, settings)
    refused = _classify_refused(loaded.skipped_rows)
    rows = loaded.dataset.with_format("arrow")["row"].to_pylist()
    results = []
    for name in RULES:
        result = _rule_result(name, [rows[i] for i in positions.get(name, [])], refused.get(name, []))
        if name == "prompt_too_long" and not _can_count_tokens(settings):
            result.checked = False
            result.note = settings.tokenizer_note if settings.tokenizer is None else "max_length is not set"
        results.append(result)
    flagged = {position for found in positions.values() for position in found}
    report = DataReport(source=loaded.source, kind=loaded.kind, num_negatives=loaded.num_negatives,
                        is_conversational=loaded.is_conversational,
                        rows_read=len(loaded.dataset) + len(loaded.skipped_rows),
                        rows_ok=len(loaded.dataset) - len(flagged), rules=results)
    return CheckedData(report=report, loaded=loaded, flagged=flagged)


def check_target(target: str, *, dataset_dir: str | None = None, min_chars: int | None = None,
                 max_similarity: float | None = None, max_length: int | None = None, tokenizer: str | None = None,
                 template: str | None = None) -> dict[str, CheckedData]:
    """Check a config YAML's `dataset` ("train") and `eval_dataset` ("eval"), or one data source ("train").

    A target ending in .yaml/.yml is a config: its dataset_dir, template, max_length and tokenizer
    (tokenizer_name_or_path, else model_name_or_path) are used unless the arguments give them; a config tokenizer
    that cannot be loaded leaves prompt_too_long unchecked (an explicit `tokenizer` that cannot be loaded is an
    error). Anything else is a source for `load_preference_data`.

    Raises:
        ConfigError: a bad config, threshold, template name or tokenizer argument.
        DataError: a source that cannot be read at all.
    """
    _check_thresholds(min_chars, max_similarity, max_length)
    sources: dict[str, str] = {"train": target}
    tokenizer_from_config = None
    if target.lower().endswith((".yaml", ".yml")):
        from preftune.config import load_config

        config = load_config(target)
        if not config.dataset:
            raise ConfigError("the config has no dataset to check", key="dataset", file=target)
        sources = {"train": config.dataset, **({"eval": config.eval_dataset} if config.eval_dataset else {})}
        dataset_dir = dataset_dir if dataset_dir is not None else config.dataset_dir
        template = template if template is not None else config.template
        max_length = max_length if max_length is not None else config.max_length
        tokenizer_from_config = config.tokenizer_name_or_path or config.model_name_or_path
    settings = CheckSettings(min_chars=DEFAULT_MIN_CHARS if min_chars is None else min_chars,
                             max_similarity=DEFAULT_MAX_SIMILARITY if max_similarity is None else max_similarity,
                             max_length=max_length)
    if template is not None:
        from preftune.data.templates import check_template_name

        settings.template = check_template_name(template)
    if max_length is not None:
        _attach_tokenizer(settings, tokenizer, tokenizer_from_config)
    return {split: check_data(source, dataset_dir=dataset_dir, settings=settings) for split, source in sources.items()}


def _check_thresholds(min_chars: int | None, max_similarity: float | None, max_length: int | None) -> None:
    if min_chars is not None and min_chars < 0:
        raise ConfigError(f"got {min_chars}; expected a number of characters >= 0", key="min_chars")
    if max_similarity is not None and not 0 <= max_similarity <= 1:
        raise ConfigError(f"got {max_similarity}; expected a similarity between 0 and 1", key="max_similarity")
    if max_length is not None and max_length < 1:
        raise ConfigError(f"got {max_length}; expected a number of tokens >= 1", key="max_length")


def _attach_tokenizer(settings: CheckSettings, explicit: str | None, from_config: str | None) -> None:
    """Load the tokenizer for prompt_too_long: an explicit one must load; the config's may fail (then noted)."""
    from preftune.models import load_tokenizer

    if explicit is not None:
        settings.tokenizer = load_tokenizer(explicit, key="tokenizer")
    elif from_config is None:
        settings.tokenizer_note = "no tokenizer given (--tokenizer, or a config with model_name_or_path)"
    else:
        try:
            settings.tokenizer = load_tokenizer(from_config, key="tokenizer_name_or_path")
        except ConfigError as error:
            settings.tokenizer_note = f"the config's tokenizer did not load ({error})"


def find_problems(loaded: LoadedData, settings: CheckSettings | None = None,
                  rules: tuple[str, ...] = tuple(RULES)) -> dict[str, list[int]]:
    """Positions (0-based, in loaded.dataset) of the rows breaking each of `rules`, for the rows that were read.

    Rules that need what is missing (prompt_too_long without tokenizer or max_length) and reader-only rules
    (non_utf8, unreadable_row) find nothing here.
    """
    settings = settings or CheckSettings()
    table = loaded.dataset.with_format("arrow")[:]
    prompts = _prompt_keys(table.column("prompt"))
    responses = _responses_per_row(table, loaded)
    needs_rows = any(name in rules for name in ("turn_order", "prompt_too_long"))
    columns = loaded.dataset[:] if needs_rows else {}
    checks = {
        "identical_pair": lambda: _identical_pairs(responses) if loaded.kind == "paired" else [],
        "empty_or_short": lambda: _short_responses(prompts, responses, settings.min_chars),
        "too_similar": lambda: _similar_pairs(responses, settings.max_similarity) if loaded.kind == "paired" else [],
        "turn_order": lambda: _turn_order_problems(columns, loaded) if loaded.is_conversational else [],
        "prompt_too_long": lambda: _long_prompts(columns, settings) if _can_count_tokens(settings) else [],
        "duplicate": lambda: _duplicates(prompts, responses,
                                         table.column("label").to_pylist() if loaded.kind == "unpaired" else None,
                                         _image_keys(table)),
    }
    return {name: checks[name]() for name in rules if name in checks}


def write_clean(checked: CheckedData, path: str | Path) -> int:
    """Write the rows that pass every rule as TRL JSON Lines (explicit prompt; text or conversational; rejected a
    list when there are several; unpaired rows as prompt/completion/label; a row's tools and chat_template_kwargs
    when it has them), atomically, and return how many were written.
    `preftune train` and `load_preference_data` read the file back."""
    columns = ("prompt", "completion", "label") if checked.loaded.kind == "unpaired" else ("prompt", "chosen",
                                                                                           "rejected")

    def output_row(row: dict) -> dict:
        extras = {name: row[name] for name in TEMPLATE_INPUT_COLUMNS if row.get(name) is not None}
        if row.get("images"):
            extras["images"] = [_image_path(entry, row) for entry in row["images"]]
        return {name: row[name] for name in columns} | extras

    kept = (output_row(row) for position, row in enumerate(checked.loaded.dataset) if position not in checked.flagged)
    return atomic.write_jsonl(path, kept)


# --------------------------------------------------------------------------------------------------------------
# Rules on rows that were read (each returns positions in loaded.dataset)
# --------------------------------------------------------------------------------------------------------------


def _image_path(entry: dict, row: dict) -> str:
    """The (absolute) path an image was read from; an image held as bytes has none to write (DataError)."""
    if entry.get("bytes") or not entry.get("path"):
        raise DataError("cannot write an image held in memory (bytes or a PIL image) to JSON Lines; save the images "
                        "as files and give their paths", row=row.get("row"), field="images")
    return entry["path"]


def _text(response: Any) -> str:
    """A response's text: the string itself, or the content of its messages, each followed by its other fields
    (tool calls, reasoning) as JSON, so two responses that differ only there are not identical."""
    if isinstance(response, str):
        return response
    return "".join(_message_text(message) for message in response)


def _message_text(message: dict) -> str:
    extra = {key: value for key, value in message.items() if key not in ("role", "content")}
    return (message.get("content") or "") + (json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else "")


def _json_values(array: pa.Array) -> list[Any] | None:
    """The decoded values of a datasets.Json column (tool-call conversations are stored so), else None."""
    if not isinstance(array.type, pa.JsonType):
        return None
    return [None if text is None else json.loads(text) for text in array.storage.to_pylist()]


def _column_texts(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """One text per row of a response column: strings as they are, one-message lists as their content (read in
    Arrow, which keeps 100k rows well under a second); other shapes through _text."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.to_pylist()
    decoded = _json_values(array)
    if decoded is not None:
        return [_text(value) for value in decoded]
    one_message_each = array.null_count == 0 and pc.all(pc.equal(array.value_lengths(), 1)).as_py()
    if pa.types.is_struct(getattr(array.type, "value_type", None)) and one_message_each:
        return array.flatten().field("content").to_pylist()
    return [_text(value) for value in array.to_pylist()]


def _prompt_keys(column: pa.ChunkedArray) -> list[str]:
    """Each prompt as one string: the text, or role + content of each message joined with separators."""
    array = column.combine_chunks()
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return array.to_pylist()
    decoded = _json_values(array)
    if decoded is not None:
        return ["\x1e".join(f"{message['role']}\x1f{_message_text(message)}" for message in prompt)
                for prompt in decoded]
    messages = array.flatten()
    parts = [f"{role}\x1f{content}" for role, content in zip(messages.field("role").to_pylist(),
                                                               messages.field("content").to_pylist())]
    offsets = array.offsets.to_pylist()
    return ["\x1e".join(parts[start:end]) for start, end in zip(offsets, offsets[1:])]


def _responses_per_row(table: pa.Table, loaded: LoadedData) -> list[list[str]]:
    """Each row's response texts: [chosen, rejected_1, ..., rejected_M] for paired rows, [completion] unpaired."""
    if loaded.kind == "unpaired":
        return [[text] for text in _column_texts(table.column("completion"))]
    chosen = _column_texts(table.column("chosen"))
    count = loaded.num_negatives
    if count == 1:
        return [[first, other] for first, other in zip(chosen, _column_texts(table.column("rejected")))]
    rejected = table.column("rejected").combine_chunks()
    decoded = _json_values(rejected)
    if decoded is not None:
        return [[first, *map(_text, responses)] for first, responses in zip(chosen, decoded)]
    flat = _column_texts(rejected.flatten())  # M responses per row, in order
    return [[first, *flat[index * count:(index + 1) * count]] for index, first in enumerate(chosen)]


def _identical_pairs(responses: list[list[str]]) -> list[int]:
    return [position for position, (chosen, *rejected) in enumerate(responses) if chosen in rejected]


def _short_responses(prompts: list[str], responses: list[list[str]], min_chars: int) -> list[int]:
    """Rows whose prompt is blank or with a response under min_chars (at least 1) characters after stripping."""
    floor = max(min_chars, 1)
    return [position for position, (prompt, texts) in enumerate(zip(prompts, responses))
            if not _visible(prompt) or any(len(text.strip()) < floor for text in texts)]


def _visible(prompt_key: str) -> bool:
    """Whether a prompt key (see _prompt_keys) holds any non-whitespace content."""
    if "\x1f" not in prompt_key:
        return bool(prompt_key.strip())
    return any(part.partition("\x1f")[2].strip() for part in prompt_key.split("\x1e"))


def _similar_pairs(responses: list[list[str]], max_similarity: float) -> list[int]:
    """Rows where chosen and some rejected response, not identical, have Indel similarity above the threshold."""
    found = []
    for position, (chosen, *rejected) in enumerate(responses):
        if chosen in rejected:
            continue
        if any(Indel.normalized_similarity(chosen, other, score_cutoff=max_similarity) > max_similarity
               for other in rejected):
            found.append(position)
    return found


def _roles_in_order(prompt: list[dict]) -> bool:
    """[system], then a user turn, each next role one that formats.PROMPT_NEXT_ROLES allows, ending on user or tool."""
    roles = [message.get("role") for message in prompt]
    start = 1 if roles[:1] == ["system"] else 0
    body = roles[start:]
    follows = all(role in PROMPT_NEXT_ROLES.get(before, ()) for before, role in zip(body, body[1:]))
    return bool(body) and body[0] == "user" and follows and body[-1] in ("user", "tool")


def _response_in_order(response: list[dict]) -> bool:
    """One assistant message, or assistant tool calls each followed by tool results, ending on an assistant."""
    roles = [message.get("role") for message in response]
    if not roles or roles[0] != "assistant" or roles[-1] != "assistant":
        return False
    for message, following in zip(response, roles[1:]):
        if message.get("role") == "assistant" and not (message.get("tool_calls") and following == "tool"):
            return False
        if message.get("role") == "tool" and following not in ("tool", "assistant"):
            return False
    return True


def _turn_order_problems(columns: dict, loaded: LoadedData) -> list[int]:
    """Prompts out of order, or responses that are neither one assistant message nor tool calls, results and an
    answer."""
    names = ["completion"] if loaded.kind == "unpaired" else ["chosen", "rejected"]
    found = []
    for position, prompt in enumerate(columns["prompt"]):
        responses = [columns[name][position] for name in names]
        if loaded.kind == "paired" and loaded.num_negatives > 1:
            responses = [responses[0], *responses[1]]
        if not (_roles_in_order(prompt) and all(_response_in_order(response) for response in responses)):
            found.append(position)
    return found


def _can_count_tokens(settings: CheckSettings) -> bool:
    return settings.tokenizer is not None and settings.max_length is not None


def _long_prompts(columns: dict, settings: CheckSettings) -> list[int]:
    """Prompts longer than max_length tokens as training would tokenize them: a conversation through the template
    training would choose (``templates.choose_template``: the named template, else the Jinja chat template with the
    generation prompt and the row's tools and chat_template_kwargs, else the named "default"); text with the
    tokenizer's special tokens (``tokenize.encode_text``)."""
    from preftune.data.templates import choose_template, encode_prompt
    from preftune.data.tokenize import encode_text, render_messages, template_inputs

    prompts = columns["prompt"]
    source_rows = columns.get("row") or list(range(len(prompts)))  # errors name the row of the file
    extras = [name for name in TEMPLATE_INPUT_COLUMNS if name in columns]  # tools, chat_template_kwargs
    rows = [{"row": row, **{name: columns[name][position] for name in extras}} for position, row in enumerate(source_rows)]
    tokenizer = settings.tokenizer
    choice = None
    if any(isinstance(prompt, list) for prompt in prompts):
        choice = choose_template(tokenizer, settings.template, settings.chat_template)
    found = []
    for position, prompt in enumerate(prompts):
        if isinstance(prompt, list) and choice.name is not None:
            length = len(encode_prompt(choice.name, tokenizer, prompt, row=source_rows[position]))
        elif isinstance(prompt, list):
            text = render_messages(tokenizer, prompt, choice.jinja, True, source_rows[position], "prompt",
                                   template_inputs(rows[position]))
            length = len(encode_text(tokenizer, text))
        else:
            length = len(encode_text(tokenizer, prompt))
        if length > settings.max_length:
            found.append(position)
    return found


def _image_keys(table: pa.Table) -> list | None:
    """One key per row for its images (each image's path, or a hash of its bytes), or None without images: rows
    with the same text and other images are not duplicates."""
    if "images" not in table.column_names:
        return None
    return [tuple(entry["path"] if not entry.get("bytes") else hashlib.sha256(entry["bytes"]).hexdigest()
                  for entry in entries or []) for entries in table.column("images").to_pylist()]


def _duplicates(prompts: list[str], responses: list[list[str]], labels: list | None,
                images: list | None = None) -> list[int]:
    """Positions of rows equal (prompt, responses in order, label, and images) to an earlier row."""
    seen: set = set()
    found = []
    none = [None] * len(prompts)
    keys = zip(prompts, map(tuple, responses), labels if labels is not None else none, images or none)
    for position, key in enumerate(keys):
        if key in seen:
            found.append(position)
        else:
            seen.add(key)
    return found


# --------------------------------------------------------------------------------------------------------------
# Rows the readers refuse
# --------------------------------------------------------------------------------------------------------------


def _classify_refused(skipped: list[tuple[int, str]]) -> dict[str, list[tuple[int, str]]]:
    """Reader-refused (row, reason) pairs sorted into rules by the reader's reason."""
    by_rule: dict[str, list[tuple[int, str]]] = {}
    for row, reason in skipped:
        rule = "non_utf8" if _NON_UTF8_REASON in reason else next(
            (name for name, patterns in _REFUSED_PATTERNS if any(p in reason for p in patterns)), "unreadable_row")
        by_rule.setdefault(rule, []).append((row, reason))
    return by_rule


def _rule_result(name: str, rows: list[int], refused: list[tuple[int, str]]) -> RuleResult:
    all_rows = sorted(rows + [row for row, _ in refused])
    return RuleResult(name=name, count=len(all_rows), examples=all_rows[:MAX_EXAMPLES],
                      details=[reason for _, reason in refused[:MAX_EXAMPLES]])


# --------------------------------------------------------------------------------------------------------------
# Reading, with non-UTF-8 rows reported instead of failing the whole file
# --------------------------------------------------------------------------------------------------------------


_LENIENT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".json.gz")


def _load_leniently(source: Any, dataset_dir: str | None) -> LoadedData:
    """load_preference_data(on_bad_row="skip"); when a local JSON / JSON Lines file fails only because it is not
    UTF-8, read it again row by row, refusing just the rows with undecodable bytes."""
    try:
        return load_preference_data(source, dataset_dir=dataset_dir, on_bad_row="skip")
    except DataError as error:
        path = _local_json_path(source, dataset_dir)
        if path is None or "UnicodeDecodeError" not in str(error):
            raise
    records, reasons = _lenient_records(path)
    loaded = canonicalize_records(records, source=str(path), on_bad_row="skip")
    loaded.skipped_rows = [(row, f"file {path}, row {row}: {reasons[row]}" if row in reasons else reason)
                           for row, reason in loaded.skipped_rows if reasons.get(row) != ""]
    return loaded


def _local_json_path(source: Any, dataset_dir: str | None) -> Path | None:
    if not isinstance(source, str) or not source.lower().endswith(_LENIENT_SUFFIXES):
        return None
    for candidate in ([Path(dataset_dir) / source] if dataset_dir else []) + [Path(source)]:
        if candidate.is_file():
            return candidate
    return None


def _lenient_records(path: Path) -> tuple[list[Any], dict[int, str]]:
    """The file's rows (a JSON list, else one per line), undecodable bytes kept as lone surrogates; rows that hold
    any, or are not JSON, become None with their reason in the dict (reason "" marks a blank line to ignore)."""
    raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    text = raw.decode("utf-8", errors="surrogateescape")
    try:
        document = json.loads(text)
        items = list(enumerate(document)) if isinstance(document, list) else None
    except json.JSONDecodeError:
        items = None
    if items is None:
        items = list(_lines_as_json(text))
    records: list[Any] = [None] * (max((row for row, _ in items), default=-1) + 1)
    reasons = {row: "" for row in range(len(records))}
    for row, item in items:
        if isinstance(item, DataError):
            reasons[row] = str(item)
        elif _has_undecodable(item):
            reasons[row] = _NON_UTF8_REASON
        else:
            records[row] = item
            del reasons[row]
    return records, reasons


def _lines_as_json(text: str) -> Iterator[tuple[int, Any]]:
    for index, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        if any(ord(char) in _UNDECODABLE for char in line):
            yield index, {"\udc80": ""}  # parsed or not, the row is reported as non-UTF-8
            continue
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as err:
            yield index, DataError(f"line {index + 1} is not valid JSON ({err.msg} at column {err.colno}); "
                                   "expected one JSON object per line")


def _has_undecodable(value: Any) -> bool:
    if isinstance(value, str):
        return any(ord(char) in _UNDECODABLE for char in value)
    if isinstance(value, dict):
        return any(_has_undecodable(key) or _has_undecodable(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(item) for item in value)
    return False
