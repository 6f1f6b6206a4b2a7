"""The lifecycle every training script goes through, written once: plan the output directory, record the
run, build the Trainer, train, save, evaluate a last time, record the outcome (finished, stopped or
failed). Also the token budget and the run records."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import TrainerState

from clmlab.checkpoints import ARGS_FILE, checkpoint_step, checkpoints_by_step, is_complete_checkpoint, last_complete_checkpoint, read_json
from clmlab import modeling, trackers
from clmlab.cli import UsageError, first_line, on_failure

INFO_FILE = "run_info.json"
logger = logging.getLogger(__name__)
# Arguments that change where a run writes or how it reports, not what it computes: a re-run that differs
# only in these resumes the same run.
NOT_RUN_DEFINING = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "run_name", "report_to",
    "disable_tqdm", "dataloader_num_workers", "preprocessing_num_workers", "local_rank", "logging_first_step",
    "save_steps", "save_total_limit", "eval_steps", "logging_steps", "push_to_hub", "hub_model_id", "hub_token",
    "use_cpu",  # set for DDP over gloo on a machine with no GPU: the same computation on one process or several
    "comparison", "run_tags", "tracker_project", "dataset_label", "ddp_find_unused_parameters",
    # How batches reach the device and how speed is reported: the same batches, the same numbers.
    "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor", "peak_tflops",
}
# Every package whose version can change what a run computes or how its files are read back.
PACKAGES = ("clmlab", "torch", "transformers", "datasets", "accelerate", "tokenizers", "peft", "safetensors",
            "huggingface_hub", "numpy", "pyarrow", "wandb")


# --------------------------------------------------------------------------------------------------- budget


def tokens_per_step(block_size: int, per_device_batch: int, accumulation: int, world_size: int) -> int:
    return block_size * per_device_batch * accumulation * world_size


def steps_for_token_budget(max_train_tokens: int, step_tokens: int) -> int:
    """The fewest optimizer steps that see at least `max_train_tokens` tokens."""
    if max_train_tokens <= 0:
        raise UsageError(f"--max_train_tokens must be positive, not {max_train_tokens}")
    return math.ceil(max_train_tokens / step_tokens)


# --------------------------------------------------------------------------------------------------- arguments


def resolved_arguments(*arg_objects) -> dict:
    resolved = {}
    for obj in arg_objects:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        resolved[type(obj).__name__] = json.loads(json.dumps(values, default=str))
    return resolved


def _run_defining(resolved: dict) -> dict:
    return {f"{group}.{k}": v for group, values in resolved.items() for k, v in values.items() if k not in NOT_RUN_DEFINING}


@dataclasses.dataclass
class OutputPlan:
    """What to do with --output_dir: resume from a checkpoint, clear a run being replaced, or nothing at all
    because the same run already finished there."""

    resume_from: str | None = None
    clear_first: bool = False
    finished: dict | None = None  # run_info.json of the finished run


def plan_output_dir(output_dir: str, resolved: dict, resume_from_checkpoint: str | None, overwrite: bool) -> OutputPlan:
    """Decide what to do with the output directory before any heavy work. Nothing is written here.

    The same command re-run resumes from the last complete checkpoint, or does nothing if the run finished.
    A directory holding a different run is refused unless --overwrite_output_dir; one holding anything
    but a clmlab run is always refused, so no other work is lost by accident.
    """
    policy = (resume_from_checkpoint or "no").strip()
    explicit = policy if policy.lower() not in ("auto", "no", "none", "false") else None
    if explicit:
        if (Path(explicit) / ARGS_FILE).is_file():
            raise UsageError(f"--resume_from_checkpoint {explicit} is a run's folder, not a checkpoint; give one of its checkpoint-N folders")
        if not is_complete_checkpoint(Path(explicit)):
            raise UsageError(f"--resume_from_checkpoint {explicit} is not a complete checkpoint (its save was cut short: no completion marker, a file missing "
                             "or of another size than marked, or no readable trainer_state.json); give an earlier checkpoint")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        _check_writable(out)
        return OutputPlan(resume_from=explicit)
    saved = out / ARGS_FILE
    if not saved.is_file():
        raise UsageError(f"--output_dir {output_dir} is not empty and holds no clmlab run; choose another --output_dir")
    saved_args = read_json(saved)
    if saved_args is None:
        raise UsageError(f"--output_dir {output_dir}: its {ARGS_FILE} cannot be read; pass --overwrite_output_dir true to replace "
                         "the run, or choose another --output_dir")
    before, now = _run_defining(saved_args), _run_defining(resolved)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        if overwrite:
            if explicit and out.resolve() in Path(explicit).resolve().parents:
                raise UsageError(f"--overwrite_output_dir would delete --resume_from_checkpoint {explicit}; write to another --output_dir")
            return OutputPlan(resume_from=explicit, clear_first=True)
        shown = ", ".join(f"{k.split('.', 1)[1]}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise UsageError(
            f"--output_dir {output_dir} holds a different run ({shown}{more}); choose another --output_dir "
            "(with --resume_from_checkpoint to continue from one of its checkpoints) or pass --overwrite_output_dir true to replace it"
        )
    if overwrite:
        return OutputPlan(resume_from=explicit, clear_first=explicit is None)
    info = read_json(out / INFO_FILE)
    if info and info.get("status") == "finished":
        return OutputPlan(finished=info)
    if policy.lower() == "no":
        return OutputPlan()
    # The same run, unfinished: its own newest checkpoint is where it stopped, even when it first started
    # from an explicit --resume_from_checkpoint elsewhere (re-running the same command must not go back).
    own = last_complete_checkpoint(output_dir)
    if own:
        return OutputPlan(resume_from=own)
    return OutputPlan(resume_from=explicit)


def _check_writable(out: Path) -> None:
    """A folder that could not be made or written would fail only after all the tokenizing."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {out}: {parent} is not a folder this user can write to; choose another --output_dir")




# --------------------------------------------------------------------------------------------------- run records


def final_evaluation(trainer) -> dict:
    """The evaluation at the last step, made again only if the Trainer did not already make it (with several
    evaluation sets, it logged one entry per set at that step)."""
    found = {}
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") != trainer.state.global_step:
            break
        found = {**{k: v for k, v in entry.items() if k.startswith("eval_")}, **found}
    return found if "eval_loss" in found else trainer.evaluate()


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: str | Path = Path(__file__).resolve().parent) -> dict:
    """The commit of the clmlab code that ran, and whether it had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def write_json(path: str | Path, payload: dict) -> None:
    """Write through a temporary file, so a killed run never leaves half a JSON file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_record(resolved: dict, resumed_from: str | None, **sections) -> dict:
    """The start of run_info.json: what ran, with which code and versions; the script adds its sections."""
    return {"status": "running", "command": command_line(), "arguments": resolved, "versions": package_versions(),
            "git": git_commit(), "resumed_from": resumed_from, **sections}


def launch_record(trainer) -> dict:
    """How the run was launched: what a flag does not say when an accelerate config or a scheduler set it (the
    precision comes from ACCELERATE_MIXED_PRECISION unless --bf16 or --fp16 is given)."""
    args = trainer.args
    sharding = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else None
    return {"world_size": args.world_size, "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
            "device": args.device.type, "mixed_precision": getattr(args, "mixed_precision", "no"),
            "parallelism": sharding or ("ddp" if args.world_size > 1 else "single process"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def speed_record(trainer) -> dict:
    """run_info.json's "speed": the figures of the callback that measures them (one with a `speed_record()`,
    callbacks.ThroughputCallback), and the kernels the model ran with."""
    model, args = trainer.model, trainer.args
    figures = next((c.speed_record() for c in trainer.callback_handler.callbacks if hasattr(c, "speed_record")), None) or {}
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None) if args.device.type == "cuda" else None
    return {**figures, "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None,
            "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
            "fused_cross_entropy": bool(getattr(model, "fused_cross_entropy", False)), "torch_compile": bool(args.torch_compile),
            "tf32_matmuls": precision == "tf32" if precision is not None else None,
            "dataloader_num_workers": args.dataloader_num_workers, "dataloader_pin_memory": bool(args.dataloader_pin_memory)}


def describe_speed(speed: dict) -> str | None:
    """The end-of-run summary's speed line."""
    if not speed.get("tokens_per_second"):
        return None
    parts = [f"{speed['tokens_per_second']:,.0f} tokens/s over {speed['step_seconds']:,.1f} s of training steps"]
    if speed.get("mfu") is not None:
        parts.append(f"MFU {100 * speed['mfu']:.1f}%")
    if speed.get("peak_memory_bytes"):
        where = "GPU memory" if speed["peak_memory_measure"].startswith("torch.cuda") else "resident memory"
        parts.append(f"peak {where} {modeling.size(speed['peak_memory_bytes'])}")
    return "Speed: " + ", ".join(parts)


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


# --------------------------------------------------------------------------------------------------- the lifecycle


class _AtFirstStep(TrainerCallback):
    """Calls `action` once, at the end of this process's first optimizer step (before that step's
    checkpoint, if any, is saved), or at its beginning (after its batches are fetched)."""

    def __init__(self, action: Callable[[], None], at: str = "step_end"):
        self.action: Callable[[], None] | None = action
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if self.at == "step_begin" and self.action is not None:
            action, self.action = self.action, None
            action()

    def on_step_end(self, args, state, control, **kwargs):
        if self.at == "step_end" and self.action is not None:
            action, self.action = self.action, None
            action()
            if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()  # no rank saves into a folder the main process is still clearing


class _PassesOverData(TrainerCallback):
    """`epoch` as passes over the data. A dataset that is the run's whole sequence of samples is one Trainer
    epoch long, so the Trainer's own count would say how much of the run is done instead."""

    def __init__(self, global_batch: int, n_blocks: int):
        self.global_batch, self.n_blocks = global_batch, n_blocks

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "epoch" in logs:
            logs["epoch"] = round(state.global_step * self.global_batch / self.n_blocks, 4)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["epoch"] = logs["epoch"]


class TrainingRun:
    """One training command from its output-directory plan to its recorded outcome.

    Nothing is written to --output_dir before the first optimizer step ends: the records (run_args.json,
    run_info.json, the tokenizer) are written then, and a run being replaced (--overwrite_output_dir) is
    cleared then. A command that fails before that leaves the folder as it found it: whatever it created
    there (the Trainer makes the folder when it is built) is removed, nothing older is touched. A failure
    after it is recorded as `failed` and the same command resumes from the last complete checkpoint.
    """

    def __init__(self, args, resolved: dict, stop, checkpoints):
        """`stop` ends training on purpose (callbacks.PreemptionCallback: signals, a stop asked of any process);
        `checkpoints` marks each checkpoint complete once every process has saved it, and rotates them
        (callbacks.CompleteCheckpointsCallback)."""
        self.args, self.resolved = args, resolved
        self.started = time.time()
        self.out = Path(args.output_dir)
        self.plan = plan_output_dir(args.output_dir, resolved, args.resume_from_checkpoint, args.overwrite_output_dir)
        self.finished, self.resume_from = self.plan.finished, self.plan.resume_from
        self.stop, self.checkpoints = stop, checkpoints
        self.training_started = False
        self._trainer = None
        self._extra_callbacks: list[TrainerCallback] = []
        self._restore_rng_at_first_step = False
        self._info: dict = {}
        self._existed = self.out.is_dir()
        self._entries_before = set(os.listdir(self.out)) if self._existed else set()
        previous = read_json(self.out / INFO_FILE) if self._existed and not self.plan.clear_first else None
        self._previous = previous or {}
        # Each earlier attempt of this run (stopped or failed, then resumed), for requeue limits and forensics.
        self._attempts = [*previous.get("attempts", []), {k: previous.get(k) for k in ("status", "step", "wall_seconds", "stopped", "error")}] \
            if previous and not self.finished else []
        if self.finished:
            eval_loss = self.finished.get("final_metrics", {}).get("eval_loss")
            shown = f"eval loss {eval_loss:.4f}" if eval_loss is not None else "no eval loss"
            print(f"{args.output_dir} holds this run, finished: {shown}. "
                  "Nothing to do; pass --overwrite_output_dir true to train it again.")
            return
        if args.global_batch_size:
            per_step = args.per_device_train_batch_size * args.world_size
            if args.global_batch_size % per_step:
                raise UsageError(f"--global_batch_size {args.global_batch_size} is not a multiple of --per_device_train_batch_size "
                                 f"{args.per_device_train_batch_size} x {args.world_size} processes; choose a per-device batch that divides it")
            args.gradient_accumulation_steps = args.global_batch_size // per_step
            logger.info(f"--global_batch_size {args.global_batch_size} = {args.per_device_train_batch_size} per device x "
                        f"{args.world_size} processes x {args.gradient_accumulation_steps} accumulation steps")
        if self.resume_from:
            logger.info(f"resuming from {self.resume_from}")
            if args.eval_on_start:
                logger.info("no evaluation before the first step: the checkpoint's log history holds the run's first one")
                args.eval_on_start = False
        on_failure(self._failed)

    def read_in_order(self, train_dataset, global_batch: int) -> None:
        """For a dataset that is itself the run's sequence of samples (clmlab.prepared.PreparedBlocks): the
        Trainer reads it in order, and a resumed run starts at its checkpoint's sample, in constant time,
        instead of having the Trainer walk past every sample it skips."""
        self.args.train_sampling_strategy = "sequential"
        self._extra_callbacks.append(_PassesOverData(global_batch, train_dataset.n_blocks))
        if not self.resume_from:
            return
        earlier = (self._previous.get("data") or {}).get("prepared", {}).get("content_id")
        now = getattr(train_dataset, "content_id", None)
        if earlier and now and earlier != now:
            raise UsageError(f"the prepared folder's content changed since {self.resume_from} was saved (content id {earlier[:12]} -> "
                             f"{now[:12]}); resume only on the data the run started with, or start a new --output_dir")
        step = checkpoint_step(self.resume_from)
        train_dataset.start = step * global_batch
        self.args.ignore_data_skip = True
        self._restore_rng_at_first_step = True
        logger.info(f"resuming at sample {train_dataset.start:,} (step {step:,} x global batch {global_batch}): nothing is read for the skipped steps")

    @property
    def is_main(self) -> bool:
        return self.args.process_index == 0

    @property
    def is_local_main(self) -> bool:
        return self.args.local_process_index == 0

    def train(self, trainer, record: dict, sequence_length: int, report: Sequence[str] = (),
              save_model: Callable[[], None] | None = None) -> dict:
        """Train, then save the model (`save_model`, default `trainer.save_model`), evaluate once more and
        record the run as finished; or, if training ended early on purpose, make sure the step's checkpoint
        exists and record the run as stopped. `record` holds the script's own sections of run_info.json;
        `sequence_length` is the longest training row (for the memory estimate). Returns the final metrics."""
        self._trainer = trainer
        self._info = run_record(self.resolved, self.resume_from, launch=launch_record(trainer), **record)
        if self._attempts:
            self._info["attempts"] = self._attempts
        trainer.callback_handler.callbacks.insert(0, _AtFirstStep(self._begin_records))
        trainer.add_callback(self.stop)
        trainer.add_callback(self.checkpoints)
        for callback in self._extra_callbacks:
            trainer.callback_handler.callbacks.insert(0, callback)  # ahead of the reporters, as values they report
        if self._restore_rng_at_first_step:
            # Building the dataloader's iterator draws from torch's generator after the Trainer restored it from
            # the checkpoint; restored again here, the first step's dropout is the uninterrupted run's. (The
            # Trainer's own restore is private API, and so is this call of it.)
            trainer.add_callback(_AtFirstStep(lambda: trainer._load_rng_state(self.resume_from), at="step_begin"))
        if self.is_local_main:
            warn_if_short_of_memory(trainer, sequence_length)
        if getattr(self.args, "default_dataloader_workers", False) and isinstance(trainer.train_dataset, torch.utils.data.IterableDataset):
            # Each worker reads its own shards of a stream: the batches' order would depend on how many there are.
            self.args.dataloader_num_workers = 0
            self.resolved.get(type(self.args).__name__, {})["dataloader_num_workers"] = 0  # what run_args.json records

        saved = read_json(Path(self.resume_from) / "trainer_state.json") if self.resume_from else None
        own = saved and Path(self.resume_from).resolve().parent == self.out.resolve()
        last = trainer.args.max_steps if trainer.args.max_steps > 0 else (saved or {}).get("max_steps", 0) if own else 0
        if saved and 0 < last <= saved.get("global_step", 0):
            # Saved at its last step, then stopped before the end (in the final save or evaluation): the
            # Trainer would train one step more, so only the end is done again.
            logger.info(f"{self.resume_from} is the run's last step: saving and evaluating it")
            trainer._load_from_checkpoint(self.resume_from)  # the Trainer's own loading of a checkpoint's weights
            trainer.state = TrainerState.load_from_json(str(Path(self.resume_from) / "trainer_state.json"))
            # The saved state holds the main process's rank flags; every process has its own.
            trainer.state.is_world_process_zero = trainer.is_world_process_zero()
            trainer.state.is_local_process_zero = trainer.is_local_process_zero()
            metrics = {}
        else:
            with self.stop.catch_signals():
                metrics = trainer.train(resume_from_checkpoint=self.resume_from).metrics
        state = trainer.state
        if state.global_step < state.max_steps:
            return self._stopped(trainer)
        (save_model or trainer.save_model)()
        metrics = {**metrics, **(final_evaluation(trainer) if trainer.eval_dataset is not None else {})}
        trainer.save_state()
        evals = {e["step"]: e["eval_loss"] for e in state.log_history if "eval_loss" in e}
        speed = speed_record(trainer)
        self._record(status="finished", final_metrics=metrics, eval_loss_before=evals.get(0), eval_loss_after=metrics.get("eval_loss"),
                     speed=speed)
        if self.is_main:
            summary = f"\nFinished {state.global_step:,} steps, {state.num_input_tokens_seen:,} tokens"
            if "eval_loss" in metrics:
                start = f"{evals[0]:.4f} at the start, " if 0 in evals else ""
                summary += f": eval loss {start}{metrics['eval_loss']:.4f} at the end (perplexity {math.exp(min(metrics['eval_loss'], 50)):.2f})"
            print(summary + ".")
            for line in filter(None, [describe_speed(speed), *report, f"Run record: {self.out / INFO_FILE}"]):
                print(line)
        return metrics

    def _stopped(self, trainer) -> dict:
        step = trainer.state.global_step
        checkpoint = self.out / f"checkpoint-{step}"
        if self.stop.saved_step != step:  # decided from state every rank shares, never from files one rank sees
            # The Trainer has no public call that writes a resumable checkpoint (optimizer, scheduler and RNG
            # states); a callback that ended training without asking for a save still gets one, marked complete
            # and rotated as the Trainer's own saves are (its on_save event).
            trainer._save_checkpoint(trainer.model, trial=None)
            trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
        stopped = self.stop.record()
        self._record(status="stopped", stopped={"step": step, "max_steps": trainer.state.max_steps, **stopped,
                                                "checkpoint": str(checkpoint)}, speed=speed_record(trainer))
        if self.is_main:
            print(f"\nStopped at step {step:,} of {trainer.state.max_steps:,} ({stopped['reason']}): checkpoint {checkpoint}. "
                  "Run the same command again to continue.")
        return {}

    def _begin_records(self) -> None:
        self.training_started = True
        if not self.is_main:
            return
        # A save cut short (no marker) beyond the checkpoint resumed from: this run saves those steps again.
        resumed_at = checkpoint_step(self.resume_from) if self.resume_from and not self.plan.clear_first else 0
        for step, path in checkpoints_by_step(self.out):
            if step > resumed_at and not is_complete_checkpoint(path):
                logger.info(f"removing {path}: its save was cut short")
                _remove(path)
        if self.plan.clear_first:  # the run being replaced: only what was there before this command
            # Not wandb's folder: this run's tracker already writes in it, beside the old run's (its own folder).
            for name in sorted(self._entries_before - {"wandb"}):
                _remove(self.out / name)
        write_json(self.out / ARGS_FILE, self.resolved)
        write_json(self.out / INFO_FILE, self._info)
        trackers.add_run_record(self.args, self._info)
        if self._trainer.processing_class is not None:
            self._trainer.processing_class.save_pretrained(self.out)

    def _record(self, **fields) -> None:
        if not self.training_started:  # resumed at its last step: no step ran in this process
            self._begin_records()
        if not self.is_main:
            return
        state = self._trainer.state
        self._info.update(wall_seconds=round(time.time() - self.started, 1), step=state.global_step,
                          tokens_seen=state.num_input_tokens_seen, **fields)
        write_json(self.out / INFO_FILE, self._info)

    def _failed(self, error: BaseException) -> None:
        if not self.is_main:
            return
        if not self.training_started:
            self._undo()
        elif self._info.get("status") == "running":
            self._record(status="failed", error=f"{type(error).__name__}: {first_line(error)}")

    def _undo(self) -> None:
        """Remove what this command created in the output directory; never anything that was there before."""
        if not self.out.is_dir():
            return
        if not self._existed:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for name in set(os.listdir(self.out)) - self._entries_before:
            _remove(self.out / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def warn_if_short_of_memory(trainer, sequence_length: int) -> None:
    """Warn before the first step, naming the knobs, when the estimated training memory of one process
    exceeds what its device has free: an out-of-memory kill later says nothing."""
    args, model = trainer.args, trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = modeling.training_memory(model.config, args.per_device_train_batch_size, sequence_length,
                                        modeling.parameter_count(model), trainable, mixed_precision=getattr(args, "mixed_precision", "no") != "no",
                                        activation_checkpointing=bool(getattr(args, "activation_checkpointing", False)),
                                        attention_scores=args.device.type != "cuda")
    free = modeling.free_memory(args.device)
    if free is None:
        return
    processes = args.world_size if args.device.type == "cpu" else 1  # CPU ranks share one machine's memory
    # The free memory is read with the weights already in place: only what training adds must fit.
    placed = sum(p.numel() * p.element_size() for p in model.parameters())
    if (estimate.total - placed) * processes > free:
        logger.warning(
            f"training may run out of memory: about {estimate.describe()} per process"
            f"{f' x {processes} processes' if processes > 1 else ''}, and {args.device.type} has {modeling.size(free)} free; "
            "lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep the tokens per step), "
            "--block_size or the model (n_embd, n_layer, vocabulary), or pass --activation_checkpointing true"
        )
