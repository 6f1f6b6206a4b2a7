from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Before datasets or transformers are imported anywhere: no Hub, no wandb, and a datasets cache of the
# test session's own so one test run's cache never answers for another's.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="clmlab-test-datasets-")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


def shared(relative: str) -> Path:
    """A file of the shared data pack, or skip the test saying what is missing."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data file {path} is absent (the data pack lives beside the repository in ../shared/data)")
    return path


@pytest.fixture
def shakespeare() -> Path:
    return shared("tinyshakespeare/input.txt")


@pytest.fixture
def tinystories() -> Path:
    return shared("tinystories/tinystories_v1_valid_sample.txt")


@pytest.fixture
def tiny_gpt2() -> Path:
    return shared("tiny_gpt2_random")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared("tiny_gpt2_random"))


def run_script(script: str, *args, ranks: int = 1, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """One of the project's scripts in a fresh process, as a user runs it; with `ranks` > 1, under torchrun
    (DDP over gloo on a CPU machine). `env` adds to or overrides the environment."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(env or {})}
    launcher = [sys.executable]
    if ranks > 1:
        env["OMP_NUM_THREADS"] = "1"
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    done = subprocess.run([*launcher, str(REPO / script), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def logged(output_dir: Path, key: str) -> dict[int, float]:
    """A value the Trainer logged (loss, eval_loss, ...) by step, from a run's trainer_state.json."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {e["step"]: e[key] for e in state["log_history"] if key in e}


def stop_at_step(monkeypatch, step: int, reason: str = "test: stop requested") -> None:
    """Have every run's stop request made during `step`, as a preemption handler would make it."""
    from callbacks.preemption import PreemptionCallback

    original = PreemptionCallback.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == step:
            self.request(reason)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(PreemptionCallback, "on_step_end", on_step_end)
