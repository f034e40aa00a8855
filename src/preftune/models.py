"""Loading models and tokenizers from local directories (or hub ids), safely and with clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from preftune.errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, key: str = "model_name_or_path"):
    """Load a tokenizer and make sure it has a pad token (unk, else eos: pad positions are masked anyway)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load a tokenizer from '{name_or_path}': {_first_line(error)}", key=key) from None
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        logger.info("tokenizer has no pad token; padding with %r (padding is masked out)", tokenizer.pad_token)


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    key: str = "model_name_or_path",
    **init_kwargs,
) -> PreTrainedModel:
    """Load a causal LM from safetensors weights only (no pickle), in ``dtype`` (None = float32 as stored; a name or a
    ``torch.dtype``); ``init_kwargs`` (e.g. ``revision``, ``attn_implementation``) go to ``from_pretrained``."""
    if Path(name_or_path).exists() and not Path(name_or_path).is_dir():
        raise ConfigError(f"'{name_or_path}' is a file; expected a model directory or hub id", key=key)
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=_resolve_dtype(dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **init_kwargs,
        )
    except (OSError, ValueError, EnvironmentError) as error:
        raise ConfigError(
            f"cannot load a causal LM from '{name_or_path}' (safetensors weights expected): {_first_line(error)}",
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


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
