"""run_clm.py end to end, on the shared data pack and tiny models (CPU, offline)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess

import pytest

from conftest import REPO, logged, run_script

pytestmark = pytest.mark.e2e

TINY = [
    "--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=64",
    "--block_size", "64", "--per_device_train_batch_size", "8", "--tokenizer_vocab_size", "512",
    "--learning_rate", "3e-3", "--disable_tqdm", "true", "--seed", "3",
]


def run_clm(*args, check=True) -> subprocess.CompletedProcess:
    return run_script("run_clm.py", *args, check=check)


def load_run_clm():
    spec = importlib.util.spec_from_file_location("run_clm", REPO / "run_clm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def losses(output_dir) -> dict[int, float]:
    return logged(output_dir, "loss")


def test_tiny_run_trains_and_writes_a_loadable_checkpoint(tmp_path, shakespeare):
    out = tmp_path / "run"
    run_clm("--train_files", shakespeare, "--output_dir", out, "--max_steps", 80, "--eval_steps", 40,
            "--max_eval_samples", 32, *TINY)
    info = json.loads((out / "run_info.json").read_text())
    evals = list(logged(out, "eval_loss").values())
    assert evals[0] > 6.0  # about ln(512) at the start
    assert info["final_metrics"]["eval_loss"] < evals[0] - 0.5
    assert info["status"] == "finished" and info["tokens_seen"] == 80 * 8 * 64
    assert info["data"]["validation"]["blocks"] == 32
    assert info["data"]["train"]["tokens"] > 250_000 and info["data"]["train"]["documents"] > 6_000
    assert info["model"]["config"]["vocab_size"] == 512 and len(info["model"]["initial_weights_sha256"]) == 64
    assert info["versions"]["transformers"] and "ModelArguments" in info["arguments"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "run_args.json").is_file() and (out / "model.safetensors").is_file()
    train_logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert all(e["tokens_per_second"] > 0 and e["num_input_tokens_seen"] > 0 for e in train_logs)

    from transformers import pipeline

    generator = pipeline("text-generation", model=str(out), device="cpu")
    text = generator("ROMEO:", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, shakespeare, streaming):
    data = tmp_path / "plays.txt"
    data.write_text(shakespeare.read_text()[:9_000])  # about 6 steps a pass: the checkpoint falls after a wrap
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["--train_files", data, "--streaming", streaming, "--max_steps", 16, "--save_steps", 8,
              "--logging_steps", 1, "--max_eval_samples", 2, "--validation_split_percentage", 10, *TINY]
    run_clm(*common, "--output_dir", whole)
    # The same run killed after checkpoint-8 was written: only that checkpoint and the run's records remain.
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-8", resumed / "checkpoint-8")
    shutil.copy(whole / "run_args.json", resumed / "run_args.json")
    run_clm(*common, "--output_dir", resumed)
    info = json.loads((resumed / "run_info.json").read_text())
    assert "checkpoint-8" in info["resumed_from"]
    if streaming == "false":
        assert info["data"]["train"]["blocks"] // 8 < 8  # the data ran out before the checkpoint
    assert len(losses(whole)) == 16
    assert losses(resumed) == losses(whole)  # steps 9..16 recomputed after the resume, to the last bit
    # Re-running a finished run changes nothing.
    before = (whole / "run_info.json").read_bytes()
    again = run_clm(*common, "--output_dir", whole)
    assert "Nothing to do" in again.stdout and (whole / "run_info.json").read_bytes() == before


def test_streaming_run(tmp_path, tinystories):
    out = tmp_path / "stream"
    run_clm("--train_files", tinystories, "--streaming", "true", "--max_train_tokens", 12 * 8 * 64,
            "--max_eval_samples", 16, "--output_dir", out, "--eval_steps", 6, "--shuffle_buffer_size", 100, *TINY)
    info = json.loads((out / "run_info.json").read_text())
    assert info["budget"]["max_steps"] == 12 and info["tokens_seen"] == 12 * 8 * 64
    assert info["data"]["train"]["streaming"] is True and info["data"]["validation"]["blocks"] == 16
    evals = list(logged(out, "eval_loss").values())
    assert len(evals) >= 3 and evals[-1] < evals[0]


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_two_rank_ddp_run_splits_the_batches(tmp_path, tinystories, streaming):
    """torchrun with two CPU ranks (gloo): half the steps for the same token budget, every token counted once."""
    out = tmp_path / "ddp"
    done = run_script("run_clm.py", "--train_files", tinystories, "--streaming", streaming, "--max_train_tokens", 16 * 8 * 64,
                      "--max_eval_samples", 8, "--eval_on_start", "false", "--ddp_find_unused_parameters", "false",
                      "--output_dir", out, *TINY, ranks=2)
    info = json.loads((out / "run_info.json").read_text())
    assert info["budget"] == {"max_steps": 8, "tokens_per_step": 2 * 8 * 64, "max_train_tokens": 16 * 8 * 64}
    assert info["tokens_seen"] == 16 * 8 * 64
    assert done.stdout.count("Finished 8 steps") == 1  # one report, from rank 0


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_every_step_sees_the_same_tokens_across_epochs(tmp_path, shakespeare, streaming):
    """An epoch that is not a whole number of steps must not end in a short step."""
    data = tmp_path / "short.txt"
    data.write_text(shakespeare.read_text()[:21_000])  # about 20 steps an epoch: 30 steps wrap
    out = tmp_path / "wrap"
    run_clm("--train_files", data, "--streaming", streaming, "--max_steps", 30, "--eval_on_start", "false",
            "--max_eval_samples", 2, "--validation_split_percentage", 10, "--output_dir", out, *TINY)
    info = json.loads((out / "run_info.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["epoch"] >= 1  # the data ran out at least once
    if streaming == "false":  # the prepared path: a pass over the data may end inside a step, never a step short
        assert info["data"]["train"]["blocks"] % 8 != 0, "the test needs a pass that ends inside a step"
        assert info["data"]["prepared"]["passes"] > 1
    assert info["tokens_seen"] == 30 * 8 * 64, (state["epoch"], info["tokens_seen"])


def test_yaml_config_with_a_flag_override(tmp_path, shakespeare):
    config = tmp_path / "exp.yaml"
    config.write_text(f"train_files: [{shakespeare}]\nmax_steps: 500\nconfig_overrides: n_embd=32,n_layer=1,n_head=2,n_positions=64\n"
                      f"block_size: 64\ntokenizer_vocab_size: 300\noutput_dir: {tmp_path / 'yaml_run'}\neval_on_start: false\n")
    run_clm(config, "--max_steps", 3, "--disable_tqdm", "true")
    info = json.loads((tmp_path / "yaml_run" / "run_info.json").read_text())
    assert info["budget"]["max_steps"] == 3
    assert info["arguments"]["ModelArguments"]["config_overrides"] == "n_embd=32,n_layer=1,n_head=2,n_positions=64"


def test_runs_on_different_data_start_from_identical_weights(tmp_path, shakespeare, tinystories, tiny_gpt2):
    checksums = []
    for name, path in (("shakespeare", shakespeare), ("stories", tinystories)):
        out = tmp_path / name
        run_clm("--train_files", path, "--tokenizer_name", tiny_gpt2, "--output_dir", out, "--max_steps", 1,
                "--eval_on_start", "false", "--max_eval_samples", 4, *TINY)
        checksums.append(json.loads((out / "run_info.json").read_text())["model"]["initial_weights_sha256"])
    assert checksums[0] == checksums[1]
    other_seed = tmp_path / "seed4"
    run_clm("--train_files", shakespeare, "--tokenizer_name", tiny_gpt2, "--output_dir", other_seed, "--max_steps", 1,
            "--eval_on_start", "false", "--max_eval_samples", 4, *TINY, "--seed", 4)
    assert json.loads((other_seed / "run_info.json").read_text())["model"]["initial_weights_sha256"] != checksums[0]


def test_a_second_run_on_the_same_data_does_not_tokenize_again(tmp_path, shakespeare):
    """A corpus that is not streamed is prepared once, in the datasets cache, keyed by source and tokenizer."""
    data = tmp_path / "plays.txt"
    data.write_text(shakespeare.read_text()[:200_000])  # a file of this test's own: no earlier test prepared it
    common = ["--train_files", data, "--max_steps", 1, "--eval_on_start", "false", "--max_eval_samples", 2, *TINY]
    first = run_clm(*common, "--output_dir", tmp_path / "first")
    second = run_clm(*common, "--output_dir", tmp_path / "second", "--seed", 4)  # the seed orders the data, it does not make it
    assert "tokenized" in first.stderr and "already prepared" not in first.stderr
    assert "tokenized" not in second.stderr and "already prepared with these arguments" in second.stderr
    infos = [json.loads((tmp_path / run / "run_info.json").read_text()) for run in ("first", "second")]
    assert infos[0]["data"]["prepared"] == infos[1]["data"]["prepared"]
    data.write_text(shakespeare.read_text()[:150_000])  # the file changed: prepared again
    third = run_clm(*common, "--output_dir", tmp_path / "third")
    assert "tokenized" in third.stderr
    assert json.loads((tmp_path / "third" / "run_info.json").read_text())["data"]["prepared"]["content_id"] != infos[0]["data"]["prepared"]["content_id"]


def test_tokenizer_command_matches_the_tokenizer_a_run_trains(tmp_path, shakespeare):
    from transformers import AutoTokenizer

    from clmlab.tokenizer import main as tokenizer_main

    run_dir = tmp_path / "run"
    run_clm("--train_files", shakespeare, "--output_dir", run_dir, "--max_steps", 1, "--eval_on_start", "false",
            "--max_eval_samples", 2, *TINY)
    tokenizer_main(["--train_files", str(shakespeare), "--vocab_size", "512", "--output_dir", str(tmp_path / "tok")])
    standalone, from_run = AutoTokenizer.from_pretrained(tmp_path / "tok"), AutoTokenizer.from_pretrained(run_dir)
    assert len(standalone) == 512 and standalone.get_vocab() == from_run.get_vocab()
    assert standalone.decode(standalone("O Romeo, Romeo!<|endoftext|>")["input_ids"]) == "O Romeo, Romeo!<|endoftext|>"


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def wide_tokenizer(tmp_path, tiny_gpt2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.add_tokens(["<|user|>", "<|assistant|>"])
    tokenizer.save_pretrained(tmp_path / "wide_tokenizer")
    return tmp_path / "wide_tokenizer"


@pytest.fixture
def content_jsonl(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"content": f"record {i}", "id": i}) + "\n" for i in range(20)))
    return path


@pytest.fixture
def finished_run(tmp_path, shakespeare):
    out = tmp_path / "finished"
    run_clm("--train_files", shakespeare, "--output_dir", out, "--max_steps", 1, "--eval_on_start", "false", "--max_eval_samples", 2, *TINY)
    return out


@pytest.fixture
def empty_txt(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    return path


@pytest.fixture
def blank_txt(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n   \n<|endoftext|>\n\n")
    return path


@pytest.fixture
def random_bytes_txt(tmp_path):
    import random

    path = tmp_path / "random.txt"
    path.write_bytes("Plain text first. ".encode() * 100 + random.Random(0).randbytes(20_000))
    return path


BAD_INPUTS = {
    "unknown override key": (["--config_overrides", "n_embed=64"], "valid keys: "),
    "n_embd not divisible by n_head": (["--config_overrides", "n_embd=100,n_head=3"], "not divisible by n_head=3"),
    "block_size above n_positions": (["--config_overrides", "n_positions=64", "--block_size", "128"], "above the model's n_positions=64"),
    "tokenizer larger than the vocabulary": (["--model_name_or_path", "{tiny_gpt2}", "--tokenizer_name", "{wide_tokenizer}"], "50259 tokens"),
    "missing text column": (["--train_files", "{content_jsonl}"], "its columns are ['content', 'id']"),
    "streaming without a budget": (["--train_files", "{shakespeare}", "--streaming", "true"], "give --max_steps or --max_train_tokens"),
    "missing file": (["--train_files", "no/such/file.txt"], "no such file"),
    "overrides with a checkpoint": (["--model_name_or_path", "{tiny_gpt2}", "--config_overrides", "n_layer=2"], "drop it or drop --model_name_or_path"),
    "unknown flag": (["--max_stepz", "5"], "unrecognized arguments"),
    "both budgets": (["--max_steps", "5", "--max_train_tokens", "1000"], "not both"),
    # The cases of issue 8, and their class.
    "empty training file": (["--train_files", "{empty_txt}"], "empty (0 bytes)"),
    "training file of blank lines": (["--train_files", "{blank_txt}"], "holds no documents"),
    "text file that is not UTF-8": (["--train_files", "{random_bytes_txt}"], "not UTF-8 (byte 0x"),
    "batch size 0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be 1 or more"),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate -1.0: must be positive"),
    "vocab_size below the tokenizer's": (["--tokenizer_name", "{tiny_gpt2}", "--config_overrides", "n_embd=32,n_layer=1,n_head=2,vocab_size=1000"],
                                         "vocab_size=1000 is smaller than the tokenizer's 50,257 tokens"),
    "vocab_size below the BPE's": (["--config_overrides", "vocab_size=1000", "--tokenizer_vocab_size", "4096"], "smaller than the 4,096-token BPE"),
    "accumulation 0": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be 1 or more"),
    "max_steps 0": (["--max_steps", "0"], "--max_steps 0: must be 1 or more"),
    "token budget 0": (["--max_train_tokens", "0"], "--max_train_tokens 0: must be a positive number of tokens"),
    "block size 0": (["--block_size", "0"], "--block_size 0: must be 1 or more"),
    "no validation share": (["--validation_split_percentage", "0"], "--validation_split_percentage 0.0: must be above 0"),
    "all held out": (["--validation_split_percentage", "100"], "below 100"),
    "negative warmup": (["--warmup_steps", "-5"], "--warmup_steps -5.0: must be a whole number of steps"),
    "fractional warmup steps": (["--warmup_steps", "2.5"], "or a fraction of the run below 1"),
    "beta2 of 1": (["--adam_beta2", "1.0"], "--adam_beta2 1.0: must be at least 0 and below 1"),
    "evaluation every 0 steps": (["--eval_steps", "0"], "--eval_steps 0.0: must be positive"),
    "eval samples 0": (["--max_eval_samples", "0"], "--max_eval_samples 0: must be 1 or more"),
    "tiny BPE": (["--tokenizer_vocab_size", "100"], "at least 257 tokens"),
    "override not key=value": (["--config_overrides", "n_embd"], "is not key=value"),
    "negative seed": (["--seed", "-1"], "--seed -1: must be 0 or more"),
    "dataset and files": (["--dataset_name", "x", "--train_files", "{shakespeare}"], "not both"),
    "infinite learning rate": (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number"),
    "infinite epochs": (["--num_train_epochs", "inf"], "--num_train_epochs inf: must be a finite number"),
    "label smoothing of 3": (["--label_smoothing_factor", "3"], "--label_smoothing_factor 3.0: must be at least 0 and below 1"),
    "dropout of 2": (["--config_overrides", "n_embd=32,n_layer=1,n_head=2,resid_pdrop=2"], "resid_pdrop=2.0: a dropout probability"),
    "vocab_size not a number": (["--config_overrides", "vocab_size=lots"], "give a whole number of embedding rows"),
    "resume from a run folder": (["--resume_from_checkpoint", "{finished_run}"], "is a run's folder, not a checkpoint"),
    "output_dir under a file": (["--output_dir", "{shakespeare}/x"], "is not a folder this user can write to"),
    "the Trainer's own signal checkpoint": (["--enable_jit_checkpoint", "true"], "a step every process agrees on"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(case, tmp_path, capsys, request):
    argv, expected = BAD_INPUTS[case]
    fixtures = {name: request.getfixturevalue(name) for name in ("tiny_gpt2", "wide_tokenizer", "content_jsonl", "shakespeare",
                                                                 "empty_txt", "blank_txt", "random_bytes_txt", "finished_run")
                if any("{" + name + "}" in a for a in argv)}
    out = tmp_path / "never_made"
    argv = ["--output_dir", str(out)] + [a.format(**fixtures) for a in argv]
    with pytest.raises(SystemExit) as exited:
        load_run_clm().main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("error: ")]
    assert len(message) == 1 and expected in message[0], err
    assert "Traceback" not in "\n".join(err)
    assert not out.exists()


@pytest.mark.parametrize("case", ["negative learning rate", "text file that is not UTF-8", "training file of blank lines", "batch size 0"])
def test_bad_input_leaves_a_previous_run_untouched(case, tmp_path, capsys, request, shakespeare):
    """Even when told to replace the run in --output_dir, a command refused for bad input changes nothing."""
    out = tmp_path / "previous"
    run_clm("--train_files", shakespeare, "--output_dir", out, "--max_steps", 1, "--eval_on_start", "false",
            "--max_eval_samples", 2, *TINY)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv, expected = BAD_INPUTS[case]
    fixtures = {name: request.getfixturevalue(name) for name in ("random_bytes_txt", "blank_txt") if any("{" + name + "}" in a for a in argv)}
    argv = [*TINY, "--max_eval_samples", "2", "--train_files", str(shakespeare), "--max_steps", "2",
            *[a.format(**fixtures) for a in argv], "--output_dir", str(out), "--overwrite_output_dir", "true"]
    with pytest.raises(SystemExit) as exited:
        load_run_clm().main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and expected in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_non_utf8_bytes_are_read_as_replacement_characters_only_when_asked_and_counted(tmp_path, shakespeare):
    data = tmp_path / "latin1.txt"
    data.write_bytes(shakespeare.read_bytes()[:30_000] + "\n\nCaf\u00e9 cr\u00e8me.\n".encode("latin-1"))
    common = ["--train_files", data, "--max_steps", 1, "--eval_on_start", "false", "--max_eval_samples", 2, *TINY]
    refused = run_clm(*common, "--output_dir", tmp_path / "strict", check=False)
    offset = len(shakespeare.read_bytes()[:30_000]) + len("\n\nCaf")
    assert refused.returncode == 2 and f"not UTF-8 (byte 0xe9 at offset {offset:,})" in refused.stderr
    run_clm(*common, "--output_dir", tmp_path / "replace", "--decode_errors", "replace")
    assert json.loads((tmp_path / "replace" / "run_info.json").read_text())["data"]["invalid_utf8_bytes"] == 2


def test_with_no_data_and_no_model_the_quickstart_is_the_base(tmp_path, shakespeare):
    from clmlab.args import ClmTrainingArguments, DataArguments, ModelArguments
    from clmlab.cli import parse_args

    script = load_run_clm()
    types = [ModelArguments, DataArguments, ClmTrainingArguments]
    base = script.DATA_OR_MODEL
    model, data, args = parse_args(types, ["--max_steps", "50", "--output_dir", str(tmp_path / "x")],
                                   base_config=(script.QUICKSTART, base))
    assert (model.config_overrides, model.tokenizer_vocab_size, data.block_size) == ("n_embd=128,n_layer=4,n_head=4,n_positions=128", 4096, 128)
    assert args.max_steps == 50 and args.output_dir == str(tmp_path / "x") and args.learning_rate == 1e-3
    model, data, args = parse_args(types, ["--train_files", str(shakespeare), "--output_dir", str(tmp_path / "y")],
                                   base_config=(script.QUICKSTART, base))
    assert model.config_overrides is None and args.max_steps == -1  # data given: the quickstart plays no part
    model, data, args = parse_args(types, ["--config_name", "gpt2"], base_config=(script.QUICKSTART, base))
    assert model.config_overrides is None  # a model named: its shape is not reshaped to the quickstart's


def test_yaml_reads_no_and_yes_as_words(tmp_path):
    from clmlab.args import ClmTrainingArguments, DataArguments, ModelArguments
    from clmlab.cli import parse_args

    config = tmp_path / "x.yaml"
    config.write_text("eval_strategy: no\nsave_strategy: no\nstreaming: true\nmax_steps: 5\n")
    _, data, args = parse_args([ModelArguments, DataArguments, ClmTrainingArguments], [str(config)])
    assert args.eval_strategy == "no" and args.save_strategy == "no" and data.streaming is True


def test_a_finished_run_is_not_overwritten(tmp_path, shakespeare):
    out = tmp_path / "kept"
    common = ["--train_files", shakespeare, "--output_dir", out, "--eval_on_start", "false", "--max_eval_samples", 2, *TINY]
    run_clm(*common, "--max_steps", 2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    done = run_clm(*common, "--max_steps", 3, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --output_dir")
    assert "Traceback" not in done.stderr and "max_steps: 2 -> 3" in done.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_samples_are_refused_when_an_accelerate_config_shards_the_model(tmp_path, capsys, monkeypatch, variable):
    """configs/accelerate/fsdp2.yaml and deepspeed_zero2.yaml say so only in the launched script's environment."""
    monkeypatch.setenv(variable, "true")
    out = tmp_path / "never_made"
    with pytest.raises(SystemExit) as exited:
        load_run_clm().main(["--sample_prompts", "Once upon a time", "--output_dir", str(out)])
    err = capsys.readouterr().err
    import importlib.util

    without_deepspeed = variable == "ACCELERATE_USE_DEEPSPEED" and importlib.util.find_spec("deepspeed") is None
    expected = "pip install -e '.[deepspeed]'" if without_deepspeed else "which FSDP and DeepSpeed shard"
    assert exited.value.code == 2 and expected in err and "Traceback" not in err and not out.exists()
