"""The one configuration schema of preftune: YAML files, command-line overrides, the Python API and TRL's parsers.

``DPOConfig`` takes TRL 1.16's ``DPOConfig`` keyword names (with the transformers ``TrainingArguments`` fields it
inherits: ``beta``, ``loss_type``, ``learning_rate``, ...) and LLaMA-Factory's names as aliases (``pref_beta``,
``pref_loss``, ``cutoff_len``, ...), so an existing TRL script or LLaMA-Factory YAML runs with few or no edits.
Defaults follow TRL 1.16 except where a field's description says otherwise (``bf16``, ``gradient_checkpointing``,
``output_dir``, ``do_train``, ...).

Every field of TRL's ``DPOConfig`` is a field here, and :data:`FIELD_POLICY` says, one line per field, what preftune
does with it: implements it, leaves it to the trainer (which implements it), ignores it because it cannot matter here
(with the reason), or accepts it only at its default ("not supported yet: KEY=VALUE" otherwise, never silently
ignored). Keys of LLaMA-Factory (and of older transformers) that are not fields are listed in
:data:`OTHER_KNOWN_KEYS`: accepted at their default, refused by name otherwise. Only a key found in neither is an
"unknown key", with a suggestion.

Every way of building a config reports problems as :class:`~preftune.errors.ConfigError` naming the key, the
file (when there is one), the value given and what was expected:

* ``DPOConfig(beta=0.2, ...)`` - the Python API, like TRL's ``DPOConfig(...)``;
* :func:`load_config` - a YAML file plus ``key=value`` overrides (``preftune train cfg.yaml beta=0.2``);
* :meth:`DPOConfig.from_mapping` - any mapping, e.g. one already read from YAML;
* ``HfArgumentParser(DPOConfig)`` / TRL's ``TrlParser`` - ``DPOConfig`` looks like a dataclass to them
  (``dataclasses.fields(DPOConfig)`` lists its command-line fields, see :func:`flag_fields`), so TRL's own scripts
  (``trl/scripts/dpo.py``) parse their flags and ``--config`` files into it.

Relative paths (``model_name_or_path``, ``dataset_dir``, ``output_dir``, ...) are kept as given and resolve against
the current directory, as in LLaMA-Factory; nothing here checks that files exist (the data and model layers do).
"""

from __future__ import annotations

import contextvars
import importlib.util
import dataclasses
import difflib
import enum
import json
import logging
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from preftune.errors import ConfigError, is_valid_unicode

logger = logging.getLogger(__name__)

__all__ = [
    "DPOConfig",
    "FIELD_POLICY",
    "FieldPolicy",
    "OTHER_KNOWN_KEYS",
    "SUPPORTED_LOSS_TYPES",
    "SUPPORTED_LR_SCHEDULERS",
    "canonical_key",
    "config_table_markdown",
    "flag_fields",
    "interval_to_steps",
    "load_config",
    "parse_overrides",
]

# --------------------------------------------------------------------------------------------------------------------
# Value sets

# Every name registered in preftune.losses.LOSSES (a test keeps the two in sync).
SUPPORTED_LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "listwise", "orpo", "simpo", "cpo", "kto",
)  # fmt: skip
# Loss names known from TRL / LLaMA-Factory that preftune does not implement; refused with "not supported yet".
LATER_LOSS_TYPES = ("kto_pair",)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# transformers.SchedulerType values (kept in sync by a test). The first group works with transformers.get_scheduler
# given warmup and total steps (plus `lr_scheduler_kwargs`); the second needs arguments or evaluation metrics that
# preftune does not pass yet.
SUPPORTED_LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)  # fmt: skip
LATER_LR_SCHEDULERS = (
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "reduce_lr_on_plateau", "greedy",
)  # fmt: skip
LrSchedulerName = Literal[SUPPORTED_LR_SCHEDULERS + LATER_LR_SCHEDULERS]  # type: ignore[valid-type]

# transformers.training_args.OptimizerNames values (kept in sync by a test); preftune runs the first three.
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")
OPTIMIZER_NAMES = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)  # fmt: skip
OptimizerName = Literal[OPTIMIZER_NAMES + ("adamw_hf",)]  # type: ignore[valid-type]

# Values of `fsdp` (transformers' option words) preftune runs.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap")

# Experiment trackers of `report_to` (transformers' callbacks the trainer drives).
SUPPORTED_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")

# transformers' log level names and their `logging` levels (-1: leave the level as it is).
LOG_LEVELS = {"detail": 10, "debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50, "passive": -1}
LogLevelName = Literal[tuple(LOG_LEVELS)]  # type: ignore[valid-type]

# LLaMA-Factory's `flash_attn` values and the `attn_implementation` each stands for (None: the model's default).
FLASH_ATTN_IMPLEMENTATIONS = {
    "auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2", "fa3": "flash_attention_3",
}  # fmt: skip

# LLaMA-Factory stages that are not preference tuning (preftune runs stages dpo and kto), and what to write instead
# for the stage names older LLaMA-Factory examples used for reference-free losses.
OTHER_STAGES = ("pt", "sft", "rm", "ppo")
STAGES_NOW_LOSSES = {"orpo": "orpo", "simpo": "simpo"}

# Keys of `model_init_kwargs` that `from_pretrained` takes offline and preftune passes on, with the value kinds.
MODEL_INIT_KEYS: dict[str, str] = {
    "revision": "string",
    "trust_remote_code": "bool",
    "attn_implementation": "string",
    "dtype": "dtype",
    "torch_dtype": "dtype",
    "device_map": "device_map",
    "low_cpu_mem_usage": "bool",
    "use_safetensors": "bool",
    "variant": "string",
    "subfolder": "string",
    "cache_dir": "string",
    "local_files_only": "bool",
}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")

# Keys of `gradient_checkpointing_kwargs`: `use_reentrant` (transformers) and torch.utils.checkpoint's options.
GRADIENT_CHECKPOINTING_KEYS = ("use_reentrant", "preserve_rng_state", "determinism_check", "debug")

# Fields typed `dict | str | None`: a string starting with "{" is read as JSON (as TrainingArguments does).
_DICT_FIELDS = (
    "model_init_kwargs", "lr_scheduler_kwargs", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs",
    "accelerator_config", "fsdp_config", "deepspeed",
)  # fmt: skip
# Strategy fields: YAML 1.1 reads `no` as false, which means "no" here.
_STRATEGY_FIELDS = ("eval_strategy", "save_strategy", "logging_strategy")
# Fields whose value is a secret: to_dict() shows a placeholder.
_SECRET_FIELDS = ("hub_token",)

# --------------------------------------------------------------------------------------------------------------------
# What preftune does with each field: one line per field


PREFTUNE = "preftune"  # implemented (by the config, the data layer or the trainer)
TRAINER = "trainer"  # accepted here; the trainer implements it as the note says
NO_OP = "no-op"  # accepted at any value: it cannot change a preftune run (the note says why)
LATER = "not supported yet"  # accepted at its default (and `accepted`); any other value is refused by name


@dataclass(frozen=True)
class FieldPolicy:
    """What preftune does with one config field.

    Attributes:
        kind: PREFTUNE, TRAINER, NO_OP or LATER.
        note: for TRAINER the semantics (as transformers/TRL define them), for NO_OP why it cannot matter, for LATER
            a hint shown with the refusal.
        accepted: for LATER, the values accepted besides the field's default (each has no effect).
    """

    kind: str
    note: str = ""
    accepted: tuple[Any, ...] = ()


_P = FieldPolicy(PREFTUNE)


def _T(note: str) -> FieldPolicy:
    return FieldPolicy(TRAINER, note)


def _N(note: str) -> FieldPolicy:
    return FieldPolicy(NO_OP, note)


def _L(*accepted: Any, hint: str = "") -> FieldPolicy:
    return FieldPolicy(LATER, hint, tuple(accepted))


_PUSH = "read only when pushing to the Hub, which is not supported yet (push_to_hub)"
_NO_LOADER = "preftune batches pre-tokenized rows in the main process; there is no DataLoader"
_NO_PREDICTIONS = "preftune's evaluation gathers no predictions, only summed metrics"

# One entry per field of DPOConfig (a test keeps it equal to the schema and covering every field of TRL 1.16's
# DPOConfig). Fields not named here by TRL are preftune's or LLaMA-Factory's.
FIELD_POLICY: dict[str, FieldPolicy] = {
    # ---- model
    "model_name_or_path": _P,
    "model_revision": _P,
    "ref_model_name_or_path": _P,
    "tokenizer_name_or_path": _P,
    "trust_remote_code": _P,
    "torch_dtype": _P,
    "model_init_kwargs": _T("from_pretrained_kwargs(): pass to every from_pretrained of policy and reference"),
    "flash_attn": _T("from_pretrained_kwargs()['attn_implementation']"),
    "finetuning_type": _P,
    "freeze_vision_tower": _P,
    "freeze_multi_modal_projector": _P,
    "stage": _P,
    "do_train": _P,
    "do_eval": _P,
    "do_predict": _N("a flag for scripts; preftune has no predict step (transformers does not read it either)"),
    # ---- data
    "dataset": _P,
    "dataset_dir": _P,
    "eval_dataset": _P,
    "val_size": _P,
    "template": _P,
    "enable_thinking": _P,
    "media_dir": _P,
    "image_max_pixels": _P,
    "image_min_pixels": _P,
    "max_samples": _P,
    "max_length": _P,
    "truncation_mode": _P,
    "on_bad_row": _P,
    "dataset_num_proc": _P,
    "overwrite_cache": _P,
    "data_seed": _T("seed of the data order (shuffling); None: `seed`"),
    "pad_to_multiple_of": _L(None, "auto"),
    "pad_token": _L(hint="TRL deprecated it: set tokenizer.pad_token and pass the tokenizer instead"),
    "max_prompt_length": _L(hint="TRL 1.x removed it; use max_length, which bounds prompt + completion"),
    "max_completion_length": _L(hint="TRL 1.x removed it; use max_length, which bounds prompt + completion"),
    "remove_unused_columns": _N("preftune reads only the columns it needs, whatever the value"),
    "label_names": _N("preference rows have no label column; " + _NO_PREDICTIONS),
    "length_column_name": _N("read only by group_by_length sampling, which preftune does not do"),
    "train_sampling_strategy": _L(hint="preftune shuffles the training rows (random)"),
    "dataloader_num_workers": _N(_NO_LOADER),
    "dataloader_pin_memory": _N(_NO_LOADER),
    "dataloader_persistent_workers": _N(_NO_LOADER),
    "dataloader_prefetch_factor": _N(_NO_LOADER),
    "dataloader_multiprocessing_context": _N(_NO_LOADER),
    "dataloader_in_order": _N(_NO_LOADER),
    "dataloader_drop_last": _P,
    # ---- loss
    "beta": _P,
    "loss_type": _P,
    "loss_weights": _P,
    "label_smoothing": _P,
    "f_divergence_type": _P,
    "f_alpha_divergence_coef": _P,
    "rpo_alpha": _P,
    "dpop_lambda": _P,
    "ld_alpha": _P,
    "use_weighting": _P,
    "discopop_tau": _P,
    "simpo_gamma": _P,
    "cpo_alpha": _P,
    "desirable_weight": _P,
    "undesirable_weight": _P,
    "pref_bco_weight": _L(hint="LLaMA-Factory's BCO term"),
    "label_smoothing_factor": _L(hint="transformers' cross-entropy label smoothing; DPO's is label_smoothing"),
    "router_aux_loss_coef": _P,
    # ---- optimisation
    "learning_rate": _P,
    "weight_decay": _P,
    "adam_beta1": _P,
    "adam_beta2": _P,
    "adam_epsilon": _P,
    "optim": _P,
    "optim_args": _L(hint="arguments of optimizers preftune does not run"),
    "optim_target_modules": _L(hint="GaLore/APOLLO optimizers"),
    "per_device_train_batch_size": _P,
    "per_device_eval_batch_size": _P,
    "gradient_accumulation_steps": _P,
    "num_train_epochs": _P,
    "max_steps": _P,
    "lr_scheduler_type": _P,
    "lr_scheduler_kwargs": _T("scheduler_specific_kwargs of transformers.get_scheduler (keys checked here)"),
    "warmup_ratio": _P,
    "warmup_steps": _P,
    "max_grad_norm": _P,
    "seed": _P,
    "full_determinism": _T("transformers.enable_full_determinism(seed) instead of set_seed(seed)"),
    "bf16": _P,
    "fp16": _P,
    "bf16_full_eval": _L(hint="evaluation runs in the training precision"),
    "fp16_full_eval": _L(hint="evaluation runs in the training precision"),
    "tf32": _T("None: leave torch's TF32 setting; True/False: enable/disable TF32 matmuls (CUDA)"),
    "gradient_checkpointing": _P,
    "gradient_checkpointing_kwargs": _T("model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)"),
    "activation_checkpointing": _P,
    "activation_checkpointing_kwargs": _P,
    "disable_dropout": _P,
    "prefix_sharing": _P,
    "padding_free": _P,
    "chunked_lm_head": _P,
    "lm_head_chunk_size": _P,
    "lm_head_chunk_mib": _P,
    "torch_compile": _P,
    "torch_compile_backend": _T("backend= of torch.compile (None: inductor); setting it turns torch_compile on"),
    "torch_compile_mode": _T("mode= of torch.compile; setting it turns torch_compile on"),
    "keep_freed_cpu_memory": _P,
    "max_tokens_per_batch": _P,
    "auto_find_batch_size": _L(hint="set per_device_train_batch_size or max_tokens_per_batch"),
    "use_liger_kernel": _L(),
    "liger_kernel_config": _L(),
    "use_cache": _N("training forwards never use a KV cache (TRL's DPOTrainer ignores it too)"),
    "neftune_noise_alpha": _L(),
    "torch_empty_cache_steps": _T("every N optimizer steps, empty the accelerator's cache (torch.cuda.empty_cache)"),
    "activation_offloading": _P,
    "average_tokens_across_devices": _N(
        "the losses are means over pairs and preftune scales gradients to the exact mean over all processes' pairs"
    ),
    # ---- logging, evaluation, saving
    "logging_strategy": _T("no: no training logs; steps: every logging_steps; epoch: at each epoch end"),
    "logging_steps": _P,
    "logging_first_step": _P,
    "logging_nan_inf_filter": _N("a non-finite loss stops or skips the step (nonfinite_loss); none is ever logged"),
    "log_on_each_node": _N("read only by should_log; preftune logs from the main process"),
    "log_level": _T("the transformers logging level of the main process (passive: leave it)"),
    "log_level_replica": _T("the transformers logging level of the other processes (passive: leave it)"),
    "disable_tqdm": _T("no progress bar when true; None: true when the root logger is above WARNING"),
    "include_num_input_tokens_seen": _T("log num_input_tokens_seen: 'all' input tokens or 'non_padding' ones"),
    "skip_memory_metrics": _N("preftune always records the peak memory in summary.json (it costs nothing)"),
    "report_to": _T("drive transformers' TensorBoard/W&B/MLflow/Trackio callbacks with this config"),
    "logging_dir": _T("TensorBoard folder; None: resolved_logging_dir()"),
    "run_name": _P,
    "project": _T("the tracker project name (read by Trackio's callback)"),
    "trackio_space_id": _L(hint="Trackio logs locally; deploying it to a Space needs the network"),
    "trackio_bucket_id": _L(hint="Trackio logs locally; a storage bucket needs the network"),
    "trackio_static_space_id": _L(False, hint="Trackio logs locally; a static Space needs the network"),
    "eval_strategy": _P,
    "eval_steps": _P,
    "eval_delay": _T("no evaluation before this many steps (eval_strategy steps) or epochs (epoch)"),
    "eval_on_start": _T("evaluate once before the first training step, logged at step 0"),
    "prediction_loss_only": _N(_NO_PREDICTIONS),
    "eval_do_concat_batches": _N(_NO_PREDICTIONS),
    "eval_use_gather_object": _N(_NO_PREDICTIONS),
    "eval_accumulation_steps": _N(_NO_PREDICTIONS),
    "include_for_metrics": _L(hint="preftune takes no compute_metrics"),
    "batch_eval_metrics": _L(hint="preftune takes no compute_metrics"),
    "save_strategy": _P,
    "save_steps": _P,
    "save_total_limit": _P,
    "save_only_model": _P,
    "save_on_each_node": _L(hint="several nodes without a shared file system"),
    "enable_jit_checkpoint": _L(hint="checkpoints are written every save_steps"),
    "load_best_model_at_end": _T("keep the best checkpoint (never rotated away) and load it at the end of training"),
    "metric_for_best_model": _T("the eval metric that ranks checkpoints ('eval_' prefixed when missing)"),
    "greater_is_better": _T("whether a larger metric_for_best_model is better"),
    "output_dir": _P,
    "overwrite_output_dir": _P,
    "plot_loss": _P,
    "resume_from_checkpoint": _P,
    "resume_with_changed_settings": _P,
    "ignore_data_skip": _L(hint="a resumed run continues at the exact data position"),
    "restore_callback_states_from_checkpoint": _L(hint="preftune's DPOTrainer takes no callbacks"),
    "nonfinite_loss": _P,
    # ---- Hub
    "push_to_hub": _L(),
    "hub_model_id": _L(),
    "hub_token": _N(_PUSH),
    "hub_private_repo": _N(_PUSH),
    "hub_strategy": _N(_PUSH),
    "hub_always_push": _N(_PUSH),
    "hub_revision": _N(_PUSH),
    # ---- processes
    "ddp_timeout": _P,
    "ddp_find_unused_parameters": _T("find_unused_parameters of DDP (None: DDP's default, false)"),
    "ddp_bucket_cap_mb": _T("bucket_cap_mb of DDP (None: torch's default)"),
    "ddp_broadcast_buffers": _T("broadcast_buffers of DDP (None: preftune's False)"),
    "ddp_static_graph": _T("static_graph of DDP (None: torch's default)"),
    "ddp_backend": _L(hint="accelerate chooses the backend (nccl on GPUs, gloo on CPUs)"),
    "local_rank": _N("preftune reads LOCAL_RANK from the environment (torchrun, accelerate launch)"),
    "fsdp": _P,
    "fsdp_config": _L({}, hint="preftune wraps each decoder layer; use fsdp: full_shard or shard_grad_op"),
    "deepspeed": _P,
    "accelerator_config": _L({}),
    "parallelism_config": _L(hint="use fsdp or deepspeed"),
    "nproc": _P,
    "use_cpu": _P,
    "debug": _L([], hint="transformers' underflow/overflow and TPU debugging"),
    # ---- LoRA (LLaMA-Factory's keys; TRL scripts give these through ModelConfig and peft_config)
    "lora_rank": _P,
    "lora_alpha": _P,
    "lora_dropout": _P,
    "lora_target": _P,
    "quantization_bit": _P,
    # ---- reference model
    "precompute_ref_log_probs": _P,
    "precompute_ref_batch_size": _P,
    "sync_ref_model": _P,
    "ref_model_mixup_alpha": _P,
    "ref_model_sync_steps": _P,
    # ---- iterative DPO
    "loop": _P,
}

# preftune fields that are not command-line flags of DPOConfig: TRL scripts take the model, its dtype and LoRA from
# TRL's ModelConfig (whose flags `--model_name_or_path`, `--lora_alpha`, `--lora_dropout`, `--dtype` would collide or
# say the same thing twice). They stay settable from YAML and Python.
NOT_FLAGS = frozenset({
    "loop", "model_name_or_path", "model_revision", "torch_dtype", "finetuning_type", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_target", "quantization_bit",
})  # fmt: skip

# --------------------------------------------------------------------------------------------------------------------
# Keys that are not fields: LLaMA-Factory's (v0 and v1 formats) and older transformers' TrainingArguments. Each is
# accepted at its default (where it has no effect) and refused by name otherwise, so a LLaMA-Factory YAML never fails
# with "unknown key". (Defaults as in LLaMA-Factory's hparams and transformers 4.55.)


class _AnyValue:
    """Marks a known key accepted at any value (it cannot matter to a preftune run)."""

    def __repr__(self) -> str:
        return "any value"


ANY_VALUE = _AnyValue()


@dataclass(frozen=True)
class KnownKey:
    """A key that is not a DPOConfig field: ``accepted`` values are ignored, any other is refused with ``hint``."""

    accepted: tuple[Any, ...]
    hint: str


def _known(hint: str, **defaults: Any) -> dict[str, KnownKey]:
    """Known keys sharing one hint; a tuple value lists several accepted values."""
    return {
        key: KnownKey(value if isinstance(value, tuple) else (value,), hint) for key, value in defaults.items()
    }


_VISION = "vision-language DPO takes images only, with image_max_pixels, image_min_pixels and the freeze_* keys"
_LF = "LLaMA-Factory"

OTHER_KNOWN_KEYS: dict[str, KnownKey] = {
    **_known(
        _VISION,
        image_do_pan_and_scan=False, crop_to_patches=False, use_audio_in_video=False, audio_sampling_rate=16000,
        freeze_language_model=False,
    ),  # fmt: skip
    **_known(  # LLaMA-Factory's VLM examples set them; they act on video inputs only, which the data refuses
        "video inputs only: video columns stop the run", video_max_pixels=ANY_VALUE, video_min_pixels=ANY_VALUE,
        video_fps=ANY_VALUE, video_maxlen=ANY_VALUE,
    ),  # fmt: skip
    **_known(
        f"{_LF} model loading",
        adapter_name_or_path=None, adapter_folder=None, cache_dir=None, use_fast_tokenizer=True, resize_vocab=False,
        split_special_tokens=False, add_tokens=None, add_special_tokens=None, new_special_tokens_config=None,
        init_special_tokens="noise_init", rope_scaling=None, shift_attn=False, mixture_of_depths=None,
        use_unsloth=False, use_unsloth_gc=False, use_reentrant_gc=True, upcast_layernorm=False,
        upcast_lmhead_output=False, train_from_scratch=False, offload_folder="offload", use_v1_kernels=(False, None),
        print_param_status=False, quantization_method="bnb", quantization_type="nf4", double_quantization=True,
        quantization_device_map=None, compute_dtype=None, device_map=None, model_max_length=None,
        block_diag_attn=False, use_kt=False, kt_cpu_activation=None, kt_weight_path=None,
        kt_non_expert_weight_path=None, kt_expert_checkpoint_path=None, kt_use_lora_experts=None,
        kt_lora_expert_num=None, kt_lora_expert_intermediate_size=None, kt_config=None,
    ),  # fmt: skip
    **_known(
        "has no effect on training",
        low_cpu_mem_usage=ANY_VALUE, hf_hub_token=ANY_VALUE, ms_hub_token=ANY_VALUE, om_hub_token=ANY_VALUE,
        push_to_hub_token=ANY_VALUE, preprocessing_batch_size=ANY_VALUE, infer_backend=ANY_VALUE,
        infer_dtype=ANY_VALUE, use_kv_cache=ANY_VALUE, do_sample=ANY_VALUE, temperature=ANY_VALUE, top_p=ANY_VALUE,
        top_k=ANY_VALUE, num_beams=ANY_VALUE, max_new_tokens=ANY_VALUE, repetition_penalty=ANY_VALUE,
        length_penalty=ANY_VALUE, skip_special_tokens=ANY_VALUE, batching_workers=ANY_VALUE,
        sample_backend=ANY_VALUE,
    ),  # fmt: skip
    **_known(
        f"{_LF} export and inference",
        export_dir=None, export_size=5, export_device="cpu", export_quantization_bit=None,
        export_quantization_dataset=None, export_quantization_nsamples=128, export_quantization_maxlen=1024,
        export_legacy_format=False, export_hub_model_id=None, vllm_maxlen=4096, vllm_gpu_util=0.7,
        vllm_enforce_eager=False, vllm_max_lora_rank=32, vllm_config=None, sglang_maxlen=4096, sglang_mem_fraction=0.7,
        sglang_tp_size=-1, sglang_config=None, sglang_lora_backend="triton",
    ),  # fmt: skip
    **_known(
        f"{_LF} adapters other than LoRA, and LoRA variants",
        freeze_trainable_layers=2, freeze_trainable_modules="all", freeze_extra_modules=None, additional_target=None,
        loraplus_lr_ratio=None, loraplus_lr_embedding=1e-6, use_rslora=False, use_dora=False, pissa_init=False,
        pissa_iter=16, pissa_convert=False, create_new_adapter=False, module_dropout=0.0, oft_rank=0,
        oft_block_size=32, oft_target="all", use_llama_pro=False,
    ),  # fmt: skip
    **_known(
        f"{_LF} stages other than dpo and kto",
        ppo_buffer_size=1, ppo_epochs=4, ppo_score_norm=False, ppo_target=6.0, ppo_whiten_rewards=False,
        ref_model_adapters=None, ref_model_quantization_bit=None, reward_model=None, reward_model_adapters=None,
        reward_model_quantization_bit=None, reward_model_type="lora", use_dft_loss=False, use_asft_loss=False,
        asft_alpha=0.1, use_eaft_loss=False, eaft_alpha=1.0, compute_accuracy=False, train_on_prompt=False,
        mask_history=False, eval_num_beams=None, ignore_pad_token_for_loss=True, predict_with_generate=False,
        sortish_sampler=False, generation_max_length=None, generation_num_beams=None, generation_config=None,
    ),  # fmt: skip
    **_known(
        f"{_LF} optimizers",
        use_galore=False, galore_target="all", galore_rank=16, galore_update_interval=200, galore_scale=2.0,
        galore_proj_type="std", galore_layerwise=False, use_apollo=False, apollo_target="all", apollo_rank=16,
        apollo_update_interval=200, apollo_scale=32.0, apollo_proj="random", apollo_proj_type="std",
        apollo_scale_type="channel", apollo_layerwise=False, apollo_scale_front=False, use_badam=False,
        badam_mode="layer", badam_start_block=None, badam_switch_mode="ascending", badam_switch_interval=50,
        badam_update_ratio=0.05, badam_mask_mode="adjacent", badam_verbose=0, use_adam_mini=False, use_muon=False,
        pure_bf16=False, fp8=False, fp8_backend="auto", fp8_enable_fsdp_float8_all_gather=False, adafactor=False,
    ),  # fmt: skip
    **_known(
        f"{_LF} data options",
        streaming=False, buffer_size=16384, mix_strategy="concat", interleave_probs=None, eval_on_each_dataset=False,
        packing=(None, False), neat_packing=False, tool_format=None, default_system=None,
        preserve_thinking=False, tokenized_path=None, data_shared_file_system=False, disable_shuffling=False,
    ),  # fmt: skip
    **_known(
        f"{_LF} trackers, profiling and launchers",
        use_swanlab=False, swanlab_project="llamafactory", swanlab_workspace=None, swanlab_run_name=None,
        swanlab_mode="cloud", swanlab_api_key=None, swanlab_logdir=None, swanlab_lark_webhook_url=None,
        swanlab_lark_secret=None, early_stopping_steps=None, include_effective_tokens_per_second=False,
        ray_num_workers=1, ray_init_kwargs=None, master_addr=None, master_port=None, enable_torch_profiler=False,
        profiler_output_dir=None, profiler_wait_steps=1, profiler_warmup_steps=1, profiler_active_steps=1,
        profiler_repeat=1, profiler_record_shapes=True, profiler_profile_memory=True, profiler_with_stack=True,
        profile_modules=None,
    ),  # fmt: skip
    **_known(
        f"{_LF}'s Megatron-Core and hyper-parallel training",
        use_mca=False, use_megatron_bridge=False, megatron_bridge_args=None, use_hyper_parallel=False,
        hyper_parallel_args=None, hyper_parallel_cp_size=1, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, expert_model_parallel_size=1, context_parallel_size=1, sequence_parallel=False,
        use_distributed_optimizer=False, apply_rope_fusion=False, bias_activation_fusion=False,
        moe_grouped_gemm=False, moe_token_dispatcher_type=None, overlap_grad_reduce=False, overlap_param_gather=False,
        recompute_granularity=None, export_hf_on_finish=False, mixed_precision=None, use_packed_sequences=False,
    ),  # fmt: skip
    **_known(
        f"{_LF} v1 format",
        model_class="llm", init_config=None, kernel_config=None, custom_chat_template=None, global_batch_size=None,
        batching_strategy="normal", dp_size=None, cp_size=1, cp_mode="ulysses", mp_replicate_size=1,
        mp_shard_size=None, save_epochs=None, save_ckpt_as_hf=False,
    ),  # fmt: skip
    **_known("LLaMA-Factory v1 format: write finetuning_type: lora with lora_rank, lora_alpha, lora_target", peft_config=None),
    **_known("LLaMA-Factory v1 format: write quantization_bit", quant_config=None),
    **_known("LLaMA-Factory v1 data files are not read; use dataset", train_dataset=None),
    **_known("LLaMA-Factory v1 format: use fsdp or deepspeed", dist_config=None),
    **_known("LLaMA-Factory v1 format: use optim and adam_beta1/adam_beta2/weight_decay", optim_config=None),
    **_known("LLaMA-Factory v1 format: use lr_scheduler_type and lr_scheduler_kwargs", lr_scheduler_config=None),
    **_known(
        "an option of older transformers",
        fp16_backend="auto", fp16_opt_level="O1", half_precision_backend="auto", fsdp_min_num_params=0,
        fsdp_transformer_layer_cls_to_wrap=None, group_by_length=False, include_inputs_for_metrics=False,
        include_tokens_per_second=False, jit_mode_eval=False, mp_parameters="", past_index=-1,
        push_to_hub_model_id=None, push_to_hub_organization=None, ray_scope="last", torchdynamo=None,
        tpu_metrics_debug=False, tpu_num_cores=None, use_ipex=False, use_legacy_prediction_loop=False,
        use_mps_device=False, save_safetensors=True,
    ),  # fmt: skip
    **_known(
        "an option of older transformers: use per_device_train_batch_size / per_device_eval_batch_size",
        per_gpu_train_batch_size=None, per_gpu_eval_batch_size=None,
    ),  # fmt: skip
}

# Keys meaning the opposite of a boolean field.
INVERTED_ALIASES = {"disable_gradient_checkpointing": "gradient_checkpointing"}

# Suggestions for names other frameworks use (tried before spelling-based matching).
_SYNONYMS = {
    "lr": "learning_rate", "learningrate": "learning_rate", "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size", "eval_batch_size": "per_device_eval_batch_size",
    "bs": "per_device_train_batch_size", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
    "steps": "max_steps", "total_steps": "max_steps", "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps", "accumulation_steps": "gradient_accumulation_steps",
    "warmup": "warmup_steps", "scheduler": "lr_scheduler_type", "lr_scheduler": "lr_scheduler_type",
    "optimizer": "optim", "model_path": "model_name_or_path", "base_model": "model_name_or_path",
    "tokenizer": "tokenizer_name_or_path", "output": "output_dir", "out_dir": "output_dir", "save_dir": "output_dir",
    "data": "dataset", "train_file": "dataset", "train_data": "dataset", "eval_file": "eval_dataset",
    "max_seq_length": "max_length", "max_seq_len": "max_length", "seq_len": "max_length", "loss": "loss_type",
    "grad_clip": "max_grad_norm", "clip_grad_norm": "max_grad_norm", "precision": "bf16",
    "lora_r": "lora_rank", "lora_target_modules": "lora_target", "ref_model_path": "ref_model_name_or_path",
}  # fmt: skip

# --------------------------------------------------------------------------------------------------------------------
# Field helpers


def _field(
    default: Any, description: str, *, aliases: Sequence[str] = (), flag: Mapping[str, Any] | None = None, **bounds: Any
) -> Any:
    """A config field; ``aliases`` are other accepted spellings (LLaMA-Factory's names); ``flag`` holds argparse
    settings of its command-line flag (``nargs``/``const``, or ``default`` for list flags)."""
    extra: dict[str, Any] = {"aliases": list(aliases)}
    if flag:
        extra["flag"] = dict(flag)
    return Field(default, description=description, json_schema_extra=extra, **bounds)


def _format_default(value: Any) -> str:
    """A default written the way YAML would spell it (null, true, "none", [])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _format_value(value: Any, limit: int = 80) -> str:
    """A value as a user wrote it, for messages: true/null/strings bare; other values as JSON (CJK kept as is)."""
    if value is None or isinstance(value, bool):
        text = _format_default(value)
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------------
# Where the values being validated come from, so that validators can name the file and the key as the user wrote it.


@dataclass
class _Source:
    file: str | None = None
    cli_keys: frozenset[str] = frozenset()
    given_names: dict[str, str] = field(default_factory=dict)  # canonical name -> name as written
    assigning: str | None = None  # the field being assigned (validate_assignment), or None while constructing


_SOURCE: contextvars.ContextVar[_Source | None] = contextvars.ContextVar("preftune_config_source", default=None)


def _error(message: str, key: str | None) -> ConfigError:
    """A ConfigError for canonical ``key`` naming the spelling the user wrote and where it came from."""
    source = _SOURCE.get() or _Source()
    given = source.given_names.get(key, key) if key else None
    if given is not None and given in source.cli_keys:
        return ConfigError(f"{message} (from a command-line override)", key=given)
    return ConfigError(message, key=given, file=source.file)


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------------
# The schema


class DPOConfig(BaseModel):
    """Every setting of a preftune DPO run; keyword names as in TRL's ``DPOConfig``.

    Build it from Python (``DPOConfig(output_dir="out", beta=0.1)``), from a mapping (:meth:`from_mapping`), from
    YAML (:func:`load_config`) or with transformers' ``HfArgumentParser`` / TRL's ``TrlParser`` (it presents its
    command-line fields as dataclass fields). Aliases (LLaMA-Factory names) are accepted on input and mapped to the
    canonical name; attributes and :meth:`to_dict` use canonical names only. Any invalid key or value raises
    :class:`~preftune.errors.ConfigError` (a ``ValueError``); assignment to a field is validated the same way.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,  # `run_name: 2024` or `template: 123` become strings, as YAML users expect
    )

    _config_file: str | None = PrivateAttr(default=None)
    _logging_dir: str | None = PrivateAttr(default=None)

    # ---- Model -----------------------------------------------------------------------------------------------------
    model_name_or_path: str | None = _field(
        None,
        "Policy model: a local directory or a Hub id (loaded with `AutoModelForCausalLM.from_pretrained`).",
        aliases=["model"],
    )
    model_revision: str = _field("main", "Revision (branch, tag or commit) of `model_name_or_path` to load.")
    ref_model_name_or_path: str | None = _field(
        None,
        "Reference model; `null` uses a frozen copy of the policy at its starting weights.",
        aliases=["ref_model"],
    )
    tokenizer_name_or_path: str | None = _field(None, "Tokenizer to load; `null` uses `model_name_or_path`.")
    trust_remote_code: bool = _field(False, "Allow models and tokenizers that ship their own Python code.")
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = _field(
        None,
        "Dtype the weights are loaded in; `null` loads float32, `auto` uses the checkpoint's dtype.",
        aliases=["dtype"],
    )
    model_init_kwargs: dict[str, Any] | str | None = _field(
        None,
        "Keyword arguments for `from_pretrained` of the policy and the reference (a dict, or a JSON string on the "
        "command line): " + ", ".join(f"`{key}`" for key in MODEL_INIT_KEYS) + ". A `null` value means unset; "
        "`dtype` and `trust_remote_code` must agree with `torch_dtype` and `trust_remote_code` when both are set.",
    )
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "fa3", "eager", "flash_attention_2"] = _field(
        "auto",
        "Attention implementation (LLaMA-Factory): `auto` (the model's default), `disabled` (eager), `sdpa`, `fa2`, "
        "`fa3` (FlashAttention 2/3, CUDA only).",
    )
    finetuning_type: Literal["full", "lora", "freeze"] = _field(
        "full",
        "Which weights are trained (LLaMA-Factory): `full`, or `lora` (a LoRA adapter via peft; the reference is then "
        "the same model with the adapter disabled). `freeze` is refused (not supported yet).",
    )
    stage: Literal["dpo", "kto"] = _field(
        "dpo",
        "Training stage (LLaMA-Factory): `dpo`, or `kto` (the same as `loss_type: kto`). `orpo`/`simpo` (older "
        "LLaMA-Factory) are written `stage: dpo` with `pref_loss: orpo`/`simpo`; other stages are refused.",
    )
    do_train: bool = _field(
        True, "Train the model (LLaMA-Factory); `false` skips training. transformers defaults to false but ignores it."
    )
    do_eval: bool = _field(
        False, "Evaluate on the evaluation split at the end of training even when `eval_strategy` is `no`."
    )
    do_predict: bool = _field(False, "A flag for training scripts (transformers).")

    # ---- Data ------------------------------------------------------------------------------------------------------
    dataset: str | None = _field(
        None,
        "Training data: a file, a directory, or dataset name(s) in `dataset_dir`'s `dataset_info.json` "
        "(comma-separated for several, as in LLaMA-Factory).",
    )
    dataset_dir: str | None = _field(
        None, "Folder holding the data files and LLaMA-Factory's `dataset_info.json`; `null` uses the current folder."
    )
    eval_dataset: str | None = _field(
        None, "Evaluation data, given like `dataset`; `null` means none (see `val_size`)."
    )
    val_size: float = _field(
        0.0,
        "Hold out part of the training data for evaluation: a fraction in [0, 1) or a whole number of rows (>= 1). "
        "Used when `eval_dataset` is `null`.",
        ge=0,
    )
    template: str | None = _field(
        None, "Prompt template name (LLaMA-Factory, e.g. `qwen`); `null` uses the tokenizer's chat template."
    )
    enable_thinking: bool = _field(
        True,
        "Reasoning templates (`template: qwen3`, ...; LLaMA-Factory): a response without a thought is trained with an "
        "empty `<think>` block in front (true), or the empty block goes into the prompt (false).",
    )
    media_dir: str | None = _field(
        None, "Folder that relative image paths in the data resolve against; `null`: `dataset_dir`, else the data "
        "file's folder (LLaMA-Factory's `media_dir`).",
    )
    image_max_pixels: int = _field(
        768 * 768, "Vision-language models: images with more pixels are scaled down to this many before the image "
        "processor, whose own limits then apply too (LLaMA-Factory's rule; on a processor preftune loads from the "
        "model folder, not on one given as `processing_class`).", ge=1,
    )
    image_min_pixels: int = _field(
        32 * 32, "Vision-language models: images with fewer pixels are scaled up to this many (as "
        "`image_max_pixels`).", ge=1,
    )
    max_samples: int | None = _field(None, "Use at most this many training rows; `null` uses all.", ge=1)
    max_length: int | None = _field(
        1024,
        "Maximum tokens of prompt + completion per sequence; longer sequences are truncated per `truncation_mode` "
        "(with `template:`, as LLaMA-Factory 0.9.5 does). `null` disables truncation. (LLaMA-Factory's `cutoff_len` "
        "default is 2048; TRL's and preftune's is 1024.)",
        aliases=["cutoff_len"],
        ge=1,
    )
    truncation_mode: Literal["keep_start", "keep_end"] = _field(
        "keep_start",
        "Which end of an over-long sequence is kept without `template:`: `keep_start` drops tokens from the end, "
        "`keep_end` from the prompt's start. With `template:` sequences are cut as LLaMA-Factory does (`keep_end` is "
        "refused).",
    )
    on_bad_row: Literal["error", "skip", "warn"] = _field(
        "error",
        "A malformed data row: `error` stops naming file and row; `skip` drops it; `warn` drops it with a warning.",
    )
    dataset_num_proc: int | None = _field(
        None,
        "Processes used to tokenize the dataset; `null` uses one.",
        aliases=["preprocessing_num_workers"],
        ge=1,
    )
    overwrite_cache: bool = _field(False, "Re-tokenize instead of reusing a cached tokenized dataset.")
    data_seed: int | None = _field(None, "Seed of the data order (shuffling); `null` uses `seed`.", ge=0)
    pad_to_multiple_of: int | str | None = _field(
        None, "Pad sequences to a multiple of this length (TRL's default `auto` is accepted)."
    )
    pad_token: str | None = _field(None, "Padding token (deprecated in TRL).")
    max_prompt_length: int | None = _field(None, "Maximum prompt length (removed in TRL 1.x).")
    max_completion_length: int | None = _field(None, "Maximum completion length (removed in TRL 1.x).")
    remove_unused_columns: bool = _field(True, "Drop dataset columns the model does not use (transformers).")
    label_names: list[str] | None = _field(None, "Input keys holding the labels (transformers).")
    length_column_name: str = _field("length", "Column of precomputed lengths for `group_by_length` (transformers).")
    train_sampling_strategy: Literal["random", "sequential", "group_by_length"] = _field(
        "random", "Order of the training rows (transformers)."
    )
    dataloader_num_workers: int = _field(0, "DataLoader worker processes (transformers).", ge=0)
    dataloader_pin_memory: bool = _field(True, "Pin DataLoader memory (transformers).")
    dataloader_persistent_workers: bool = _field(False, "Keep DataLoader workers alive (transformers).")
    dataloader_prefetch_factor: int | None = _field(None, "Batches prefetched per DataLoader worker (transformers).")
    dataloader_multiprocessing_context: str | None = _field(None, "Start method of DataLoader workers (transformers).")
    dataloader_in_order: bool = _field(True, "Yield batches in the order workers were dispatched (transformers).")
    dataloader_drop_last: bool = _field(False, "Drop the last incomplete training batch of each epoch.")

    # ---- Loss ------------------------------------------------------------------------------------------------------
    beta: float = _field(
        0.1,
        "DPO β: strength of the implicit KL penalty toward the reference model (higher β stays closer). For `ipo` "
        "it is the regularization τ.",
        aliases=["pref_beta"],
        gt=0,
    )
    loss_type: str | list[str] = _field(
        "sigmoid",
        "Preference loss, or a list of them summed with `loss_weights`. With a reference: `sigmoid` (DPO), `robust`, "
        "`hinge` (SLiC), `ipo`, `exo_pair`, `nca_pair`, `bco_pair`, `sppo_hard`, `aot`, `aot_unpaired`, `apo_zero`, "
        "`apo_down`, `discopop`, `sigmoid_norm`, `sft`, `listwise` (several negatives per prompt); without one: "
        "`orpo`, `simpo`, `cpo`; on unpaired data: `kto`. See the README's loss table for formulas.",
        aliases=["pref_loss"],
        flag={"default": ["sigmoid"]},
    )
    loss_weights: list[float] | None = _field(
        None, "Weight of each loss in a `loss_type` list (`null`: all 1).", aliases=["loss_weight"]
    )
    label_smoothing: float = _field(
        0.0,
        "Probability that a preference label is flipped: conservative DPO for `sigmoid`, also `robust`, `exo_pair` "
        "(needs > 0), `aot`, `aot_unpaired`, `simpo`. In [0, 0.5).",
        aliases=["dpo_label_smoothing"],
        ge=0,
        lt=0.5,
    )
    f_divergence_type: Literal[F_DIVERGENCE_TYPES] = _field(  # type: ignore[valid-type]
        "reverse_kl",
        "f-DPO (Wang et al. 2023): divergence whose f′ maps the log-ratios before the loss: `reverse_kl` (plain DPO), "
        "`forward_kl`, `js_divergence`, `alpha_divergence`.",
    )
    f_alpha_divergence_coef: float = _field(0.5, "α of `alpha_divergence` (TRL 1.16 default 0.5).")
    rpo_alpha: float | None = _field(
        None,
        "RPO: weight α of an NLL term on chosen completions, length-averaged (LLaMA-Factory `pref_ftx`, where 0 means "
        "off); logged as `nll_loss`. With kto: LLaMA-Factory's SFT term on the desirable rows.",
        aliases=["pref_ftx"],
        ge=0,
    )
    dpop_lambda: float | None = _field(
        None, "DPO-Positive (Smaug) λ: penalise the chosen log-prob falling below the reference's.", ge=0
    )
    ld_alpha: float | None = _field(
        None, "LD-DPO: weight in [0, 1] of the longer completion's tokens beyond the shorter one's length.", ge=0, le=1
    )
    use_weighting: bool = _field(False, "WPO: weight each pair by how likely the policy is to sample it.")
    discopop_tau: float = _field(0.05, "DiscoPOP temperature τ.", gt=0)
    simpo_gamma: float = _field(0.5, "SimPO target reward margin γ (LLaMA-Factory's name and default).")
    cpo_alpha: float = _field(1.0, "Weight of the NLL term of `cpo`.", ge=0)
    desirable_weight: float = _field(
        1.0, "KTO weight of desirable examples.", aliases=["kto_chosen_weight"], gt=0
    )
    undesirable_weight: float = _field(
        1.0, "KTO weight of undesirable examples.", aliases=["kto_rejected_weight"], gt=0
    )
    pref_bco_weight: float = _field(0.0, "BCO weight mixed into the DPO loss (LLaMA-Factory).")
    label_smoothing_factor: float = _field(0.0, "Label smoothing of transformers' cross-entropy loss.")
    router_aux_loss_coef: float | None = _field(
        None,
        "MoE models: coef × the model's router load-balancing loss added to the policy's loss (train and eval), "
        "logged as `aux_loss`; `null`: the model config's value (as TRL 1.16); 0 disables it; refused for a model "
        "that is not a Mixture of Experts. While it is on, batches use the plain padded layout (TRL's token set).",
        aliases=["moe_aux_loss_coef"],
        ge=0,
    )

    # ---- Optimisation ----------------------------------------------------------------------------------------------
    learning_rate: float = _field(1e-6, "Peak learning rate of AdamW (TRL's DPO default).", ge=0)
    weight_decay: float = _field(0.0, "AdamW (decoupled) weight decay.", ge=0)
    adam_beta1: float = _field(0.9, "AdamW β1.", ge=0, lt=1)
    adam_beta2: float = _field(0.999, "AdamW β2.", ge=0, lt=1)
    adam_epsilon: float = _field(1e-8, "AdamW ε.", ge=0)
    optim: OptimizerName = _field(
        "adamw_torch_fused",
        "Optimizer: `adamw_torch_fused` (TRL 1.16's default: torch's fused AdamW kernel, on CPU too; about 4x faster "
        "than the per-tensor loop for a 20 M model), `adamw_torch` (torch's AdamW, default implementation) or "
        "`adamw_hf` (an alias of `adamw_torch`). Where the fused kernel is unavailable it falls back, with a warning. "
        "transformers' other optimizer names are refused (not supported yet).",
    )
    optim_args: str | None = _field(None, "Extra arguments of some optimizers (transformers).")
    optim_target_modules: None | str | list[str] = _field(None, "Modules GaLore/APOLLO optimize (transformers).")
    per_device_train_batch_size: int = _field(
        8, "Preference pairs per device per micro-batch in training.", aliases=["micro_batch_size"], ge=1
    )
    per_device_eval_batch_size: int = _field(8, "Preference pairs per device per batch in evaluation.", ge=1)
    gradient_accumulation_steps: int = _field(1, "Micro-batches accumulated before each optimizer step.", ge=1)
    num_train_epochs: float = _field(3.0, "Passes over the training data (a fraction stops mid-epoch).", ge=0)
    max_steps: int = _field(-1, "If > 0: total optimizer steps, overriding `num_train_epochs`.")
    lr_scheduler_type: LrSchedulerName = _field(
        "linear",
        "Learning-rate schedule after warmup: " + ", ".join(f"`{name}`" for name in SUPPORTED_LR_SCHEDULERS) + ".",
    )
    lr_scheduler_kwargs: dict[str, Any] | str | None = _field(
        None,
        "Extra arguments of the schedule (transformers' `scheduler_specific_kwargs`, e.g. `{num_cycles: 2}` for "
        "`cosine_with_restarts`, `{power: 2.0}` for `polynomial`); a JSON string on the command line.",
    )
    warmup_ratio: float = _field(
        0.0, "Fraction of total steps of linear warmup; ignored when `warmup_steps` > 0.", ge=0, le=1
    )
    warmup_steps: float = _field(
        0,
        "Linear warmup steps: a whole number (>= 1) of steps, or a fraction in (0, 1) of total steps (transformers 5). "
        "Overrides `warmup_ratio` when > 0.",
        ge=0,
    )
    max_grad_norm: float = _field(1.0, "Clip the gradient norm to this value; 0 disables clipping.", ge=0)
    seed: int = _field(42, "Random seed for model init, data shuffling and dropout.", ge=0)
    full_determinism: bool = _field(
        False, "Deterministic kernels everywhere (`transformers.enable_full_determinism`); slower."
    )
    bf16: bool = _field(
        False,
        "bfloat16 mixed precision. preftune defaults to false; TRL's default `null` (true unless fp16) reads as false.",
    )
    fp16: bool = _field(False, "float16 mixed precision (needs a GPU; the trainer refuses it on CPU).")
    bf16_full_eval: bool = _field(False, "Evaluate in pure bfloat16 (transformers).")
    fp16_full_eval: bool = _field(False, "Evaluate in pure float16 (transformers).")
    tf32: bool | None = _field(
        None, "TF32 matmuls on Ampere or newer GPUs: true/false switches them, `null` leaves torch's setting."
    )
    gradient_checkpointing: bool = _field(
        False,
        "Recompute activations in backward to save memory (TRL defaults to true; preftune to false).",
        aliases=["enable_activation_checkpointing"],
    )
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = _field(
        None,
        "Arguments of gradient checkpointing: " + ", ".join(f"`{key}`" for key in GRADIENT_CHECKPOINTING_KEYS) + ".",
    )
    activation_checkpointing: bool | None = _field(
        None, "transformers 5's name of `gradient_checkpointing`; when set it is the value of both."
    )
    activation_checkpointing_kwargs: dict[str, Any] | str | None = _field(
        None, "transformers 5's name of `gradient_checkpointing_kwargs`; when set it is the value of both."
    )
    disable_dropout: bool = _field(True, "Set every dropout probability in policy and reference models to 0.")
    prefix_sharing: bool | None = _field(
        None,
        "One sequence per pair, prompt | chosen | rejected: the prompt is computed once and each completion attends "
        "to the prompt and itself only (Wang & Hegde 2024), without a T x T mask for llama, mistral, qwen2 and qwen3 "
        "with sdpa attention (a dense mask for eager). Same log-probs as the plain layout. `null` (auto): per batch, "
        "where it does less work than the plain layout (docs/layouts.md), for those models; off otherwise. "
        "Vision-language models (Qwen2-VL, Qwen3-VL, LLaVA with sdpa; Gemma 3 with dense masks): each image is encoded "
        "once per pair.",
    )
    padding_free: bool | None = _field(
        None,
        "Compute no padding: the forward runs row by row, each at its own length (exact). `null` (auto): where "
        "prefix sharing is supported, per batch when its rows average >= 256 tokens (shorter rows run faster "
        "padded). Not with images.",
    )
    chunked_lm_head: bool = _field(
        True,
        "Compute label log-probs from the final hidden states chunk by chunk, with a custom backward: no "
        "batch x length x vocabulary logits tensor. Used for llama, mistral, qwen2 and qwen3 models and the "
        "vision-language qwen2_vl, qwen3_vl, llava and gemma3; other model types fall back to full logits.",
    )
    lm_head_chunk_size: int = _field(
        1024, "Tokens per chunk of the chunked LM head (at most; `lm_head_chunk_mib` lowers it for large vocabularies).",
        ge=1,
    )
    lm_head_chunk_mib: int | None = _field(
        256,
        "Memory budget of one LM-head chunk's float32 logits (tokens x vocabulary x 4 bytes), in MiB: chunks get "
        "fewer than `lm_head_chunk_size` tokens where the vocabulary is large (256 MiB: 1024 tokens up to a 64k "
        "vocabulary, 256 for 256k). `null`: no budget.",
        ge=1,
    )
    torch_compile: bool = _field(
        False,
        "Compile the transformer body of policy and reference with `torch.compile(dynamic=True)` (the LM head stays "
        "eager: it is the chunked head's). Costs a one-off compilation (tens of seconds on CPU, needs a C++ "
        "compiler there); then each step runs faster (see the README's benchmark).",
    )
    torch_compile_backend: str | None = _field(
        None, "`backend` of `torch.compile` (`null`: inductor); setting it turns `torch_compile` on."
    )
    torch_compile_mode: str | None = _field(
        None, "`mode` of `torch.compile` (e.g. `max-autotune`); setting it turns `torch_compile` on."
    )
    keep_freed_cpu_memory: bool = _field(
        True,
        "On CPU (Linux, glibc), make malloc keep freed memory for the next step instead of returning it to the OS and "
        "page-faulting it back (mallopt; process-wide): about 9 % faster steps on the benchmark, same peak memory; "
        "memory freed after the peak stays with the process until it exits.",
    )
    max_tokens_per_batch: int | None = _field(
        None,
        "Token budget per micro-batch (prompt counted once per row with prefix sharing, padding not counted): rows "
        "are sorted by length once and packed greedily into micro-batches within the budget and within "
        "`per_device_train_batch_size`/`per_device_eval_batch_size` pairs; each epoch shuffles these micro-batches. A "
        "pair longer than the budget forms a micro-batch of its own. `null`: batches by pair count only.",
        ge=1,
    )
    auto_find_batch_size: bool = _field(False, "Halve the batch size after out-of-memory errors (transformers).")
    use_liger_kernel: bool = _field(False, "Liger Triton kernels.", aliases=["enable_liger_kernel"])
    liger_kernel_config: dict[str, bool] | None = _field(None, "Which Liger kernels to use.")
    use_cache: bool = _field(False, "Use the model's KV cache in training forwards (TRL).")
    neftune_noise_alpha: float | None = _field(None, "NEFTune noise on the input embeddings (transformers).")
    torch_empty_cache_steps: int | None = _field(
        None, "Empty the accelerator's memory cache every N optimizer steps (less memory, slower); `null`: never.", gt=0
    )
    activation_offloading: bool = _field(
        False,
        "Keep the activations saved for the backward in CPU memory (copied there in the forward, back in the "
        "backward; parameters and tensors under 1 KiB stay): less accelerator memory, slower steps; with "
        "`gradient_checkpointing` only each layer's input moves. No effect on CPU (a warning).",
    )
    average_tokens_across_devices: bool = _field(
        True, "Average the loss over the tokens of all processes (transformers)."
    )

    # ---- Logging, evaluation, saving -------------------------------------------------------------------------------
    logging_strategy: Literal["no", "steps", "epoch"] = _field(
        "steps", "When to log training metrics: `no`, every `logging_steps` (`steps`) or at each epoch end (`epoch`)."
    )
    logging_steps: float = _field(
        10, "Log metrics every N optimizer steps (whole number >= 1) or every fraction (< 1) of total steps.", gt=0
    )
    logging_first_step: bool = _field(False, "Also log after the first optimizer step.")
    logging_nan_inf_filter: bool = _field(True, "Leave non-finite losses out of the logged loss (transformers).")
    log_on_each_node: bool = _field(True, "Log from the main process of every node (transformers).")
    log_level: LogLevelName = _field(
        "passive", "transformers' logging level on the main process; `passive` leaves it as it is."
    )
    log_level_replica: LogLevelName = _field(
        "warning", "transformers' logging level on the other processes; `passive` leaves it as it is."
    )
    disable_tqdm: bool | None = _field(
        None, "Hide the progress bar; `null`: hidden when the logging level is above WARNING."
    )
    include_num_input_tokens_seen: str | bool = _field(
        "no",
        "Log `num_input_tokens_seen`, the input tokens trained on so far (all processes): `all` tokens, `non_padding` "
        "tokens, or `no` (true/false stand for all/no).",
    )
    skip_memory_metrics: bool = _field(True, "Skip the memory profiler's metrics (transformers).")
    report_to: None | str | list[str] = _field(
        "none",
        "Experiment trackers that also receive the metrics: " + ", ".join(f"`{name}`" for name in SUPPORTED_TRACKERS)
        + " (transformers' callbacks; the package must be installed), a list of them, `all` (those installed) or "
        "`none`. Metrics always go to files in `output_dir`.",
    )
    logging_dir: str | None = _field(
        None,
        "TensorBoard log folder; `null`: `$TENSORBOARD_LOGGING_DIR`, else `output_dir/runs/<date>_<host>` "
        "(transformers' default).",
    )
    plot_loss: bool = _field(True, "Save plots of the logged loss and reward curves in `output_dir` (LLaMA-Factory).")
    run_name: str | None = _field(None, "A name for the run, recorded in the metrics summary and given to trackers.")
    project: str = _field("huggingface", "Tracker project name (Trackio).")
    trackio_space_id: str | None = _field(None, "Hugging Face Space to deploy Trackio to.")
    trackio_bucket_id: str | None = _field(None, "Storage bucket of Trackio.")
    trackio_static_space_id: str | None | Literal[False] = _field(None, "Static Space of Trackio.")
    eval_strategy: Literal["no", "steps", "epoch"] = _field(
        "no", "When to evaluate: `no`, every `eval_steps` (`steps`) or at each epoch end (`epoch`).",
        aliases=["evaluation_strategy"],
    )  # fmt: skip
    eval_steps: float | None = _field(
        None, "Evaluate every N steps (or fraction of total steps) with `eval_strategy: steps`; `null` uses "
        "`logging_steps`.", gt=0,
    )  # fmt: skip
    eval_delay: float = _field(
        0, "No evaluation before this many optimizer steps (`eval_strategy: steps`) or epochs (`epoch`).", ge=0
    )
    eval_on_start: bool = _field(False, "Evaluate once before the first training step (a sanity check; step 0).")
    prediction_loss_only: bool = _field(False, "Return only the loss from evaluation (transformers).")
    eval_do_concat_batches: bool = _field(True, "Concatenate predictions across batches (transformers).")
    eval_use_gather_object: bool = _field(False, "Gather nested predictions from all processes (transformers).")
    eval_accumulation_steps: int | None = _field(None, "Move predictions to the CPU every N steps (transformers).")
    include_for_metrics: list[str] = _field([], "Extra inputs of `compute_metrics` (transformers).")
    batch_eval_metrics: bool = _field(False, "Call `compute_metrics` per batch (transformers).")
    save_strategy: Literal["no", "steps", "epoch", "best"] = _field(
        "steps",
        "When to save a checkpoint: `no`, every `save_steps` (`steps`), at each epoch end (`epoch`), or after an "
        "evaluation that improves `metric_for_best_model` (`best`).",
    )
    save_steps: float = _field(
        500, "Save a checkpoint every N steps (whole number >= 1) or every fraction (< 1) of total steps.", gt=0
    )
    save_total_limit: int | None = _field(
        None,
        "Keep at most this many checkpoints, deleting the oldest (never the best one with `load_best_model_at_end`); "
        "`null` or 0 keeps all.",
        ge=0,
    )
    save_only_model: bool = _field(
        False, "Checkpoints hold the model only, without optimizer and scheduler state (so they cannot resume)."
    )
    save_on_each_node: bool = _field(False, "Save on the main process of every node (transformers).")
    enable_jit_checkpoint: bool = _field(False, "Save a checkpoint on SIGTERM (transformers).")
    load_best_model_at_end: bool = _field(
        False,
        "Track the best checkpoint by `metric_for_best_model` and load it at the end of training; needs "
        "`save_strategy` equal to `eval_strategy` (or `best`) and, with steps, `save_steps` a multiple of "
        "`eval_steps`.",
    )
    metric_for_best_model: str | None = _field(
        None,
        "Evaluation metric that ranks checkpoints, e.g. `loss` or `rewards/accuracies` (`eval_` is prefixed when "
        "missing); `null` with `load_best_model_at_end` or `save_strategy: best` means `loss`.",
    )
    greater_is_better: bool | None = _field(
        None, "Whether a larger `metric_for_best_model` is better; `null`: false for names ending in `loss`, else true."
    )
    output_dir: str = _field(
        "output/dpo_metrics",
        "Where checkpoints, metrics, plots and the final model are written (TRL's `null` reads as this default).",
    )
    overwrite_output_dir: bool = _field(
        True, "Allow writing into a non-empty `output_dir` (LLaMA-Factory); `false` refuses to."
    )
    resume_from_checkpoint: str | None = _field(
        None,
        "Resume from a checkpoint folder, or `latest` (the newest intact `checkpoint-N` in `output_dir`; a damaged one "
        "is skipped with a warning). Weights, optimizer, scheduler, RNG states, data position and metrics continue "
        "exactly where the checkpoint left off.",
    )
    resume_with_changed_settings: bool = _field(
        False,
        "Resume from a checkpoint whose run fingerprint (the settings that shape training, the model and the data) "
        "differs from this run's: the differences are logged as a warning instead of refused. For continuing a run "
        "on purpose with new settings (e.g. more `max_steps`).",
    )
    ignore_data_skip: bool = _field(False, "On resume, restart the epoch's data instead of skipping (transformers).")
    restore_callback_states_from_checkpoint: bool = _field(False, "Restore callback states on resume (transformers).")
    nonfinite_loss: Literal["stop", "skip"] = _field(
        "stop",
        "On a non-finite loss or gradient: `stop` with a message naming the step and the batch's rows, or `skip` the "
        "update (counted in `summary.json`). No checkpoint with non-finite weights is ever written.",
    )

    # ---- Hub -------------------------------------------------------------------------------------------------------
    push_to_hub: bool = _field(False, "Upload the model to the Hugging Face Hub.")
    hub_model_id: str | None = _field(None, "Hub repository to push to.")
    hub_token: str | None = _field(None, "Hub token (shown as a placeholder in `to_dict`).")
    hub_private_repo: bool | None = _field(None, "Make the Hub repository private.")
    hub_strategy: Literal["end", "every_save", "checkpoint", "all_checkpoints"] = _field(
        "every_save", "What to push to the Hub, and when."
    )
    hub_always_push: bool = _field(False, "Push even while the previous push is running.")
    hub_revision: str | None = _field(None, "Hub branch to push to.")

    # ---- Processes -------------------------------------------------------------------------------------------------
    ddp_timeout: int = _field(
        1800, "Timeout in seconds for distributed-process collectives.", aliases=["dist_timeout"], ge=1
    )
    ddp_find_unused_parameters: bool | None = _field(
        None, "DDP's `find_unused_parameters`; `null`: DDP's default (false; transformers' Trainer sets true unless "
        "gradient checkpointing is on, which costs a pass over the graph at every step)."
    )
    ddp_bucket_cap_mb: int | None = _field(None, "DDP's `bucket_cap_mb`; `null`: torch's default.", ge=1)
    ddp_broadcast_buffers: bool | None = _field(None, "DDP's `broadcast_buffers`; `null`: false.")
    ddp_static_graph: bool | None = _field(None, "DDP's `static_graph`; `null`: torch's default.")
    ddp_backend: Literal["nccl", "gloo", "mpi", "xccl", "hccl", "cncl", "mccl"] | None = _field(
        None, "torch.distributed backend (transformers)."
    )
    local_rank: int = _field(-1, "Process rank passed by old launchers (transformers).")
    fsdp: str | None = _field(
        None,
        "FSDP2 (torch `fully_shard`) with several processes: `full_shard` (parameters, gradients and optimizer states "
        "sharded; each decoder layer and then the whole model; a bare `--fsdp` or `true` means this) or "
        "`shard_grad_op` (parameters kept gathered between forward and backward); `auto_wrap` is accepted (the "
        "wrapping is always per decoder layer). Full or LoRA; a separate reference model is sharded too. Checkpoints "
        "and the final model hold the whole weights and optimizer state (the files of a one-process run). Not with "
        "`padding_free` or `sync_ref_model`; ignored with one process.",
        flag={"nargs": "?", "const": True},
    )
    fsdp_config: dict[str, Any] | str | None = _field(None, "FSDP options (transformers).")
    deepspeed: dict[str, Any] | str | None = _field(
        None,
        "DeepSpeed ZeRO with several processes: a DeepSpeed JSON config file (or a dict), as in transformers and "
        "LLaMA-Factory; stages 0-3 with optimizer/parameter offload. `\"auto\"` values are filled from this config "
        "(batch, accumulation, clipping, precision, bucket sizes); `optimizer`/`scheduler` sections are refused "
        "(preftune builds AdamW and the schedule). Checkpoints hold the whole weights and optimizer state (the files "
        "of an FSDP run) and resume with the same number of processes. Not with `fsdp`, `padding_free`, "
        "`sync_ref_model` or `nonfinite_loss: skip`; ignored with one process. Needs `pip install deepspeed`.",
    )
    accelerator_config: dict[str, Any] | str | None = _field(None, "Options of accelerate's Accelerator.")
    parallelism_config: str | None = _field(None, "accelerate's ParallelismConfig (transformers).")
    nproc: int | None = _field(
        None,
        "Training processes (one per device). `preftune train` re-launches itself under torchrun with this many; "
        "under torchrun or `accelerate launch` it must match their process count. The global batch is "
        "`per_device_train_batch_size` × processes × `gradient_accumulation_steps`.",
        ge=1,
    )
    use_cpu: bool = _field(False, "Run on CPU even when an accelerator is available.", aliases=["no_cuda"])
    debug: str | list[str] = _field("", "transformers' debugging features.")

    # ---- LoRA ------------------------------------------------------------------------------------------------------
    lora_rank: int = _field(8, "LoRA rank (only with `finetuning_type: lora`).", ge=1)
    lora_alpha: int | None = _field(
        None, "LoRA scaling α; `null` uses 2 × `lora_rank` (only with `finetuning_type: lora`).", ge=1
    )
    lora_dropout: float = _field(0.0, "LoRA dropout (only with `finetuning_type: lora`).", ge=0, lt=1)
    freeze_vision_tower: bool = _field(
        True, "Vision-language models: the vision encoder is not trained, nor adapted by LoRA (LLaMA-Factory).",
    )
    freeze_multi_modal_projector: bool = _field(
        True, "Vision-language models: the projector from vision features to the language model is not trained, nor "
        "adapted by LoRA (LLaMA-Factory).",
    )
    lora_target: str | list[str] = _field(
        "all",
        "Modules LoRA adapts: `all` linear layers but the LM head, a list of names, or a comma-separated string "
        "(only with `finetuning_type: lora`).",
    )
    quantization_bit: int | None = _field(
        None,
        "Load the base model quantized to 4 or 8 bits for QLoRA (LLaMA-Factory). Needs bitsandbytes and a CUDA GPU; "
        "refused with a clear message otherwise.",
    )

    # ---- Reference model -------------------------------------------------------------------------------------------
    precompute_ref_log_probs: bool = _field(
        False,
        "Compute the reference log-probs of every train and eval row in one pass before training and keep no "
        "reference model in memory while training. Stored in a cache keyed by the reference weights, the tokenized "
        "data (and its images' content) and the settings (under `$PREFTUNE_CACHE`); a rerun with the same inputs "
        "reuses it.",
    )
    precompute_ref_batch_size: int | None = _field(
        None, "Pairs per batch of the precompute pass; `null` uses `per_device_eval_batch_size`.", ge=1
    )
    sync_ref_model: bool = _field(
        False,
        "TR-DPO (Gorbatovski et al. 2024): every `ref_model_sync_steps` steps the reference becomes "
        "α·policy + (1 − α)·reference, α = `ref_model_mixup_alpha`. Needs a separate reference model (not with "
        "precomputed log-probs or a LoRA adapter-disabled reference).",
    )
    ref_model_mixup_alpha: float = _field(0.6, "TR-DPO mixing α (1: hard copy of the policy).", gt=0, le=1)
    ref_model_sync_steps: int = _field(512, "TR-DPO: optimizer steps between reference updates.", ge=1)

    # ---- Iterative DPO (preftune loop)
    loop: dict[str, Any] | None = _field(
        None,
        "Iterative or online DPO settings read by `preftune loop` (a mapping of the `loop.*` keys below); `preftune train` "
        "ignores it.",
    )

    # ---- Construction ----------------------------------------------------------------------------------------------

    def __init__(self, /, **data: Any) -> None:
        """Validate keyword arguments (canonical names or aliases); raise ConfigError on any problem."""
        _validate_into(self, data, _Source())

    @classmethod
    def from_mapping(
        cls, data: Any, *, file: str | Path | None = None, cli_keys: Sequence[str] = ()
    ) -> DPOConfig:
        """Build a config from a mapping (e.g. parsed YAML); errors name ``file``, or say a key came from ``cli_keys``.

        Raises ConfigError if ``data`` is not a mapping, a key is not a string, or any key or value is invalid.
        """
        file_name = str(file) if file is not None else None
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping of key: value, got {type(data).__name__}", file=file_name)
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(f"key {_short_repr(key)} is not a string", file=file_name)
        config = cls.__new__(cls)
        _validate_into(config, dict(data), _Source(file=file_name, cli_keys=frozenset(cli_keys)))
        config._config_file = file_name
        return config

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in type(self).model_fields:
            super().__setattr__(name, value)
            return
        token = _SOURCE.set(_Source(file=self._config_file, assigning=name))
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            raise _convert_validation_error(error) from None
        finally:
            _SOURCE.reset(token)

    # ---- Validation ------------------------------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _canonicalize(cls, data: Any) -> Any:
        """Map aliases to canonical names, refuse unknown and not-yet-supported keys and values."""
        if not isinstance(data, Mapping):
            raise _error(f"expected a mapping of key: value, got {type(data).__name__}", None)
        source = _SOURCE.get()
        canonical, given_names = _canonical_items(data)
        if source is not None:
            source.given_names.update(given_names)
        for name, value in canonical.items():
            canonical[name] = _screen_value(name, value)
        _resolve_checkpointing_names(canonical, source.assigning if source is not None else None)
        return canonical

    @field_validator("logging_steps", "save_steps", "eval_steps", "warmup_steps", "val_size")
    @classmethod
    def _whole_number_or_fraction(cls, value: float | None, info: Any) -> float | None:
        if value is not None and value >= 1 and value != int(value):
            raise _error(f"got {value!r}; expected a whole number (>= 1) or a fraction in [0, 1)", info.field_name)
        return value

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value in LATER_LR_SCHEDULERS:
            raise _error(f"not supported yet: lr_scheduler_type={value}", "lr_scheduler_type")
        return value

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in SUPPORTED_OPTIMIZERS:
            expected = ", ".join(SUPPORTED_OPTIMIZERS)
            raise _error(f"not supported yet: optim={value}; expected one of {expected}", "optim")
        return value

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, value: str | list[str] | None) -> str | list[str]:
        names = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(value or [])
        names = [name for name in names if name and name != "none"]
        if names == ["all"]:  # as transformers: every tracker that is installed (of those preftune tests)
            names = [name for name in SUPPORTED_TRACKERS if importlib.util.find_spec(name) is not None]
        if not names:
            return "none"
        for name in names:
            if name not in SUPPORTED_TRACKERS:
                raise _error(f"not supported yet: report_to={name}; expected {', '.join(SUPPORTED_TRACKERS)}, all or "
                             "none", "report_to")
        return list(dict.fromkeys(names))

    @field_validator("include_num_input_tokens_seen")
    @classmethod
    def _token_count_mode(cls, value: str | bool) -> str:
        if value not in ("no", "all", "non_padding"):
            raise _error(f"got {_short_repr(value)}; expected all, non_padding or no", "include_num_input_tokens_seen")
        return str(value)

    @field_validator("fsdp")
    @classmethod
    def _fsdp_options(cls, value: str | None) -> str | None:
        words = value.split() if value else []
        if not words:
            return None
        unknown = [word for word in words if word not in FSDP_OPTIONS]
        if unknown:
            raise _error(f"not supported yet: fsdp option {unknown[0]!r}; expected {', '.join(FSDP_OPTIONS)}", "fsdp")
        sharding = [word for word in words if word != "auto_wrap"]
        if len(sharding) != 1:
            raise _error("fsdp: expected one of full_shard, shard_grad_op (and optionally auto_wrap)", "fsdp")
        return " ".join(words)

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_config(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        """The file is read now, so that a missing or malformed one is named at load time, not after set-up."""
        if value is not None:
            from preftune.parallel.deepspeed_config import read_deepspeed_config

            try:
                read_deepspeed_config(value)
            except ConfigError as error:
                raise _error(error.message, "deepspeed") from None
        return value

    @field_validator("model_init_kwargs")
    @classmethod
    def _model_init_kwargs(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return _check_model_init_kwargs(value)

    @field_validator("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")
    @classmethod
    def _checkpointing_kwargs(cls, value: dict[str, Any] | str | None, info: Any) -> dict[str, Any] | None:
        kwargs = _require_dict(value, info.field_name)
        for key, item in (kwargs or {}).items():
            if key not in GRADIENT_CHECKPOINTING_KEYS:
                raise _error(
                    f"unknown argument {key!r}; expected {', '.join(GRADIENT_CHECKPOINTING_KEYS)}", info.field_name
                )
            if key != "determinism_check" and not isinstance(item, bool):
                raise _error(f"{key}: got {_format_value(item)}; expected true or false", info.field_name)
        return kwargs

    @field_validator("loop")
    @classmethod
    def _loop_section(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """The ``loop:`` section, checked key by key (``preftune.loop_config``) and completed with its defaults."""
        if value is None:
            return None
        from preftune.loop_config import LoopConfig

        try:
            return LoopConfig.from_mapping(value).to_dict()
        except ConfigError as error:
            raise _error(error.message, error.key) from None

    @field_validator("lr_scheduler_kwargs")
    @classmethod
    def _scheduler_kwargs(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        return _require_dict(value, "lr_scheduler_kwargs")

    @model_validator(mode="after")
    def _check_combinations(self) -> DPOConfig:
        """Refuse settings that cannot work together; warn about settings that will be ignored."""
        if self.fp16 and self.bf16:
            raise _error("fp16 and bf16 are both true; choose one mixed-precision mode", "fp16")
        if self.stage == "kto":
            if self.loss_type not in ("kto", DPOConfig.model_fields["loss_type"].default):
                raise _error(f"stage kto trains with loss_type kto; got loss_type={self.loss_type}", "loss_type")
            self.__dict__["loss_type"] = "kto"  # plain assignment would re-run validation
        self._check_loss_settings()
        self._check_sharding_settings()
        self._check_model_loading()
        self._check_schedule()
        self._resolve_best_model_settings()
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.__dict__["torch_compile"] = True  # as transformers: naming a backend or mode turns compilation on
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise _error(
                f"max_steps={self.max_steps} and num_train_epochs={self.num_train_epochs}: nothing to train; "
                "set max_steps > 0 or num_train_epochs > 0",
                "num_train_epochs",
            )
        if self.finetuning_type == "full":
            ignored = [
                name
                for name in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if ignored:
                logger.warning("%s ignored: they apply only with finetuning_type: lora", ", ".join(ignored))
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            logger.warning(
                "warmup_steps=%s overrides warmup_ratio=%s (transformers behaviour)",
                self.warmup_steps,
                self.warmup_ratio,
            )
        return self

    def _check_loss_settings(self) -> None:
        """The loss settings as ``preftune.losses`` validates them (ConfigError naming the key), plus the combinations
        that involve other keys."""
        from preftune.losses import LossParams  # imports torch: only when a config is validated

        params = LossParams.from_config(self)
        try:
            params.validate()
        except ConfigError as error:  # re-raised naming the file and the spelling the value came from
            raise _error(error.message, error.key) from None
        if not params.needs_reference and self.ref_model_name_or_path:
            raise _error(
                f"loss {self.loss_type} uses no reference model, but ref_model_name_or_path is set; remove it",
                "ref_model_name_or_path",
            )
        if self.ld_alpha is not None and params.is_unpaired:
            raise _error("ld_alpha applies to paired losses, not kto", "ld_alpha")
        if self.precompute_ref_log_probs and params.is_unpaired:
            raise _error(
                "not supported yet: precompute_ref_log_probs with kto (the reference log-probs of its KL completions are "
                "not precomputed yet)",
                "precompute_ref_log_probs",
            )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise _error("sync_ref_model updates the reference, so its log-probs cannot be precomputed", "sync_ref_model")
        if self.sync_ref_model and self.finetuning_type == "lora":
            raise _error(
                "sync_ref_model needs a separate reference model; with finetuning_type lora the reference is the base "
                "model with the adapter disabled",
                "sync_ref_model",
            )
        if self.sync_ref_model and not params.needs_reference:
            raise _error(f"sync_ref_model needs a reference model; loss {self.loss_type} uses none", "sync_ref_model")

    def _check_sharding_settings(self) -> None:
        """What preftune does not run with FSDP or DeepSpeed, and why (ConfigError naming the key)."""
        for engine, on in (("fsdp", bool(self.fsdp)), ("deepspeed", self.deepspeed is not None)):
            if not on:
                continue
            partitions = "FSDP shards" if engine == "fsdp" else "ZeRO partitions"
            refused = {
                "fsdp": (engine == "deepspeed" and bool(self.fsdp), "choose one of fsdp and deepspeed"),
                "padding_free": (bool(self.padding_free), f"under {engine} every process must run the same forwards; "
                                 "set padding_free: false (or leave it out)"),
                "sync_ref_model": (self.sync_ref_model, f"the reference update reads the policy's whole weights, which "
                                   f"{partitions}; train with DDP (leave {engine} out)"),
                "nonfinite_loss": (engine == "deepspeed" and self.nonfinite_loss == "skip", "DeepSpeed reduces the "
                                   "gradients during the backward, before a skip could drop them; use nonfinite_loss: stop"),
            }
            for key, (refuse, reason) in refused.items():
                if refuse:
                    raise _error(f"{engine} cannot run with {key}={getattr(self, key)!r}: {reason}", key)

    def _check_model_loading(self) -> None:
        """``model_init_kwargs`` must agree with the fields that say the same thing (ConfigError naming it)."""
        kwargs = self.model_init_kwargs or {}
        if kwargs.get("dtype") is not None and kwargs.get("torch_dtype") is not None:
            raise _error("both dtype and torch_dtype are given; keep one", "model_init_kwargs")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype is not None and self.torch_dtype is not None and dtype != self.torch_dtype:
            raise _error(f"dtype={dtype} but torch_dtype={self.torch_dtype}; keep one", "model_init_kwargs")
        remote = kwargs.get("trust_remote_code")
        if remote is False and self.trust_remote_code:
            raise _error("trust_remote_code=false but the trust_remote_code field is true; keep one", "model_init_kwargs")
        implementation = kwargs.get("attn_implementation")
        chosen = FLASH_ATTN_IMPLEMENTATIONS.get(self.flash_attn, self.flash_attn)
        if implementation is not None and chosen is not None and implementation != chosen:
            raise _error(
                f"attn_implementation={implementation} but flash_attn={self.flash_attn}; keep one", "model_init_kwargs"
            )

    def _check_schedule(self) -> None:
        """``lr_scheduler_kwargs`` names arguments the chosen schedule takes (checked against transformers)."""
        if not self.lr_scheduler_kwargs:
            return
        import inspect

        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION
        from transformers.trainer_utils import SchedulerType

        schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(self.lr_scheduler_type)]
        parameters = inspect.signature(schedule).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        passed = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")  # the trainer's, not the user's
        taken = [name for name in parameters if name not in passed]
        for key in self.lr_scheduler_kwargs:
            if key not in taken:
                expected = ", ".join(taken) if taken else "none"
                raise _error(
                    f"lr_scheduler_type {self.lr_scheduler_type} takes no argument {key!r}; it takes {expected}",
                    "lr_scheduler_kwargs",
                )

    def _resolve_best_model_settings(self) -> None:
        """As transformers: ``metric_for_best_model`` defaults to ``loss`` when a best checkpoint is wanted,
        ``greater_is_better`` from the metric's name; ``load_best_model_at_end`` needs matching strategies."""
        wants_best = self.load_best_model_at_end or self.save_strategy == "best"
        if wants_best and self.metric_for_best_model is None:
            self.__dict__["metric_for_best_model"] = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.__dict__["greater_is_better"] = not self.metric_for_best_model.endswith("loss")
        if self.save_strategy == "best" and self.eval_strategy == "no":
            raise _error("save_strategy best saves after evaluations, but eval_strategy is no", "save_strategy")
        if not self.load_best_model_at_end or self.save_strategy == "best":
            return
        if self.eval_strategy != self.save_strategy:
            raise _error(
                f"load_best_model_at_end needs save_strategy equal to eval_strategy (or best); got "
                f"eval_strategy={self.eval_strategy}, save_strategy={self.save_strategy}",
                "load_best_model_at_end",
            )
        if self.eval_strategy == "steps":
            eval_steps = self.resolved_eval_steps
            if (eval_steps < 1) != (self.save_steps < 1) or self.save_steps % eval_steps != 0:
                raise _error(
                    f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a multiple of eval_steps "
                    f"({eval_steps}), both whole numbers or both fractions",
                    "load_best_model_at_end",
                )

    # ---- Derived values --------------------------------------------------------------------------------------------

    @property
    def config_file(self) -> str | None:
        """The YAML file this config was loaded from, or None (not part of dumps)."""
        return self._config_file

    @property
    def resolved_eval_steps(self) -> float:
        """``eval_steps``, or ``logging_steps`` when unset (a whole number >= 1, or a fraction < 1 of total steps)."""
        return self.eval_steps if self.eval_steps is not None else self.logging_steps

    @property
    def resolved_torch_dtype(self) -> Any:
        """``torch_dtype`` (or ``model_init_kwargs['dtype']``) as a ``torch.dtype``; ``"auto"`` stays the string
        ``"auto"``; None when neither is set. The result can be passed as ``dtype=`` to ``from_pretrained``."""
        kwargs = self.model_init_kwargs or {}
        name = self.torch_dtype or kwargs.get("dtype") or kwargs.get("torch_dtype")
        if name is None or name == "auto":
            return name
        import torch

        return getattr(torch, name)

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` of the policy and the reference model.

        ``model_init_kwargs`` (entries whose value is None left out), completed from the fields that say the same
        thing: ``dtype`` from ``torch_dtype`` (a ``torch.dtype`` or ``"auto"``; left out when unset, which loads
        float32), ``trust_remote_code``, ``revision`` from ``model_revision`` (when not ``main``) and
        ``attn_implementation`` from ``flash_attn`` (when not ``auto``). ``torch_dtype`` is renamed ``dtype``.
        """
        kwargs = {key: value for key, value in (self.model_init_kwargs or {}).items() if value is not None}
        kwargs.pop("torch_dtype", None)
        dtype = self.resolved_torch_dtype
        if dtype is not None:
            kwargs["dtype"] = dtype
        else:
            kwargs.pop("dtype", None)
        kwargs.setdefault("trust_remote_code", self.trust_remote_code)
        if self.model_revision != "main":
            kwargs.setdefault("revision", self.model_revision)
        implementation = FLASH_ATTN_IMPLEMENTATIONS.get(self.flash_attn, self.flash_attn)
        if implementation is not None:
            kwargs.setdefault("attn_implementation", implementation)
        return kwargs

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """Warmup optimizer steps for a run of ``total_steps``: ``warmup_steps`` if > 0, else from ``warmup_ratio``."""
        if self.warmup_steps > 0:
            return interval_to_steps(self.warmup_steps, total_steps)
        return math.ceil(self.warmup_ratio * total_steps)

    def resolved_logging_dir(self) -> str:
        """The TensorBoard folder: ``logging_dir``; else ``$TENSORBOARD_LOGGING_DIR``; else, as transformers 5
        computes it, ``output_dir/runs/<Mon DD_HH-MM-SS>_<hostname>`` (computed once per config)."""
        if self.logging_dir is not None:
            return os.path.expanduser(self.logging_dir)
        if self._logging_dir is None:
            from_environment = os.getenv("TENSORBOARD_LOGGING_DIR")
            if from_environment:
                self._logging_dir = os.path.expanduser(from_environment)
            else:
                import socket
                from datetime import datetime

                stamp = datetime.now().strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname()
                self._logging_dir = os.path.join(self.output_dir, "runs", stamp)
        return self._logging_dir

    # ---- What transformers' callbacks read from TrainingArguments --------------------------------------------------

    @property
    def process_index(self) -> int:
        """This process's rank among all processes (``RANK`` from torchrun / accelerate launch; 0 alone)."""
        return _environment_int("RANK", 0)

    @property
    def local_process_index(self) -> int:
        """This process's rank on its node (``LOCAL_RANK``; 0 alone)."""
        return _environment_int("LOCAL_RANK", 0)

    @property
    def world_size(self) -> int:
        """The number of processes (``WORLD_SIZE``; 1 alone)."""
        return _environment_int("WORLD_SIZE", 1)

    @property
    def should_log(self) -> bool:
        """Whether this process logs: the main process of each node with ``log_on_each_node``, else the main one."""
        return (self.local_process_index if self.log_on_each_node else self.process_index) == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes checkpoints: the main process (of each node with ``save_on_each_node``)."""
        return (self.local_process_index if self.save_on_each_node else self.process_index) == 0

    @property
    def train_batch_size(self) -> int:
        """Pairs per micro-batch per process in training (transformers' name)."""
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        """Pairs per batch per process in evaluation (transformers' name)."""
        return self.per_device_eval_batch_size

    def get_process_log_level(self) -> int:
        """The ``logging`` level for this process: ``log_level`` on the main process, ``log_level_replica`` on the
        others; ``passive`` gives transformers' current verbosity (as ``TrainingArguments.get_process_log_level``)."""
        level = LOG_LEVELS[self.log_level if self.should_log else self.log_level_replica]
        if level == -1:
            from transformers.utils import logging as transformers_logging

            return transformers_logging.get_verbosity()
        return level

    def to_dict(self) -> dict[str, Any]:
        """Resolved values by canonical name, JSON-serialisable (for summary.json and trackers' hyperparameters).

        Keys of not-yet-supported features are left out: they always hold their "off" value. Secrets (``hub_token``)
        are replaced by a placeholder, as transformers does.
        """
        data = self.model_dump(mode="json", exclude=set(_LATER_FIELDS))
        for name in _SECRET_FIELDS:
            if data.get(name) is not None:
                data[name] = f"<{name.upper()}>"
        return data

    def to_json_string(self) -> str:
        """:meth:`to_dict` as indented JSON (TensorBoard's callback records it)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` plus the batch sizes, every value a bool, int, float or str (TensorBoard's hparams)."""
        data = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        return {key: value if type(value) in (bool, int, float, str) else str(value) for key, value in data.items()}


# --------------------------------------------------------------------------------------------------------------------
# Key and value screening (runs before pydantic's type validation, so that the messages are ours)


def _field_extra(name: str) -> dict[str, Any]:
    extra = DPOConfig.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


_FIELD_NAMES: tuple[str, ...] = tuple(DPOConfig.model_fields)
_ALIASES: dict[str, str] = {
    alias: name for name in _FIELD_NAMES for alias in typing.cast(list, _field_extra(name).get("aliases", []))
}
_LATER_FIELDS: tuple[str, ...] = tuple(name for name in _FIELD_NAMES if FIELD_POLICY[name].kind == LATER)
_ALL_KEYS: tuple[str, ...] = _FIELD_NAMES + tuple(_ALIASES)
_MISSING = object()


def canonical_key(key: str) -> str | None:
    """The field ``key`` sets (``key`` is a field name, an alias, or a key meaning a field's opposite such as
    ``disable_gradient_checkpointing``), or None if it sets no field (see :func:`is_known_key`)."""
    if key in DPOConfig.model_fields:
        return key
    return _ALIASES.get(key) or INVERTED_ALIASES.get(key)


def is_known_key(key: str) -> bool:
    """Whether ``key`` is a config key: a field, an alias, or one of :data:`OTHER_KNOWN_KEYS`."""
    return canonical_key(key) is not None or key in OTHER_KNOWN_KEYS


def _suggestion(key: str) -> str:
    """"; did you mean 'X'?" for an unknown key: its normal spelling, another framework's name for it, the one key
    it begins, or the closest spelling."""
    normal = key.strip().lower().replace("-", "_")
    candidates = _ALL_KEYS + tuple(INVERTED_ALIASES)
    if normal in candidates and normal != key:
        return f"; did you mean '{normal}'?"
    if normal in _SYNONYMS:
        return f"; did you mean '{_SYNONYMS[normal]}'?"
    extended = [name for name in candidates if name.startswith(normal + "_")]
    if len(extended) == 1:
        return f"; did you mean '{extended[0]}'?"
    close = difflib.get_close_matches(normal, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unknown_key_error(key: str) -> ConfigError:
    source = _SOURCE.get() or _Source()
    if key in source.cli_keys:
        return ConfigError(f"unknown key{_suggestion(key)} (from a command-line override)", key=key)
    return ConfigError(f"unknown key{_suggestion(key)}", key=key, file=source.file)


def _canonical_items(data: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Rename aliases to canonical names; check and drop other known keys; refuse non-string, unknown and doubly-given
    keys."""
    canonical: dict[str, Any] = {}
    given_names: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise _error(f"key {_short_repr(key)} is not a string", None)
        name = canonical_key(key)
        if name is None:
            if key not in OTHER_KNOWN_KEYS:
                raise _unknown_key_error(key)
            _check_known_key(key, value)
            continue
        if key in INVERTED_ALIASES:
            if not isinstance(value, bool):
                raise _keyed_error(f"got {_format_value(value)}; expected true or false", key)
            value = not value
        if name in canonical:
            first = given_names[name]
            raise _error(f"both '{first}' and '{key}' are given; they set the same value ('{name}'): keep one", name)
        canonical[name] = value
        given_names[name] = key
    return canonical, given_names


def _keyed_error(message: str, key: str) -> ConfigError:
    """A ConfigError for a key as written (not a field name), naming where it came from."""
    source = _SOURCE.get() or _Source()
    if key in source.cli_keys:
        return ConfigError(f"{message} (from a command-line override)", key=key)
    return ConfigError(message, key=key, file=source.file)


def _check_known_key(key: str, value: Any) -> None:
    """A key of :data:`OTHER_KNOWN_KEYS`: ignored at an accepted value, refused by name otherwise."""
    known = OTHER_KNOWN_KEYS[key]
    if isinstance(value, enum.Enum):
        value = value.value
    if known.accepted and known.accepted[0] is ANY_VALUE:
        return
    if not _equal_to_any(value, known.accepted):
        raise _keyed_error(f"not supported yet: {key}={_format_value(value)} ({known.hint})", key)
    logger.debug("%s=%s has no effect in preftune (%s)", key, _format_value(value), known.hint)


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    return any(_accepts_bool(arg) for arg in typing.get_args(annotation) if not isinstance(arg, str))


def _is_same(value: Any, accepted: Any) -> bool:
    """Whether ``value`` is of the kind of ``accepted``: True never stands for 1, nor 0 for False or None."""
    if isinstance(value, bool) or isinstance(accepted, bool) or value is None or accepted is None:
        return type(value) is type(accepted)
    if isinstance(value, (int, float)) and isinstance(accepted, (int, float)):
        return True
    return type(value) is type(accepted)


def _equal_to_any(value: Any, accepted: Sequence[Any]) -> bool:
    for candidate in accepted:
        try:
            if _is_same(value, candidate) and bool(value == candidate):
                return True
        except Exception:  # an exotic value whose comparison fails is simply not an accepted one
            continue
    return False


def _normalize(name: str, value: Any) -> Any:
    """TRL's, transformers' and YAML's spellings of a value, read the way those tools read them."""
    if isinstance(value, enum.Enum):  # IntervalStrategy.STEPS, SchedulerType.COSINE, ...
        value = value.value
    default = DPOConfig.model_fields[name].default
    if value is False and name in _STRATEGY_FIELDS:
        return "no"  # YAML 1.1 reads `no` as false
    if name in _DICT_FIELDS and isinstance(value, str) and value.lstrip().startswith("{"):
        return _parse_json_object(name, value)
    if value is None and name in ("bf16", "output_dir"):
        return default  # TRL's "unset" default: preftune's documented default
    if name == "include_num_input_tokens_seen" and isinstance(value, bool):
        return "all" if value else "no"
    if name == "fsdp":
        if value is True:
            return "full_shard"
        if value is False or (isinstance(value, (list, tuple)) and not value):
            return None
        if isinstance(value, (list, tuple)) and all(isinstance(word, str) for word in value):
            return " ".join(value)
    if name == "report_to" and value is None:
        return "none"
    if name == "debug" and (value is None or (isinstance(value, (list, tuple)) and not value)):
        return ""
    if name == "pad_to_multiple_of" and isinstance(value, str) and value != "auto":
        if value.strip().lower() in ("none", "null", ""):
            return None  # TRL reads these command-line spellings so
        if value.strip().isdigit():
            return int(value)
    if name == "torch_dtype":
        return _dtype_name(value)
    if name == "rpo_alpha" and _is_same(value, 0) and value == 0:
        return None  # LLaMA-Factory's pref_ftx: 0 means no SFT term
    return value


def _screen_value(name: str, value: Any) -> Any:
    """Normalise a value, refuse values of features not implemented yet and values no field type would read right."""
    value = _normalize(name, value)
    policy = FIELD_POLICY[name]
    if policy.kind == LATER:
        accepted = (DPOConfig.model_fields[name].default, *policy.accepted)
        if not _equal_to_any(value, accepted):
            hint = f" ({policy.note})" if policy.note else ""
            raise _error(f"not supported yet: {_given_name(name)}={_format_value(value)}{hint}", name)
        return value

    annotation = DPOConfig.model_fields[name].annotation
    if isinstance(value, bool) and not _accepts_bool(annotation):
        raise _error(f"got {value!r} (bool); expected {_describe_field(name)}", name)
    if name == "loss_type":
        value = _screen_loss_type(value)
    elif name == "stage" and isinstance(value, str) and value not in ("dpo", "kto"):
        if value in STAGES_NOW_LOSSES:
            raise _error(
                f"stage {value} is not a LLaMA-Factory stage any more: write stage: dpo with "
                f"pref_loss: {STAGES_NOW_LOSSES[value]}",
                name,
            )
        if value in OTHER_STAGES:
            raise _error(f"preftune runs stages dpo and kto only; got stage={value}", name)
    elif name == "finetuning_type" and value == "freeze":
        raise _error(f"not supported yet: finetuning_type={value}", name)
    return value


def _dtype_name(value: Any) -> Any:
    """``torch.bfloat16`` -> ``"bfloat16"``; anything else unchanged."""
    if type(value).__module__ == "torch" and str(value).startswith("torch."):
        return str(value).removeprefix("torch.")
    return value


def _screen_loss_type(value: Any) -> Any:
    """A known loss name, or a list of them (a one-element list becomes its name, as TRL accepts)."""
    names = list(value) if isinstance(value, (list, tuple)) else [value]
    if not names:
        raise _error("got an empty list; expected a loss name or a list of them", "loss_type")
    for name in names:
        if not isinstance(name, str):
            raise _error(f"got {_short_repr(name)}; expected a loss name (string)", "loss_type")
        if name in LATER_LOSS_TYPES:
            raise _error(f"not supported yet: loss_type={name}", "loss_type")
        if name not in SUPPORTED_LOSS_TYPES:
            close = difflib.get_close_matches(name, SUPPORTED_LOSS_TYPES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _error(f"unknown loss {name!r}{hint}; expected one of {', '.join(SUPPORTED_LOSS_TYPES)}", "loss_type")
    return names[0] if len(names) == 1 else names


def _given_name(name: str) -> str:
    source = _SOURCE.get()
    return source.given_names.get(name, name) if source is not None else name


def _parse_json_object(name: str, text: str) -> Any:
    """A JSON object given as a string (the command line's way to give a dict), with transformers' reading of
    ``"true"``/``"false"`` and number strings inside it."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _error(f"got {_format_value(text)}; expected a JSON object ({error})", name) from None
    return _convert_strings(value) if isinstance(value, dict) else value


def _convert_strings(data: dict[str, Any]) -> dict[str, Any]:
    """As transformers does for dict arguments from the command line: "true"/"false" -> bool, "12" -> 12,
    "0.5" -> 0.5, recursively."""
    converted: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _convert_strings(value)
        elif isinstance(value, str):
            if value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif value.isdigit():
                value = int(value)
            elif value.replace(".", "", 1).isdigit():
                value = float(value)
        converted[key] = value
    return converted


def _require_dict(value: Any, name: str) -> dict[str, Any] | None:
    """``value`` as a dict (None stays None); a string that is not a JSON object is refused naming the key."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _error(f"got {_format_value(value)}; expected a mapping (or a JSON object string)", name)
    return dict(value)


def _check_model_init_kwargs(value: Any) -> dict[str, Any] | None:
    """Each key one ``from_pretrained`` takes offline, each value of its kind; ``torch_dtype`` becomes ``dtype``."""
    kwargs = _require_dict(value, "model_init_kwargs")
    if kwargs is None:
        return None
    checked: dict[str, Any] = {}
    for key, item in kwargs.items():
        kind = MODEL_INIT_KEYS.get(key)
        if kind is None:
            hint = "; use quantization_bit" if key == "quantization_config" else ""
            raise _error(
                f"not supported yet: model_init_kwargs key {key!r}{hint}; accepted: {', '.join(MODEL_INIT_KEYS)}",
                "model_init_kwargs",
            )
        if item is not None:
            item = _check_model_init_value(key, kind, item)
        name = "dtype" if key == "torch_dtype" else key
        if name in checked and checked[name] is not None and item is not None:
            raise _error("both dtype and torch_dtype are given; keep one", "model_init_kwargs")
        if item is not None or name not in checked:
            checked[name] = item
    return checked


_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _check_model_init_value(key: str, kind: str, item: Any) -> Any:
    expected = {
        "bool": "true or false",
        "string": "a string",
        "dtype": "one of " + ", ".join(DTYPE_NAMES) + " or a torch dtype",
        "device_map": "a device name such as auto or cpu, or a mapping",
    }[kind]
    valid = {
        "bool": lambda: isinstance(item, bool),
        "string": lambda: isinstance(item, str),
        "dtype": lambda: _dtype_name(item) in DTYPE_NAMES,
        "device_map": lambda: isinstance(item, (str, dict)) or (isinstance(item, int) and not isinstance(item, bool)),
    }[kind]()
    if not valid:
        raise _error(f"{key}: got {_format_value(item)}; expected {expected}", "model_init_kwargs")
    if key == "attn_implementation" and item not in _ATTENTION_IMPLEMENTATIONS:
        raise _error(
            f"attn_implementation: got {_format_value(item)}; expected one of {', '.join(_ATTENTION_IMPLEMENTATIONS)}",
            "model_init_kwargs",
        )
    return _dtype_name(item) if kind == "dtype" else item


def _resolve_checkpointing_names(values: dict[str, Any], assigning: str | None) -> None:
    """transformers 5 renamed gradient_checkpointing(_kwargs) to activation_checkpointing(_kwargs): the new name wins
    when set, and afterwards both hold the same value (as TrainingArguments does)."""
    for new, old in (
        ("activation_checkpointing", "gradient_checkpointing"),
        ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"),
    ):
        old_default = DPOConfig.model_fields[old].default
        if assigning == old:
            values[new] = values.get(old)
            continue
        new_value = values.get(new)
        if new_value is not None:
            old_value = values.get(old, _MISSING)
            given_differently = old_value is not _MISSING and old_value != old_default and old_value != new_value
            if given_differently and assigning is None:
                raise _error(f"{new} and {old} are both given, with different values; keep {new}", new)
            values[old] = new_value
        if assigning is None:
            values[new] = values.get(old, old_default)


def _environment_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


# --------------------------------------------------------------------------------------------------------------------
# Turning pydantic's errors into ours

# What some fields expect, in words (their types list names preftune refuses anyway).
_EXPECTED_TEXT = {
    "optim": "one of " + ", ".join(SUPPORTED_OPTIMIZERS),
    "lr_scheduler_type": "one of " + ", ".join(SUPPORTED_LR_SCHEDULERS),
}


def _describe_type(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "string"
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(arg) for arg in args)
    if origin is list:
        return f"list of {_describe_type(args[0])}" if args else "list"
    if origin is dict or annotation is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _describe_constraints(name: str) -> str:
    parts = []
    for constraint in DPOConfig.model_fields[name].metadata:
        if isinstance(constraint, annotated_types.Gt):
            parts.append(f"> {constraint.gt}")
        elif isinstance(constraint, annotated_types.Ge):
            parts.append(f">= {constraint.ge}")
        elif isinstance(constraint, annotated_types.Lt):
            parts.append(f"< {constraint.lt}")
        elif isinstance(constraint, annotated_types.Le):
            parts.append(f"<= {constraint.le}")
    return " and ".join(parts)


def _describe_field(name: str) -> str:
    """Expected type of a field in words, with its bounds, e.g. ``int >= 1 or null``."""
    if name in _EXPECTED_TEXT:
        return _EXPECTED_TEXT[name]
    annotation = DPOConfig.model_fields[name].annotation
    bounds = _describe_constraints(name)
    if not bounds:
        return _describe_type(annotation)
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return " or ".join(
        _describe_type(arg) + (f" {bounds}" if arg in (int, float) else "") for arg in args
    )


def _convert_validation_error(error: ValidationError) -> ConfigError:
    """One ConfigError for a pydantic ValidationError: the first problem, then any others, one clause each.

    A ConfigError raised by one of our validators (pydantic wraps it, as it wraps every ValueError) is returned as
    it is: it already names the key and what was expected.
    """
    for item in error.errors(include_url=False):
        raised = (item.get("ctx") or {}).get("error")
        if isinstance(raised, ConfigError):
            return raised
    problems: list[tuple[str | None, str]] = []
    seen: set[str | None] = set()
    for item in error.errors(include_url=False):
        location = item.get("loc") or ()
        name = str(location[0]) if location and str(location[0]) in DPOConfig.model_fields else None
        if name in seen:
            continue  # a union reports one error per member; one line per key is enough
        seen.add(name)
        value = item.get("input")
        if name is None:
            problems.append((None, str(item.get("msg"))))
        else:
            problems.append(
                (name, f"got {_short_repr(value)} ({type(value).__name__}); expected {_describe_field(name)}")
            )
    first_key, first_message = problems[0]
    others = "; ".join(f"key '{_given_name(key)}': {text}" if key else text for key, text in problems[1:])
    return _error(first_message + (f" (also: {others})" if others else ""), first_key)


def _validate_into(config: DPOConfig, data: dict[str, Any], source: _Source) -> None:
    """Run pydantic's validation of ``data`` into ``config`` with ``source`` naming where the values came from."""
    for key in data:  # pydantic-core cannot even read a key that is not valid Unicode text (a lone surrogate)
        if isinstance(key, str) and not is_valid_unicode(key):
            origin = " (from a command-line override)" if key in source.cli_keys else ""
            raise ConfigError(f"unknown key: not valid UTF-8 text{origin}", key=ascii(key)[1:-1], file=source.file)
    token = _SOURCE.set(source)
    try:
        BaseModel.__init__(config, **data)
    except ValidationError as error:
        raise _convert_validation_error(error) from None
    finally:
        _SOURCE.reset(token)


def interval_to_steps(value: float, total_steps: int) -> int:
    """Optimizer steps for an interval given as a whole number (>= 1) or a fraction (< 1) of ``total_steps``.

    Fractions round up (as transformers does) and give at least 1 step.
    """
    if value >= 1:
        return int(value)
    return max(1, math.ceil(value * total_steps))


# --------------------------------------------------------------------------------------------------------------------
# Descriptions that say the policy, and the dataclass view for argument parsers


def _policy_text(name: str) -> str:
    """The sentence a LATER or NO_OP field's description starts with."""
    policy = FIELD_POLICY[name]
    if policy.kind == LATER:
        accepted = (DPOConfig.model_fields[name].default, *policy.accepted)
        return f"Not supported yet: accepted only at {' or '.join(_format_default(value) for value in accepted)}."
    if policy.kind == NO_OP:
        return f"No effect in preftune: {policy.note}."
    return ""


def _describe_policies() -> None:
    for name, info in DPOConfig.model_fields.items():
        prefix = _policy_text(name)
        if prefix:
            info.description = f"{prefix} {info.description}"


def flag_fields() -> tuple[str, ...]:
    """The fields that are command-line flags (``dataclasses.fields(DPOConfig)``): all but :data:`NOT_FLAGS`."""
    return tuple(name for name in _FIELD_NAMES if name not in NOT_FLAGS)


def _flag_spec(name: str) -> tuple[str, Any, dataclasses.Field]:
    """(name, type, dataclasses.Field) of one flag: its default (a factory for lists), help and argparse extras."""
    info = DPOConfig.model_fields[name]
    extras = dict(_field_extra(name).get("flag", {}))
    default = extras.pop("default", info.default)
    metadata = {"help": (info.description or "").replace("%", "%%"), **extras}  # argparse formats help with %
    if isinstance(default, (list, dict)):
        spec = dataclasses.field(default_factory=lambda value=default: json.loads(json.dumps(value)), metadata=metadata)
    else:
        spec = dataclasses.field(default=default, metadata=metadata)
    return name, info.annotation, spec


def _present_as_dataclass() -> None:
    """Give DPOConfig the ``__dataclass_fields__`` of its flags, so that ``dataclasses.fields``,
    ``dataclasses.is_dataclass``, ``HfArgumentParser`` and ``TrlParser`` treat it as TRL's dataclass config.

    The parsers build a flag per field from ``typing.get_type_hints(DPOConfig)`` (the fields' annotations, chosen so
    that each flag parses as TRL's does), then call ``DPOConfig(**values)``, which validates as usual.
    """
    flags = dataclasses.make_dataclass("DPOConfigFlags", [_flag_spec(name) for name in flag_fields()])
    type.__setattr__(DPOConfig, "__dataclass_fields__", flags.__dataclass_fields__)


_describe_policies()
_present_as_dataclass()


# --------------------------------------------------------------------------------------------------------------------
# YAML and overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (safe_load silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key is reported by the normal constructor
            if duplicate:
                raise ConfigError(
                    f"key given twice (line {key_node.start_mark.line + 1})",
                    key=str(key),
                    file=getattr(self, "_preftune_file", None),
                )
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path) -> Any:
    file_name = str(path)
    if not path.exists():
        raise ConfigError("config file not found", file=file_name)
    if not path.is_file():
        raise ConfigError("config path is not a file", file=file_name)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file: {error}", file=file_name) from None
    loader: _UniqueKeyLoader | None = None
    try:
        loader = _UniqueKeyLoader(text)  # the reader checks characters here, so this can raise YAMLError too
        loader._preftune_file = file_name  # type: ignore[attr-defined]
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"YAML syntax error{where}: {problem}", file=file_name) from None
    except ConfigError:
        raise
    except Exception as error:  # e.g. an unhashable mapping key: still a malformed file, not a crash
        raise ConfigError(f"cannot parse YAML: {error}", file=file_name) from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` items; each value is read as YAML (``0.2`` → float, ``true`` → bool, ``[a,b]`` → list).

    Splits at the first ``=``; ``key=`` gives None. A later item for the same key wins. Raises ConfigError for an
    item without ``=``, an empty key, or a value that is not valid YAML.
    """
    result: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"value {text!r} is not valid YAML: {problem} (from a command-line override)", key=key)
        except (ValueError, TypeError, RecursionError) as error:  # e.g. `!!float x`; a value nested too deeply
            raise ConfigError(f"value {_short_repr(text)} is not valid YAML ({type(error).__name__}: {error}) "
                              "(from a command-line override)", key=key) from None
        result[key] = value
    return result


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DPOConfig:
    """Read a YAML config file and apply ``key=value`` overrides; return the validated config.

    An override replaces the file's value of the same setting even when one uses an alias (``pref_beta=0.2``
    replaces ``beta: 0.1``). An empty file means all defaults. Raises ConfigError (naming the file, and the key where
    there is one) for a missing or unreadable file, a YAML syntax error, a document that is not a mapping, and any
    invalid key or value.
    """
    file_name = str(path)
    data = _load_yaml(Path(path))
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        kind = type(data).__name__
        raise ConfigError(f"expected a mapping of key: value at the top level, got {kind}", file=file_name)
    merged = dict(data)
    override_values = parse_overrides(overrides)
    for key in override_values:
        name = canonical_key(key)
        if name is None:
            if key in OTHER_KNOWN_KEYS:
                continue  # checked with the rest; it replaces the file's value of the same key
            raise ConfigError(f"unknown key{_suggestion(key)} (from a command-line override)", key=key)
        for existing in list(merged):
            if isinstance(existing, str) and existing != key and canonical_key(existing) == name:
                del merged[existing]
    merged.update(override_values)
    return DPOConfig.from_mapping(merged, file=file_name, cli_keys=tuple(override_values))


# --------------------------------------------------------------------------------------------------------------------
# Documentation


def config_table_markdown() -> str:
    """A Markdown table of every config key: key | aliases | type | default | description (for the README)."""
    lines = ["| key | aliases | type | default | description |", "|---|---|---|---|---|"]
    for name, info in DPOConfig.model_fields.items():
        aliases = ", ".join(f"`{alias}`" for alias in _field_extra(name).get("aliases", []))
        description = (info.description or "").replace("|", "\\|").replace("\n", " ")
        type_text = _describe_field(name).replace("|", "\\|")
        lines.append(f"| `{name}` | {aliases} | {type_text} | `{_format_default(info.default)}` | {description} |")
        if name == "loop":
            from preftune.loop_config import loop_keys_table_rows

            for key, default, doc in loop_keys_table_rows():
                escaped = doc.replace("|", "\\|")
                lines.append(f"| `{key}` |  | loop setting | `{_format_default(default)}` | {escaped} |")
    return "\n".join(lines) + "\n"
