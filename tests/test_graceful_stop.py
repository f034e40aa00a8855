"""`preftune train`'s graceful stop (callbacks.StopOnSignal): the first SIGINT/SIGTERM asks the loop to save a
checkpoint and stop after the current step; a second interrupts at once; the previous handlers come back."""

from __future__ import annotations

import os
import signal

import pytest

from preftune.callbacks import StopOnSignal, TrainerControl, TrainerState


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_for_a_checkpoint_and_a_stop_the_second_interrupts(number):
    before = {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS}
    stopper, state = StopOnSignal(), TrainerState()
    stopper.on_train_begin(None, state, TrainerControl())
    try:
        control = stopper.on_step_end(None, state, TrainerControl())
        assert not control.should_save and not control.should_training_stop  # nothing asked yet
        os.kill(os.getpid(), number)  # handled: no KeyboardInterrupt
        assert stopper.requested == number
        control = stopper.on_step_end(None, state, TrainerControl())
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), number)
    finally:
        stopper.on_train_end(None, state, TrainerControl())
    assert {sig: signal.getsignal(sig) for sig in StopOnSignal.SIGNALS} == before
