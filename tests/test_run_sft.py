"""run_sft.py end to end: a tiny run_clm.py model with the GPT-2 tokenizer, instruction-tuned (CPU, offline)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from conftest import logged, run_script, shared
from test_run_clm import run_clm

pytestmark = pytest.mark.e2e
QUIET = ["--disable_tqdm", "true", "--seed", "5"]


def run_sft(*args, check=True) -> subprocess.CompletedProcess:
    return run_script("run_sft.py", *args, check=check)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A GPT-2 pretrained for a few steps by run_clm.py, with the original GPT-2 tokenizer."""
    out = tmp_path_factory.mktemp("base") / "run"
    run_clm("--train_files", shared("tinyshakespeare/input.txt"), "--tokenizer_name", shared("tiny_gpt2_random"),
            "--config_overrides", "n_embd=32,n_layer=2,n_head=2,n_positions=128", "--block_size", "64",
            "--per_device_train_batch_size", "8", "--max_steps", 15, "--eval_steps", 15, "--max_eval_samples", 8,
            "--learning_rate", "3e-3", "--output_dir", out, "--disable_tqdm", "true")
    return out


def evals(out) -> dict[int, float]:
    return logged(out, "eval_loss")


def test_alpaca_tuning_lowers_eval_loss_and_records_what_was_trained(tmp_path, base_model):
    out = tmp_path / "sft"
    args = ["--model_name_or_path", base_model, "--train_files", shared("instruct/instruction-data.json"),
            "--output_dir", out, "--max_steps", 40, "--eval_steps", 20, "--max_eval_samples", 24, "--max_length", 64,
            "--learning_rate", "3e-3", "--num_samples", 2, "--sample_max_new_tokens", 8, *QUIET]
    done = run_sft(*args)
    info = json.loads((out / "run_info.json").read_text())
    losses = evals(out)
    assert sorted(losses) == [0, 20, 40]
    assert info["eval_loss_before"] == losses[0] and info["eval_loss_after"] == losses[40] < losses[0] - 1.0
    assert f"eval loss {losses[0]:.4f} at the start, {losses[40]:.4f} at the end" in done.stdout

    train, validation = info["data"]["train"], info["data"]["validation"]
    assert train["examples"] + validation["examples"] == 1100
    assert validation["used"] == 24 < validation["kept"] and train["used"] == train["kept"]
    assert train["dropped"] > 0 and train["kept"] + train["dropped"] == train["examples"]
    assert train["trained_tokens"] + train["masked_tokens"] == train["tokens"] and 0 < train["trained_tokens"] < train["masked_tokens"]
    assert info["data"]["format"] == "alpaca" and info["model"]["end_token"] == "<|endoftext|>"

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2
    assert all(s["prompt"].startswith("Below is an instruction") and s["prompt"].endswith("### Response:\n") for s in samples)
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) and s["reference"] for s in samples)

    # A plain Hugging Face folder whose tokenizer prompts as in training.
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, GPT2LMHeadModel) and model.config.vocab_size == 50257
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a color."}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Instruction:\nName a color.\n\n### Response:\n")

    again = run_sft(*args)  # the same command on a finished run: nothing to do, nothing lost
    assert "Nothing to do" in again.stdout and evals(out) == losses


def test_lora_chat_run_saves_a_merged_plain_model(tmp_path, base_model):
    records = [{"q": f"What is {a} plus {b}?", "a": f"{a + b}."} for a in range(6) for b in range(6)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "lora"
    run_sft("--model_name_or_path", base_model, "--format", "chat", "--train_files", data, "--prompt_column", "q",
            "--completion_column", "a", "--validation_split_percentage", 20, "--lora_r", 8, "--lora_alpha", 16,
            "--learning_rate", "1e-2", "--max_steps", 30, "--eval_steps", 30, "--num_samples", 1, "--sample_max_new_tokens", 4,
            "--output_dir", out, *QUIET)
    info = json.loads((out / "run_info.json").read_text())
    assert info["eval_loss_after"] < info["eval_loss_before"] - 1.0
    assert info["model"]["trained_parameters"] < info["model"]["parameters"] / 10
    assert info["model"]["added_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and not any("lora" in n or "base_model" in n or "trainable_tokens" in n for n in names)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.config.vocab_size == len(tokenizer) == 50261
    assert end in model.generation_config.eos_token_id  # pipeline() stops at the end of the answer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "What is 1 plus 1?"}], tokenize=False,
                                         add_generation_prompt=True) == "<|user|>\nWhat is 1 plus 1?<|end|>\n<|assistant|>\n"


def test_resumed_lora_run_reproduces_the_uninterrupted_run(tmp_path, base_model):
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n" for a in range(8) for b in range(8)))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["--model_name_or_path", base_model, "--format", "chat", "--train_files", data, "--lora_r", 4,
              "--learning_rate", "5e-3", "--max_steps", 12, "--save_steps", 6, "--eval_steps", 6, "--logging_steps", 1,
              "--num_samples", 2, "--sample_max_new_tokens", 4, *QUIET]
    run_sft(*common, "--output_dir", whole)
    # The same run killed after checkpoint-6: that checkpoint, the run's records and the first samples remain.
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-6", resumed / "checkpoint-6")
    for name in ("run_args.json", "samples.jsonl"):
        shutil.copy(whole / name, resumed / name)
    first = [{**json.loads(line), "before": f"answer {i} of the first start", "after": None}
             for i, line in enumerate((whole / "samples.jsonl").read_text().splitlines())]
    (resumed / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    run_sft(*common, "--output_dir", resumed)
    assert "checkpoint-6" in json.loads((resumed / "run_info.json").read_text())["resumed_from"]
    losses = [logged(out, "loss") for out in (whole, resumed)]
    assert len(losses[0]) == 12 and losses[1] == losses[0]
    samples = [[json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] for out in (whole, resumed)]
    assert len(samples[1]) == len(samples[0]) >= 1
    assert [s["before"] for s in samples[1]] == [f"answer {i} of the first start" for i in range(len(samples[0]))]
    assert [s["after"] for s in samples[1]] == [s["after"] for s in samples[0]]
    with safe_open(whole / "model.safetensors", "pt") as a, safe_open(resumed / "model.safetensors", "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_two_rank_lora_run_trains_every_example_once_per_epoch(tmp_path, base_model):
    """torchrun with two CPU ranks (gloo): each step takes a batch on each rank; rank 0 alone samples, merges
    and saves."""
    records = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(8) for b in range(8)]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ddp"
    done = run_script("run_sft.py", "--model_name_or_path", base_model, "--format", "prompt_completion", "--train_files", data,
                      "--validation_split_percentage", 0, "--lora_r", 4, "--num_train_epochs", 1, "--per_device_train_batch_size", 4,
                      "--num_samples", 2, "--sample_max_new_tokens", 4, "--ddp_find_unused_parameters", "false",
                      "--output_dir", out, *QUIET, ranks=2)
    info = json.loads((out / "run_info.json").read_text())
    examples = info["data"]["train"]
    assert examples["used"] == 64 and info["final_metrics"]["epoch"] == 1.0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 64 // (2 * 4)
    assert info["tokens_seen"] == examples["tokens"]  # every example once, padding not counted
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 and done.stdout.count("Model:") == 1
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), GPT2LMHeadModel)


@pytest.mark.parametrize("args,message", [
    ([], "give the instruction data with --train_files"),
    (["--train_files", "{shakespeare}"], "instruction data is records"),
    (["--train_files", "{instruct}", "--format", "qa"], "--format qa reads the columns 'question', 'answer'"),
    (["--train_files", "{instruct}", "--max_length", 4096], "--max_length 4096: must be between 1 and the model's context of 128"),
    (["--train_files", "{instruct}", "--field_names", "prompt=instruction"], "--format alpaca has the fields"),
    (["--train_files", "{instruct}", "--lora_r", "-1"], "--lora_r -1: must be 0 (no LoRA) or more"),
    (["--train_files", "{instruct}", "--lora_r", "8", "--lora_dropout", "1.0"], "--lora_dropout 1.0: must be at least 0 and below 1"),
    (["--train_files", "{instruct}", "--num_samples", "-1"], "--num_samples -1: must be 0 or more"),
    (["--train_files", "{instruct}", "--max_length", "0"], "--max_length 0: must be 1 or more"),
    (["--train_files", "{instruct}", "--validation_split_percentage", "100"], "must be at least 0 and below 100"),
    (["--train_files", "{instruct}", "--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be 1 or more"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, base_model, args, message):
    paths = {"shakespeare": shared("tinyshakespeare/input.txt"), "instruct": shared("instruct/instruction-data.json")}
    args = [str(a).format(**paths) for a in args]
    out = tmp_path / "out"
    done = run_sft("--model_name_or_path", base_model, "--output_dir", out, *args, check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not out.exists()
