"""The one configuration schema of preftune: YAML files, command-line overrides and the Python API.

``DPOConfig`` takes TRL's ``DPOConfig`` / transformers ``TrainingArguments`` keyword names (``beta``,
``loss_type``, ``learning_rate``, ...) and also LLaMA-Factory's names as aliases (``pref_beta``, ``pref_loss``,
``cutoff_len``, ...), so an existing TRL script or LLaMA-Factory YAML runs with few or no edits. Defaults follow
TRL 1.16 except where noted in a field's description (``bf16``, ``gradient_checkpointing``,
``output_dir``, ``overwrite_output_dir``).

Every way of building a config reports problems as :class:`~preftune.errors.ConfigError` naming the key, the
file (when there is one), the value given and what was expected:

* ``DPOConfig(beta=0.2, ...)`` - the Python API, like TRL's ``DPOConfig(...)``;
* :func:`load_config` - a YAML file plus ``key=value`` overrides (``preftune train cfg.yaml beta=0.2``);
* :meth:`DPOConfig.from_mapping` - any mapping, e.g. one already read from YAML.

Keys that belong to features preftune does not implement yet (TRL and LLaMA-Factory options such as
``precompute_ref_log_probs`` or ``rpo_alpha``) are part of the schema so that configs carrying them at their
"off" value still load; any other value raises ``ConfigError("... not supported yet: <key>")`` rather than being
silently ignored.

Relative paths (``model_name_or_path``, ``dataset_dir``, ``output_dir``, ...) are kept as given and resolve against
the current directory, as in LLaMA-Factory; nothing here checks that files exist (the data and model layers do).
"""

from __future__ import annotations

import contextvars
import difflib
import logging
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from preftune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "DPOConfig",
    "SUPPORTED_LOSS_TYPES",
    "SUPPORTED_LR_SCHEDULERS",
    "canonical_key",
    "config_table_markdown",
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
# given only warmup and total steps; the second needs lr_scheduler_kwargs or evaluation metrics, which preftune
# does not pass yet.
SUPPORTED_LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)  # fmt: skip
LATER_LR_SCHEDULERS = (
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "reduce_lr_on_plateau", "greedy",
)  # fmt: skip

SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf")

# Values of `fsdp` (transformers' option words) preftune runs.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap")

# LLaMA-Factory stages that are not preference tuning: preftune runs stages dpo and kto only.
OTHER_STAGES = ("pt", "sft", "rm", "ppo")

# --------------------------------------------------------------------------------------------------------------------
# Field helpers


def _field(default: Any, description: str, *, aliases: Sequence[str] = (), **constraints: Any) -> Any:
    """A supported field; ``aliases`` are other accepted spellings (LLaMA-Factory's names)."""
    return Field(default, description=description, json_schema_extra={"aliases": list(aliases)}, **constraints)


def _later(
    default: Any,
    description: str,
    *,
    type_name: str,
    accepted: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    hint: str = "",
) -> Any:
    """A key of a feature not implemented yet: accepted at ``default`` (or one of ``accepted``), refused otherwise."""
    extra = {
        "aliases": list(aliases),
        "not_supported": True,
        "accepted": list(accepted) if accepted is not None else [default],
        "type_name": type_name,
        "hint": hint,
    }
    text = f"Not supported yet: accepted only at {_format_default(default)}. {description}"
    return Field(default, description=text, json_schema_extra=extra)


def _format_default(value: Any) -> str:
    """A default written the way YAML would spell it (null, true, "none", [])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


# --------------------------------------------------------------------------------------------------------------------
# Where the values being validated come from, so that validators can name the file and the key as the user wrote it.


@dataclass
class _Source:
    file: str | None = None
    cli_keys: frozenset[str] = frozenset()
    given_names: dict[str, str] = field(default_factory=dict)  # canonical name -> name as written


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

    Build it from Python (``DPOConfig(output_dir="out", beta=0.1)``), from a mapping
    (:meth:`from_mapping`) or from YAML (:func:`load_config`). Aliases (LLaMA-Factory names) are accepted on input
    and mapped to the canonical name; attributes and :meth:`to_dict` use canonical names only. Any invalid key or
    value raises :class:`~preftune.errors.ConfigError`; assignment to a field is validated the same way.
    """

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        allow_inf_nan=False,
        coerce_numbers_to_str=True,  # `run_name: 2024` or `template: 123` become strings, as YAML users expect
    )

    _config_file: str | None = PrivateAttr(default=None)

    # ---- Model -----------------------------------------------------------------------------------------------------
    model_name_or_path: str | None = _field(
        None, "Policy model: a local directory or a Hub id (loaded with `AutoModelForCausalLM.from_pretrained`)."
    )
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
    finetuning_type: Literal["full", "lora", "freeze"] = _field(
        "full",
        "Which weights are trained (LLaMA-Factory): `full`, or `lora` (a LoRA adapter via peft; the reference is then "
        "the same model with the adapter disabled). `freeze` is refused (not supported yet).",
    )
    stage: Literal["dpo", "kto"] = _field(
        "dpo",
        "Training stage (LLaMA-Factory): `dpo`, or `kto` (the same as `loss_type: kto`). Other stages are refused.",
    )
    do_train: bool = _field(
        True, "Train the model (LLaMA-Factory); `false` skips training. transformers defaults to false but ignores it."
    )
    do_eval: bool = _field(
        False, "Evaluate on the evaluation split at the end of training even when `eval_strategy` is `no`."
    )

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
    max_samples: int | None = _field(None, "Use at most this many training rows; `null` uses all.", ge=1)
    max_length: int | None = _field(
        1024,
        "Maximum tokens of prompt + completion per sequence; longer sequences are truncated per `truncation_mode`. "
        "`null` disables truncation.",
        aliases=["cutoff_len"],
        ge=1,
    )
    truncation_mode: Literal["keep_start", "keep_end"] = _field(
        "keep_start", "Which end of an over-long sequence is kept: `keep_start` drops tokens from the end."
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
    dataloader_num_workers: int = _field(0, "DataLoader worker processes; 0 loads batches in the main process.", ge=0)

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
        "off); logged as `nll_loss`.",
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

    # ---- Optimisation ----------------------------------------------------------------------------------------------
    learning_rate: float = _field(1e-6, "Peak learning rate of AdamW (TRL's DPO default).", ge=0)
    weight_decay: float = _field(0.0, "AdamW (decoupled) weight decay.", ge=0)
    adam_beta1: float = _field(0.9, "AdamW β1.", ge=0, lt=1)
    adam_beta2: float = _field(0.999, "AdamW β2.", ge=0, lt=1)
    adam_epsilon: float = _field(1e-8, "AdamW ε.", ge=0)
    optim: str = _field(
        "adamw_torch_fused",
        "Optimizer: `adamw_torch_fused` (TRL 1.16's default: torch's fused AdamW kernel, on CPU too; about 4x faster "
        "than the per-tensor loop for a 20 M model), `adamw_torch` (torch's AdamW, default implementation) or "
        "`adamw_hf` (an alias of `adamw_torch`). Where the fused kernel is unavailable it falls back, with a warning.",
    )
    per_device_train_batch_size: int = _field(8, "Preference pairs per device per micro-batch in training.", ge=1)
    per_device_eval_batch_size: int = _field(8, "Preference pairs per device per batch in evaluation.", ge=1)
    gradient_accumulation_steps: int = _field(1, "Micro-batches accumulated before each optimizer step.", ge=1)
    num_train_epochs: float = _field(3.0, "Passes over the training data (a fraction stops mid-epoch).", ge=0)
    max_steps: int = _field(-1, "If > 0: total optimizer steps, overriding `num_train_epochs`.")
    lr_scheduler_type: str = _field(
        "linear",
        "Learning-rate schedule after warmup: " + ", ".join(f"`{name}`" for name in SUPPORTED_LR_SCHEDULERS) + ".",
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
    bf16: bool = _field(False, "bfloat16 mixed precision (TRL defaults to true when fp16 is off; preftune to false).")
    fp16: bool = _field(False, "float16 mixed precision (needs a GPU; the trainer refuses it on CPU).")
    gradient_checkpointing: bool = _field(
        False, "Recompute activations in backward to save memory (TRL defaults to true; preftune to false)."
    )
    disable_dropout: bool = _field(True, "Set every dropout probability in policy and reference models to 0.")
    prefix_sharing: bool | None = _field(
        None,
        "One sequence per pair, prompt | chosen | rejected: the prompt is computed once; a 4-D mask hides the chosen "
        "response from the rejected one (Wang & Hegde 2024). Same log-probs as the plain layout. `null` (auto): on "
        "for llama, mistral, qwen2 and qwen3 models with sdpa or eager attention, off otherwise.",
    )
    padding_free: bool | None = _field(
        None,
        "Compute no padding: the forward runs row by row, each at its own length (exact). `null` (auto): where "
        "prefix sharing is supported, per batch when its rows average >= 256 tokens (shorter rows run faster "
        "padded).",
    )
    chunked_lm_head: bool = _field(
        True,
        "Compute label log-probs from the final hidden states chunk by chunk, with a custom backward: no "
        "batch x length x vocabulary logits tensor. Used for llama, mistral, qwen2 and qwen3 models; other "
        "model types fall back to full logits.",
    )
    lm_head_chunk_size: int = _field(1024, "Tokens per chunk of the chunked LM head.", ge=1)
    torch_compile: bool = _field(
        False,
        "Compile the transformer body of policy and reference with `torch.compile(dynamic=True)` (the LM head stays "
        "eager: it is the chunked head's). Costs a one-off compilation (tens of seconds on CPU, needs a C++ "
        "compiler there); then each step runs faster (see the README's benchmark).",
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

    # ---- Logging, evaluation, saving -------------------------------------------------------------------------------
    logging_steps: float = _field(
        10, "Log metrics every N optimizer steps (whole number >= 1) or every fraction (< 1) of total steps.", gt=0
    )
    logging_first_step: bool = _field(False, "Also log after the first optimizer step.")
    eval_strategy: Literal["no", "steps", "epoch"] = _field(
        "no", "When to evaluate: `no`, every `eval_steps` (`steps`) or at each epoch end (`epoch`).",
        aliases=["evaluation_strategy"],
    )  # fmt: skip
    eval_steps: float | None = _field(
        None, "Evaluate every N steps (or fraction of total steps) with `eval_strategy: steps`; `null` uses "
        "`logging_steps`.", gt=0,
    )  # fmt: skip
    save_strategy: Literal["no", "steps", "epoch"] = _field(
        "steps", "When to save a checkpoint: `no`, every `save_steps` (`steps`) or at each epoch end (`epoch`)."
    )
    save_steps: float = _field(
        500, "Save a checkpoint every N steps (whole number >= 1) or every fraction (< 1) of total steps.", gt=0
    )
    save_total_limit: int | None = _field(
        None, "Keep at most this many checkpoints, deleting the oldest; `null` or 0 keeps all.", ge=0
    )
    output_dir: str = _field("output/dpo_metrics", "Where checkpoints, metrics, plots and the final model are written.")
    overwrite_output_dir: bool = _field(
        True, "Allow writing into a non-empty `output_dir` (LLaMA-Factory); `false` refuses to."
    )
    report_to: str | list[str] = _field(
        "none", "Experiment trackers; only `none` (or `[]`) is supported yet: metrics go to files in `output_dir`."
    )
    plot_loss: bool = _field(True, "Save plots of the logged loss and reward curves in `output_dir` (LLaMA-Factory).")
    run_name: str | None = _field(None, "A name for the run, recorded in the metrics summary.")
    save_only_model: bool = _field(
        False, "Checkpoints hold the model only, without optimizer and scheduler state (so they cannot resume)."
    )
    resume_from_checkpoint: str | None = _field(
        None,
        "Resume from a checkpoint folder, or `latest` (the newest intact `checkpoint-N` in `output_dir`; a damaged one "
        "is skipped with a warning). Weights, optimizer, scheduler, RNG states, data position and metrics continue "
        "exactly where the checkpoint left off.",
    )
    nonfinite_loss: Literal["stop", "skip"] = _field(
        "stop",
        "On a non-finite loss or gradient: `stop` with a message naming the step and the batch's rows, or `skip` the "
        "update (counted in `summary.json`). No checkpoint with non-finite weights is ever written.",
    )
    ddp_timeout: int = _field(1800, "Timeout in seconds for distributed-process collectives.", ge=1)
    fsdp: str | list[str] | None = _field(
        None,
        "FSDP2 (torch `fully_shard`) with several processes: `full_shard` (parameters, gradients and optimizer states "
        "sharded; each decoder layer and then the whole model) or `shard_grad_op` (parameters kept gathered between "
        "forward and backward); `auto_wrap` is accepted (the wrapping is always per decoder layer). Full or LoRA; a "
        "separate reference model is sharded too. Checkpoints and the final model hold the whole weights and "
        "optimizer state (the files of a one-process run). Not with `padding_free` or `sync_ref_model`; ignored with "
        "one process.",
    )
    deepspeed: str | dict[str, Any] | None = _field(
        None,
        "DeepSpeed ZeRO with several processes: a DeepSpeed JSON config file (or a dict), as in transformers and "
        "LLaMA-Factory; stages 0-3 with optimizer/parameter offload. `\"auto\"` values are filled from this config "
        "(batch, accumulation, clipping, precision, bucket sizes); `optimizer`/`scheduler` sections are refused "
        "(preftune builds AdamW and the schedule). Checkpoints hold the whole weights and optimizer state (the files "
        "of an FSDP run) and resume with the same number of processes. Not with `fsdp`, `padding_free`, "
        "`sync_ref_model` or `nonfinite_loss: skip`; ignored with one process. Needs `pip install deepspeed`.",
    )
    nproc: int | None = _field(
        None,
        "Training processes (one per device). `preftune train` re-launches itself under torchrun with this many; "
        "under torchrun or `accelerate launch` it must match their process count. The global batch is "
        "`per_device_train_batch_size` × processes × `gradient_accumulation_steps`.",
        ge=1,
    )
    use_cpu: bool = _field(False, "Run on CPU even when an accelerator is available.")
    remove_unused_columns: bool = _field(
        True, "Accepted for TRL compatibility and has no effect: preftune keeps only the columns it needs."
    )
    dataloader_drop_last: bool = _field(False, "Drop the last incomplete training batch of each epoch.")
    lora_rank: int = _field(8, "LoRA rank (only with `finetuning_type: lora`).", ge=1)
    lora_alpha: int | None = _field(
        None, "LoRA scaling α; `null` uses 2 × `lora_rank` (only with `finetuning_type: lora`).", ge=1
    )
    lora_dropout: float = _field(0.0, "LoRA dropout (only with `finetuning_type: lora`).", ge=0, lt=1)
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
    precompute_ref_log_probs: bool = _field(
        False,
        "Compute the reference log-probs of every train and eval row in one pass before training and keep no "
        "reference model in memory while training. Stored in a cache keyed by the reference weights, the tokenized "
        "data and the settings (under `$PREFTUNE_CACHE`); a rerun with the same inputs reuses it.",
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

    # ---- Keys of features not implemented yet (accepted only at their "off" value) ---------------------------------
    pref_bco_weight: Any = _later(0.0, "BCO weight mixed into the DPO loss (LLaMA-Factory).", type_name="float")
    pad_to_multiple_of: Any = _later(
        None, "Pad sequences to a multiple of this length (TRL's `auto` is accepted too).",
        type_name="int or null", accepted=[None, "auto"],
    )  # fmt: skip
    flash_attn: Any = _later("auto", "Attention implementation (LLaMA-Factory).", type_name="string")
    push_to_hub: Any = _later(False, "Upload the model to the Hugging Face Hub.", type_name="bool")
    hub_model_id: Any = _later(None, "Hub repository to push to.", type_name="string or null")
    gradient_checkpointing_kwargs: Any = _later(
        None, "Extra arguments for gradient checkpointing.", type_name="dict or null", accepted=[None, {}]
    )
    model_init_kwargs: Any = _later(
        None, "Extra arguments for `from_pretrained`.", type_name="dict or null", accepted=[None, {}]
    )
    lr_scheduler_kwargs: Any = _later(
        None, "Extra arguments for the learning-rate schedule.", type_name="dict or null", accepted=[None, {}]
    )
    activation_offloading: Any = _later(False, "Offload activations to the CPU.", type_name="bool")
    use_liger_kernel: Any = _later(False, "Liger Triton kernels.", type_name="bool")
    logging_strategy: Any = _later(
        "steps", "Logging schedule; preftune logs every `logging_steps`.", type_name="string"
    )
    pad_token: Any = _later(None, "Deprecated in TRL: set `tokenizer.pad_token` instead.", type_name="string or null")
    max_prompt_length: Any = _later(
        None, "Removed in TRL 1.x.", type_name="int or null",
        hint="TRL 1.x removed it; use max_length, which bounds prompt + completion",
    )  # fmt: skip
    max_completion_length: Any = _later(
        None, "Removed in TRL 1.x.", type_name="int or null",
        hint="TRL 1.x removed it; use max_length, which bounds prompt + completion",
    )  # fmt: skip

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
        token = _SOURCE.set(_Source(file=self._config_file))
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
        if value not in SUPPORTED_LR_SCHEDULERS:
            expected = ", ".join(SUPPORTED_LR_SCHEDULERS)
            raise _error(f"got {_short_repr(value)}; expected one of {expected}", "lr_scheduler_type")
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
    def _no_trackers(cls, value: str | list[str]) -> str:
        if value in ("none", [], ["none"]):
            return "none"
        shown = value if isinstance(value, str) else ",".join(value)
        raise _error(f"not supported yet: report_to={shown}", "report_to")

    @field_validator("fsdp")
    @classmethod
    def _fsdp_options(cls, value: str | list[str] | None) -> str | None:
        words = (value.split() if isinstance(value, str) else list(value or []))
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
            from preftune.zero import read_deepspeed_config

            try:
                read_deepspeed_config(value)
            except ConfigError as error:
                raise _error(error.message, "deepspeed") from None
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> DPOConfig:
        """Refuse settings that cannot work together; warn about settings that will be ignored."""
        if self.fp16 and self.bf16:
            raise _error("fp16 and bf16 are both true; choose one mixed-precision mode", "fp16")
        if self.stage == "kto":
            if "loss_type" in self.model_fields_set and self.loss_type != "kto":
                raise _error(f"stage kto trains with loss_type kto; got loss_type={self.loss_type}", "loss_type")
            self.__dict__["loss_type"] = "kto"  # plain assignment would re-run validation
        self._check_loss_settings()
        self._check_sharding_settings()
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
                "kto's KL estimate pairs rows of each batch on the fly, so its reference log-probs cannot be precomputed",
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
        """``torch_dtype`` as a ``torch.dtype``; ``"auto"`` stays the string ``"auto"``; None stays None.

        The result can be passed as ``dtype=`` to ``from_pretrained``.
        """
        if self.torch_dtype is None or self.torch_dtype == "auto":
            return self.torch_dtype
        import torch

        return getattr(torch, self.torch_dtype)

    def resolved_warmup_steps(self, total_steps: int) -> int:
        """Warmup optimizer steps for a run of ``total_steps``: ``warmup_steps`` if > 0, else from ``warmup_ratio``."""
        if self.warmup_steps > 0:
            return interval_to_steps(self.warmup_steps, total_steps)
        return math.ceil(self.warmup_ratio * total_steps)

    def to_dict(self) -> dict[str, Any]:
        """Resolved values by canonical name, JSON-serialisable (for summary.json).

        Keys of not-yet-supported features are left out: they always hold their "off" value.
        """
        return self.model_dump(mode="json", exclude=set(_LATER_FIELDS))


# --------------------------------------------------------------------------------------------------------------------
# Key and value screening (runs before pydantic's type validation, so that the messages are ours)


def _field_extra(name: str) -> dict[str, Any]:
    extra = DPOConfig.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


_FIELD_NAMES: tuple[str, ...] = tuple(DPOConfig.model_fields)
_ALIASES: dict[str, str] = {
    alias: name for name in _FIELD_NAMES for alias in typing.cast(list, _field_extra(name).get("aliases", []))
}
_LATER_FIELDS: tuple[str, ...] = tuple(name for name in _FIELD_NAMES if _field_extra(name).get("not_supported"))
_ALL_KEYS: tuple[str, ...] = _FIELD_NAMES + tuple(_ALIASES)


def canonical_key(key: str) -> str | None:
    """The canonical field name for ``key`` (a field name or an alias), or None if it is not a config key."""
    if key in DPOConfig.model_fields:
        return key
    return _ALIASES.get(key)


def _suggestion(key: str) -> str:
    close = difflib.get_close_matches(key, _ALL_KEYS, n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower().replace("-", "_"), _ALL_KEYS, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _canonical_items(data: Mapping[Any, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Rename aliases to canonical names; refuse non-string, unknown and doubly-given keys."""
    canonical: dict[str, Any] = {}
    given_names: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise _error(f"key {_short_repr(key)} is not a string", None)
        name = canonical_key(key)
        if name is None:
            source = _SOURCE.get() or _Source()
            if key in source.cli_keys:
                raise ConfigError(f"unknown key{_suggestion(key)} (from a command-line override)", key=key)
            raise ConfigError(f"unknown key{_suggestion(key)}", key=key, file=source.file)
        if name in canonical:
            first = given_names[name]
            raise _error(f"both '{first}' and '{key}' are given; they set the same value ('{name}'): keep one", name)
        canonical[name] = value
        given_names[name] = key
    return canonical, given_names


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
        if _is_same(value, candidate) and bool(value == candidate):
            return True
    return False


def _screen_value(name: str, value: Any) -> Any:
    """Normalise TRL/LLaMA-Factory spellings of a value and refuse values of features not implemented yet."""
    extra = _field_extra(name)
    if extra.get("not_supported"):
        if not _equal_to_any(value, extra["accepted"]):
            hint = f" ({extra['hint']})" if extra.get("hint") else ""
            raise _error(f"not supported yet: {_given_name(name)}{hint}; got {_short_repr(value)}", name)
        return value

    annotation = DPOConfig.model_fields[name].annotation
    if isinstance(value, bool) and not _accepts_bool(annotation):
        raise _error(f"got {value!r} (bool); expected {_describe_field(name)}", name)

    if name == "rpo_alpha" and _is_same(value, 0) and value == 0:
        value = None  # LLaMA-Factory's pref_ftx: 0 means no SFT term
    elif name == "loss_type":
        value = _screen_loss_type(value)
    elif name == "stage" and isinstance(value, str) and value not in ("dpo", "kto"):
        if value in OTHER_STAGES:
            raise _error(f"preftune runs stages dpo and kto only; got stage={value}", name)
    elif name == "finetuning_type" and value == "freeze":
        raise _error(f"not supported yet: finetuning_type={value}", name)
    elif name == "report_to" and value is None:
        value = "none"  # transformers' older default
    elif name == "torch_dtype" and type(value).__module__ == "torch" and str(value).startswith("torch."):
        value = str(value).removeprefix("torch.")  # DPOConfig(torch_dtype=torch.bfloat16)
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


# --------------------------------------------------------------------------------------------------------------------
# Turning pydantic's errors into ours


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
    extra = _field_extra(name)
    if extra.get("type_name"):
        return str(extra["type_name"])
    annotation = DPOConfig.model_fields[name].annotation
    bounds = _describe_constraints(name)
    if not bounds:
        return _describe_type(annotation)
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return " or ".join(
        _describe_type(arg) + (f" {bounds}" if arg in (int, float) else "") for arg in args
    )


def _convert_validation_error(error: ValidationError) -> ConfigError:
    """One ConfigError for a pydantic ValidationError: the first problem, then any others, one clause each."""
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
    return "\n".join(lines) + "\n"
