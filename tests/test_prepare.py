"""Prepared folders as run_prepare.py writes them: the same documents and tokens as run_clm.py's own path,
the same bytes whatever the number of workers, resumable, safe against a second prepare of the folder."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

import run_prepare
from clmlab import prepare
from clmlab.args import DataArguments
from clmlab.cli import UsageError
from clmlab.data import PackedBlocks, flat_tokens, iter_text_documents, load_documents, tokenize_documents
from clmlab.prepared import tokenizer_sha256
from clmlab.tokenizer import train_bpe_tokenizer, training_texts
from conftest import REPO, shared

EOS_TEXT = "<|endoftext|>"


def prepared(data_args, out, **kwargs) -> dict:
    kwargs = {"tokenizer_name": str(shared("tiny_gpt2_random")), "num_workers": 1, "progress": False, **kwargs}
    return prepare.prepare_corpus(data_args, out, **kwargs)


def split_tokens(folder, split) -> np.ndarray:
    """A split's tokens in part order, read from the files the manifest lists, with each part's .ends checked."""
    manifest = json.loads((folder / "manifest.json").read_text())
    dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[manifest["dtype"]])
    pieces = []
    for part in manifest["splits"][split]["parts"]:
        tokens = np.fromfile(folder / "parts" / f"{part['name']}.bin", dtype=dtype)
        ends = np.fromfile(folder / "parts" / f"{part['name']}.ends", dtype="<u8")
        assert len(tokens) == part["tokens"] and len(ends) == part["documents"]
        assert (len(ends) == 0 and len(tokens) == 0) or ends[-1] == len(tokens)
        assert np.all(tokens[ends.astype(np.int64) - 1] == manifest["eos_token_id"])  # every document ends with EOS
        pieces.append(tokens)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype)


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stories_file(tmp_path, count=400, name="stories.txt"):
    stories = [d["text"] for d in iter_text_documents([(str(shared("tinystories/tinystories_v1_valid_sample.txt")), 0, 0)],
                                                      "separator", EOS_TEXT)][:count]
    path = tmp_path / name
    path.write_text("".join(f"{s}\n{EOS_TEXT}\n" for s in stories))
    return path, stories


def data_cases(tmp_path):
    stories, texts = stories_file(tmp_path)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts[:300])))
    held_out, _ = stories_file(tmp_path, 30, "held_out.txt")
    return {
        "separator lines": DataArguments(train_files=[str(stories)]),
        "paragraphs": DataArguments(train_files=[str(shared("tinyshakespeare/input.txt"))], validation_split_percentage=10),
        "jsonl": DataArguments(train_files=[str(records)], text_column="body", validation_split_percentage=20),
        "validation files": DataArguments(train_files=[str(stories)], validation_files=[str(held_out)]),
    }


@pytest.mark.parametrize("case", ["separator lines", "paragraphs", "jsonl", "validation files"])
def test_tokens_are_run_clms_documents_joined_by_eos(tmp_path, gpt2_tokenizer, case):
    data_args = data_cases(tmp_path)[case]
    out = tmp_path / "prepared"
    manifest = prepared(data_args, out, documents_per_part=150)
    documents = load_documents(data_args)
    for split in ("train", "validation"):
        tokens = split_tokens(out, split)
        texts = list(documents[split]["text"])
        assert manifest["splits"][split]["documents"] == len(texts) > 0
        assert gpt2_tokenizer.decode(tokens.tolist(), clean_up_tokenization_spaces=False) == "".join(t + EOS_TEXT for t in texts)
        # The same ids as run_clm.py's own path, so the same blocks in corpus order.
        today = flat_tokens(tokenize_documents(documents[split], gpt2_tokenizer))
        assert np.array_equal(tokens.astype(np.int64), today)
        for block_size in (64, 1000):
            assert np.array_equal(PackedBlocks(tokens.astype(np.int64), block_size).blocks, PackedBlocks(today, block_size).blocks)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == len(gpt2_tokenizer) == 50257
    assert manifest["settings"]["validation_files"] is (case == "validation files")
    assert len(manifest["splits"]["train"]["parts"]) > 1  # several parts, read back in order


def test_worker_count_changes_no_byte(tmp_path):
    data_args = DataArguments(train_files=[str(shared("tinyshakespeare/input.txt"))])
    one = prepared(data_args, tmp_path / "one", documents_per_part=1000)
    three = prepared(data_args, tmp_path / "three", documents_per_part=1000, num_workers=3)
    assert one == three and one["content_id"] == three["content_id"]
    files = folder_bytes(tmp_path / "one")
    assert files == folder_bytes(tmp_path / "three")
    assert {"manifest.json", "tokenizer/tokenizer.json", "parts/train-00007.bin", "parts/validation-00007.ends", "parts/train-00007.json"} <= set(files)
    assert not any(prepare.TEMP_MARK in name for name in files)


def test_a_stopped_prepare_resumes_its_missing_parts_only(tmp_path, monkeypatch):
    data_args = DataArguments(train_files=[str(shared("tinyshakespeare/input.txt"))])
    clean = tmp_path / "clean"
    prepared(data_args, clean, documents_per_part=2500)
    out = tmp_path / "stopped"
    write_record = prepare.write_part_record

    def stopped_before_the_second_record(parts, stream, part, record):
        if part == 1:
            raise KeyboardInterrupt  # as if killed between the part's token files and its record
        write_record(parts, stream, part, record)

    monkeypatch.setattr(prepare, "write_part_record", stopped_before_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        prepared(data_args, out, documents_per_part=2500)
    names = set(folder_bytes(out))
    assert "manifest.json" not in names and "parts/train-00000.json" in names
    assert "parts/train-00001.bin" in names and "parts/train-00001.json" not in names  # written, not complete
    assert not any(prepare.TEMP_MARK in name for name in names)
    (out / "parts" / f"train-00002.bin{prepare.TEMP_MARK}99999-dead").write_bytes(b"half a part")  # left by a kill -9

    monkeypatch.setattr(prepare, "write_part_record", write_record)
    tokenized = []
    call = prepare.DocumentTokenizer.__call__
    monkeypatch.setattr(prepare.DocumentTokenizer, "__call__", lambda self, texts, split: tokenized.extend(texts) or call(self, texts, split))
    manifest = prepared(data_args, out, documents_per_part=2500)
    sources = sum(1 for _ in iter_text_documents([(str(shared("tinyshakespeare/input.txt")), 0, 0)], "auto", EOS_TEXT))
    assert len(tokenized) == sources - 2500  # part 0 was read past, not tokenized again
    assert folder_bytes(out) == folder_bytes(clean)
    assert manifest == json.loads((clean / "manifest.json").read_text())

    # A complete part whose tokens were damaged is made again.
    damaged = out / "parts" / "train-00000.bin"
    damaged.write_bytes(b"\0\0" + damaged.read_bytes()[2:])
    (out / "manifest.json").unlink()
    prepared(data_args, out, documents_per_part=2500)
    assert folder_bytes(out) == folder_bytes(clean)


def test_a_prepare_killed_with_its_workers_resumes_to_the_same_folder(tmp_path):
    import fcntl
    import signal
    import time

    shakespeare = str(shared("tinyshakespeare/input.txt"))
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "run_prepare.py"), "--train_files", shakespeare, "--tokenizer_name",
                                str(shared("tiny_gpt2_random")), "--documents_per_part", "400", "--num_workers", "2",
                                "--output_dir", str(out)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "parts" / "train-00000.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists()
    # Its orphaned workers end, and let go of the folder's lock.
    with open(out / prepare.LOCK_FILE, "rb") as lock:
        for _ in range(50):
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.1)
        else:
            raise AssertionError("the killed prepare's workers still hold the folder's lock")
    data_args = DataArguments(train_files=[shakespeare])
    resumed = prepared(data_args, out, documents_per_part=400, num_workers=2)
    assert resumed == prepared(data_args, tmp_path / "clean", documents_per_part=400)
    assert folder_bytes(out) == folder_bytes(tmp_path / "clean")


def test_two_prepares_at_once_leave_one_valid_folder(tmp_path):
    stories, _ = stories_file(tmp_path)
    args = ["--train_files", str(stories), "--tokenizer_name", str(shared("tiny_gpt2_random")), "--documents_per_part", "100",
            "--num_workers", "1", "--output_dir", str(tmp_path / "both")]
    both = [subprocess.Popen([sys.executable, str(REPO / "run_prepare.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(process.wait(timeout=300), *process.communicate()) for process in both]
    assert [rc for rc, _, _ in done] == [0, 0], done
    assert sum("left as it is" in err for _, _, err in done) == 1  # the second found the first's folder
    prepared(DataArguments(train_files=[str(stories)]), tmp_path / "alone", documents_per_part=100)
    assert folder_bytes(tmp_path / "both") == folder_bytes(tmp_path / "alone")
    assert "python run_clm.py --dataset_name" in done[0][1]


def test_a_vocabulary_above_65536_tokens_gives_uint32_parts(tmp_path, gpt2_tokenizer):
    from transformers import AutoTokenizer

    big = AutoTokenizer.from_pretrained(shared("tiny_gpt2_random"))
    big.add_tokens([f"<extra_{i}>" for i in range(15_400)])
    big.save_pretrained(tmp_path / "big")
    text = tmp_path / "t.txt"
    # Ids from 50,257 + 15,300: above what uint16 holds.
    text.write_text("".join(f"story {i} says <extra_{15_300 + i % 100}> twice: <extra_{15_300 + i % 100}>.\n\n" for i in range(200)))
    manifest = prepared(DataArguments(train_files=[str(text)], validation_split_percentage=10), tmp_path / "out",
                        tokenizer_name=str(tmp_path / "big"))
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == len(big) > 1 << 16
    tokens = split_tokens(tmp_path / "out", "train")
    assert tokens.max() >= 1 << 16 and (tmp_path / "out/parts/train-00000.bin").stat().st_size == 4 * len(tokens)
    assert big.decode(tokens.tolist()).startswith("story 0 says <extra_15300> twice: <extra_15300>.<|endoftext|>")
    # An id the token files cannot hold is refused, not wrapped around.
    small = prepare.DocumentTokenizer(str(tmp_path / "out" / "tokenizer"), manifest["tokenizer_sha256"], None)
    small.vocab_size = len(gpt2_tokenizer)
    with pytest.raises(UsageError, match="outside its 50,257 tokens"):
        small(["<extra_15300>"], "train")


def test_a_trained_bpe_learns_from_the_first_training_documents_only(tmp_path):
    path, _ = stories_file(tmp_path)
    data_args = DataArguments(train_files=[str(path)], tokenizer_train_documents=60, validation_split_percentage=20)
    manifest = prepared(data_args, tmp_path / "out", tokenizer_name=None, tokenizer_vocab_size=400)
    train_documents = load_documents(data_args, streaming=True)["train"]
    first = train_bpe_tokenizer(training_texts(train_documents, 60), 400)
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(first)
    assert manifest["tokenizer"] == {"trained": "byte-level BPE", "vocab_size": 400, "train_documents": 60}
    assert tokenizer_sha256(train_bpe_tokenizer(training_texts(train_documents, 61), 400)) != manifest["tokenizer_sha256"]
    assert manifest["vocab_size"] == 400 and manifest["eos_token_id"] == first.eos_token_id
    # Run again: the folder is found prepared, the tokenizer not trained again.
    assert prepared(data_args, tmp_path / "out", tokenizer_name=None, tokenizer_vocab_size=400) == manifest


def bad_cases(tmp_path):
    stories, _ = stories_file(tmp_path, 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "separators.txt").write_text(f"{EOS_TEXT}\n\n{EOS_TEXT}\n")
    (tmp_path / "records.jsonl").write_text(json.dumps({"body": "a document"}) + "\n")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    tokenizer = ["--tokenizer_name", str(shared("tiny_gpt2_random"))]
    return {
        "missing file": (["--train_files", str(tmp_path / "absent.txt")], "no such file"),
        "not UTF-8": (["--train_files", str(tmp_path / "latin1.txt")], "not UTF-8 (byte 0xe9 at offset 3)"),
        "no documents": (["--train_files", str(tmp_path / "separators.txt")], "holds no documents"),
        "no such column": (["--train_files", str(tmp_path / "records.jsonl")], "no column 'text'"),
        "no such tokenizer": (["--train_files", str(stories), "--tokenizer_name", str(tmp_path / "absent")], "could not load tokenizer"),
        "no workers": (["--train_files", str(stories), "--num_workers", "0"], "--num_workers 0: must be 1 or more"),
        "empty parts": (["--train_files", str(stories), "--documents_per_part", "0"], "--documents_per_part 0"),
        "output is a file": (["--train_files", str(stories), *tokenizer, "--output_dir", str(tmp_path / "a_file")], "is a file"),
        "output holds other files": (["--train_files", str(stories), *tokenizer, "--output_dir", str(tmp_path / "notes"),
                                      "--overwrite_output_dir", "true"], "not a prepared corpus (todo.txt)"),
    }


@pytest.mark.parametrize("case", ["missing file", "not UTF-8", "no documents", "no such column", "no such tokenizer", "no workers",
                                  "empty parts", "output is a file", "output holds other files"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, case):
    argv, message = bad_cases(tmp_path)[case]
    if "--output_dir" not in argv:
        argv = [*argv, "--output_dir", str(tmp_path / "new" / "prepared")]
    before = folder_bytes(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        run_prepare.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert folder_bytes(tmp_path) == before and not (tmp_path / "new").exists()


def test_bad_input_found_while_tokenizing_leaves_nothing_either(tmp_path, monkeypatch):
    stories, _ = stories_file(tmp_path, 50)

    def refused(self, ids):
        raise UsageError("the tokenizer gave the id 70000, outside its 50,257 tokens")

    monkeypatch.setattr(prepare.DocumentTokenizer, "_flat", refused)
    with pytest.raises(UsageError, match="outside its"):
        prepared(DataArguments(train_files=[str(stories)]), tmp_path / "new" / "prepared")
    assert not (tmp_path / "new").exists()


def test_a_folder_prepared_otherwise_is_refused_unless_overwritten(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="clmlab.prepare")
    stories, _ = stories_file(tmp_path, 200)
    out = tmp_path / "out"
    common = ["--train_files", str(stories), "--tokenizer_name", str(shared("tiny_gpt2_random")), "--output_dir", str(out),
              "--num_workers", "1"]
    first = run_prepare.main([*common, "--documents_per_part", "100"])
    files = folder_bytes(out)
    assert run_prepare.main([*common, "--documents_per_part", "100"]) == first  # already prepared: left alone
    assert "already prepared with these arguments: left as it is" in caplog.text and folder_bytes(out) == files
    with pytest.raises(SystemExit) as stopped:
        run_prepare.main([*common, "--documents_per_part", "50"])
    assert stopped.value.code == 2 and folder_bytes(out) == files
    assert "prepared with other arguments (settings.documents_per_part)" in capsys.readouterr().err
    replaced = run_prepare.main([*common, "--documents_per_part", "50", "--overwrite_output_dir", "true"])
    assert replaced["settings"]["documents_per_part"] == 50 and len(replaced["splits"]["train"]["parts"]) == 4
    assert replaced["content_id"] != first["content_id"]  # other part boundaries, other parts lists
    assert json.loads((out / "parts" / "train-00001.json").read_text())["source_documents"] == 50
