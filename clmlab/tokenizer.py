"""Tokenizers: load one, or train a byte-level BPE on the training documents.

Also a command of its own:
    python -m clmlab.tokenizer --train_files data/*.txt --vocab_size 8192 --output_dir tok/
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from clmlab.cli import UsageError, first_line

EOS = "<|endoftext|>"
logger = logging.getLogger(__name__)


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (any byte sequence encodes, no unknown token) with <|endoftext|> as
    BOS and EOS and, as in GPT-2, no padding token: packed blocks need none."""
    if vocab_size < 257:
        raise UsageError(f"--tokenizer_vocab_size {vocab_size} is too small: a byte-level BPE needs at least 257 (256 bytes + EOS)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS)


def load_tokenizer(name_or_path: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:  # OSError offline or not found, ValueError for a folder with no tokenizer
        raise UsageError(f"could not load tokenizer {name_or_path!r}: {first_line(error)}") from None
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer {name_or_path!r} has no EOS token; clmlab joins documents with EOS")
    return tokenizer


def training_texts(train_documents, max_documents: int | None = None) -> Iterable[list[str]]:
    """Batches of training-document texts for the BPE trainer (batches: far fewer Python-Rust crossings)."""
    texts = (doc["text"] for doc in train_documents)
    if max_documents is not None:
        texts = itertools.islice(texts, max_documents)
    while batch := list(itertools.islice(texts, 1000)):
        yield batch


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def trains_tokenizer(model_args) -> bool:
    """No --tokenizer_name and no checkpoint that brings one: the run trains its own BPE."""
    if model_args.tokenizer_name:
        return False
    checkpoint = model_args.model_name_or_path
    if checkpoint is None:
        return True
    return os.path.isdir(checkpoint) and not any(os.path.exists(os.path.join(checkpoint, f)) for f in TOKENIZER_FILES)


def tokenizer_for_run(model_args, data_args, documents: dict):
    """--tokenizer_name, else the checkpoint's own, else a BPE trained on the training split only (held-out
    documents stay unseen)."""
    if not trains_tokenizer(model_args):
        return load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)
    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer(training_texts(documents["train"], data_args.tokenizer_train_documents), model_args.tokenizer_vocab_size)
    logger.info(f"trained a byte-level BPE tokenizer of {len(tokenizer):,} tokens on the training documents "
                f"in {time.perf_counter() - started:.1f} s")
    if len(tokenizer) < model_args.tokenizer_vocab_size:
        logger.warning(f"the training documents gave only {len(tokenizer):,} BPE tokens of the "
                       f"{model_args.tokenizer_vocab_size:,} asked for; the model keeps {model_args.tokenizer_vocab_size:,} "
                       "embedding rows so its initial weights do not depend on the data")
    return tokenizer


@dataclass
class TokenizerArguments:
    output_dir: str = field(metadata={"help": "Folder to save the tokenizer in (loadable with AutoTokenizer)."})
    vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size, <|endoftext|> included."})


def main(argv=None) -> None:
    """Train on the same training documents run_clm.py and run_prepare.py would (the first
    --tokenizer_train_documents of the training split), so all give the same tokenizer for the same data."""
    from clmlab.args import DataArguments
    from clmlab.cli import parse_args, setup_logging
    from clmlab.data import load_documents

    setup_logging()
    data_args, tok_args = parse_args([DataArguments, TokenizerArguments], argv, prog="python -m clmlab.tokenizer")
    if os.path.isdir(tok_args.output_dir) and os.listdir(tok_args.output_dir):
        raise UsageError(f"--output_dir {tok_args.output_dir} is not empty; choose a new folder")
    documents = load_documents(data_args, streaming=True)
    tokenizer = train_bpe_tokenizer(training_texts(documents["train"], data_args.tokenizer_train_documents), tok_args.vocab_size)
    tokenizer.save_pretrained(tok_args.output_dir)
    print(f"Saved a byte-level BPE tokenizer of {len(tokenizer)} tokens to {tok_args.output_dir}")


if __name__ == "__main__":
    from clmlab.cli import exits_on_usage_error

    exits_on_usage_error(main)()
