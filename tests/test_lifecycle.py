"""The training lifecycle both scripts share (clmlab.run.TrainingRun): finished, stopped or failed, and a
failure before the first step leaves the output directory as it was."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import pytest

from conftest import REPO, logged, shared, stop_at_step

pytestmark = pytest.mark.e2e

CLM_TINY = ["--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=64", "--block_size", "64",
            "--per_device_train_batch_size", "4", "--tokenizer_vocab_size", "512", "--learning_rate", "3e-3",
            "--disable_tqdm", "true", "--seed", "3", "--max_eval_samples", "4", "--logging_steps", "1"]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a script's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def clm_args(out, max_steps=6, *extra):
    return ["--train_files", str(shared("tinyshakespeare/input.txt")), "--output_dir", str(out), "--max_steps", str(max_steps),
            "--eval_steps", "4", "--save_steps", "100", *CLM_TINY, *map(str, extra)]


def sft_args(out, max_steps=6, *extra):
    return ["--model_name_or_path", str(shared("tiny_gpt2_random")), "--train_files", str(shared("instruct/instruction-data.json")),
            "--output_dir", str(out), "--max_steps", str(max_steps), "--max_length", "64", "--max_eval_samples", "8",
            "--eval_steps", "4", "--save_steps", "100", "--num_samples", "1", "--sample_max_new_tokens", "4",
            "--logging_steps", "1", "--disable_tqdm", "true", *map(str, extra)]


SCRIPTS = {"run_clm.py": clm_args, "run_sft.py": sft_args}


def info(out) -> dict:
    return json.loads((out / "run_info.json").read_text())


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else None


@pytest.fixture
def stop_at_step_3(monkeypatch):
    """A stop requested during step 3, as a preemption handler would request it."""
    stop_at_step(monkeypatch, 3, "test: stop requested at step 3")
    return monkeypatch


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_stopped_run_keeps_a_checkpoint_and_the_same_command_finishes_it(tmp_path, stop_at_step_3, script):
    out, whole = tmp_path / "stopped", tmp_path / "whole"
    main = load_script(script).main
    assert main(SCRIPTS[script](out)) == {}
    record = info(out)
    assert record["status"] == "stopped" and record["step"] == 3
    assert record["stopped"] == {"step": 3, "max_steps": 6, "reason": "test: stop requested at step 3", "signal": None,
                                 "checkpoint": str(out / "checkpoint-3")}
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and (out / "checkpoint-3" / "optimizer.pt").is_file()
    assert not (out / "model.safetensors").exists() and "final_metrics" not in record  # no final model, no final evaluation
    assert not (out / "trainer_state.json").exists()
    if script == "run_sft.py":
        assert all(s["after"] is None for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines()))

    stop_at_step_3.undo()
    metrics = main(SCRIPTS[script](out))  # the same command again
    record = info(out)
    assert record["status"] == "finished" and record["step"] == 6 and record["resumed_from"] == str(out / "checkpoint-3")
    assert [a["status"] for a in record["attempts"]] == ["stopped"] and record["attempts"][0]["step"] == 3
    assert (out / "model.safetensors").is_file() and metrics["eval_loss"] == record["final_metrics"]["eval_loss"]
    main(SCRIPTS[script](whole))
    assert logged(out, "loss") == logged(whole, "loss")  # nothing lost, nothing repeated


class SimulatedOutOfMemory(RuntimeError):
    pass


def fail_at_training_step(monkeypatch, call: int):
    from transformers import Trainer

    original, calls = Trainer.training_step, []

    def training_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise SimulatedOutOfMemory("CUDA out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", training_step)


@pytest.mark.parametrize("before", ["absent", "empty", "a previous run"])
def test_a_failure_before_the_first_step_leaves_the_output_directory_as_it_was(tmp_path, monkeypatch, before):
    out = tmp_path / "out"
    main = load_script("run_clm.py").main
    if before == "empty":
        out.mkdir()
    elif before == "a previous run":
        main(clm_args(out, 2))
    was = snapshot(out)
    fail_at_training_step(monkeypatch, call=1)
    with pytest.raises(SimulatedOutOfMemory):  # a real failure keeps its traceback
        main(clm_args(out, 5, "--overwrite_output_dir", "true"))  # replacing the previous run, if any
    assert snapshot(out) == was


def test_a_failure_after_the_first_step_is_recorded_and_the_run_resumes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    main = load_script("run_clm.py").main
    fail_at_training_step(monkeypatch, call=4)
    with pytest.raises(SimulatedOutOfMemory):
        main(clm_args(out, 6, "--save_steps", 2))
    record = info(out)
    assert record["status"] == "failed" and record["step"] == 3
    assert record["error"] == "SimulatedOutOfMemory: CUDA out of memory (simulated)"
    monkeypatch.undo()
    main(clm_args(out, 6, "--save_steps", 2))
    record = info(out)
    assert record["status"] == "finished" and record["resumed_from"] == str(out / "checkpoint-2")
    assert record["attempts"][0]["status"] == "failed"


def test_the_memory_estimate_warns_before_the_first_step(tmp_path, monkeypatch, caplog):
    from clmlab import modeling

    monkeypatch.setattr(modeling, "free_memory", lambda device: 1 << 20)  # a device with 1 MiB free
    with caplog.at_level(logging.WARNING, logger="clmlab.run"):
        load_script("run_clm.py").main(clm_args(tmp_path / "out", 1, "--eval_on_start", "false"))
    warnings = [r.getMessage() for r in caplog.records if "may run out of memory" in r.getMessage()]
    assert len(warnings) == 1
    assert "--per_device_train_batch_size" in warnings[0] and "--block_size" in warnings[0] and "cpu has 1.0 MiB free" in warnings[0]


def test_a_vocabulary_padded_beyond_the_tokenizer_is_honoured_and_recorded(tmp_path):
    out = tmp_path / "padded"
    load_script("run_clm.py").main(
        ["--train_files", str(shared("tinyshakespeare/input.txt")), "--tokenizer_name", str(shared("tiny_gpt2_random")),
         "--output_dir", str(out), "--max_steps", "1", "--eval_on_start", "false", *CLM_TINY,
         "--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=64,vocab_size=50304"])
    record = info(out)
    assert record["model"]["config"]["vocab_size"] == 50304 and record["model"]["tokenizer_tokens"] == 50257
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50304


def test_a_callback_that_ends_training_early_still_leaves_a_resumable_checkpoint(tmp_path, monkeypatch):
    """Not only a stop request: any callback that ends training before max_steps (without asking for a save)."""
    from callbacks import ThroughputCallback

    original = ThroughputCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            control.should_training_stop = True
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(ThroughputCallback, "on_step_end", on_step_end)
    out = tmp_path / "out"
    main = load_script("run_clm.py").main
    main(clm_args(out, 5))
    record = info(out)
    assert record["status"] == "stopped" and record["stopped"]["reason"] == "a callback ended training early"
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    main(clm_args(out, 5))
    assert info(out)["status"] == "finished" and sorted(logged(out, "loss")) == [1, 2, 3, 4, 5]


def test_a_run_stopped_after_saving_its_last_step_only_finishes_on_resume(tmp_path, monkeypatch):
    """Saved at its last step, then failed in the final evaluation: the same command saves and evaluates,
    and trains no step more than --max_steps."""
    from clmlab import run

    out = tmp_path / "out"
    main = load_script("run_clm.py").main

    def broken(trainer):
        raise SimulatedOutOfMemory("out of memory in the final evaluation (simulated)")

    monkeypatch.setattr(run, "final_evaluation", broken)
    with pytest.raises(SimulatedOutOfMemory):
        main(clm_args(out, 4, "--save_steps", 2, "--eval_steps", 3))
    assert info(out)["status"] == "failed" and (out / "checkpoint-4").is_dir()
    monkeypatch.undo()
    main(clm_args(out, 4, "--save_steps", 2, "--eval_steps", 3))
    record = info(out)
    assert record["status"] == "finished" and record["step"] == 4 and record["tokens_seen"] == 4 * 4 * 64
    assert sorted(logged(out, "loss")) == [1, 2, 3, 4] and (out / "model.safetensors").is_file()


def test_the_same_command_resumes_from_the_runs_own_newest_checkpoint(tmp_path, stop_at_step_3):
    """A run started from another run's checkpoint, then stopped: re-running the command must not go back to
    the checkpoint it started from."""
    first, second = tmp_path / "first", tmp_path / "second"
    main = load_script("run_clm.py").main
    stop_at_step_3.undo()
    main(clm_args(first, 2, "--save_steps", 1))
    command = clm_args(second, 6, "--resume_from_checkpoint", str(first / "checkpoint-2"))
    stop_at_step(stop_at_step_3, 4)
    main(command)
    assert info(second)["status"] == "stopped" and info(second)["resumed_from"] == str(first / "checkpoint-2")
    stop_at_step_3.undo()
    main(command)
    assert info(second)["status"] == "finished" and info(second)["resumed_from"] == str(second / "checkpoint-4")


def test_a_signal_stops_the_run_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    """SIGUSR1, as a scheduler sends before a time limit, arriving during step 2."""
    import os
    import signal

    from callbacks import ThroughputCallback

    original = ThroughputCallback.on_step_begin

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(ThroughputCallback, "on_step_begin", on_step_begin)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGUSR1)
    load_script("run_clm.py").main(clm_args(out, 5))
    record = info(out)
    assert record["status"] == "stopped" and record["stopped"]["step"] == 2 and record["stopped"]["reason"] == "SIGUSR1 received"
    assert record["stopped"]["signal"] == "SIGUSR1"
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    assert not (out / "model.safetensors").exists() and "final_metrics" not in record  # no final save, no final evaluation
    assert signal.getsignal(signal.SIGUSR1) == before  # the handlers are the caller's again
    # The requeued job: the same command resumes, and trains what the uninterrupted run trains.
    monkeypatch.undo()
    load_script("run_clm.py").main(clm_args(out, 5))
    load_script("run_clm.py").main(clm_args(tmp_path / "whole", 5))
    assert info(out)["status"] == "finished" and info(out)["resumed_from"] == str(out / "checkpoint-2")
    assert logged(out, "loss") == logged(tmp_path / "whole", "loss") and len(logged(out, "loss")) == 5


SIGNAL_TO_RANK_1 = """
import os, runpy, signal, sys
from callbacks.throughput import ThroughputCallback
original = ThroughputCallback.on_step_begin
def on_step_begin(self, args, state, control, **kwargs):
    if state.global_step == 1 and args.process_index == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # a signal that reaches one process only
    return original(self, args, state, control, **kwargs)
ThroughputCallback.on_step_begin = on_step_begin
sys.argv = ["run_clm.py", *sys.argv[1:]]
runpy.run_path("{script}", run_name="__main__")
"""


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    from conftest import run_script

    wrapper = tmp_path / "signal_to_rank_1.py"
    wrapper.write_text(SIGNAL_TO_RANK_1.replace("{script}", str(REPO / "run_clm.py")))
    out = tmp_path / "ddp"
    run_script(str(wrapper), *clm_args(out, 5, "--eval_on_start", "false"), ranks=2)
    record = info(out)
    assert record["status"] == "stopped" and record["stopped"]["step"] == 2
    # Rank 0 writes the record: it learnt of the signal from the reduction.
    assert record["stopped"]["reason"] == "SIGUSR1 received by another process" and record["stopped"]["signal"] == "SIGUSR1"
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file() and not (out / "model.safetensors").exists()
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}


KILLED_IN_A_SAVE = """
import os, runpy, signal, sys
from transformers import Trainer
import callbacks.checkpoints
moment = sys.argv.pop(1)

def killed(original, step_of):
    def call(*args, **kwargs):
        if step_of(*args) == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # as a node lost or an out-of-memory kill: no handler runs
        return original(*args, **kwargs)
    return call

if moment == "model_written":  # the model is saved, the optimizer, RNG and trainer state are not
    Trainer._save_optimizer_and_scheduler = killed(Trainer._save_optimizer_and_scheduler, lambda self, out: self.state.global_step)
else:  # the Trainer has written everything, trainer_state.json last; the marker is not written yet
    callbacks.checkpoints.mark_complete = killed(callbacks.checkpoints.mark_complete, lambda path, step, world: step)
sys.argv = ["run_clm.py", *sys.argv[1:]]
runpy.run_path("{script}", run_name="__main__")
"""


@pytest.mark.parametrize("moment", ["model_written", "trainer_state_written"])
def test_a_process_killed_inside_a_save_leaves_no_checkpoint_resume_would_take(tmp_path, moment):
    from conftest import run_script

    wrapper = tmp_path / "killed_in_a_save.py"
    wrapper.write_text(KILLED_IN_A_SAVE.replace("{script}", str(REPO / "run_clm.py")))
    out = tmp_path / "killed"
    command = clm_args(out, 6, "--save_steps", 2, "--save_total_limit", 1, "--eval_on_start", "false")
    assert run_script(str(wrapper), moment, *command, check=False).returncode == -9
    assert info(out)["status"] == "running"  # killed: no handler recorded anything
    assert not (out / "checkpoint-4" / "checkpoint_complete.json").exists()
    # Rotation deleted nothing before every process had saved: checkpoint-2 is still whole.
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    from clmlab.checkpoints import last_complete_checkpoint

    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    run_script("run_clm.py", *command)  # the same command again, as a requeued job runs it
    record = info(out)
    assert record["status"] == "finished" and record["resumed_from"] == str(out / "checkpoint-2")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]  # --save_total_limit 1, after the marker
    run_script("run_clm.py", *clm_args(tmp_path / "whole", 6, "--save_steps", 2, "--eval_on_start", "false"))
    assert logged(out, "loss") == logged(tmp_path / "whole", "loss")
