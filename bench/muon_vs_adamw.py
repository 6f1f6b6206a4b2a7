#!/usr/bin/env python
"""Validation loss against training tokens, AdamW against Muon (--matrix_optimizer muon), on the same small GPT-2,
the same data in the same order, from the same initial weights, for the same tokens; as JSON.

    python bench/muon_vs_adamw.py                                # the default: about 4.5 minutes on 2 CPU cores
    python bench/muon_vs_adamw.py --max_steps 1000 --adamw_lrs 1e-3 3e-3 --muon_lrs 3e-3 1e-2 3e-2
    python bench/muon_vs_adamw.py --muon_lr_adjustment original --muon_lrs 0.01 0.02 0.05

Each run is run_clm.py itself, in a process of its own (what a user runs, nothing reimplemented); the corpus is
prepared once and read by every run. Each optimizer gets a few learning rates: one rate each would compare a
tuned optimizer against an untuned one. The learning rates are peak rates on run_clm.py's schedule (cosine,
5% warmup); AdamW's --learning_rate also trains the embeddings, biases and norms in the Muon runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def train(name: str, flags: list[str], common: list[str], out: Path) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(REPO / "run_clm.py"), *common, "--output_dir", str(out / name), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: run {name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    info = json.loads((out / name / "run_info.json").read_text())
    state = json.loads((out / name / "trainer_state.json").read_text())
    per_step = info["budget"]["tokens_per_step"]
    curve = [[e["step"] * per_step, round(e["eval_loss"], 4)] for e in state["log_history"] if "eval_loss" in e]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    return {"name": name, "flags": " ".join(flags), "optimizer": info["optimizer"], "eval_loss_by_tokens": curve,
            "final_eval_loss": round(info["final_metrics"]["eval_loss"], 4), "best_eval_loss": min(loss for _, loss in curve),
            "last_train_loss": losses[-1] if losses else None, "wall_seconds": round(seconds, 1)}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in results:
        tokens, losses = zip(*run["eval_loss_by_tokens"])
        axes.plot(tokens, losses, marker="o", linestyle="-" if run["name"].startswith("muon") else "--", label=run["name"])
    axes.set(xlabel="training tokens", ylabel="validation loss", title=title)
    # Every run starts from the same weights and loss: the axis is for where they part, from the second evaluation on.
    later = [loss for run in results for _, loss in run["eval_loss_by_tokens"][1:]]
    if later:
        axes.set_ylim(min(later) - 0.1, max(later) + 0.2)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"plot: {path}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file", type=Path, default=DATA, help="Text to train on (default: tinyshakespeare).")
    parser.add_argument("--shape", default="n_embd=128,n_layer=4,n_head=4", help="GPT-2 shape (--config_overrides).")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="Sequences per step.")
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--eval_steps", type=int, default=50)
    parser.add_argument("--max_eval_samples", type=int, default=64, help="Validation blocks each evaluation scores.")
    parser.add_argument("--vocab", type=int, default=4096, help="Size of the BPE tokenizer trained on the text.")
    # The defaults bracket each optimizer's best rate in a wider sweep at the default shape (see the README).
    parser.add_argument("--adamw_lrs", type=float, nargs="*", default=[1e-3, 3e-3], help="AdamW runs' --learning_rate (none: no AdamW run).")
    parser.add_argument("--muon_lrs", type=float, nargs="*", default=[3e-3, 1e-2], help="Muon runs' --muon_learning_rate (none: no Muon run).")
    parser.add_argument("--muon_lr_adjustment", default="match_rms_adamw", choices=["match_rms_adamw", "original"])
    parser.add_argument("--adamw_lr_with_muon", type=float, default=3e-3,
                        help="--learning_rate in the Muon runs: AdamW's, for the embeddings, biases and norms.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="Keep the run folders here (default: a temporary folder, removed).")
    parser.add_argument("--plot", type=Path, help="Also draw validation loss against tokens, a line per run, into this PNG.")
    a = parser.parse_args()
    if not (a.adamw_lrs or a.muon_lrs):
        raise SystemExit("error: nothing to run: give --adamw_lrs or --muon_lrs at least one learning rate")
    if not a.train_file.is_file():
        raise SystemExit(f"error: --train_file {a.train_file} does not exist (the data pack lives beside the repository in ../shared/data)")

    with tempfile.TemporaryDirectory(prefix="muon-vs-adamw-") as scratch:
        out = a.keep or Path(scratch)
        common = ["--train_files", str(a.train_file), "--prepare_to", str(out / "prepared"),
                  "--config_overrides", f"{a.shape},n_positions={a.block_size}", "--block_size", str(a.block_size),
                  "--tokenizer_vocab_size", str(a.vocab), "--per_device_train_batch_size", str(a.batch),
                  "--max_steps", str(a.max_steps), "--eval_steps", str(a.eval_steps), "--max_eval_samples", str(a.max_eval_samples),
                  "--logging_steps", str(a.eval_steps), "--save_steps", str(10 * a.max_steps), "--seed", str(a.seed),
                  "--disable_tqdm", "true", "--report_to", "none"]
        runs = [(f"adamw_lr{lr:g}", ["--learning_rate", str(lr)]) for lr in a.adamw_lrs]
        runs += [(f"muon_lr{lr:g}", ["--matrix_optimizer", "muon", "--muon_learning_rate", str(lr), "--muon_lr_adjustment",
                                     a.muon_lr_adjustment, "--learning_rate", str(a.adamw_lr_with_muon)]) for lr in a.muon_lrs]
        results = []
        for name, flags in runs:
            results.append(train(name, flags, common, out))
            print(f"{name}: final eval loss {results[-1]['final_eval_loss']} in {results[-1]['wall_seconds']} s", file=sys.stderr)

    best = {kind: min((r for r in results if r["name"].startswith(kind)), key=lambda r: r["final_eval_loss"], default=None)
            for kind in ("adamw", "muon")}
    summary = {kind: {"run": r["name"], "final_eval_loss": r["final_eval_loss"]} for kind, r in best.items() if r}
    if best["adamw"] and best["muon"]:
        # Read off the evaluations, so only as fine as --eval_steps.
        reached = [tokens for tokens, loss in best["muon"]["eval_loss_by_tokens"] if loss <= best["adamw"]["final_eval_loss"]]
        summary["muon_tokens_to_adamw_final_loss"] = reached[0] if reached else None
    tokens = a.max_steps * a.batch * a.block_size
    if a.plot:
        plot(results, a.plot, f"GPT-2 {a.shape}, block {a.block_size}, {a.train_file.name}")
    print(json.dumps({"benchmark": "muon_vs_adamw", "machine": machine(), "command": " ".join(["python", "bench/muon_vs_adamw.py", *sys.argv[1:]]),
                      "model": {"shape": a.shape, "block_size": a.block_size, "vocab": a.vocab},
                      "data": f"{a.train_file.parent.name}/{a.train_file.name}", "batch": a.batch, "max_steps": a.max_steps, "train_tokens": tokens,
                      "best": summary, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
