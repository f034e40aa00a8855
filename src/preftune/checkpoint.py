"""Checkpoints that resume exactly, written so that a crash at any moment leaves the old or the new one whole.

A checkpoint ``checkpoint-N/`` holds the trainable weights (model or LoRA adapter, safetensors), the optimizer
state (tensors in ``optimizer.safetensors``, the rest as JSON), the scheduler state, the RNG states of python,
numpy and torch (JSON), and ``trainer_state.json``: the step, the data position (the step count: batches are a
deterministic function of seed and epoch), the metric history so far and the running sums of the current logging
window. Nothing is pickled, so loading a checkpoint runs no code.

Writing (``preftune.atomic.write_folder``): everything goes into a hidden staging directory next to the target,
``manifest.json`` (size and sha256 of every file) last, each file fsynced, then the directory is renamed into place
(atomic on POSIX) and the parent fsynced. Reading verifies the manifest first, so a truncated or altered file is
detected; ``latest`` falls back to the newest intact checkpoint with a warning.

Runs never mix: every training run has a run id. ``trainer_state.json["run"]`` holds it with the run's fingerprint
(the settings, model and data that shape training; see ``preftune.preflight.run_fingerprint``), and ``run.json`` in
``output_dir`` names the run whose files the folder holds now (written when a run starts or resumes there). A fresh
run into a folder with another run's checkpoints claims the folder: ``latest`` then chooses among the claiming run's
checkpoints only (among all of them when it has none yet, or the folder predates run ids), and ``save_total_limit``
deletes only the run's own. Checkpoints written before run ids carry no ``run`` entry: no later run prunes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from preftune import atomic
from preftune.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng_state.json"
RUN_FILE = "run.json"  # in output_dir: {"run_id": ...}, the run whose files the folder holds
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------- state pieces
def optimizer_state_to_files(state_dict: dict, directory: Path) -> None:
    """``optimizer.state_dict()`` as safetensors (every tensor) plus JSON (param groups, non-tensor values). Its
    parameters are keyed by index (one process, DDP) or by parameter name (FSDP's whole state)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            key = f"{index}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    _write_json(directory / OPTIMIZER_META, {"param_groups": state_dict["param_groups"], "scalars": scalars})


def optimizer_state_from_files(directory: Path) -> dict:
    meta = _read_json(directory / OPTIMIZER_META)
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in [*load_file(str(directory / OPTIMIZER_TENSORS)).items(), *meta["scalars"].items()]:
        parameter, name = key.rsplit(".", 1)  # a parameter index or name, then the state's name (exp_avg, step)
        state.setdefault(int(parameter) if parameter.isdigit() else parameter, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> dict[str, Any]:
    """python, numpy and torch (CPU and every CUDA device) generator states, as JSON-able values."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


# ---------------------------------------------------------------------------------------------------- writing
def write_checkpoint(
    target: Path,
    *,
    save_weights: Callable[[Path], None],
    trainer_state: dict[str, Any],
    optimizer_state: dict | None = None,
    scheduler_state: dict | None = None,
    rank_rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint into ``target`` atomically (see the module docstring); returns ``target``.

    ``rank_rng_states`` (several processes): every process's ``rng_states()``, by rank; rank 0's go to
    ``rng_state.json`` as in a one-process run, rank r's to ``rng_state_rank<r>.json``. Default: this process's.

    Raises CheckpointError (naming the directory) when it cannot be written, e.g. a full disk; the staging
    directory is removed and any previous checkpoint is left as it was.
    """
    target = Path(target)

    def write(staging: Path) -> None:
        save_weights(staging)
        if optimizer_state is not None:
            optimizer_state_to_files(optimizer_state, staging)
        if scheduler_state is not None:
            _write_json(staging / SCHEDULER_FILE, scheduler_state)
        for rank, states in enumerate(rank_rng_states or [rng_states()]):
            _write_json(staging / _rng_file(rank), states)
        _write_json(staging / STATE_FILE, trainer_state)
        _write_json(staging / MANIFEST_FILE, _manifest(staging))  # last: it vouches for every other file

    try:
        atomic.write_folder(target, write)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        kept = [path.name for path in list_checkpoints(target.parent) if verify_checkpoint(path) is None]
        previous = f"the intact checkpoints ({', '.join(kept)}) are untouched" if kept else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {target}: {error}; {previous}. Free space (or fix permissions) and resume "
            "with resume_from_checkpoint: latest"
        ) from error
    return target


def prune_checkpoints(output_dir: Path, keep: int, newest: Path, run_id: str | None = None,
                      best: Path | None = None) -> None:
    """Delete the oldest ``checkpoint-N`` folders beyond ``keep``; ``newest`` (just written) and ``best`` (the best
    checkpoint by ``metric_for_best_model``) are never deleted, so one more may stay (as transformers keeps the best).
    With ``run_id``, only that run's checkpoints are counted and deleted (never another run's)."""
    if not keep:
        return
    checkpoints = list_checkpoints(output_dir)
    if run_id is not None:
        checkpoints = [path for path in checkpoints if checkpoint_run(path)[0] == run_id]
    protected = {Path(path).resolve() for path in (newest, best) if path is not None}
    deletable = [path for path in checkpoints if path.resolve() not in protected]
    for stale in deletable[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- reading
def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _CHECKPOINT_NAME.match(p.name)) and p.is_dir() and not p.is_symlink()  # a link may lead outside
    ]
    return [path for _, path in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """None when every file listed in the manifest is there with its size and sha256; else what is wrong."""
    path = Path(path)
    try:
        manifest = _read_json(path / MANIFEST_FILE)
    except (OSError, ValueError) as error:
        return f"no readable {MANIFEST_FILE} ({error})"
    if not isinstance(manifest, dict):
        return f"{MANIFEST_FILE} is not a JSON object"
    for name, expected in manifest.items():
        file = path / name
        if not _stays_inside(path, name):
            return f"{MANIFEST_FILE} names {name!r}, a path outside the checkpoint"
        if not isinstance(expected, dict) or not {"size", "sha256"} <= expected.keys():
            return f"{MANIFEST_FILE} entry {name!r} lacks size and sha256"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            return f"{name} does not match its recorded size and checksum (truncated or altered)"
    return None


def resolve_resume_path(spec: str, output_dir: Path) -> Path:
    """The checkpoint to resume from: ``latest`` → the newest intact one of ``latest_candidates``; else the given
    path, which must be intact. Raises CheckpointError otherwise."""
    if spec != "latest":
        path = Path(spec)
        problem = verify_checkpoint(path) if path.is_dir() else "no such directory"
        if problem:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        return path
    candidates = latest_candidates(output_dir)
    others = [path.name for path in list_checkpoints(output_dir) if path not in candidates]
    if others:
        logger.info("latest: choosing among the checkpoints of the run that last wrote %s (%s), not another run's (%s)",
                    output_dir, RUN_FILE, ", ".join(others))
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("skipping damaged checkpoint %s: %s; trying the previous one", path, problem)
    other_runs = (f" of this run; the other runs' checkpoints ({', '.join(others)}) are not chosen by latest: name one "
                  "to resume it") if others else ""
    raise CheckpointError(f"resume_from_checkpoint: latest, but {output_dir} holds no intact checkpoint-N folder"
                          f"{other_runs}")


def latest_candidates(output_dir: Path) -> list[Path]:
    """The checkpoints ``latest`` may choose, newest first (unverified): those of the run named in
    ``output_dir/run.json`` when it has any, else every ``checkpoint-N`` of the folder."""
    checkpoints = list_checkpoints(output_dir)
    current = read_run_id(output_dir)
    own = [path for path in checkpoints if current is not None and checkpoint_run(path)[0] == current]
    return list(reversed(own or checkpoints))


# ------------------------------------------------------------------------------------------------ run identity
def new_run_id() -> str:
    """A fresh run id (32 hex digits)."""
    return uuid.uuid4().hex


def read_run_id(output_dir: Path) -> str | None:
    """The run id in ``output_dir/run.json``, or None (no such file, or unreadable: a folder from before run ids)."""
    try:
        run_id = _read_json(Path(output_dir) / RUN_FILE).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def claim_output_dir(output_dir: Path, run_id: str) -> None:
    """Record in ``output_dir/run.json`` (atomically) that the folder's files are run ``run_id``'s from now on."""
    atomic.write_json(Path(output_dir) / RUN_FILE, {"run_id": run_id}, indent=None)


def checkpoint_run(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """``(run id, fingerprint)`` recorded in a checkpoint's ``trainer_state.json["run"]``; ``(None, None)`` for a
    checkpoint written before run ids, or an unreadable one."""
    try:
        run = _read_json(Path(path) / STATE_FILE).get("run")
    except (OSError, ValueError, AttributeError):
        return None, None
    if not isinstance(run, dict):
        return None, None
    fingerprint = run.get("fingerprint")
    return run.get("id"), fingerprint if isinstance(fingerprint, dict) else None


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for each key both fingerprints record with different values, by key.

    A key only one side records is not compared: it was added to (or dropped from) the fingerprint by another
    preftune version, which says nothing about the run."""
    return [(key, saved[key], current[key]) for key in sorted(saved.keys() & current.keys()) if saved[key] != current[key]]



def read_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    """``{"trainer_state", "optimizer" (or None), "scheduler" (or None), "rng"}`` of an intact checkpoint; ``rng``
    holds the RNG states of process ``rank``."""
    path = Path(path)
    try:
        return {
            "trainer_state": _read_json(path / STATE_FILE),
            "optimizer": optimizer_state_from_files(path) if (path / OPTIMIZER_TENSORS).exists() else None,
            "scheduler": _read_json(path / SCHEDULER_FILE) if (path / SCHEDULER_FILE).exists() else None,
            "rng": _read_json(path / _rng_file(rank)),
        }
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


# ---------------------------------------------------------------------------------------------------- helpers
def _rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else f"rng_state_rank{rank}.json"


def _stays_inside(directory: Path, name: str) -> bool:
    """True when ``directory/name`` is a plain relative path inside ``directory``: no absolute path, no ``..``,
    no symbolic link on the way (a crafted manifest must not make us read files elsewhere)."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        return False
    current = directory
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            return False
    return True


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, allow_nan=True), encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
