"""Stopping a run on purpose, after a step every process agrees on, with a checkpoint: what a scheduler's
warning signal (SLURM's `--signal=USR1@...`), a preemption (SIGTERM) or a first Ctrl-C asks for."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import torch
from transformers import TrainerCallback

# Any code above every signal number: a stop asked for by code (a test, a time budget), not by a signal.
_REQUESTED = 1000
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionCallback(TrainerCallback):
    """Ends training after the current optimizer step, with a checkpoint, once a stop is asked for; the run is
    then recorded as `stopped` (clmlab.run.TrainingRun) and the same command resumes it.

    A signal handler only records the signal. At every step end the processes reduce the request (one integer,
    the maximum) so that all of them stop after the same step, since signals reach processes at different
    moments or only one of them. Not the Trainer's own `enable_jit_checkpoint`: it keeps a flag per process
    and never agrees with the others, so ranks could stop and save at different steps.
    """

    def __init__(self):
        self.reason: str | None = None
        self.signal: str | None = None  # the signal's name, when a signal asked for the stop, here or elsewhere
        self.saved_step: int | None = None  # the step the Trainer last saved a checkpoint at, the same on every rank

    def request(self, reason: str, signum: int | None = None) -> None:
        if self.reason is None:
            self.reason, self.signal = reason, signal.Signals(signum).name if signum else None

    def _code(self) -> int:
        if self.reason is None:
            return 0
        return signal.Signals[self.signal].value if self.signal else _REQUESTED

    def on_step_end(self, args, state, control, **kwargs):
        code = self._code()
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([code], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            agreed = int(flag.item())
            if agreed and not code:
                name = signal.Signals(agreed).name if agreed != _REQUESTED else None
                self.request(f"{name + ' received by' if name else 'a stop asked of'} another process", agreed if name else None)
            code = agreed
        if code:
            control.should_training_stop = True
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def record(self) -> dict:
        return {"reason": self.reason or "a callback ended training early", "signal": self.signal}

    @contextlib.contextmanager
    def catch_signals(self):
        """SIGTERM, SIGUSR1 and a first Ctrl-C stop the run after the current step; a second Ctrl-C aborts at once.
        The previous handlers are back when the block ends."""
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            yield
            return

        def handle(signum, frame):
            if signum == signal.SIGINT:
                if self.reason is not None:
                    raise KeyboardInterrupt
                print("\nSIGINT: stopping after this step with a checkpoint; press Ctrl-C again to abort", file=sys.stderr, flush=True)
            self.request(f"{signal.Signals(signum).name} received", signum)

        previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
