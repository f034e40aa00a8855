"""DPO training: a TRL-shaped ``DPOTrainer`` whose ``train()`` is one explicit loop.

Flow: config → data → batches → log-probs → loss → optimizer step → metrics/checkpoints.
``DPOTrainer.__init__`` validates the configuration and sets up tokenizer, models and data;
``train()`` reads top to bottom: build optimizer and schedule, then for each optimizer step
accumulate gradients over micro-batches, clip, step, log, evaluate and save.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from preftune.adapters import (
    apply_lora,
    check_quantization,
    is_peft_model,
    lora_config_from_args,
    merge_and_save,
    peft_model_of,
    save_adapter,
)
from preftune.checkpoint import (
    checkpoint_run,
    claim_output_dir,
    new_run_id,
    prune_checkpoints,
    read_checkpoint,
    resolve_resume_path,
    restore_rng_states,
    rng_states,
    write_checkpoint,
)
from preftune.config import DPOConfig, interval_to_steps
from preftune.cpu_memory import keep_freed_memory
from preftune.data.batching import plan_batches, row_token_counts
from preftune.data.collate import PreferenceBatch, collate_pairs, collate_shared_prefix, mismatched_examples
from preftune.data.pipeline import default_cache_dir, prepare_data
from preftune.distributed import (
    build_accelerator,
    check_distributed_settings,
    full_optimizer_state,
    full_state_dict,
    gather_objects,
    load_full_optimizer_state,
    rank_share,
    shard_model,
)
from preftune.errors import CheckpointError, ConfigError, PreftuneError
from preftune.logprobs import CHUNKED_HEAD_MODEL_TYPES, completion_logprobs, pair_logprobs, unwrap_model
from preftune.losses import LossInputs, LossParams, compute_preference_loss, kto_loss
from preftune.metrics import MetricAccumulator, RunRecorder, pair_metric_sums, peak_memory_mb, unpaired_metric_sums
from preftune.models import disable_dropout, ensure_pad_token, load_causal_lm, load_tokenizer
from preftune.preflight import check_resume_fingerprint, run_fingerprint, run_preflight_checks, start_fresh_run
from preftune.ref_cache import PrecomputedReference, attach_reference_logps, precompute_reference_logps, reference_fingerprint
from preftune.reference import (
    AdapterCopyReference,
    AdapterDisabledReference,
    FrozenReference,
    Reference,
    build_reference,
    sync_reference,
)
from preftune.zero import (
    initialize_policy,
    initialize_reference,
    load_whole_optimizer_state,
    read_deepspeed_config,
    resolve_deepspeed_config,
    start_deepspeed,
    whole_optimizer_state,
    whole_state_dict,
    zero_stage,
)

logger = logging.getLogger(__name__)


class TrainingError(PreftuneError):
    """Training cannot go on (e.g. a non-finite loss)."""


class TrainOutput(NamedTuple):
    """What ``train()`` returns, shaped like transformers' ``TrainOutput``."""

    global_step: int
    training_loss: float
    metrics: dict[str, Any]


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)


def _check_supported(args: DPOConfig, accelerator: Accelerator) -> None:
    """Fail fast on settings that cannot work here."""
    check_quantization(args.quantization_bit, accelerator.device.type)
    if args.quantization_bit is not None:  # bitsandbytes and a GPU are there, but quantized loading is not built yet
        raise ConfigError("not supported yet: loading the model quantized (QLoRA)", key="quantization_bit")
    if args.fp16 and accelerator.device.type == "cpu":
        raise ConfigError("fp16 is not supported on CPU (no fp16 autocast there); use bf16: true or fp32", key="fp16")
    if args.bf16 and accelerator.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("bf16 requested but this GPU does not support bfloat16; use fp16 or fp32", key="bf16")


@dataclass(frozen=True)
class BatchLayout:
    """How pairs are laid out for the forward pass (all layouts give the same log-probs)."""

    prefix_sharing: bool
    padding_free: bool | None  # None: decided per batch (``padding_free_pays``)


def resolve_layout(args: DPOConfig, *models: nn.Module | None) -> BatchLayout:
    """Resolve ``prefix_sharing``/``padding_free``: explicit values win; ``None`` means on where supported.

    Supported: every model is of a type whose 4-D masks and position ids are tested
    (``CHUNKED_HEAD_MODEL_TYPES``) and uses sdpa or eager attention (flash-attention takes no 4-D mask).
    """
    supported = all(
        getattr(unwrap_model(m).config, "model_type", None) in CHUNKED_HEAD_MODEL_TYPES
        and getattr(unwrap_model(m).config, "_attn_implementation", None) in ("sdpa", "eager")
        for m in models
        if m is not None
    )
    if args.prefix_sharing and not supported:
        logger.warning("prefix_sharing requested for a model without tested 4-D mask support; results may differ")
    prefix_sharing = supported if args.prefix_sharing is None else bool(args.prefix_sharing)
    padding_free = (None if supported else False) if args.padding_free is None else bool(args.padding_free)
    layout = BatchLayout(prefix_sharing=prefix_sharing, padding_free=padding_free)
    logger.info("batch layout: prefix_sharing=%s, padding_free=%s", layout.prefix_sharing, layout.padding_free)
    return layout


class DPOTrainer:
    """Direct Preference Optimization, with TRL's constructor and methods.

    Args:
        model: a loaded causal LM, or a path/hub id (default: ``args.model_name_or_path``).
        ref_model: the frozen reference, loaded or a path; default: a frozen copy of ``model`` as loaded.
        args: a ``DPOConfig``.
        train_dataset, eval_dataset: a ``datasets.Dataset``, a list of dicts, a file path or a registered
            dataset name (default: ``args.dataset`` / ``args.eval_dataset``).
        processing_class (alias ``tokenizer``): the tokenizer (default: loaded from the model path).
        peft_config: a peft ``LoraConfig`` (or set ``finetuning_type: lora``); the reference is then the policy with
            its adapter disabled, unless a ``ref_model`` is given.
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        ref_model: nn.Module | str | None = None,
        args: DPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        tokenizer: Any = None,
        peft_config: Any = None,
    ) -> None:
        self.args = args if args is not None else DPOConfig()
        run_preflight_checks(  # errors first: paths, keys and the resume target, before any model loads
            self.args, model=model, ref_model=ref_model, train_dataset=train_dataset, eval_dataset=eval_dataset,
            tokenizer=processing_class if processing_class is not None else tokenizer,
        )
        # accelerate keeps one process-wide state; a second trainer in the same process (tests, notebooks)
        # may ask for another precision. The distributed (partial) state is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = build_accelerator(self.args)
        self.world_size, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.fsdp = self.args.fsdp if self.world_size > 1 else None  # FSDP2 options, with several processes only
        if self.args.fsdp and not self.fsdp:
            logger.warning("fsdp: %s ignored: this run has one process", self.args.fsdp)
        # DeepSpeed ZeRO (preftune.zero), with several processes only: the engine is made in train()
        self.deepspeed = read_deepspeed_config(self.args.deepspeed) if self.args.deepspeed and self.world_size > 1 else None
        if self.args.deepspeed and not self.deepspeed:
            logger.warning("deepspeed ignored: this run has one process")
        self.zero_stage = zero_stage(self.deepspeed) if self.deepspeed else None
        # Parameters partitioned across processes: every forward is a collective, so all processes run the same ones.
        self.lockstep_forwards = bool(self.fsdp) or self.zero_stage == 3
        self._engine = None  # the DeepSpeedEngine while training under DeepSpeed
        _check_supported(self.args, self.accelerator)
        check_distributed_settings(self.args, self.accelerator)
        if not self.accelerator.is_main_process:  # replicas log warnings and errors only
            logging.getLogger("preftune").setLevel(logging.WARNING)
        if self.args.keep_freed_cpu_memory and self.accelerator.device.type == "cpu":
            keep_freed_memory()
        set_seed(self.args.seed)  # the same seed on every process (see preftune.distributed)
        self.loss_params = LossParams.from_config(self.args)
        self.loss_params.validate()
        self.state = TrainerState()
        self._token_counts: dict[tuple[int, int], list[int]] = {}  # per dataset, for token-budget batching

        model = model if model is not None else self.args.model_name_or_path
        if model is None:
            raise ConfigError("no model given: set model_name_or_path", key="model_name_or_path")
        self.tokenizer = processing_class if processing_class is not None else tokenizer
        if self.tokenizer is None:
            source = self.args.tokenizer_name_or_path or (model if isinstance(model, str) else model.name_or_path)
            self.tokenizer = load_tokenizer(source, trust_remote_code=self.args.trust_remote_code)
        ensure_pad_token(self.tokenizer)
        self._setup_models(model, ref_model, peft_config)

        train_source = train_dataset if train_dataset is not None else self.args.dataset
        if train_source is None and self.args.do_train:
            raise ConfigError("no training data: set dataset (or pass train_dataset=)", key="dataset")
        eval_source = eval_dataset if eval_dataset is not None else self.args.eval_dataset
        with self.accelerator.local_main_process_first():  # each machine's main process fills its caches first
            self.data = prepare_data(self.args, self.tokenizer, train_source, eval_source) if train_source is not None else None
            if self.data is not None:
                _check_data_fits_loss(self.args, self.loss_params, self.data)
                if self.args.precompute_ref_log_probs and self.reference is not None:
                    self._precompute_reference()
        recorder = RunRecorder if self.accelerator.is_main_process else _ReplicaRecorder
        self.recorder = recorder(self.args.output_dir, plot=self.args.plot_loss)
        self.state.log_history = self.recorder.history

    # ----------------------------------------------------------------- setup
    def _load_model(self, model: nn.Module | str, key: str) -> nn.Module:
        if isinstance(model, nn.Module):
            return model
        return load_causal_lm(model, dtype=self.args.torch_dtype, trust_remote_code=self.args.trust_remote_code, key=key)

    def _setup_models(self, model: nn.Module | str, ref_model: nn.Module | str | None, peft_config: Any) -> None:
        """Policy (with a LoRA adapter when asked), reference, layout, dropout, checkpointing, compilation."""
        self.model = self._load_model(model, "model_name_or_path")
        if peft_config is None and self.args.finetuning_type == "lora":
            peft_config = lora_config_from_args(self.args)
        if peft_config is not None or is_peft_model(self.model):
            self.model = apply_lora(self.model, peft_config)
        self.reference = self._build_reference(ref_model)
        if self.args.sync_ref_model and not isinstance(self.reference, FrozenReference):
            raise ConfigError(
                "sync_ref_model needs a separate reference model, not a LoRA adapter-disabled or adapter-copy reference",
                key="sync_ref_model",
            )
        reference_model = self.reference.model if self.reference is not None else None
        self.layout = resolve_layout(self.args, self.model, reference_model)
        if (self.fsdp or self.deepspeed) and self.layout.padding_free is None:  # every process runs the same forwards
            self.layout = BatchLayout(prefix_sharing=self.layout.prefix_sharing, padding_free=False)
        distinct = [m for m in (self.model, reference_model) if m is not None]
        distinct = [m for i, m in enumerate(distinct) if all(m is not other for other in distinct[:i])]
        if self.args.disable_dropout:
            for module in distinct:
                disable_dropout(module)
        if self.args.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
            if is_peft_model(self.model):  # frozen embeddings: checkpointed blocks need inputs that require grad
                self.model.enable_input_require_grads()
        if self.args.torch_compile:
            for module in distinct:
                compile_body(module)

    def _build_reference(self, ref_model: nn.Module | str | None) -> Reference | None:
        """None for reference-free losses; else a given model, the policy with its adapter disabled (LoRA), a
        frozen copy of an already-trained adapter, or a frozen copy of the policy as loaded (``build_reference``)."""
        if not self.loss_params.needs_reference:
            if ref_model is not None:
                raise ConfigError(
                    f"loss {self.args.loss_type} uses no reference model, but ref_model was given; leave it out",
                    key="ref_model",
                )
            return None
        ref_model = ref_model if ref_model is not None else self.args.ref_model_name_or_path
        loaded = self._load_model(ref_model, "ref_model") if ref_model is not None else None
        return build_reference(self.model, loaded)

    def _precompute_reference(self) -> None:
        """Score every train/eval row with the reference once (or read the cache), attach the values as a column,
        then drop the reference: no reference model is held while training."""
        reference = self.reference.to(self.accelerator.device)
        options = self._logprob_options()
        model_config = getattr(unwrap_model(reference.model), "config", None)
        key_parts = {  # everything besides the weights and the tokens that changes the values
            "reference": _reference_fingerprint(reference, self.model),
            "model_config": model_config.to_json_string() if model_config is not None else None,
            "mixed_precision": self.accelerator.mixed_precision,
            "ld_alpha": self.args.ld_alpha,
            "chunked_lm_head": self.args.chunked_lm_head,
        }
        collate = collate_shared_prefix if self.layout.prefix_sharing else collate_pairs
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size

        def score(batch: PreferenceBatch) -> torch.Tensor:
            with self.accelerator.autocast():
                return reference.completion_logps(batch, **options)

        for split in ("train", "eval"):
            tokenized = getattr(self.data, split)
            if tokenized is None:
                continue
            result = precompute_reference_logps(
                score, tokenized.dataset, collate_fn=collate, pad_token_id=self.tokenizer.pad_token_id,
                batch_size=batch_size, cache_dir=default_cache_dir().parent / "reference", key_parts=key_parts,
                desc=f"Reference log-probs ({split})", device=self.accelerator.device,
                overwrite=self.args.overwrite_cache and self.accelerator.is_local_main_process,  # others reuse it
            )
            tokenized.dataset = attach_reference_logps(tokenized.dataset, result.values)
            self.data.report[split]["reference_logps"] = {"cache_file": str(result.path), "reused": result.reused}
        self.reference = PrecomputedReference()
        del reference
        gc.collect()

    # ------------------------------------------------------------- batching
    def _batches(self, dataset, batch_size: int, *, shuffle_seed: int | None, drop_last: bool) -> list["_LazyBatch"]:
        """The micro-batches of one pass over ``dataset`` (see ``plan_batches``); collated only when used."""
        budget = self.args.max_tokens_per_batch
        token_counts = None
        if budget:
            key = (id(dataset), len(dataset))
            if key not in self._token_counts:
                self._token_counts[key] = row_token_counts(dataset, prompt_once=self.layout.prefix_sharing)
            token_counts = self._token_counts[key]
        groups = plan_batches(
            len(dataset), batch_size, shuffle_seed=shuffle_seed, drop_last=drop_last, token_counts=token_counts,
            max_tokens=budget,
        )
        collate = collate_shared_prefix if self.layout.prefix_sharing else collate_pairs
        padding_free = self.layout.padding_free
        return [_LazyBatch(dataset, indices, self.tokenizer.pad_token_id, collate, padding_free) for indices in groups]

    def _epoch_windows(self, epoch: int) -> list[list["_LazyBatch"]]:
        """The epoch's micro-batches (shuffled by seed + epoch) grouped into the windows of one optimizer step each:
        ``gradient_accumulation_steps`` x processes micro-batches; every process takes its ``rank_share``."""
        batches = self._batches(
            self.data.train.dataset,
            self.args.per_device_train_batch_size,
            shuffle_seed=self.args.seed + epoch,
            drop_last=self.args.dataloader_drop_last,
        )
        per_step = self.args.gradient_accumulation_steps * self.world_size
        return [batches[i : i + per_step] for i in range(0, len(batches), per_step)]

    def _training_windows(self, total_steps: int) -> Iterator[tuple[int, list["_LazyBatch"], float]]:
        """Yield ``(epoch, window, epoch_progress_after_window)`` until ``total_steps`` windows are given."""
        given, epoch = 0, 0
        while given < total_steps:
            windows = self._epoch_windows(epoch)
            for index, window in enumerate(windows):
                if given == total_steps:
                    return
                given += 1
                yield epoch, window, epoch + (index + 1) / len(windows)
            epoch += 1

    # ------------------------------------------------------------ loss core
    def _batch_loss(self, model: nn.Module, lazy: "_LazyBatch") -> tuple[torch.Tensor, dict[str, float]]:
        """Per-example loss ``(B,)`` for one micro-batch, and its metric sums."""
        if self.loss_params.is_unpaired:
            return self._unpaired_batch_loss(model, lazy)
        batch = lazy.collate().to(self.accelerator.device)
        options = self._logprob_options()
        ref_chosen = ref_rejected = None
        if self.reference is not None:  # first: the policy's head keeps a softmax chunk until its backward
            with self.accelerator.autocast():
                ref_chosen, ref_rejected = self.reference.logps(batch, **options)
        policy = pair_logprobs(model, batch, **options, wpo=self.loss_params.use_weighting)
        out = compute_preference_loss(
            self.loss_params,
            LossInputs(
                policy_chosen_logps=policy.chosen_logps,
                policy_rejected_logps=policy.rejected_logps,
                ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected,
                chosen_lengths=policy.chosen_lengths,
                rejected_lengths=policy.rejected_lengths,
                chosen_wpo_logps=policy.chosen_wpo_logps,
                rejected_wpo_logps=policy.rejected_wpo_logps,
            ),
        )
        sums = pair_metric_sums(
            out.per_example, policy, out.chosen_rewards, out.rejected_rewards, nll=out.nll, components=out.components
        )
        return out.per_example, sums

    def _unpaired_batch_loss(self, model: nn.Module, lazy: "_LazyBatch") -> tuple[torch.Tensor, dict[str, float]]:
        """KTO: completions scored with gradients; the KL estimate from mismatched prompt/completion pairs, without."""
        batch = lazy.collate().to(self.accelerator.device)
        kl_batch = lazy.collate_mismatched(self.args.max_length).to(self.accelerator.device)
        options = self._logprob_options()
        policy = completion_logprobs(model, batch, **options)
        with torch.no_grad():
            policy_kl = completion_logprobs(model, kl_batch, **options).logps[0]
        with self.accelerator.autocast():
            ref = self.reference.completion_logps(batch, **options)[0]
            ref_kl = self.reference.completion_logps(kl_batch, **options)[0]
        params = self.loss_params
        losses = kto_loss(
            policy.logps[0], ref, policy_kl, ref_kl, batch.labels, beta=params.beta,
            desirable_weight=params.desirable_weight, undesirable_weight=params.undesirable_weight,
        )
        kl = (policy_kl - ref_kl).mean().clamp(min=0)
        rewards = params.beta * (policy.logps[0].detach() - ref)
        return losses, unpaired_metric_sums(losses, policy.logps[0], rewards, batch.labels, kl)

    def _logprob_options(self) -> dict[str, Any]:
        return {  # ZeRO-3 keeps no whole output weight for the chunked head: the model's forward projects
            "chunked_head": self.args.chunked_lm_head and self.zero_stage != 3,
            "chunk_size": self.args.lm_head_chunk_size,
            "ld_alpha": self.args.ld_alpha,
        }

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW; no weight decay on biases and normalisation weights (as transformers' Trainer)."""
        decay, no_decay = [], []
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
        groups = [  # no empty group: DeepSpeed's ZeRO-3 drops them, and the schedule must see the same groups
            group
            for group in ({"params": decay, "weight_decay": self.args.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if group["params"]
        ]
        settings = dict(lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
        if self.args.optim == "adamw_torch_fused":
            try:
                return torch.optim.AdamW(groups, fused=True, **settings)
            except (RuntimeError, ValueError) as error:  # a device or dtype without the fused kernel
                logger.warning("fused AdamW unavailable (%s); using the default implementation", error)
        return torch.optim.AdamW(groups, **settings)

    def _total_steps(self) -> tuple[int, int]:
        """``(total optimizer steps, steps per epoch)``."""
        pairs = len(self.data.train.dataset)
        batch = self.args.per_device_train_batch_size
        if self.args.max_tokens_per_batch:
            batches = len(self._batches(self.data.train.dataset, batch, shuffle_seed=None, drop_last=False))
        else:
            batches = pairs // batch if self.args.dataloader_drop_last else math.ceil(pairs / batch)
        if batches == 0:
            raise ConfigError(f"{pairs} training pairs do not fill one batch of {batch}", key="per_device_train_batch_size")
        per_epoch = math.ceil(batches / (self.args.gradient_accumulation_steps * self.world_size))
        if self.args.max_steps > 0:
            return self.args.max_steps, per_epoch
        return max(1, math.ceil(self.args.num_train_epochs * per_epoch)), per_epoch

    # ------------------------------------------------------------------ loop
    def train(self) -> TrainOutput:
        """Run the training loop; write metrics files, checkpoints and the final model into ``output_dir``."""
        if self.data is None:
            raise ConfigError("no training data: set dataset (or pass train_dataset=)", key="dataset")
        args = self.args
        self._prepare_output_dir()
        total_steps, steps_per_epoch = self._total_steps()
        logging_every = interval_to_steps(args.logging_steps, total_steps)
        eval_every = interval_to_steps(args.resolved_eval_steps, total_steps)
        save_every = interval_to_steps(args.save_steps, total_steps)
        warmup = args.resolved_warmup_steps(total_steps)

        saved = self._read_resume_checkpoint(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if self.fsdp:  # FSDP2 replaces the parameters by shards in place: after the weights are loaded, before the
            self._shard_models()  # optimizer takes them
        optimizer = self._optimizer(self.model)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
        run = _RunTotals()
        if self.deepspeed:  # DeepSpeed's engine drives the optimizer (preftune.zero); its state is loaded into the engine
            model = self._start_deepspeed(optimizer)
        start_step = self._restore_training_state(saved, optimizer, scheduler, run) if saved is not None else 0
        if self.fsdp:  # sharded already; accelerate would wrap it in DDP on top
            model, optimizer = self.model, self.accelerator.prepare(optimizer)
        elif not self.deepspeed:
            model, optimizer = self.accelerator.prepare(self.model, optimizer)
        if self.reference is not None and self.zero_stage != 3:
            self.reference.to(self.accelerator.device)
        model.train()
        logger.info(
            "training: %d pairs, %d steps (%d per epoch), batch %d x accumulation %d, loss %s, beta %g",
            len(self.data.train.dataset), total_steps, steps_per_epoch, args.per_device_train_batch_size,
            args.gradient_accumulation_steps, args.loss_type, args.beta,
        )

        start = window_start = time.perf_counter()
        progress = tqdm(total=total_steps, initial=start_step, desc="Training", disable=not self.accelerator.is_main_process)
        for step, (epoch, window, epoch_progress) in enumerate(self._training_windows(total_steps), start=1):
            if step <= start_step:  # resuming: batches are a function of seed and epoch, so skip to the position
                continue
            window_pairs = sum(len(lazy.indices) for lazy in window)  # over all processes
            share = rank_share(window, self.rank, self.world_size)
            step_sums, problem = [], None
            for index, lazy in enumerate(share):
                sync = index == len(share) - 1
                with self.accelerator.no_sync(model) if not sync and not self.deepspeed else nullcontext():
                    if lazy is None:  # a stand-in (the window ran out before this process's share): zero gradient
                        losses, _ = self._batch_loss(model, window[0])
                        self._backward(model, losses.sum() * 0.0, sync)
                        continue
                    losses, sums = self._batch_loss(model, lazy)
                    if not torch.isfinite(losses).all():
                        problem = problem or f"non-finite loss at step {step} on source rows {lazy.source_rows()}"
                        if self.world_size == 1:
                            break  # with several processes every one goes on, so that the collectives stay in step
                    # Sum over pairs / pairs in the window: the same gradient as one batch of the whole window. DDP
                    # averages gradients over processes, hence the factor world_size.
                    self._backward(model, losses.sum() * self.world_size / window_pairs, sync)
                step_sums.append((sums, lazy.num_tokens))
            if self.world_size > 1:  # every process gets the step's metric sums (in window order) and any problem
                gathered = gather_objects((step_sums, problem))
                step_sums = [entry for sums_of_rank, _ in gathered for entry in sums_of_rank]
                problem = next((found for _, found in gathered if found is not None), None)
            # max_grad_norm 0 disables clipping; the norm is still measured (an infinite bound scales nothing).
            grad_norm = float("nan")
            if self.deepspeed and problem is None:  # DeepSpeed clips, steps and zeroes the gradients in one call
                grad_norm = self._deepspeed_step(model, step, window)
            elif problem is None:
                norm = self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
                if not math.isfinite(grad_norm):
                    rows = [row for lazy in window for row in lazy.source_rows()]
                    problem = f"non-finite gradient norm at step {step} (source rows {rows})"
            learning_rate = scheduler.get_last_lr()[0]
            if problem is None:
                if not self.deepspeed:
                    optimizer.step()
                run.add_step(step_sums, window_pairs)
            elif args.nonfinite_loss == "stop":
                raise TrainingError(f"{problem}; nothing was updated (set nonfinite_loss: skip to skip such steps)")
            else:
                logger.warning("%s: update skipped (nonfinite_loss: skip)", problem)
                run.skipped_steps.append(step)
            scheduler.step()
            if not self.deepspeed:  # DeepSpeed's step zeroes its own gradients
                optimizer.zero_grad(set_to_none=True)
            if args.sync_ref_model and step % args.ref_model_sync_steps == 0:
                sync_reference(self.reference, self.accelerator.unwrap_model(model), args.ref_model_mixup_alpha)
            self.state.global_step, self.state.epoch = step, epoch_progress
            end_of_epoch = epoch_progress == epoch + 1

            if step % logging_every == 0 or step == total_steps or (step == 1 and args.logging_first_step):
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "epoch": round(epoch_progress, 4), **run.window.means()}
                record.update(
                    grad_norm=grad_norm,
                    learning_rate=learning_rate,
                    tokens_per_second=run.window_tokens / elapsed if elapsed > 0 else 0.0,
                )
                self.recorder.log(record)
                shown = {"loss": "loss", "margin": "rewards/margins", "acc": "rewards/accuracies", "kl": "kl"}
                progress.set_postfix(
                    {label: f"{record[key]:.4g}" for label, key in shown.items() if key in record},
                    tok_s=f"{record['tokens_per_second']:.0f}",
                )
                run.reset_window()
                window_start = time.perf_counter()

            if self.data.eval is not None and (
                (args.eval_strategy == "steps" and step % eval_every == 0)
                or (args.eval_strategy == "epoch" and end_of_epoch)
            ):
                self.evaluate(model)
                run.last_eval_step = step
                window_start = time.perf_counter()  # eval time is not training throughput
            if (args.save_strategy == "steps" and step % save_every == 0) or (args.save_strategy == "epoch" and end_of_epoch):
                self._save_checkpoint(model, step, optimizer, scheduler, run)
            progress.update(1)
        progress.close()
        runtime = time.perf_counter() - start

        if self.data.eval is not None and run.last_eval_step != self.state.global_step:
            self.evaluate(model)
        self.model = self._unwrap(model)
        self.save_model()
        training_loss = run.run_loss.means().get("loss", float("nan"))
        summary = self._write_summary(runtime, run, training_loss)
        self.accelerator.wait_for_everyone()  # the replicas wait until the main process has written the outputs
        return TrainOutput(self.state.global_step, training_loss, summary)

    def _start_deepspeed(self, optimizer: torch.optim.Optimizer) -> Any:
        """The policy's DeepSpeed engine over ``optimizer``; under stage 3 a separate reference is partitioned too."""
        start_deepspeed()
        hidden_size = getattr(unwrap_model(self.model).config, "hidden_size", None)
        config = resolve_deepspeed_config(self.deepspeed, self.args, self.world_size, hidden_size)
        self._engine = initialize_policy(self.model.to(self.accelerator.device), optimizer, config)
        if self.zero_stage == 3 and isinstance(self.reference, FrozenReference):
            self.reference.model = initialize_reference(self.reference.model.to(self.accelerator.device), config)
        return self._engine

    def _backward(self, model: nn.Module, loss: torch.Tensor, boundary: bool) -> None:
        """One micro-batch's backward; ``boundary``: the last of this process's optimizer step (DeepSpeed reduces
        the gradients then; DDP's reduction is switched by ``no_sync`` around the call)."""
        if self.deepspeed:
            model.set_gradient_accumulation_boundary(boundary)
            model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def _deepspeed_step(self, engine: Any, step: int, window: list["_LazyBatch"]) -> float:
        """``engine.step()`` (clipping to ``gradient_clipping`` = max_grad_norm, the update, zeroed gradients); the
        gradient norm before clipping. DeepSpeed measures it only within its step, so a non-finite norm stops the
        run after that step, before anything is written."""
        engine.step()
        grad_norm = float(engine.get_global_grad_norm())
        if not math.isfinite(grad_norm):
            rows = [row for lazy in window for row in lazy.source_rows()]
            raise TrainingError(
                f"non-finite gradient norm at step {step} (source rows {rows}) under DeepSpeed; stopped, no checkpoint "
                "written after it"
            )
        return grad_norm

    def _unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if self.deepspeed and model is self._engine else self.accelerator.unwrap_model(model)

    def _whole_weights(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole weights when the model is sharded or partitioned (a collective: every process calls it), on the
        main process; None when every process holds them (read them from the model)."""
        if self.fsdp:
            return full_state_dict(model)
        if self.deepspeed and self._engine is not None:
            return whole_state_dict(self._engine)
        return None

    def _parallelism(self) -> str:
        """How the processes share the work: ``single``, ``ddp``, ``fsdp <options>`` or ``deepspeed zero-<stage>``."""
        if self.world_size == 1:
            return "single"
        if self.fsdp:
            return f"fsdp {self.fsdp}"
        return f"deepspeed zero-{self.zero_stage}" if self.deepspeed else "ddp"

    def _shard_models(self) -> None:
        """FSDP2: shard the policy, and a separate frozen reference model too (forward-only, no optimizer)."""
        device, precision = self.accelerator.device, self.accelerator.mixed_precision
        shard_model(self.model.to(device), self.fsdp, precision)
        if isinstance(self.reference, FrozenReference):
            shard_model(self.reference.model.to(device), self.fsdp, precision, role="the reference model")

    def _read_resume_checkpoint(self, spec: str) -> dict[str, Any]:
        """Check the checkpoint ``spec`` names and load its weights into the (not yet sharded) model; return the rest
        of it (``read_checkpoint``) for ``_restore_training_state``."""
        path = resolve_resume_path(spec, Path(self.args.output_dir))
        saved = read_checkpoint(path, rank=self.rank)
        if saved["optimizer"] is None or saved["scheduler"] is None:
            raise CheckpointError(f"{path} holds no optimizer/scheduler state (saved with save_only_model): cannot resume")
        saved_world_size = saved["trainer_state"].get("world_size", 1)
        if saved_world_size != self.world_size:
            raise CheckpointError(
                f"{path} was written by a run of {saved_world_size} process(es), this run has {self.world_size}: "
                "the global batch (per_device_train_batch_size x processes x gradient_accumulation_steps) and the data "
                "position would differ; resume with the same number of processes"
            )
        saved_run_id, saved_fingerprint = checkpoint_run(path)
        check_resume_fingerprint(saved_fingerprint, self.fingerprint, path, self.args)
        self.run_id = saved_run_id or self.run_id  # the resumed run keeps its id (one from before run ids: a new one)
        if self.accelerator.is_main_process:
            claim_output_dir(Path(self.args.output_dir), self.run_id)
        _load_weights(self.model, path)
        saved["path"] = path
        return saved

    def _restore_training_state(self, saved: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                                run: "_RunTotals") -> int:
        """Load a checkpoint's optimizer, scheduler, RNG states, totals and history; return its step."""
        if self.fsdp:  # the whole optimizer state, keyed by parameter name: every process takes its shards
            load_full_optimizer_state(self.model, optimizer, saved["optimizer"])
        elif self.deepspeed:  # the same, into DeepSpeed's partitions
            load_whole_optimizer_state(self._engine, saved["optimizer"])
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["trainer_state"]
        run.load(state["totals"])
        self.recorder.restore(state["log_history"])
        self.state.global_step, self.state.epoch = state["global_step"], state["epoch"]
        restore_rng_states(saved["rng"])
        logger.info("resumed from %s at step %d", saved["path"], self.state.global_step)
        return self.state.global_step

    # ------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Mean DPO metrics over the eval set, prefixed ``eval_``; logged into the history."""
        if self.data is None or self.data.eval is None:
            raise ConfigError("no eval data: set eval_dataset or val_size", key="eval_dataset")
        model = model if model is not None else self.model
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        model.to(self.accelerator.device)
        was_training = model.training
        model.eval()
        forward_model = self._unwrap(model)  # no DDP collectives in a forward without backward
        accumulator = MetricAccumulator()
        start = time.perf_counter()
        batches = self._batches(self.data.eval.dataset, self.args.per_device_eval_batch_size, shuffle_seed=None, drop_last=False)
        batch_sums = []
        for lazy in rank_share(batches, self.rank, self.world_size):  # each process its contiguous share
            with self.accelerator.autocast():
                if lazy is not None:
                    batch_sums.append(self._batch_loss(forward_model, lazy)[1])
                elif self.lockstep_forwards:  # a stand-in forward: each forward gathers parameters from every process
                    self._batch_loss(forward_model, batches[0])
        if self.world_size > 1:  # every process gets all sums, in batch order
            batch_sums = [sums for sums_of_rank in gather_objects(batch_sums) for sums in sums_of_rank]
        for sums in batch_sums:
            accumulator.add(sums)
        model.train(was_training)
        metrics = {f"eval_{key}": value for key, value in accumulator.means().items()}
        metrics["eval_runtime"] = time.perf_counter() - start
        record = {"step": self.state.global_step, "epoch": round(self.state.epoch, 4), **metrics}
        self.recorder.log(record)
        logger.info(
            "eval at step %d: %s", self.state.global_step,
            ", ".join(f"{key[5:]} {metrics[key]:.4g}" for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_kl") if key in metrics),
        )
        return metrics

    # ------------------------------------------------------------ save/load
    def _prepare_output_dir(self) -> None:
        """Create ``output_dir`` and check it is writable now, not at the first checkpoint hours later."""
        output_dir = Path(self.args.output_dir)
        resuming = bool(self.args.resume_from_checkpoint)
        if not self.args.overwrite_output_dir and not resuming and output_dir.is_dir() and any(output_dir.iterdir()):
            raise ConfigError(
                f"output_dir {output_dir} is not empty; set overwrite_output_dir: true or choose another directory",
                key="overwrite_output_dir",
            )
        self.accelerator.wait_for_everyone()  # every process has looked before any writes its probe
        probe = output_dir / f".preftune-write-test-{os.getpid()}"
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"output_dir {output_dir} is not writable: {error}", key="output_dir") from error
        # This run's identity (preftune.checkpoint): a fresh run takes output_dir over; a resume keeps the id of its
        # checkpoint (``_read_resume_checkpoint``), after its fingerprint is compared with this one.
        self.run_id, self.fingerprint = new_run_id(), run_fingerprint(self.args, model=self.model, data=self.data)
        if not resuming and self.accelerator.is_main_process:
            start_fresh_run(output_dir, self.run_id)

    def save_model(self, output_dir: str | None = None) -> Path:
        """Save the policy (safetensors) and tokenizer so ``AutoModelForCausalLM.from_pretrained`` loads them."""
        target = Path(output_dir or self.args.output_dir)
        state_dict = self._whole_weights(self.model)  # FSDP, ZeRO: every process gathers its shards
        if self.accelerator.is_main_process:
            _save_weights(self._unwrap(self.model), self.tokenizer, target, state_dict)
        return target

    def merge_and_save(self, output_dir: str) -> Path:
        """Write the policy with its LoRA adapter merged in: a full model ``AutoModelForCausalLM`` loads."""
        if not is_peft_model(self.model):
            raise ConfigError("merge_and_save needs a LoRA policy (finetuning_type: lora or peft_config)", key="finetuning_type")
        if self.lockstep_forwards:
            raise ConfigError(
                "merge_and_save: the model is sharded across processes (FSDP or ZeRO-3); merge the saved adapter with "
                "`preftune export` instead", key="fsdp" if self.fsdp else "deepspeed",
            )
        target = Path(output_dir)
        if self.accelerator.is_main_process:
            merge_and_save(self.accelerator.unwrap_model(self.model), self.tokenizer, target)
        return target

    def _save_checkpoint(self, model: nn.Module, step: int, optimizer: Any, scheduler: Any, run: "_RunTotals") -> None:
        """``checkpoint-<step>``, written atomically (``checkpoint.write_checkpoint``) by the main process, with every
        process's RNG states; never one with non-finite weights. The other processes wait until it is written."""
        per_rank_rng = gather_objects(rng_states()) if self.world_size > 1 else None
        weights = self._whole_weights(model)  # FSDP, ZeRO: every process gathers its shards
        optimizer_state = None if self.args.save_only_model else self._whole_optimizer_state(model, optimizer)
        if self.accelerator.is_main_process:
            self._write_checkpoint(model, step, optimizer_state, scheduler, run, per_rank_rng, weights)
        self.accelerator.wait_for_everyone()

    def _whole_optimizer_state(self, model: nn.Module, optimizer: Any) -> dict | None:
        """The optimizer's whole state (a collective under FSDP and DeepSpeed, where it is keyed by parameter name
        and complete on the main process only)."""
        if self.fsdp:
            return full_optimizer_state(model, optimizer)
        if self.deepspeed:  # gathered from DeepSpeed's partitions
            return whole_optimizer_state(self._engine)
        return optimizer.state_dict()

    def _write_checkpoint(
        self, model: nn.Module, step: int, optimizer_state: dict | None, scheduler: Any, run: "_RunTotals",
        per_rank_rng: list | None, weights: dict[str, torch.Tensor] | None,
    ) -> None:
        """``weights``: the whole model's state dict when it is sharded (else read from the model)."""
        unwrapped = self._unwrap(model)
        trainable = weights.values() if weights is not None else (p for p in unwrapped.parameters() if p.requires_grad)
        if not all(torch.isfinite(value).all() for value in trainable):
            logger.error("step %d: the weights hold non-finite values; checkpoint not written", step)
            return
        output_dir = Path(self.args.output_dir)
        trainer_state = {
            "global_step": step,
            "epoch": self.state.epoch,
            "totals": run.to_dict(),
            "log_history": self.recorder.history,
            "config": self.args.to_dict(),
            "world_size": self.world_size,
            "run": {"id": self.run_id, "fingerprint": self.fingerprint},  # preftune.checkpoint: runs never mix
        }
        target = write_checkpoint(
            output_dir / f"checkpoint-{step}",
            save_weights=lambda directory: _save_weights(unwrapped, self.tokenizer, directory, weights),
            trainer_state=trainer_state,
            optimizer_state=optimizer_state,
            scheduler_state=None if optimizer_state is None else scheduler.state_dict(),
            rank_rng_states=per_rank_rng,
        )
        prune_checkpoints(output_dir, self.args.save_total_limit or 0, newest=target, run_id=self.run_id)

    def _write_summary(self, runtime: float, run: "_RunTotals", training_loss: float) -> dict[str, Any]:
        strip = lambda record, prefix="": {  # noqa: E731
            key[len(prefix) :]: value for key, value in record.items() if key.startswith(prefix) and key not in ("step", "epoch")
        }
        train_records, eval_records = self.recorder.train_records, self.recorder.eval_records
        summary = {
            "train": strip(train_records[-1]) if train_records else {},
            "eval": strip(eval_records[-1], "eval_") if eval_records else {},
            "training_loss_mean": training_loss,
            "global_step": self.state.global_step,
            "epoch": self.state.epoch,
            "runtime_seconds": runtime,
            "pairs_per_second": run.session_pairs / runtime if runtime > 0 else 0.0,
            "tokens_per_second": run.session_tokens / runtime if runtime > 0 else 0.0,
            "total_pairs": run.total_pairs,
            "num_processes": self.world_size,
            "parallelism": self._parallelism(),
            "skipped_nonfinite_steps": {"count": len(run.skipped_steps), "steps": run.skipped_steps[:100]},
            "memory": peak_memory_mb(),
            "data": self.data.report,
            "config": self.args.to_dict(),
        }
        summary["diagnostics"] = self.recorder.diagnostics()  # likelihood displacement, grad-norm spikes
        if self.accelerator.is_main_process:
            self.recorder.write_summary(summary)
            self.recorder.write_plot()
        return summary


class _ReplicaRecorder(RunRecorder):
    """The history of a process other than the main one: kept in memory (for ``train()``'s result), never written."""

    warns = False  # the main process logs the likelihood-displacement warning

    def _write_history(self) -> None:
        return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        return None

    def write_plot(self) -> None:
        return None


@dataclass
class _RunTotals:
    """The loop's running totals, saved in checkpoints so that a resumed run continues them exactly."""

    window: MetricAccumulator = field(default_factory=MetricAccumulator)  # metrics since the last log
    run_loss: MetricAccumulator = field(default_factory=MetricAccumulator)  # loss over the whole run
    window_tokens: int = 0
    total_pairs: int = 0
    total_tokens: int = 0
    last_eval_step: int = -1
    skipped_steps: list[int] = field(default_factory=list)
    session_pairs: int = 0  # this process only (for pairs/s), not checkpointed
    session_tokens: int = 0

    def add_step(self, step_sums: list[tuple[dict[str, float], int]], pairs: int) -> None:
        for sums, tokens in step_sums:
            self.window.add(sums)
            self.run_loss.add({"pairs": sums["pairs"], "loss": sums["loss"]})
            self.window_tokens += tokens
            self.total_tokens += tokens
            self.session_tokens += tokens
        self.total_pairs += pairs
        self.session_pairs += pairs

    def reset_window(self) -> None:
        self.window.reset()
        self.window_tokens = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": dict(self.window.sums), "run_loss": dict(self.run_loss.sums), "window_tokens": self.window_tokens,
            "total_pairs": self.total_pairs, "total_tokens": self.total_tokens, "last_eval_step": self.last_eval_step,
            "skipped_steps": list(self.skipped_steps),
        }

    def load(self, saved: dict[str, Any]) -> None:
        self.window.sums.update(saved["window"])
        self.run_loss.sums.update(saved["run_loss"])
        self.window_tokens, self.total_pairs, self.total_tokens = saved["window_tokens"], saved["total_pairs"], saved["total_tokens"]
        self.last_eval_step, self.skipped_steps = saved["last_eval_step"], list(saved["skipped_steps"])


@dataclass
class _LazyBatch:
    """A micro-batch as row indices into a tokenized dataset; ``collate()`` builds its tensors when needed."""

    dataset: Any
    indices: list[int]
    pad_token_id: int
    collate_fn: Callable[..., PreferenceBatch]
    padding_free: bool | None = False
    num_tokens: int = 0  # the collated batch's ``num_tokens`` (known once collated)

    def examples(self) -> list[dict]:
        """The tokenized rows, read from the dataset on each call (nothing is kept between micro-batches)."""
        return list(self.dataset.select(self.indices))

    def source_rows(self) -> list[int]:
        return [int(example.get("row", index)) for example, index in zip(self.examples(), self.indices)]

    def collate(self) -> PreferenceBatch:
        batch = self._layout(self.collate_fn(self.examples(), pad_token_id=self.pad_token_id))
        self.num_tokens = batch.num_tokens
        return batch

    def collate_mismatched(self, max_length: int | None) -> PreferenceBatch:
        """KTO's KL batch: each prompt with the previous example's completion (``mismatched_examples``)."""
        return self._layout(self.collate_fn(mismatched_examples(self.examples(), max_length), pad_token_id=self.pad_token_id))

    def _layout(self, batch: PreferenceBatch) -> PreferenceBatch:
        if self.padding_free is False:
            return batch
        unpadded = batch.without_padding()
        return unpadded if self.padding_free or padding_free_pays(unpadded) else batch


# Below this mean row length, one padded forward beats a loop of short per-row forwards on CPU: the
# quickstart's ~22-token rows ran 3x slower row by row, while 500-token rows (benchmark case a) ran as fast and
# used 13 % less memory.
PADDING_FREE_MIN_MEAN_ROW_TOKENS = 256


def padding_free_pays(batch: PreferenceBatch) -> bool:
    """Auto rule for ``padding_free``: forward row by row when rows are long enough to keep matmuls efficient."""
    lengths = batch.row_lengths if batch.row_lengths is not None else batch.without_padding().row_lengths
    return len(lengths) > 1 and sum(lengths) / len(lengths) >= PADDING_FREE_MIN_MEAN_ROW_TOKENS


def compile_body(model: nn.Module) -> None:
    """``torch.compile`` the transformer body in place (``Module.compile``: parameter names and saving unchanged).

    Only the body: the output layer is bypassed by the chunked LM head, and shapes vary from batch to batch,
    hence ``dynamic=True``.
    """
    inner = unwrap_model(model)
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise ConfigError(f"torch_compile: cannot find the transformer body of {type(inner).__name__}", key="torch_compile")
    body.compile(dynamic=True)


def _reference_fingerprint(reference: Reference, policy: nn.Module) -> str:
    """What the reference's log-probs depend on: its weights (for an adapter-disabled reference, the base weights;
    for an adapter copy, the base and the frozen "ref" adapter)."""
    if isinstance(reference, AdapterDisabledReference):
        return reference_fingerprint(policy, exclude=lambda name: "lora_" in name)
    if isinstance(reference, AdapterCopyReference):
        return reference_fingerprint(policy, exclude=lambda name: "lora_" in name and ".ref." not in name)
    return reference_fingerprint(reference.model)


def _check_data_fits_loss(args: DPOConfig, params: LossParams, data: Any) -> None:
    """Refuse data the loss cannot use: unpaired rows with a paired loss and the reverse, several negatives
    with LD-DPO, KTO with one row per batch (its KL estimate would pair each prompt with its own completion)."""
    kind = getattr(data, "kind", "paired")
    if kind == "unpaired" and not params.is_unpaired:
        raise ConfigError(
            f"the data is unpaired (prompt, completion, label), which loss {args.loss_type} cannot use; "
            "set loss_type: kto, or give paired data (prompt, chosen, rejected)",
            key="loss_type",
        )
    if kind != "unpaired" and params.is_unpaired:
        raise ConfigError(
            "loss kto needs unpaired rows (prompt, completion, label: true/false, or LLaMA-Factory's kto_tag); "
            "the data is paired (prompt, chosen, rejected)",
            key="loss_type",
        )
    if params.is_unpaired and args.per_device_train_batch_size < 2:
        raise ConfigError(
            "kto needs per_device_train_batch_size >= 2: its KL estimate pairs each prompt with another row's "
            "completion from the same batch",
            key="per_device_train_batch_size",
        )
    if getattr(data, "num_negatives", 1) > 1 and args.ld_alpha is not None:
        raise ConfigError("ld_alpha is defined for one rejected response per prompt, not several", key="ld_alpha")


def _load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load a checkpoint's trainable weights into ``model`` in place (a LoRA adapter, or every model weight)."""
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(peft_model_of(model), load_file(str(checkpoint / "adapter_model.safetensors")))
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{checkpoint}: adapter weights that this model does not have: {result.unexpected_keys[:5]}")
        return
    files = sorted(checkpoint.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{checkpoint}: no model*.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for name, p in model.named_parameters() if name in state}
    untied_missing = [name for name in missing if model.get_parameter(name).data_ptr() not in loaded] if missing else []
    if unexpected or untied_missing:
        raise CheckpointError(
            f"{checkpoint}: weights do not fit this model (missing {untied_missing[:5]}, unexpected {unexpected[:5]})"
        )


def _save_weights(model: nn.Module, tokenizer: Any, target: Path, state_dict: dict | None = None) -> None:
    """The trainable weights: the LoRA adapter (only the trained one, not a frozen reference copy) or the model
    (``state_dict``: its whole weights when the model is sharded)."""
    if is_peft_model(model):
        save_adapter(model, tokenizer, target, state_dict)
    else:
        _atomic_save_pretrained(model, tokenizer, target, state_dict)


def _atomic_save_pretrained(model: nn.Module, tokenizer: Any, target: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` into a temporary sibling directory, then move the files in place.

    The weights file is replaced by rename, so a crash leaves either the old or the new weights.
    """
    target.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    for item in staging.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(item, target / item.name)
    staging.rmdir()
