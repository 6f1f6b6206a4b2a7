#!/usr/bin/env python
"""The training-memory estimate run_clm.py warns with (clmlab.modeling.training_memory) against the
measured peak of real training steps, side by side, as JSON.

    python bench/memory_estimate.py
    python bench/memory_estimate.py --shapes "n_embd=256,n_layer=4,n_head=4,vocab_size=4096 batch=8 block=256"

Each shape runs in a process of its own (AdamW, forward, backward, step, twice), so one shape's peak never
counts for another. On CPU the peak is the process's peak resident memory above what it held once the model
was built; on CUDA, torch's peak allocated bytes. The estimate leaves out the weights the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = [
    "n_embd=256,n_layer=4,n_head=4,vocab_size=4096 batch=8 block=256",
    "n_embd=128,n_layer=8,n_head=4,vocab_size=50257 batch=4 block=512",
    "n_embd=512,n_layer=2,n_head=8,vocab_size=8192 batch=16 block=128",
    "n_embd=64,n_layer=2,n_head=4,vocab_size=4096 batch=4 block=1024",
]

MEASURE = r"""
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from transformers import GPT2Config, GPT2LMHeadModel
from clmlab.modeling import apply_config_overrides, parameter_count, training_memory
overrides, batch, block, device = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), torch.device(sys.argv[5])
config = GPT2Config(n_positions=block)
apply_config_overrides(config, overrides)
config.bos_token_id = config.eos_token_id = config.vocab_size - 1
model = GPT2LMHeadModel(config).to(device)
def resident(): return int(open("/proc/self/statm").read().split()[1]) * 4096
before = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident()
optimizer = torch.optim.AdamW(model.parameters())
tokens = torch.randint(0, config.vocab_size, (batch, block), device=device)
for _ in range(2):
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
params = parameter_count(model)
estimate = training_memory(config, batch, block, params, params, attention_scores=device.type != "cuda")
print(json.dumps({"measured_bytes": peak - before, "estimated_bytes": estimate.total - 4 * params,
                  "estimate": {"activations": estimate.activations, "logits": estimate.logits,
                               "gradients_and_adamw": estimate.weights_gradients_optimizer - 4 * params}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help='"config overrides batch=B block=T" per shape')
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args()
    results = []
    for shape in args.shapes:
        overrides, *rest = shape.split()
        sizes = dict(item.split("=") for item in rest)
        done = subprocess.run([sys.executable, "-c", MEASURE, str(REPO), overrides, sizes["batch"], sizes["block"], args.device],
                              capture_output=True, text=True, check=True)
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        figures["estimate_over_measured"] = round(figures["estimated_bytes"] / figures["measured_bytes"], 2)
        results.append({"shape": shape, "device": args.device, **figures})
    print(json.dumps(results, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
