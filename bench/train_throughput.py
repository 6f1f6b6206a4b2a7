#!/usr/bin/env python
"""Training throughput of clmlab against a bare PyTorch loop and the Hugging Face example, in one process, as JSON.

    python bench/train_throughput.py                          # GPT-2 n_embd 128, 4 layers, block 128, batch 8, GPT-2's vocabulary
    python bench/train_throughput.py --vocab 8192             # the same with a byte-level BPE of 8,192 tokens
    python bench/train_throughput.py --tiny                   # seconds: does the script work
    python bench/train_throughput.py --shape n_embd=768,n_layer=12,n_head=12 --block_size 1024 --batch_size 16 --torch_compile
                                                              # GPT-2 124M on a GPU, compiled (bf16 by default there)

Three ways of training the same model on the same text file, one after the other in this process, each with the
same config and initial weights (seeded), batch, optimizer (fused AdamW, the same learning rate, schedule, betas,
weight decay on the same parameters and clipping), precision, logging interval and steps:

- bare_loop: the model, torch.optim.AdamW(fused=True), transformers' cosine schedule and a DataLoader over blocks
  held in one tensor; forward, backward, clip, step, zero_grad; the loss is read back only at logging steps.
  Its data: the file's lines tokenized in one batched call of the fast tokenizer, concatenated and cut into
  blocks. What the hardware does with this model, with next to nothing around it.
- hf_example: transformers' examples/pytorch/language-modeling/run_clm.py pipeline, written here compactly:
  load_dataset("text") with 5% of the lines held out, tokenize with .map, group_texts into blocks, Trainer
  with default_data_collator and plain TrainingArguments, then save_model and evaluate (loss only: its
  accuracy metric needs the Hub).
- clmlab: run_clm.main([...]) called in this process: it prepares the file into a folder, trains, saves and
  evaluates (the final evaluation only: --eval_on_start false --eval_strategy no, as the example does).

Both Trainer pipelines get the same TrainerCallback (clmlab's through a subclass of the Trainer run_clm uses),
which takes the timestamps the bare loop takes. What each figure measures (the JSON's "measures" says it too):

- tokens_per_second: the window from the end of step --warmup to the end of the last step, the device
  synchronized at both ends: --steps whole steps with everything between them (data loading, callbacks,
  logging); the window's tokens over its seconds. step_time_ms: its mean, and the median spacing of
  consecutive step ends (host clock, not synchronized inside the window).
- end_to_end_seconds: from the pipeline's start (the text file on disk, the tokenizer's folder ready) to the
  end of its evaluation (the bare loop, which saves and evaluates nothing: of its training); data preparation
  included; split into before/during/after training.
- peak_memory_bytes: during training (from the Trainer's on_train_begin, or the bare loop's first step, to the
  end of training): on a GPU torch.cuda.max_memory_allocated; on a CPU the process's resident memory (sampled
  every 5 ms) less what it held when the pipeline began, so its prepared data counts and the passing peak of
  preparing it does not.
- final_loss: the mean training loss of the last --logging_steps steps, as the Trainer logs it;
  final_loss_per_predicted_token corrects the HF example's for its Trainer counting one label per row too many
  (see Setting.summary). The three start from the same weights; their blocks are cut and ordered by each one's
  own data code, so their losses are close, not equal.
- clmlab's own records (its logged tokens_per_second, MFU and memory where present, run_info.json's speed
  section) are given beside the measured figures.

One training step of the model runs before any pipeline, so that start-up costs fall on none of them. With
--repeats the three run round after round, and each pipeline's figures are those of its median run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(name, value)

import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,  # noqa: E402
                          default_data_collator, get_cosine_schedule_with_warmup, set_seed)
from transformers.utils import is_torch_tf32_available  # noqa: E402
from transformers.utils.import_utils import enable_tf32  # noqa: E402

import run_clm  # noqa: E402  (the repository root, on sys.path above)
from clmlab import modeling  # noqa: E402
from clmlab.cli import UsageError  # noqa: E402

UNTIMED_TRAINER = run_clm.Trainer

GPT2_TOKENIZER = DATA / "tiny_gpt2_random"
DEFAULT_DATA = DATA / "tinyshakespeare" / "input.txt"
HELD_OUT_PERCENT = 5  # the HF example's --validation_split_percentage default; clmlab's default share too
TINY = {"shape": "n_embd=32,n_layer=2,n_head=2", "block_size": 32, "batch_size": 4, "steps": 6, "warmup": 2,
        "logging_steps": 2, "eval_samples": 4, "vocab": "512"}
DEFAULTS = {"shape": "n_embd=128,n_layer=4,n_head=4", "block_size": 128, "batch_size": 8, "steps": 100, "warmup": 10,
            "logging_steps": 10, "eval_samples": 32, "vocab": "gpt2"}


# --------------------------------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_cpu_seconds() -> tuple[float, float, float]:
    """CPU seconds the machine spent busy, and those this process spent (its children's included), at a moment."""
    machine, own = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = sum(getattr(machine, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))
    return busy, own.user + own.system + own.children_user + own.children_system, time.perf_counter()


def other_cores(before: tuple, after: tuple) -> float:
    """The cores other processes kept busy, on average, between two busy_cpu_seconds() readings."""
    return round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2]), 2)


class MemoryPeak:
    """The peak memory of one pipeline: CUDA's allocator high-water mark on a GPU; on a CPU, the process's
    resident memory sampled by a thread (ru_maxrss is one high-water mark for the whole process, so a later
    pipeline would read an earlier one's peak) less what it held at the start."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_peak_minus_start"

    def __enter__(self):
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        process = psutil.Process()
        self._start = process.memory_info().rss

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, process.memory_info().rss - self._start)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def restart(self) -> None:
        """Forget the peak so far (data preparation's passing peak): from here the peak is training's, over what
        the pipeline held when it began (its prepared data and model included)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = 0

    def read(self) -> int:
        """The peak so far: the highest of every reading on a GPU."""
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        return self.peak

    def __exit__(self, *exc):
        self._stop.set()


def release_memory(device: torch.device) -> None:
    """Give back what the previous pipeline freed, so each starts from the same floor: the CUDA cache, and on
    Linux the heap pages glibc keeps after a free (malloc_trim has no Python or torch equivalent)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class StepTimes:
    """Timestamps of step ends, the device synchronized at the window's two ends only."""

    def __init__(self, device: torch.device, warmup: int, total: int, memory: MemoryPeak):
        self.device, self.warmup, self.total, self.memory = device, warmup, total, memory
        self.ends: dict[int, float] = {}
        self.cpu_at_start = busy_cpu_seconds()
        self.started = time.perf_counter()
        self.train_began = self.train_ended = None
        self.peak_memory = 0

    def step_ended(self, step: int) -> None:
        if step in (self.warmup, self.total):
            synchronize(self.device)
        self.ends[step] = time.perf_counter()
        if self.device.type == "cuda":  # read each step: a callback that resets the peak would otherwise hide earlier ones
            self.memory.read()

    def training_began(self) -> None:
        self.train_began = time.perf_counter()
        self.memory.restart()

    def training_ended(self) -> None:
        self.train_ended = time.perf_counter()
        self.peak_memory = self.memory.read()

    def summary(self, tokens_per_step: int, flops_per_token: int, peak: float | None, ended: float) -> dict:
        steps = range(self.warmup + 1, self.total + 1)
        gaps = [self.ends[s] - self.ends[s - 1] for s in steps]
        window = self.ends[self.total] - self.ends[self.warmup]
        tokens_per_second = len(gaps) * tokens_per_step / window
        return {
            "tokens_per_second": round(tokens_per_second, 1),
            "step_time_ms": {"mean": round(1000 * window / len(gaps), 2), "median": round(1000 * statistics.median(gaps), 2)},
            "mfu": round(tokens_per_second * flops_per_token / peak, 4) if peak else None,
            "peak_memory_bytes": self.peak_memory,
            "end_to_end_seconds": round(ended - self.started, 2),
            "before_training_seconds": round(self.train_began - self.started, 2),
            "training_seconds": round(self.train_ended - self.train_began, 2),
            "after_training_seconds": round(ended - self.train_ended, 2),
            "other_processes_cores": other_cores(self.cpu_at_start, busy_cpu_seconds()),
        }


class StepClock(TrainerCallback):
    """StepTimes for a Trainer. Wherever it sits among the other callbacks, the spacing of two of its step ends
    holds one whole step: the other callbacks' work, logging, saving and fetching the next batch included."""

    def __init__(self, times: StepTimes):
        self.times = times

    def on_train_begin(self, args, state, control, **kwargs):
        self.times.training_began()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.step_ended(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.times.training_ended()


def logged_losses(log_history: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history if "loss" in e and "step" in e}


# --------------------------------------------------------------------------------------------------- pipelines


class Setting:
    """What every pipeline shares, resolved once."""

    def __init__(self, args, work: Path):
        self.args, self.work, self._folders = args, work, 0
        self.device = torch.device(args.device)
        # TrainingArguments takes a GPU where there is one, and refuses bf16 on a CPU, unless told use_cpu.
        self.use_cpu = self.device.type == "cpu"
        self.bf16 = args.dtype == "bfloat16"
        # TF32 float32 matmuls wherever the GPU has them (the peak FLOP/s table's float32 figures are TF32's), set in
        # all three as TrainingArguments(tf32=True) sets it.
        self.tf32 = self.device.type == "cuda" and is_torch_tf32_available()
        self.total = args.warmup + args.steps
        self.lr_warmup = math.ceil(0.05 * self.total)  # clmlab's default warmup share, as a step count for all three
        self.tokenizer_dir = self.tokenizer_folder()
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self.shape = args.shape if "n_positions" in args.shape else f"{args.shape},n_positions={args.block_size}"
        self.config = AutoConfig.for_model("gpt2")
        modeling.apply_config_overrides(self.config, self.shape)
        modeling.fit_config_to_tokenizer(self.config, tokenizer, from_scratch=True)  # as run_clm.py sizes it
        modeling.check_shape(self.config, args.block_size)
        self.tokens_per_step = args.block_size * args.batch_size
        self.flops_per_token = modeling.training_flops_per_token(self.config, args.block_size)
        self.peak_flops = modeling.peak_flops(self.device, args.dtype)
        with torch.device("meta"):  # counted without allocating weights
            self.parameters = modeling.parameter_count(AutoModelForCausalLM.from_config(self.config))

    def tokenizer_folder(self) -> Path:
        if self.args.vocab == "gpt2":
            return GPT2_TOKENIZER
        from clmlab import tokenizer

        # clmlab's own trainer on the training documents run_clm.py would train it on: the BPE clmlab trains
        # itself, made once here (not timed) and given to all three.
        folder = self.work / f"bpe-{self.args.vocab}"
        with contextlib.redirect_stdout(sys.stderr):
            tokenizer.main(["--train_files", str(self.args.data), "--vocab_size", self.args.vocab, "--output_dir", str(folder)])
        return folder

    def fresh(self, name: str) -> Path:
        """A folder no earlier repeat used: no cache or finished run of one answers for the next."""
        self._folders += 1
        return self.work / f"{name}-{self._folders}"

    def new_model(self):
        model = modeling.init_model(self.config, None, self.args.seed)  # clmlab's init: seeded, then from_config
        return model.to(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def summary(self, times: StepTimes, ended: float, losses: dict[int, float], checksum: str, attention: str | None,
                trainer_model=None) -> dict:
        # The Trainer averages a step's loss over the labels it counts, and for a model whose loss_type is None
        # (GPT-2 built from a config, as the example builds it) it counts the unshifted labels, one per row more
        # than the loss predicts: the logged loss (and the gradient) is (block - 1) / block of the mean per predicted token.
        unshifted = trainer_model is not None and trainer_model.loss_type is None
        scale = self.args.block_size / (self.args.block_size - 1) if unshifted else 1.0
        return {**times.summary(self.tokens_per_step, self.flops_per_token, self.peak_flops, ended),
                "final_loss": round(losses[self.total], 4), "final_loss_per_predicted_token": round(losses[self.total] * scale, 4),
                "losses": {s: round(v, 4) for s, v in sorted(losses.items())}, "initial_weights_sha256": checksum,
                "attn_implementation": attention}


def warm_up(s: Setting) -> None:
    """One training step of the model before any pipeline: start-up costs (the CUDA context, kernels and library
    code loaded on first use, the allocators' first growth) would otherwise fall on whichever pipeline ran first,
    in its time and in its memory."""
    model = s.new_model()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    batch = torch.randint(0, s.config.vocab_size, (s.args.batch_size, s.args.block_size), device=s.device)
    with s.autocast():
        model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    synchronize(s.device)
    del model, optimizer, batch
    release_memory(s.device)


def bare_loop(s: Setting) -> dict:
    args = s.args
    with MemoryPeak(s.device) as memory:
        times = StepTimes(s.device, args.warmup, s.total, memory)
        tokenizer = AutoTokenizer.from_pretrained(s.tokenizer_dir)
        lines = Path(args.data).read_text(encoding="utf-8").splitlines(keepends=True)
        train_lines = lines[round(len(lines) * HELD_OUT_PERCENT / 100):]
        ids = torch.tensor(list(itertools.chain.from_iterable(tokenizer(train_lines, return_attention_mask=False)["input_ids"])), dtype=torch.long)
        blocks = ids[: len(ids) // args.block_size * args.block_size].view(-1, args.block_size)
        model = s.new_model()
        checksum = modeling.weights_checksum(model)
        if s.tf32:
            enable_tf32(True)
        model.train()
        forward = torch.compile(model, backend=args.compile_backend) if args.torch_compile else model  # as the Trainer compiles it
        # Weight decay on the matrices only: for GPT-2 the 1-D parameters are exactly the biases and LayerNorm
        # weights that the Trainer's get_decay_parameter_names leaves out.
        groups = [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": args.weight_decay},
                  {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=True)
        schedule = get_cosine_schedule_with_warmup(optimizer, s.lr_warmup, s.total)
        # The Trainer's order: a random permutation drawn from a generator seeded with the seed (accelerate's
        # SeedableRandomSampler), a new one each pass.
        sampler = torch.utils.data.RandomSampler(blocks, generator=torch.Generator().manual_seed(args.seed))
        loader = torch.utils.data.DataLoader(blocks, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                             pin_memory=s.device.type == "cuda")
        batches = itertools.chain.from_iterable(itertools.repeat(loader))
        losses, running, last_logged = {}, torch.zeros((), device=s.device), 0
        times.training_began()
        for step in range(1, s.total + 1):
            batch = next(batches).to(s.device, non_blocking=True)
            with s.autocast():
                loss = forward(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            times.step_ended(step)
            if step % args.logging_steps == 0:
                losses[step], last_logged = running.item() / (step - last_logged), step
                running.zero_()
        times.training_ended()
    return s.summary(times, time.perf_counter(), losses, checksum, model.config._attn_implementation)


def hf_example(s: Setting) -> dict:
    import datasets

    args = s.args
    block_size = args.block_size
    with MemoryPeak(s.device) as memory:
        times = StepTimes(s.device, args.warmup, s.total, memory)
        validation, train = datasets.load_dataset(
            "text", data_files={"train": str(args.data)}, keep_linebreaks=True, cache_dir=str(s.fresh("hf-datasets-cache")),
            split=[f"train[:{HELD_OUT_PERCENT}%]", f"train[{HELD_OUT_PERCENT}%:]"])
        raw = datasets.DatasetDict(train=train, validation=validation)
        tokenizer = AutoTokenizer.from_pretrained(s.tokenizer_dir)
        tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"], num_proc=args.num_proc)

        def group_texts(examples):
            joined = {k: list(itertools.chain.from_iterable(examples[k])) for k in examples}
            total = len(joined["input_ids"]) // block_size * block_size
            result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}
            result["labels"] = result["input_ids"].copy()
            return result

        lm_datasets = tokenized.map(group_texts, batched=True, num_proc=args.num_proc)
        # The example's config: the model type's default, updated from --config_overrides (the vocabulary too,
        # or the example would build GPT-2's 50,257 rows whatever the tokenizer), seeded at the script's start.
        set_seed(args.seed)
        config = AutoConfig.for_model("gpt2")
        config.update_from_string(f"{s.shape},vocab_size={s.config.vocab_size}")
        model = AutoModelForCausalLM.from_config(config)
        checksum = modeling.weights_checksum(model)
        training_args = TrainingArguments(
            output_dir=str(s.fresh("hf-example-run")), per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, max_steps=s.total, learning_rate=args.learning_rate,
            lr_scheduler_type="cosine", warmup_steps=s.lr_warmup, weight_decay=args.weight_decay, adam_beta2=0.95,
            max_grad_norm=args.max_grad_norm, logging_steps=args.logging_steps, seed=args.seed, bf16=s.bf16,
            torch_compile=args.torch_compile, torch_compile_backend=args.compile_backend if args.torch_compile else None,
            tf32=s.tf32 if s.device.type == "cuda" else None, use_cpu=s.use_cpu, report_to="none", disable_tqdm=True)
        trainer = Trainer(model=model, args=training_args, train_dataset=lm_datasets["train"], processing_class=tokenizer,
                          eval_dataset=lm_datasets["validation"].select(range(min(args.eval_samples, len(lm_datasets["validation"])))),
                          data_collator=default_data_collator, callbacks=[StepClock(times)])
        trainer.train()
        trainer.save_model()
        trainer.evaluate()
    return s.summary(times, time.perf_counter(), logged_losses(trainer.state.log_history), checksum, model.config._attn_implementation,
                     trainer_model=model)


def clmlab_run(s: Setting) -> dict:
    args = s.args
    out = s.fresh("clmlab-run")
    argv = ["--train_files", str(args.data), "--tokenizer_name", str(s.tokenizer_dir), "--prepare_to", str(s.fresh("clmlab-prepared")),
            "--output_dir", str(out), "--config_overrides", s.shape, "--block_size", str(args.block_size),
            "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(args.batch_size),
            "--max_steps", str(s.total), "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "cosine",
            "--warmup_steps", str(s.lr_warmup), "--weight_decay", str(args.weight_decay), "--adam_beta2", "0.95",
            "--max_grad_norm", str(args.max_grad_norm), "--optim", "adamw_torch_fused", "--logging_steps", str(args.logging_steps),
            "--seed", str(args.seed), "--bf16", str(s.bf16).lower(), "--eval_on_start", "false", "--eval_strategy", "no",
            "--max_eval_samples", str(args.eval_samples), "--validation_split_percentage", str(HELD_OUT_PERCENT),
            "--preprocessing_num_workers", str(args.num_proc or 1), "--report_to", "none", "--disable_tqdm", "true",
            *(["--tf32", str(s.tf32).lower()] if s.device.type == "cuda" else []), *(["--use_cpu", "true"] if s.use_cpu else []),
            *(["--torch_compile", "true", "--torch_compile_backend", args.compile_backend] if args.torch_compile else [])]
    with MemoryPeak(s.device) as memory:
        times = StepTimes(s.device, args.warmup, s.total, memory)

        class TimedTrainer(UNTIMED_TRAINER):  # the same StepClock as the example's, on the Trainer run_clm.py builds
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.add_callback(StepClock(times))

        run_clm.Trainer = TimedTrainer
        try:
            run_clm.main(argv)
        finally:
            run_clm.Trainer = UNTIMED_TRAINER
    ended = time.perf_counter()
    state = json.loads((out / "trainer_state.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    attention = (info.get("speed") or {}).get("attn_implementation") or info["arguments"]["ModelArguments"].get("attn_implementation")
    result = s.summary(times, ended, logged_losses(state["log_history"]), info["model"]["initial_weights_sha256"], attention)
    result["as_logged"] = as_logged(state["log_history"], info, args.warmup)
    return result


def as_logged(log_history: list[dict], info: dict, warmup: int) -> dict:
    """clmlab's own figures over the window, by its own clock (callbacks.ThroughputCallback): the logged
    tokens_per_second of the log lines after the warmup, the last MFU and memory values logged, and run_info.json's
    speed section (the whole run's, warmup included), each where the run records it."""
    entries = [e for e in log_history if "tokens_per_second" in e]
    # Each entry covers the steps since the one before it; those that begin at or after the warmup make the window.
    intervals = [(e["step"] - start, e) for start, e in zip([0] + [e["step"] for e in entries], entries) if start >= warmup]
    steps = sum(n for n, _ in intervals)
    extra = {k: v for _, e in intervals for k, v in e.items() if "mfu" in k or "memory" in k}  # the last value of each
    # Every step has the same tokens: the window's rate is its steps over the summed seconds, n / rate each.
    rate = steps / sum(n / e["tokens_per_second"] for n, e in intervals) if intervals else None
    return {"tokens_per_second": round(rate, 1) if rate else None, "steps": steps, **extra, "run_info_speed": info.get("speed")}


# --------------------------------------------------------------------------------------------------- main


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


PIPELINES = {"bare_loop": bare_loop, "hf_example": hf_example, "clmlab": clmlab_run}


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=f"A tiny model and a few steps ({TINY}), for tests.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="Training precision (bfloat16: autocast, fp32 weights). Default: bfloat16 on a GPU that has it, else float32.")
    parser.add_argument("--shape", default=None, help=f"GPT-2 config overrides (default {DEFAULTS['shape']}; n_positions: --block_size).")
    parser.add_argument("--block_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=None, help="Steps before the timed ones (allocation, kernel selection).")
    parser.add_argument("--logging_steps", type=int, default=None, help="The loss is read back every N steps, in all three.")
    parser.add_argument("--eval_samples", type=int, default=None, help="Validation blocks of the final evaluation (HF example, clmlab).")
    parser.add_argument("--vocab", default=None,
                        help="'gpt2': GPT-2's 50,257-token tokenizer (../shared/data/tiny_gpt2_random); a number: a byte-level BPE of that "
                             f"size trained by clmlab on --data (default {DEFAULTS['vocab']}; {TINY['vocab']} with --tiny).")
    parser.add_argument("--data", default=None, help=f"A text file (default: tinyshakespeare from {DATA.name}/).")
    parser.add_argument("--num_proc", type=int, default=None, help="Tokenizing processes (datasets' num_proc; clmlab's workers). Default: one.")
    parser.add_argument("--torch_compile", action="store_true",
                        help="torch.compile the model in all three (the Trainer's --torch_compile; compilation falls in the untimed warmup).")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile's backend (default inductor).")
    parser.add_argument("--learning_rate", type=float, default=6e-4)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1,
                        help="Rounds of the three pipelines, one after the other; each pipeline's figures are its median run's.")
    args = parser.parse_args()
    for key, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if args.vocab != "gpt2" and not (args.vocab.isdigit() and int(args.vocab) >= 257):
        fail(f"--vocab {args.vocab}: give 'gpt2' or a BPE size of at least 257 (256 bytes + EOS)")
    for key in ("block_size", "batch_size", "steps", "warmup", "logging_steps", "eval_samples", "repeats"):
        if getattr(args, key) < 1:
            fail(f"--{key} {getattr(args, key)}: must be 1 or more")
    if (args.warmup + args.steps) % args.logging_steps:
        fail(f"--logging_steps {args.logging_steps} does not divide --warmup + --steps = {args.warmup + args.steps}: the Trainer "
             "logs the loss only every --logging_steps, and the last step's is compared")
    if args.data is not None and not Path(args.data).is_file():
        fail(f"--data {args.data}: no such file")
    missing = [path for path, needed in ((DEFAULT_DATA, args.data is None), (GPT2_TOKENIZER, args.vocab == "gpt2")) if needed and not path.exists()]
    if missing:  # the data pack is optional: without it there is nothing to measure, which is no error
        print(f"skipped: {missing[0]} is absent (the data pack lives beside the repository in ../shared/data); "
              "give --data FILE, and --vocab N for a BPE trained on it", file=sys.stderr)
        raise SystemExit(0)
    args.data = Path(args.data or DEFAULT_DATA)
    return args


def main() -> None:
    args = parse_args()
    before = busy_cpu_seconds()
    # A terminated benchmark still removes its temporary folder (the finally below runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="clmlab-bench-train-"))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer and the scripts print; stdout carries the JSON alone
            setting = Setting(args, work)
            device = setting.device
            warm_up(setting)
            runs = {name: [] for name in PIPELINES}
            for _ in range(args.repeats):
                for name, run in PIPELINES.items():
                    runs[name].append(run(setting))
        results = {}
        for name, repeats in runs.items():
            # The run of median throughput (the lower middle one of an even number), with every run's figure beside it.
            results[name] = sorted(repeats, key=lambda r: r["tokens_per_second"])[(len(repeats) - 1) // 2]
            if args.repeats > 1:
                results[name]["repeats_tokens_per_second"] = [r["tokens_per_second"] for r in repeats]
        config, after = setting.config, busy_cpu_seconds()

        def ratio(key: str, of: str) -> float:
            return round(results["clmlab"][key] / results[of][key], 3)

        report = {
            "device": device.type, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{cpu_name()}, {psutil.cpu_count()} cores, {torch.get_num_threads()} torch threads",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
            # Other work on the machine slows whichever pipeline it overlaps: how many cores it took, on average, while this ran.
            "other_processes_cores": other_cores(before, after),
            "dtype": args.dtype, "tf32": setting.tf32, "torch_compile": args.compile_backend if args.torch_compile else None,
            "model": {"shape": setting.shape, "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
                      "vocab_size": config.vocab_size, "parameters": setting.parameters},
            "tokenizer": "gpt2" if args.vocab == "gpt2" else f"byte-level BPE of {args.vocab} trained by clmlab on the data",
            "data": Path(args.data).name, "block_size": args.block_size, "batch": args.batch_size, "tokens_per_step": setting.tokens_per_step,
            "steps": args.steps, "warmup": args.warmup, "logging_steps": args.logging_steps, "lr_warmup_steps": setting.lr_warmup,
            "repeats": args.repeats,
            "training_flops_per_token": setting.flops_per_token, "peak_flops": setting.peak_flops,
            "peak_memory_kind": MemoryPeak(device).kind,
            "measures": {
                "tokens_per_second": f"steps {args.warmup + 1}-{setting.total} ({args.steps} steps after {args.warmup} untimed): "
                                     "the window's tokens over its wall time, device synchronized at both ends, everything between steps included",
                "step_time_ms": "mean over the window, and the median spacing of consecutive step ends (host clock)",
                "end_to_end_seconds": "from the text file to the end of the final evaluation (bare loop: of training): data preparation, "
                                      "model, training, saving and evaluation included; split into before/during/after training",
                "final_loss": f"mean training loss of the last {args.logging_steps} steps as logged; same initial weights in all three "
                              "(initial_weights_sha256), blocks cut and ordered by each pipeline's own data code",
                "final_loss_per_predicted_token": "final_loss over the tokens the loss predicts (the HF example's Trainer divides "
                                                  "by one label per row more: block / (block - 1) of its logged loss)",
                "peak_memory_bytes": MemoryPeak(device).kind + ", during training (CPU: over the memory held when the pipeline began)",
                "order": "run one after the other in this process, in the order listed (with --repeats, round after round; "
                         "each pipeline's figures are those of its run of median tokens_per_second)",
                "as_logged": "clmlab's own records of its run (callbacks.ThroughputCallback, run_info.json's speed); its CPU memory "
                             "figures are the process's high-water mark (getrusage), this benchmark's earlier pipelines included",
                "other_processes_cores": "cores other processes kept busy on average (machine busy CPU time less this process's, "
                                         "over wall time), for the whole benchmark and for each pipeline: above 0, they shared the cores",
            },
            "pipelines": results,
            "ratios": {f"clmlab_over_{of}": {"tokens_per_second": ratio("tokens_per_second", of),
                                             "end_to_end_seconds": ratio("end_to_end_seconds", of)} for of in ("bare_loop", "hf_example")},
        }
        print(json.dumps(report, indent=2))
    except UsageError as error:  # a --shape the config refuses
        fail(str(error))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
