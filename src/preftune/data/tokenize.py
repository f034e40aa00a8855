"""Tokenize preference pairs into prompt / chosen / rejected token ids.

Input: a `datasets.Dataset` in TRL's explicit-prompt form with an int "row" column, either text
(`prompt`, `chosen`, `rejected` are strings) or conversational (`prompt` is a list of {role, content} messages ending
with a user turn; `chosen` / `rejected` are lists holding the assistant message).

Output: one shared `prompt_ids` and two completions `chosen_ids` / `rejected_ids` per pair, so that
`prompt_ids + chosen_ids` is the tokenized prompt+chosen sequence (and likewise for rejected).

How the ids are made (TRL 1.16 `DPOTrainer._prepare_dataset`, with the differences listed below):

- text: completions get `tokenizer.eos_token` appended unless they already end with it (`add_eos`);
  `prompt_ids = tok(prompt)`, `full = tok(prompt + completion)`.
- conversational: `prompt_ids = tok(render(prompt, add_generation_prompt=True))`,
  `full = tok(render(prompt + completion))`; the chat template itself ends the assistant turn with its end marker
  (see `preftune.data.templates`), so no EOS is added.
- BOS: a text is tokenized with the tokenizer's special tokens (a Llama tokenizer adds BOS), except when it already
  starts with the BOS string (a template that writes `{{ bos_token }}`, or a prompt that carries it), which is then
  tokenized with `add_special_tokens=False` so the sequence never starts with two BOS. Differs from TRL, whose
  conversational path never adds special tokens (a ChatML template on a Llama tokenizer gets no BOS there) and whose
  text path doubles a BOS written into the prompt.
- Prefix rule: the prompt's length is the common prefix of `prompt_ids` with BOTH full sequences; the completions
  are what follows it. Normally that is all of `prompt_ids`; when a token merges across the prompt/completion
  boundary (GPT-2: "walk" + "ing" -> " walking") or the template renders the prompt differently, the prompt is cut
  back to the common prefix and the pair is counted in `prefix_mismatch` (same rule as TRL).
- Truncation, `max_length` = prompt + one completion, in tokens:
  - keep_start: a pair whose prompt has `>= max_length` tokens is dropped (no room); otherwise each completion's end
    is cut to fit. Same as TRL.
  - keep_end: both completions keep ALL their tokens and share ONE prompt whose start is cut by
    `len(prompt) + max(len(chosen), len(rejected)) - max_length`; when that leaves no prompt token (the longer
    completion alone fills `max_length`), the pair is dropped. Differs from TRL, which cuts each prompt+completion
    sequence separately, so there chosen and rejected can see different prompt starts.
  - `max_length=None`: nothing is cut.
- Dropped as "no room" (counted by source row id): a pair whose final prompt or either final completion is empty.
  Besides the truncation cases above this drops pairs whose prompt tokenizes to nothing (an empty prompt with a
  tokenizer that adds no BOS, or a boundary merge at its first token): the first completion token would have no
  context to be predicted from. TRL keeps those pairs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import datasets
import jinja2

from preftune.data.templates import template_names
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_start", "keep_end")
OUTPUT_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "row"]

# Bump when the tokenization logic changes, so that caches written by an older version are not reused.
_TOKENIZE_VERSION = 1

_MAPPED_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "chosen_ids": datasets.List(datasets.Value("int32")),
        "rejected_ids": datasets.List(datasets.Value("int32")),
        "prefix_mismatch": datasets.Value("bool"),
        "truncated": datasets.Value("bool"),
        "no_room": datasets.Value("bool"),
        "row": datasets.Value("int64"),
    }
)


@dataclass(frozen=True)
class TokenizeSettings:
    """How pairs are tokenized.

    Attributes:
        max_length: most tokens of prompt + one completion; None for no truncation.
        truncation_mode: "keep_start" (cut completion ends) or "keep_end" (cut the shared prompt's start).
        chat_template: resolved Jinja template for conversational data (see `templates.resolve_chat_template`);
            None uses the tokenizer's own `chat_template`.
        add_eos: append `tokenizer.eos_token` to text completions that do not end with it (text data only:
            conversational completions end with the template's end-of-turn marker).
    """

    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    chat_template: str | None = None
    add_eos: bool = True

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(
                f"unknown truncation mode {self.truncation_mode!r}; expected one of {', '.join(TRUNCATION_MODES)}",
                key="truncation_mode",
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2
        ):
            raise ConfigError(
                f"max_length must be an integer >= 2 (one prompt and one completion token) or null, "
                f"got {self.max_length!r}",
                key="max_length",
            )


@dataclass
class TokenizationStats:
    """What happened to the pairs.

    Attributes:
        rows_in: pairs read.
        rows_out: pairs kept.
        dropped_no_room: source "row" ids of the pairs dropped because the prompt leaves no room for a response
            (or a prompt/completion ended up empty), in dataset order.
        prefix_mismatch: kept pairs whose prompt was not a token prefix of prompt+completion (prompt cut back to the
            common prefix).
        truncated: kept pairs where any token was cut.
    """

    rows_in: int
    rows_out: int
    dropped_no_room: list[int]
    prefix_mismatch: int
    truncated: int


@dataclass
class TokenizedData:
    """The tokenized pairs: `dataset` has columns prompt_ids, chosen_ids, rejected_ids (list[int]) and row."""

    dataset: datasets.Dataset
    stats: TokenizationStats


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two sequences have in common."""
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with the tokenizer's special tokens unless `text` already starts with the BOS string."""
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _is_conversational(example: dict) -> bool:
    return isinstance(example.get("prompt"), list)


def _check_messages(messages, row, field: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of messages, got {type(messages).__name__}", row=row, field=field)
    for index, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"message {index} must be a {{'role': str, 'content': str}} mapping, got {message!r}",
                row=row,
                field=field,
            )


def _render(tokenizer, messages: list[dict], chat_template: str, add_generation_prompt: bool, row) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"the chat template is not valid Jinja: {error}", key="template") from None
    except jinja2.TemplateError as error:
        raise DataError(f"the chat template rejected this conversation: {error}", row=row, field="prompt") from None


def _chat_template_for(tokenizer, settings: TokenizeSettings) -> str:
    template = settings.chat_template
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        template = own if isinstance(own, str) and own else None
    if template is None:
        raise ConfigError(
            "the data is conversational but the tokenizer has no chat template; set template to one of: "
            + ", ".join(template_names()),
            key="template",
        )
    return template


def _full_sequences(example: dict, tokenizer, settings: TokenizeSettings) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, prompt+chosen ids, prompt+rejected ids) before the prefix rule and truncation."""
    row = example.get("row")
    for field in ("prompt", "chosen", "rejected"):
        if field not in example or example[field] is None:
            raise DataError("missing value", row=row, field=field)

    if _is_conversational(example):
        template = _chat_template_for(tokenizer, settings)
        for field in ("prompt", "chosen", "rejected"):
            _check_messages(example[field], row, field)
        prompt = list(example["prompt"])
        prompt_text = _render(tokenizer, prompt, template, add_generation_prompt=True, row=row)
        chosen_text = _render(tokenizer, prompt + list(example["chosen"]), template, False, row)
        rejected_text = _render(tokenizer, prompt + list(example["rejected"]), template, False, row)
        return _encode(tokenizer, prompt_text), _encode(tokenizer, chosen_text), _encode(tokenizer, rejected_text)

    for field in ("prompt", "chosen", "rejected"):
        if not isinstance(example[field], str):
            raise DataError(
                f"expected a string (text pair) like 'prompt', got {type(example[field]).__name__}",
                row=row,
                field=field,
            )
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    eos = tokenizer.eos_token
    if settings.add_eos and eos:
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    return _encode(tokenizer, prompt), _encode(tokenizer, prompt + chosen), _encode(tokenizer, prompt + rejected)


def tokenize_pair(example: dict, tokenizer, settings: TokenizeSettings) -> dict:
    """Tokenize one preference pair (text or conversational form; see the module docstring for the rules).

    Returns:
        {"prompt_ids", "chosen_ids", "rejected_ids": list[int], "prefix_mismatch", "truncated", "no_room": bool}.
        When `no_room` is True the pair must be dropped and the three id lists are empty.

    Raises:
        DataError: a field is missing or has the wrong shape (row from example["row"]), or the chat template
            rejects the conversation.
        ConfigError: conversational data without any chat template, or a template that is not valid Jinja.
    """
    prompt_ids, chosen_full, rejected_full = _full_sequences(example, tokenizer, settings)

    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    prefix_mismatch = prompt_len < len(prompt_ids)
    prompt, chosen, rejected = prompt_ids[:prompt_len], chosen_full[prompt_len:], rejected_full[prompt_len:]

    truncated = False
    max_length = settings.max_length
    if max_length is not None:
        if settings.truncation_mode == "keep_start":
            if len(prompt) >= max_length:
                prompt = []
            else:
                room = max_length - len(prompt)
                truncated = len(chosen) > room or len(rejected) > room
                chosen, rejected = chosen[:room], rejected[:room]
        else:  # keep_end: one shared prompt, cut at its start; completions kept whole
            cut = max(0, len(prompt) + max(len(chosen), len(rejected)) - max_length)
            truncated = cut > 0
            prompt = prompt[cut:]

    no_room = not prompt or not chosen or not rejected
    if no_room:
        prompt, chosen, rejected, truncated = [], [], [], False
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected,
        "prefix_mismatch": prefix_mismatch,
        "truncated": truncated,
        "no_room": no_room,
    }


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the tokenizer's output: its model/normalizer/post-processor, special tokens and
    chat template (not its file path)."""
    hasher = hashlib.sha256()
    hasher.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        hasher.update(backend.to_str().encode())
    else:
        hasher.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    details = {
        "special_tokens": {key: str(value) for key, value in tokenizer.special_tokens_map.items()},
        "added_tokens": sorted((index, str(token)) for index, token in tokenizer.added_tokens_decoder.items()),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "add_eos_token": getattr(tokenizer, "add_eos_token", None),
    }
    hasher.update(json.dumps(details, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def tokenization_fingerprint(dataset: datasets.Dataset, tokenizer, settings: TokenizeSettings) -> str:
    """sha256 (64 hex chars) of the dataset's fingerprint, the tokenizer and the settings: the cache key."""
    key = {
        "version": _TOKENIZE_VERSION,
        "dataset": dataset._fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _tokenize_row(example: dict, index: int, tokenizer, settings: TokenizeSettings) -> dict:
    output = tokenize_pair(example, tokenizer, settings)
    output["row"] = example["row"] if example.get("row") is not None else index
    return output


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    settings: TokenizeSettings,
    *,
    cache_dir: str | None = None,
    desc: str = "Tokenizing",
) -> TokenizedData:
    """Tokenize every pair of `dataset` (see the module docstring), drop the pairs without room, count what happened.

    With `cache_dir`, the tokenized table is written to `<cache_dir>/tokenized-<fingerprint>.arrow`, the fingerprint
    covering the dataset's own fingerprint, the tokenizer (vocabulary, normalizer, special tokens, chat template) and
    `settings`: rerunning on the same inputs loads that file, and any change writes a new one. A dataset without a
    "row" column gets its 0-based index as row id.

    Returns:
        TokenizedData whose dataset has only the columns prompt_ids, chosen_ids, rejected_ids, row.
    """
    missing = [column for column in ("prompt", "chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"the dataset lacks column(s) {', '.join(missing)}; expected prompt, chosen, rejected (and row)",
            field=missing[0],
        )

    fingerprint = tokenization_fingerprint(dataset, tokenizer, settings)
    map_kwargs = {}
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        map_kwargs["cache_file_name"] = os.path.join(cache_dir, f"tokenized-{fingerprint}.arrow")
        map_kwargs["load_from_cache_file"] = True

    mapped = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings},
        remove_columns=list(dataset.column_names),
        features=_MAPPED_FEATURES,
        new_fingerprint=fingerprint,
        desc=desc,
        **map_kwargs,
    )

    flags = mapped.select_columns(["no_room", "prefix_mismatch", "truncated", "row"]).to_dict()
    kept = [index for index, no_room in enumerate(flags["no_room"]) if not no_room]
    dropped = [row for row, no_room in zip(flags["row"], flags["no_room"]) if no_room]
    stats = TokenizationStats(
        rows_in=len(mapped),
        rows_out=len(kept),
        dropped_no_room=dropped,
        prefix_mismatch=sum(flags["prefix_mismatch"][index] for index in kept),
        truncated=sum(flags["truncated"][index] for index in kept),
    )

    result = mapped if not dropped else mapped.select(kept, keep_in_memory=True)
    result = result.select_columns(OUTPUT_COLUMNS)

    if stats.prefix_mismatch:
        logger.warning(
            "%d of %d pairs: the tokenized prompt is not a prefix of the tokenized prompt+completion (tokens merge "
            "across the boundary, or the chat template renders the prompt differently); their prompt was cut back "
            "to the tokens both agree on and the completion starts there.",
            stats.prefix_mismatch,
            stats.rows_out,
        )
    if dropped:
        shown = ", ".join(str(row) for row in dropped[:10]) + (", ..." if len(dropped) > 10 else "")
        logger.warning(
            "dropped %d of %d pairs with no room for a response (max_length=%s, truncation_mode=%s): rows %s",
            len(dropped),
            stats.rows_in,
            settings.max_length,
            settings.truncation_mode,
            shown,
        )
    if stats.truncated:
        logger.info(
            "truncated %d of %d kept pairs to max_length=%s", stats.truncated, stats.rows_out, settings.max_length
        )
    return TokenizedData(dataset=result, stats=stats)
