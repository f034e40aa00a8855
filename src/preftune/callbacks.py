"""The callback seam: transformers' ``TrainerCallback`` events around preftune's loop.

preftune's loop calls the events of transformers' ``CallbackHandler`` (``on_train_begin``, ``on_step_begin``,
``on_step_end``, ``on_log``, ``on_evaluate``, ``on_save``, ``on_train_end``, ...) with transformers' own
``TrainerState`` and ``TrainerControl``, so callbacks written for transformers' ``Trainer`` or TRL (e.g.
``EarlyStoppingCallback``, experiment trackers) work unchanged. When to log, evaluate, save and stop is itself a
callback, ``ScheduleCallback``, first in the list as transformers' ``DefaultFlowCallback`` is: it sets the
``TrainerControl`` flags, later callbacks may change them, and the loop acts on what the flags say.

Experiment trackers (``report_to``) are transformers' integration callbacks (TensorBoard, W&B, MLflow, Trackio),
built here with a one-line error when a tracker is not installed.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from typing import Any, Iterable

from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from preftune.config import interval_to_steps
from preftune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CallbackHandler",
    "ScheduleCallback",
    "StopOnSignal",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "build_callback_handler",
    "strategy_name",
    "finish_trackers",
    "tracker_callbacks",
]

class ScheduleCallback(DefaultFlowCallback):
    """preftune's schedule of logs, evaluations and checkpoints, as ``TrainerControl`` flags.

    It reads the intervals the trainer stores in the state (``state.logging_steps``, ``eval_steps``,
    ``save_steps``, ``max_steps``: whole optimizer steps) and the strategies in ``args``. Unlike transformers'
    ``DefaultFlowCallback`` it also logs the last step (so the metric files end with the final state) and does not
    save a checkpoint at the end (the final model is written to ``output_dir`` anyway); evaluation at the end is
    the trainer's (``DPOTrainer.train``).
    """

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        step = state.global_step
        logging_strategy = strategy_name(args.logging_strategy)
        if logging_strategy != "no" and (
            (step == 1 and args.logging_first_step)
            or (logging_strategy == "steps" and step % state.logging_steps == 0)
            or step == state.max_steps
        ):
            control.should_log = True
        if (
            strategy_name(args.eval_strategy) == "steps"
            and state.eval_steps
            and step % state.eval_steps == 0
            and (args.eval_delay or 0) <= step
        ):
            control.should_evaluate = True
        if strategy_name(args.save_strategy) == "steps" and state.save_steps and step % state.save_steps == 0:
            control.should_save = True
        if step >= state.max_steps:
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        if strategy_name(args.logging_strategy) == "epoch":
            control.should_log = True
        if strategy_name(args.eval_strategy) == "epoch" and (args.eval_delay or 0) <= state.epoch:
            control.should_evaluate = True
        if strategy_name(args.save_strategy) == "epoch":
            control.should_save = True
        return control


class StopOnSignal(TrainerCallback):
    """A graceful stop: the first SIGINT (Ctrl-C) or SIGTERM during training ends it after the current optimizer
    step, which is saved as a checkpoint (``checkpoint-N``, resumable with ``resume_from_checkpoint: latest``); the
    run then ends as any run does (final evaluation, model and ``summary.json``). A second signal interrupts at once
    (KeyboardInterrupt). Handlers are installed at ``on_train_begin`` (main thread only; elsewhere it does nothing)
    and the previous ones restored at ``on_train_end``. For a single process: with several, the processes would
    stop at different steps.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: int | None = None  # the signal received, if any
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt
        self.requested = number
        logger.warning("%s: stopping after this step and saving a checkpoint (send it again to stop at once)",
                       signal.Signals(number).name)

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        if self.requested is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def strategy_name(value: Any) -> str:
    """A strategy as its plain string ("no", "steps", "epoch", "best"), whether given as a string or an enum."""
    return str(getattr(value, "value", value))


def tracker_callbacks(report_to: str | Iterable[str] | None) -> list[TrainerCallback]:
    """transformers' integration callbacks for ``report_to`` ("none", a name or a list of names), built.

    Raises ConfigError (key ``report_to``) for an unknown tracker, or one whose package is not installed, in one
    line with the command that installs it.
    """
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [] if report_to in (None, "none") else [report_to] if isinstance(report_to, str) else list(report_to)
    callbacks = []
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(INTEGRATION_TO_CALLBACK))
            raise ConfigError(f"unknown tracker {name!r}; expected none or one of {known}", key="report_to")
        try:
            callbacks.append(INTEGRATION_TO_CALLBACK[name]())
        except (RuntimeError, ImportError, ModuleNotFoundError):  # each tracker's package has the tracker's name
            raise ConfigError(
                f"report_to {name}: the {name} package is not installed (pip install {name}, or "
                "pip install 'preftune[trackers]' for tensorboard, wandb, mlflow and trackio)",
                key="report_to",
            ) from None
    return callbacks


def build_callback_handler(
    args: Any, callbacks: Iterable[TrainerCallback | type] | None, *, model: Any, processing_class: Any
) -> CallbackHandler:
    """The handler the loop calls: the schedule first, then the trackers of ``args.report_to``, then ``callbacks``
    (instances or classes, as transformers' Trainer takes them)."""
    trackers = tracker_callbacks(args.report_to)
    for tracker in trackers:  # transformers 5 no longer reads args.logging_dir: TensorBoard's folder is set here
        if hasattr(tracker, "logging_dir") and getattr(tracker, "logging_dir", None) is None:
            tracker.logging_dir = args.resolved_logging_dir()
    return CallbackHandler([ScheduleCallback(), *trackers, *(callbacks or [])], model, processing_class, None, None)


def finish_trackers(handler: CallbackHandler) -> None:
    """Finish the runs that transformers' W&B and Trackio callbacks leave open after training (they end them at
    interpreter exit), so that their files are complete when ``DPOTrainer.end()`` returns."""
    for callback in handler.callbacks:
        backend = getattr(callback, "_wandb", None) or getattr(callback, "_trackio", None)
        if backend is not None and getattr(callback, "_initialized", False):
            backend.finish()
            callback._initialized = False


def set_schedule(state: TrainerState, args: Any, total_steps: int, steps_per_epoch: int | None) -> None:
    """The run's length and intervals in whole steps, where the schedule callback reads them (as in transformers'
    ``TrainerState``)."""
    state.max_steps = total_steps
    state.num_train_epochs = math.ceil(total_steps / steps_per_epoch) if steps_per_epoch else 1
    state.logging_steps = interval_to_steps(args.logging_steps, total_steps)
    state.eval_steps = interval_to_steps(args.resolved_eval_steps, total_steps)
    state.save_steps = interval_to_steps(args.save_steps, total_steps)
    state.train_batch_size = args.per_device_train_batch_size
