#!/usr/bin/env python
"""Training speed of GPT-2 shapes under the clmlab Trainer setup, side by side, as JSON.

    python bench/train_speed.py                               # the default shapes on this machine's device
    python bench/train_speed.py --shapes n_embd=256,n_layer=6,n_head=8 --steps 50

Random tokens stand in for data: speed depends on shapes, not on what the tokens say. The first
--warmup steps (allocation, kernel selection) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, default_data_collator  # noqa: E402

from clmlab.args import ClmTrainingArguments  # noqa: E402
from clmlab.data import PackedBlocks  # noqa: E402
from clmlab.modeling import apply_config_overrides, parameter_count  # noqa: E402


class StepClock(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def measure(shape: str, block_size: int, batch: int, vocab: int, steps: int, warmup: int) -> dict:
    config = AutoConfig.for_model("gpt2")
    apply_config_overrides(config, f"{shape},n_positions={block_size},vocab_size={vocab}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tokens = np.random.default_rng(0).integers(0, vocab, size=(steps + 1) * batch * block_size)
    with tempfile.TemporaryDirectory() as out:
        args = ClmTrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, eval_strategy="no",
                                    eval_on_start=False, save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                                    report_to="none")
        clock = StepClock(warmup)
        trainer = Trainer(model=model, args=args, train_dataset=PackedBlocks(tokens, block_size),
                          data_collator=default_data_collator, callbacks=[clock])
        trainer.train()
    seconds = clock.end - clock.start
    timed = steps - warmup
    return {
        "shape": shape, "parameters": parameter_count(model), "block_size": block_size, "batch": batch, "vocab_size": vocab,
        "timed_steps": timed, "steps_per_second": round(timed / seconds, 3),
        "tokens_per_second": round(timed * batch * block_size / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["n_embd=64,n_layer=2,n_head=2", "n_embd=128,n_layer=4,n_head=4"])
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    results = [measure(s, args.block_size, args.batch, args.vocab_size, args.steps, args.warmup) for s in args.shapes]
    print(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
