#!/usr/bin/env python
"""Compare datasets from their runs: verify the controls, then tables, seed statistics, paired verdicts, the
null arm and plots. Refuses, naming each difference, when the runs differ in more than their data.

    python run_compare.py runs/sweep                       # a sweep folder: the report is written into it
    python run_compare.py runs/tinystories-s0 runs/wiki-s0 --output_dir comparison
    python run_compare.py runs/sweep --force               # write it anyway, with the unmet controls listed first
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clmlab import compare
from clmlab.cli import UsageError, exits_on_usage_error, parse_args, setup_logging

logger = logging.getLogger("run_compare")


@dataclass
class CompareArguments:
    run_dirs: list[str] = field(
        metadata={"help": "Run folders (each holds run_info.json), or sweep folders whose subfolders are run folders; given "
                  "as plain words (RUN_DIR ...), the flag itself is optional.",
                  "nargs": "+"})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where report.md, report.json and the plots go. Unset: the sweep folder when one was given alone, "
                  "else ./comparison."})
    force: bool = field(
        default=False,
        metadata={"help": "Write the report even when controls are not met (listed first, as 'Controls NOT met'); "
                  "runs that did not finish are then left out."})


BOOLEAN_WORDS = {"true", "false", "yes", "no", "1", "0"}


def run_dirs_as_flag(argv: list[str]) -> list[str]:
    """`RUN_DIR ... [--flags]` for a parser that knows only flags: every word that is neither a flag nor a
    flag's value is a run folder, wherever it stands."""
    rest, run_dirs = [], []
    words = iter(argv)
    for word in words:
        if word in ("--output_dir", "--output-dir"):
            rest += [word, next(words, "")]
        elif word.startswith("-"):
            rest.append(word)
            if word == "--run_dirs":
                rest.pop()  # the words after it are run folders anyway
        elif rest and rest[-1] == "--force" and word.lower() in BOOLEAN_WORDS:
            rest.append(word)
        else:
            run_dirs.append(word)
    return (["--run_dirs", *run_dirs] if run_dirs else []) + rest


@exits_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    argv = run_dirs_as_flag(list(sys.argv[1:] if argv is None else argv))
    if "--run_dirs" not in argv and not {"-h", "--help"} & set(argv):
        raise UsageError("no run folders given: run_compare.py RUN_DIR [RUN_DIR ...] [--output_dir DIR] [--force]")
    (args,) = parse_args([CompareArguments], argv, prog="run_compare.py")
    runs, left_out = compare.load_runs(args.run_dirs, force=args.force)
    logger.info(f"{len(runs)} finished runs of {len({r.dataset for r in runs})} datasets"
                + (f"; left out, not finished: {', '.join(r['name'] for r in left_out)}" if left_out else ""))
    report = compare.build_report(runs, left_out, force=args.force)  # refuses here, before anything is written
    output_dir = Path(args.output_dir) if args.output_dir else compare.default_output_dir(args.run_dirs)
    written = compare.write_report(report, runs, output_dir)

    if not report["controls"]["met"]:
        print("\nControls NOT met (--force):")
        print("\n".join(f"  - {line}" for line in report["controls"]["not_met"]))
    print()
    print(compare.main_table(report))
    called = [v for v in report["verdicts"] if v["better"]]
    print(f"\n{len(called)} of {len(report['verdicts'])} dataset-vs-dataset verdicts call a difference (95%, paired by seed)")
    for arm in report["null_arm"]:
        print(f"Null arm {arm['half0']} vs {arm['half1']}: a difference called in {arm['called']} of {arm['metrics']} metrics, "
              f"{len(arm['called_targets'])} of {arm['targets']} eval sets and benchmarks")
    print("\nWrote:")
    print("\n".join(f"  {path}" for path in written))
    return report


if __name__ == "__main__":
    main()
