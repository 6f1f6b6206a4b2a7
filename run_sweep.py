#!/usr/bin/env python
"""Run a dataset comparison: prepare every dataset once, train every (dataset, seed) in turn, write the report.

    python run_sweep.py configs/experiments/three_corpora.yaml                # everything, then report/
    python run_sweep.py configs/experiments/three_corpora.yaml --null_arm tinystories
    python run_sweep.py FILE --list                                         # the runs, one run_clm.py command each
    python run_sweep.py FILE --prepare_only                                 # tokenize every dataset (a first SLURM job)
    python run_sweep.py FILE --task 3                                       # run 3 only (a SLURM array task)
    python run_sweep.py FILE --status 3                                     # run 3's status (a SLURM array task's requeue)
    python run_sweep.py FILE --report_only                                  # the report of the runs done so far

Running it again skips finished runs and resumes interrupted ones (run_clm.py resumes from its last
checkpoint). SIGTERM or Ctrl-C is passed to the run in progress, which stops with a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from clmlab import sweep
from clmlab.cli import UsageError, exits_on_usage_error, setup_logging

HERE = Path(__file__).resolve().parent


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see `run_sweep.py --help`)")


def parse(argv: list[str] | None):
    parser = _Parser(prog="run_sweep.py", description=__doc__.split("\n")[0])
    parser.add_argument("comparison_file", help="The comparison's YAML file (configs/experiments/).")
    parser.add_argument("--null_arm", help="Also train two disjoint halves of this dataset (by document hash), as two datasets.")
    parser.add_argument("--list", action="store_true", help="Print the runs as run_clm.py commands and stop.")
    parser.add_argument("--prepare_only", action="store_true", help="Prepare every dataset (and the shared tokenizer) and stop.")
    parser.add_argument("--task", type=int, help="Prepare what run N needs and train run N only (0-based; SLURM_ARRAY_TASK_ID).")
    parser.add_argument("--status", type=int, metavar="N", help="Print run N's status (finished, stopped, failed, running or none) and stop.")
    parser.add_argument("--report_only", action="store_true", help="Write the report from the runs there are; train nothing.")
    parser.add_argument("--force", action="store_true", help="Write the report even where controls differ (run_compare.py --force).")
    return parser.parse_args(argv)


def status(run: sweep.PlannedRun) -> str | None:
    try:
        return json.loads((run.output_dir / "run_info.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def run_command(argv: list[str], log: Path) -> int:
    """A script in a child process, its output into `log`; a stop signal is passed on to it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        child = subprocess.Popen([sys.executable, *argv], cwd=Path.cwd(), stdout=handle, stderr=subprocess.STDOUT)
        forward = lambda signum, frame: child.send_signal(signal.SIGTERM)  # noqa: E731  the run checkpoints and stops
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
        try:
            return child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def prepare(comparison: sweep.Comparison, datasets: list[str]) -> None:
    if comparison.shared_tokenizer:
        print(f"training the shared {comparison.shared_tokenizer}-token BPE on every dataset -> {comparison.tokenizer_folder()}", flush=True)
        log = comparison.output_dir / "logs" / "prepare-shared-tokenizer.log"
        if run_command([str(HERE / "run_prepare.py"), *sweep.shared_tokenizer_flags(comparison)], log) != 0:
            raise SystemExit(f"training the shared tokenizer failed; see {log}")
    # run_prepare.py itself returns at once for a folder prepared with the same arguments, and refuses one
    # prepared with others: an edited comparison file never trains on stale tokens.
    for name in datasets:
        folder = comparison.prepared_folder(name)
        print(f"preparing {name} -> {folder}", flush=True)
        code = run_command([str(HERE / "run_prepare.py"), *sweep.prepare_flags(comparison, name)], comparison.output_dir / "logs" / f"prepare-{name}.log")
        if code != 0:
            raise SystemExit(f"preparing {name} failed (exit {code}); see {comparison.output_dir / 'logs' / f'prepare-{name}.log'}")


def train(comparison: sweep.Comparison, runs: list[sweep.PlannedRun]) -> None:
    total = len(comparison.runs)
    for run in runs:
        index = comparison.runs.index(run)
        label = f"[{index + 1}/{total}] {run.dataset} seed {run.seed}"
        # Always run_clm.py: for the same finished run it returns at once, and it refuses a folder that holds a
        # run made with other arguments (an edited comparison file), so no stale run reaches the report.
        before = status(run)
        print(f"{label}: {'resuming' if before in ('stopped', 'failed', 'running') else 'checking' if before else 'training'} -> "
              f"{run.output_dir}", flush=True)
        started = time.perf_counter()
        log = comparison.output_dir / "logs" / f"{run.output_dir.name}.log"
        code = run_command([str(HERE / "run_clm.py"), *run.argv], log)
        if code == 2:  # bad input: run_clm.py's one line is the last of the log
            lines = log.read_text().strip().splitlines()
            raise SystemExit(f"{label}: refused by run_clm.py: {lines[-1] if lines else '(no output)'}")
        if code != 0 or status(run) != "finished":
            raise SystemExit(f"{label}: {status(run) or 'failed before its first step'} (exit {code}); see {log}. "
                             "Run the same command again to resume.")
        info = json.loads((run.output_dir / "run_info.json").read_text())
        if before == "finished":
            print(f"{label}: finished before, nothing to do", flush=True)
            continue
        print(f"{label}: done in {time.perf_counter() - started:.0f} s, eval loss {info['final_metrics'].get('eval_loss', float('nan')):.4f}",
              flush=True)


@exits_on_usage_error
def main(argv: list[str] | None = None) -> int:
    setup_logging()
    options = parse(argv)
    comparison = sweep.load_comparison(options.comparison_file, options.null_arm)
    if options.list:
        for i, run in enumerate(comparison.runs):
            print(f"# {i}: {run.dataset} seed {run.seed}\npython run_clm.py {shlex.join(run.argv)}")
        return 0
    for flag, index in (("--task", options.task), ("--status", options.status)):
        if index is not None and not 0 <= index < len(comparison.runs):
            raise UsageError(f"{flag} {index}: the comparison has runs 0 to {len(comparison.runs) - 1}")
    if options.status is not None:
        print(status(comparison.runs[options.status]) or "none")
        return 0
    if not options.report_only:
        runs = comparison.runs if options.task is None else [comparison.runs[options.task]]
        # Every run evaluates on every dataset's held-out text: all the datasets are prepared before the first run.
        prepare(comparison, list(comparison.datasets))
        if options.prepare_only:
            return 0
        train(comparison, runs)
        if options.task is not None:
            return 0
    report = [str(HERE / "run_compare.py"), str(comparison.runs_folder()), "--output_dir", str(comparison.report_folder())]
    done = subprocess.run([sys.executable, *report, *(["--force"] if options.force else [])], cwd=Path.cwd())
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
