"""Before a run: every check that needs no loaded model and no tokenized data, in one pass; and the run's identity.

``run_preflight_checks`` runs first in ``DPOTrainer.__init__`` (and in ``preftune train`` before a torchrun
re-launch): output_dir, resume_from_checkpoint, the model and reference paths, the datasets, the template and the
loss settings, so that a wrong path or key fails in a second; every problem found is reported (several:
``PreflightError``). ``run_fingerprint`` is the run's identity (the settings that shape training, the model, the
data); ``check_resume_fingerprint`` refuses a resume whose checkpoint recorded another, naming each key.

The checks in order, and what a fingerprint leaves out: docs/preflight.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from preftune.checkpoint import (
    MANIFEST_FILE,
    OPTIMIZER_TENSORS,
    STATE_FILE,
    checkpoint_run,
    claim_output_dir,
    fingerprint_differences,
    latest_candidates,
    list_checkpoints,
)
from preftune.data.formats import locate_sources
from preftune.data.templates import check_template_name
from preftune.errors import CheckpointError, ConfigError, PreftuneError
from preftune.logprobs import unwrap_model
from preftune.losses import LossParams
from preftune.models import ModelSource, locate_model, locate_tokenizer

logger = logging.getLogger(__name__)

# The config key that lets a resume go on with a fingerprint that differs from the checkpoint's (read with
# getattr until DPOConfig has it).
OVERRIDE_KEY = "resume_with_changed_settings"

# Top-level files of a training run in output_dir (written by ``metrics.RunRecorder``); a fresh run removes an
# earlier run's, so that ``preftune report`` never reads one run's log with another run's summary.
RUN_OUTPUT_FILES = ("log_history.json", "training_metrics.csv", "summary.json", "training_curves.png")

_SAME_VALUES = "the same values computed another way (tested equal)"
_CADENCE = "when metrics are logged or written: the weights do not depend on it"
_PROCESSES = "where and how the work is split; the process count is checked on resume by itself (it must match)"

# Settings that do not change the training trajectory, so a resume may change them. Every other key of
# ``DPOConfig.to_dict()`` is part of the fingerprint (a new key is fingerprinted unless it is added here).
NOT_FINGERPRINTED: dict[str, str] = {
    "output_dir": "where the outputs go",
    "overwrite_output_dir": "whether writing into a non-empty output_dir is allowed",
    "resume_from_checkpoint": "the resume request itself",
    OVERRIDE_KEY: "the resume override itself",
    "run_name": "a label",
    "report_to": "where metrics are reported",
    "plot_loss": "whether plots are drawn",
    "logging_steps": _CADENCE,
    "logging_first_step": _CADENCE,
    "eval_strategy": _CADENCE,
    "eval_steps": _CADENCE,
    "per_device_eval_batch_size": "evaluation batching: eval metrics are means over pairs",
    "do_eval": _CADENCE,
    "do_train": "always true for a run that writes checkpoints",
    "save_strategy": _CADENCE,
    "save_steps": _CADENCE,
    "save_total_limit": _CADENCE,
    "save_only_model": _CADENCE,
    "nonfinite_loss": "acts only on a non-finite step; switching to skip to get past one is a reason to resume",
    "prefix_sharing": _SAME_VALUES,
    "padding_free": _SAME_VALUES,
    "chunked_lm_head": _SAME_VALUES,
    "lm_head_chunk_size": _SAME_VALUES,
    "lm_head_chunk_mib": _SAME_VALUES,
    "torch_compile": _SAME_VALUES,
    "gradient_checkpointing": _SAME_VALUES,
    "gradient_checkpointing_kwargs": _SAME_VALUES,
    "activation_checkpointing": _SAME_VALUES,
    "activation_checkpointing_kwargs": _SAME_VALUES,
    "activation_offloading": _SAME_VALUES,
    "keep_freed_cpu_memory": "memory policy only",
    "precompute_ref_log_probs": "the same reference log-probs, computed ahead",
    "precompute_ref_batch_size": "the same reference log-probs, computed ahead",
    "optim": "adamw_torch_fused, adamw_torch and adamw_hf are the same AdamW (fused falls back by itself)",
    "dataset_num_proc": "tokenization speed only",
    "dataloader_num_workers": "loading speed only",
    "overwrite_cache": "caching only",
    "remove_unused_columns": "has no effect",
    "on_bad_row": "its effect on the rows used is in the data fingerprint",
    "use_cpu": _PROCESSES,
    "nproc": _PROCESSES,
    "fsdp": _PROCESSES,
    "deepspeed": _PROCESSES,
    "ddp_timeout": _PROCESSES,
    "trust_remote_code": "a permission, not a setting of the run",
    # Recorded by identity instead (below): a moved data file or a relative path is the same input.
    "dataset": "recorded as the tokenized data's content fingerprint ('train data')",
    "dataset_dir": "recorded as the tokenized data's content fingerprint ('train data', 'eval data')",
    "eval_dataset": "recorded as the tokenized data's content fingerprint ('eval data')",
    "model_name_or_path": "recorded as the absolute folder and the sha256 of its config.json",
    "ref_model_name_or_path": "recorded as the absolute folder and the sha256 of its config.json",
    "tokenizer_name_or_path": "recorded as the absolute folder (its content is in the data fingerprint)",
}


class PreflightError(PreftuneError):
    """Several problems found before loading anything; ``problems`` holds each (a ConfigError, DataError or
    CheckpointError naming its key or file). The message lists them on one line; the CLI prints one line each."""

    def __init__(self, problems: list[PreftuneError]):
        self.problems = problems
        listed = "; ".join(f"({number}) {problem}" for number, problem in enumerate(problems, start=1))
        super().__init__(f"{len(problems)} problems found before loading the model: {listed}")


# ------------------------------------------------------------------------------------------------- preflight
def run_preflight_checks(
    args: Any,
    *,
    model: nn.Module | str | None = None,
    ref_model: nn.Module | str | None = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    tokenizer: Any = None,
) -> None:
    """Run every check of docs/preflight.md on ``args`` (a ``DPOConfig``) and the objects or paths given to
    ``DPOTrainer``; raise the problem found (several: ``PreflightError``), log the warnings. Loads nothing."""
    problems: list[PreftuneError] = []

    def attempt(check, *arguments) -> Any:
        try:
            return check(*arguments)
        except PreftuneError as error:
            problems.append(error)
            return None

    attempt(_check_output_dir, args)
    if args.do_train and args.resume_from_checkpoint:
        attempt(_check_resume_target, args, model)
    attempt(_check_models, args, model, ref_model, tokenizer)
    attempt(_check_data_sources, args, train_dataset, eval_dataset)
    if args.template is not None:
        attempt(check_template_name, args.template)
    attempt(_check_loss_settings, args, ref_model)
    _raise_all(problems)


def _raise_all(problems: list[PreftuneError]) -> None:
    """Raise the one problem found as itself, several as one ``PreflightError`` (flattened); nothing for none."""
    flat = [inner for problem in problems for inner in (problem.problems if isinstance(problem, PreflightError) else [problem])]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise PreflightError(flat)


def _check_output_dir(args: Any) -> None:
    output_dir = Path(os.path.expanduser(args.output_dir))
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {output_dir} is a file; expected a folder (or a path that does not exist yet)",
                          key="output_dir", file=args.config_file)
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {output_dir} is not writable: {existing} is a file, not a folder",
                          key="output_dir", file=args.config_file)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir} is not writable: no permission to write in {existing} (or a "
                          "read-only disk)", key="output_dir", file=args.config_file)
    if not args.do_train or args.resume_from_checkpoint or not output_dir.is_dir():
        return
    if not args.overwrite_output_dir and any(output_dir.iterdir()):
        raise ConfigError(
            f"output_dir {output_dir} is not empty; set overwrite_output_dir: true or choose another directory",
            key="overwrite_output_dir", file=args.config_file,
        )
    _warn_about_an_earlier_run(output_dir)


def _warn_about_an_earlier_run(output_dir: Path) -> None:
    """One warning when a fresh run goes into a folder holding another run's checkpoints or outputs."""
    checkpoints = [path.name for path in list_checkpoints(output_dir)]
    outputs = [name for name in RUN_OUTPUT_FILES if (output_dir / name).is_file()]
    if not checkpoints and not outputs:
        return
    named = ", ".join(checkpoints[:5]) + (f" and {len(checkpoints) - 5} more" if len(checkpoints) > 5 else "")
    what = f"checkpoints ({named})" if checkpoints else f"outputs ({', '.join(outputs)})"
    _warn(
        "output_dir %s holds another run's %s: this run starts fresh (resume_from_checkpoint is not set), never "
        "resumes from, prunes or reports them, and replaces that run's %s. To continue that run instead, set "
        "resume_from_checkpoint: latest", output_dir, what, ", ".join(RUN_OUTPUT_FILES[:3]),
    )


def _check_resume_target(args: Any, model: nn.Module | str | None) -> None:
    """The checkpoint to resume from is there, is resumable, and its fingerprint (if it has one) matches."""
    spec, output_dir = args.resume_from_checkpoint, Path(args.output_dir)
    if spec == "latest":
        candidates = latest_candidates(output_dir)
        if not candidates:
            raise CheckpointError(f"resume_from_checkpoint: latest, but {output_dir} holds no checkpoint-N folder; "
                                  "remove resume_from_checkpoint to start a fresh run")
        path = candidates[0]  # verified (checksums) when training starts; a damaged one then falls back
    else:
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"cannot resume from {path}: no such directory")
        if not (path / MANIFEST_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise CheckpointError(f"cannot resume from {path}: not a preftune checkpoint (no {MANIFEST_FILE} or "
                                  f"{STATE_FILE}); expected a checkpoint-N folder written by preftune")
    if not (path / OPTIMIZER_TENSORS).is_file():
        raise CheckpointError(f"{path} holds no optimizer/scheduler state (saved with save_only_model): cannot resume")
    _, saved = checkpoint_run(path)
    if saved is not None:  # a checkpoint without one is resumed with a warning when training starts
        check_resume_fingerprint(saved, run_fingerprint(args, model=model), path, args, warn=False)


def _check_models(args: Any, model: nn.Module | str | None, ref_model: nn.Module | str | None, tokenizer: Any) -> None:
    """Policy, tokenizer and reference paths (loaded objects are not checked); ``max_length`` against the context."""
    problems: list[PreftuneError] = []
    policy = model if model is not None else args.model_name_or_path
    if policy is None:
        problems.append(ConfigError("no model given: set model_name_or_path", key="model_name_or_path",
                                    file=args.config_file))
    source = None
    if isinstance(policy, (str, os.PathLike)):
        source = _located(problems, locate_model, policy, "model_name_or_path", args)
        if source is not None:
            _warn_max_length(args, source)
    if tokenizer is None and args.tokenizer_name_or_path:
        _located(problems, locate_tokenizer, args.tokenizer_name_or_path, "tokenizer_name_or_path", args)
    elif tokenizer is None and source is not None and source.folder is not None:
        _located(problems, locate_tokenizer, source.folder, "model_name_or_path", args)
    reference = ref_model if ref_model is not None else args.ref_model_name_or_path
    if isinstance(reference, (str, os.PathLike)) and _needs_reference(args):
        _located(problems, locate_model, reference, "ref_model_name_or_path", args)
    _raise_all(problems)


def _located(problems: list[PreftuneError], locate, name: str | os.PathLike, key: str, args: Any) -> ModelSource | None:
    """``locate(name, key=key)``, its error added to ``problems`` (with the config file); a Hub id logs a warning."""
    try:
        source = locate(os.fspath(name), key=key)
    except ConfigError as error:
        problems.append(ConfigError(error.message, key=key, file=args.config_file))
        return None
    if source.folder is None and locate is locate_model:
        _warn("%s '%s' is not a local folder: preftune will try to load it as a Hugging Face Hub id "
              "(from the local hub cache when offline, HF_HUB_OFFLINE=1)", key, name)
    return source


def _warn_max_length(args: Any, source: ModelSource) -> None:
    limit = source.context_length
    if limit is not None and args.max_length is not None and args.max_length > limit:
        _warn(
            "max_length %d is above the model's max_position_embeddings %d (%s): sequences longer than %d tokens "
            "go beyond the positions it was trained on; set max_length: %d or less", args.max_length, limit,
            source.folder / "config.json", limit, limit,
        )


def _check_data_sources(args: Any, train_dataset: Any, eval_dataset: Any) -> None:
    train = train_dataset if train_dataset is not None else args.dataset
    if train is None and args.do_train:
        raise ConfigError("no training data: `train_dataset` is required (pass train_dataset= or set dataset)",
                          key="dataset", file=args.config_file)
    problems: list[PreftuneError] = []
    evaluation = eval_dataset if eval_dataset is not None else args.eval_dataset
    for key, source in (("dataset", train), ("eval_dataset", evaluation)):
        names = isinstance(source, str) or (isinstance(source, list) and source and all(isinstance(s, str) for s in source))
        if not names:  # rows or a datasets.Dataset in memory: nothing to find
            continue
        try:
            located = locate_sources(source, dataset_dir=args.dataset_dir)
        except PreftuneError as error:
            problems.append(error)
            continue
        for name, path in located:
            if path is None:
                _warn("%s '%s' is neither a local file nor a dataset registered in dataset_dir: preftune "
                      "will try to load it from the Hugging Face Hub", key, name)
    _raise_all(problems)


def _needs_reference(args: Any) -> bool:
    try:
        return LossParams.from_config(args).needs_reference
    except PreftuneError:  # reported by _check_loss_settings
        return True


def _check_loss_settings(args: Any, ref_model: nn.Module | str | None) -> None:
    params = LossParams.from_config(args)
    params.validate()
    if not params.needs_reference and (ref_model is not None or args.ref_model_name_or_path is not None):
        raise ConfigError(f"loss {args.loss_type} uses no reference model, but one was given; leave it out",
                          key="ref_model", file=args.config_file)


# ------------------------------------------------------------------------------------------- run fingerprint
def run_fingerprint(args: Any, *, model: nn.Module | str | None = None, data: Any = None) -> dict[str, Any]:
    """The settings that shape training, by key (``args.to_dict()`` less ``NOT_FINGERPRINTED``), plus identities:
    ``model_name_or_path`` / ``ref_model_name_or_path`` / ``tokenizer_name_or_path`` as absolute folders (a Hub id
    as given), ``<key> config.json`` the sha256 (16 hex digits) of a model folder's config.json, and with ``data``
    (``PreparedData``) ``train data`` / ``eval data``, the tokenized data's content fingerprints.

    ``model``: the policy given to ``DPOTrainer`` (a path, or a loaded model: its ``name_or_path``); default
    ``args.model_name_or_path``. JSON values throughout, so a fingerprint read back from a checkpoint compares equal.
    """
    fingerprint = {key: value for key, value in args.to_dict().items() if key not in NOT_FINGERPRINTED}
    fingerprint.update(_model_identity("model_name_or_path", _model_name(model) or args.model_name_or_path))
    fingerprint.update(_model_identity("ref_model_name_or_path", args.ref_model_name_or_path))
    fingerprint["tokenizer_name_or_path"] = _absolute(args.tokenizer_name_or_path)
    if data is not None:
        fingerprint["train data"] = getattr(data.train, "fingerprint", "")[:16] or None
        fingerprint["eval data"] = (getattr(data.eval, "fingerprint", "")[:16] or None) if data.eval is not None else None
    return json.loads(json.dumps(fingerprint))


def check_resume_fingerprint(saved: dict[str, Any] | None, current: dict[str, Any], path: Path, args: Any, *,
                             warn: bool = True) -> None:
    """Refuse to resume from checkpoint ``path`` when its fingerprint ``saved`` differs from this run's ``current``:
    ConfigError naming each differing key (saved -> current) and the ways out. With ``resume_with_changed_settings``
    true, or a checkpoint without a fingerprint (written before them), a warning instead (when ``warn``)."""
    if saved is None:
        if warn:
            logger.warning("%s was written before preftune recorded run fingerprints: resuming it without checking "
                           "that this run's settings, model and data are the ones it was trained with", path)
        return
    differences = fingerprint_differences(saved, current)
    if not differences:
        return
    described = ", ".join(f"{key}: {_shown(old)} -> {_shown(new)}" for key, old, new in differences)
    if getattr(args, OVERRIDE_KEY, False):
        if warn:
            logger.warning("resuming from %s with changed settings (%s: true): %s", path, OVERRIDE_KEY, described)
        return
    raise ConfigError(
        f"cannot resume from {path}: it was written by a run with other settings ({described}); resuming would mix "
        f"two runs. Resume with that run's settings, start a fresh run (remove resume_from_checkpoint, or choose "
        f"another output_dir), or set {OVERRIDE_KEY}: true to continue with the new settings on purpose",
        key="resume_from_checkpoint", file=args.config_file,
    )


def check_writable(output_dir: Path) -> None:
    """Create ``output_dir`` and write and remove a probe file in it: ConfigError (key ``output_dir``) now, not at
    the first checkpoint hours later."""
    probe = output_dir / f".preftune-write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"output_dir {output_dir} is not writable: {error}", key="output_dir") from error


def start_fresh_run(output_dir: Path, run_id: str) -> None:
    """A run that does not resume takes ``output_dir`` over: ``run.json`` names it, and an earlier run's top-level
    outputs (``RUN_OUTPUT_FILES``) are removed now rather than when this run first overwrites each (its checkpoints
    stay: ``latest`` and pruning leave them alone, see ``preftune.checkpoint``)."""
    for name in RUN_OUTPUT_FILES:
        stale = Path(output_dir) / name
        if stale.is_file():
            stale.unlink()
            logger.info("removed %s of an earlier run", stale)
    claim_output_dir(output_dir, run_id)


def _warn(message: str, *values: Any) -> None:
    """A preflight warning, logged once: by the process that is not a replica under torchrun (RANK unset or 0)."""
    if os.environ.get("RANK", "0") == "0":
        logger.warning(message, *values)


def _model_name(model: nn.Module | str | None) -> str | None:
    """The path or Hub id a policy was loaded from (a loaded model: its config's ``_name_or_path``)."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return os.fspath(model) if model is not None else None
    return getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", None) or None


def _model_identity(key: str, name: str | None) -> dict[str, Any]:
    if name is None:
        return {key: None}
    path = Path(os.path.expanduser(name))
    if not path.is_dir():
        return {key: name}
    config = path / "config.json"
    if not config.is_file():
        config = path / "adapter_config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else None
    return {key: str(path.resolve()), f"{key} config.json": digest}


def _absolute(name: str | None) -> str | None:
    if name is None:
        return None
    path = Path(os.path.expanduser(name))
    return str(path.resolve()) if path.exists() else name


def _shown(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
