"""What N = 1 promises: N processes with per-device batch B train what one process trains with batch N x B, or
with B and accumulation N (dropout off), on each kind of data; and a launcher stopped from outside stops its
run in time, with a status the batch script can read. CPU, torchrun over gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, logged, run_script, shared

pytestmark = pytest.mark.e2e

NO_DROPOUT = "resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"
CLM = ["--config_overrides", f"n_embd=32,n_layer=2,n_head=2,n_positions=64,{NO_DROPOUT}", "--block_size", "64",
       "--tokenizer_vocab_size", "512", "--learning_rate", "1e-3", "--disable_tqdm", "true", "--seed", "3",
       "--max_eval_samples", "4", "--logging_steps", "1", "--eval_on_start", "false", "--eval_steps", "100",
       "--save_steps", "100", "--ddp_find_unused_parameters", "false"]
LAYOUTS = {  # (processes, per-device batch, accumulation): the same 4 sequences a step
    "2 x 2": (2, 2, 1),
    "1 x 4": (1, 4, 1),
    "1 x 2, accumulation 2": (1, 2, 2),
}


def losses_by_layout(tmp_path, script: str, args: list) -> dict[str, dict[int, float]]:
    found = {}
    for name, (ranks, batch, accumulation) in LAYOUTS.items():
        out = tmp_path / name.replace(" ", "").replace(",", "_")
        run_script(script, *args, "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation,
                   "--output_dir", out, ranks=ranks)
        found[name] = logged(out, "loss")
    return found


def assert_same_losses(found: dict[str, dict[int, float]], steps: int) -> dict[str, float]:
    """The largest per-step loss difference of each layout from 2 x 2; all within 1e-6. They are not all
    bit-identical: one process sums a step's gradient over its 4 sequences in one product, two processes sum
    two halves, and float32 addition is not associative (the first steps agree exactly, later ones by ulps)."""
    reference = found["2 x 2"]
    assert sorted(reference) == list(range(1, steps + 1))
    worst = {}
    for name, losses in found.items():
        assert sorted(losses) == sorted(reference), name
        worst[name] = max(abs(losses[s] - reference[s]) for s in reference)
    print("largest per-step loss difference from 2 x 2: " + ", ".join(f"{k}: {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) < 1e-6, found
    return worst


@pytest.mark.parametrize("kind", ["prepared", "streamed"])
def test_n_processes_train_what_one_process_trains(tmp_path, kind):
    args = ["--train_files", shared("tinyshakespeare/input.txt"), "--max_steps", 5, *CLM]
    if kind == "streamed":
        args += ["--streaming", "true", "--shuffle_buffer_size", 100]
    assert_same_losses(losses_by_layout(tmp_path, "run_clm.py", args), 5)


@pytest.fixture
def base_without_dropout(tmp_path):
    """The shared tiny GPT-2 with dropout off, so that ranks drawing their own masks cannot differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(shared("tiny_gpt2_random"), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(shared("tiny_gpt2_random")).save_pretrained(folder)
    return folder


def test_n_processes_tune_what_one_process_tunes_on_examples_held_in_memory(tmp_path, base_without_dropout):
    """Instruction examples of different lengths, padded per batch, shuffled: the same examples each step and
    the same loss, whatever the padding of each process's share."""
    args = ["--model_name_or_path", base_without_dropout, "--train_files", shared("instruct/instruction-data.json"),
            "--max_steps", 4, "--max_length", 64, "--max_eval_samples", 8, "--eval_steps", 100, "--save_steps", 100,
            "--num_samples", 0, "--logging_steps", 1, "--learning_rate", "1e-3", "--disable_tqdm", "true", "--seed", "5",
            "--ddp_find_unused_parameters", "false"]
    assert_same_losses(losses_by_layout(tmp_path, "run_sft.py", args), 4)


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"waited {seconds} s for {what}")


@pytest.mark.parametrize("sent", ["SIGTERM", "SIGUSR1"])
def test_a_signal_sent_to_torchrun_stops_the_run_in_time_and_records_it(tmp_path, sent):
    """As a scheduler signals the launcher: torchrun passes the signal to its workers (SIGUSR1 only when
    PET_SIGNALS_TO_HANDLE names it, as configs/slurm/ sets it), they agree on a step, save and record `stopped`."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "run_clm.py"),
         "--train_files", str(shared("tinyshakespeare/input.txt")), "--max_steps", "5000", *CLM, "--per_device_train_batch_size", "2",
         "--output_dir", str(out)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: (out / "run_info.json").is_file(), 120, "the first step")
        launcher.send_signal(getattr(signal, sent))
        launcher.wait(timeout=60)  # well inside torchrun's 30 s grace plus a step and a save
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    with pytest.raises(ProcessLookupError):  # no worker left running after its launcher
        os.killpg(launcher.pid, 0)
    record = json.loads((out / "run_info.json").read_text())
    assert record["status"] == "stopped", launcher.stderr.read()[-2000:]
    assert record["stopped"]["signal"] == sent and 1 <= record["step"] < 5000
    checkpoint = out / f"checkpoint-{record['step']}"
    assert (checkpoint / "checkpoint_complete.json").is_file()
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
