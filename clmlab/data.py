"""Documents, then tokens, then blocks.

Raw records become documents (one text each); documents are split into train and validation by a hash of
their text; documents are tokenized with EOS appended and packed into blocks of `block_size`. The same
functions serve the in-memory and the streaming paths.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import datasets
import numpy as np
import torch

from clmlab.cli import UsageError, first_line

FILE_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------------- documents


def resolve_files(patterns: Sequence[str], flag: str) -> list[str]:
    """Expand globs; every pattern must match. Sorted, so the order files are named in changes nothing."""
    files: set[str] = set()
    for pattern in patterns:
        matches = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matches:
            raise UsageError(f"{flag} {pattern}: no such file; give existing files or globs that match files")
        files.update(os.path.abspath(p) for p in matches)
    return sorted(files)


def file_format(files: Sequence[str], flag: str) -> str:
    kinds = set()
    for path in files:
        kind = FILE_FORMATS.get(Path(path).suffix.lower())
        if kind is None:
            raise UsageError(f"{flag} {path}: unsupported file type; use .txt, .json, .jsonl or .parquet")
        kinds.add(kind)
    if len(kinds) > 1:
        raise UsageError(f"{flag} mixes file types {sorted(kinds)}; give files of one type per split")
    return kinds.pop()


def invalid_utf8_bytes(path: str, errors: str = "strict", flag: str = "--train_files", chunk_bytes: int = 1 << 22) -> int:
    """How many bytes of a text file are not UTF-8; with errors="strict", refuse the file at the first one.

    Decoding them with replacement characters would silently change the data a comparison rests on, so
    that is only done when asked for (--decode_errors replace), and counted. Read in chunks: constant memory.
    """
    count = 0

    def counted(error: UnicodeDecodeError):
        nonlocal count
        count += error.end - error.start
        return "\ufffd", error.end

    codecs.register_error("clmlab.counted", counted)  # the registry keeps the latest handler under a name
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict" if errors == "strict" else "clmlab.counted")
    offset = 0  # of the first byte the decoder holds back or is given
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            held = decoder.getstate()[0]  # the start of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                position = offset + error.start
                hint = "convert the file to UTF-8" + (", or pass --decode_errors replace to read such bytes as U+FFFD" if flag.endswith("_files") else "")
                raise UsageError(f"{flag} {path}: not UTF-8 (byte 0x{(held + chunk)[error.start]:02x} at offset {position:,}); {hint}") from None
            if not chunk:
                return count
            offset += len(held) + len(chunk) - len(decoder.getstate()[0])


def _has_separator_line(path: str, separator: str, probe_bytes: int = 1 << 20) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(line.strip() == separator for line in handle.read(probe_bytes).splitlines())


def iter_text_documents(sources: Sequence[tuple[str, int, int]], mode: str, separator: str, errors: str = "strict") -> Iterator[dict]:
    """Yield {"text": document} from text files, reading line by line so a multi-GB file never sits in memory.

    `sources` holds (path, size, mtime) so that datasets' cache key changes when a file does.
    """
    for path, _size, _mtime in sources:
        file_mode = mode
        if mode == "auto":
            file_mode = "separator" if _has_separator_line(path, separator) else "paragraph"
        with open(path, encoding="utf-8", errors=errors) as handle:
            if file_mode == "file":
                text = handle.read().strip()
                if text:
                    yield {"text": text}
                continue
            lines: list[str] = []
            for line in handle:
                stripped = line.strip()
                if file_mode == "line":
                    ends_document, keep = True, bool(stripped)
                elif file_mode == "separator":
                    ends_document, keep = stripped == separator, stripped != separator
                else:  # paragraph
                    ends_document, keep = not stripped, bool(stripped)
                if keep:
                    lines.append(line.rstrip("\r\n"))
                if ends_document:
                    text = "\n".join(lines).strip()
                    if text:
                        yield {"text": text}
                    lines = []
            text = "\n".join(lines).strip()
            if text:
                yield {"text": text}


def _text_file_documents(files: list[str], mode: str, separator: str, streaming: bool, errors: str = "strict"):
    sources = [(path, os.path.getsize(path), os.stat(path).st_mtime_ns) for path in files]
    gen_kwargs = {"sources": sources, "mode": mode, "separator": separator, "errors": errors}
    features = datasets.Features({"text": datasets.Value("string")})
    if streaming:
        return datasets.IterableDataset.from_generator(iter_text_documents, features=features, gen_kwargs=gen_kwargs)
    return datasets.Dataset.from_generator(iter_text_documents, features=features, gen_kwargs=gen_kwargs)


def _column_types(dataset, where: str) -> dict[str, str]:
    if dataset.features is not None:
        return {name: getattr(feature, "dtype", type(feature).__name__) for name, feature in dataset.features.items()}
    try:  # a stream whose features are not declared: read its first record
        first = next(iter(dataset))
    except StopIteration:
        raise UsageError(f"{where} holds no records") from None
    except Exception as error:  # a stream parses lazily: malformed JSON surfaces here
        raise UsageError(f"could not read {where}: {first_line(error)}") from None
    return {name: "string" if isinstance(value, str) else type(value).__name__ for name, value in first.items()}


def _select_text(dataset, text_column: str, where: str):
    types = _column_types(dataset, where)
    if text_column not in types:
        raise UsageError(f"{where} has no column {text_column!r}; its columns are {list(types)}: pass one with --text_column")
    if types[text_column] not in ("string", "large_string"):
        raise UsageError(f"{where}: column {text_column!r} holds {types[text_column]}, not text; pass a text column with --text_column")
    dataset = dataset.select_columns([text_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def read_record_files(kind: str, files: list[str], flag: str, streaming: bool = False):
    """json, jsonl or parquet files as one dataset of records."""
    try:
        return datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)
    except Exception as error:  # malformed JSON or parquet surfaces as several exception types
        if "corresponds to no data" in str(error):  # datasets' words for files that parse to no record
            raise UsageError(f"{flag} {files[0]}{' ...' if len(files) > 1 else ''} holds no records; give files with data") from None
        raise UsageError(f"could not read {flag} {files[0]}: {first_line(error)}") from None


def load_named_dataset(name: str, config: str | None, streaming: bool):
    saved = os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            loaded = datasets.load_from_disk(name)
            if streaming:
                loaded = (
                    datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
                    if isinstance(loaded, datasets.DatasetDict)
                    else loaded.to_iterable_dataset()
                )
        else:
            loaded = datasets.load_dataset(name, config, streaming=streaming)
    except Exception as error:  # datasets raises many types here (offline, not found, bad config)
        raise UsageError(f"could not load dataset {name!r}: {first_line(error)}") from None
    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = {"train": loaded}
    if "train" not in loaded:
        raise UsageError(f"dataset {name!r} has no 'train' split; its splits are {sorted(loaded)}")
    return loaded


@dataclass(frozen=True)
class DocumentSplit:
    """Assigns each document to validation by a hash of its text.

    No document can be in both splits (identical texts hash alike), and the split does not depend on the
    order the documents come in.
    """

    validation_percentage: float

    def is_validation(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % 10_000 < round(self.validation_percentage * 100)

    def train_mask(self, batch: dict) -> list[bool]:
        return [not self.is_validation(text) for text in batch["text"]]

    def validation_mask(self, batch: dict) -> list[bool]:
        return [self.is_validation(text) for text in batch["text"]]


@dataclass(frozen=True)
class DocumentSubset:
    """Keeps the documents whose text hashes into bucket `index` of `count` (--document_subset index/count).

    Two buckets of one corpus are disjoint halves of its documents, drawn alike: a null pair, two "datasets"
    a comparison must not tell apart. The hash is keyed apart from DocumentSplit's, so a bucket holds its
    share of both splits, and its validation documents are the corpus's own validation documents in it.
    """

    index: int
    count: int

    @classmethod
    def parse(cls, value: str | None, flag: str = "--document_subset") -> "DocumentSubset | None":
        if not value:
            return None
        index, sep, count = value.partition("/")
        try:
            subset = cls(int(index), int(count))
        except ValueError:
            subset = None
        if not sep or subset is None or not 0 <= subset.index < subset.count or subset.count < 2:
            raise UsageError(f"{flag} {value}: write index/count with 0 <= index < count and count >= 2, e.g. 0/2 and 1/2 for two halves")
        return subset

    def keeps(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"clmlab-subset").digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def mask(self, batch: dict) -> list[bool]:
        return [self.keeps(text) for text in batch["text"]]


def choice_fields(doc: dict, question: str = "question", choices: str = "choices", answer: str = "answerKey"):
    """(stem, labels, texts, answer label) of a CommonsenseQA / ARC record in either layout: the original
    {"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"} or the Hub's flat
    {"question": str, "choices": {"label": [...], "text": [...]}, "answerKey"}."""
    value = doc[question]
    if isinstance(value, str):
        stem, labels, texts = value, list(doc[choices]["label"]), list(doc[choices]["text"])
    else:
        stem, labels, texts = value["stem"], [c["label"] for c in value["choices"]], [c["text"] for c in value["choices"]]
    return stem, labels, texts, doc[answer]


def builtin_documents() -> list[str]:
    """The English documentation text CPython ships (pydoc_data.topics): real prose, no download."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def load_source_documents(data_args, streaming: bool = False) -> dict:
    """The documents of each source, before any train/validation split: {"train": the training source,
    "validation": the validation source (--validation_files, or the dataset's own validation split) or None,
    "invalid_utf8_bytes": the bytes of text files read as U+FFFD (--decode_errors replace)}. Each source is a
    dataset with a single "text" column, one document per row, in source order.

    The flags were checked when they were parsed (clmlab.args.DataSourceArguments); what needs the data
    (files' bytes, columns, no documents at all) is checked here."""
    validation, replaced = None, 0
    if data_args.train_files:
        loaded = {}
        for split, files in data_args.local_files().items():
            flag = f"--{split}_files"
            kind = file_format(files, flag)
            if kind == "text":
                replaced += sum(invalid_utf8_bytes(path, data_args.decode_errors, flag) for path in files)
                sources = [(path, 0, 0) for path in files]
                if next(iter_text_documents(sources, data_args.text_documents, data_args.document_separator, "replace"), None) is None:
                    raise UsageError(f"{flag} {files[0]}{' ...' if len(files) > 1 else ''} holds no documents, only blank lines "
                                     f"or {data_args.document_separator!r} separators; give files with text")
                loaded[split] = _text_file_documents(files, data_args.text_documents, data_args.document_separator, streaming,
                                                     data_args.decode_errors)
            else:
                raw = read_record_files(kind, files, flag, streaming)
                loaded[split] = _select_text(raw, data_args.text_column, f"{flag} {files[0]}")
        train, validation = loaded["train"], loaded.get("validation")
    elif data_args.dataset_name:
        loaded = load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming)
        where = f"dataset {data_args.dataset_name!r}"
        train = _select_text(loaded["train"], data_args.text_column, where)
        if "validation" in loaded:
            validation = _select_text(loaded["validation"], data_args.text_column, where)
    else:
        texts = builtin_documents()
        train = datasets.Dataset.from_dict({"text": texts})
        if streaming:
            train = train.to_iterable_dataset()
    subset = DocumentSubset.parse(getattr(data_args, "document_subset", None))
    if subset:
        train = train.filter(subset.mask, batched=True)
        validation = validation.filter(subset.mask, batched=True) if validation is not None else None
    if isinstance(train, datasets.Dataset) and len(train) == 0:
        raise UsageError("the training data holds no documents with text; "
                         f"check --text_column {data_args.text_column!r} and the files or dataset given")
    return {"train": train, "validation": validation, "invalid_utf8_bytes": replaced}


def load_documents(data_args, streaming: bool = False) -> dict:
    """Return {"train": ..., "validation": ...} datasets with a single "text" column, one document per row,
    and "invalid_utf8_bytes": the bytes of text files read as U+FFFD (--decode_errors replace).

    Without a validation source, the validation documents are split off the training source by a hash of
    their text (DocumentSplit)."""
    sources = load_source_documents(data_args, streaming)
    train, validation = sources["train"], sources["validation"]
    if validation is None:
        split = DocumentSplit(data_args.validation_split_percentage)
        train, validation = (
            train.filter(split.train_mask, batched=True),
            train.filter(split.validation_mask, batched=True),
        )
    return {"train": train, "validation": validation, "invalid_utf8_bytes": sources["invalid_utf8_bytes"]}


def describe_sources(data_args) -> list[dict]:
    """What a run read, for run_info.json."""
    if data_args.train_files:
        described = []
        for flag, patterns in (("train_files", data_args.train_files), ("validation_files", data_args.validation_files)):
            for path in resolve_files(patterns or [], f"--{flag}"):
                described.append({"split": flag.split("_")[0], "path": path, "bytes": os.path.getsize(path)})
        return described
    if data_args.dataset_name:
        return [{"dataset_name": data_args.dataset_name, "config": data_args.dataset_config_name}]
    return [{"builtin": "pydoc_data.topics", "python": platform.python_version()}]


# --------------------------------------------------------------------------------------------------- tokens


def tokenize_documents(documents, tokenizer, num_proc: int | None = None):
    """Tokenize each document and append EOS, so packed blocks keep document boundaries visible to the model."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        # verbose=False: documents longer than the model's context are expected; packing cuts them.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    kwargs = {"batched": True, "remove_columns": ["text"]}
    if isinstance(documents, datasets.Dataset):
        kwargs.update(num_proc=num_proc, desc="Tokenizing documents")
    return documents.map(tokenize, **kwargs)


# --------------------------------------------------------------------------------------------------- blocks


def pack_documents(token_docs: Iterable[Sequence[int]], block_size: int) -> Iterator[list[int]]:
    """Concatenate tokenized documents and cut them into full blocks, carrying each remainder into the next
    block: no token is lost but the final remainder."""
    buffer: list[int] = []
    for ids in token_docs:
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= block_size:
            yield buffer[start : start + block_size]
            start += block_size
        del buffer[:start]


def flat_tokens(tokenized: datasets.Dataset) -> np.ndarray:
    """All tokens of a tokenized dataset, in order, as one array read straight from the Arrow cache."""
    if len(tokenized) == 0:  # an empty split has no columns at all
        return np.zeros(0, dtype=np.int64)
    column = tokenized.with_format("arrow")[:]["input_ids"]
    if column.num_chunks == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([chunk.flatten().to_numpy() for chunk in column.chunks])


class PackedBlocks(torch.utils.data.Dataset):
    """Fixed-size blocks over one flat token array (nanoGPT's layout).

    The same blocks as `pack_documents` makes (a test holds them equal), cut with numpy instead of a Python
    loop over every token, which matters for corpora of hundreds of millions of tokens.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, max_blocks: int | None = None, multiple_of: int = 1):
        n_blocks = len(tokens) // block_size
        if max_blocks is not None:
            n_blocks = min(n_blocks, max_blocks)
        n_blocks -= n_blocks % multiple_of
        self.blocks = tokens[: n_blocks * block_size].reshape(n_blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        # Labels are the inputs; the model shifts them. Not DataCollatorForLanguageModeling: with GPT-2's
        # pad token set to EOS it would mask every EOS out of the loss.
        ids = torch.as_tensor(self.blocks[index], dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}


class PackedStream(torch.utils.data.IterableDataset):
    """Blocks packed on the fly from a stream of tokenized documents, pass after pass without end.

    Endless on purpose: the Trainer then sees one epoch that never runs out, so no step at a pass's end
    is cut short, and a resumed run skips exactly the batches the interrupted run trained on, even after
    the stream has wrapped (each pass reshuffles with its own seed, `set_epoch(pass)`).
    """

    def __init__(self, token_docs: datasets.IterableDataset, block_size: int):
        self.token_docs = token_docs
        self.block_size = block_size

    def _documents(self) -> Iterator[list[int]]:
        for stream_pass in itertools.count():
            self.token_docs.set_epoch(stream_pass)
            empty = True
            for doc in self.token_docs:
                empty = False
                yield doc["input_ids"]
            if empty:
                return

    def __iter__(self):
        for block in pack_documents(self._documents(), self.block_size):
            ids = torch.tensor(block, dtype=torch.long)
            yield {"input_ids": ids, "labels": ids.clone()}


@dataclass
class LanguageModelingData:
    train: torch.utils.data.Dataset
    validation: PackedBlocks
    stats: dict  # documents, tokens and blocks per split, for run_info.json


def build_lm_datasets(documents: dict, tokenizer, data_args, block_size: int, seed: int, blocks_per_step: int = 1) -> LanguageModelingData:
    """Tokenize and pack both splits. Validation is always finite and fixed: the first --max_eval_samples blocks.

    Training blocks come in whole optimizer steps (`blocks_per_step` = batch x accumulation x world size):
    the last partial step of an epoch is dropped, so every step sees the same number of tokens and runs on
    different data that stop at the same step have seen exactly as many tokens.
    """
    stats: dict = {"invalid_utf8_bytes": documents.get("invalid_utf8_bytes", 0)}
    validation_tokens = tokenize_documents(documents["validation"], tokenizer, data_args.preprocessing_num_workers)
    if isinstance(validation_tokens, datasets.Dataset):
        tokens = flat_tokens(validation_tokens)
        validation = PackedBlocks(tokens, block_size, data_args.max_eval_samples)
        stats["validation"] = {"documents": len(validation_tokens), "tokens": int(len(tokens))}
    else:
        # A stream has no end to count from: keep the leading blocks, 1000 unless told otherwise.
        limit = data_args.max_eval_samples or 1000
        blocks = itertools.islice(pack_documents((d["input_ids"] for d in validation_tokens), block_size), limit)
        validation = PackedBlocks(np.fromiter(itertools.chain.from_iterable(blocks), dtype=np.int64), block_size)
        stats["validation"] = {"documents": None, "tokens": len(validation) * block_size}  # read as far as needed
    stats["validation"]["blocks"] = len(validation)

    if data_args.streaming:
        stream = documents["train"].shuffle(seed=seed, buffer_size=data_args.shuffle_buffer_size)
        train = PackedStream(tokenize_documents(stream, tokenizer), block_size)
        # A stream is counted as it is read: run_info.json's tokens_seen says how much of it the run used.
        stats["train"] = {"documents": None, "tokens": None, "blocks": None, "streaming": True}
    else:
        train_tokens = tokenize_documents(documents["train"], tokenizer, data_args.preprocessing_num_workers)
        tokens = flat_tokens(train_tokens)
        train = PackedBlocks(tokens, block_size, multiple_of=blocks_per_step)
        stats["train"] = {"documents": len(train_tokens), "tokens": int(len(tokens)), "blocks": len(train)}
        stats["fingerprint"] = {"train": train_tokens._fingerprint, "validation": validation_tokens._fingerprint}
    if len(validation) == 0:
        raise UsageError(
            f"the validation split holds fewer than block_size={block_size} tokens; raise "
            "--validation_split_percentage, give more --validation_files, or lower --block_size"
        )
    if stats["train"].get("blocks") == 0:
        raise UsageError(f"the training split holds fewer than block_size={block_size} tokens; give more data or lower --block_size")
    return LanguageModelingData(train, validation, stats)
