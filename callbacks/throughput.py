from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from clmlab import modeling

GIB = 2**30


class ThroughputCallback(TrainerCallback):
    """Adds to every training log line:

    - `tokens_per_second`: tokens trained on since the previous line over the time spent training since then.
      Tokens are counted by the Trainer (`include_num_input_tokens_seen`, all processes together, logged as
      `num_input_tokens_seen`). Time is this process's wall clock from the start of a step to the start of the
      next, less every interval between steps in which the run evaluated or saved a checkpoint: fetching the
      next batches counts, and so does the wait for the GPU when the Trainer reads the loss back at a log line
      (a GPU step only queues work; without that wait a rate would count queued steps as done).
    - `mfu`: model FLOPs utilisation, tokens_per_second x training FLOPs per token (clmlab.modeling.
      training_flops_per_token at `sequence_length`) / (world size x peak FLOP/s of one device). The tokens
      are every process's, so this is the mean over the devices. The peak is --peak_tflops if given, else
      the table's figure for this GPU and the dtype its matmuls run in (clmlab.modeling.peak_dtype); with no
      peak known (CPUs, unlisted GPUs) or no sequence length (variable-length rows), no `mfu` key at all.
    - `peak_gpu_memory_gib` (the most this process's tensors took on its GPU so far) or, on CPU,
      `peak_cpu_memory_gib` (the process's peak resident set).

    `speed_record()` sums the run up for run_info.json and the end-of-run summary (clmlab.run.TrainingRun).
    """

    def __init__(self, sequence_length: int | None = None):
        self.sequence_length = sequence_length
        self.flops_per_token: int | None = None
        self.peak: float | None = None  # FLOP/s of one device
        self.peak_source: str | None = None
        self.world_size = 1
        self.device: torch.device | None = None
        self._mark: float | None = None  # the end of the time already counted; None before the first step
        self._interrupted = False  # an evaluation or a save since the last step ended: the gap does not count
        self._seconds = 0.0  # counted since the last log line
        self._session_seconds = 0.0
        self._tokens_at_last_log: int | None = None
        self._tokens_at_start: int | None = None
        self._last_tokens = 0

    # -------------------------------------------------------------------------------------------- the clock

    def _count(self) -> None:
        now = time.perf_counter()
        if self._mark is not None:
            self._seconds += now - self._mark
            self._session_seconds += now - self._mark
        self._mark = now

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._tokens_at_last_log = self._tokens_at_start = state.num_input_tokens_seen  # nonzero when resuming
        self._mark, self._seconds, self._session_seconds = None, 0.0, 0.0
        self.device, self.world_size = args.device, args.world_size
        given = getattr(args, "peak_tflops", None)
        if given:
            self.peak, self.peak_source = given * 1e12, "--peak_tflops"
        else:
            dtype = modeling.peak_dtype(getattr(args, "mixed_precision", "no"), args.device)
            self.peak = modeling.peak_flops(args.device, dtype) if dtype else None
            if self.peak:
                self.peak_source = f"{torch.cuda.get_device_name(args.device)}, {dtype} (clmlab.modeling.PEAK_FLOPS)"
        if self.sequence_length and model is not None and hasattr(model.config, "n_embd"):
            self.flops_per_token = modeling.training_flops_per_token(model.config, self.sequence_length)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._interrupted:
            self._mark, self._interrupted = time.perf_counter(), False
        else:
            self._count()

    def on_step_end(self, args, state, control, **kwargs):
        self._count()

    def on_evaluate(self, args, state, control, **kwargs):
        self._interrupted = True

    def on_save(self, args, state, control, **kwargs):
        self._interrupted = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last steps' queued work belongs to their time
        if not self._interrupted:
            self._count()
        self._last_tokens = state.num_input_tokens_seen

    # -------------------------------------------------------------------------------------------- the figures

    def mfu(self, tokens_per_second: float) -> float | None:
        if not (self.peak and self.flops_per_token):
            return None
        return tokens_per_second * self.flops_per_token / (self.world_size * self.peak)

    def memory_logs(self) -> dict:
        if self.device is None:
            return {}
        peak, _ = modeling.peak_memory(self.device)
        if peak is None:
            return {}
        return {"peak_gpu_memory_gib" if self.device.type == "cuda" else "peak_cpu_memory_gib": round(peak / GIB, 3)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self._tokens_at_last_log is None:
            return  # evaluation lines, and the Trainer's own summary at the end of training
        self._count()  # the wait for the loss read back just now belongs to the steps logged
        added = dict(self.memory_logs())
        tokens = state.num_input_tokens_seen - self._tokens_at_last_log
        if args.include_num_input_tokens_seen != "no" and self._seconds > 0 and tokens > 0:
            added["tokens_per_second"] = round(tokens / self._seconds, 1)
            mfu = self.mfu(tokens / self._seconds)
            if mfu is not None:
                added["mfu"] = round(mfu, 4)
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
        self._tokens_at_last_log = state.num_input_tokens_seen
        self._seconds = 0.0

    def speed_record(self) -> dict | None:
        """This process's training session (a resumed run: since it resumed), for run_info.json's "speed"."""
        if self._tokens_at_start is None:
            return None
        tokens = self._last_tokens - self._tokens_at_start
        rate = tokens / self._session_seconds if self._session_seconds > 0 and tokens > 0 else None
        peak_memory, measure = modeling.peak_memory(self.device)
        mfu = self.mfu(rate) if rate else None
        return {"tokens": tokens, "step_seconds": round(self._session_seconds, 6),
                "tokens_per_second": round(rate, 1) if rate else None, "mfu": round(mfu, 4) if mfu is not None else None,
                "flops_per_token": self.flops_per_token, "sequence_length": self.sequence_length,
                "peak_flops_per_device": self.peak, "peak_flops_source": self.peak_source, "world_size": self.world_size,
                "peak_memory_bytes": peak_memory, "peak_memory_measure": measure}
