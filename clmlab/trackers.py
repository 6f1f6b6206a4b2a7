"""Experiment trackers (wandb through the Trainer's own integration): where a run appears on the dashboard and
what it says about itself there. A comparison is one group; each run is named by its dataset and seed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def configure_trackers(args, dataset: str, seed: int) -> None:
    """Set what the Trainer's wandb integration reads before it starts a run: the project, the group (the
    comparison), tags, a run name of dataset and seed, and wandb's files under the output directory (they
    travel with the run; `wandb sync` uploads an offline run later)."""
    if args.run_name in (None, args.output_dir):  # the Trainer's default names a run by its folder
        args.run_name = f"{dataset}-seed{seed}"
    if "wandb" not in (args.report_to or []):
        return
    os.environ.setdefault("WANDB_PROJECT", args.tracker_project)
    if args.comparison:
        os.environ["WANDB_RUN_GROUP"] = args.comparison
    tags = [*(args.run_tags or []), f"dataset:{dataset}", f"seed:{seed}"]
    os.environ["WANDB_TAGS"] = ",".join(tags)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # wandb wants its folder to exist
    os.environ.setdefault("WANDB_DIR", str(Path(args.output_dir).resolve()))
    logger.info(f"wandb: project {os.environ['WANDB_PROJECT']}, group {args.comparison or '(none)'}, run {args.run_name}"
                f"{', offline' if os.environ.get('WANDB_MODE') == 'offline' else ''}")


def add_run_record(args, record: dict) -> None:
    """The run record (data, model, budget, comparison, evaluation sets) in the tracker's config, beside the
    arguments the Trainer puts there, so runs can be grouped and filtered by any of it."""
    if "wandb" not in (args.report_to or []):
        return
    import wandb

    if wandb.run is not None:
        wandb.config.update({"clmlab": {k: v for k, v in record.items() if k not in ("arguments", "status")}}, allow_val_change=True)
