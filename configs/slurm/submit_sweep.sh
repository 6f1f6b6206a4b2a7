#!/bin/bash
# Submits a dataset comparison as three SLURM jobs, each started only if the one before succeeded:
# prepare (tokenize every dataset) -> an array of one task per run (configs/slurm/sweep_array.sbatch) -> report.
#
#   configs/slurm/submit_sweep.sh configs/experiments/three_corpora.yaml
#   configs/slurm/submit_sweep.sh configs/experiments/three_corpora.yaml --null_arm tinystories
#
# Run it from the repository root, in the project's environment (the jobs inherit it). The arguments are
# run_sweep.py's: the comparison file, then options such as --null_arm. Prints the three job ids.
# Edit: the prepare and report jobs' resources below (no GPU; add a --partition), or set them in the environment;
# SWEEP_MAX_PARALLEL caps the array tasks running at once; the runs' resources are in sweep_array.sbatch.
# A run that cannot finish (it failed, or stopped after MAX_REQUEUES requeues) fails its task, and the report
# is then cancelled rather than written on a partial comparison: resubmit that task
# (`sbatch --array=N configs/slurm/sweep_array.sbatch FILE`), then `sbatch --wrap "python run_sweep.py FILE --report_only"`.
set -euo pipefail

PREPARE_SBATCH=${PREPARE_SBATCH:---cpus-per-task=4 --time=02:00:00}
REPORT_SBATCH=${REPORT_SBATCH:---cpus-per-task=2 --time=01:00:00}

[[ -f configs/slurm/sweep_array.sbatch ]] || { echo "error: no configs/slurm/sweep_array.sbatch here: run from the repository root" >&2; exit 2; }
[[ -n ${1:-} && -f $1 ]] || { echo "error: the first argument must be the comparison file (configs/experiments/*.yaml); got '${1:-}'" >&2; exit 2; }

# One array task per run, in --list's order (what --task N means).
runs=$("${PYTHON:-python}" run_sweep.py "$@" --list | grep -c '^# [0-9]*: ')
((runs > 0)) || { echo "error: $1 plans no runs" >&2; exit 2; }
sweep=$(printf '%q ' "${PYTHON:-python}" run_sweep.py "$@")
sweep=${sweep% }

# --parsable prints "id" or "id;cluster". A failed dependency would leave the later jobs pending for ever:
# --kill-on-invalid-dep cancels them instead.
submit() {
    local id
    id=$(sbatch --parsable --kill-on-invalid-dep=yes "$@")
    echo "${id%%;*}"
}

read -ra prepare_options <<<"$PREPARE_SBATCH"
read -ra report_options <<<"$REPORT_SBATCH"
prepare=$(submit --job-name=clm-sweep-prepare --output=%x-%j.out "${prepare_options[@]}" --wrap "$sweep --prepare_only")
# afterok on an array waits for every task; a task that requeues itself is not done until its last attempt.
array=$(submit --dependency="afterok:$prepare" --array="0-$((runs - 1))${SWEEP_MAX_PARALLEL:+%$SWEEP_MAX_PARALLEL}" \
    configs/slurm/sweep_array.sbatch "$@")
report=$(submit --job-name=clm-sweep-report --output=%x-%j.out --dependency="afterok:$array" "${report_options[@]}" \
    --wrap "$sweep --report_only")

echo "prepare: $prepare"
echo "array:   $array (tasks 0-$((runs - 1)), one per run)"
echo "report:  $report"
