"""What every training script does around the Trainer: budgets, the output directory, run records."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from clmlab.checkpoints import is_complete_checkpoint, last_complete_checkpoint, read_json
from clmlab.cli import UsageError

ARGS_FILE = "run_args.json"
INFO_FILE = "run_info.json"
# Arguments that change where a run writes or how it reports, not what it computes: a re-run that differs
# only in these resumes the same run.
NOT_RUN_DEFINING = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "run_name", "report_to",
    "disable_tqdm", "dataloader_num_workers", "preprocessing_num_workers", "local_rank", "logging_first_step",
    "save_steps", "save_total_limit", "eval_steps", "logging_steps", "push_to_hub", "hub_model_id", "hub_token",
}
PACKAGES = ("clmlab", "torch", "transformers", "datasets", "accelerate", "tokenizers", "evaluate", "wandb", "numpy")


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
    if explicit and not is_complete_checkpoint(Path(explicit)):
        raise UsageError(f"--resume_from_checkpoint {explicit} is not a complete checkpoint (no readable trainer_state.json)")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        return OutputPlan(resume_from=explicit)
    saved = out / ARGS_FILE
    if not saved.is_file():
        raise UsageError(f"--output_dir {output_dir} is not empty and holds no clmlab run; choose another --output_dir")
    before, now = _run_defining(json.loads(saved.read_text())), _run_defining(resolved)
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
    if explicit:
        return OutputPlan(resume_from=explicit)
    info = read_json(out / INFO_FILE)
    if info and info.get("status") == "finished":
        return OutputPlan(finished=info)
    return OutputPlan(resume_from=last_complete_checkpoint(output_dir) if policy.lower() == "auto" else None)


def prepare_output_dir(args, resolved: dict) -> OutputPlan:
    """The output-directory plan of a training script, acted on: a finished run is reported (the script then
    returns its metrics), and a resumed run skips the evaluation before its first step, which its
    checkpoint's log history already holds."""
    plan = plan_output_dir(args.output_dir, resolved, args.resume_from_checkpoint, args.overwrite_output_dir)
    if plan.finished:
        eval_loss = plan.finished.get("final_metrics", {}).get("eval_loss")
        shown = f"eval loss {eval_loss:.4f}" if eval_loss is not None else "no eval loss"
        print(f"{args.output_dir} holds this run, finished: {shown}. "
              "Nothing to do; pass --overwrite_output_dir true to train it again.")
    if plan.resume_from:
        args.eval_on_start = False
    return plan


def clear_output_dir(output_dir: str) -> None:
    """For --overwrite_output_dir (only ever on a folder holding a clmlab run): a replaced run leaves no
    checkpoint behind for a later run to resume."""
    out = Path(output_dir)
    if out.exists():
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


# --------------------------------------------------------------------------------------------------- run records


def final_evaluation(trainer) -> dict:
    """The evaluation at the last step, made again only if the Trainer did not already make it."""
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    for entry in reversed(last):
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()



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


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
