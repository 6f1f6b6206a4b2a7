"""Training from a prepared folder: the order is a pure function of (seed, global sample index), the same
batches on any number of processes for one global batch, resume in constant time."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from clmlab import prepared
from clmlab.data import PackedBlocks
from conftest import logged, run_script, shared, stop_at_step

TINY = ["--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
        "--block_size", "64", "--learning_rate", "3e-3", "--disable_tqdm", "true", "--seed", "3",
        "--max_eval_samples", "4", "--logging_steps", "1", "--eval_steps", "100", "--save_steps", "100"]


def write_prepared(folder, tokenizer, splits: dict[str, list[list[int]]], documents_per_part: int = 3):
    """A prepared folder written by hand from the format's description (clmlab/prepared.py), so the reader
    is tested against the format, not against the writer."""
    (folder / prepared.PARTS_DIR).mkdir(parents=True)
    tokenizer.save_pretrained(folder / prepared.TOKENIZER_DIR)
    dtype = prepared.token_dtype(len(tokenizer))
    manifest_splits = {}
    for split, documents in splits.items():
        parts = []
        for p, first in enumerate(range(0, len(documents), documents_per_part)):
            docs = documents[first : first + documents_per_part]
            tokens = np.concatenate([np.asarray(d, dtype=dtype) for d in docs])
            name = prepared.part_name(split, p)
            (folder / prepared.PARTS_DIR / f"{name}.bin").write_bytes(tokens.tobytes())
            (folder / prepared.PARTS_DIR / f"{name}.ends").write_bytes(np.cumsum([len(d) for d in docs]).astype("<u8").tobytes())
            parts.append({"name": name, "tokens": len(tokens), "documents": len(docs), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()})
        manifest_splits[split] = {"tokens": sum(p["tokens"] for p in parts), "documents": len(documents), "parts": parts}
    manifest = {"format": prepared.FORMAT, "format_version": prepared.FORMAT_VERSION, "dtype": dtype.name,
                "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer), "tokenizer_sha256": prepared.tokenizer_sha256(tokenizer),
                "splits": manifest_splits, "content_id": hashlib.sha256(json.dumps(manifest_splits, sort_keys=True).encode()).hexdigest()}
    (folder / prepared.MANIFEST).write_text(json.dumps(manifest))
    return folder


def documents_of(path, tokenizer, limit=None) -> list[list[int]]:
    texts = [t.strip() for t in path.read_text().split("\n\n") if t.strip()][:limit]
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, gpt2_tokenizer):
    docs = documents_of(shared("tinyshakespeare/input.txt"), gpt2_tokenizer, 1200)
    return write_prepared(tmp_path_factory.mktemp("prepared") / "corpus", gpt2_tokenizer,
                          {"train": docs[:1100], "validation": docs[1100:]}, documents_per_part=97)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4099])
def test_the_shuffle_is_a_permutation_for_every_size(n):
    order = [prepared.shuffled_index(i, n, b"7:0") for i in range(n)]
    assert sorted(order) == list(range(n))
    if n >= 64:
        assert order != list(range(n)) and order != [prepared.shuffled_index(i, n, b"7:1") for i in range(n)]


def test_blocks_in_corpus_order_equal_todays_packing_across_part_ends(corpus):
    manifest = prepared.read_manifest(corpus)
    tokens = prepared.PartedTokens(corpus, manifest, "train")
    flat = np.concatenate([np.fromfile(f, dtype="<u2") for f in tokens.files]).astype(np.int64)
    expected = PackedBlocks(flat, 64)
    blocks = prepared.PreparedBlocks(tokens, 64, shuffle=False)
    assert len(blocks) == len(expected) > 100 and len(manifest["splits"]["train"]["parts"]) > 5
    assert all(torch.equal(blocks[i]["input_ids"], expected[i]["input_ids"]) for i in range(len(blocks)))


def test_each_pass_takes_every_block_once_in_its_own_order(corpus):
    tokens = prepared.PartedTokens(corpus, prepared.read_manifest(corpus), "train")
    blocks = prepared.PreparedBlocks(tokens, 64, seed=5, total=3 * (len(tokens) // 64))
    n = blocks.n_blocks
    passes = [[blocks.block_of(e * n + j) for j in range(n)] for e in range(3)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    assert passes[0] != passes[1] != passes[2] and passes[0] != list(range(n))
    assert passes[0] == [prepared.PreparedBlocks(tokens, 64, seed=5).block_of(j) for j in range(n)]  # a pure function
    assert passes[0] != [prepared.PreparedBlocks(tokens, 64, seed=6).block_of(j) for j in range(n)]


def test_a_memory_map_is_never_pickled(corpus):
    import pickle

    tokens = prepared.PartedTokens(corpus, prepared.read_manifest(corpus), "train")
    blocks = prepared.PreparedBlocks(tokens, 64)
    blocks[0]  # opens the parts in this process
    assert tokens._maps is not None and len(pickle.dumps(blocks)) < 4096


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_one_global_batch_gives_the_same_steps_on_any_number_of_processes(corpus, world):
    """accelerate's own data-loader preparation, as the Trainer uses it, for each rank of `world`."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader, SequentialSampler

    global_batch, steps = 16, 40
    tokens = prepared.PartedTokens(corpus, prepared.read_manifest(corpus), "train")
    blocks = prepared.PreparedBlocks(tokens, 64, seed=1, total=steps * global_batch)
    per_device, accumulation = 2, global_batch // (2 * world)

    def starts(batch):  # a block is known by its first tokens
        return [tuple(row[:8].tolist()) for row in batch["input_ids"]]

    per_rank = []
    for rank in range(world):
        loader = DataLoader(blocks, batch_size=per_device, sampler=SequentialSampler(blocks))
        loader = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)
        batches = [starts(b) for b in loader]
        per_rank.append([sum(batches[s * accumulation : (s + 1) * accumulation], []) for s in range(steps)])
    expected = [[tuple(blocks[i]["input_ids"][:8].tolist()) for i in range(s * global_batch, (s + 1) * global_batch)] for s in range(steps)]
    for step in range(steps):
        taken = [block for rank in range(world) for block in per_rank[rank][step]]
        assert sorted(taken) == sorted(expected[step]) and len(set(taken)) == len(taken)  # the same blocks, each once


def run_clm(*args, ranks=1, check=True):
    return run_script("run_clm.py", *args, ranks=ranks, check=check)


@pytest.fixture
def count_reads(monkeypatch):
    reads = []
    original = prepared.PreparedBlocks.__getitem__

    def counted(self, index):
        if self.shuffle:
            reads.append(self.start + index)
        return original(self, index)

    monkeypatch.setattr(prepared.PreparedBlocks, "__getitem__", counted)
    return reads


@pytest.mark.e2e
def test_a_resumed_run_reads_no_skipped_block_and_equals_the_uninterrupted_run(tmp_path, corpus, count_reads):
    from test_lifecycle import load_script

    main = load_script("run_clm.py").main
    common = ["--dataset_name", str(corpus), "--max_steps", "8", "--per_device_train_batch_size", "2", "--global_batch_size", "4", *TINY]
    main([*common, "--output_dir", str(tmp_path / "whole")])
    assert sorted(count_reads) == list(range(8 * 4))
    with pytest.MonkeyPatch.context() as stopping:
        stop_at_step(stopping, 5)
        main([*common, "--output_dir", str(tmp_path / "resumed")])
    count_reads.clear()
    main([*common, "--output_dir", str(tmp_path / "resumed")])
    assert sorted(count_reads) == list(range(5 * 4, 8 * 4))  # only the samples of steps 6 to 8
    assert logged(tmp_path / "resumed", "loss") == logged(tmp_path / "whole", "loss")
    info = json.loads((tmp_path / "resumed" / "run_info.json").read_text())
    assert info["data"]["prepared"]["content_id"] == prepared.read_manifest(corpus)["content_id"]
    assert info["data"]["prepared"]["passes"] == round(8 * 4 / info["data"]["train"]["blocks"], 4)


@pytest.mark.e2e
def test_two_processes_train_what_one_trains_and_a_run_resumes_on_another_world_size(tmp_path, corpus):
    common = [*TINY, "--dataset_name", corpus, "--max_steps", 6, "--per_device_train_batch_size", 2, "--global_batch_size", 4,
              "--save_steps", 3, "--eval_on_start", "false"]
    run_clm(*common, "--output_dir", tmp_path / "one")
    run_clm(*common, "--output_dir", tmp_path / "two", ranks=2)
    one, two = logged(tmp_path / "one", "loss"), logged(tmp_path / "two", "loss")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert all(abs(one[s] - two[s]) < 1e-6 for s in one), (one, two)
    # The one-process run's checkpoint-3, resumed on two processes with the same global batch.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "one" / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copy(tmp_path / "one" / "run_args.json", resumed / "run_args.json")
    run_clm(*common, "--output_dir", resumed, ranks=2)
    again = logged(resumed, "loss")
    assert sorted(again) == [1, 2, 3, 4, 5, 6] and all(abs(again[s] - one[s]) < 1e-6 for s in (4, 5, 6))


def test_a_folder_prepared_with_another_tokenizer_is_refused(tmp_path, corpus, capsys):
    from test_lifecycle import load_script

    other = tmp_path / "other_tokenizer"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    tokenizer.add_tokens(["<|extra|>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(SystemExit) as exited:
        load_script("run_clm.py").main(["--dataset_name", str(corpus), "--tokenizer_name", str(other), "--max_steps", "2",
                                         "--output_dir", str(tmp_path / "out"), *TINY])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "was prepared with another tokenizer than --tokenizer_name" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--global_batch_size", "6", "--per_device_train_batch_size", "4"], "--global_batch_size 6 is not a multiple of"),
    (["--global_batch_size", "8", "--gradient_accumulation_steps", "2"], "not both"),
])
def test_a_global_batch_that_does_not_divide_is_refused(tmp_path, corpus, capsys, flags, message):
    from test_lifecycle import load_script

    with pytest.raises(SystemExit) as exited:
        load_script("run_clm.py").main(["--dataset_name", str(corpus), "--max_steps", "2", "--output_dir", str(tmp_path / "o"), *TINY, *flags])
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.e2e
def test_a_resume_with_changed_order_settings_or_changed_data_is_refused(tmp_path, gpt2_tokenizer, capsys):
    from test_lifecycle import load_script

    docs = documents_of(shared("tinyshakespeare/input.txt"), gpt2_tokenizer, 300)
    folder = write_prepared(tmp_path / "corpus", gpt2_tokenizer, {"train": docs[:280], "validation": docs[280:]}, 50)
    main = load_script("run_clm.py").main
    common = ["--dataset_name", str(folder), "--max_steps", "6", "--per_device_train_batch_size", "2", *TINY,
              "--output_dir", str(tmp_path / "run")]
    with pytest.MonkeyPatch.context() as stopping:
        stop_at_step(stopping, 2)
        main([*common, "--global_batch_size", "4"])
    for changed, message in ((["--global_batch_size", "8"], "global_batch_size: 4 -> 8"), (["--global_batch_size", "4", "--seed", "9"], "seed: 3 -> 9"),
                             (["--global_batch_size", "4", "--block_size", "32"], "block_size: 64 -> 32")):
        with pytest.raises(SystemExit) as exited:
            main([*common, *changed])
        assert exited.value.code == 2 and message in capsys.readouterr().err
    shutil.rmtree(folder)  # the same folder, prepared again from other documents
    write_prepared(folder, gpt2_tokenizer, {"train": docs[20:280], "validation": docs[280:]}, 50)
    with pytest.raises(SystemExit) as exited:
        main([*common, "--global_batch_size", "4"])
    assert exited.value.code == 2 and "the prepared folder's content changed" in capsys.readouterr().err


@pytest.mark.e2e
def test_prepare_to_prepares_once_with_two_processes_and_is_reused(tmp_path):
    folder = tmp_path / "prepared"
    common = [*TINY, "--train_files", shared("tinyshakespeare/input.txt"), "--tokenizer_name", shared("tiny_gpt2_random"),
              "--prepare_to", folder, "--max_steps", 3, "--per_device_train_batch_size", 2, "--global_batch_size", 4]
    done = run_clm(*common, "--output_dir", tmp_path / "first", ranks=2)
    assert done.stderr.count("tokenized") == 1 and prepared.is_prepared(folder)  # one process prepared it
    again = run_clm(*common, "--output_dir", tmp_path / "second")
    assert "tokenized" not in again.stderr and "already prepared" in again.stderr
    infos = [json.loads((tmp_path / r / "run_info.json").read_text()) for r in ("first", "second")]
    assert infos[0]["data"]["prepared"]["content_id"] == infos[1]["data"]["prepared"]["content_id"]
    assert logged(tmp_path / "first", "loss")[1] == pytest.approx(logged(tmp_path / "second", "loss")[1], abs=1e-6)
