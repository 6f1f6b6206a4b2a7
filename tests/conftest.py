from __future__ import annotations

import os
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
