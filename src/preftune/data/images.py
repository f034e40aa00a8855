"""Images in preference rows: reading them, where they sit in the prompt, and their model inputs in a batch.

A canonical row with images (``preftune.data.formats``) has an ``images`` column: a list of ``{"bytes", "path"}``
entries (``datasets.Image(decode=False)``'s storage: a path on disk, or the encoded file's bytes), and its prompt
marks where each image goes with the placeholder ``<image>`` in a message's text (LLaMA-Factory's convention; TRL's
``{"type": "image"}`` content parts are read into it). Tokenization (``preftune.data.tokenize``) turns the
placeholders back into content parts for the processor's chat template, which expands each image into its image
tokens. Collation (``ImageInputs``) gives the forward the pixel values of every row's images, in row order. A
processor loaded with LLaMA-Factory's ``image_max_pixels``/``image_min_pixels`` gets each image resized within
them first, for its image tokens and its pixel values alike (``PixelLimits``).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import torch

from preftune.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
IMAGE_COLUMNS = ("images", "image")
IMAGE_FEATURE = datasets.List(datasets.Image(decode=False))


def is_processor(processing_class: Any) -> bool:
    """Whether ``processing_class`` is a transformers processor (``ProcessorMixin``: a tokenizer and an image
    processor), rather than a tokenizer alone."""
    from transformers import ProcessorMixin

    return isinstance(processing_class, ProcessorMixin)


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer of a processor, or ``processing_class`` itself when it is a tokenizer."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def image_token_id(processor: Any) -> int:
    """The id of the token each image is expanded into (``<|image_pad|>`` for Qwen-VL, ``<image>`` for LLaVA; for
    Gemma 3 the ``<start_of_image>`` placeholder that opens the expansion: ``image_content_token_ids``)."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def image_content_token_ids(processor: Any) -> tuple[int, ...]:
    """The ids of the tokens that stand for an image's content, which the model replaces with the image's features
    (the processor's ``image_token_ids``: Qwen-VL's ``<|image_pad|>``, LLaVA's ``<image>``, Gemma 3's
    ``<image_soft_token>``, not its ``<start_of_image>``)."""
    ids = [token_id for token_id in (getattr(processor, "image_token_ids", None) or []) if token_id is not None]
    return tuple(int(token_id) for token_id in ids) or (image_token_id(processor),)


# ------------------------------------------------------------------------------------------------ reading images


def row_images(record: dict, column: str | None, base_dir: str | None) -> list[dict]:
    """The images of a raw row as ``{"bytes", "path"}`` entries, each opened once with PIL to check it.

    ``column`` names the row's images column (None: ``images``, else ``image``). A value is a list of images or
    one image; an image is a path (relative ones resolve against ``base_dir``, else the working directory), the
    file's bytes, a ``{"bytes", "path"}`` mapping (a ``datasets`` Image column read undecoded) or a PIL image (a
    decoded Image column; stored as PNG bytes). Empty values (None, "", []) mean no image.

    Raises:
        DataError: an image that is missing, unreadable or of another type (field: the column; the caller adds the
            file and row).
    """
    names = [column] if column else list(IMAGE_COLUMNS)
    for name in names:
        value = record.get(name)
        items = value if isinstance(value, (list, tuple)) else [value]
        items = [item for item in items if not _is_empty(item)]
        if items:
            return [_image_entry(item, name, index, base_dir) for index, item in enumerate(items)]
    return []


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, bytes, dict, list, tuple)) and not value) or (
        isinstance(value, dict) and not value.get("bytes") and not value.get("path"))


def _image_entry(item: Any, field: str, index: int, base_dir: str | None) -> dict:
    from PIL import Image

    where = f"image {index}"
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        entry = {"bytes": buffer.getvalue(), "path": None}
    elif isinstance(item, (bytes, bytearray)):
        entry = {"bytes": bytes(item), "path": None}
    elif isinstance(item, dict) and (item.get("bytes") or item.get("path")):
        entry = {"bytes": item.get("bytes") or None, "path": item.get("path") or None}
        if entry["bytes"] is None:
            entry["path"] = _resolved(entry["path"], base_dir)
    elif isinstance(item, str):
        entry = {"bytes": None, "path": _resolved(item, base_dir)}
    else:
        raise DataError(f"{where} is {type(item).__name__}; expected a file path, the file's bytes or a PIL image",
                        field=field)
    if entry["bytes"] is None and not os.path.isfile(entry["path"]):
        raise DataError(f"{where}: file not found: {entry['path']}", field=field)
    try:
        load_image(entry)
    except Exception as error:  # noqa: BLE001 - PIL raises several types for a file that is not an image
        raise DataError(f"{where} ({entry['path'] or 'bytes'}) cannot be read as an image ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''})", field=field) from None
    return entry


def _resolved(path: str, base_dir: str | None) -> str:
    candidate = Path(os.path.expanduser(path))
    if not candidate.is_absolute() and base_dir:
        candidate = Path(base_dir) / candidate
    return str(candidate.absolute())


def load_image(entry: dict) -> Any:
    """The PIL image (RGB) of a ``{"bytes", "path"}`` entry."""
    from PIL import Image

    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"]
    with Image.open(source) as image:
        return image.convert("RGB")


# ------------------------------------------------------------------------- pixel limits (LLaMA-Factory's keys)

# LLaMA-Factory's Qwen-VL plugins also widen a side shorter than this, and cut an aspect ratio over MAX_ASPECT to
# CAPPED_ASPECT (the Qwen-VL image processor refuses images beyond MAX_ASPECT).
QWEN_VL_MIN_SIDE, MAX_ASPECT, CAPPED_ASPECT = 28, 200, 180
DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS = 768 * 768, 32 * 32  # LLaMA-Factory's image_max_pixels, image_min_pixels


@dataclass(frozen=True)
class PixelLimits:
    """LLaMA-Factory's ``image_max_pixels`` / ``image_min_pixels`` as it applies them: each image is resized (PIL,
    aspect kept, sides rounded down) to at most ``max_pixels`` and at least ``min_pixels`` pixels BEFORE the image
    processor, which then applies its own limits too (the model's preprocessor config is left as it is). For a
    Qwen-VL image processor (``qwen_vl``), a side shorter than QWEN_VL_MIN_SIDE is widened to it and an aspect ratio
    over MAX_ASPECT cut to CAPPED_ASPECT, as LLaMA-Factory's Qwen-VL plugins do.

    ``preftune.models.load_processor`` sets them on the processor it loads (attributes ``image_max_pixels`` and
    ``image_min_pixels``, LLaMA-Factory's names); a processor without them gets its images unchanged."""

    max_pixels: int
    min_pixels: int
    qwen_vl: bool = False

    @classmethod
    def of(cls, processor: Any) -> "PixelLimits | None":
        """The limits set on ``processor`` (one not set: LLaMA-Factory's default); None when it has neither (or is
        a tokenizer)."""
        max_pixels = getattr(processor, "image_max_pixels", None)
        min_pixels = getattr(processor, "image_min_pixels", None)
        if max_pixels is None and min_pixels is None:
            return None
        qwen_vl = hasattr(getattr(processor, "image_processor", None), "merge_size")
        return cls(int(DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels),
                   int(DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels), qwen_vl)

    def fit(self, image: Any) -> Any:
        """``image`` (PIL, any mode) resized within the limits, then as RGB."""
        if image.width * image.height > self.max_pixels:
            image = _scaled_to(image, self.max_pixels)
        if image.width * image.height < self.min_pixels:
            image = _scaled_to(image, self.min_pixels)
        image = image.convert("RGB") if image.mode != "RGB" else image
        if self.qwen_vl:
            if min(image.width, image.height) < QWEN_VL_MIN_SIDE:
                image = image.resize((max(image.width, QWEN_VL_MIN_SIDE), max(image.height, QWEN_VL_MIN_SIDE)))
            if image.width / image.height > MAX_ASPECT:
                image = image.resize((image.height * CAPPED_ASPECT, image.height))
            if image.height / image.width > MAX_ASPECT:
                image = image.resize((image.width, image.width * CAPPED_ASPECT))
        return image


def _scaled_to(image: Any, pixels: int) -> Any:
    """``image`` scaled (aspect kept, each side rounded down) to about ``pixels`` pixels."""
    scale = math.sqrt(pixels / (image.width * image.height))
    return image.resize((int(image.width * scale), int(image.height * scale)))


def processor_image(entry: dict, limits: PixelLimits | None) -> Any:
    """The PIL image (RGB) of a ``{"bytes", "path"}`` entry as the image processor gets it: within ``limits``
    (``PixelLimits.of(processor)``) when there are any, else as stored."""
    if limits is None:
        return load_image(entry)
    from PIL import Image

    image = Image.open(io.BytesIO(entry["bytes"]) if entry.get("bytes") else entry["path"])
    image.load()  # reads the pixels and closes the file
    return limits.fit(image)


def image_files_signature(entries_per_row: Sequence[Sequence[dict] | None]) -> str:
    """sha256 of the path, size and modification time of every image stored by path (images stored as bytes are in
    the data already), so that a cache keyed by the data sees an image file replaced under the same name."""
    hasher = hashlib.sha256()
    for entries in entries_per_row:
        for entry in entries or []:
            path = entry.get("path") if not entry.get("bytes") else None
            if path:
                stat = os.stat(path) if os.path.exists(path) else None
                hasher.update(f"{path}|{stat and stat.st_size}|{stat and stat.st_mtime_ns}\n".encode())
    return hasher.hexdigest()


def image_content_fingerprint(entries_per_row: Sequence[Sequence[dict] | None]) -> str:
    """sha256 of the content of every row's images (the stored bytes, or the file read from its path), row by row,
    so that a cache keyed by it never serves values computed from other images, whatever the file names."""
    hasher = hashlib.sha256()
    for entries in entries_per_row:
        for entry in entries or []:
            if entry.get("bytes"):
                content = entry["bytes"]
            else:
                with open(entry["path"], "rb") as handle:
                    content = handle.read()
            hasher.update(f"{len(content)}:".encode())
            hasher.update(hashlib.sha256(content).digest())
        hasher.update(b"|")  # row boundary: [a, b] | [] differs from [a] | [b]
    return hasher.hexdigest()


# ------------------------------------------------------------------------------------- placeholders and parts


def content_as_text(content: Any) -> Any:
    """Message content as text: TRL's content parts joined, each ``{"type": "image"}`` part as ``<image>``; other
    content unchanged."""
    if not isinstance(content, list):
        return content
    pieces = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            return content  # not content parts: left for the message checks to name
    return "".join(pieces)


def messages_as_text(value: Any) -> Any:
    """A message list with every content-part list as text (``content_as_text``); other values unchanged."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return [{**m, "content": content_as_text(m["content"])} if "content" in m else m for m in value]
    if isinstance(value, list):  # several rejected responses: a list of message lists
        return [messages_as_text(item) for item in value]
    return value


def count_placeholders(messages: list[dict]) -> int:
    return sum(m.get("content", "").count(IMAGE_PLACEHOLDER) for m in messages if isinstance(m.get("content"), str))


def placed_in_prompt(prompt: list[dict], num_images: int) -> list[dict]:
    """The prompt with its ``num_images`` images placed: as marked by ``<image>`` placeholders, or, when it has
    none, all before the first user message's text (TRL's rule, ``prepare_multimodal_messages``).

    Raises:
        DataError: the prompt marks another number of images than the row has (field ``images``).
    """
    marked = count_placeholders(prompt)
    if marked == 0:
        first_user = next(i for i, m in enumerate(prompt) if m["role"] == "user")
        prompt = [dict(m) for m in prompt]
        prompt[first_user]["content"] = IMAGE_PLACEHOLDER * num_images + prompt[first_user]["content"]
    elif marked != num_images:
        raise DataError(f"the row has {num_images} images but its prompt marks {marked} ({IMAGE_PLACEHOLDER} "
                        "placeholders or image parts); expected one per image", field="images")
    return prompt


def as_content_parts(messages: list[dict]) -> list[dict]:
    """Messages for a processor's chat template: every text content as parts, each ``<image>`` as an image part
    (TRL's structured form)."""
    structured = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            structured.append(message)
            continue
        parts: list[dict] = []
        for index, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if index:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        structured.append({**message, "content": parts})
    return structured


# ------------------------------------------------------------------------------- named templates (LLaMA-Factory)

# LLaMA-Factory's multimodal plugins whose image expansion preftune writes, with the texts that replace each
# <image>: (opening text, the image token, closing text); the image token is repeated once per merged patch.
PLUGIN_IMAGE_TOKENS = {
    "Qwen2VL": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "Qwen3VL": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
}
# Plugins that replace each <image> with the processor's whole image text, the same for every image (Gemma 3:
# "\n\n<start_of_image>" + <image_soft_token> x image_seq_length + "<end_of_image>\n\n", ``full_image_sequence``).
PLUGIN_FULL_IMAGE_SEQUENCE = frozenset({"Gemma3"})
# Templates whose plugin LLaMA-Factory registers with other texts than its family's (get_mm_plugin's image_token,
# vision_bos_token, vision_eos_token).
TEMPLATE_IMAGE_TOKENS = {
    "dots_ocr": ("<|img|>", "<|imgpad|>", "<|endofimg|>"),
}


def image_token_counts(processor: Any, images: Sequence[Any]) -> list[int]:
    """How many image tokens each image takes for a Qwen-VL image processor: its patch grid (t x h x w, as the
    image processor resizes it within its pixel limits) divided by the merged block (``merge_size`` squared), as
    LLaMA-Factory's Qwen2-VL and Qwen3-VL plugins count them. ``images``: as the image processor gets them
    (``processor_image``: within the processor's ``PixelLimits``)."""
    image_processor = processor.image_processor
    grids = image_processor(images=list(images), return_tensors="pt")["image_grid_thw"]
    merged = int(image_processor.merge_size) ** 2
    return [int(grid.prod()) // merged for grid in grids]


def _plugin_image_texts(processor: Any, images: Sequence[Any], template_name: str, plugin: str) -> list[str]:
    """The text that replaces each image's ``<image>`` under LLaMA-Factory's plugin ``plugin``."""
    from preftune.errors import ConfigError

    if plugin in PLUGIN_FULL_IMAGE_SEQUENCE:
        sequence = getattr(processor, "full_image_sequence", None)
        if not isinstance(sequence, str):
            raise ConfigError(f"template {template_name!r} writes images with the model's full image sequence, but "
                              f"{type(processor).__name__} has none; use the model's own processor and template",
                              key="template")
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ConfigError(f"not supported yet: pan-and-scan image crops under template {template_name!r}; set "
                              "do_pan_and_scan false in the image processor's config", key="template")
        return [sequence] * len(images)
    opening, token, closing = TEMPLATE_IMAGE_TOKENS.get(template_name, PLUGIN_IMAGE_TOKENS[plugin])
    if image_token_id(processor) != processor.tokenizer.convert_tokens_to_ids(token):
        raise ConfigError(f"template {template_name!r} writes images as {token} but the processor's image token is "
                          f"{getattr(processor, 'image_token', '?')}; use the model's own template", key="template")
    return [opening + token * count + closing for count in (image_token_counts(processor, images) if images else [])]


def expand_image_placeholders(messages: list[dict], images: Sequence[Any], processor: Any, template_name: str,
                              plugin: str | None) -> list[dict]:
    """The messages with each ``<image>`` replaced, in order, by the model's image tokens as LLaMA-Factory's
    multimodal plugin ``plugin`` writes them before encoding with a named template (for Qwen-VL:
    ``<|vision_start|>`` + ``<|image_pad|>`` once per merged patch + ``<|vision_end|>``; dots.ocr's template
    ``<|img|>`` + ``<|imgpad|>``… + ``<|endofimg|>``; for Gemma 3 the processor's ``full_image_sequence``).
    ``images``: the row's PIL images as the image processor gets them, one per placeholder.

    Raises:
        ConfigError: the template has no multimodal plugin, or one whose image tokens preftune does not write yet,
            or the processor's image token is not the plugin's (key ``template``).
    """
    from preftune.errors import ConfigError

    if plugin is None:
        raise ConfigError(f"the data has images but template {template_name!r} is text-only; use the model's "
                          "multimodal template (e.g. qwen2_vl, qwen3_vl_nothink, gemma3) or remove template",
                          key="template")
    if plugin not in PLUGIN_IMAGE_TOKENS and plugin not in PLUGIN_FULL_IMAGE_SEQUENCE:
        raise ConfigError(f"not supported yet: rows with images under template {template_name!r} (LLaMA-Factory's "
                          f"{plugin} plugin); remove template to use the processor's chat template", key="template")
    texts = iter(_plugin_image_texts(processor, images, template_name, plugin))
    expanded = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) and IMAGE_PLACEHOLDER in content:
            pieces = content.split(IMAGE_PLACEHOLDER)
            content = pieces[0] + "".join(next(texts) + piece for piece in pieces[1:])
            message = {**message, "content": content}
        expanded.append(message)
    return expanded


# -------------------------------------------------------------------------------------------- batch inputs


@dataclass(frozen=True)
class ImageInputs:
    """The forward's image inputs for a batch whose rows carry ``images``: the image processor's outputs for every
    row's images in row order (``pixel_values``, and ``image_grid_thw`` for Qwen-VL; not the outputs the processor
    itself drops, e.g. Gemma 3's ``num_crops``), plus the token types (1 on image tokens) for models whose processor
    returns them, under the processor's name for them: ``mm_token_type_ids`` (Qwen-VL's multimodal RoPE) or
    ``token_type_ids`` (Gemma 3: its image tokens attend to each other both ways)."""

    image_processor: Any
    image_token_ids: tuple[int, ...]
    token_type_key: str | None = None
    dropped_keys: tuple[str, ...] = ()
    limits: PixelLimits | None = None

    @classmethod
    def of(cls, processing_class: Any) -> "ImageInputs | None":
        """The image inputs of a processor; None for a tokenizer."""
        if not is_processor(processing_class) or getattr(processing_class, "image_processor", None) is None:
            return None
        token_type_key = None
        if getattr(processing_class, "return_mm_token_type_ids", False):  # Gemma3Processor renames them
            names = getattr(processing_class, "model_input_names", None) or []
            token_type_key = "token_type_ids" if "token_type_ids" in names else "mm_token_type_ids"
        dropped = tuple(getattr(processing_class, "unused_input_names", None) or ())
        return cls(processing_class.image_processor, image_content_token_ids(processing_class), token_type_key,
                   dropped, PixelLimits.of(processing_class))

    def settings(self) -> str:
        """The image processor's settings as JSON (resizing limits, normalization…) and the pixel limits applied
        before it: what turns the same image into other pixel values, for cache keys."""
        to_json = getattr(self.image_processor, "to_json_string", None)
        own = to_json() if callable(to_json) else repr(self.image_processor)
        return own if self.limits is None else f"{own}|{self.limits}"

    def __call__(self, row_images: Sequence[Sequence[dict]], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``row_images[r]``: the images of row r of ``input_ids`` (R rows), in the order of its image tokens."""
        images = [processor_image(entry, self.limits) for entries in row_images for entry in entries]
        inputs: dict[str, torch.Tensor] = {}
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            inputs = {key: value for key, value in processed.items()
                      if isinstance(value, torch.Tensor) and key not in self.dropped_keys}
        if self.token_type_key is not None:
            image_ids = torch.tensor(self.image_token_ids, device=input_ids.device)
            inputs[self.token_type_key] = torch.isin(input_ids, image_ids).long()
        return inputs

    def wrap(self, collate: Callable[..., Any]) -> Callable[..., Any]:
        """``collate`` (either layout, or the auto choice between them) with these inputs added to each batch it
        makes (``model_inputs``): the images of a plain batch once per completion block, of a shared batch once per
        example, so that the vision encoder runs once per pair there."""

        def collate_with_images(examples: Sequence[dict], **kwargs: Any) -> Any:
            batch = collate(examples, **kwargs)
            # plain rows hold each example's prompt (and its images) once per completion; shared rows once
            repeats = batch.num_completions if batch.segments is None else 1
            per_row = [list(example.get("images") or []) for example in examples] * repeats
            batch.model_inputs = self(per_row, batch.input_ids)
            return batch

        return collate_with_images
