#!/usr/bin/env python
"""CPU training speed of the fast-path settings (torch.compile, bf16 autocast, attention kernel, dataloader
workers) on GPT-2 shapes, through the Trainer as run_clm.py builds it, as JSON: which of them to turn on by
default on a machine with no GPU.

    python bench/cpu_fast_path.py                                  # both shapes, every setting
    python bench/cpu_fast_path.py --shapes small --settings baseline bf16_autocast --steps 40

Each setting of each shape trains in a process of its own (compiled code, autocast and thread pools do not
carry over), on random tokens: speed depends on shapes, not on what the tokens say. The first --warmup steps
(torch.compile's compilation among them) are not timed; compile_seconds says how long they took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": {"overrides": "n_embd=64,n_layer=2,n_head=2", "block_size": 128, "batch": 8},
    "small": {"overrides": "n_embd=128,n_layer=4,n_head=4", "block_size": 128, "batch": 8},
}
# TrainingArguments (and the attention kernel) of each setting, on top of run_clm.py's defaults.
SETTINGS = {
    "baseline": {},  # float32, SDPA attention, no compile, no dataloader workers: clmlab's CPU defaults
    "eager_attention": {"attn_implementation": "eager"},
    "bf16_autocast": {"bf16": True},
    "compile_inductor": {"torch_compile": True, "torch_compile_backend": "inductor"},
    "compile_inductor_bf16": {"torch_compile": True, "torch_compile_backend": "inductor", "bf16": True},
    "compile_aot_eager": {"torch_compile": True, "torch_compile_backend": "aot_eager"},
    "dataloader_workers_2": {"dataloader_num_workers": 2},
}


def measure(shape: str, setting: str, steps: int, warmup: int, vocab: int) -> dict:
    """One training run of `steps` steps; the steps after `warmup` are timed."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("WANDB_MODE", "disabled")
    import numpy as np
    import torch
    from transformers import AutoConfig, Trainer, TrainerCallback, default_data_collator

    from clmlab.args import ClmTrainingArguments
    from clmlab.data import PackedBlocks
    from clmlab.modeling import apply_config_overrides, init_model, parameter_count

    spec, options = SHAPES[shape], dict(SETTINGS[setting])
    attn = options.pop("attn_implementation", "sdpa")
    if options.get("bf16") and not torch.cuda.is_available():
        options["use_cpu"] = True  # TrainingArguments takes --bf16 on a machine with no GPU only with use_cpu (CPU autocast)
    config = AutoConfig.for_model("gpt2")
    apply_config_overrides(config, f"{spec['overrides']},n_positions={spec['block_size']},vocab_size={vocab}")
    model = init_model(config, None, 0, attn)
    tokens = np.random.default_rng(0).integers(0, vocab, size=(steps + 1) * spec["batch"] * spec["block_size"])
    clock: dict = {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                clock["start"] = time.perf_counter()
            clock["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = ClmTrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=spec["batch"], eval_strategy="no",
                                    eval_on_start=False, save_strategy="no", logging_steps=steps, disable_tqdm=True, report_to="none",
                                    warmup_steps=0, **options)
        trainer = Trainer(model=model, args=args, train_dataset=PackedBlocks(tokens, spec["block_size"]),
                          data_collator=default_data_collator, callbacks=[StepClock()])
        trainer.train()
    timed = steps - warmup
    seconds = clock["end"] - clock["start"]
    return {"shape": shape, "setting": setting, "parameters": parameter_count(model), "block_size": spec["block_size"],
            "batch": spec["batch"], "vocab_size": vocab, "timed_steps": timed,
            "tokens_per_second": round(timed * spec["batch"] * spec["block_size"] / seconds, 1),
            "warmup_seconds": round(clock["start"] - clock["begin"], 2),
            "final_loss": round(next(e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), 4), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=40, help="Steps per run, the warmup included.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--vocab_size", type=int, default=4096, help="The quickstart's BPE size.")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds of runs of every setting; the fastest of each is kept.")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "SETTING"), help=argparse.SUPPRESS)  # a child process's run
    args = parser.parse_args()
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup, which must be 1 or more")
    if args.one:
        print(json.dumps(measure(*args.one, args.steps, args.warmup, args.vocab_size)))
        return
    import platform

    import torch

    # Round after round of every setting, the fastest run of each kept: a machine shared with other work slows
    # some runs down (two busy processes on two cores slow torch's threads several times), none speeds one up.
    runs: dict = {(shape, setting): [] for shape in args.shapes for setting in args.settings}
    for _ in range(args.repeats):
        for (shape, setting), done_runs in runs.items():
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, "--one", shape, setting, "--steps", str(args.steps), "--warmup",
                                   str(args.warmup), "--vocab_size", str(args.vocab_size)], capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                done_runs.append({"shape": shape, "setting": setting, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            done_runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "load_average_before": round(load, 2)})
            print(json.dumps(done_runs[-1]), file=sys.stderr, flush=True)  # progress: a full run takes minutes
    results = []
    for (shape, setting), done_runs in runs.items():
        best = max(done_runs, key=lambda r: r.get("tokens_per_second", 0))
        best["tokens_per_second_runs"] = [r.get("tokens_per_second") for r in done_runs]
        baseline = max((r.get("tokens_per_second", 0) for r in runs.get((shape, "baseline"), [])), default=0)
        if baseline and "tokens_per_second" in best:
            best["speedup_vs_baseline"] = round(best["tokens_per_second"] / baseline, 3)
        results.append(best)
    print(json.dumps({"device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                      "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup, "results": results}, indent=2))


if __name__ == "__main__":
    main()
