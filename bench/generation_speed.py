#!/usr/bin/env python
"""Generation speed with and without the KV cache, side by side, as JSON.

    python bench/generation_speed.py                                  # a random GPT-2 of the default shape
    python bench/generation_speed.py --checkpoint runs/quickstart --new_tokens 200

Greedy decoding, so both settings produce the same tokens and only the time differs. With the cache each
new token costs one position of attention; without it the whole sequence is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from clmlab.checkpoints import load_for_inference  # noqa: E402


@torch.no_grad()
def tokens_per_second(model, prompt_ids: torch.Tensor, new_tokens: int, use_cache: bool, repeats: int) -> tuple[float, list[int]]:
    model.generate(prompt_ids, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        out = model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, pad_token_id=0)
        best = min(best, time.perf_counter() - started)
    return new_tokens / best, out[0, prompt_ids.shape[1]:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="A checkpoint folder; default: a random GPT-2 of --shape.")
    parser.add_argument("--shape", default="n_embd=128,n_layer=4,n_head=4,n_positions=512,vocab_size=4096")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", choices=["int8"])
    args = parser.parse_args()
    if args.checkpoint:
        model, _, _ = load_for_inference(args.checkpoint, "cpu", "float32", args.quantize)
        described = args.checkpoint
    else:
        config = GPT2Config()
        config.update_from_string(args.shape)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
        described = f"random GPT-2 {args.shape}"
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    results = {}
    for use_cache in (True, False):
        speed, tokens = tokens_per_second(model, prompt, args.new_tokens, use_cache, args.repeats)
        results["kv_cache" if use_cache else "no_cache"] = {"tokens_per_second": round(speed, 1), "tokens": tokens}
    same = results["kv_cache"].pop("tokens") == results["no_cache"].pop("tokens")
    print(json.dumps({"model": described, "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "same_tokens": same, **results,
                      "speedup": round(results["kv_cache"]["tokens_per_second"] / results["no_cache"]["tokens_per_second"], 2)},
                     indent=2))


if __name__ == "__main__":
    main()
