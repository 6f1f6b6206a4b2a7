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
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clmlab.cli import UsageError

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
