"""Prepared folders: a corpus tokenized once into memory-mapped token parts (nanoGPT's flat layout), read
lazily block by block, in an order that is a pure function of (seed, global sample index).

A prepared folder (written by run_prepare.py, clmlab.prepare):

    tokenizer/                   the exact tokenizer the tokens were made with
    parts/{split}-{p:05d}.bin    tokens: headerless little-endian uint16 (uint32 above 65,536 tokens)
    parts/{split}-{p:05d}.ends   document end offsets within the part: little-endian uint64, one per document
    parts/{stream}-{p:05d}.json  the record of part p of a source stream, written after its token and offset
                                 files: that part is complete
    manifest.json                written last: the folder is complete

A source stream is the training source (whose documents go to train or validation by a hash of their
text, clmlab.data.DocumentSplit) or, with --validation_files, the validation source. Part p of a stream
holds its source documents [p * documents_per_part, (p + 1) * documents_per_part).

Documents are joined by EOS exactly as run_clm.py joins them (each document's tokens, then EOS), so a
split's tokens in part order are its documents in source order, each followed by EOS.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clmlab.cli import UsageError
from clmlab.tokenizer import load_tokenizer, trains_tokenizer

FORMAT = "clmlab-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
PARTS_DIR = "parts"
SPLITS = ("train", "validation")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (nanoGPT's choice: half the bytes of int32), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_sha256(tokenizer) -> str:
    """A fingerprint of what a tokenizer does: its full serialisation (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens), identical for a tokenizer and its saved copy."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def part_name(split: str, part: int) -> str:
    return f"{split}-{part:05d}"


def is_prepared(path: str | Path | None) -> bool:
    return path is not None and (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict:
    folder = Path(path)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{folder} is not a complete prepared folder ({type(error).__name__}); run run_prepare.py again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{folder}: prepared with format {manifest.get('format')} version {manifest.get('format_version')}; "
                         f"this clmlab reads {FORMAT} version {FORMAT_VERSION}: prepare it again")
    return manifest


# --------------------------------------------------------------------------------------------------- reading


class PartedTokens:
    """One split's tokens across its parts, as one sequence, read by slices.

    The parts are memory-mapped on first read in each process, never before: a dataset holding an open
    memory map copies its whole contents when it is pickled into a dataloader worker. The ranks of a node
    then share the files through the page cache.
    """

    def __init__(self, folder: str | Path, manifest: dict, split: str):
        parts = manifest["splits"][split]["parts"]
        self.files = [str(Path(folder) / PARTS_DIR / f"{part['name']}.bin") for part in parts]
        self.starts = np.cumsum([0] + [part["tokens"] for part in parts], dtype=np.int64)
        self.dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[manifest["dtype"]])
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _open(self) -> list[np.ndarray]:
        self._maps = [np.memmap(path, dtype=self.dtype, mode="r") if self.starts[i + 1] > self.starts[i]
                      else np.zeros(0, dtype=self.dtype) for i, path in enumerate(self.files)]
        return self._maps

    def read(self, start: int, end: int) -> np.ndarray:
        maps = self._maps or self._open()
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < end:  # a block may run over a part's end into the next part
            stop = min(end, int(self.starts[part + 1]))
            pieces.append(maps[part][start - self.starts[part] : stop - self.starts[part]])
            start, part = stop, part + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def shuffled_index(index: int, n: int, key: bytes) -> int:
    """`index` under a keyed pseudo-random permutation of range(n), in constant time and memory.

    A four-round Feistel network on the smallest even number of bits that holds n is a bijection of that
    power-of-two range whatever its round function; stepping again from values at or above n (cycle walking)
    keeps it a bijection of range(n). Fewer than four steps are expected, since the range is below 4n. No
    permutation array is built, so start-up time and memory do not grow with the corpus, and the order
    does not hang on a library's random-number stream.
    """
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, (1 << (bits // 2)) - 1
    value = index
    while True:
        left, right = value >> half, value & mask
        for round_ in range(4):
            digest = hashlib.blake2b(right.to_bytes(8, "little"), digest_size=8, key=key, person=bytes([round_]) * 8).digest()
            left, right = right, left ^ (int.from_bytes(digest, "little") & mask)
        value = (left << half) | right
        if value < n:
            return value


class PreparedBlocks(torch.utils.data.Dataset):
    """Blocks of `block_size` tokens cut from a prepared split, in a global order that is a pure function of
    (seed, global sample index): sample g is block perm_e[j], (e, j) = divmod(g, n_blocks), with perm_e a
    permutation keyed by (seed, e), so every pass over the data reshuffles and no epoch state exists.

    Item i is global sample `start + i`, up to `total` (the run's max_steps x global batch). Read in order
    (a sequential sampler), every optimizer step takes the next global-batch-size samples, which accelerate
    deals to the ranks whole batch by whole batch: the samples of a step do not depend on the number of
    processes. A resumed run starts at `start = step x global batch`: no block is read, nor anything done,
    for the steps it skips. `shuffle=False` gives the blocks in corpus order (validation).
    """

    def __init__(self, tokens: PartedTokens, block_size: int, seed: int = 0, total: int | None = None,
                 start: int = 0, shuffle: bool = True):
        self.tokens, self.block_size, self.seed, self.shuffle = tokens, block_size, seed, shuffle
        self.n_blocks = len(tokens) // block_size
        self.total = self.n_blocks if total is None else total
        if not shuffle and self.total > self.n_blocks:
            raise ValueError(f"{self.total} samples asked of {self.n_blocks} blocks in corpus order")
        self.start = start
        self.content_id: str | None = None  # the prepared folder's, checked on resume
        self.reads = 0  # blocks read by this process: resume reads none of those it skips

    def block_of(self, sample: int) -> int:
        epoch, position = divmod(sample, self.n_blocks)
        if not self.shuffle:
            return position
        return shuffled_index(position, self.n_blocks, key=f"{self.seed}:{epoch}".encode())

    def passes(self) -> float:
        """How many times the run goes over the data."""
        return self.total / self.n_blocks

    def __len__(self) -> int:
        return self.total - self.start

    def __getitem__(self, index: int) -> dict:
        block = self.block_of(self.start + index)
        self.reads += 1
        ids = torch.from_numpy(self.tokens.read(block * self.block_size, (block + 1) * self.block_size).astype(np.int64))
        # Labels are the inputs (the model shifts them), as in clmlab.data.PackedBlocks.
        return {"input_ids": ids, "labels": ids.clone()}


@dataclass
class PreparedData:
    train: PreparedBlocks
    validation: PreparedBlocks
    stats: dict


def load_prepared(folder: str | Path, block_size: int, seed: int, global_batch: int, max_steps: int,
                  max_eval_samples: int | None) -> PreparedData:
    """The training and validation blocks of a prepared folder for a run of `max_steps` steps of
    `global_batch` blocks; the validation blocks are the first `max_eval_samples`, the same at every
    evaluation and in every run."""
    manifest = read_manifest(folder)
    train = PreparedBlocks(PartedTokens(folder, manifest, "train"), block_size, seed, total=max_steps * global_batch)
    train.content_id = manifest["content_id"]
    if train.n_blocks == 0:
        raise UsageError(f"the training split of {folder} holds {len(train.tokens):,} tokens, fewer than block_size={block_size}; "
                         "give more data or lower --block_size")
    validation_tokens = PartedTokens(folder, manifest, "validation")
    n_validation = len(validation_tokens) // block_size
    if n_validation == 0:
        raise UsageError(f"the validation split of {folder} holds fewer than block_size={block_size} tokens; prepare it with more "
                         "held out (--validation_split_percentage, --validation_files) or lower --block_size")
    validation = PreparedBlocks(validation_tokens, block_size, shuffle=False, total=min(n_validation, max_eval_samples or n_validation))
    stats = {"invalid_utf8_bytes": manifest.get("invalid_utf8_bytes", 0),
             "prepared": {"folder": str(Path(folder).resolve()), "content_id": manifest["content_id"],
                          "passes": round(train.passes(), 4), "source": manifest.get("source")}}
    for split, blocks in (("train", train), ("validation", validation)):
        stats[split] = {"documents": manifest["splits"][split]["documents"], "tokens": len(blocks.tokens), "blocks": blocks.n_blocks}
    stats["validation"]["blocks"] = len(validation)
    return PreparedData(train, validation, stats)


def tokenizer_for_prepared(folder: str | Path, model_args):
    """The prepared folder's own tokenizer; a tokenizer the run names (--tokenizer_name, or the checkpoint's
    when continuing) must be that one, or the token ids would mean other words."""
    given, what = model_args.tokenizer_name, "--tokenizer_name"
    if not given and not trains_tokenizer(model_args):  # a checkpoint that brings its tokenizer
        given, what = model_args.model_name_or_path, "the checkpoint's (--model_name_or_path)"
    own = load_tokenizer(str(Path(folder) / TOKENIZER_DIR))
    if given:
        tokenizer = load_tokenizer(given)
        if tokenizer_sha256(tokenizer) != read_manifest(folder)["tokenizer_sha256"]:
            raise UsageError(f"--dataset_name {folder} was prepared with another tokenizer than {what} {given}; train with "
                             f"the folder's own ({Path(folder) / TOKENIZER_DIR}), or prepare the corpus again with this one")
    return own


def trained_vocab_size(folder: str | Path) -> int:
    """The vocabulary asked of a BPE trained for the folder (0 for a named tokenizer): the model keeps that many
    embedding rows even where a small corpus gave fewer merges, so its initial weights do not depend on the data."""
    return int((read_manifest(folder).get("tokenizer") or {}).get("vocab_size", 0))


def steps_for_epochs(folder: str | Path, block_size: int, epochs: float, global_batch: int) -> int:
    """--num_train_epochs in whole optimizer steps, for a run that reads a prepared folder."""
    n_blocks = read_manifest(folder)["splits"]["train"]["tokens"] // block_size
    return max(1, int(epochs * n_blocks) // global_batch)
