"""Named evaluation sets: fixed blocks of held-out text that every run of a comparison is scored on, whatever it
trained on, so one table holds each model on each dataset's text (the cross-evaluation matrix).

An evaluation set is a text or jsonl file, or a prepared folder (its validation split: the text the run that
trained on that folder held out). Its blocks are the first --max_eval_samples blocks of its documents joined
by EOS, as the run's own validation blocks are made, so the same set gives the same blocks in every run with
the same tokenizer and block size; the sha256 of the blocks is recorded so a report can check that.

Loss per token depends on the tokenizer; bits per byte does not: the summed loss, in bits, over the bytes of
the text the scored tokens stand for. Document ends (EOS) are scored and stand for no bytes.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clmlab import data, prepared
from clmlab.cli import UsageError

OWN_VALIDATION = "validation"  # the name of the run's own validation split when no named set is the same text


def parse_named(items: list[str] | dict | None, flag: str) -> dict[str, str]:
    """`name=PATH ...` (or a YAML mapping) as {name: PATH}, names usable in metric names."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [item.partition("=")[::2] for item in items]
    named: dict[str, str] = {}
    for name, path in pairs:
        name, path = str(name).strip(), str(path).strip()
        if not name or not path:
            raise UsageError(f"--{flag} {name}={path}: write each as name=PATH, e.g. --{flag} tinystories=data/valid.txt")
        if not all(ch.isalnum() or ch in "_-~" for ch in name.split(":")[0]):
            raise UsageError(f"--{flag} {name}: a name is letters, digits, '_', '-' or '~' (it becomes part of metric names)")
        if name in named:
            raise UsageError(f"--{flag} names {name!r} twice; give each set its own name")
        named[name] = path
    return named


def token_byte_lengths(tokenizer) -> np.ndarray:
    """The UTF-8 bytes each token id stands for; special tokens (EOS) stand for none.

    A byte-level BPE (GPT-2's, and the one clmlab trains) writes each byte as one character of the token's
    string, so a token's length is its bytes, exactly, even for a token that holds part of a character (which
    decoding alone would turn into a 3-byte replacement character)."""
    n = len(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    lengths = np.zeros(n, dtype=np.int64)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    for i, token in enumerate(tokens):
        if i in special or token is None:
            continue
        lengths[i] = len(token) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def blocks_identity(blocks: torch.utils.data.Dataset, byte_lengths: np.ndarray) -> dict:
    """sha256 of the blocks' token ids (and the block size), the tokens scored and the bytes they stand for."""
    digest = hashlib.sha256()
    predicted = n_bytes = 0
    for i in range(len(blocks)):
        ids = np.asarray(blocks[i]["input_ids"], dtype=np.int64)
        if i == 0:
            digest.update(f"block_size={len(ids)};".encode())
        digest.update(ids.astype("<i4").tobytes())
        predicted += len(ids) - 1  # the first token of a block is read, never predicted
        n_bytes += int(byte_lengths[ids[1:]].sum())
    return {"blocks": len(blocks), "tokens_predicted": predicted, "bytes": n_bytes, "sha256": digest.hexdigest()}


def bits_per_byte(mean_loss: float, tokens_predicted: int, n_bytes: int) -> float:
    """Mean loss in nats per scored token, as bits per byte of the text those tokens stand for."""
    return mean_loss * tokens_predicted / (math.log(2) * max(n_bytes, 1))


@dataclass
class EvalSet:
    name: str
    source: str
    blocks: torch.utils.data.Dataset
    identity: dict  # blocks_identity()

    def record(self) -> dict:
        return {"source": self.source, **self.identity}


def _file_tokens(path: str, tokenizer, data_args, needed: int | None) -> np.ndarray:
    """A text or jsonl file's documents, each followed by EOS, read until `needed` tokens are at hand."""
    flag = "--eval_files"
    kind = data.file_format([path], flag)
    if kind == "text":
        data.invalid_utf8_bytes(path, data_args.decode_errors, flag)
        documents = (d["text"] for d in data.iter_text_documents([(path, 0, 0)], data_args.text_documents,
                                                                 data_args.document_separator, data_args.decode_errors))
    elif kind == "json":
        records = data.read_record_files(kind, [path], flag, streaming=True)
        documents = (r.get(data_args.text_column) for r in records)
    else:
        raise UsageError(f"--eval_files {path}: give a text file, a jsonl file or a prepared folder")
    pieces, count = [], 0
    for text in documents:
        if not isinstance(text, str):
            raise UsageError(f"--eval_files {path}: a record has no text field {data_args.text_column!r}; set --text_column")
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
        pieces.append(np.asarray(ids, dtype=np.int64))
        count += len(ids)
        if needed is not None and count >= needed:
            break
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def load_eval_set(name: str, path: str, tokenizer, block_size: int, max_blocks: int | None, data_args) -> EvalSet:
    """The first `max_blocks` blocks (all, if None) of a file or of a prepared folder's validation split."""
    if prepared.is_prepared(path):
        manifest = prepared.read_manifest(path)
        if manifest["tokenizer_sha256"] != prepared.tokenizer_sha256(tokenizer):
            raise UsageError(f"--eval_files {name}={path} was prepared with another tokenizer than this run's; its tokens "
                             "would mean other words: prepare it with the run's tokenizer, or give its text file")
        tokens = prepared.PartedTokens(path, manifest, "validation")
        available = len(tokens) // block_size
        blocks = prepared.PreparedBlocks(tokens, block_size, shuffle=False, total=min(available, max_blocks or available))
        source = str(Path(path).resolve())
    elif os.path.isfile(path):
        needed = max_blocks * block_size if max_blocks else None
        blocks = data.PackedBlocks(_file_tokens(path, tokenizer, data_args, needed), block_size, max_blocks)
        source = str(Path(path).resolve())
    else:
        raise UsageError(f"--eval_files {name}={path}: no such file or prepared folder")
    if len(blocks) == 0:
        raise UsageError(f"--eval_files {name}={path} holds fewer than block_size={block_size} tokens; give more text or lower --block_size")
    return EvalSet(name, source, blocks, blocks_identity(blocks, token_byte_lengths(tokenizer)))


def eval_sets_for_run(named: dict[str, str], own_validation, tokenizer, block_size: int, data_args) -> tuple[dict[str, EvalSet], str]:
    """Every named set, and the run's own validation split among them: under the name of the set that holds
    the same blocks (a comparison names every dataset's held-out text, its own included), else as
    "validation". Returns (sets in evaluation order, the own split first; the own split's name)."""
    byte_lengths = token_byte_lengths(tokenizer)
    own = EvalSet(OWN_VALIDATION, "the run's validation split", own_validation, blocks_identity(own_validation, byte_lengths))
    sets = {name: load_eval_set(name, path, tokenizer, block_size, data_args.max_eval_samples, data_args) for name, path in named.items()}
    same = [name for name, s in sets.items() if s.identity["sha256"] == own.identity["sha256"]]
    if same:
        own = sets.pop(same[0])
    elif OWN_VALIDATION in sets:
        raise UsageError(f"--eval_files {OWN_VALIDATION}=...: that name is the run's own validation split's; choose another")
    return {own.name: own, **sets}, own.name
