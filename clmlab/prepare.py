"""Tokenize a corpus once into a prepared folder (the layout is in clmlab.prepared), to train on many times.

The documents are exactly those run_clm.py reads for the same data arguments (clmlab.data), tokenized as
run_clm.py tokenizes them (each document's ids, then EOS). The source is read once, as a stream, in chunks
of documents that worker processes tokenize while the main process writes the parts in source order, so the
folder is byte-identical whatever the number of workers, and memory does not grow with the corpus.

Every file is written under a temporary name and renamed into place; a part's record is written after its
token files and the manifest after every part, so a prepare stopped at any moment leaves nothing that looks
complete, and running it again keeps the complete parts and writes the rest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from clmlab import data
from clmlab.cli import UsageError, first_line, require
from clmlab.prepared import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PARTS_DIR,
    TOKENIZER_DIR,
    part_name,
    token_dtype,
    tokenizer_sha256,
)
from clmlab.tokenizer import load_tokenizer, train_bpe_tokenizer, training_texts

LOCK_FILE = ".prepare.lock"
TEMP_MARK = ".tmp-"  # in the name of every file or folder that is still being written
# A chunk is what one worker tokenizes at a time: large enough that passing it between processes costs
# little next to tokenizing it, small enough that the chunks in flight hold a few MB whatever the corpus.
CHUNK_DOCUMENTS = 1000
CHUNK_CHARACTERS = 1 << 20
logger = logging.getLogger(__name__)


@dataclass
class PrepareArguments:
    output_dir: str = field(metadata={"help": "The prepared folder to write (train from it with run_clm.py --dataset_name DIR)."})
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer (Hub id or local folder). Unset: a byte-level BPE of --tokenizer_vocab_size tokens, trained "
                  "on the first --tokenizer_train_documents training documents."},
    )
    tokenizer_vocab_size: int = field(
        default=8192, metadata={"help": "Vocabulary size of the BPE tokenizer trained when no --tokenizer_name is given."}
    )
    num_workers: int | None = field(
        default=None,
        metadata={"help": "Tokenizing processes. Unset: --preprocessing_num_workers if given, else one per core (os.cpu_count()). "
                  "The folder is the same whatever the number."},
    )
    documents_per_part: int = field(
        default=50_000,
        metadata={"help": "Source documents per part file: the unit a stopped prepare resumes from."},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a folder prepared with other arguments or another tokenizer, complete or not."}
    )

    def __post_init__(self):
        require(bool(self.output_dir and self.output_dir.strip()), "output_dir", repr(self.output_dir), "give the folder to write")
        require(self.tokenizer_vocab_size >= 257, "tokenizer_vocab_size", self.tokenizer_vocab_size,
                "a byte-level BPE needs at least 257 tokens (256 bytes + EOS)")
        require(self.num_workers is None or self.num_workers >= 1, "num_workers", self.num_workers, "must be 1 or more")
        require(self.documents_per_part >= 1, "documents_per_part", self.documents_per_part, "must be 1 or more")


# --------------------------------------------------------------------------------------------------- files


def _temporary(path: Path) -> Path:
    """A name beside `path` that no other process uses: two prepares of one folder never share a file."""
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _write_atomically(path: Path, payload: bytes) -> None:
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def _canonical_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class _PartFile:
    """One split's part: its tokens (.bin) and document ends (.ends), written under temporary names and
    renamed into place whole."""

    def __init__(self, parts: Path, name: str):
        self.name = name
        self.final = {suffix: parts / f"{name}{suffix}" for suffix in (".bin", ".ends")}
        self.temporary = {suffix: _temporary(path) for suffix, path in self.final.items()}
        self.handles = {suffix: open(path, "wb") for suffix, path in self.temporary.items()}
        self.digests = {suffix: hashlib.sha256() for suffix in self.final}
        self.tokens = self.documents = 0

    def _write(self, suffix: str, payload: bytes) -> None:
        self.handles[suffix].write(payload)
        self.digests[suffix].update(payload)

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._write(".bin", tokens.tobytes())
        self._write(".ends", (self.tokens + np.cumsum(lengths, dtype=np.int64)).astype("<u8").tobytes())
        self.tokens += len(tokens)
        self.documents += len(lengths)

    def commit(self) -> dict:
        for suffix, handle in self.handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            os.replace(self.temporary[suffix], self.final[suffix])
        return {"name": self.name, "tokens": self.tokens, "documents": self.documents,
                "sha256": self.digests[".bin"].hexdigest(), "ends_sha256": self.digests[".ends"].hexdigest()}

    def discard(self) -> None:
        for suffix, handle in self.handles.items():
            handle.close()
            self.temporary[suffix].unlink(missing_ok=True)


def write_part_record(parts: Path, stream: str, part: int, record: dict) -> None:
    """The record that makes part `part` of a source stream complete, written after its token files."""
    _write_atomically(parts / f"{part_name(stream, part)}.json", _json_bytes(record))


def _part_is_complete(parts: Path, record: dict, dtype: np.dtype) -> bool:
    """A record is only trusted with its files beside it, of the right sizes and checksums."""
    for entry in record["splits"].values():
        tokens, ends = parts / f"{entry['name']}.bin", parts / f"{entry['name']}.ends"
        try:
            if tokens.stat().st_size != entry["tokens"] * dtype.itemsize or ends.stat().st_size != entry["documents"] * 8:
                return False
        except OSError:
            return False
        if _file_sha256(tokens) != entry["sha256"] or _file_sha256(ends) != entry["ends_sha256"]:
            return False
    return True


# --------------------------------------------------------------------------------------------------- the folder


class _FolderLock:
    """An exclusive flock on a file in the folder: two prepares of one folder take turns."""

    def __init__(self, folder: Path):
        self.folder, self.handle = folder, None

    def __enter__(self):
        path = self.folder / LOCK_FILE
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+b")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info(f"another prepare of {self.folder} is running: waiting for it to end")
                fcntl.flock(handle, fcntl.LOCK_EX)
            # The prepare we waited for may have removed the folder (it failed on bad input): lock the new one.
            try:
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    self.handle = handle
                    return self
            except FileNotFoundError:
                pass
            handle.close()

    def __exit__(self, *exc):
        self.handle.close()


def _is_ours(name: str) -> bool:
    return name in (TOKENIZER_DIR, PARTS_DIR, MANIFEST, LOCK_FILE) or TEMP_MARK in name


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _matches(manifest: dict | None, recipe: dict, tokenizer_sha: str | None) -> bool:
    if not manifest or any(manifest.get(key) != value for key, value in recipe.items() if key != "tokenizer"):
        return False
    if tokenizer_sha is not None:  # a named tokenizer: the same one by content, however it was named
        return manifest.get("tokenizer_sha256") == tokenizer_sha
    return manifest.get("tokenizer") == recipe["tokenizer"]


def _differences(manifest: dict, recipe: dict, tokenizer_sha: str | None) -> str:
    changed = [f"settings.{key}" for key in sorted(set(manifest.get("settings") or {}) | set(recipe["settings"]))
               if (manifest.get("settings") or {}).get(key) != recipe["settings"].get(key)]
    changed += [key for key in ("format", "format_version", "source") if manifest.get(key) != recipe[key]]
    if (tokenizer_sha is not None and manifest.get("tokenizer_sha256") != tokenizer_sha) or \
            (tokenizer_sha is None and manifest.get("tokenizer") != recipe["tokenizer"]):
        changed.append("tokenizer")
    return ", ".join(changed) or "unreadable manifest"


def _clear(folder: Path) -> None:
    """Remove a prepared folder's contents, the manifest first so that it stops looking complete at once."""
    (folder / MANIFEST).unlink(missing_ok=True)
    for name in sorted(os.listdir(folder)):
        if name != LOCK_FILE and _is_ours(name):
            path = folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _remove_stale_temporaries(folder: Path) -> None:
    """Files a killed prepare left half-written; only the lock holder writes, so none is in use."""
    for directory in (folder, folder / PARTS_DIR):
        if directory.is_dir():
            for name in os.listdir(directory):
                if TEMP_MARK in name:
                    path = directory / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------- sources


def describe_source(data_args) -> list[dict]:
    """What the folder was made from, precisely enough to tell when it changed: clmlab.data.describe_sources
    with each local file's modification time, a Hub dataset's commit, a local dataset folder's files."""
    described = data.describe_sources(data_args)
    for entry in described:
        if "path" in entry:
            entry["mtime_ns"] = os.stat(entry["path"]).st_mtime_ns
        elif "dataset_name" in entry:
            name = entry["dataset_name"]
            if os.path.isdir(name):
                # Not the cache files datasets writes beside a saved dataset's own when it filters it.
                entry["dataset_name"] = os.path.abspath(name)
                entry["files"] = [{"path": str(path.relative_to(name)), "bytes": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
                                  for path in sorted(Path(name).rglob("*")) if path.is_file() and not path.name.startswith("cache-")]
            else:
                entry["revision"] = _hub_revision(name, entry.get("config"))
    return described


def _hub_revision(name: str, config: str | None) -> str | None:
    import datasets

    try:  # for a Hub repository, the builder's hash is the commit it resolved to
        return datasets.load_dataset_builder(name, config).hash
    except Exception:  # offline with no cache, or a name that is not on the Hub: the load itself reports it
        return None


class _SourceStream:
    """The document texts of one source in order, and how far the reading has come: bytes of local text
    files (read here line by line, as clmlab.data reads them), else documents."""

    def __init__(self, name: str, documents, data_args, files: list[str] | None):
        self.name, self.documents, self.files = name, documents, files
        self.mode, self.separator, self.errors = data_args.text_documents, data_args.document_separator, data_args.decode_errors
        self.total_bytes = sum(os.path.getsize(path) for path in files) if files else None
        self.total_documents = len(documents) if not files and hasattr(documents, "__len__") else None
        self.bytes_read = self.documents_read = 0
        self.subset = data.DocumentSubset.parse(getattr(data_args, "document_subset", None))

    def position(self, by_bytes: bool) -> int:
        return self.bytes_read if by_bytes else self.documents_read

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = self.documents_read = 0
        if self.files:
            done = 0
            for path in self.files:
                size, read = os.path.getsize(path), 0
                for document in data.iter_text_documents([(path, size, 0)], self.mode, self.separator, self.errors):
                    # Within a file, the text's own bytes: the separators and blank lines between documents are not counted.
                    read += len(document["text"].encode("utf-8")) + 1
                    self.bytes_read, self.documents_read = done + min(read, size), self.documents_read + 1
                    if self.subset is None or self.subset.keeps(document["text"]):
                        yield document["text"]
                done += size
                self.bytes_read = done
            return
        try:
            for self.documents_read, document in enumerate(self.documents, start=1):
                yield document["text"]
        except Exception as error:  # a stream parses lazily: a malformed record surfaces here
            raise UsageError(f"could not read the {self.name} source: {first_line(error)}") from None


def _text_files(data_args) -> dict[str, list[str]]:
    """The local text files of each source, which are read here directly; other sources go through datasets."""
    if not data_args.train_files:
        return {}
    return {split: files for split, files in data_args.local_files().items()
            if data.file_format(files, f"--{split}_files") == "text"}


def _chunks(texts: Iterator[str], documents_per_part: int) -> Iterator[tuple[int, list[str], bool]]:
    """(part, texts, whether the part ends with this chunk); no chunk holds documents of two parts."""
    part, in_part, chunk, characters = 0, 0, [], 0
    for text in texts:
        chunk.append(text)
        characters += len(text)
        in_part += 1
        if in_part == documents_per_part or len(chunk) == CHUNK_DOCUMENTS or characters >= CHUNK_CHARACTERS:
            yield part, chunk, in_part == documents_per_part
            chunk, characters = [], 0
            if in_part == documents_per_part:
                part, in_part = part + 1, 0
    if chunk:
        yield part, chunk, True


# --------------------------------------------------------------------------------------------------- tokens


class DocumentTokenizer:
    """Tokenizes chunks of documents in one process, with the tokenizer read back from the prepared folder,
    once: each document's ids, then EOS, as clmlab.data.tokenize_documents makes them.

    The Rust tokenizer's batch encoding is used directly (it skips the Python layer and the offsets): on the
    first chunk it is checked against the tokenizer's own call, and that call is used if they differ."""

    def __init__(self, tokenizer_dir: str, expected_sha256: str, validation_percentage: float | None):
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer_sha256(tokenizer) != expected_sha256:
            raise RuntimeError(f"the tokenizer saved in {tokenizer_dir} does not read back as the one being prepared with")
        self.tokenizer, self.backend = tokenizer, tokenizer.backend_tokenizer
        self.eos, self.vocab_size = tokenizer.eos_token_id, len(tokenizer)
        self.dtype = token_dtype(self.vocab_size)
        self.split = data.DocumentSplit(validation_percentage) if validation_percentage is not None else None
        self.checked = False

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            ids = [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
            if self.checked:
                return ids
            self.checked = True
            if ids == self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
                return ids
            logger.warning("the Rust tokenizer's batch encoding differs from the tokenizer's own call: using the slower call")
            self.backend = None
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]

    def _flat(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain(doc, (self.eos,)) for doc in ids),
                             dtype=np.int64, count=int(lengths.sum()))
        if len(tokens) and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            bad = int(tokens.max() if tokens.max() >= self.vocab_size else tokens.min())
            raise UsageError(f"the tokenizer gave the id {bad}, outside its {self.vocab_size:,} tokens (len(tokenizer)); "
                             "the token files could not hold it: use a tokenizer whose ids run from 0 to len(tokenizer) - 1")
        return tokens.astype(self.dtype), lengths

    def __call__(self, texts: list[str], split: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{split: (tokens, document lengths)}: all to `split`, or, with None, to train and validation by hash."""
        ids = self._ids(texts)
        if split is not None:
            return {split: self._flat(ids)}
        held_out = [self.split.is_validation(text) for text in texts]
        return {"train": self._flat([doc for doc, out in zip(ids, held_out) if not out]),
                "validation": self._flat([doc for doc, out in zip(ids, held_out) if out])}


_worker: DocumentTokenizer | None = None


def _start_worker(inherited_lock: int | None, tokenizer_dir: str, expected_sha256: str, validation_percentage: float | None) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: the main one stops the workers
    if inherited_lock is not None:
        # A forked worker holds the folder lock's file too, and flock holds until every copy is closed: a
        # worker that outlived a killed prepare would keep the folder locked.
        os.close(inherited_lock)
    parent = os.getppid()

    def end_with_the_parent():
        # The workers share the task pipe among themselves, so a killed parent leaves them waiting forever.
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=end_with_the_parent, daemon=True).start()
    _worker = DocumentTokenizer(tokenizer_dir, expected_sha256, validation_percentage)


def _tokenize_in_worker(texts: list[str], split: str | None):
    return _worker(texts, split)


class _Tokenizers:
    """Chunks tokenized in `num_workers` processes (or here, for one), their results taken in submission order."""

    def __init__(self, num_workers: int, lock: _FolderLock, *init_args):
        self.pool = None
        if num_workers == 1:
            self.local = DocumentTokenizer(*init_args)
            return
        fork = "fork" in multiprocessing.get_all_start_methods()
        # fork: the workers start at once with the modules already imported; spawn where there is no fork.
        context = multiprocessing.get_context("fork" if fork else "spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context, initializer=_start_worker,
                                                           initargs=(lock.handle.fileno() if fork else None, *init_args))
        # Start the workers now, before this process has other threads (a progress bar's) to fork with, and
        # so that a worker that cannot start fails here.
        self.pool.submit(int).result()

    def submit(self, texts: list[str], split: str | None) -> concurrent.futures.Future:
        if self.pool is not None:
            return self.pool.submit(_tokenize_in_worker, texts, split)
        future = concurrent.futures.Future()
        future.set_result(self.local(texts, split))
        return future

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)


@contextlib.contextmanager
def _single_threaded_rust():
    """Each worker process is one core: the Rust tokenizer's own thread pool would make cores x workers threads."""
    saved = {name: os.environ.get(name) for name in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    os.environ.update(TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --------------------------------------------------------------------------------------------------- writing


class _Progress:
    """Bytes read out of the total when every source is local text files, else documents (out of the total
    where the source knows it); documents/s and tokens/s of what is tokenized."""

    def __init__(self, streams: list[_SourceStream], enabled: bool, description: str):
        from tqdm.auto import tqdm

        self.by_bytes = all(stream.files for stream in streams)
        totals = [stream.total_bytes if self.by_bytes else stream.total_documents for stream in streams]
        total = sum(totals) if None not in totals else None
        self.bar = tqdm(total=total, unit="B" if self.by_bytes else "doc", unit_scale=True, unit_divisor=1024 if self.by_bytes else 1000,
                        desc=description, disable=not enabled, dynamic_ncols=True, smoothing=0.05)
        self.started = time.perf_counter()
        self.documents = self.tokens = 0
        self.base = 0  # position at which the current stream starts

    def advance(self, position: int, documents: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bar.update(max(0, self.base + position - self.bar.n))
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


class _PartWriter:
    """The part of a source stream being written: one part file per split it feeds."""

    def __init__(self, parts: Path, stream: str, part: int, splits: tuple[str, ...]):
        self.stream, self.part, self.source_documents = stream, part, 0
        self.files = {}
        try:
            for split in splits:
                self.files[split] = _PartFile(parts, part_name(split, part))
        except BaseException:
            self.discard()
            raise

    def write(self, results: dict, documents: int) -> None:
        self.source_documents += documents
        for split, (tokens, lengths) in results.items():
            self.files[split].write(tokens, lengths)

    def commit(self) -> dict:
        return {split: file.commit() for split, file in self.files.items()}

    def discard(self) -> None:
        for file in self.files.values():
            file.discard()


def _write_parts(folder: Path, streams: list[_SourceStream], complete: dict, tokenizers: _Tokenizers, hash_split: bool,
                 documents_per_part: int, record_base: dict, progress: _Progress, max_in_flight: int) -> dict:
    """Read every stream, tokenize the documents of the parts not yet complete, write those parts; return
    every part's record by (stream, part)."""
    parts = folder / PARTS_DIR
    records = dict(complete)
    writer: _PartWriter | None = None
    in_flight: collections.deque = collections.deque()

    def take_oldest():
        nonlocal writer
        stream, part, ends_part, position, documents, future = in_flight.popleft()
        results = future.result()
        if writer is None:
            splits = ("train", "validation") if stream == "train" and hash_split else (stream,)
            writer = _PartWriter(parts, stream, part, splits)
        writer.write(results, documents)
        progress.advance(position, documents, sum(len(tokens) for tokens, _ in results.values()))
        if ends_part:
            record = {"stream": stream, "part": part, "source_documents": writer.source_documents, **record_base,
                      "splits": writer.commit()}
            writer = None
            write_part_record(parts, stream, part, record)
            records[stream, part] = record

    try:
        for stream in streams:
            progress.base = progress.bar.n
            split = None if stream.name == "train" and hash_split else stream.name
            for part, texts, ends_part in _chunks(iter(stream), documents_per_part):
                if (stream.name, part) in complete:
                    progress.advance(stream.position(progress.by_bytes))
                    continue
                future = tokenizers.submit(texts, split)
                in_flight.append((stream.name, part, ends_part, stream.position(progress.by_bytes), len(texts), future))
                while len(in_flight) > max_in_flight:
                    take_oldest()
            while in_flight:
                take_oldest()
            progress.advance(stream.position(progress.by_bytes))
    except BaseException:
        if writer is not None:
            writer.discard()
        for *_, future in in_flight:
            future.cancel()
        raise
    return records


def _split_summary(records: dict, split: str) -> dict:
    entries = [record["splits"][split] for _, record in sorted(records.items(), key=lambda item: (item[0][0] != "train", item[0][1]))
               if split in record["splits"]]
    return {"tokens": sum(e["tokens"] for e in entries), "documents": sum(e["documents"] for e in entries),
            "parts": [{key: e[key] for key in ("name", "tokens", "documents", "sha256")} for e in entries]}


def content_id(manifest: dict) -> str:
    """Names the token content, not where it lies or how it was made: equal ids, equal tokens."""
    return _canonical_sha256({key: manifest[key] for key in ("dtype", "eos_token_id", "vocab_size", "tokenizer_sha256")} |
                             {"splits": {split: manifest["splits"][split]["parts"] for split in sorted(manifest["splits"])}})


# --------------------------------------------------------------------------------------------------- the prepare


def prepare_corpus(data_args, output_dir: str | os.PathLike, tokenizer_name: str | None = None, tokenizer_vocab_size: int = 8192,
                   num_workers: int | None = None, documents_per_part: int = 50_000, progress: bool = True,
                   overwrite: bool = False) -> dict:
    """Tokenize the documents `data_args` names (clmlab.args.DataArguments, read as run_clm.py reads them)
    into the prepared folder `output_dir`; return its manifest.

    A folder already prepared with these arguments is left as it is; one partly prepared with them is
    completed, keeping its complete parts; one prepared with other arguments or another tokenizer is
    refused unless `overwrite`; a folder holding anything else is never touched."""
    folder = Path(output_dir)
    require(not folder.exists() or folder.is_dir(), "output_dir", output_dir, "is a file; give a folder")
    if data_args.dataset_name and (Path(data_args.dataset_name) / MANIFEST).is_file():
        raise UsageError(f"--dataset_name {data_args.dataset_name} is a prepared folder already; train from it with run_clm.py")
    _refuse_foreign(folder, output_dir)
    recipe = _recipe(data_args, tokenizer_name, tokenizer_vocab_size, documents_per_part)
    named = load_tokenizer(tokenizer_name) if tokenizer_name else None
    named_sha = tokenizer_sha256(named) if named is not None else None
    # A part's record names what it was made from; a named tokenizer by its content, not by its name.
    recipe_sha = _canonical_sha256({**recipe, "tokenizer": named_sha or recipe["tokenizer"]})
    manifest = _read_json(folder / MANIFEST)
    if _matches(manifest, recipe, named_sha):
        logger.info(f"{folder} is already prepared with these arguments: left as it is")
        return manifest

    # Reading the sources checks them (files, UTF-8, columns, no documents) before anything is written.
    sources = data.load_source_documents(data_args, streaming=bool(data_args.train_files) or data_args.streaming)
    text_files = _text_files(data_args)
    streams = [_SourceStream(name, sources[name], data_args, text_files.get(name))
               for name in ("train", "validation") if sources[name] is not None]
    hash_split = sources["validation"] is None
    num_workers = num_workers or data_args.preprocessing_num_workers or os.cpu_count() or 1

    created = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)  # the top folder this call makes
    fresh = wrote_a_part = False
    try:
        with _FolderLock(folder) as lock:
            # Decided again under the lock: another prepare of the folder may have run meanwhile.
            fresh = set(os.listdir(folder)) <= {LOCK_FILE}
            manifest = _read_json(folder / MANIFEST)
            if _matches(manifest, recipe, named_sha):
                logger.info(f"{folder} was prepared with these arguments meanwhile: left as it is")
                return manifest
            _refuse_foreign(folder, output_dir)
            _remove_stale_temporaries(folder)
            records = _read_records(folder / PARTS_DIR)
            if manifest is not None or any(r.get("recipe_sha256") != recipe_sha for r in records.values()):
                if not overwrite:
                    what = f"with other arguments ({_differences(manifest, recipe, named_sha)})" if manifest is not None else \
                        "partly, with other arguments or another tokenizer"
                    raise UsageError(f"--output_dir {output_dir} holds a corpus prepared {what}; choose a new --output_dir, "
                                     "or pass --overwrite_output_dir true to replace it")
                logger.info(f"--overwrite_output_dir: removing the corpus prepared in {folder} with other arguments")
                _clear(folder)
                records = {}

            tokenizer = named or _trained_tokenizer(folder, records, streams, hash_split, data_args, tokenizer_vocab_size)
            sha = tokenizer_sha256(tokenizer)
            _save_tokenizer(tokenizer, folder / TOKENIZER_DIR, sha)
            dtype = token_dtype(len(tokenizer))
            parts = folder / PARTS_DIR
            parts.mkdir(exist_ok=True)
            complete = {key: r for key, r in records.items() if r.get("tokenizer_sha256") == sha and _part_is_complete(parts, r, dtype)}
            for key in records.keys() - complete.keys():
                (parts / f"{part_name(*key)}.json").unlink(missing_ok=True)
            if complete:
                logger.info(f"keeping {len(complete)} complete part(s) of an earlier prepare; reading past their documents")
            wrote_a_part = bool(complete)

            started = time.perf_counter()
            with _single_threaded_rust():
                tokenizers = _Tokenizers(num_workers, lock, str(folder / TOKENIZER_DIR), sha,
                                         data_args.validation_split_percentage if hash_split else None)
                bar = _Progress(streams, progress, f"Preparing {folder.name}")
                try:
                    records = _write_parts(folder, streams, complete, tokenizers, hash_split, documents_per_part,
                                           {"recipe_sha256": recipe_sha, "tokenizer_sha256": sha, "dtype": dtype.name},
                                           bar, max_in_flight=2 * num_workers + 1)
                except BaseException:
                    wrote_a_part = wrote_a_part or any(p.suffix == ".json" for p in parts.iterdir())
                    tokenizers.close(cancel=True)
                    raise
                finally:
                    bar.close()
                tokenizers.close()
            wrote_a_part = True
            seconds = time.perf_counter() - started
            logger.info(f"tokenized {bar.documents:,} documents, {bar.tokens:,} tokens in {seconds:.1f} s: "
                        f"{bar.documents / max(seconds, 1e-9):,.0f} documents/s, {bar.tokens / max(seconds, 1e-9):,.0f} tokens/s "
                        f"({num_workers} worker{'s' if num_workers > 1 else ''})")

            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                        "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer), "tokenizer_sha256": sha,
                        "tokenizer": recipe["tokenizer"], "source": recipe["source"], "settings": recipe["settings"],
                        "invalid_utf8_bytes": sources["invalid_utf8_bytes"],
                        "splits": {split: _split_summary(records, split) for split in ("train", "validation")}}
            manifest["content_id"] = content_id(manifest)
            if manifest["splits"]["train"]["documents"] == 0:
                wrote_a_part = False
                raise UsageError("the training data holds no documents with text; check --text_column "
                                 f"{data_args.text_column!r} and the files or dataset given")
            if manifest["splits"]["validation"]["documents"] == 0:
                logger.warning("the validation split holds no documents: run_clm.py will refuse this folder; raise "
                               "--validation_split_percentage or give --validation_files")
            _write_atomically(folder / MANIFEST, _json_bytes(manifest))
            return manifest
    except UsageError:
        # Bad input leaves nothing behind; parts already complete are kept for the next run to resume from.
        if fresh and not wrote_a_part:
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            else:
                _clear(folder)
                (folder / LOCK_FILE).unlink(missing_ok=True)
        raise


def _refuse_foreign(folder: Path, output_dir) -> None:
    foreign = sorted(name for name in os.listdir(folder) if not _is_ours(name)) if folder.is_dir() else []
    if foreign:
        raise UsageError(f"--output_dir {output_dir} holds files that are not a prepared corpus ({', '.join(foreign[:3])}"
                         f"{' ...' if len(foreign) > 3 else ''}); give a new or empty folder")


def _recipe(data_args, tokenizer_name: str | None, tokenizer_vocab_size: int, documents_per_part: int) -> dict:
    """What the folder's tokens depend on; the manifest holds it, and a folder with another is not resumed."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name_or_path": os.path.abspath(tokenizer_name) if os.path.isdir(tokenizer_name) else tokenizer_name} if tokenizer_name else
        {"trained": "byte-level BPE", "vocab_size": tokenizer_vocab_size, "train_documents": data_args.tokenizer_train_documents},
        "source": describe_source(data_args),
        "settings": {
            "text_column": data_args.text_column,
            "text_documents": data_args.text_documents,
            "document_separator": data_args.document_separator,
            "validation_split_percentage": data_args.validation_split_percentage,
            "validation_files": bool(data_args.validation_files),
            "decode_errors": data_args.decode_errors,
            "documents_per_part": documents_per_part,
            # Only when given: folders prepared before the flag existed keep their recipe.
            **({"document_subset": data_args.document_subset} if getattr(data_args, "document_subset", None) else {}),
        },
    }


def _read_records(parts: Path) -> dict:
    records = {}
    for path in sorted(parts.glob("*.json")) if parts.is_dir() else []:
        record = _read_json(path)
        if isinstance(record, dict) and {"stream", "part", "splits"} <= record.keys():
            records[record["stream"], record["part"]] = record
    return records


def _trained_tokenizer(folder: Path, records: dict, streams: list[_SourceStream], hash_split: bool, data_args, vocab_size: int):
    """The folder's own tokenizer when its parts were made with these arguments (training again would give
    the same one), else a byte-level BPE trained on the first --tokenizer_train_documents training documents."""
    if records and (folder / TOKENIZER_DIR).is_dir():
        return load_tokenizer(str(folder / TOKENIZER_DIR))
    train = next(s for s in streams if s.name == "train")
    split = data.DocumentSplit(data_args.validation_split_percentage)
    texts = (t for t in train if not (hash_split and split.is_validation(t)))
    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer(training_texts(({"text": t} for t in texts), data_args.tokenizer_train_documents), vocab_size)
    logger.info(f"trained a byte-level BPE tokenizer of {len(tokenizer):,} tokens on the first "
                f"{data_args.tokenizer_train_documents:,} training documents in {time.perf_counter() - started:.1f} s")
    return tokenizer


def _save_tokenizer(tokenizer, target: Path, sha: str) -> None:
    """Save the tokenizer whole or not at all: into a temporary folder, then renamed into place."""
    if target.is_dir():
        with contextlib.suppress(Exception):
            if tokenizer_sha256(load_tokenizer(str(target))) == sha:
                return
    temporary = _temporary(target)
    try:
        tokenizer.save_pretrained(str(temporary))
        if target.exists():
            old = _temporary(target)
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def summary(manifest: dict, output_dir: str | os.PathLike, seconds: float) -> list[str]:
    """What a prepared folder holds and how to train from it, for the console. The tokenizing throughput is
    logged by prepare_corpus, which alone knows how much it tokenized (nothing, for a folder already prepared)."""
    lines = [f"Prepared {output_dir} in {seconds:.1f} s: {manifest['vocab_size']:,}-token tokenizer, {manifest['dtype']} tokens"]
    for split, about in manifest["splits"].items():
        lines.append(f"  {split + ':':<12}{about['documents']:>12,} documents {about['tokens']:>14,} tokens  {len(about['parts'])} part(s)")
    lines.append(f"  content id {manifest['content_id']}")
    lines.append(f"Train from it: python run_clm.py --dataset_name {output_dir} --max_train_tokens N ...")
    return lines


# --------------------------------------------------------------------------------------------------- on first use


def cache_folder(data_args, tokenizer_name: str | None, tokenizer_vocab_size: int) -> Path:
    """Where a run prepares a corpus it was not given prepared: in the datasets cache, keyed by what the tokens
    depend on (the sources with their sizes and times, the split settings, the tokenizer), so another run on
    the same data and tokenizer finds it prepared."""
    import datasets

    recipe = _recipe(data_args, tokenizer_name, tokenizer_vocab_size, documents_per_part=50_000)
    if tokenizer_name:
        recipe["tokenizer"] = tokenizer_sha256(load_tokenizer(tokenizer_name))
    return Path(datasets.config.HF_DATASETS_CACHE) / "clmlab-prepared" / _canonical_sha256(recipe)[:20]


def prepare_on_first_use(data_args, folder: str | os.PathLike, tokenizer_name: str | None, tokenizer_vocab_size: int,
                         main_process: bool, poll_seconds: float = 2.0) -> str:
    """The prepared folder for a run: made by the main process if it is not there yet (reused if it is), while
    every other process, on every node, waits for its manifest by polling the shared file system, not inside
    a collective that a distributed timeout would end."""
    folder = Path(folder)
    if main_process:
        prepare_corpus(data_args, folder, tokenizer_name=tokenizer_name, tokenizer_vocab_size=tokenizer_vocab_size,
                       progress=True)
        return str(folder)
    recipe = _recipe(data_args, tokenizer_name, tokenizer_vocab_size, documents_per_part=50_000)
    named_sha = tokenizer_sha256(load_tokenizer(tokenizer_name)) if tokenizer_name else None
    started = last_said = time.monotonic()
    while not _matches(_read_json(folder / MANIFEST), recipe, named_sha):
        if time.monotonic() - last_said >= 60:
            logger.warning(f"waiting for the main process to prepare {folder} ({time.monotonic() - started:.0f} s)")
            last_said = time.monotonic()
        time.sleep(poll_seconds)
    return str(folder)
