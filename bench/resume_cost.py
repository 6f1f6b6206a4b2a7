#!/usr/bin/env python
"""What resuming costs at step 10 and at step 100,000: the time from building the training dataloader to
its first batch after the skip, for the three data paths, side by side, as JSON.

    python bench/resume_cost.py
    python bench/resume_cost.py --steps 10 100000 --batch 64 --block 1024

- prepared: clmlab.prepared.PreparedBlocks starting at step x batch (what run_clm.py does for a prepared
  folder): nothing is read or done for the skipped steps;
- in-memory: a map-style dataset under the Trainer's random sampler, skipped as the Trainer skips it
  (accelerate's skip_first_batches walks the sampler's indices, loading none);
- streamed: clmlab.data.PackedStream over a tokenized document stream, skipped the same way, which reads,
  tokenizes and packs every skipped batch again. Streamed resume is measured at the smaller step counts
  only (--stream_steps) and its per-step cost given, since 100,000 steps of it take hours.

Synthetic data stands in for a corpus (random token ids in one prepared part; generated documents for the
stream): skipping does not depend on what the tokens say.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import skip_first_batches  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler  # noqa: E402

from clmlab import prepared  # noqa: E402
from clmlab.data import PackedBlocks, PackedStream  # noqa: E402


def first_batch_seconds(make_loader) -> float:
    started = time.perf_counter()
    next(iter(make_loader()))
    return round(time.perf_counter() - started, 4)


class RepeatedBlocks(torch.utils.data.Dataset):
    """`length` blocks cycling over a real block set: the index space of a large corpus without its RAM."""

    def __init__(self, blocks, length: int):
        self.blocks, self.length = blocks, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.blocks[index % len(self.blocks)]


def synthetic_prepared(folder: Path, tokens: int, vocab: int = 50257) -> Path:
    (folder / prepared.PARTS_DIR).mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, vocab, tokens, dtype=np.uint16)
    ids.tofile(folder / prepared.PARTS_DIR / "train-00000.bin")
    manifest = {"dtype": "uint16", "splits": {"train": {"parts": [{"name": "train-00000", "tokens": tokens}]}}}
    return folder, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100_000])
    parser.add_argument("--stream_steps", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--batch", type=int, default=64, help="sequences per step (one process)")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--corpus_tokens", type=int, default=20_000_000)
    args = parser.parse_args()
    results = {"batch": args.batch, "block": args.block, "corpus_tokens": args.corpus_tokens, "prepared": {}, "in_memory": {}, "streamed": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder, manifest = synthetic_prepared(Path(tmp) / "corpus", args.corpus_tokens)
        tokens = prepared.PartedTokens(folder, manifest, "train")
        flat = np.fromfile(tokens.files[0], dtype=np.uint16)
        for steps in args.steps:
            total = (steps + 10) * args.batch

            def prepared_loader():
                blocks = prepared.PreparedBlocks(tokens, args.block, seed=1, total=total, start=steps * args.batch)
                return DataLoader(blocks, batch_size=args.batch, sampler=SequentialSampler(blocks))

            def in_memory_loader():
                # One epoch as long as the run, as the Trainer would see a corpus of this many blocks.
                blocks = RepeatedBlocks(PackedBlocks(flat, args.block), total)
                loader = DataLoader(blocks, batch_size=args.batch, sampler=RandomSampler(blocks, generator=torch.Generator().manual_seed(1)))
                return skip_first_batches(loader, steps)

            results["prepared"][steps] = first_batch_seconds(prepared_loader)
            results["in_memory"][steps] = first_batch_seconds(in_memory_loader)

        import datasets
        from transformers import AutoTokenizer

        tokenizer_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_gpt2_random"
        if tokenizer_dir.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            words = np.random.default_rng(2).choice(["the", "data", "model", "token", "step", "run", "of", "a"], size=(20_000, 200))
            documents = datasets.Dataset.from_dict({"text": [" ".join(w) for w in words]}).to_iterable_dataset()
            token_docs = documents.map(lambda b: {"input_ids": [ids + [tokenizer.eos_token_id] for ids in
                                                                tokenizer(b["text"], add_special_tokens=False)["input_ids"]]},
                                       batched=True, remove_columns=["text"])
            for steps in args.stream_steps:
                seconds = first_batch_seconds(lambda: skip_first_batches(DataLoader(PackedStream(token_docs, args.block), batch_size=args.batch), steps))
                results["streamed"][steps] = {"seconds": seconds, "seconds_per_skipped_step": round(seconds / steps, 5),
                                              "million_tokens_skipped": steps * args.batch * args.block / 1e6}
        else:
            results["streamed"] = f"skipped: {tokenizer_dir} (the data pack) is absent"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
