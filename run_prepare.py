#!/usr/bin/env python
"""Tokenize a corpus once into a prepared folder, then train on it many times without tokenizing again.

    python run_prepare.py --train_files data/*.txt --tokenizer_name gpt2 --output_dir prepared/mine
    python run_prepare.py --dataset_name roneneldan/TinyStories --streaming true --output_dir prepared/tinystories
    python run_clm.py --dataset_name prepared/mine --max_train_tokens 50_000_000

The data flags are run_clm.py's, and the documents are the ones run_clm.py would read from them. Run the
same command again after a stop: it keeps the complete parts and writes the rest.
"""

from __future__ import annotations

import sys
import time

from clmlab.args import DataArguments
from clmlab.cli import UsageError, exits_on_usage_error, parse_args, setup_logging
from clmlab.prepare import PrepareArguments, prepare_corpus, summary


@exits_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments, each checked as it is parsed.
    setup_logging()
    data_args, prepare_args = parse_args([DataArguments, PrepareArguments], sys.argv[1:] if argv is None else argv,
                                         prog="run_prepare.py")
    if data_args.prepare_to:
        raise UsageError("--prepare_to is run_clm.py's; here the folder to write is --output_dir")

    # 2. Read, tokenize and write; or find the folder already prepared with these arguments.
    started = time.perf_counter()
    manifest = prepare_corpus(data_args, prepare_args.output_dir, tokenizer_name=prepare_args.tokenizer_name,
                              tokenizer_vocab_size=prepare_args.tokenizer_vocab_size, num_workers=prepare_args.num_workers,
                              documents_per_part=prepare_args.documents_per_part, overwrite=prepare_args.overwrite_output_dir)

    # 3. What the folder holds, and how to train from it.
    print("\n".join(summary(manifest, prepare_args.output_dir, time.perf_counter() - started)), flush=True)
    return manifest


if __name__ == "__main__":
    main()
