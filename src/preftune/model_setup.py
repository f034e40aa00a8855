"""The models of a run, set up before any data is read: the policy (loaded, with a LoRA adapter when asked), its
reference, the batch layout both support, dropout, gradient checkpointing, compilation, and the process-wide
settings (seed, determinism, TF32, log level).

``set_up_models`` is what ``DPOTrainer.__init__`` calls; it returns a ``ModelSetup``. Nothing here depends on how
the processes share the work beyond the ``Parallelism``'s ``allows_padding_free``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

from preftune.adapters import apply_lora, check_quantization, is_peft_model, lora_config_from_args
from preftune.config import DPOConfig
from preftune.errors import ConfigError
from preftune.logprobs import CHUNKED_HEAD_MODEL_TYPES, unwrap_model
from preftune.losses import LossParams
from preftune.data.images import text_tokenizer
from preftune.models import (
    disable_dropout,
    ensure_pad_token,
    has_processor,
    is_vision_language,
    load_causal_lm,
    load_image_text_model,
    load_processor,
    load_tokenizer,
    locate_model,
)
from preftune.moe import resolve_router_aux_loss
from preftune.reference import Reference, build_reference
from preftune.shared_prefix_attention import has_image_block_attention, supports_shared_prefix_attention

logger = logging.getLogger(__name__)

# Tags added to the model card metadata (``model.add_model_tags``); TRL adds "trl" and "dpo" for the same API.
MODEL_TAGS = ("trl", "dpo", "preftune")
# Parameter-name parts of a vision-language model's vision encoder and of its projector into the language model
# (Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``visual.*``; LLaVA, Gemma 3: ``vision_tower``, ``multi_modal_projector``), as
# LLaMA-Factory names them for ``freeze_vision_tower`` and ``freeze_multi_modal_projector``.
VISION_TOWER_KEYS = ("visual.patch_embed", "visual.pos_embed", "visual.blocks", "vision_tower", "vision_model")
PROJECTOR_KEYS = ("visual.merger", "visual.deepstack_merger_list", "multi_modal_projector")


@dataclass(frozen=True)
class BatchLayout:
    """How pairs are laid out for the forward pass (all layouts give the same log-probs)."""

    prefix_sharing: bool | None  # None: decided per batch (``layout.shared_prefix_pays``)
    padding_free: bool | None  # None: decided per batch (``padding_free_pays``)
    shared_attention: bool = False  # shared rows run ``shared_prefix_attention`` (no T x T mask), not a dense mask


@dataclass
class ModelSetup:
    """What ``set_up_models`` returns.

    ``reference`` is None for reference-free losses. ``reference_is_initial_policy``: the reference is a copy of
    the policy as loaded (full fine-tuning, no reference given), so the untouched policy can stand in for it.
    ``router_aux_loss_coef``: the MoE load-balancing loss weight (0.0: off). ``flop_parameters``: non-embedding
    parameters, counted before any sharding (for ``total_flos``).
    """

    model: nn.Module
    reference: Reference | None
    layout: BatchLayout
    router_aux_loss_coef: float
    flop_parameters: int
    reference_is_initial_policy: bool


def check_supported(args: DPOConfig, device_type: str) -> None:
    """ConfigError for settings that cannot work on this device (quantized loading, fp16 on CPU, bf16 on an old GPU)."""
    check_quantization(args.quantization_bit, device_type)
    if args.quantization_bit is not None:  # bitsandbytes and a GPU are there, but quantized loading is not built yet
        raise ConfigError("not supported yet: loading the model quantized (QLoRA)", key="quantization_bit")
    if args.fp16 and device_type == "cpu":
        raise ConfigError("fp16 is not supported on CPU (no fp16 autocast there); use bf16: true or fp32", key="fp16")
    if args.bf16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("bf16 requested but this GPU does not support bfloat16; use fp16 or fp32", key="bf16")


def set_global_settings(args: DPOConfig) -> None:
    """Process-wide settings of a run: the seed (``full_determinism``: transformers' deterministic mode), TF32
    matmuls (``tf32``; None leaves torch's setting) and transformers' log level (``log_level``)."""
    if args.full_determinism:
        from transformers import enable_full_determinism

        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    if args.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.log_level != "passive" or args.log_level_replica != "passive":
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(args.get_process_log_level())


def resolve_layout(args: DPOConfig, *models: nn.Module | None) -> BatchLayout:
    """Resolve ``prefix_sharing``/``padding_free``: explicit values win; ``None`` (auto) means decided per batch
    where supported, off elsewhere.

    Supported: every model is of a type whose 4-D masks and position ids are tested
    (``CHUNKED_HEAD_MODEL_TYPES``) and uses sdpa or eager attention (flash-attention takes no 4-D mask). Shared rows
    run without a T x T mask where every model supports ``shared_prefix_attention``, else with a dense mask.
    A vision-language model is never padding-free (its image inputs follow the rows of one forward; asking for it
    is a ConfigError) and shares prefixes only through the shared-prefix attention (``resolve_vision_layout``).
    """
    if any(is_vision_language(unwrap_model(m)) for m in models if m is not None):
        return resolve_vision_layout(args, *models)
    supported = all(
        getattr(unwrap_model(m).config, "model_type", None) in CHUNKED_HEAD_MODEL_TYPES
        and getattr(unwrap_model(m).config, "_attn_implementation", None) in ("sdpa", "eager")
        for m in models
        if m is not None
    )
    if args.prefix_sharing and not supported:
        logger.warning("prefix_sharing requested for a model without tested 4-D mask support; results may differ")
    auto = None if supported else False
    prefix_sharing = auto if args.prefix_sharing is None else bool(args.prefix_sharing)
    padding_free = auto if args.padding_free is None else bool(args.padding_free)
    shared_attention = all(supports_shared_prefix_attention(unwrap_model(m)) for m in models if m is not None)
    layout = BatchLayout(prefix_sharing, padding_free, shared_attention)
    logger.info("batch layout: prefix_sharing=%s, padding_free=%s (None: per batch), shared-prefix attention=%s",
                layout.prefix_sharing, layout.padding_free, layout.shared_attention)
    return layout


def resolve_vision_layout(args: DPOConfig, *models: nn.Module | None) -> BatchLayout:
    """The layout of a vision-language run: padding-free off (asking for it is a ConfigError); prefix sharing where
    every model's language model runs ``shared_prefix_attention`` (auto: per batch, explicit: always), or where every
    model takes shared rows as dense masks with its image blocks (Gemma 3: ``has_image_block_attention``; auto: by
    the dense-mask rule), else plain (asking for it then is a ConfigError: the dense-mask fallback of text models is
    not tested with images)."""
    if args.padding_free:
        raise ConfigError("not supported yet: padding_free with a vision-language model (its image inputs follow the "
                          "rows of one padded forward); leave it null or set it false", key="padding_free")
    present = [unwrap_model(m) for m in models if m is not None]
    shared_attention = all(supports_shared_prefix_attention(m) for m in present)
    shareable = shared_attention or all(has_image_block_attention(m) for m in present)
    if args.prefix_sharing and not shareable:
        raise ConfigError("not supported yet: prefix_sharing with this vision-language model (it needs a Qwen2-VL, "
                          "Qwen3-VL or LLaVA model with sdpa attention, or a Gemma 3); leave it null or set it false",
                          key="prefix_sharing")
    prefix_sharing = (None if shareable else False) if args.prefix_sharing is None else bool(args.prefix_sharing)
    logger.info("batch layout (vision-language model): prefix_sharing=%s (None: per batch), padding_free=False",
                prefix_sharing)
    return BatchLayout(prefix_sharing, False, shared_attention)


def load_model(args: DPOConfig, model: nn.Module | str, key: str, device_type: str,
               quantization_config: Any = None) -> nn.Module:
    """``model`` as given when loaded already; else loaded from its path with ``args.from_pretrained_kwargs()``
    (``model_init_kwargs``, dtype, revision, attention implementation). ``key`` names it in errors."""
    if isinstance(model, nn.Module):
        if args.model_init_kwargs and key == "model_name_or_path":
            logger.warning("model_init_kwargs ignored: the model given is already loaded")
        return model
    if quantization_config is not None:
        check_quantization(4, device_type)  # bitsandbytes and CUDA, or a clear error
        raise ConfigError("not supported yet: loading the model quantized (QLoRA)", key="quantization_config")
    source = locate_model(model, key=key)
    if source.config is not None and source.config.get("vision_config") is not None:
        return load_image_text_model(model, key=key, **args.from_pretrained_kwargs())
    return load_causal_lm(model, key=key, **args.from_pretrained_kwargs())


def load_processing_class(args: DPOConfig, source: str) -> Any:
    """The processing class for a model path: its processor (tokenizer + image processor, with ``image_max_pixels``
    and ``image_min_pixels``) when the folder has a processor config, else its tokenizer."""
    if has_processor(source):
        return load_processor(source, trust_remote_code=args.trust_remote_code,
                              image_max_pixels=args.image_max_pixels, image_min_pixels=args.image_min_pixels)
    return load_tokenizer(source, trust_remote_code=args.trust_remote_code)


def prepare_processing_class(args: DPOConfig, processing_class: Any) -> Any:
    """``processing_class`` ready for the data: its tokenizer has a pad token."""
    ensure_pad_token(text_tokenizer(processing_class))
    return processing_class


def freeze_vision_parts(args: DPOConfig, model: nn.Module) -> list[str]:
    """The parameter-name keys left untrained in a vision-language model (``freeze_vision_tower``:
    ``VISION_TOWER_KEYS``; ``freeze_multi_modal_projector``: ``PROJECTOR_KEYS``); for full fine-tuning their
    parameters stop requiring gradients here (LoRA leaves them out of its targets: ``exclude_vision_parts``)."""
    if not is_vision_language(unwrap_model(model)):
        return []
    keys = [*(VISION_TOWER_KEYS if args.freeze_vision_tower else ()),
            *(PROJECTOR_KEYS if args.freeze_multi_modal_projector else ())]
    for name, parameter in model.named_parameters():
        if is_under(name, keys):
            parameter.requires_grad_(False)
    return keys


def is_under(name: str, keys: list[str] | tuple[str, ...]) -> bool:
    """Whether the dotted parameter or module ``name`` lies under one of ``keys`` (dotted name parts)."""
    dotted = f".{name}."
    return any(f".{key}." in dotted for key in keys)


def exclude_vision_parts(peft_config: Any, keys: list[str]) -> Any:
    """``peft_config`` with the modules under ``keys`` (the frozen vision parts) left out of its targets."""
    if keys and peft_config is not None and hasattr(peft_config, "exclude_modules"):
        pattern = r".*\.(" + "|".join(key.replace(".", r"\.") for key in keys) + r")\..*"
        peft_config.exclude_modules = pattern
    return peft_config


def set_up_models(args: DPOConfig, model: nn.Module | str, ref_model: nn.Module | str | None, peft_config: Any, *,
                  loss_params: LossParams, device_type: str, allows_padding_free: bool,
                  quantization_config: Any = None) -> ModelSetup:
    """Policy (with a LoRA adapter when asked), reference, layout, MoE loss weight, dropout, checkpointing and
    compilation, in that order."""
    policy = load_model(args, model, "model_name_or_path", device_type, quantization_config)
    if peft_config is None and args.finetuning_type == "lora":
        peft_config = lora_config_from_args(args)
    frozen_vision = freeze_vision_parts(args, policy)
    if peft_config is not None or is_peft_model(policy):
        policy = apply_lora(policy, exclude_vision_parts(peft_config, frozen_vision))
    reference, initial_policy = _reference(args, policy, ref_model, loss_params, device_type)
    if args.sync_ref_model and (reference is None or reference.separate_model is None):
        raise ConfigError(
            "sync_ref_model needs a separate reference model, not a LoRA adapter-disabled or adapter-copy reference",
            key="sync_ref_model",
        )
    reference_model = reference.model if reference is not None else None
    layout = resolve_layout(args, policy, reference_model)
    if not allows_padding_free and layout.padding_free is None:
        layout = BatchLayout(layout.prefix_sharing, False, layout.shared_attention)
    # MoE load-balancing loss on the policy's forwards, as TRL adds it (preftune.moe); 0.0: off
    router_aux_loss_coef = resolve_router_aux_loss(args, policy, layout)
    _prepare_modules(args, policy, reference_model)
    inner = unwrap_model(policy)  # counted now: FSDP and ZeRO-3 later hold only each process's shards
    flop_parameters = inner.num_parameters(exclude_embeddings=True) if hasattr(inner, "num_parameters") else 0
    return ModelSetup(policy, reference, layout, router_aux_loss_coef, flop_parameters, initial_policy)


def _reference(args: DPOConfig, policy: nn.Module, ref_model: nn.Module | str | None, loss_params: LossParams,
               device_type: str) -> tuple[Reference | None, bool]:
    """``(reference, whether it is a copy of the policy as loaded)``: None for reference-free losses; else a given
    model, the policy with its adapter disabled (LoRA), a frozen copy of an already-trained adapter, or a frozen copy
    of the policy as loaded (``build_reference``)."""
    if not loss_params.needs_reference:
        if ref_model is not None:
            raise ConfigError(f"loss {args.loss_type} uses no reference model, but ref_model was given; leave it out",
                              key="ref_model")
        return None, False
    ref_model = ref_model if ref_model is not None else args.ref_model_name_or_path
    initial_policy = ref_model is None and not is_peft_model(policy)
    loaded = load_model(args, ref_model, "ref_model", device_type) if ref_model is not None else None
    return build_reference(policy, loaded), initial_policy


def _prepare_modules(args: DPOConfig, policy: nn.Module, reference_model: nn.Module | None) -> None:
    """Dropout off, model tags, gradient checkpointing (policy) and compilation, on each distinct module once."""
    distinct = [policy] if reference_model is None or reference_model is policy else [policy, reference_model]
    if args.disable_dropout:
        for module in distinct:
            disable_dropout(module)
    if hasattr(policy, "add_model_tags"):
        policy.add_model_tags(list(MODEL_TAGS))
    if args.gradient_checkpointing:
        enable_activation_checkpointing(policy, args.gradient_checkpointing_kwargs)
    if args.torch_compile:
        for module in distinct:
            compile_body(module, backend=args.torch_compile_backend, mode=args.torch_compile_mode)


def enable_activation_checkpointing(policy: nn.Module, checkpoint_kwargs: dict[str, Any] | None = None) -> None:
    """Checkpoint every decoder layer of ``policy`` (transformers' own wrapping, ``torch.utils.checkpoint`` with
    ``checkpoint_kwargs``; ``use_reentrant`` defaults to false, as in TRL): a layer keeps only its input in the forward
    and recomputes the rest in the backward. Every layout runs through it unchanged (the shared-prefix layout's
    ``shared_prefix_layout`` keyword travels with the layer's inputs) and the chunked head, outside the layers, is
    not touched.

    Only forwards with gradients are checkpointed (transformers skips the wrapping under ``no_grad``), so reference
    forwards, evaluation and precomputation run as before. With frozen input embeddings (LoRA) the embeddings' output
    is made to require grad, which reentrant checkpointing needs for gradients to reach the adapters.
    """
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    enable = getattr(policy, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.x; gradient_checkpointing_enable is its deprecated alias
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    unwrap_model(policy).config.use_cache = False
    if is_peft_model(policy) or not any(p.requires_grad for p in policy.get_input_embeddings().parameters()):
        policy.enable_input_require_grads()


def compile_body(model: nn.Module, *, backend: str | None = None, mode: str | None = None) -> None:
    """``torch.compile`` the transformer body in place (``Module.compile``: parameter names and saving unchanged).

    Only the body: the output layer is bypassed by the chunked LM head, and shapes vary from batch to batch,
    hence ``dynamic=True``. ``backend`` and ``mode`` are ``torch.compile``'s (None: its defaults).
    """
    inner = unwrap_model(model)
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise ConfigError(f"torch_compile: cannot find the transformer body of {type(inner).__name__}", key="torch_compile")
    options = {name: value for name, value in (("backend", backend), ("mode", mode)) if value is not None}
    body.compile(dynamic=True, **options)
