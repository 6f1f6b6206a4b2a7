#!/usr/bin/env python
"""Data pipeline figures, side by side, as JSON: prepare throughput against bare `tokenizers` and against the
Hugging Face example's pipeline, prepare's peak memory, and the time and memory to a run's first step.

    python bench/data_pipeline.py                            # ~100 MB and ~10 MB of text, 1 and 2 cores
    python bench/data_pipeline.py --quick                    # a few MB, under a minute: does the script work
    python bench/data_pipeline.py --megabytes 20 --workers 1 2 4

The corpus is made at run time in a temporary folder (never in the project): the data pack's stories and
Shakespeare, repeated, each copy under a header of its own so that no two documents are alike (the
train/validation split is by a hash of the text), one document per `<|endoftext|>`-separated block.
Every measurement runs in a process of its own, so one's peak memory never counts for another's, and with
N cores' worth of work: N prepare workers, N Rust threads, or N `datasets` processes of one thread each.

- prepare: run_prepare.py's main(), timed from its call to its return (source checks, tokenizer loading,
  workers starting and files written included); tokens/s over the tokens it wrote. Peak RSS of the main
  process and of its largest worker. Run again at --small_megabytes: peak memory against corpus size.
- bare_tokenizers: `tokenizers.Tokenizer.encode_batch_fast` on the same documents already in memory, from
  the first batch to the last (reading excluded): the most a tokenizing pipeline can reach.
- hf_example: transformers' examples/pytorch/language-modeling/run_clm.py way, written here from its
  description: `datasets.load_dataset("text", keep_linebreaks=True)` (one row per line), then
  `.map(tokenize, batched=True, num_proc=N)` on the "text" column (input_ids and attention_mask), then
  `.map(group_texts, batched=True, num_proc=N)` concatenating every column and cutting it into blocks of
  1024 with labels, timed from load_dataset to the last map's return, with a fresh HF_DATASETS_CACHE so no
  cache answers. Its tokens are its own: each line tokenized apart, the separator lines read as EOS plus a
  newline, so it counts a few percent more tokens than prepare on the same text.
- ratios: prepare's tokens/s over bare's and over the HF example's, on the same number of cores.
- first_step: `run_clm.py --dataset_name <prepared folder>` (the folders prepared above) on the
  --small_megabytes and --megabytes corpora, a tiny GPT-2 (n_embd=64, 2 layers, block 256, batch 8, no
  evaluation at the start, --report_to none, a fresh datasets cache), run through a wrapper that stops the
  process at the end of the first optimizer step (a TrainerCallback's on_step_end; the rest of the run,
  saving and evaluating, is not measured): wall time from just before the process is started (interpreter
  start and imports included) to that point, split into imports, setup (tokenizer, model, data, Trainer)
  and the step; and the process's peak RSS before the first step and at its end (the step's logits over
  the 50,257-token vocabulary add about 1.25 GB to that, whatever the corpus). The prepare is not in this
  time (it is measured above). Of --first_step_repeats runs, the lowest time is given, and the highest
  peak RSS. `growth` is the larger corpus's figure minus the smaller's. The same is measured for the
  in-memory path of --in_memory_rev (the last commit whose run_clm.py tokenized and packed a text corpus
  in memory itself: `--train_files`, with --preprocessing_num_workers N), from a `git archive` of that
  commit into the temporary folder, when the repository has it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EOS = "<|endoftext|>"
HF_BLOCK_SIZE = 1024  # the HF example's default block (GPT-2's context)
# The commit before prepared folders became run_clm.py's only map-style path: its --train_files tokenized
# and packed the corpus in memory, which is what the prepared path replaced.
IN_MEMORY_REV = "87a81d7"

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

# The HF example's pipeline, from its description (not its code). HF_DATASETS_CACHE is set by the caller to
# a fresh folder before datasets is imported. The token count is read from the Arrow column after the
# timing and the memory reading, so neither includes it.
HF_EXAMPLE = r"""
import itertools, json, resource, sys, time
import datasets
import pyarrow.compute as pc
from transformers import AutoTokenizer
corpus, tokenizer_dir, num_proc, block = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
started = time.perf_counter()
raw = datasets.load_dataset("text", data_files={"train": corpus}, keep_linebreaks=True)
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

def tokenize(batch):
    return tokenizer(batch["text"])

def group_texts(batch):
    joined = {name: list(itertools.chain.from_iterable(rows)) for name, rows in batch.items()}
    usable = len(joined["input_ids"]) // block * block
    blocks = {name: [values[i : i + block] for i in range(0, usable, block)] for name, values in joined.items()}
    blocks["labels"] = [list(ids) for ids in blocks["input_ids"]]
    return blocks

tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"])
grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
seconds = time.perf_counter() - started
main_rss, worker_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
tokens = pc.sum(pc.list_value_length(tokenized["train"].data.column("input_ids"))).as_py()
print(json.dumps({"seconds": round(seconds, 2), "tokens": tokens, "rows": raw["train"].num_rows, "blocks": grouped["train"].num_rows,
                  "tokens_per_second": round(tokens / seconds), "main_peak_rss_mb": main_rss, "worker_peak_rss_mb": worker_rss}))
"""

# run_clm.py of the checkout at argv[1], stopped at the end of its first optimizer step. argv[2] is the
# caller's time.time() just before it started this process, so the times include interpreter start-up.
FIRST_STEP = r"""
import json, os, resource, sys, time
root, started = os.path.abspath(sys.argv[1]), float(sys.argv[2])
sys.path.insert(0, root)
sys.argv = [os.path.join(root, "run_clm.py"), *sys.argv[3:]]
import clmlab, run_clm
from transformers import TrainerCallback
# The project is installed in editable mode: make sure this is the checkout's own clmlab, not the installed one.
assert os.path.dirname(os.path.dirname(os.path.abspath(clmlab.__file__))) == root, clmlab.__file__
imported = time.time()

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024

class FirstStep(TrainerCallback):
    begun = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.begun = self.begun or (time.time(), peak_mb())

    def on_step_end(self, args, state, control, **kwargs):
        ended = time.time()
        print(json.dumps({"seconds_to_first_step": round(ended - started, 2), "imports_seconds": round(imported - started, 2),
                          "setup_seconds": round(self.begun[0] - imported, 2), "first_step_seconds": round(ended - self.begun[0], 2),
                          "peak_rss_before_first_step_mb": self.begun[1], "peak_rss_mb": peak_mb()}), flush=True)
        os._exit(0)  # the figures are taken: the rest of the run (saving, evaluating) is not measured

class Trainer(run_clm.Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(FirstStep())

run_clm.Trainer = Trainer
run_clm.main()
raise SystemExit("the run ended without an optimizer step")
"""

TINY_RUN = ["--config_overrides", "n_embd=64,n_layer=2,n_head=2,n_positions=256", "--block_size", "256", "--max_steps", "1",
            "--eval_on_start", "false", "--max_eval_samples", "4", "--per_device_train_batch_size", "8",
            "--disable_tqdm", "true", "--report_to", "none"]


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
                if written >= target:  # mid-copy too, so that a corpus below one copy (3 MB) has the size asked
                    break
            copy += 1
    return written


def run_json(code: str, *args: str, root: Path = REPO, threads: int | None = None, env: dict | None = None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if threads is not None:
        env.update(RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
    done = subprocess.run([sys.executable, "-c", code, str(root), *args], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_step(root: Path, work: Path, run_args: list[str], repeats: int) -> dict:
    """The least disturbed of `repeats` runs to the first step (lowest time), and the highest peak RSS."""
    runs = []
    for _ in range(repeats):
        out, cache = work / "run", work / "run-datasets-cache"
        # A fresh datasets cache each time: the in-memory path would otherwise find its tokens cached.
        runs.append(run_json(FIRST_STEP, str(time.time()), *run_args, *TINY_RUN, "--output_dir", str(out), root=root,
                             env={"HF_DATASETS_CACHE": str(cache)}))
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    best = min(runs, key=lambda r: r["seconds_to_first_step"])
    return {**best, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "peak_rss_before_first_step_mb": max(r["peak_rss_before_first_step_mb"] for r in runs),
            "runs_seconds_to_first_step": [r["seconds_to_first_step"] for r in runs]}


def growth(by_size: dict, small: str, large: str) -> dict:
    return {key: round(by_size[large][key] - by_size[small][key], 2)
            for key in ("seconds_to_first_step", "setup_seconds", "peak_rss_before_first_step_mb", "peak_rss_mb")}


def checkout(rev: str, target: Path) -> Path | str:
    """The files of commit `rev` of this repository in `target` (git archive: the project's own checkout and
    .git are only read), or why not."""
    done = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True)
    if done.returncode != 0:
        return f"skipped: git archive {rev} failed ({done.stderr.decode(errors='replace').strip()[:200]})"
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(target, filter="data")
    return target


def ratio(a: dict | None, b: dict | None) -> float | None:
    return round(a["tokens_per_second"] / b["tokens_per_second"], 2) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true", help="A small version (3 MB and 1 MB, one run each) to check the script works.")
    parser.add_argument("--megabytes", type=float, default=None, help="The corpus for every figure (default 100; 3 with --quick).")
    parser.add_argument("--small_megabytes", type=float, default=None,
                        help="A smaller corpus, for memory and time to the first step against corpus size (default 10; 1 with --quick); 0: none.")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Cores to compare on (prepare workers, threads, processes).")
    parser.add_argument("--tokenizer", default=str(DATA / "tiny_gpt2_random"))
    parser.add_argument("--documents_per_part", type=int, default=50_000)
    parser.add_argument("--first_step_repeats", type=int, default=None, help="Runs to the first step per corpus and path (default 2; 1 with --quick).")
    parser.add_argument("--in_memory_rev", default=IN_MEMORY_REV, help="Commit whose in-memory run_clm.py path to measure too; '': none.")
    args = parser.parse_args()
    megabytes = args.megabytes if args.megabytes is not None else 3 if args.quick else 100
    small = args.small_megabytes if args.small_megabytes is not None else 1 if args.quick else 10
    repeats = args.first_step_repeats or (1 if args.quick else 2)
    cores = max(args.workers)
    # A terminated benchmark still removes its temporary folder (subprocess.run kills the running child).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="clmlab-bench-data-"))
    # Every child's datasets cache (prepare's streamed reading leaves lock files in it) lies in the temporary
    # folder, removed at the end; the HF example and the runs to the first step get fresh ones of their own.
    os.environ["HF_DATASETS_CACHE"] = str(work / "datasets-cache")
    try:
        results = {"cpus": os.cpu_count(), "tokenizer": Path(args.tokenizer).name, "corpora": {}}
        sizes = ([small] if small else []) + [megabytes]
        corpora, folders = {}, {}
        for size in sizes:
            name = f"{size:g}MB"
            corpus = corpora[name] = work / f"corpus-{name}.txt"
            entry = results["corpora"][name] = {"bytes": make_corpus(corpus, size), "prepare": {}}
            for workers in args.workers if size == megabytes else [cores]:
                out = work / f"prepared-{name}-{workers}"
                entry["prepare"][f"{workers}_workers"] = run_json(
                    PREPARE, "--train_files", str(corpus), "--tokenizer_name", args.tokenizer, "--num_workers", str(workers),
                    "--documents_per_part", str(args.documents_per_part), "--output_dir", str(out))
                if workers == cores:
                    folders[name] = out  # trained from below; the folder is the same whatever the workers
                else:
                    shutil.rmtree(out)
            if size != megabytes:
                continue
            prepared_tokens = entry["prepare"][f"{cores}_workers"]["tokens"]
            entry["bare_tokenizers"], entry["hf_example"] = {}, {}
            for n in args.workers:
                bare = entry["bare_tokenizers"][f"{n}_threads"] = run_json(
                    BARE, str(corpus), str(Path(args.tokenizer) / "tokenizer.json"), threads=n)
                bare["same_tokens_as_prepare"] = bare["tokens"] == prepared_tokens
                cache = work / f"hf-datasets-cache-{n}"
                entry["hf_example"][f"{n}_processes"] = run_json(
                    HF_EXAMPLE, str(corpus), args.tokenizer, str(n), str(HF_BLOCK_SIZE), threads=1, env={"HF_DATASETS_CACHE": str(cache)})
                shutil.rmtree(cache, ignore_errors=True)
            results["ratios"] = {f"{n}_cores": {
                "prepare_over_bare": ratio(entry["prepare"].get(f"{n}_workers"), entry["bare_tokenizers"][f"{n}_threads"]),
                "prepare_over_hf_example": ratio(entry["prepare"].get(f"{n}_workers"), entry["hf_example"][f"{n}_processes"])}
                for n in args.workers}

        steps = results["first_step"] = {"prepared": {name: first_step(REPO, work, ["--dataset_name", str(folder)], repeats)
                                                      for name, folder in folders.items()}}
        for folder in folders.values():
            shutil.rmtree(folder)
        if args.in_memory_rev:
            old = checkout(args.in_memory_rev, work / "in-memory-checkout")
            key = f"in_memory_{args.in_memory_rev}"
            steps[key] = old if isinstance(old, str) else {
                name: first_step(old, work, ["--train_files", str(corpus), "--tokenizer_name", args.tokenizer,
                                             "--preprocessing_num_workers", str(cores)], repeats)
                for name, corpus in corpora.items()}
        if small:
            names = (f"{small:g}MB", f"{megabytes:g}MB")
            for path in steps.values():
                if isinstance(path, dict):
                    path["growth"] = growth(path, *names)
        print(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
