"""Checkpoints that are either complete or ignored: a marker after every process has saved, and rotation that
only ever follows a marker."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback

from clmlab.checkpoints import checkpoints_by_step, is_complete_checkpoint, mark_complete, unmark

logger = logging.getLogger(__name__)


def wait_for_every_process() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CompleteCheckpointsCallback(TrainerCallback):
    """After each save: every process waits for the others, then the main process writes the checkpoint's
    completion marker (its files and sizes) and deletes the oldest marked checkpoints beyond --save_total_limit.

    The Trainer alone would not do: it writes checkpoint-N in place, its main process writes trainer_state.json
    without waiting for the other processes' files, and it deletes old checkpoints right after its own part of
    a save, before the others have finished theirs. So the Trainer's rotation is turned off (its
    `save_total_limit` is taken over here) and done after the marker, never touching the newest complete
    checkpoint nor the best one.
    """

    def __init__(self, args):
        self.keep = args.save_total_limit
        args.save_total_limit = None

    def on_save(self, args, state, control, **kwargs):
        wait_for_every_process()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_complete(folder, state.global_step, args.world_size)
            self.rotate(Path(args.output_dir), state.best_model_checkpoint)

    def rotate(self, output_dir: Path, best: str | None) -> None:
        if not self.keep:
            return
        complete = [path for _, path in checkpoints_by_step(output_dir) if is_complete_checkpoint(path)]
        spare = {Path(best).resolve()} if best else set()
        for path in complete[: max(len(complete) - self.keep, 0)]:
            if path.resolve() in spare or path == complete[-1]:
                continue
            logger.info(f"deleting {path} (--save_total_limit {self.keep})")
            unmark(path)
            shutil.rmtree(path, ignore_errors=True)
