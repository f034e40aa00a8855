"""Loading models and tokenizers from local folders (or hub ids), safely and with clear errors.

``locate_model`` and ``locate_tokenizer`` look at what a path names without loading anything (the preflight checks
and the loaders share them); the loaders turn any library error into one ``ConfigError`` line that names the key, the
path and what was expected, with the library's own text in full (never its first line only).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from preftune.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model")
# Files of a processor (tokenizer + image processor): a folder with one holds a vision-language model's processor.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Config fields that hold a model's context length, by model family (llama/qwen/mistral, gpt2, older gpt-style).
CONTEXT_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# A Hugging Face Hub repository id: "name" or "namespace/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
EXPECTED_FOLDER = "a local model folder (config.json, *.safetensors weights, tokenizer files) or a Hugging Face Hub id"


@dataclass(frozen=True)
class ModelSource:
    """What a ``*_name_or_path`` value names, found without loading anything.

    Attributes:
        name: the value as given.
        folder: the local folder; None for a Hugging Face Hub id (not on disk).
        config: the parsed ``config.json`` of a local folder (None for a hub id or a LoRA adapter folder).
        is_adapter: the folder holds a peft LoRA adapter (``adapter_config.json``) rather than a whole model.
    """

    name: str
    folder: Path | None
    config: dict[str, Any] | None = None
    is_adapter: bool = False

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model's position embeddings cover (from config.json), or None if unknown."""
        return context_length(self.config) if self.config else None


def locate_model(name_or_path: str, *, key: str = "model_name_or_path", need_weights: bool = True) -> ModelSource:
    """Check what ``name_or_path`` names before loading it: a local folder with ``config.json`` and safetensors
    weights (or a LoRA adapter folder), or a string shaped like a Hub id (then nothing more can be checked offline).

    Raises ConfigError (``key``) naming the path: no such folder, a file, no config.json (or one that is not JSON),
    pickle weights only (``pytorch_model.bin``; with the one-line conversion), no weights at all.
    """
    folder = _local_folder(name_or_path, key)
    if folder is None:
        return ModelSource(str(name_or_path), None)
    if (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / CONFIG_FILE).is_file():
        if need_weights:
            _check_weights(folder, key, stem="adapter_model")
        return ModelSource(str(name_or_path), folder, None, is_adapter=True)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(
            f"{folder} has no {CONFIG_FILE}; expected a transformers model folder (config.json, *.safetensors "
            "weights, tokenizer files), e.g. one written by save_pretrained", key=key,
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{config_path} cannot be read as JSON ({_one_line(error)}); expected the model's "
                          "configuration", key=key) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} is not a JSON object; expected the model's configuration", key=key)
    if need_weights:
        _check_weights(folder, key, stem="model")
    return ModelSource(str(name_or_path), folder, config)


def locate_tokenizer(name_or_path: str, *, key: str = "model_name_or_path") -> ModelSource:
    """Check that ``name_or_path`` is a local folder holding tokenizer files (``tokenizer.json``,
    ``tokenizer_config.json`` or a sentencepiece ``*.model``), or a Hub id. Raises ConfigError (``key``) otherwise."""
    folder = _local_folder(name_or_path, key)
    if folder is not None and not _has_tokenizer_files(folder):
        hint = (" or set tokenizer_name_or_path to the folder that has them" if key == "model_name_or_path" else "")
        raise ConfigError(
            f"{folder} has no tokenizer files; expected one of {', '.join(TOKENIZER_FILES)} (copy them from the base "
            f"model{hint})", key=key,
        )
    return ModelSource(str(name_or_path), folder)


def context_length(config: dict[str, Any]) -> int | None:
    """The context length a model's ``config.json`` declares (``max_position_embeddings`` or its family's name for
    it; a nested ``text_config`` for multimodal configs), or None."""
    for holder in (config, config.get("text_config") or {}):
        for field in CONTEXT_LENGTH_FIELDS:
            value = holder.get(field) if isinstance(holder, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def looks_like_hub_id(name: str) -> bool:
    """True when ``name`` has the form of a Hub repository id (``name`` or ``namespace/name``), not of a path."""
    return bool(_HUB_ID.match(name)) and not name.endswith((".json", ".safetensors", ".bin", ".yaml", ".yml"))


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, key: str = "model_name_or_path"):
    """Load a tokenizer and make sure it has a pad token (unk, else eos: pad positions are masked anyway).

    Raises ConfigError (``key``) when ``name_or_path`` holds no tokenizer (``locate_tokenizer``) or the library
    cannot build one from it (its whole message, on one line)."""
    source = locate_tokenizer(name_or_path, key=key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError, AttributeError) as error:
        raise ConfigError(
            f"cannot load a tokenizer from {_describe(source)}: {_explain(source, error, 'tokenizer files')}", key=key
        ) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("tokenizer has no pad token; padding with %r (padding is masked out)", tokenizer.pad_token)


def has_processor(name_or_path: Any) -> bool:
    """Whether ``name_or_path`` is a local folder holding a processor config (``PROCESSOR_FILES``)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        return False
    folder = Path(os.path.expanduser(str(name_or_path)))
    return any((folder / name).is_file() for name in PROCESSOR_FILES)


def is_vision_language(model: nn.Module | None) -> bool:
    """Whether ``model`` (a transformers model, possibly wrapped) is a vision-language model: its config has a
    ``vision_config``."""
    inner = model
    while inner is not None and not hasattr(inner, "config"):
        inner = getattr(inner, "module", None)
    config = getattr(inner, "config", None)
    return getattr(config, "vision_config", None) is not None


def image_only_processor(processor_class: type, image_processor: Any, tokenizer: Any,
                         chat_template: str | None = None) -> Any:
    """A ``processor_class`` (e.g. ``Qwen2VLProcessor``) built from an image processor and a tokenizer, without the
    video processor its ``__init__`` also asks for: transformers builds video processors with torchvision, which
    preftune does not install. The processor saves under its class's name and loads back as one."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):  # noqa: N807
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    image_only = type(processor_class.__name__, (processor_class,), {"__init__": __init__})
    return image_only(image_processor, tokenizer, chat_template=chat_template)


def load_processor(name_or_path: str, *, trust_remote_code: bool = False, image_max_pixels: int | None = None,
                   image_min_pixels: int | None = None, key: str = "model_name_or_path") -> Any:
    """The processor of a vision-language model folder (``AutoProcessor``; without torchvision, the image processor
    and tokenizer joined by ``image_only_processor``), with a pad token and the image pixel limits set.

    Raises ConfigError (``key``) when the folder holds no usable processor."""
    from transformers import AutoImageProcessor, AutoProcessor, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, KeyError, AttributeError, TypeError):
        processor = None  # a processor that wants a video processor (torchvision): joined from its parts below
    if not isinstance(processor, ProcessorMixin):
        try:
            class_name = _processor_class_name(Path(name_or_path))
            import transformers

            processor_class = getattr(transformers, class_name)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            image_processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
            processor = image_only_processor(processor_class, image_processor, tokenizer,
                                             chat_template=getattr(tokenizer, "chat_template", None))
        except (OSError, ValueError, ImportError, KeyError, AttributeError, TypeError) as error:
            raise ConfigError(f"cannot load a processor (tokenizer + image processor) from {name_or_path}: "
                              f"{_one_line(error)}", key=key) from None
    ensure_pad_token(processor.tokenizer)
    set_image_pixel_limits(processor, image_max_pixels, image_min_pixels)
    return processor


def _processor_class_name(folder: Path) -> str:
    for name in (*PROCESSOR_FILES, "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("processor_class")
            if value:
                return value
    raise KeyError(f"no processor_class in {', '.join(PROCESSOR_FILES)}")


def set_image_pixel_limits(processor: Any, max_pixels: int | None, min_pixels: int | None) -> None:
    """Set LLaMA-Factory's ``image_max_pixels``/``image_min_pixels`` on ``processor`` as LLaMA-Factory does (its
    attributes of those names): each image is resized within them before the image processor, whose own limits (the
    model's preprocessor config) stay as they are (``preftune.data.images.PixelLimits``). None leaves one as is; a
    processor gets limits only when both are set."""
    for value, name in ((max_pixels, "image_max_pixels"), (min_pixels, "image_min_pixels")):
        if value is not None:
            setattr(processor, name, int(value))


def load_image_text_model(name_or_path: str, *, dtype: str | torch.dtype | None = None,
                          trust_remote_code: bool = False, key: str = "model_name_or_path",
                          **init_kwargs) -> PreTrainedModel:
    """Load a vision-language model (``AutoModelForImageTextToText``) from safetensors weights, as
    ``load_causal_lm`` loads a causal LM."""
    from transformers import AutoModelForImageTextToText

    source = locate_model(name_or_path, key=key)
    try:
        return AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
            **init_kwargs,
        )
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise ConfigError(f"cannot load a vision-language model from {_describe(source)}: "
                          f"{_explain(source, error, 'safetensors weights')}", key=key) from None


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    key: str = "model_name_or_path",
    **init_kwargs,
) -> PreTrainedModel:
    """Load a causal LM from safetensors weights only (no pickle), in ``dtype`` (None = float32 as stored; a name or a
    ``torch.dtype``); ``init_kwargs`` (e.g. ``revision``, ``attn_implementation``) go to ``from_pretrained``.

    Raises ConfigError (``key``) naming the path and what was expected: see ``locate_model``; any library error
    while loading comes whole, on one line."""
    source = locate_model(name_or_path, key=key)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=_resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **init_kwargs,
        )
    except (OSError, ValueError, ImportError, KeyError) as error:
        raise ConfigError(
            f"cannot load a causal LM from {_describe(source)}: {_explain(source, error, 'safetensors weights')}",
            key=key,
        ) from None


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return _DTYPES[str(dtype).removeprefix("torch.")]


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so log-probs are deterministic functions of the weights."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter; the CPU for a model without parameters."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------- helpers
def _local_folder(name_or_path: str, key: str) -> Path | None:
    """The local folder ``name_or_path`` names; None for a Hub id; ConfigError for a file or a missing path."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ConfigError(f"got {name_or_path!r}; expected {EXPECTED_FOLDER}", key=key)
    path = Path(os.path.expanduser(name_or_path))
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError:  # a name the OS cannot look up (too long): not a local path
        exists = is_dir = False
    if is_dir:
        return path
    if exists:
        raise ConfigError(f"{path} is a file; expected {EXPECTED_FOLDER}", key=key)
    if looks_like_hub_id(name_or_path):
        return None
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    raise ConfigError(f"no such folder: {path}{where}; expected {EXPECTED_FOLDER}", key=key)


def _check_weights(folder: Path, key: str, *, stem: str) -> None:
    """A safetensors weights file (or a sharded set) is there; else say what is there instead."""
    names = [item.name for item in folder.iterdir() if item.is_file()]
    if any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in names):
        return
    pickles = sorted(name for name in names if name.endswith(PICKLE_WEIGHT_SUFFIXES))
    if pickles:
        convert = (
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}')\""
            if stem == "model" else "load it with peft and save it again with save_pretrained (safetensors)"
        )
        raise ConfigError(
            f"{folder} has only PyTorch pickle weights ({', '.join(pickles[:3])}); preftune loads safetensors weights "
            f"only (loading a pickle can run code). Convert once: {convert}", key=key,
        )
    raise ConfigError(f"{folder} has no model weights; expected {stem}.safetensors (or sharded "
                      f"{stem}-0000N-of-0000M.safetensors with an index)", key=key)


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.model"))


def _describe(source: ModelSource) -> str:
    if source.folder is not None:
        return str(source.folder)
    return f"'{source.name}' (no such folder in {Path.cwd()}, so a Hugging Face Hub id)"


def _explain(source: ModelSource, error: BaseException, wanted: str) -> str:
    """What went wrong, on one line: for a Hub id, that it is not on disk and the Hub (or its cache) did not have
    it; for a folder, what was expected; then the library's whole message."""
    library = _one_line(error)
    if source.folder is None:
        return (f"not a local folder, and the Hub could not provide it (offline, or not in the local hub cache); "
                f"give a local folder instead. {type(error).__name__}: {library}")
    return f"expected {wanted} that transformers can read. {type(error).__name__}: {library}"


def _one_line(error: BaseException) -> str:
    """The error's whole message with its line breaks folded into spaces (never only its first line)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__
