"""DPO training: a TRL-shaped ``DPOTrainer`` whose ``train()`` is one explicit loop.

Flow: config → data → batches → log-probs → loss → optimizer step → metrics/checkpoints.
``DPOTrainer.__init__`` validates the configuration and sets up tokenizer, models and data;
``train()`` reads top to bottom: build optimizer and schedule, then for each optimizer step
accumulate gradients over micro-batches, clip, step, then log, evaluate and save as the callbacks' ``TrainerControl``
says (``preftune.callbacks``: the schedule is the first callback; transformers' callbacks and trackers follow).
What depends on how the processes share the work (one process, DDP, FSDP2, DeepSpeed ZeRO) is the run's
``Parallelism`` (``preftune.parallel``); the models: ``preftune.model_setup``; one micro-batch's loss:
``preftune.objective``; optimizer and schedule: ``preftune.optim``; evaluation: ``preftune.eval_loop``; checkpoints:
``preftune.training_state``; the data: ``preftune.training_data``; what a run reports: ``preftune.summary``.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate.state import AcceleratorState
from torch import nn
from tqdm.auto import tqdm

from preftune.adapters import is_peft_model, load_trainable_weights, merge_and_save, save_trainable_weights
from preftune.batches import BatchMaker, LazyBatch, PlannedWindows, StreamingWindows
from preftune.activation_offload import offloading_objective
from preftune.callbacks import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    build_callback_handler,
    set_schedule,
    finish_trackers,
    strategy_name,
)
from preftune.checkpoint import claim_output_dir, new_run_id, restore_rng_states
from preftune.config import DPOConfig
from preftune.cpu_memory import keep_freed_memory
from preftune.data.images import ImageInputs, text_tokenizer
from preftune.data.pipeline import eval_key
from preftune.errors import ConfigError, PreftuneError
from preftune.eval_loop import computed_metrics, mean_metrics, track_best_metric
from preftune.hub import push_folder
from preftune.losses import LossParams
from preftune.metrics import ReplicaRecorder, RunRecorder, RunTotals
from preftune.model_setup import (
    check_supported,
    load_processing_class,
    prepare_processing_class,
    set_global_settings,
    set_up_models,
)
from preftune.objective import BatchLoss, build_objective, logprob_options
from preftune.optim import build_adamw, build_scheduler
from preftune.parallel import build_parallelism
from preftune.parallel.launch import build_accelerator
from preftune.preflight import check_writable, run_fingerprint, run_preflight_checks, start_fresh_run
from preftune.ref_cache import PrecomputedReference, score_into_column
from preftune.reference import AdapterDisabledReference, Reference, UntouchedPolicyReference, sync_reference
from preftune.summary import run_summary, train_end_record, training_record
from preftune.training_data import (
    total_training_steps,
    check_data_fits_loss,
    check_stream,
    is_stream,
    prepare_sources,
    refuse_precomputing_a_stream,
    training_windows,
)
from preftune.training_state import ResumePoint, open_resume_checkpoint, save_training_checkpoint

logger = logging.getLogger(__name__)


class TrainingError(PreftuneError):
    """Training cannot go on (e.g. a non-finite loss)."""


class TrainOutput(NamedTuple):
    """What ``train()`` returns, shaped like transformers' ``TrainOutput``."""

    global_step: int
    training_loss: float
    metrics: dict[str, Any]


class DPOTrainer:
    """Direct Preference Optimization, with the constructor, attributes and methods of TRL's ``DPOTrainer``.

    Args:
        model: a loaded causal LM, or a path/hub id (default: ``args.model_name_or_path``); loaded with
            ``args.model_init_kwargs`` and ``quantization_config``.
        ref_model: the frozen reference, loaded or a path; default: a frozen copy of ``model`` as loaded (with LoRA:
            the policy with its adapter disabled).
        args: a ``DPOConfig`` (default, as TRL: ``DPOConfig(output_dir="<model name>-DPO")``).
        data_collator: not supported (preftune lays out its own batches); must be None.
        train_dataset: a ``datasets.Dataset``, a ``datasets.IterableDataset`` (streamed; needs ``max_steps``), a list
            of dicts, a file path or a registered dataset name (default: ``args.dataset``).
        eval_dataset: the same kinds, or a dict / ``DatasetDict`` of named sets (metrics ``eval_<name>_*``).
        processing_class (alias ``tokenizer``): the tokenizer (default: loaded from the model path).
        compute_metrics: ``fn(EvalPrediction) -> dict`` called after each evaluation; predictions are the rewards
            ``(pairs, 1 + negatives)`` (chosen first) and label_ids the index of the preferred column (0).
        callbacks: ``transformers.TrainerCallback`` instances or classes (after the trackers of ``args.report_to``).
        optimizers: ``(optimizer, lr_scheduler)``; None builds AdamW and the ``lr_scheduler_type`` schedule.
        quantization_config: a ``BitsAndBytesConfig`` for a model given by path (QLoRA; needs bitsandbytes and CUDA).
        peft_config: a peft ``LoraConfig`` (or set ``finetuning_type: lora``); the reference is then the policy with
            its adapter disabled, unless a ``ref_model`` is given.
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        ref_model: nn.Module | str | None = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        *,
        tokenizer: Any = None,
    ) -> None:
        self.args = args if args is not None else _default_args(model)
        if data_collator is not None:
            raise ConfigError("data_collator is not supported: preftune lays out its own batches (prefix sharing, "
                              "padding-free); leave it out", key="data_collator")
        if ref_model is not None and ref_model is model and isinstance(model, nn.Module):
            raise ConfigError("model and ref_model are the same object; leave ref_model out and a frozen copy of the "
                              "model is used", key="ref_model")
        run_preflight_checks(  # errors first: paths, keys and the resume target, before any model loads
            self.args, model=model, ref_model=ref_model, train_dataset=train_dataset, eval_dataset=eval_dataset,
            tokenizer=processing_class if processing_class is not None else tokenizer,
        )
        train_source = train_dataset if train_dataset is not None else self.args.dataset
        # accelerate keeps one process-wide state; a second trainer in the same process (tests, notebooks)
        # may ask for another precision. The distributed (partial) state is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = build_accelerator(self.args)
        self.world_size, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_supported(self.args, self.accelerator.device.type)
        # How the processes share the work (preftune.parallel): DDP, FSDP2 or DeepSpeed ZeRO; the loop never asks which
        self.parallelism = build_parallelism(self.args, self.accelerator)
        if not self.accelerator.is_main_process:  # replicas log warnings and errors only
            logging.getLogger("preftune").setLevel(logging.WARNING)
        if self.args.keep_freed_cpu_memory and self.accelerator.device.type == "cpu":
            keep_freed_memory()
        set_global_settings(self.args)  # seed (the same on every process), determinism, TF32, log level
        self.loss_params = LossParams.from_config(self.args)
        self.loss_params.validate()
        self.state = TrainerState(
            is_local_process_zero=self.accelerator.is_local_main_process,
            is_world_process_zero=self.accelerator.is_main_process,
        )
        self.control = TrainerControl()
        self.compute_metrics = compute_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self._resumed_at_step = 0
        self._windows: PlannedWindows | StreamingWindows | None = None

        model = model if model is not None else self.args.model_name_or_path
        if model is None:
            raise ConfigError("no model given: set model_name_or_path", key="model_name_or_path")
        if quantization_config is not None and isinstance(model, nn.Module):
            raise ConfigError("quantization_config applies to a model loaded from a path; the model given is already "
                              "loaded", key="quantization_config")
        self.tokenizer = processing_class if processing_class is not None else tokenizer  # a processor for a VLM
        if self.tokenizer is None:
            source = self.args.tokenizer_name_or_path or (model if isinstance(model, str) else model.name_or_path)
            self.tokenizer = load_processing_class(self.args, source)
        self.tokenizer = prepare_processing_class(self.args, self.tokenizer)
        self._setup_models(model, ref_model, peft_config, quantization_config)
        self.batch_maker = BatchMaker(text_tokenizer(self.tokenizer).pad_token_id, self.layout.prefix_sharing,
                                      self.layout.padding_free, shared_attention=self.layout.shared_attention,
                                      images=ImageInputs.of(self.tokenizer))

        eval_source = eval_dataset if eval_dataset is not None else self.args.eval_dataset
        self.stream = train_source if is_stream(train_source) else None
        with self.accelerator.local_main_process_first():  # each machine's main process fills its caches first
            self.data = prepare_sources(self.args, self.tokenizer, None if self.stream is not None else train_source,
                                        eval_source)
            if self.stream is not None:
                check_stream(self.args, self.tokenizer, self.loss_params, self.stream, self.data)
            if self.data.train is not None or self.data.eval_sets:
                check_data_fits_loss(self.args, self.loss_params, self.data)
                if self.args.precompute_ref_log_probs and self.reference is not None:
                    self._precompute_reference()
        recorder = RunRecorder if self.accelerator.is_main_process else ReplicaRecorder
        self.recorder = recorder(self.args.output_dir, plot=self.args.plot_loss)
        self.state.log_history = self.recorder.history
        self.callback_handler = build_callback_handler(
            self.args, callbacks, model=self.model, processing_class=self.tokenizer
        )
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    # ------------------------------------------------------- TRL's attributes
    @property
    def processing_class(self) -> Any:
        """The tokenizer (TRL's name for it)."""
        return self.tokenizer

    @property
    def ref_model(self) -> nn.Module | None:
        """The separate frozen reference model; None when there is none (reference-free losses, LoRA's
        adapter-disabled reference, precomputed reference log-probs), as in TRL."""
        return self.reference.separate_model if self.reference is not None else None

    @property
    def train_dataset(self) -> Any:
        """The tokenized training rows (columns prompt_ids, chosen_ids, rejected_ids, ...); a stream as given."""
        if self.stream is not None:
            return self.stream
        return self.data.train.dataset if self.data.train is not None else None

    @property
    def eval_dataset(self) -> Any:
        """The tokenized eval rows; a dict of them for named eval sets; None without eval data."""
        sets = self.data.eval_sets
        if not sets:
            return None
        if list(sets) == [None]:
            return sets[None].dataset
        return {name: data.dataset for name, data in sets.items()}

    def add_callback(self, callback: TrainerCallback | type) -> None:
        """Add a callback (an instance or a class) after the others, as transformers' Trainer does."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: TrainerCallback | type) -> TrainerCallback | None:
        """Remove a callback (an instance, or the first of a class) and return it."""
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback: TrainerCallback | type) -> None:
        """Remove a callback (an instance, or the first of a class)."""
        self.callback_handler.remove_callback(callback)

    def is_world_process_zero(self) -> bool:
        return self.accelerator.is_main_process

    def is_local_process_zero(self) -> bool:
        return self.accelerator.is_local_main_process

    def end(self) -> None:
        """Finish the trackers and the distributed process group (transformers' ``Trainer.end``); call it last."""
        finish_trackers(self.callback_handler)
        self.accelerator.end_training()

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any) -> Any:
        """Upload ``output_dir`` to the Hub repository ``hub_model_id`` (default: the folder's name).

        Raises ConfigError when the Hub cannot be reached (offline mode or no network), in one line.
        """
        folder = Path(self.args.output_dir)
        return push_folder(folder, self.args.hub_model_id or folder.name, token=self.args.hub_token,
                           private=bool(self.args.hub_private_repo), commit_message=commit_message)

    # ----------------------------------------------------------------- setup
    def _setup_models(self, model: nn.Module | str, ref_model: nn.Module | str | None, peft_config: Any,
                      quantization_config: Any = None) -> None:
        """Policy, reference and layout (``model_setup.set_up_models``), and the objective that scores them."""
        setup = set_up_models(self.args, model, ref_model, peft_config, loss_params=self.loss_params,
                              device_type=self.accelerator.device.type,
                              allows_padding_free=self.parallelism.allows_padding_free,
                              quantization_config=quantization_config)
        self.model, self.reference, self.layout = setup.model, setup.reference, setup.layout
        self.router_aux_loss_coef = setup.router_aux_loss_coef  # TRL's attributes
        self.aux_loss_enabled = self.router_aux_loss_coef != 0.0
        self._flop_parameters = setup.flop_parameters
        self._initial_reference_is_policy = setup.reference_is_initial_policy
        self._logprob_options = logprob_options(self.args, self.parallelism.holds_whole_output_layer)
        objective = build_objective(self.args, self.loss_params, self.accelerator, self._logprob_options,
                                    self.router_aux_loss_coef)
        self.objective = offloading_objective(objective, self.args.activation_offloading, self.accelerator.device)

    def _precompute_reference(self) -> None:
        """Score every train/eval row with the reference once (or read the cache), attach the values as a column,
        then drop the reference: no reference model is held while training."""
        reference = self.reference.to(self.accelerator.device)
        splits = {"train": self.data.train, **{eval_key(name): data for name, data in self.data.eval_sets.items()}}
        for split, tokenized in splits.items():
            if tokenized is not None:
                self.data.report[split]["reference_logps"] = self._attach_reference_logps(tokenized, reference, split)
        self.reference = PrecomputedReference()
        del reference
        gc.collect()

    def _attach_reference_logps(self, tokenized: Any, reference: Reference, split: str) -> dict[str, Any]:
        """``ref_cache.score_into_column`` with this run's layout, precision and log-prob options."""
        return score_into_column(
            tokenized, reference, split, args=self.args, accelerator=self.accelerator, options=self._logprob_options,
            collate_fn=self.batch_maker.collate_function(), pad_token_id=self.batch_maker.pad_token_id,
            images=self.batch_maker.images,
        )

    def _reference_for_new_data(self) -> Reference:
        """The reference to score data that arrives after set-up (``evaluate(eval_dataset=...)``) when its log-probs
        are precomputed: the policy itself while it is still untouched (full fine-tuning, no step taken) or with its
        adapter disabled (LoRA); otherwise ConfigError (a ValueError), as TRL raises."""
        if is_peft_model(self.model):
            return AdapterDisabledReference(self.model)
        if self.state.global_step == 0 and self._initial_reference_is_policy:
            return UntouchedPolicyReference(self.model)
        raise ConfigError(
            "Cannot compute reference log-probs for a dataset passed to `evaluate()` after training has started (or "
            "with a separate reference model): with precompute_ref_log_probs the reference model is not kept in "
            "memory. Give this dataset as eval_dataset at initialization, or set precompute_ref_log_probs: false",
            key="precompute_ref_log_probs",
        )

    # ------------------------------------------------------------ loss core
    def batch_loss(self, model: nn.Module, lazy: LazyBatch, *, counted: bool = True) -> BatchLoss:
        """Per-example loss ``(B,)`` of one micro-batch, its metric sums and rewards (``objective.Objective``): what the
        loop and evaluation call for every micro-batch (wrap or override it to change one). ``counted`` False: a
        weight-0 stand-in (``Parallelism.share``), left out of what processes average (KTO's reference point)."""
        return self.objective.batch_loss(model, self.reference, lazy, counted=counted)

    def create_optimizer(self) -> torch.optim.Optimizer:
        """``self.optimizer``, made when there is none (transformers' name): AdamW over the policy's trainable
        parameters, without weight decay on biases and normalisation weights (as transformers' Trainer). ``train()``
        calls it after the policy is sharded (FSDP)."""
        if self.optimizer is None:
            self.optimizer = build_adamw(self.model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """``self.lr_scheduler``, made when there is none (transformers' name): ``lr_scheduler_type`` with its
        warm-up over ``num_training_steps``."""
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            self.lr_scheduler = build_scheduler(optimizer, self.args, num_training_steps)
        return self.lr_scheduler

    # ------------------------------------------------------------------ loop
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any) -> TrainOutput:
        """Run the training loop; write metrics files, checkpoints and the final model into ``output_dir``.

        ``resume_from_checkpoint``: a checkpoint folder, True (the newest in ``output_dir``, as ``latest``) or None
        (``args.resume_from_checkpoint``). ``trial`` and ``ignore_keys_for_eval`` are accepted for transformers'
        signature and unused.
        """
        if self.data.train is None and self.stream is None:
            raise ConfigError("no training data: set dataset (or pass train_dataset=)", key="dataset")
        args, handler = self.args, self.callback_handler
        resume = _resume_spec(resume_from_checkpoint, args.resume_from_checkpoint)
        self._prepare_output_dir(resuming=resume is not None)
        windows = self._windows = training_windows(self.args, self.tokenizer, self.data, self.stream, self.batch_maker,
                                                   self.world_size)
        total_steps, steps_per_epoch = total_training_steps(self.args, windows)
        set_schedule(self.state, self.args, total_steps, steps_per_epoch)

        saved = self._read_resume_checkpoint(resume) if resume is not None else None  # weights into the whole model
        self.parallelism.prepare_models(self.model, self.reference)  # e.g. sharded: before the optimizer takes them
        optimizer = self.create_optimizer()
        scheduler = self.create_scheduler(total_steps, optimizer)
        run = RunTotals()
        model, optimizer = self.parallelism.prepare(
            self.model, optimizer, self.reference, optimizer_state=saved.optimizer if saved is not None else None
        )
        start_step = self._restore_training_state(saved, scheduler, run) if saved is not None else 0
        self.optimizer, self.lr_scheduler = optimizer, scheduler
        handler.model, handler.optimizer, handler.lr_scheduler = self.model, optimizer, scheduler
        model.train()
        logger.info(
            "training: %s, %d steps (%s per epoch), batch %d x accumulation %d, loss %s, beta %g",
            "a stream" if self.stream is not None else f"{len(self.data.train.dataset)} pairs", total_steps,
            steps_per_epoch, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.loss_type, args.beta,
        )

        self.control = handler.on_train_begin(args, self.state, self.control)
        if args.eval_on_start and start_step == 0:
            self._evaluate_sets(model, run)
        start = window_start = time.perf_counter()
        progress = tqdm(total=total_steps, initial=start_step, desc="Training", disable=self._progress_disabled())
        current_epoch = None
        for step, (epoch, window, epoch_progress) in enumerate(windows.windows(total_steps), start=1):
            if step <= start_step:  # resuming: batches are a function of seed and epoch, so skip to the position
                continue
            if epoch != current_epoch:
                current_epoch = epoch
                self.control = handler.on_epoch_begin(args, self.state, self.control)
            self.control = handler.on_step_begin(args, self.state, self.control)
            window_pairs = sum(len(lazy.indices) for lazy in window)  # over all processes
            share = self.parallelism.share(window)  # (micro-batch, weight); weight 0: a stand-in, for equal backwards
            step_sums, problem = [], None
            for index, (lazy, weight) in enumerate(share):
                boundary = index == len(share) - 1
                with self.parallelism.accumulating(model, boundary):
                    losses, sums, _ = self.batch_loss(model, lazy, counted=weight > 0)
                    if weight and not torch.isfinite(losses).all():
                        problem = problem or f"non-finite loss at step {step} on source rows {lazy.source_rows()}"
                        if self.world_size == 1:
                            break  # with several processes every one goes on, so that the collectives stay in step
                    # Sum over pairs / pairs in the window: the same gradient as one batch of the whole window. Every
                    # backend averages gradients over processes, hence the factor world_size.
                    self.parallelism.backward(model, losses.sum() * weight * self.world_size / window_pairs, boundary)
                if not weight:
                    continue
                step_sums.append((sums, lazy.num_tokens))
                if not boundary:
                    self.control = handler.on_substep_end(args, self.state, self.control)
            # every process gets the step's metric sums (in window order) and any problem
            gathered = self.parallelism.gather((step_sums, problem))
            step_sums = [entry for sums_of_rank, _ in gathered for entry in sums_of_rank]
            problem = next((found for _, found in gathered if found is not None), None)
            self.control = handler.on_pre_optimizer_step(args, self.state, self.control)
            # max_grad_norm 0 disables clipping; the norm is still measured. NaN: not measured (a problem already).
            grad_norm, updated = self.parallelism.clip_and_step(model, optimizer, update=problem is None)
            if problem is None and not math.isfinite(grad_norm):
                rows = [row for lazy in window for row in lazy.source_rows()]
                problem = f"non-finite gradient norm at step {step} (source rows {rows})"
            learning_rate = scheduler.get_last_lr()[0]
            if problem is None:
                run.add_step(step_sums, window_pairs)
            elif updated:  # a backend that measures the norm within its update: too late to skip
                raise TrainingError(f"{problem}, found after the update was made; stopped, no checkpoint written after it")
            elif args.nonfinite_loss == "stop":
                raise TrainingError(f"{problem}; nothing was updated (set nonfinite_loss: skip to skip such steps)")
            else:
                logger.warning("%s: update skipped (nonfinite_loss: skip)", problem)
                run.skipped_steps.append(step)
            self.control = handler.on_optimizer_step(args, self.state, self.control)
            scheduler.step()
            self.parallelism.zero_grad(optimizer)
            if args.sync_ref_model and step % args.ref_model_sync_steps == 0:
                sync_reference(self.reference, self.parallelism.unwrap(model), args.ref_model_mixup_alpha)
            self._empty_device_cache(step)
            self.state.global_step, self.state.epoch = step, epoch_progress
            self.state.num_input_tokens_seen = run.total_tokens

            self.control = handler.on_step_end(args, self.state, self.control)
            if epoch_progress == epoch + 1 and not windows.streaming:
                self.control = handler.on_epoch_end(args, self.state, self.control)
            if self.control.should_log:
                elapsed = time.perf_counter() - window_start
                record = self._training_record(run, grad_norm, learning_rate, elapsed)
                self.log(record)
                shown = {"loss": "loss", "margin": "rewards/margins", "acc": "rewards/accuracies", "kl": "kl"}
                progress.set_postfix(
                    {label: f"{record[key]:.4g}" for label, key in shown.items() if key in record},
                    tok_s=f"{record['tokens_per_second']:.0f}",
                )
                run.reset_window()
                window_start = time.perf_counter()
            if self.control.should_evaluate and self.data.eval_sets:
                self._evaluate_sets(model, run)
                window_start = time.perf_counter()  # eval time is not training throughput
            if self.control.should_save:
                self._save_checkpoint(model, step, optimizer, scheduler, run)
                self.control = handler.on_save(args, self.state, self.control)
            progress.update(1)
            if self.control.should_training_stop:
                break
        progress.close()
        runtime = time.perf_counter() - start

        if self.data.eval_sets and run.last_eval_step != self.state.global_step:
            self._evaluate_sets(model, run)
        self.model = self.parallelism.unwrap(model)
        handler.model = self.model
        self._load_best_model()
        self.save_model()
        training_loss = run.run_loss.means().get("loss", float("nan"))
        self.log(self._train_summary_record(runtime, run, training_loss))
        summary = self._write_summary(runtime, run, training_loss)
        self.control = handler.on_train_end(args, self.state, self.control)
        self.accelerator.wait_for_everyone()  # the replicas wait until the main process has written the outputs
        return TrainOutput(self.state.global_step, training_loss, summary)

    def _progress_disabled(self) -> bool:
        """``disable_tqdm``; None: hidden when the root logger is above WARNING (transformers' rule); always on
        replica processes."""
        if not self.accelerator.is_main_process:
            return True
        if self.args.disable_tqdm is not None:
            return self.args.disable_tqdm
        return logging.getLogger().getEffectiveLevel() > logging.WARNING

    def _training_record(self, run: RunTotals, grad_norm: float, learning_rate: float, elapsed: float) -> dict:
        """``summary.training_record``, with ``num_input_tokens_seen`` unless ``include_num_input_tokens_seen: no``."""
        record = training_record(run, grad_norm, learning_rate, elapsed)
        if self.args.include_num_input_tokens_seen != "no":
            record["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        return record

    def _train_summary_record(self, runtime: float, run: RunTotals, training_loss: float) -> dict:
        """``summary.train_end_record``; ``total_flos``: 6 x non-embedding parameters x tokens trained on (the estimate
        transformers uses)."""
        self.state.total_flos = 6.0 * self._flop_parameters * run.total_tokens
        steps = self.state.global_step - (self._resumed_at_step or 0)
        return train_end_record(run, runtime, training_loss, steps, self.state.total_flos)

    def log(self, logs: dict[str, Any], start_time: float | None = None) -> None:
        """Record ``logs`` at the current step (history files, ``state.log_history``) and pass them to the callbacks'
        ``on_log`` (trackers), as transformers' ``Trainer.log`` does."""
        record = {"step": self.state.global_step, "epoch": round(self.state.epoch or 0.0, 4), **logs}
        self.recorder.log(record)
        shown = {key: value for key, value in record.items() if key != "step"}
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=shown)

    def _empty_device_cache(self, step: int) -> None:
        """``torch_empty_cache_steps``: return the accelerator's cached memory every N steps (nothing to do on CPU)."""
        every = self.args.torch_empty_cache_steps
        if every and step % every == 0 and self.accelerator.device.type == "cuda":
            torch.cuda.empty_cache()

    def _read_resume_checkpoint(self, spec: str) -> ResumePoint:
        """The checked checkpoint ``spec`` names (``training_state.open_resume_checkpoint``), its weights loaded into
        the (not yet sharded) model; the run keeps its id and claims ``output_dir``."""
        saved = open_resume_checkpoint(spec, Path(self.args.output_dir), world_size=self.world_size, rank=self.rank,
                                       fingerprint=self.fingerprint, args=self.args)
        self.run_id = saved.run_id or self.run_id  # the resumed run keeps its id (one from before run ids: a new one)
        if self.accelerator.is_main_process:
            claim_output_dir(Path(self.args.output_dir), self.run_id)
        load_trainable_weights(self.model, saved.path)
        return saved

    def _restore_training_state(self, saved: ResumePoint, scheduler: Any, run: RunTotals) -> int:
        """Load a checkpoint's scheduler, RNG states, totals and history (its optimizer state: ``Parallelism.prepare``);
        return its step."""
        scheduler.load_state_dict(saved.scheduler)
        state = saved.trainer_state
        run.load(state["totals"])
        self.recorder.restore(state["log_history"])
        self.state.global_step, self.state.epoch = state["global_step"], state["epoch"]
        self._resumed_at_step = self.state.global_step
        restore_rng_states(saved.rng)
        logger.info("resumed from %s at step %d", saved.path, self.state.global_step)
        return self.state.global_step

    # ------------------------------------------------------------- evaluate
    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Mean DPO metrics over the eval set(s), logged into the history and passed to the callbacks.

        ``eval_dataset``: None evaluates the sets given at set-up; otherwise any source ``DPOTrainer`` takes (a
        dataset, a stream, a file, ...) or a dict / ``DatasetDict`` of named sets, prepared as at set-up. Metrics of
        one set are named ``<metric_key_prefix>_<metric>``, of a named set ``<metric_key_prefix>_<name>_<metric>``.
        ``ignore_keys`` is accepted for transformers' signature and unused.
        """
        sets = self.data.eval_sets
        if eval_dataset is not None:
            sets = self._prepare_new_eval_sets(eval_dataset)
        if not sets:
            raise ConfigError("no eval data: pass eval_dataset= or set eval_dataset or val_size", key="eval_dataset")
        metrics: dict[str, float] = {}
        for name, data in sets.items():
            prefix = metric_key_prefix if name is None else f"{metric_key_prefix}_{name}"
            metrics.update(self._evaluate_one(self.model, data.dataset, prefix))
        return metrics

    def _prepare_new_eval_sets(self, eval_dataset: Any) -> dict:
        """Eval sets given to ``evaluate()``: tokenized like the set-up's, with reference log-probs when those are
        precomputed (``_reference_for_new_data``)."""
        refuse_precomputing_a_stream(self.args, eval_dataset)
        reference = self._reference_for_new_data() if self.args.precompute_ref_log_probs else None
        prepared = prepare_sources(self.args, self.tokenizer, None, eval_dataset)
        known = self.data.train is not None or self.data.eval_sets or self.stream is not None
        if known and (prepared.kind, prepared.num_negatives) != (self.data.kind, self.data.num_negatives):
            raise ConfigError(f"eval_dataset holds {prepared.kind} data with {prepared.num_negatives} rejected "
                              f"response(s) per prompt; the trainer's data is {self.data.kind} with "
                              f"{self.data.num_negatives}", key="eval_dataset")
        if reference is not None:
            for name, data in prepared.eval_sets.items():
                self._attach_reference_logps(data, reference.to(self.accelerator.device), eval_key(name))
        return prepared.eval_sets

    def _evaluate_sets(self, model: nn.Module, run: RunTotals) -> None:
        """Evaluate every eval set during training (``model``: the prepared, possibly wrapped, policy); keep track
        of the best metric for ``load_best_model_at_end``."""
        metrics: dict[str, float] = {}
        for name, data in self.data.eval_sets.items():
            metrics.update(self._evaluate_one(model, data.dataset, eval_key(name)))
        run.last_eval_step = self.state.global_step
        improved = track_best_metric(self.args, self.state, metrics)
        if improved and strategy_name(self.args.save_strategy) == "best":  # transformers' "best": save what improved
            self.control.should_save = True

    @torch.no_grad()
    def _evaluate_one(self, model: nn.Module, dataset: Any, prefix: str) -> dict[str, float]:
        """Mean metrics over one tokenized eval set, named ``<prefix>_<metric>``; logged, then ``on_evaluate``."""
        self.parallelism.place_reference(self.reference)
        model.to(self.accelerator.device)
        was_training = model.training
        model.eval()
        forward_model = self.parallelism.unwrap(model)  # no DDP collectives in a forward without backward
        start = time.perf_counter()

        def score(lazy: LazyBatch, counted: bool) -> BatchLoss:
            with self.accelerator.autocast():
                return self.batch_loss(forward_model, lazy, counted=counted)

        means, rewards = mean_metrics(score, dataset, batch_maker=self.batch_maker, parallelism=self.parallelism,
                                      batch_size=self.args.per_device_eval_batch_size)
        model.train(was_training)
        metrics = {f"{prefix}_{key}": value for key, value in means.items()}
        metrics.update(computed_metrics(self.compute_metrics, rewards, prefix))
        metrics[f"{prefix}_runtime"] = time.perf_counter() - start
        self.log(metrics)
        shown = [key for key in ("loss", "rewards/accuracies", "rewards/margins", "kl") if f"{prefix}_{key}" in metrics]
        logger.info("%s at step %d: %s", prefix, self.state.global_step,
                    ", ".join(f"{key} {metrics[f'{prefix}_{key}']:.4g}" for key in shown))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: load the weights of the best checkpoint (by ``metric_for_best_model``)."""
        if not self.args.load_best_model_at_end or not self.state.best_model_checkpoint:
            return
        logger.info("loading the best model (%s = %s) from %s", self.args.metric_for_best_model
                    or "loss", self.state.best_metric, self.state.best_model_checkpoint)
        load_trainable_weights(self.model, Path(self.state.best_model_checkpoint))

    # ------------------------------------------------------------ save/load
    def _prepare_output_dir(self, resuming: bool) -> None:
        """Create ``output_dir`` and check it is writable now, not at the first checkpoint hours later."""
        output_dir = Path(self.args.output_dir)
        if not self.args.overwrite_output_dir and not resuming and output_dir.is_dir() and any(output_dir.iterdir()):
            raise ConfigError(
                f"output_dir {output_dir} is not empty; set overwrite_output_dir: true or choose another directory",
                key="overwrite_output_dir",
            )
        self.accelerator.wait_for_everyone()  # every process has looked before any writes its probe
        check_writable(output_dir)
        # This run's identity (preftune.checkpoint): a fresh run takes output_dir over; a resume keeps the id of its
        # checkpoint (``_read_resume_checkpoint``), after its fingerprint is compared with this one.
        self.run_id, self.fingerprint = new_run_id(), run_fingerprint(self.args, model=self.model, data=self.data)
        if not resuming and self.accelerator.is_main_process:
            start_fresh_run(output_dir, self.run_id)

    def save_model(self, output_dir: str | None = None) -> Path:
        """Save the policy (safetensors) and tokenizer so ``AutoModelForCausalLM.from_pretrained`` loads them."""
        target = Path(output_dir or self.args.output_dir)
        state_dict = self.parallelism.whole_weights(self.model)  # where split: a collective
        if self.accelerator.is_main_process:
            save_trainable_weights(self.parallelism.unwrap(self.model), self.tokenizer, target, state_dict)
        return target

    def merge_and_save(self, output_dir: str) -> Path:
        """Write the policy with its LoRA adapter merged in: a full model ``AutoModelForCausalLM`` loads."""
        if not is_peft_model(self.model):
            raise ConfigError("merge_and_save needs a LoRA policy (finetuning_type: lora or peft_config)", key="finetuning_type")
        if self.parallelism.lockstep_forwards:
            raise ConfigError(
                f"merge_and_save: the model is split across processes ({self.parallelism.name}); merge the saved "
                "adapter with `preftune export` instead", key=self.parallelism.config_key,
            )
        target = Path(output_dir)
        if self.accelerator.is_main_process:
            merge_and_save(self.parallelism.unwrap(self.model), self.tokenizer, target)
        return target

    def _save_checkpoint(self, model: nn.Module, step: int, optimizer: Any, scheduler: Any, run: RunTotals) -> None:
        """``checkpoint-<step>`` (``training_state.save_training_checkpoint``); the other processes wait until it is
        written."""
        trainer_state = {
            "global_step": step,
            "epoch": self.state.epoch,
            "totals": run.to_dict(),
            "log_history": self.recorder.history,
            "config": self.args.to_dict(),
            "world_size": self.world_size,
            "run": {"id": self.run_id, "fingerprint": self.fingerprint},  # preftune.checkpoint: runs never mix
        }
        best = self.state.best_model_checkpoint
        save_training_checkpoint(
            self.parallelism, model, optimizer, scheduler, Path(self.args.output_dir) / f"checkpoint-{step}",
            tokenizer=self.tokenizer, trainer_state=trainer_state, with_optimizer=not self.args.save_only_model,
            keep=self.args.save_total_limit or 0, run_id=self.run_id, best=Path(best) if best else None,
        )
        if self.state.best_global_step == step:
            self.state.best_model_checkpoint = str(Path(self.args.output_dir) / f"checkpoint-{step}")
        self.accelerator.wait_for_everyone()

    def _data_report(self) -> dict[str, Any]:
        """What the data step read, skipped, dropped and truncated, per split (a stream's counts add up)."""
        report = dict(self.data.report)
        if self.stream is not None and self._windows is not None:
            report["train"] = self._windows.report
        return report

    def _write_summary(self, runtime: float, run: RunTotals, training_loss: float) -> dict[str, Any]:
        """``summary.json`` (``summary.run_summary``) and the training curves, written by the main process."""
        summary = run_summary(
            self.recorder, run, runtime=runtime, training_loss=training_loss, global_step=self.state.global_step,
            epoch=self.state.epoch, num_processes=self.world_size, parallelism=self.parallelism.name,
            data_report=self._data_report(), config=self.args.to_dict(), eval_sets=self.data.eval_sets,
        )
        if self.accelerator.is_main_process:
            self.recorder.write_summary(summary)
            self.recorder.write_plot()
        return summary


def _default_args(model: Any) -> DPOConfig:
    """TRL's default arguments: ``output_dir`` "<model name>-DPO" in the current folder."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
    return DPOConfig(output_dir=f"{Path(str(name).rstrip('/')).name}-DPO")


def _resume_spec(argument: str | bool | None, configured: str | None) -> str | None:
    """What to resume from: ``train(resume_from_checkpoint=...)`` (True = the newest checkpoint, "latest") or else
    the config's ``resume_from_checkpoint``; None for a fresh run."""
    if argument is True:
        return "latest"
    if argument:
        return str(argument)
    return configured or None
