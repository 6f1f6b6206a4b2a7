#!/usr/bin/env python
"""Throughput and peak memory of run_prepare.py against bare `tokenizers` on the same documents, as JSON.

    python bench/data_pipeline.py                            # ~100 MB of text, 1 and 2 workers
    python bench/data_pipeline.py --megabytes 20 --workers 1 2 4

The corpus is made at run time in a temporary folder (never in the project): the data pack's stories and
Shakespeare, repeated, each copy under a header of its own so that no two documents are alike (the
train/validation split is by a hash of the text). Every measurement runs in a process of its own, so one's
peak memory never counts for another's; a prepare is timed from its call to its return (source checks,
tokenizer loading, workers starting and files written included), bare tokenization from the first batch
to the last, on documents already in memory. The prepare at --small_megabytes shows whether peak memory
grows with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EOS = "<|endoftext|>"

PREPARE = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import run_prepare
started = time.perf_counter()
manifest = run_prepare.main(sys.argv[2:])
seconds = time.perf_counter() - started
tokens = sum(s["tokens"] for s in manifest["splits"].values())
print(json.dumps({"seconds": round(seconds, 2), "tokens": tokens, "documents": sum(s["documents"] for s in manifest["splits"].values()),
                  "tokens_per_second": round(tokens / seconds), "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024}))
"""

# Only tokenizers is imported, so the peak memory is the documents' and the tokenizer's. The corpus is split
# as make_corpus wrote it, which gives the documents clmlab.data reads from it (the token counts show it).
BARE = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[3])
started = time.perf_counter()
with open(sys.argv[2], encoding="utf-8") as handle:
    texts = [t.strip() for t in handle.read().split("\n<|endoftext|>\n") if t.strip()]
read = time.perf_counter() - started
started, tokens = time.perf_counter(), 0
for i in range(0, len(texts), 1000):
    tokens += sum(len(e.ids) + 1 for e in tokenizer.encode_batch_fast(texts[i : i + 1000], add_special_tokens=False))
seconds = time.perf_counter() - started
print(json.dumps({"read_seconds": round(read, 2), "seconds": round(seconds, 2), "tokens": tokens, "documents": len(texts),
                  "tokens_per_second": round(tokens / seconds), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def make_corpus(path: Path, megabytes: float) -> int:
    stories = (DATA / "tinystories" / "tinystories_v1_valid_sample.txt").read_text().split(f"\n{EOS}\n")
    paragraphs = (DATA / "tinyshakespeare" / "input.txt").read_text().split("\n\n")
    base = [t.strip() for t in stories + paragraphs if t.strip()]
    target, written, copy = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            for i, text in enumerate(base):
                document = f"Document {copy}-{i}.\n{text}\n{EOS}\n"
                handle.write(document)
                written += len(document.encode("utf-8"))
            copy += 1
    return written


def run_json(code: str, *args: str, threads: int | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), *args], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--small_megabytes", type=float, default=10, help="A smaller corpus, for peak memory against corpus size; 0: none.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default=str(DATA / "tiny_gpt2_random"))
    parser.add_argument("--documents_per_part", type=int, default=50_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="clmlab-bench-data-"))
    try:
        results = {"cpus": os.cpu_count(), "tokenizer": Path(args.tokenizer).name, "corpora": {}}
        sizes = [args.megabytes] + ([args.small_megabytes] if args.small_megabytes else [])
        for megabytes in sizes:
            corpus = work / f"corpus-{megabytes:g}MB.txt"
            entry = results["corpora"][f"{megabytes:g}MB"] = {"bytes": make_corpus(corpus, megabytes), "prepare": {}, "bare_tokenizers": {}}
            for workers in args.workers if megabytes == args.megabytes else [max(args.workers)]:
                out = work / f"prepared-{megabytes:g}-{workers}"
                entry["prepare"][f"{workers}_workers"] = run_json(
                    PREPARE, "--train_files", str(corpus), "--tokenizer_name", args.tokenizer, "--num_workers", str(workers),
                    "--documents_per_part", str(args.documents_per_part), "--output_dir", str(out))
                shutil.rmtree(out)
            if megabytes == args.megabytes:
                for threads in args.workers:
                    bare = entry["bare_tokenizers"][f"{threads}_threads"] = run_json(
                        BARE, str(corpus), str(Path(args.tokenizer) / "tokenizer.json"), threads=threads)
                    bare["same_tokens_as_prepare"] = bare["tokens"] == next(iter(entry["prepare"].values()))["tokens"]
            corpus.unlink()
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
