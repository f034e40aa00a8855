"""LoRA adapters: configuration from preftune's arguments, attaching, saving, merging and exporting; and the
trainable weights of a run (the adapter, or the whole model) saved and loaded back.

LoRA (Hu et al. 2021) trains a low-rank update of each adapted linear layer, ``W' = W + (α / r) · B A`` with
``A ∈ R^{r×in}``, ``B ∈ R^{out×r}``; only A and B are trained. B starts at zero, so a fresh adapter is the identity
and the policy with its adapter disabled is exactly the policy as loaded (see ``preftune.reference``).

Everything here goes through peft's public API; files are safetensors only, and every save goes through
``preftune.atomic.update_folder`` (staged in a unique hidden sibling, fsynced, renamed into place; stale weight files
of an earlier save removed), so a crash or an error never leaves a half-written file.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from preftune import atomic
from preftune.errors import CheckpointError, ConfigError
from preftune.models import load_causal_lm

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Weight/adapter files a save replaces as a whole: left-overs of an earlier save into the same folder (other shard
# counts, the other kind of checkpoint) would otherwise be loaded together with, or instead of, the new files.
_REPLACED_FILE_PATTERNS = (
    "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
    "adapter_model.*", ADAPTER_CONFIG,
)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


# ------------------------------------------------------------------------------------------------ configuration
def lora_config_from_args(args: Any) -> LoraConfig:
    """A causal-LM ``LoraConfig`` from ``args.lora_rank``, ``lora_alpha`` (None → 2 × rank), ``lora_dropout`` and
    ``lora_target``: ``"all"`` (every linear layer but the LM head: peft's ``"all-linear"``), a list of module
    names, or a comma-separated string of names."""
    rank = int(args.lora_rank)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * rank
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=float(args.lora_dropout),
        target_modules=_target_modules(args.lora_target),
        task_type="CAUSAL_LM",
    )


def _target_modules(lora_target: str | list[str]) -> str | list[str]:
    names = lora_target.split(",") if isinstance(lora_target, str) else list(lora_target)
    names = [str(name).strip() for name in names if str(name).strip()]
    if not names:
        raise ConfigError(
            "lora_target is empty; use 'all' or name the modules to adapt (e.g. q_proj,v_proj)", key="lora_target"
        )
    if any(name.lower() == "all" for name in names):
        if len(names) > 1:
            raise ConfigError(f"lora_target mixes 'all' with module names: {names}", key="lora_target")
        return "all-linear"
    return names  # a list: peft matches names against module-name suffixes (a plain string would be a regex)


# ------------------------------------------------------------------------------------------------- attaching
def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` (or the module inside DDP/accelerate wrappers) is a peft ``PeftModel``."""
    return isinstance(peft_model_of(model), PeftModel)


def peft_model_of(model: nn.Module) -> nn.Module:
    """``model`` without DDP/accelerate ``.module`` wrappers (a ``PeftModel`` when it is one)."""
    while not isinstance(model, PeftModel) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def require_peft_model(model: nn.Module, caller: str) -> PeftModel:
    """The ``PeftModel`` in ``model`` (DDP/accelerate wrappers removed); ``TypeError`` naming ``caller`` if none."""
    peft_model = peft_model_of(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"{caller} needs a peft PeftModel, got {type(peft_model).__name__}")
    return peft_model


def apply_lora(model: nn.Module, peft_config: PeftConfig) -> PeftModel:
    """Attach a fresh adapter ``"default"`` to a plain model; only the adapter weights are trainable afterwards.

    A model that already is a ``PeftModel`` (e.g. an SFT adapter trained further) is kept as it is: its active
    adapter is made trainable and ``peft_config`` is not used.
    """
    if is_peft_model(model):
        model = peft_model_of(model)
        logger.info("training the model's adapter '%s' further (the LoRA settings are not used)", model.active_adapter)
        model.set_adapter(model.active_adapter)  # peft: the active adapter becomes trainable, others frozen
        return model
    try:
        return get_peft_model(model, peft_config)
    except ValueError as error:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"cannot attach the LoRA adapter: {_first_line(error)}", key="lora_target") from None


# ------------------------------------------------------------------------------------------------------ saving
def save_adapter(model: PeftModel, tokenizer: Any, output_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the active adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and the tokenizer to
    ``output_dir``, atomically. Other adapters of the model (e.g. a reference copy) are not saved. ``state_dict``:
    the whole model's weights when the model is sharded (FSDP), else they are read from the model."""
    model = require_peft_model(model, "save_adapter")
    adapter = model.active_adapter

    def write(staging: Path) -> None:
        model.save_pretrained(staging, selected_adapters=[adapter], safe_serialization=True, state_dict=state_dict)
        nested = staging / adapter  # peft writes adapters not named "default" into a subfolder
        if adapter != "default" and nested.is_dir():
            for item in nested.iterdir():
                os.replace(item, staging / item.name)
            nested.rmdir()
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return _write_atomically(output_dir, write)


def merge_and_save(model: PeftModel, tokenizer: Any, output_dir: str | os.PathLike) -> Path:
    """Write the model with its active adapter merged (``W + (α/r)·BA``) as a plain transformers model
    (safetensors), loadable with ``AutoModelForCausalLM.from_pretrained``.

    A deep copy is merged, so the live model keeps its unmerged, trainable adapter with bit-identical weights
    (merging and unmerging in place would round the base weights); the copy costs one model's memory meanwhile.
    """
    merged = copy.deepcopy(require_peft_model(model, "merge_and_save")).merge_and_unload()
    return _write_atomically(output_dir, _pretrained_writer(merged, tokenizer))


def export_merged(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Merge a saved adapter into its base model and save the result (``preftune export``).

    The base is ``base_model`` or else the ``base_model_name_or_path`` recorded in ``adapter_config.json``. An adapter
    made for another base (a shape that differs, a module the base lacks, or layers the base does not have) is
    refused with a ``ConfigError`` (key ``"adapter"``), and so is a base that cannot be loaded (key ``"base_model"``);
    ``output_dir`` is written only once the merge succeeded.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    config = _read_adapter_config(adapter_dir)
    if output_dir.resolve() == adapter_dir.resolve():
        raise ConfigError(f"the merged model cannot be written into the adapter folder {adapter_dir}", key="output_dir")
    base_name = base_model or config.base_model_name_or_path
    if not base_name:
        raise ConfigError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass the base model", key="base_model")
    base = _load_base(base_name, dtype, adapter_dir)
    peft_model = _load_adapter_onto(base, adapter_dir, base_name)
    merged = peft_model.merge_and_unload()
    tokenizer = _tokenizer_for_export(adapter_dir, base_name)
    path = _write_atomically(output_dir, _pretrained_writer(merged, tokenizer))
    logger.info("merged adapter %s into %s: %s", adapter_dir, base_name, path)
    return path


def _read_adapter_config(adapter_dir: Path) -> PeftConfig:
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{adapter_dir} is not a saved adapter: no {ADAPTER_CONFIG} there", key="adapter")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (safetensors adapter weights expected)", key="adapter")
    try:
        return PeftConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read {adapter_dir / ADAPTER_CONFIG}: {_first_line(error)}", key="adapter") from None


def _load_base(base_name: str, dtype: str | torch.dtype | None, adapter_dir: Path) -> nn.Module:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    try:
        return load_causal_lm(base_name, dtype=dtype, key="base_model")
    except ConfigError as error:
        raise ConfigError(
            f"{error.message} (the base model of the adapter in {adapter_dir}; pass another base model if it moved)",
            key="base_model",
        ) from None


def _load_adapter_onto(base: nn.Module, adapter_dir: Path, base_name: str) -> PeftModel:
    """``PeftModel.from_pretrained``, plus the check peft leaves out: every saved adapter weight found a place in
    the base and every adapted module got its weights (peft only warns, or stays silent, about either)."""
    mismatch = f"the adapter in {adapter_dir} does not fit the base model '{base_name}'"
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as error:  # size mismatch, target modules not found
        raise ConfigError(f"{mismatch}: {_most_telling_line(error)}", key="adapter") from None
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as handle:
        saved = set(handle.keys())
    expected = set(get_peft_model_state_dict(model))
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        detail = f"{len(extra)} saved weights have no module in the base (e.g. {extra[:2]})" if extra else ""
        detail += ("; " if extra and missing else "") + (
            f"{len(missing)} adapted weights are not in the adapter (e.g. {missing[:2]})" if missing else ""
        )
        raise ConfigError(f"{mismatch}: {detail}", key="adapter")
    return model


def _tokenizer_for_export(adapter_dir: Path, base_name: str) -> Any:
    """The adapter folder's tokenizer if it has one, else the base model's; None (with a warning) if neither loads."""
    has_own = any((adapter_dir / name).is_file() for name in _TOKENIZER_FILES)
    source = str(adapter_dir) if has_own else base_name
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        logger.warning("merged model saved without a tokenizer: cannot load one from %s (%s)", source, _first_line(error))
        return None


# ------------------------------------------------------------------------------------------- whole-model saves
def save_pretrained_atomically(model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike,
                               state_dict: dict | None = None) -> Path:
    """``model.save_pretrained`` (safetensors) and the tokenizer's files into ``output_dir`` through
    ``preftune.atomic.update_folder``: staged in a unique hidden sibling, fsynced, renamed in, and the weight and
    adapter files of an earlier save into the same folder that this one does not have (other shard counts, the other
    kind of model) removed. ``state_dict``: the whole weights when the model is sharded (FSDP, ZeRO-3)."""
    return _write_atomically(output_dir, _pretrained_writer(model, tokenizer, state_dict))


def _pretrained_writer(model: nn.Module, tokenizer: Any, state_dict: dict | None = None) -> Callable[[Path], None]:
    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write


def _write_atomically(output_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(staging)``'s files moved into ``output_dir`` (``atomic.update_folder``), replacing an earlier save's
    weight/adapter files; ``output_dir`` is not touched if ``write`` fails."""
    return atomic.update_folder(output_dir, write, replaced_patterns=_REPLACED_FILE_PATTERNS)


# ------------------------------------------------------------------------------------------- trainable weights
def save_trainable_weights(model: nn.Module, tokenizer: Any, output_dir: str | os.PathLike,
                           state_dict: dict | None = None) -> Path:
    """The weights training changes, atomically: the active LoRA adapter (not a frozen reference copy) when the
    model has one, else the whole model (``state_dict``: its whole weights when the model is sharded)."""
    if is_peft_model(model):
        return save_adapter(model, tokenizer, output_dir, state_dict)
    return save_pretrained_atomically(model, tokenizer, output_dir, state_dict)


def load_trainable_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load what ``save_trainable_weights`` wrote into ``model`` in place: ``adapter_model.safetensors`` into its
    active adapter (same shapes) when it has one, else every ``model*.safetensors`` shard into the model.

    Raises ``CheckpointError`` naming ``directory`` when the files are missing or hold weights the model does not have
    (or lack weights it has; tied weights count as loaded through their twin).
    """
    directory = Path(directory)
    if is_peft_model(model):
        weights = directory / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}")
        result = set_peft_model_state_dict(peft_model_of(model), load_file(str(weights)))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{directory}: adapter weights that this model does not have: "
                                  f"{result.unexpected_keys[:5]}")
        return
    files = sorted(directory.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in state}
    untied_missing = [name for name in missing if model.get_parameter(name).data_ptr() not in loaded] if missing else []
    if unexpected or untied_missing:
        raise CheckpointError(
            f"{directory}: weights do not fit this model (missing {untied_missing[:5]}, unexpected {unexpected[:5]})"
        )


# ------------------------------------------------------------------------------------------------ quantization
def check_quantization(quantization_bit: Any, device_type: str | torch.device) -> None:
    """Refuse a ``quantization_bit`` this setup cannot load: None is fine; 4 or 8 (QLoRA: the base model loaded
    quantized by bitsandbytes, LoRA trained on top) needs bitsandbytes installed and a CUDA device."""
    if quantization_bit is None:
        return
    if isinstance(quantization_bit, bool) or quantization_bit not in (4, 8):
        raise ConfigError(f"quantization_bit must be 4, 8 or null, got {quantization_bit!r}", key="quantization_bit")
    missing = []
    if not _bitsandbytes_installed():
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if torch.device(device_type).type != "cuda":
        missing.append(f"a CUDA device (this run is on {torch.device(device_type).type})")
    if missing:
        raise ConfigError(
            f"quantization_bit={quantization_bit} (QLoRA) needs " + " and ".join(missing)
            + "; use quantization_bit: null to train LoRA on the unquantized model",
            key="quantization_bit",
        )


def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _most_telling_line(error: Exception) -> str:
    """torch's load errors start with a generic header; the first 'size mismatch' line says what is wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    telling = [line for line in lines if "mismatch" in line or "not found" in line]
    return (telling or lines or [type(error).__name__])[0]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
