from __future__ import annotations

import time

from transformers import TrainerCallback


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` to every training log line: tokens trained on since the previous line,
    divided by the time spent in training steps (evaluation and checkpointing excluded).

    Tokens seen are counted by the Trainer itself (`include_num_input_tokens_seen`) and logged as
    `num_input_tokens_seen`; this callback reads that count.
    """

    def __init__(self):
        self._step_started: float | None = None
        self._step_seconds = 0.0
        self._tokens_at_last_log: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_last_log = state.num_input_tokens_seen  # nonzero when resuming

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self._step_seconds += time.perf_counter() - self._step_started
            self._step_started = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._tokens_at_last_log is None or self._step_seconds <= 0:
            return
        tokens = state.num_input_tokens_seen - self._tokens_at_last_log
        logs["tokens_per_second"] = round(tokens / self._step_seconds, 1)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["tokens_per_second"] = logs["tokens_per_second"]
        self._tokens_at_last_log = state.num_input_tokens_seen
        self._step_seconds = 0.0
