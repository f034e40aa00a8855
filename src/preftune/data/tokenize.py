"""Tokenize preference data into prompt / completion token ids.

`tokenize_dataset` turns canonical rows (`preftune.data.formats`) into one `prompt_ids` per row shared by its
completions, `chosen_ids` and `rejected_ids` (or `completion_ids` and `label` for unpaired rows), so that
`prompt_ids + chosen_ids` is the tokenized prompt + chosen sequence; rows left without room by `max_length` are
dropped and counted (`TokenizationStats`), and the result is cached under a fingerprint of data, tokenizer and
settings. `encode_text`, `render_messages` and `check_messages` are shared with sampling and the data check.

The rules (which template, BOS, the prefix rule, truncation, and where they differ from TRL and LLaMA-Factory):
docs/tokenization.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass

import datasets
import jinja2

from preftune.data.images import (
    IMAGE_FEATURE,
    as_content_parts,
    expand_image_placeholders,
    image_content_token_ids,
    image_files_signature,
    image_token_id,
    PixelLimits,
    is_processor,
    processor_image,
    text_tokenizer,
)
from preftune.data.templates import check_template_name, encode_conversation, get_chat_template
from preftune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("keep_start", "keep_end")
LLAMAFACTORY_TRUNCATION = "llamafactory"  # the rule of named templates (`TokenizeSettings.truncation_rule`)
OUTPUT_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "row"]
UNPAIRED_OUTPUT_COLUMNS = ["prompt_ids", "completion_ids", "label", "row"]

# Bump when the tokenization logic changes, so that caches written by an older version are not reused.
# 2: several rejected responses per prompt, unpaired data; the cache key names the kind and M.
# 3: named templates encoded as LLaMA-Factory encodes them; per-row tools and chat_template_kwargs; tool-call messages
# and several-message completions.
# 5: named templates truncate as LLaMA-Factory does.
# 6: rows with images (tokenized by the processor; the images column carried along).
TOKENIZE_VERSION = 6

_IDS = datasets.List(datasets.Value("int32"))
_FLAG_FEATURES = {
    "prefix_mismatch": datasets.Value("bool"),
    "truncated": datasets.Value("bool"),
    "no_room": datasets.Value("bool"),
    "row": datasets.Value("int64"),
}


@dataclass(frozen=True)
class TokenizeSettings:
    """How pairs are tokenized.

    Attributes:
        max_length: most tokens of prompt + one completion; None for no truncation.
        truncation_mode: "keep_start" (cut completion ends) or "keep_end" (cut the shared prompt's start); not used
            with a named template, which truncates as LLaMA-Factory (`truncation_rule`; "keep_end" is refused there).
        template: a named template (`preftune.data.templates`): conversational rows get LLaMA-Factory's ids
            (`templates.encode_conversation`) and LLaMA-Factory's truncation, and `chat_template` is not used.
            None: the Jinja path below.
        enable_thinking: reasoning templates only (qwen3, ...): an empty thought is trained (True, LLaMA-Factory's
            default) or put at the end of the prompt (False).
        chat_template: resolved Jinja template for conversational data; None uses the tokenizer's own
            `chat_template`. `templates.choose_template` picks `template` or `chat_template` by the rule every
            caller follows (a tokenizer without a template gets the named template "default").
        add_eos: append `tokenizer.eos_token` to text completions that do not end with it (text data only:
            conversational completions end with the template's end-of-turn marker).
    """

    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    chat_template: str | None = None
    add_eos: bool = True
    template: str | None = None
    enable_thinking: bool = True

    def __post_init__(self):
        if self.template is not None:
            check_template_name(self.template)
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(
                f"unknown truncation mode {self.truncation_mode!r}; expected one of {', '.join(TRUNCATION_MODES)}",
                key="truncation_mode",
            )
        if self.template is not None and self.truncation_mode == "keep_end":
            raise ConfigError(
                f"keep_end does not apply with template {self.template!r}: a named template's conversations are cut "
                "as LLaMA-Factory cuts them (prompt and response shortened in proportion, both keeping their start); "
                "remove truncation_mode, or use the tokenizer's chat template (no `template`) for keep_end",
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

    @property
    def truncation_rule(self) -> str:
        """The rule applied: "llamafactory" with a named template, else `truncation_mode`."""
        return LLAMAFACTORY_TRUNCATION if self.template is not None else self.truncation_mode


@dataclass
class TokenizationStats:
    """What happened to the pairs (for unpaired data: to the prompt/completion rows).

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
    """The tokenized data.

    Attributes:
        dataset: paired: columns prompt_ids, chosen_ids (list[int]), rejected_ids (list[int]; list[list[int]] of
            num_negatives lists when num_negatives >= 2) and row. Unpaired: prompt_ids, completion_ids (list[int]),
            label (bool) and row.
        stats: what happened to the rows.
        kind: "paired" or "unpaired".
        num_negatives: rejected responses per prompt (M); 1 for classic pairs and for unpaired data.
        fingerprint: ``tokenization_fingerprint`` of the input (its content, the tokenizer and the settings): what
            identifies this data in a run's fingerprint ("" when unknown).
    """

    dataset: datasets.Dataset
    stats: TokenizationStats
    kind: str = "paired"
    num_negatives: int = 1
    fingerprint: str = ""


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two sequences have in common."""
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, with the tokenizer's special tokens unless `text` already starts with the BOS string."""
    bos = tokenizer.bos_token
    add_special_tokens = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _is_conversational(example: dict) -> bool:
    return isinstance(example.get("prompt"), list)


def check_messages(messages, row, field: str) -> None:
    """DataError naming ``row`` and ``field`` unless ``messages`` is a non-empty list of ``{"role": str, "content":
    str}`` mappings (content may be missing beside ``tool_calls``)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of messages, got {type(messages).__name__}", row=row, field=field)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not (
            isinstance(message.get("content"), str) or (message.get("content") is None and message.get("tool_calls"))
        ):
            raise DataError(
                f"message {index} must be a {{'role': str, 'content': str}} mapping (content may be missing beside "
                f"tool_calls), got {message!r:.200}",
                row=row,
                field=field,
            )


def template_inputs(example: dict) -> dict:
    """Keyword arguments for apply_chat_template from the row's tools and chat_template_kwargs (TRL 1.16's merge:
    `{"tools": tools, **chat_template_kwargs}`; a JSON string of tools is decoded first)."""
    row = example.get("row")
    tools = example.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"is not valid JSON ({error.msg}); expected a list of function schemas", row=row,
                            field="tools") from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"expected a list of function schemas, got {type(tools).__name__}", row=row, field="tools")
    kwargs = example.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DataError(f"expected an object of template variables, got {type(kwargs).__name__}", row=row,
                        field="chat_template_kwargs")
    return {"tools": tools, **kwargs}


def render_messages(
    tokenizer, messages: list[dict], chat_template: str, add_generation_prompt: bool, row, field: str = "prompt",
    template_inputs: dict | None = None,
) -> str:
    """``messages`` rendered as text by the Jinja ``chat_template`` (``apply_chat_template``, not tokenized), with
    ``template_inputs`` as extra variables. A template that is not valid Jinja is a ConfigError (key ``template``);
    one that fails on this conversation is a DataError naming ``row`` and ``field``."""
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **(template_inputs or {}),
        )
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"the chat template is not valid Jinja: {error}", key="template") from None
    except jinja2.TemplateError as error:
        raise DataError(f"the chat template rejected this conversation: {error}", row=row, field=field) from None
    except TypeError as error:  # Jinja's `'text' + none` (a template that expects content), or a clashing kwarg
        raise DataError(f"the chat template could not render this conversation (TypeError: {error})", row=row,
                        field=field) from None


def _chat_template_for(tokenizer, settings: TokenizeSettings) -> str:
    """The Jinja of the Jinja path: the settings' own, else the tokenizer's. Settings built by
    ``templates.choose_template`` (as ``prepare_data`` builds them) always have one; ConfigError otherwise."""
    template = settings.chat_template
    if template is None:
        own = getattr(tokenizer, "chat_template", None)
        template = own if isinstance(own, str) and own else None
    if template is None:
        raise ConfigError(
            "the data is conversational but the tokenizer has no chat template; set template to a template name "
            "(LLaMA-Factory's, e.g. qwen, llama3, chatml)",
            key="template",
        )
    return template


def _full_sequences(
    example: dict, completions: list[tuple[str, object]], tokenizer, settings: TokenizeSettings
) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, [prompt+completion ids for each completion]) before the prefix rule and truncation.

    `completions` are (field name for errors, completion) pairs: strings for a text prompt, one-message lists for a
    conversational one.
    """
    row = example.get("row")
    prompt = example.get("prompt")
    for field, value in [("prompt", prompt), *completions]:
        if value is None:
            raise DataError("missing value", row=row, field=field)

    processor = tokenizer if is_processor(tokenizer) else None
    tokenizer = text_tokenizer(tokenizer)
    if example.get("images"):
        return _image_sequences(example, completions, processor, settings)
    if _is_conversational(example) and settings.template is not None:
        return _named_template_sequences(prompt, completions, tokenizer, settings, row)
    if _is_conversational(example):
        template = _chat_template_for(tokenizer, settings)
        for field, value in [("prompt", prompt), *completions]:
            check_messages(value, row, field)
        prompt = list(prompt)
        inputs = template_inputs(example)
        prompt_text = render_messages(tokenizer, prompt, template, True, row, "prompt", inputs)
        full_texts = [render_messages(tokenizer, prompt + list(value), template, False, row, field, inputs)
                      for field, value in completions]
        return encode_text(tokenizer, prompt_text), [encode_text(tokenizer, text) for text in full_texts]

    for field, value in [("prompt", prompt), *completions]:
        if not isinstance(value, str):
            raise DataError(
                f"expected a string (text pair) like 'prompt', got {type(value).__name__}", row=row, field=field
            )
    eos = tokenizer.eos_token
    if settings.add_eos and eos:
        completions = [(field, value if value.endswith(eos) else value + eos) for field, value in completions]
    return encode_text(tokenizer, prompt), [encode_text(tokenizer, prompt + value) for _, value in completions]


def _image_sequences(
    example: dict, completions: list[tuple[str, object]], processor, settings: TokenizeSettings
) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, full ids per completion) of a row with images: its messages (``<image>`` placeholders as image
    parts) rendered by the processor's chat template and tokenized by the processor, which expands each image into
    its image tokens (their number depends on the image's size, the pixel limits set on the processor
    (``PixelLimits``, applied first) and the image processor's own)."""
    row = example.get("row")
    if processor is None:
        raise ConfigError("the data has images but processing_class is a tokenizer; give the model's processor "
                          "(transformers.AutoProcessor), or a model folder that has a processor config",
                          key="processing_class")
    prompt = example["prompt"]
    for field, value in [("prompt", prompt), *completions]:
        check_messages(value, row, field)
    limits = PixelLimits.of(processor)
    images = [processor_image(entry, limits) for entry in example["images"]]
    if settings.template is not None:  # LLaMA-Factory's way: <image> expanded into image tokens, then the template
        template = get_chat_template(settings.template)
        expanded = expand_image_placeholders(list(prompt), images, processor, template.name, template.multimodal)
        return _named_template_sequences(expanded, completions, processor.tokenizer, settings, row)
    template = settings.chat_template or _chat_template_for(processor, settings)
    inputs = template_inputs(example)
    prompt_text = render_messages(processor, as_content_parts(prompt), template, True, row, "prompt", inputs)
    full_texts = [render_messages(processor, as_content_parts(list(prompt) + list(value)), template, False, row,
                                  field, inputs) for field, value in completions]
    bos = processor.tokenizer.bos_token

    def encode(text: str) -> list[int]:
        add_special_tokens = not (bos and text.startswith(bos))
        return list(processor(text=[text], images=images, add_special_tokens=add_special_tokens)["input_ids"][0])

    return encode(prompt_text), [encode(text) for text in full_texts]


def _keeps_whole_images(prompt_ids: list[int], kept_prompt: list[int], completions: list[list[int]],
                        image_tokens: set[int]) -> bool:
    """Whether truncation kept every image token of the prompt (``image_tokens``: the placeholder and the content
    tokens; an image whose tokens are cut no longer matches its pixel values) and put none in a completion."""
    return all(kept_prompt.count(token) == prompt_ids.count(token) for token in image_tokens) and not any(
        token in image_tokens for completion in completions for token in completion)


def _named_template_sequences(
    prompt: list, completions: list[tuple[str, object]], tokenizer, settings: TokenizeSettings, row
) -> tuple[list[int], list[list[int]]]:
    """(prompt_ids, full ids per completion) through the named template: the prompt encoded with the first
    completion, shared by all, as LLaMA-Factory's pairwise processor shares the chosen prompt with the rejected."""
    for field, value in [("prompt", prompt), *completions]:
        check_messages(value, row, field)
    encoded = [encode_conversation(settings.template, tokenizer, list(prompt), list(value),
                                   enable_thinking=settings.enable_thinking, row=row) for _, value in completions]
    prompt_ids = encoded[0][0]
    return prompt_ids, [prompt_ids + response_ids for _, response_ids in encoded]


def llamafactory_kept_lengths(prompt_length: int, response_length: int, cutoff_len: int) -> tuple[int, int]:
    """(prompt tokens kept, response tokens kept) under LLaMA-Factory 0.9.5's cutoff rule (`infer_seqlen` in
    data/processor/processor_utils.py), which its pairwise processor applies to the prompt and the longer response
    and its feedback processor to the prompt and the response. Both keep their start.

    The response is favoured: one shorter than half of `cutoff_len` is kept whole; else a prompt shorter than half
    is kept whole and the response gets the rest; else the response gets `int(cutoff_len * (r / (p + r)))` tokens
    (in floating point, in that order, as LLaMA-Factory computes it: the rounding decides exact agreement). The
    prompt keeps what the response leaves, at most its own length. A prompt + response that fits is not cut.
    """
    if 2 * response_length < cutoff_len:
        kept_response = response_length
    elif 2 * prompt_length < cutoff_len:
        kept_response = min(response_length, cutoff_len - prompt_length)
    else:
        share = response_length / (prompt_length + response_length)
        kept_response = min(response_length, int(cutoff_len * share))
    kept_prompt = min(prompt_length, max(0, cutoff_len - kept_response))
    return kept_prompt, kept_response


def _split_and_truncate(
    prompt_ids: list[int], full_ids: list[list[int]], settings: TokenizeSettings
) -> tuple[list[int], list[list[int]], dict]:
    """Apply the prefix rule and truncation to one prompt shared by several completions (docs/tokenization.md).

    Returns (prompt, completions, flags) with flags {"prefix_mismatch", "truncated", "no_room"}; when no_room the
    prompt and every completion are empty.
    """
    prompt_len = min(common_prefix_length(prompt_ids, full) for full in full_ids)
    prefix_mismatch = prompt_len < len(prompt_ids)
    prompt, completions = prompt_ids[:prompt_len], [full[prompt_len:] for full in full_ids]

    truncated = False
    max_length = settings.max_length
    if max_length is not None:
        if settings.truncation_rule == LLAMAFACTORY_TRUNCATION:
            longest = max(map(len, completions))
            kept_prompt, kept_completion = llamafactory_kept_lengths(len(prompt), longest, max_length)
            truncated = kept_prompt < len(prompt) or kept_completion < longest
            prompt, completions = prompt[:kept_prompt], [completion[:kept_completion] for completion in completions]
        elif settings.truncation_rule == "keep_start":
            if len(prompt) >= max_length:
                prompt = []
            else:
                room = max_length - len(prompt)
                truncated = any(len(completion) > room for completion in completions)
                completions = [completion[:room] for completion in completions]
        else:  # keep_end: one shared prompt, cut at its start; completions kept whole
            cut = max(0, len(prompt) + max(map(len, completions)) - max_length)
            truncated = cut > 0
            prompt = prompt[cut:]

    no_room = not prompt or not all(completions)
    if no_room:
        prompt, completions, truncated = [], [[] for _ in completions], False
    return prompt, completions, {"prefix_mismatch": prefix_mismatch, "truncated": truncated, "no_room": no_room}


def rejected_responses(example: dict) -> list:
    """The rejected responses of a canonical example as a list: a list of strings or of message lists holds
    several; a string or a message list (a list of message dicts) is one.

    Raises:
        DataError: rejected is missing or an empty list.
    """
    rejected = example.get("rejected")
    row = example.get("row")
    if rejected is None:
        raise DataError("missing value", row=row, field="rejected")
    if isinstance(rejected, list):
        if not rejected:
            raise DataError("is an empty list; expected at least one rejected response", row=row, field="rejected")
        if not any(isinstance(item, dict) for item in rejected):
            return list(rejected)
    return [rejected]


def tokenize_pair(example: dict, tokenizer, settings: TokenizeSettings) -> dict:
    """Tokenize one preference row (text or conversational form; the rules: docs/tokenization.md).

    `example["rejected"]` is one response, or a list of M responses (see `rejected_responses`); the prompt is shared
    by chosen and every rejected response.

    Returns:
        {"prompt_ids", "chosen_ids": list[int], "rejected_ids": list[int] for one response (a list of one counts as
        one), list[list[int]] (M lists) for M >= 2, "prefix_mismatch", "truncated", "no_room": bool}.
        When `no_room` is True the row must be dropped and every id list is empty.

    Raises:
        DataError: a field is missing or has the wrong shape (row from example["row"]), or the chat template
            rejects the conversation.
        ConfigError: conversational data without any chat template, or a template that is not valid Jinja.
    """
    rejected = rejected_responses(example)
    completions = [("chosen", example.get("chosen"))] + [("rejected", response) for response in rejected]
    prompt_ids, full_ids = _full_sequences(example, completions, tokenizer, settings)
    prompt, kept, flags = _split_and_truncate(prompt_ids, full_ids, settings)
    image_tokens = {image_token_id(tokenizer), *image_content_token_ids(tokenizer)} if example.get("images") else set()
    if image_tokens and not flags["no_room"] and not _keeps_whole_images(
            prompt_ids, prompt, kept, image_tokens):  # a pair that cannot keep its images whole is dropped
        prompt, kept, flags = [], [[] for _ in kept], {**flags, "no_room": True, "truncated": False}
    chosen, *rejected_ids = kept
    return {
        "prompt_ids": prompt,
        "chosen_ids": chosen,
        "rejected_ids": rejected_ids if len(rejected_ids) > 1 else rejected_ids[0],
        **flags,
    }


def tokenize_unpaired(example: dict, tokenizer, settings: TokenizeSettings) -> dict:
    """Tokenize one unpaired row {"prompt", "completion", "label": bool} (same rules as a pair, one completion).

    Returns:
        {"prompt_ids", "completion_ids": list[int], "label": bool, "prefix_mismatch", "truncated", "no_room": bool};
        when `no_room` is True the row must be dropped and both id lists are empty.

    Raises:
        DataError: a field is missing or has the wrong shape, or the label is not a bool.
        ConfigError: as for `tokenize_pair`.
    """
    label = example.get("label")
    if not isinstance(label, bool):
        raise DataError(f"expected a bool label, got {label!r:.40}", row=example.get("row"), field="label")
    prompt_ids, full_ids = _full_sequences(example, [("completion", example.get("completion"))], tokenizer, settings)
    prompt, (completion,), flags = _split_and_truncate(prompt_ids, full_ids, settings)
    return {"prompt_ids": prompt, "completion_ids": completion, "label": label, **flags}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the tokenizer's output: its model/normalizer/post-processor, special tokens and
    chat template (not its file path)."""
    hasher = hashlib.sha256()
    if is_processor(tokenizer):  # a processor: its tokenizer, its image processor's settings and its chat template
        hasher.update(type(tokenizer).__name__.encode())
        image_processor = getattr(tokenizer, "image_processor", None)
        hasher.update((image_processor.to_json_string() if image_processor is not None else "").encode())
        hasher.update(str(PixelLimits.of(tokenizer)).encode())
        hasher.update(str(getattr(tokenizer, "chat_template", None)).encode())
        tokenizer = tokenizer.tokenizer
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


def data_kind(dataset: datasets.Dataset) -> tuple[str, int]:
    """(kind, M) of a canonical dataset: "unpaired" when it has completion and label columns and no chosen,
    else "paired" with M = the number of rejected responses in its first row (1 when empty).

    Raises:
        DataError: a column the kind needs is missing (field = the first missing column).
    """
    columns = dataset.column_names
    kind = "unpaired" if {"completion", "label"} <= set(columns) and "chosen" not in columns else "paired"
    needed = ("prompt", "completion", "label") if kind == "unpaired" else ("prompt", "chosen", "rejected")
    missing = [column for column in needed if column not in columns]
    if missing:
        raise DataError(
            f"the dataset lacks column(s) {', '.join(missing)}; expected prompt, chosen, rejected (and row), or "
            "prompt, completion, label (and row) for unpaired data",
            field=missing[0],
        )
    if kind == "unpaired" or len(dataset) == 0:
        return kind, 1
    return kind, len(rejected_responses(dataset[0]))


def tokenization_fingerprint(dataset: datasets.Dataset, tokenizer, settings: TokenizeSettings) -> str:
    """sha256 (64 hex chars) of the dataset's fingerprint, its kind and M, the tokenizer and the settings: the
    cache key."""
    kind, num_negatives = data_kind(dataset)
    key = {
        "version": TOKENIZE_VERSION,
        "dataset": dataset._fingerprint,
        "kind": kind,
        "num_negatives": num_negatives,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": asdict(settings),
        "template": repr(get_chat_template(settings.template)) if settings.template is not None else None,
    }
    if "images" in dataset.column_names:  # image files read by path: their size and time, as the table has no pixels
        key["image_files"] = image_files_signature(dataset.with_format("arrow")["images"].to_pylist())
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _mapped_features(kind: str, num_negatives: int, with_images: bool = False) -> datasets.Features:
    if kind == "unpaired":
        columns = {"prompt_ids": _IDS, "completion_ids": _IDS, "label": datasets.Value("bool")}
    else:
        rejected = datasets.List(_IDS) if num_negatives > 1 else _IDS
        columns = {"prompt_ids": _IDS, "chosen_ids": _IDS, "rejected_ids": rejected}
    images = {"images": IMAGE_FEATURE} if with_images else {}
    return datasets.Features({**columns, **_FLAG_FEATURES, **images})


def _tokenize_row(
    example: dict, index: int, tokenizer, settings: TokenizeSettings, kind: str, num_negatives: int
) -> dict:
    row = example["row"] if example.get("row") is not None else index
    if kind == "unpaired":
        output = tokenize_unpaired(example, tokenizer, settings)
    else:
        count = len(rejected_responses(example))
        if count != num_negatives:
            raise DataError(
                f"has {count} rejected responses but the first row has {num_negatives}; expected the same number "
                "in every row",
                row=row,
                field="rejected",
            )
        output = tokenize_pair(example, tokenizer, settings)
    output["row"] = row
    if "images" in example:
        output["images"] = example["images"] or []
    return output


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    settings: TokenizeSettings,
    *,
    cache_dir: str | None = None,
    desc: str = "Tokenizing",
) -> TokenizedData:
    """Tokenize every row of `dataset` (docs/tokenization.md), drop the rows without room, count what happened.

    The kind comes from the columns and M from the first row (`data_kind`); every row must have that M.

    With `cache_dir`, the tokenized table is written to `<cache_dir>/tokenized-<fingerprint>.arrow`, the fingerprint
    covering the dataset's own fingerprint, its kind and M, the tokenizer (vocabulary, normalizer, special tokens,
    chat template) and `settings`: rerunning on the same inputs loads that file, and any change writes a new one. A
    dataset without a "row" column gets its 0-based index as row id.

    Returns:
        TokenizedData whose dataset has only the columns OUTPUT_COLUMNS (paired; rejected_ids holds M lists when
        M >= 2) or UNPAIRED_OUTPUT_COLUMNS (unpaired), with kind and num_negatives set.

    Raises:
        DataError: a missing column, a bad row, or a row whose number of rejected responses differs from the first.
    """
    kind, num_negatives = data_kind(dataset)
    fingerprint = tokenization_fingerprint(dataset, tokenizer, settings)
    with_images = "images" in dataset.column_names
    if with_images and not isinstance(dataset.features["images"], datasets.List):
        raise DataError("the images column is not a list of images", field="images")
    if with_images and kind == "unpaired":
        raise DataError("not supported yet: unpaired (KTO) rows with images; give pairs (prompt, chosen, rejected)",
                        field="images")
    map_kwargs = {}
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        map_kwargs["cache_file_name"] = os.path.join(cache_dir, f"tokenized-{fingerprint}.arrow")
        map_kwargs["load_from_cache_file"] = True

    mapped = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "settings": settings, "kind": kind, "num_negatives": num_negatives},
        remove_columns=list(dataset.column_names),
        features=_mapped_features(kind, num_negatives, with_images),
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
    columns = UNPAIRED_OUTPUT_COLUMNS if kind == "unpaired" else OUTPUT_COLUMNS
    result = result.select_columns(columns + (["images"] if with_images else []))
    _log_stats(stats, settings, "rows" if kind == "unpaired" else "pairs")
    return TokenizedData(dataset=result, stats=stats, kind=kind, num_negatives=num_negatives, fingerprint=fingerprint)


def _log_stats(stats: TokenizationStats, settings: TokenizeSettings, unit: str) -> None:
    if stats.prefix_mismatch:
        logger.warning(
            "%d of %d %s: the tokenized prompt is not a prefix of the tokenized prompt+completion (tokens merge "
            "across the boundary, or the chat template renders the prompt differently); their prompt was cut back "
            "to the tokens both agree on and the completion starts there.",
            stats.prefix_mismatch,
            stats.rows_out,
            unit,
        )
    if stats.dropped_no_room:
        dropped = stats.dropped_no_room
        shown = ", ".join(str(row) for row in dropped[:10]) + (", ..." if len(dropped) > 10 else "")
        logger.warning(
            "dropped %d of %d %s with no room for a response (max_length=%s, truncation=%s): rows %s",
            len(dropped),
            stats.rows_in,
            unit,
            settings.max_length,
            settings.truncation_rule,
            shown,
        )
    if stats.truncated:
        logger.info(
            "truncated %d of %d kept %s to max_length=%s", stats.truncated, stats.rows_out, unit, settings.max_length
        )
