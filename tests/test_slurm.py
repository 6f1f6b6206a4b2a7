"""The SLURM batch scripts (configs/slurm/), run by bash as SLURM runs them, with stand-ins for srun, sbatch and
scontrol first on PATH: a time-limit warning stops the run with a checkpoint and requeues the job after the run
has exited, only for that warning and only so many times; two nodes meet at a c10d rendezvous; a comparison
runs as prepare -> one array task per run -> report."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, shared
from test_lifecycle import CLM_TINY, clm_args, load_script

SLURM = REPO / "configs" / "slurm"
JOB_ID = "4242"

# Each stand-in logs to $FAKE_SLURM_LOG, a command line in one write (two nodes' launchers log at once); the shell
# quoting is read back with shlex.
FAKES = {
    "scontrol": r"""#!/bin/bash
case $1 in
    show) [[ $2 == hostnames ]] || exit 1; for ((i = 0; i < ${SLURM_NNODES:-1}; i++)); do echo localhost; done ;;
    requeue) echo "$2" >>"$FAKE_SLURM_LOG/requeue" ;;
    *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
""",
    "sbatch": r"""#!/bin/bash
line=$(printf '%q ' "$@") && echo "$line" >>"$FAKE_SLURM_LOG/sbatch"
id=$(($(wc -l <"$FAKE_SLURM_LOG/sbatch") + 100))
if [[ " $* " == *" --parsable "* ]]; then echo "$id;testcluster"; else echo "Submitted batch job $id"; fi
""",
    # srun --ntasks-per-node=1 over SLURM_NNODES nodes that are all this machine: the command once per node, in
    # the background, with the node's variables; signals are relayed to every task, as srun relays them.
    "srun": r"""#!/bin/bash
line=$(printf '%q ' "$@") && echo "$line" >>"$FAKE_SLURM_LOG/srun"
while [[ $1 == --* ]]; do shift; done
pids=()
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
port= previous=
for arg; do [[ $previous == --main_process_port ]] && port=$arg; previous=$arg; done
for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do
    # On a cluster only the head node's name matches the rendezvous host, so only it hosts the store; here every
    # node's does, so the others start once the head's store listens (else two try to host it).
    if ((node > 0)) && [[ -n ${FAKE_SRUN_WAIT_FOR_HEAD:-} && -n $port ]]; then
        for ((i = 0; i < 1200; i++)); do (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.1; done
    fi
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" &
    pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
    while :; do wait "$pid"; kill -0 "$pid" 2>/dev/null || break; done
    wait "$pid"; code=$?
    ((code > worst)) && worst=$code
done
exit $worst
""",
    # A launcher and its run in one, for what the scripts decide without training anything: it logs how it was
    # called, and on USR1 or TERM records FAKE_STOP_STATUS as the run's status and exits 1, as torchrun does after
    # forwarding a stop. ready.<node> holds its pid once its traps are set.
    "accelerate": r"""#!/bin/bash
line=$(printf '%q ' "$@") && echo "$line" >>"$FAKE_SLURM_LOG/accelerate"
echo "PET_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" >>"$FAKE_SLURM_LOG/launcher_env"
node=${SLURM_NODEID:-0} out= previous=
for arg; do [[ $previous == --output_dir ]] && out=$arg; [[ $arg == --output_dir=* ]] && out=${arg#*=}; previous=$arg; done
mkdir -p "$out"
stop() {
    echo "node $node: $1" >>"$FAKE_SLURM_LOG/stops"
    sleep 0.5  # the checkpoint: whoever waits for the run has to wait for this
    ((node == 0)) && echo "{\"status\": \"${FAKE_STOP_STATUS:-stopped}\"}" >"$out/run_info.json"
    kill "$sleeper"; exit 1
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM
sleep 60 & sleeper=$!
echo $$ >"$FAKE_SLURM_LOG/ready.$node.tmp" && mv "$FAKE_SLURM_LOG/ready.$node.tmp" "$FAKE_SLURM_LOG/ready.$node"
wait "$sleeper"
((node == 0)) && echo '{"status": "finished"}' >"$out/run_info.json"
exit 0
""",
}


class Slurm:
    """Stand-ins on PATH and the variables SLURM sets in a batch job; the batch scripts started with bash."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.log, self.spool = tmp_path, tmp_path / "slurm-log", tmp_path / "spool"
        self.bin, self.launcher_bin = tmp_path / "bin", tmp_path / "launcher-bin"
        for folder in (self.log, self.spool, self.bin, self.launcher_bin):
            folder.mkdir()
        for name, text in FAKES.items():
            path = (self.launcher_bin if name == "accelerate" else self.bin) / name
            path.write_text(text)
            path.chmod(0o755)
        self.processes: list[subprocess.Popen] = []

    def env(self, fake_launcher: bool = False, **extra: str) -> dict:
        env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
        path = [self.bin, *([self.launcher_bin] if fake_launcher else []), Path(sys.executable).parent]  # else the real accelerate
        env.update({
            "PATH": os.pathsep.join([*map(str, path), os.environ["PATH"]]), "FAKE_SLURM_LOG": str(self.log),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
            "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "clm", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1", **extra})
        return env

    def start(self, script: str, *args, **env) -> subprocess.Popen:
        """A batch script as SLURM runs it: a copy in a spool folder, run by bash (a submit script: from the repository)."""
        if script.endswith(".sbatch"):
            command, cwd = self.spool / f"{len(self.processes)}-{script}", self.tmp
            command.write_bytes((SLURM / script).read_bytes())
        else:
            command, cwd = SLURM / script, REPO
        output = (self.tmp / f"job-{len(self.processes)}.out").open("w")
        process = subprocess.Popen(["bash", str(command), *map(str, args)], cwd=cwd, env=self.env(**env), stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        process.output = Path(output.name)
        self.processes.append(process)
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
        code = process.wait(timeout=timeout)
        return code, process.output.read_text()

    def run(self, script: str, *args, timeout: float = 240, **env) -> tuple[int, str]:
        return self.finish(self.start(script, *args, **env), timeout)

    def calls(self, name: str) -> list[list[str]]:
        path = self.log / name
        return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []

    def requeued(self) -> list[str]:
        path = self.log / "requeue"
        return path.read_text().split() if path.exists() else []

    def close(self) -> None:
        for process in self.processes:  # only what these tests started, each job in a session of its own
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@pytest.fixture
def slurm(tmp_path):
    fakes = Slurm(tmp_path)
    yield fakes
    fakes.close()


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the job ended ({process.returncode}) before {what}:\n{process.output.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s:\n{process.output.read_text()[-3000:]}")
        time.sleep(0.05)


def status(out: Path) -> str | None:
    try:
        return json.loads((out / "run_info.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ without training


@pytest.mark.parametrize("script", sorted(p.name for p in SLURM.iterdir()))
def test_every_script_parses(script):
    done = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_every_batch_script_asks_for_a_warning_a_requeue_and_an_appended_log():
    for script in SLURM.glob("*.sbatch"):
        directives = [line.split(None, 1)[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]
        assert "--signal=B:USR1@300" in directives and "--requeue" in directives and "--open-mode=append" in directives, script
        (output,) = [d for d in directives if d.startswith("--output=")]
        assert "/" not in output and ("%j" in output or "%A_%a" in output), script  # no folder to create first; a log per job


@pytest.mark.parametrize("script, args, env, words", [
    ("single_node.sbatch", ["configs/experiments/quickstart.yaml"], {}, "no --output_dir among the arguments"),
    ("multi_node.sbatch", ["--max_steps", "3", "--output_dir"], {}, "no --output_dir among the arguments"),
    ("sweep_array.sbatch", ["no-such-file.yaml"], {"SLURM_ARRAY_TASK_ID": "0"}, "must be the comparison file"),
    ("sweep_array.sbatch", ["configs/experiments/three_corpora.yaml"], {}, "not an array task"),
    ("submit_sweep.sh", [], {}, "must be the comparison file"),
], ids=["single-node", "multi-node", "array-file", "array-task", "submit"])
def test_a_job_without_its_run_folder_is_refused_in_one_line(slurm, script, args, env, words):
    code, output = slurm.run(script, *args, timeout=60, fake_launcher=True, **env)
    assert code == 2 and output.strip().splitlines() == [output.strip()] and words in output, output
    assert not slurm.calls("accelerate") and not slurm.calls("srun") and not slurm.calls("sbatch") and not slurm.requeued()


@pytest.mark.parametrize("signalled, stop_status, requeued, exit_code", [
    ("shell USR1", "stopped", [JOB_ID], 0),  # the time-limit warning: the only requeue
    ("shell USR1", "failed", [], 1),  # it failed while stopping: requeueing would repeat the failure
    ("shell USR1", "finished", [], 0),  # the warning came during the last step
    ("launcher USR1", "stopped", [], 1),  # someone else stopped the run
    ("shell and launcher TERM", "stopped", [], 1),  # scancel, a preemption, the time limit itself
], ids=["warned-stopped", "warned-failed", "warned-finished", "stopped-unasked", "terminated"])
def test_several_gpus_go_through_accelerate_and_only_a_warned_stop_is_requeued(slurm, tmp_path, signalled, stop_status, requeued,
                                                                                 exit_code):
    out = tmp_path / "run"
    job = slurm.start("single_node.sbatch", "configs/experiments/quickstart.yaml", f"--output_dir={out}", "--max_steps", "9",
                      fake_launcher=True, SLURM_GPUS_ON_NODE="4", LAUNCH_ARGS="--mixed_precision no", FAKE_STOP_STATUS=stop_status)
    wait_for((slurm.log / "ready.0").exists, job, "the launcher")
    launcher = int((slurm.log / "ready.0").read_text())
    if signalled == "shell USR1":
        os.kill(job.pid, signal.SIGUSR1)
    elif signalled == "launcher USR1":
        os.kill(launcher, signal.SIGUSR1)
    else:
        os.kill(job.pid, signal.SIGTERM)
        os.kill(launcher, signal.SIGTERM)
    code, output = slurm.finish(job, timeout=60)
    assert (code, slurm.requeued()) == (exit_code, requeued), output
    assert f"the run is {stop_status}" in output  # read after the launcher exited: the shell outlived a TERM
    assert slurm.calls("accelerate") == [["launch", "--config_file", "configs/accelerate/ddp_bf16.yaml", "--num_processes", "4",
                                          "--mixed_precision", "no", "run_clm.py", "configs/experiments/quickstart.yaml",
                                          f"--output_dir={out}", "--max_steps", "9"]]
    env = (slurm.log / "launcher_env").read_text().split()
    assert env == ["PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240"]


def test_multi_node_starts_a_launcher_per_node_and_relays_the_warning_through_srun(slurm, tmp_path):
    out = tmp_path / "run"
    job = slurm.start("multi_node.sbatch", "--output_dir", out, fake_launcher=True, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8",
                      SLURM_CPUS_PER_TASK="16")
    wait_for(lambda: (slurm.log / "ready.0").exists() and (slurm.log / "ready.1").exists(), job, "both launchers")
    os.kill(job.pid, signal.SIGUSR1)
    code, output = slurm.finish(job, timeout=60)
    assert code == 0 and slurm.requeued() == [JOB_ID], output
    assert sorted((slurm.log / "stops").read_text().splitlines()) == ["node 0: USR1", "node 1: USR1"]
    (srun,) = slurm.calls("srun")
    assert srun[:4] == ["--ntasks-per-node=1", "--ntasks=2", "--kill-on-bad-exit=0", "--cpus-per-task=16"]
    port = str(20000 + int(JOB_ID) % 20000)
    expected = ["launch", "--machine_rank", "?", "--config_file", "configs/accelerate/multi_node.yaml", "--num_machines", "2",
                "--num_processes", "16", "--main_process_ip", "localhost", "--main_process_port", port, "--rdzv_backend", "c10d",
                "run_clm.py", "--output_dir", str(out)]
    assert sorted(slurm.calls("accelerate")) == [[*expected[:2], rank, *expected[3:]] for rank in ("0", "1")]


def test_the_submit_script_chains_prepare_then_one_task_per_run_then_the_report(slurm, tmp_path):
    comparison = tiny_comparison(tmp_path, seeds=[0, 1, 2])
    code, output = slurm.run("submit_sweep.sh", comparison, "--null_arm", "stories", timeout=120, fake_launcher=True)
    assert code == 0, output
    prepare, array, report = slurm.calls("sbatch")
    sweep = f"python run_sweep.py {comparison} --null_arm stories"
    assert prepare[:2] == ["--parsable", "--kill-on-invalid-dep=yes"] and prepare[-2:] == ["--wrap", f"{sweep} --prepare_only"]
    # 3 datasets (stories and its two halves) x 3 seeds; the ids without sbatch's ";cluster".
    assert array == ["--parsable", "--kill-on-invalid-dep=yes", "--dependency=afterok:101", "--array=0-8",
                     "configs/slurm/sweep_array.sbatch", str(comparison), "--null_arm", "stories"]
    assert "--dependency=afterok:102" in report and report[-2:] == ["--wrap", f"{sweep} --report_only"]
    assert output.split() == ["prepare:", "101", "array:", "102", "(tasks", "0-8,", "one", "per", "run)", "report:", "103"]


# --------------------------------------------------------------------------------------------- real training


def long_run(out, steps=300):
    """Steps enough to be signalled in the middle, evaluated and saved only at the end (the CLM_TINY model)."""
    return ["--train_files", shared("tinyshakespeare/input.txt"), "--output_dir", out, "--max_steps", steps, "--eval_steps", 10_000,
            "--save_steps", 10_000, *CLM_TINY]


@pytest.mark.e2e
def test_one_gpu_a_warning_stops_and_requeues_once_the_requeued_job_resumes_and_the_cap_holds(slurm, tmp_path):
    out = tmp_path / "run"
    # The time-limit warning, to the batch shell alone (B:), once the run has made a step.
    job = slurm.start("single_node.sbatch", *long_run(out))
    wait_for(lambda: status(out) == "running", job, "a first step")
    os.kill(job.pid, signal.SIGUSR1)
    code, output = slurm.finish(job)
    info = json.loads((out / "run_info.json").read_text())
    assert code == 0 and info["status"] == "stopped" and slurm.requeued() == [JOB_ID], output
    first_stop = info["step"]
    assert 0 < first_stop < 300 and (out / f"checkpoint-{first_stop}" / "trainer_state.json").is_file()
    assert "python run_clm.py" in output and not slurm.calls("accelerate")  # one GPU: no launcher

    # The requeued job (same command, SLURM_RESTART_COUNT=1), warned again with the cap reached: no requeue.
    job = slurm.start("single_node.sbatch", *long_run(out), SLURM_RESTART_COUNT="1", MAX_REQUEUES="1")
    wait_for(lambda: status(out) == "running", job, "a first resumed step")
    os.kill(job.pid, signal.SIGUSR1)
    code, output = slurm.finish(job)
    info = json.loads((out / "run_info.json").read_text())
    assert info["status"] == "stopped" and info["step"] > first_stop, output
    assert code == 1 and slurm.requeued() == [JOB_ID] and "not requeuing: SLURM_RESTART_COUNT=1 has reached MAX_REQUEUES=1" in output

    # Submitted again, with no warning: it resumes, finishes, and a finished run is never requeued.
    code, output = slurm.run("single_node.sbatch", *long_run(out), SLURM_RESTART_COUNT="1")
    info = json.loads((out / "run_info.json").read_text())
    assert code == 0 and info["status"] == "finished" and info["step"] == 300, output
    assert info["resumed_from"] == str(out / f"checkpoint-{info['attempts'][-1]['step']}")
    assert [a["status"] for a in info["attempts"]] == ["stopped", "stopped"] and slurm.requeued() == [JOB_ID]


@pytest.mark.e2e
def test_a_run_that_fails_is_never_requeued(slurm, tmp_path):
    out = tmp_path / "run"
    code, output = slurm.run("single_node.sbatch", *clm_args(out, 3, "--no_such_flag", "1"))
    assert code == 2 and "error:" in output and "Traceback" not in output and slurm.requeued() == [], output
    assert not out.exists()


@pytest.mark.e2e
def test_two_nodes_meet_at_a_c10d_rendezvous_and_train_one_run(slurm, tmp_path):
    out = tmp_path / "run"
    code, output = slurm.run("multi_node.sbatch", *clm_args(out, 4), SLURM_NNODES="2", MAIN_PROCESS_PORT=str(free_port()),
                             LAUNCH_ARGS="--mixed_precision no", FAKE_SRUN_WAIT_FOR_HEAD="1")
    assert code == 0, output[-5000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["status"] == "finished" and info["step"] == 4
    assert info["budget"]["tokens_per_step"] == 2 * 4 * 64  # 2 processes x batch 4 x block 64
    assert slurm.requeued() == [] and len(slurm.calls("srun")) == 1


def tiny_comparison(tmp_path: Path, seeds=(0,), steps: int = 200) -> Path:
    """A comparison of one dataset and one seed (by default) on a model of a few thousand parameters."""
    comparison = tmp_path / "tiny.yaml"
    comparison.write_text(f"""
comparison: tiny
output_dir: {tmp_path / 'sweep'}
seeds: {list(seeds)}
shared_tokenizer: 300
run:
  config_overrides: n_embd=16,n_layer=1,n_head=2,n_positions=32
  block_size: 32
  per_device_train_batch_size: 4
  max_steps: {steps}
  eval_steps: 10000
  save_steps: 10000
  logging_steps: 50
  max_eval_samples: 4
  disable_tqdm: true
datasets:
  stories: {{train_files: [{shared('tinystories/tinystories_v1_valid_sample.txt')}]}}
""")
    return comparison


@pytest.mark.e2e
def test_an_array_task_trains_its_run_and_a_warning_requeues_that_task_alone(slurm, tmp_path, capsys):
    comparison = tiny_comparison(tmp_path)
    out = tmp_path / "sweep" / "runs" / "stories-seed0"
    sweep = load_script("run_sweep.py").main

    def status_flag(task: int) -> str:
        assert sweep([str(comparison), "--status", str(task)]) == 0
        return capsys.readouterr().out.strip()

    assert status_flag(0) == "none"
    with pytest.raises(SystemExit) as refused:
        sweep([str(comparison), "--status", "1"])
    assert refused.value.code == 2 and "--status 1: the comparison has runs 0 to 0" in capsys.readouterr().err

    array = {"SLURM_ARRAY_JOB_ID": "777", "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "778"}
    job = slurm.start("sweep_array.sbatch", comparison, **array)
    wait_for(lambda: status(out) == "running", job, "the run's first step")
    os.kill(job.pid, signal.SIGUSR1)
    code, output = slurm.finish(job)
    assert code == 0 and status_flag(0) == "stopped" and slurm.requeued() == ["777_0"], output

    code, output = slurm.run("sweep_array.sbatch", comparison, SLURM_RESTART_COUNT="1", **array)
    assert code == 0 and status_flag(0) == "finished" and slurm.requeued() == ["777_0"], output
    info = json.loads((out / "run_info.json").read_text())
    assert info["step"] == 200 and [a["status"] for a in info["attempts"]] == ["stopped"]
