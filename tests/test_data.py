"""Documents, the document split, tokenization and packing."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from clmlab.args import DataArguments
from clmlab.cli import UsageError
from clmlab.data import (
    DocumentSplit,
    PackedBlocks,
    build_lm_datasets,
    flat_tokens,
    iter_text_documents,
    load_documents,
    pack_documents,
    tokenize_documents,
)


def documents_of(path, mode="auto", separator="<|endoftext|>"):
    return [d["text"] for d in iter_text_documents([(str(path), 0, 0)], mode, separator)]


def test_separator_lines_make_one_document_per_story(tinystories):
    stories = documents_of(tinystories)
    assert len(stories) == 1979  # the data pack's README counts 1,979 stories
    assert stories[0].startswith("Once upon a time, in a big forest, there lived a rhinoceros named Roxy.")
    assert not any("<|endoftext|>" in s for s in stories)


def test_text_document_modes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a b\nc\n\n\nd\n \ne f\n")
    assert documents_of(path, "paragraph") == ["a b\nc", "d", "e f"]
    assert documents_of(path, "line") == ["a b", "c", "d", "e f"]
    assert documents_of(path, "file") == ["a b\nc\n\n\nd\n \ne f"]
    assert documents_of(path, "auto") == documents_of(path, "paragraph")  # no separator lines in the file


def test_document_split_is_leak_free_and_order_stable(tinystories):
    stories = documents_of(tinystories)
    split = DocumentSplit(10.0)
    validation = [i for i, s in enumerate(stories) if split.is_validation(s)]
    # Pinned: the split is a function of the text alone, the same in every process, on every machine and
    # in every clmlab version, so runs made months apart hold out the same documents.
    assert len(validation) == 204 and validation[:8] == [6, 16, 21, 39, 46, 58, 64, 66]
    assert [split.is_validation(f"doc {i}") for i in range(10)] == [False, False, True] + [False] * 6 + [True]
    shuffled = stories[:]
    random.Random(0).shuffle(shuffled)
    assert {s for s in shuffled if split.is_validation(s)} == {stories[i] for i in validation}


def test_split_does_not_change_when_documents_are_reordered(tmp_path, tinystories):
    stories = documents_of(tinystories)[:400]
    shuffled = stories[:]
    random.Random(1).shuffle(shuffled)
    splits = []
    for name, order in (("in_order.txt", stories), ("shuffled.txt", shuffled)):
        path = tmp_path / name
        path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in order))
        docs = load_documents(DataArguments(train_files=[str(path)], validation_split_percentage=20))
        splits.append({split: sorted(docs[split]["text"]) for split in ("train", "validation")})
    assert splits[0] == splits[1]
    assert not set(splits[0]["train"]) & set(splits[0]["validation"])
    assert len(splits[0]["train"]) + len(splits[0]["validation"]) == 400 and len(splits[0]["validation"]) > 40


def test_duplicate_documents_land_in_the_same_split(tmp_path):
    path = tmp_path / "dup.txt"
    texts = [f"document number {i}" for i in range(200)]
    path.write_text("\n\n".join(texts + texts))
    docs = load_documents(DataArguments(train_files=[str(path)], validation_split_percentage=30))
    assert not set(docs["train"]["text"]) & set(docs["validation"]["text"])
    assert len(docs["validation"]) % 2 == 0 and len(docs["validation"]) > 0


def test_pack_documents_puts_eos_between_documents_and_keeps_every_token_but_the_last_remainder():
    eos = 0
    docs = [[1, 2, eos], [3, eos], [4, 5, 6, 7, eos], [8, eos]]
    blocks = list(pack_documents(docs, 3))
    assert blocks == [[1, 2, eos], [3, eos, 4], [5, 6, 7], [eos, 8, eos]]
    blocks = list(pack_documents(docs, 4))
    flat = [t for d in docs for t in d]
    assert all(len(b) == 4 for b in blocks)
    assert [t for b in blocks for t in b] == flat[: len(flat) // 4 * 4]  # only the final remainder is lost


def test_array_packing_equals_stream_packing():
    rng = random.Random(1)
    docs = [[rng.randrange(1, 100) for _ in range(rng.randrange(1, 40))] + [0] for _ in range(300)]
    expected = list(pack_documents(docs, 16))
    packed = PackedBlocks(np.concatenate([np.array(d) for d in docs]), 16)
    assert packed.blocks.tolist() == expected
    item = packed[3]
    assert item["input_ids"].tolist() == expected[3] == item["labels"].tolist()
    assert PackedBlocks(np.concatenate([np.array(d) for d in docs]), 16, max_blocks=5).blocks.tolist() == expected[:5]
    whole_steps = PackedBlocks(np.concatenate([np.array(d) for d in docs]), 16, multiple_of=8)
    assert len(whole_steps) == len(expected) // 8 * 8 and whole_steps.blocks.tolist() == expected[: len(whole_steps)]


def test_tokenized_documents_end_with_eos(gpt2_tokenizer, tinystories):
    docs = load_documents(DataArguments(train_files=[str(tinystories)]))
    tokens = tokenize_documents(docs["validation"], gpt2_tokenizer)
    eos = gpt2_tokenizer.eos_token_id
    assert all(ids[-1] == eos and eos not in ids[:-1] for ids in tokens["input_ids"])
    flat = flat_tokens(tokens)
    assert len(flat) == sum(len(ids) for ids in tokens["input_ids"])
    assert (flat == eos).sum() == len(docs["validation"])


def test_validation_blocks_are_fixed_by_max_eval_samples(gpt2_tokenizer, shakespeare):
    args = DataArguments(train_files=[str(shakespeare)], max_eval_samples=7)
    first = build_lm_datasets(load_documents(args), gpt2_tokenizer, args, 64, seed=1)
    second = build_lm_datasets(load_documents(args), gpt2_tokenizer, args, 64, seed=2)
    assert len(first.validation) == 7
    assert first.validation.blocks.tolist() == second.validation.blocks.tolist()
    assert first.stats["train"]["tokens"] + first.stats["validation"]["tokens"] > 300_000


def test_missing_text_column_names_the_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"doc {i}", "id": i}) for i in range(5)))
    with pytest.raises(UsageError, match=r"no column 'text'.*'content'.*--text_column"):
        load_documents(DataArguments(train_files=[str(path)]))
    with pytest.raises(UsageError, match=r"no column 'text'.*'content'.*--text_column"):
        load_documents(DataArguments(train_files=[str(path)], streaming=True))
    with pytest.raises(UsageError, match=r"column 'id' holds int64, not text"):
        load_documents(DataArguments(train_files=[str(path)], text_column="id"))
    docs = load_documents(DataArguments(train_files=[str(path)], text_column="content", validation_split_percentage=50))
    assert sorted(list(docs["train"]["text"]) + list(docs["validation"]["text"])) == [f"doc {i}" for i in range(5)]


def test_streaming_reads_the_same_documents(tinystories):
    args = DataArguments(train_files=[str(tinystories)])
    in_memory = load_documents(args)
    streamed = load_documents(args, streaming=True)
    assert [d["text"] for d in streamed["validation"]] == list(in_memory["validation"]["text"])
    assert sum(1 for _ in streamed["train"]) == len(in_memory["train"])


def test_validation_files_are_the_validation_set(tmp_path):
    train, validation = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("first training story\n<|endoftext|>\nsecond training story\n<|endoftext|>\n")
    validation.write_text("held-out story\n<|endoftext|>\n")
    docs = load_documents(DataArguments(train_files=[str(train)], validation_files=[str(validation)]))
    assert list(docs["train"]["text"]) == ["first training story", "second training story"]
    assert list(docs["validation"]["text"]) == ["held-out story"]


def test_local_dataset_folder_keeps_its_validation_split(tmp_path):
    import datasets

    saved = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"story": [f"train {i}" for i in range(30)], "n": list(range(30))}),
        "validation": datasets.Dataset.from_dict({"story": ["valid 0", "valid 1"], "n": [0, 1]}),
    })
    saved.save_to_disk(tmp_path / "ds")
    docs = load_documents(DataArguments(dataset_name=str(tmp_path / "ds"), text_column="story"))
    assert len(docs["train"]) == 30 and list(docs["validation"]["text"]) == ["valid 0", "valid 1"]
    streamed = load_documents(DataArguments(dataset_name=str(tmp_path / "ds"), text_column="story"), streaming=True)
    assert [d["text"] for d in streamed["validation"]] == ["valid 0", "valid 1"]
    with pytest.raises(UsageError, match=r"could not load dataset 'no-such/dataset-offline'"):
        load_documents(DataArguments(dataset_name="no-such/dataset-offline"))


def test_malformed_json_is_a_usage_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut sho\n')
    for streaming in (False, True):
        with pytest.raises(UsageError, match=r"could not read --train_files .*broken.jsonl"):
            load_documents(DataArguments(train_files=[str(path)], streaming=streaming))
