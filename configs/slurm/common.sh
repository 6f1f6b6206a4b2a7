# Shared by the batch scripts of this folder (sourced, never run): start the training step in the
# background, pass SLURM's time-limit warning on to it, wait until it has really exited, then requeue the job
# only if that warning is what stopped the run.
#
# Why the warning is trapped by the batch shell and not sent to the run by SLURM: the shell is the one place
# that knows both that the scheduler asked for the stop and, after the step exits, what the run recorded.
# A run that stopped for any other reason (a cancel, a preemption SLURM requeues itself, a human's kill) or
# failed is never requeued, so a broken job cannot loop.

# The warning lands here; until the step exists it is only remembered (clm_start passes it on).
CLM_WARNED=0
CLM_STEP_PID=

clm_say() {
    printf '%s slurm: %s\n' "$(date '+%F %T')" "$*"
}

clm_refuse() {  # bad input: one line, exit 2, as the project's scripts do
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# The run's folder from run_clm.py's own flags. It has to come from the user and not from the job: a requeued
# job keeps its job id, but a resubmitted one does not, and either must find the checkpoint to resume.
clm_output_dir() {
    CLM_OUTPUT_DIR=
    while (($#)); do
        case $1 in
            --output_dir=* | --output-dir=*) CLM_OUTPUT_DIR=${1#*=} ;;
            --output_dir | --output-dir) CLM_OUTPUT_DIR=${2:-}; (($# > 1)) && shift ;;
        esac
        shift
    done
    [[ -n $CLM_OUTPUT_DIR ]] || clm_refuse "no --output_dir among the arguments: pass the run's folder on the command line" \
        "(a fixed path, not one made from the job id), so that a requeued job resumes the same run"
}

clm_on_warning() {
    CLM_WARNED=1
    clm_say "time-limit warning (SIGUSR1): asking the run to stop after this step with a checkpoint"
    # USR1 is the one signal every step here turns into a graceful stop: run_clm.py handles it, the launchers
    # forward it (PET_SIGNALS_TO_HANDLE), run_sweep.py passes it on, and srun relays it to its tasks. (A TERM
    # sent to srun makes it kill its tasks instead.)
    [[ -n $CLM_STEP_PID ]] && kill -USR1 "$CLM_STEP_PID" 2>/dev/null
}

# scancel, a preemption and the time limit itself send TERM to every process of the job, the run's included:
# the run stops by itself. The shell only has to outlive it, since processes left behind when the batch
# shell exits are killed, checkpoint half written or not. Not a reason to requeue.
clm_on_termination() {
    clm_say "SIGTERM: waiting for the run to stop (no requeue)"
}

trap clm_on_warning USR1
trap clm_on_termination TERM

# The launchers (torchrun under accelerate launch) forward SIGUSR1 only if told to; without it a USR1 ends the
# launcher and leaves its workers running. After forwarding they wait this long for the workers' checkpoint
# before SIGKILL: it has to cover a step and a save, and end before the time limit (the warning's lead time).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}

# In the background: bash runs a trap only between commands, and `wait` is the one command it interrupts.
clm_start() {
    clm_say "starting: $*"
    "$@" &
    CLM_STEP_PID=$!
    if ((CLM_WARNED)); then  # the warning came while the step was being started
        kill -USR1 "$CLM_STEP_PID" 2>/dev/null
    fi
}

# A trapped signal makes `wait` return early (status 128 + signal) while the step goes on: wait again until it
# has exited. Bash keeps a finished child's status, so the last `wait` reads it even if the step ended (and was
# reaped) just as a signal came in.
clm_wait() {
    while :; do
        wait "$CLM_STEP_PID"
        kill -0 "$CLM_STEP_PID" 2>/dev/null || break
    done
    wait "$CLM_STEP_PID"
    CLM_STEP_EXIT=$?
}

# run_info.json's status: running, stopped, finished, failed; none before the run's first step ends.
clm_run_status() {
    "${PYTHON:-python}" -c '
import json, sys
try:
    print(json.load(open(sys.argv[1])).get("status") or "none")
except (OSError, ValueError):
    print("none")' "$1/run_info.json"
}

# After the step has exited: requeue JOB if our warning stopped the run, at most MAX_REQUEUES times; exit 0 only
# for a finished run or a requeued one. The launchers exit 1 after a forwarded signal whatever the workers did,
# so the decision reads the status the run wrote, never the exit code.
clm_finish() {
    local status=$1 job=$2
    local restarts=${SLURM_RESTART_COUNT:-0} cap=${MAX_REQUEUES:-3}
    clm_say "the training step exited with status $CLM_STEP_EXIT; the run is $status"
    [[ $status == finished ]] && exit 0
    if ((CLM_WARNED)) && [[ $status == stopped ]]; then
        if ((restarts < cap)); then
            clm_say "requeuing $job (requeue $((restarts + 1)) of at most $cap): it resumes from the checkpoint"
            scontrol requeue "$job" && exit 0
            clm_say "scontrol requeue $job failed: submit the same command again to resume"
        else
            clm_say "not requeuing: SLURM_RESTART_COUNT=$restarts has reached MAX_REQUEUES=$cap; submit the same command again to resume"
        fi
    fi
    ((CLM_STEP_EXIT)) && exit "$CLM_STEP_EXIT"
    exit 1
}
