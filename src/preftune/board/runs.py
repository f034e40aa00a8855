"""The board's runs: the start form's fields (from the config schema), its validation (the CLI's code), and the
run manager that starts `preftune train` as a subprocess, stops it gracefully, resumes it and reads its files.

A run lives in ``RUNS_DIR/<name>/``, which is also its ``output_dir``: ``config.yaml`` (what `preftune train`
reads), ``board.log`` (its stdout and stderr), ``board.json`` (the board's record: state, pid, start times), and
every file the trainer writes there (README "Outputs"). The board reads metrics with ``preftune.report`` and
``preftune.diagnostics``; it computes no metric itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from preftune import atomic
from preftune.checkpoint import list_checkpoints
from preftune.config import DPOConfig, canonical_key, parse_overrides
from preftune.diagnostics import detect_displacement, grad_norm_spikes
from preftune.errors import ConfigError, DataError, PreftuneError
from preftune.report import build_report, read_log_history

CONFIG_FILE = "config.yaml"
LOG_FILE = "board.log"
STATE_FILE = "board.json"
EVAL_DIR = "eval"  # `preftune eval --output-dir`: eval_results.json, its plot and eval.log
EVAL_LOG = "eval.log"
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GENERAL = "_general"  # the errors key of a problem that names no form field
MAX_LOG_CHUNK = 256 * 1024
YAML_HEADER = "# written by preftune board; output_dir also holds this file and the board's log\n"

# The start form: config keys in the order shown, with the value the form starts from (None: the schema default).
FORM_KEYS: tuple[tuple[str, Any], ...] = (
    ("model_name_or_path", None),
    ("dataset", None),
    ("eval_dataset", None),
    ("template", None),
    ("loss_type", None),
    ("beta", None),
    ("learning_rate", 5e-6),
    ("finetuning_type", None),
    ("lora_rank", None),
    ("max_steps", 100),
    ("per_device_train_batch_size", None),
    ("max_length", None),
    ("logging_steps", 1),
    ("save_steps", 50),
    ("eval_strategy", None),
    ("eval_steps", None),
)
CORE_KEYS = frozenset({"model_name_or_path", "dataset", "loss_type", "beta", "learning_rate", "finetuning_type",
                       "max_steps"})


@dataclass(frozen=True)
class FormField:
    """One input of the start form: ``kind`` is text, number, select or checkbox."""

    key: str
    kind: str
    default: Any  # what the form starts with
    schema_default: Any  # the config's default (a value equal to it need not be written)
    choices: tuple[str, ...]
    description: str
    core: bool  # always written into the YAML, even at its default (the settings a reader looks for first)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "default": self.default, "schema_default": self.schema_default,
                "choices": list(self.choices), "description": self.description, "core": self.core}


def form_fields() -> list[FormField]:
    """The start form's fields, read from ``DPOConfig``'s schema (type, default, choices, description)."""
    from preftune.losses import LOSSES

    fields = []
    for key, start in FORM_KEYS:
        info = DPOConfig.model_fields[key]
        default = info.default if start is None else start
        choices: tuple[str, ...] = ()
        annotation = info.annotation
        literal = [arg for arg in typing.get_args(annotation) if typing.get_origin(arg) is typing.Literal]
        if typing.get_origin(annotation) is typing.Literal:
            choices = tuple(str(arg) for arg in typing.get_args(annotation))
        elif literal:
            choices = tuple(str(arg) for arg in typing.get_args(literal[0]))
        elif key == "loss_type":
            choices = tuple(LOSSES)
        if key == "finetuning_type":
            choices = tuple(choice for choice in choices if choice != "freeze")  # refused by the schema anyway
        kind = "select" if choices else "number" if _is_numeric(annotation) else "text"
        fields.append(FormField(key, kind, default, info.default, choices, info.description or "", key in CORE_KEYS))
    return fields


def _is_numeric(annotation: Any) -> bool:
    members = typing.get_args(annotation) or (annotation,)
    return any(member in (int, float) for member in members)


@dataclass
class Validation:
    """The form checked: ``settings`` (the keys given, typed as the CLI types overrides), ``errors`` (form key ->
    the library's one-line message), the YAML and the equivalent command."""

    settings: dict[str, Any]
    errors: dict[str, str]
    yaml: str
    command: str

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": self.errors, "yaml": self.yaml, "command": self.command,
                "settings": self.settings}


def validate_form(form: dict[str, Any], output_dir: str | Path, *, check_files: bool = True) -> Validation:
    """Check the form's values as `preftune train config.yaml` would: each value parsed as a ``key=value``
    override (``config.parse_overrides``), validated by ``DPOConfig.from_mapping`` each key alone (so that each field
    gets its own message, without the others') and then all together (the combinations), then with
    ``check_files`` the preflight checks (model folder, data files, template, loss settings) that load nothing.

    Empty values are left out (the schema default applies). ``output_dir`` is the run's folder.
    """
    errors: dict[str, str] = {}
    settings: dict[str, Any] = {}
    for key, value in form.items():
        if not isinstance(key, str) or key == "output_dir":
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        if isinstance(value, bool):
            text = "true" if value else "false"
        if value is None or not text.strip():
            continue
        if canonical_key(key) is None:
            errors[key] = f"unknown key {key!r}"
            continue
        try:
            settings.update(parse_overrides([f"{key}={text.strip()}"]))
        except ConfigError as error:
            errors[key] = error.message
    base = {"output_dir": str(output_dir), "overwrite_output_dir": True}
    for key, value in settings.items():  # each field alone first: its message names only itself
        try:
            DPOConfig.from_mapping({**base, key: value})
        except ConfigError as error:
            errors[key] = error.message
    config = None
    if not errors:
        try:  # then together: the combinations (e.g. a loss parameter its loss does not take)
            config = DPOConfig.from_mapping({**settings, **base})
        except ConfigError as error:
            key = error.key if error.key in settings else GENERAL
            errors[key] = error.message if key != GENERAL else str(error)
    if config is not None and not errors and check_files:
        errors.update(_preflight_errors(config, settings))
    text = YAML_HEADER + yaml.safe_dump({**settings, "output_dir": str(output_dir), "overwrite_output_dir": True},
                                        allow_unicode=True, sort_keys=False)
    command = f"preftune train {Path(output_dir) / CONFIG_FILE}"
    return Validation(settings=settings, errors=errors, yaml=text, command=command)


def _preflight_errors(config: DPOConfig, settings: dict[str, Any]) -> dict[str, str]:
    """The preflight problems (``preflight.run_preflight_checks``), by the form field they name."""
    from preftune.preflight import PreflightError, run_preflight_checks

    try:
        run_preflight_checks(config)
    except PreflightError as error:
        problems = error.problems
    except PreftuneError as error:
        problems = [error]
    else:
        return {}
    errors: dict[str, str] = {}
    for problem in problems:
        key = _field_of(problem, settings)
        text = problem.message if isinstance(problem, ConfigError) and key != GENERAL else str(problem)
        errors[key] = f"{errors[key]}; {text}" if key in errors else text
    return errors


def _field_of(problem: PreftuneError, settings: dict[str, Any]) -> str:
    if isinstance(problem, ConfigError) and problem.key:
        name = canonical_key(problem.key) or problem.key
        for key in settings:
            if canonical_key(key) == name:
                return key
        return name if name in dict(FORM_KEYS) else GENERAL
    if isinstance(problem, DataError) and problem.file:
        for key in ("dataset", "eval_dataset"):
            if settings.get(key) and str(settings[key]) in str(problem.file):
                return key
    return GENERAL


# --------------------------------------------------------------------------------------------------------------
# The run manager
# --------------------------------------------------------------------------------------------------------------


class BoardError(PreftuneError):
    """A request the run manager refuses; ``status`` is the HTTP status the app answers with."""

    def __init__(self, message: str, status: int = 400, errors: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.errors = errors or {}


class RunManager:
    """The runs under ``runs_dir``; at most one training process at a time per board (``start``/``resume`` while
    one runs: BoardError 409)."""

    def __init__(self, runs_dir: str | Path, *, python: str = sys.executable, env: dict[str, str] | None = None):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.env = env
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._active: str | None = None
        self._evals: dict[str, subprocess.Popen] = {}  # run name -> its `preftune eval` process

    # ---- starting, stopping, resuming ------------------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise BoardError(f"run name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64)", 400,
                             {"name": "expected letters, digits, '.', '_' or '-' (at most 64)"})
        return self.runs_dir / name

    def validate(self, name: str, form: dict[str, Any]) -> Validation:
        return validate_form(form, self.run_dir(name))

    def start(self, name: str, form: dict[str, Any]) -> Validation:
        """Validate, write ``config.yaml`` and start `preftune train` on it. BoardError 400 (with the field
        errors) when invalid, 409 when the name is taken or a run is going."""
        folder = self.run_dir(name)
        if folder.exists():
            raise BoardError(f"a run named {name!r} exists already; choose another name", 409,
                             {"name": "a run with this name exists already"})
        self._check_idle()  # first: no use fixing the settings of a run that cannot start yet
        checked = self.validate(name, form)
        if not checked.ok:
            raise BoardError("the settings have problems (see each field)", 400, checked.errors)
        with self._lock:
            self._check_idle()
            folder.mkdir(parents=True)
            atomic.write_text(folder / CONFIG_FILE, checked.yaml)
            self._launch(name, [], resumed=False)
        return checked

    def stop(self, name: str) -> dict[str, Any]:
        """Ask the running process to stop (SIGINT: it saves a checkpoint after the current step, then ends)."""
        with self._lock:
            if self._active == name and self._process is not None and self._process.poll() is None:
                self._process.send_signal(signal.SIGINT)
            elif (pid := self._earlier_process(name)) is not None:
                os.kill(pid, signal.SIGINT)
            else:
                raise BoardError(f"run {name!r} is not running", 409)
            self._update_state(name, stop_requested=time.time())
        return self.status(name)

    def resume(self, name: str) -> dict[str, Any]:
        """Continue a stopped (or failed) run from its newest checkpoint (`resume_from_checkpoint=latest`)."""
        folder = self.run_dir(name)
        if not (folder / CONFIG_FILE).is_file():
            raise BoardError(f"no run named {name!r}", 404)
        if not list_checkpoints(folder):
            raise BoardError(f"run {name!r} has no checkpoint to resume from", 409)
        with self._lock:
            self._check_idle()
            self._launch(name, ["resume_from_checkpoint=latest"], resumed=True)
        return self.status(name)

    def _check_idle(self) -> None:
        if self._process is not None and self._process.poll() is None:
            raise BoardError(f"run {self._active!r} is still training; stop it or wait (one run at a time)", 409)
        for name in self.names():
            if self._earlier_process(name) is not None:
                raise BoardError(f"run {name!r} (started by an earlier board) is still training; stop it or wait "
                                 "(one run at a time)", 409)

    def _earlier_process(self, name: str) -> int | None:
        """The pid of `preftune train` on this run's config when a previous board started it and it still runs
        (read from /proc: None where there is none)."""
        state = self._state(name)
        pid = state.get("pid")
        if not isinstance(pid, int) or state.get("returncode") is not None:
            return None
        if self._process is not None and self._process.pid == pid:
            return None
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if str(self.runs_dir / name / CONFIG_FILE).encode() in command else None

    def _launch(self, name: str, overrides: list[str], *, resumed: bool) -> None:
        folder = self.runs_dir / name
        command = [self.python, "-m", "preftune.cli", "train", str(folder / CONFIG_FILE), *overrides]
        env = dict(self.env if self.env is not None else os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(folder / LOG_FILE, "ab") as log:
            log.write(f"$ preftune train {folder / CONFIG_FILE} {' '.join(overrides)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        self._active = name
        last_step = max((record["step"] for record in self._records(folder) if "loss" in record), default=0)
        self._update_state(name, pid=self._process.pid, started=time.time(), start_step=last_step if resumed else 0,
                           stop_requested=None, returncode=None, resumed=resumed)
        threading.Thread(target=self._reap, args=(name, self._process), daemon=True).start()

    def _reap(self, name: str, process: subprocess.Popen) -> None:
        code = process.wait()
        self._update_state(name, returncode=code, ended=time.time())

    def shutdown(self) -> None:
        """Stop a running process gracefully (the board is closing) and wait for it; end any evaluation."""
        for evaluation in self._evals.values():
            if evaluation.poll() is None:
                evaluation.terminate()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()

    # ---- reading ---------------------------------------------------------------------------------------------

    def _state(self, name: str) -> dict[str, Any]:
        path = self.runs_dir / name / STATE_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def _update_state(self, name: str, **values: Any) -> None:
        state = {**self._state(name), **values}
        atomic.write_text(self.runs_dir / name / STATE_FILE, json.dumps(state, indent=2))

    def names(self) -> list[str]:
        """Run folders (those with a config.yaml), newest first (by their config.yaml, written once)."""
        found = [path for path in self.runs_dir.iterdir() if (path / CONFIG_FILE).is_file() and RUN_NAME.match(path.name)]
        newest_first = sorted(found, key=lambda path: ((path / CONFIG_FILE).stat().st_mtime, path.name), reverse=True)
        return [path.name for path in newest_first]

    def settings(self, name: str) -> dict[str, Any]:
        """The run's config.yaml as written."""
        path = self.run_dir(name) / CONFIG_FILE
        if not path.is_file():
            raise BoardError(f"no run named {name!r}", 404)
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _records(folder: Path) -> list[dict[str, Any]]:
        try:
            return read_log_history(folder)
        except DataError:
            return []  # not started logging yet

    def status(self, name: str) -> dict[str, Any]:
        """state (running, stopping, stopped, finished, failed, created), step, max_steps, progress, ETA."""
        folder = self.run_dir(name)
        settings = self.settings(name)
        state = self._state(name)
        records = self._records(folder)
        train = [record for record in records if "loss" in record]
        step = max((record["step"] for record in records), default=0)
        running = self._active == name and self._process is not None and self._process.poll() is None
        running = running or self._earlier_process(name) is not None
        code = state.get("returncode")
        max_steps = settings.get("max_steps") if isinstance(settings.get("max_steps"), int) else None
        max_steps = max_steps if max_steps and max_steps > 0 else None
        if running:
            phase = "stopping" if state.get("stop_requested") else "running"
        elif code is None:  # no record of its end (a board restarted meanwhile, or a folder made elsewhere)
            phase = "created" if not records else "finished" if max_steps and step >= max_steps else "stopped"
        elif code != 0:
            phase = "failed"
        elif state.get("stop_requested"):
            phase = "stopped"
        else:
            phase = "finished"
        eta = None
        started, start_step = state.get("started"), state.get("start_step", 0)
        if running and max_steps and started and step > start_step:
            rate = (time.time() - started) / (step - start_step)
            eta = max(0.0, rate * (max_steps - step))
        return {
            "name": name, "state": phase, "step": step, "max_steps": max_steps,
            "progress": (step / max_steps) if max_steps else None, "eta_seconds": eta, "returncode": code,
            "checkpoints": [path.name for path in list_checkpoints(folder)],
            "finished": (folder / "summary.json").is_file(), "logged": len(train),
        }

    def metrics(self, name: str) -> dict[str, Any]:
        """The run's log records (train and eval) and the markers ``preftune.diagnostics`` finds in them."""
        records = self._records(self.run_dir(name))
        train = [record for record in records if "loss" in record]
        evals = [record for record in records if "eval_loss" in record]
        finding = detect_displacement(train)
        spikes = grad_norm_spikes(train)
        return {
            "train": [_finite_numbers(record) for record in train],
            "eval": [_finite_numbers(record) for record in evals],
            "displacement": finding.to_dict() if finding is not None else None,
            "grad_norm_spikes": [{"step": s.step, "grad_norm": s.grad_norm} for s in spikes],
        }

    def log(self, name: str, offset: int = 0) -> dict[str, Any]:
        """The log from byte ``offset`` (at most 256 KiB); ``offset`` of the next call."""
        path = self.run_dir(name) / LOG_FILE
        if not path.is_file():
            return {"text": "", "offset": 0}
        size = path.stat().st_size
        offset = max(0, min(int(offset), size))
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(MAX_LOG_CHUNK)
        return {"text": chunk.decode("utf-8", "replace"), "offset": offset + len(chunk)}

    def report(self, name: str) -> str:
        """`preftune report`'s text for the run."""
        folder = self.run_dir(name)
        if not (folder / "log_history.json").is_file():
            raise BoardError(f"run {name!r} has no log yet", 409)
        return build_report(folder).format()

    def compare(self, names: list[str]) -> dict[str, Any]:
        """Final train and eval metrics of each run, and the settings that differ between them."""
        runs, all_settings = [], {}
        for name in names:
            records = self._records(self.run_dir(name))
            train = [record for record in records if "loss" in record]
            evals = [record for record in records if "eval_loss" in record]
            all_settings[name] = {key: value for key, value in self.settings(name).items() if key != "output_dir"}
            runs.append({"name": name, "step": max((r["step"] for r in records), default=0),
                         "train": _finite_numbers(train[-1]) if train else {},
                         "eval": _finite_numbers(evals[-1]) if evals else {}})
        keys = sorted({key for settings in all_settings.values() for key in settings})
        differing = {}
        for key in keys:
            values = [_setting(all_settings[name], key) for name in names]
            if len({json.dumps(value, sort_keys=True, default=str) for value in values}) > 1:
                differing[key] = dict(zip(names, values))
        return {"runs": runs, "differing_settings": differing}


    # ---- evaluating ------------------------------------------------------------------------------------------

    def evaluate(self, name: str, *, judge: str | None = None, data: str | None = None,
                 limit: int | None = None) -> dict[str, Any]:
        """Start `preftune eval` on a finished run (its config.yaml; results into the run's ``eval/``): held-out
        pairs, and with ``judge`` judged samples (win rate, KL). BoardError 409 while the run trains or is being
        evaluated, or before it has a trained model (summary.json)."""
        folder = self.run_dir(name)
        if not (folder / CONFIG_FILE).is_file():
            raise BoardError(f"no run named {name!r}", 404)
        if self.status(name)["state"] in ("running", "stopping"):
            raise BoardError(f"run {name!r} is still training; evaluate it when it has finished", 409)
        if not (folder / "summary.json").is_file():
            raise BoardError(f"run {name!r} has not finished (no summary.json); train it to the end first", 409)
        arguments = [str(folder / CONFIG_FILE), "--output-dir", str(folder / EVAL_DIR)]
        if judge:
            arguments += ["--judge", judge]
        if data:
            arguments += ["--data", data]
        if limit is not None:
            arguments += ["--limit", str(int(limit))]
        with self._lock:
            process = self._evals.get(name)
            if process is not None and process.poll() is None:
                raise BoardError(f"run {name!r} is being evaluated already; wait for it", 409)
            (folder / EVAL_DIR).mkdir(exist_ok=True)
            env = dict(self.env if self.env is not None else os.environ)
            env.setdefault("PYTHONUNBUFFERED", "1")
            with open(folder / EVAL_DIR / EVAL_LOG, "wb") as log:
                log.write(f"$ preftune eval {' '.join(arguments)}\n".encode())
                log.flush()
                self._evals[name] = subprocess.Popen([self.python, "-m", "preftune.cli", "eval", *arguments],
                                                     stdout=log, stderr=subprocess.STDOUT, env=env,
                                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return self.evaluation(name)

    def evaluation(self, name: str) -> dict[str, Any]:
        """The run's evaluation: state (none, running, done, failed), the results `preftune eval` wrote
        (eval_results.json) and its log."""
        folder = self.run_dir(name) / EVAL_DIR
        process = self._evals.get(name)
        results = None
        try:
            results = json.loads((folder / "eval_results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        if process is not None and process.poll() is None:
            state = "running"
        elif process is not None and process.returncode != 0:
            state = "failed"
        else:
            state = "done" if results is not None else "none"
        try:
            log = (folder / EVAL_LOG).read_bytes()[-MAX_LOG_CHUNK:].decode("utf-8", "replace")
        except OSError:
            log = ""
        return {"name": name, "state": state, "results": results if state != "running" else None, "log": log}

    def eval_points(self, names: list[str]) -> list[dict[str, Any]]:
        """One point per evaluated run for the reward/KL plot: KL(policy||reference) and the judge's reward of the
        policy minus the reference's (score judges), its win rate, and the held-out pairs' margin and accuracy."""
        points = []
        for name in names:
            results = self.evaluation(name)["results"] or {}
            generation = results.get("generation") or {}
            pairs = results.get("pairs") or {}
            reward = generation.get("reward") or {}
            rate = generation.get("win_rate") or {}
            points.append({
                "name": name, "kl": (generation.get("kl") or {}).get("mean"),
                "kl_stderr": (generation.get("kl") or {}).get("stderr"),
                "reward_difference": (reward.get("difference") or {}).get("mean"),
                "win_rate": rate.get("rate"), "eval_margin": pairs.get("eval_rewards/margins"),
                "eval_accuracy": pairs.get("eval_rewards/accuracies"),
            })
        return points


class SampleJob:
    """`preftune sample --store` started from the board: responses of a model to prompts, written to
    ``<store>.candidates.jsonl`` beside the store and imported into the labeling store (created if missing); its
    output in ``<store>.sample.log``. One at a time per board."""

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None):
        self.python, self.env = python, env
        self._process: subprocess.Popen | None = None
        self._store: Path | None = None
        self._lock = threading.Lock()

    @staticmethod
    def paths(store: str | Path) -> tuple[Path, Path]:
        """(candidates JSONL, log) of a store."""
        store = Path(store).resolve()
        return store.with_name(store.name + ".candidates.jsonl"), store.with_name(store.name + ".sample.log")

    def start(self, *, model: str, prompts: str, store: str, num_samples: int = 2, max_new_tokens: int = 64,
              limit: int | None = None) -> dict[str, Any]:
        """Check the paths (BoardError 400 by field), then start `preftune sample`; 409 while one runs."""
        errors = {}
        if not model or not Path(model).is_dir():
            errors["sample_model"] = f"no model folder at {model!r}" if model else "expected a model folder"
        if not prompts or not Path(prompts).is_file():
            errors["sample_prompts"] = f"no prompts file at {prompts!r}" if prompts else "expected a prompts JSONL file"
        if not store:
            errors["sample_store"] = "expected the path of a labeling store (created if missing)"
        elif not Path(store).resolve().parent.is_dir():
            errors["sample_store"] = f"no folder {Path(store).resolve().parent} for the store"
        if errors:
            raise BoardError("the sampling settings have problems (see each field)", 400, errors)
        candidates, log_path = self.paths(store)
        arguments = ["--model", model, "--prompts", prompts, "--out", str(candidates), "--store",
                     str(Path(store).resolve()), "--num-samples", str(num_samples), "--max-new-tokens",
                     str(max_new_tokens), "--no-progress"]
        if limit is not None:
            arguments += ["--limit", str(limit)]
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise BoardError(f"sampling into {self._store} is still going; wait for it", 409)
            env = dict(self.env if self.env is not None else os.environ)
            env.setdefault("PYTHONUNBUFFERED", "1")
            with open(log_path, "wb") as log:
                log.write(f"$ preftune sample {' '.join(arguments)}\n".encode())
                log.flush()
                self._process = subprocess.Popen([self.python, "-m", "preftune.cli", "sample", *arguments],
                                                 stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)
            self._store = Path(store).resolve()
        return self.status()

    def status(self) -> dict[str, Any]:
        """state (none, running, done, failed), the store, the candidates file and the log."""
        if self._process is None or self._store is None:
            return {"state": "none", "store": None, "candidates": None, "log": ""}
        code = self._process.poll()
        candidates, log_path = self.paths(self._store)
        try:
            log = log_path.read_bytes()[-MAX_LOG_CHUNK:].decode("utf-8", "replace")
        except OSError:
            log = ""
        state = "running" if code is None else "done" if code == 0 else "failed"
        return {"state": state, "store": str(self._store), "candidates": str(candidates), "log": log}

    def shutdown(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()


def _setting(settings: dict[str, Any], key: str) -> Any:
    """A setting's value, or the schema default when the run left it out."""
    if key in settings:
        return settings[key]
    name = canonical_key(key)
    return DPOConfig.model_fields[name].default if name in DPOConfig.model_fields else None


def _finite_numbers(record: dict[str, Any]) -> dict[str, Any]:
    """The record with non-finite floats as None (JSON has no NaN)."""
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in record.items()}
