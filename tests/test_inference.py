"""run_infer.py, run_eval.py and the scoring code behind them (tiny models, CPU, offline)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys

import pytest
import torch

from conftest import REPO, shared
from clmlab.checkpoints import find_model_dir, load_for_inference
from clmlab.evaluation import (
    encode_pair,
    hellaswag_example,
    loglikelihoods,
    qa_scores,
    score_choices,
    sliding_window_perplexity,
    token_f1,
)
from clmlab.generation import DecodingSettings, chat_end_token_id, fit_to_context, generate


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is being made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny():
    model, tokenizer, _ = load_for_inference(str(shared("tiny_gpt2_random")), "cpu", "float32")
    return model, tokenizer


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small GPT-2 trained for a few dozen steps: random weights say little about int8 error."""
    from test_run_clm import TINY, run_clm

    out = tmp_path_factory.mktemp("trained") / "run"
    run_clm("--train_files", shared("tinyshakespeare/input.txt"), "--output_dir", out, "--max_steps", 60,
            "--eval_on_start", "false", "--max_eval_samples", 4, *TINY)
    return out


@pytest.fixture(scope="session")
def random_gpt2(tmp_path_factory):
    """Random weights of some width: greedy text then differs from prompt to prompt, and depends on positions."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("random_gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, vocab_size=50257)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(shared("tiny_gpt2_random")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hellaswag_docs():
    with open(shared("hellaswag/hellaswag_val.jsonl")) as handle:
        return [json.loads(next(handle)) for _ in range(12)]


# --------------------------------------------------------------------------------------------------- scoring


def test_hellaswag_scores_equal_a_plain_per_example_computation(random_gpt2, hellaswag_docs):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")

    def clean(text):  # lm-evaluation-harness's preprocess, written out again
        text = text.strip().replace(" [title]", ". ")
        return re.sub("\\[.*?\\]", "", text).replace("  ", " ")

    correct = correct_norm = 0
    expected_lls = []
    for doc in hellaswag_docs:
        context = clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        lls = []
        for ending in doc["endings"]:
            ending = clean(ending)
            whole = tokenizer(context + " " + ending)["input_ids"]
            n_context = len(tokenizer(context)["input_ids"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            lls.append(sum(logprobs[t - 1, whole[t]].item() for t in range(n_context, len(whole))))
        expected_lls += lls
        lengths = [len(clean(e)) for e in doc["endings"]]
        correct += max(range(4), key=lambda k: lls[k]) == int(doc["label"])
        correct_norm += max(range(4), key=lambda k: lls[k] / lengths[k]) == int(doc["label"])

    examples = [hellaswag_example(d) for d in hellaswag_docs]
    requests = [encode_pair(tokenizer, e.context, " " + choice) for e in examples for choice in e.choices]
    assert [ll for ll, _ in loglikelihoods(model, requests, batch_size=5)] == pytest.approx(expected_lls, abs=1e-4)
    scores = score_choices(model, tokenizer, examples, batch_size=5)
    assert scores["examples"] == 12
    assert scores["acc"] == correct / 12 and scores["acc_norm"] == correct_norm / 12
    assert correct != correct_norm or len({round(x, 2) for x in expected_lls}) > 40  # the scores discriminate


def test_batched_loglikelihoods_equal_unbatched(tiny, hellaswag_docs):
    model, tokenizer = tiny
    requests = [encode_pair(tokenizer, hellaswag_example(d).context, " " + e) for d in hellaswag_docs[:4] for e in d["endings"]]
    one_by_one = loglikelihoods(model, requests, batch_size=1)
    batched = loglikelihoods(model, requests, batch_size=7)
    assert [g for _, g in one_by_one] == [g for _, g in batched]
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in one_by_one], abs=1e-4)


def test_contexts_and_continuations_longer_than_the_model_lose_their_left_end(random_gpt2):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")
    n = model.config.n_positions
    context, continuation = list(range(1, n + 40)), list(range(1000, 1000 + n + 20))
    [(long_ll, _)] = loglikelihoods(model, [(context, continuation)])
    [(tail_ll, _)] = loglikelihoods(model, [(continuation[:-n], continuation[-n:])])
    assert long_ll == pytest.approx(tail_ll, abs=1e-4)  # only the last n tokens fit; they are what is scored


def test_trailing_context_space_moves_to_the_continuation(tiny):
    _, tokenizer = tiny
    assert encode_pair(tokenizer, "Hello ", "world") == encode_pair(tokenizer, "Hello", " world")


def _next_token_log_prob(model, context: list[int], target: int) -> float:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([context])).logits[0, -1].float(), dim=-1)[target].item()


@pytest.mark.parametrize("stride", [1, 5, 13, 31, 32, 40])
def test_perplexity_scores_every_token_once_with_the_context_its_window_allows(random_gpt2, shakespeare, stride):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")
    window = 32  # below the model's 256, so a short text spans many windows
    text = shakespeare.read_text()[:500]
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.eos_token_id] + tokens  # token i is ids[i + 1]
    assert len(tokens) > 3 * window
    widths, windows = [], []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        result = sliding_window_perplexity(model, tokenizer, text, stride=stride, max_length=window,
                                           progress=windows.append)
    finally:
        hook.remove()
    # One token at a time: the first `window` tokens see all the text before them; after them, tokens go in
    # blocks of `step`, each block read as the `window` tokens that end just before its last token.
    step = min(stride, window)
    nll = 0.0
    for i, target in enumerate(tokens):
        if i < window:
            start = 0
        else:
            last = min(window - 1 + ((i - window) // step + 1) * step, len(tokens) - 1)
            start = last + 1 - window
        nll -= _next_token_log_prob(model, ids[start : i + 1], target)
    assert result.tokens == len(tokens)
    assert max(widths) <= window
    assert sum(windows) == 1 + math.ceil((len(tokens) - window) / step)
    assert result.loss * result.tokens == pytest.approx(nll, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-6)


def test_default_stride_is_lm_evaluation_harness_rolling_loglikelihood(random_gpt2, shakespeare):
    """lm-evaluation-harness's definition: disjoint windows of the context's length L. The first reads EOS and
    the first L - 1 tokens and predicts the first L; each later one predicts the next L (or what is left)
    from the L tokens just before each of them, so its first target is predicted from one token."""
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")
    context = model.config.n_positions
    text = shakespeare.read_text()[:4000]
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 3 * context and len(tokens) % context  # several windows, the last one short
    reference, predicted = 0.0, 0
    while predicted < len(tokens):
        n = min(context, len(tokens) - predicted)
        end = predicted + n
        inputs = [tokenizer.eos_token_id] + tokens[: n - 1] if predicted == 0 else tokens[end - context - 1 : end - 1]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits[0, -n:].float(), dim=-1)
        reference -= logprobs.gather(1, torch.tensor(tokens[predicted:end])[:, None]).sum().item()
        predicted = end
    result = sliding_window_perplexity(model, tokenizer, text)
    assert result.tokens == len(tokens)
    assert result.loss * result.tokens == pytest.approx(reference, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(reference / len(tokens)), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(reference / math.log(2) / len(text.encode()), rel=1e-5)
    assert result.bytes == len(text.encode())
    for stride in (context, context + 100):  # the context itself, and a stride past it capped to it
        assert sliding_window_perplexity(model, tokenizer, text, stride=stride) == result


def test_a_text_shorter_than_a_window_is_one_window_after_eos(random_gpt2):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")
    for text in ("To be, or not to be, that is the question:", "Hello"):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([[tokenizer.eos_token_id] + tokens[:-1]])).logits[0].float()
        reference = -torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None]).sum().item()
        for stride in (None, 1):  # one window whatever the stride
            windows = []
            result = sliding_window_perplexity(model, tokenizer, text, stride=stride, progress=windows.append)
            assert (result.tokens, sum(windows)) == (len(tokens), 1)
            assert result.loss * result.tokens == pytest.approx(reference, rel=1e-5)


def test_qa_scores():
    assert token_f1("the Eiffel Tower", "Eiffel tower in Paris") == pytest.approx(2 * (2 / 2) * (2 / 4) / (1 + 2 / 4))
    scores = qa_scores(["Paris.", "blue whale", "no"], [["paris", "Paris, France"], ["the blue whale"], ["yes"]])
    assert scores["exact_match"] == pytest.approx(2 / 3) and scores["f1"] == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------- generation


def test_same_seed_same_text(tiny):
    model, tokenizer = tiny
    settings = DecodingSettings(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, seed=5)
    first = generate(model, tokenizer, ["Once upon a time"], settings)
    again = generate(model, tokenizer, ["Once upon a time"], settings)
    other = generate(model, tokenizer, ["Once upon a time"], DecodingSettings(**{**settings.as_dict(), "seed": 6}))
    assert first == again and first != other


def test_left_padded_batch_gives_the_same_greedy_text(random_gpt2):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "O"]
    settings = DecodingSettings(max_new_tokens=10, do_sample=False)
    batched = generate(model, tokenizer, prompts, settings, batch_size=3)
    alone = [generate(model, tokenizer, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert len({texts[0] for texts in batched}) > 1


def test_a_prompt_past_the_context_is_cut_from_the_left(random_gpt2, caplog):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")  # n_positions 256
    ids = list(range(300))
    kept = fit_to_context(ids, max_new_tokens=16, n_positions=256)
    assert kept == ids[-240:] and "its first 60 tokens are cut" in caplog.text
    out = generate(model, tokenizer, ["ROMEO: " * 150], DecodingSettings(max_new_tokens=8, do_sample=False))
    assert len(out[0]) == 1 and out[0][0]  # no IndexError past n_positions
    with pytest.raises(ValueError, match="leaves no room"):
        fit_to_context(ids, max_new_tokens=256, n_positions=256)


def test_generation_stops_at_the_stop_token_and_empty_prompts_start_from_eos(random_gpt2):
    model, tokenizer, _ = load_for_inference(str(random_gpt2), "cpu", "float32")
    settings = DecodingSettings(max_new_tokens=12, do_sample=False)
    free = generate(model, tokenizer, ["ROMEO:"], settings)[0][0]
    ids = tokenizer(free, add_special_tokens=False)["input_ids"]
    stop = ids[3]
    stopped = generate(model, tokenizer, ["ROMEO:"], settings, stop_token_id=stop)[0][0]
    assert tokenizer(stopped, add_special_tokens=False)["input_ids"] == ids[: ids.index(stop) + 1]  # stops right after it
    alone = generate(model, tokenizer, [""], settings)[0]
    assert generate(model, tokenizer, ["", "ROMEO: a much longer prompt"], settings)[0] == alone


def test_chat_end_token_is_the_templates_special_token(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared("tiny_gpt2_random"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n<|end|>\n{% endfor %}"
    assert chat_end_token_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|end|>")
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n\n{% endfor %}"
    assert chat_end_token_id(tokenizer) is None  # plain text ends the turn: stop at EOS only


def test_chat_applies_the_saved_template(tmp_path, capsys):
    folder = tmp_path / "chat_model"
    shutil.copytree(shared("tiny_gpt2_random"), folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer.save_pretrained(folder)
    assert chat_end_token_id(AutoTokenizer.from_pretrained(folder)) == tokenizer.eos_token_id
    out = tmp_path / "gen.jsonl"
    load_script("run_infer").main(["--checkpoint", str(folder), "--chat", "--prompt", "Name a color.",
                                   "--max_new_tokens", "4", "--output_jsonl", str(out)])
    record = json.loads(out.read_text())
    assert record["model_input"] == "<|user|>\nName a color.<|endoftext|>\n<|assistant|>\n"
    assert record["prompt"] == "Name a color." and record["settings"]["max_new_tokens"] == 4


def test_compare_writes_one_record_per_checkpoint(tmp_path, trained_run, tiny_gpt2, capsys):
    out = tmp_path / "gen.jsonl"
    load_script("run_infer").main(["--checkpoint", str(trained_run), "--compare", str(tiny_gpt2), "--prompt", "ROMEO:",
                                   "--prompt", "JULIET:", "--max_new_tokens", "5", "--do_sample", "false",
                                   "--output_jsonl", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and {r["checkpoint"] for r in records} == {str(trained_run), str(tiny_gpt2)}
    assert " | " in capsys.readouterr().out  # shown side by side


# --------------------------------------------------------------------------------------------------- checkpoints


def test_a_run_without_a_final_model_uses_its_latest_checkpoint(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoint-60", run / "checkpoint-60")
    assert find_model_dir(str(run)) == run / "checkpoint-60"
    model, tokenizer, _ = load_for_inference(str(run), "cpu", "float32")
    assert tokenizer.eos_token_id is not None


@pytest.mark.parametrize("script", ["run_infer", "run_eval"])
def test_a_folder_with_no_model_exits_2(tmp_path, capsys, script):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(SystemExit) as exited:
        extra = ["--prompt", "hi"] if script == "run_infer" else ["--data_file", str(shared("tinyshakespeare/input.txt"))]
        load_script(script).main(["--checkpoint", str(tmp_path), *extra])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no model" in err[0]


def test_int8_perplexity_is_close_to_fp32(tmp_path, trained_run, shakespeare):
    data = tmp_path / "text.txt"
    data.write_text(shakespeare.read_text()[-6000:])
    run_eval = load_script("run_eval").main
    fp32 = run_eval(["--checkpoint", str(trained_run), "--task", "perplexity", "--data_file", str(data), "--device", "cpu"])
    int8 = run_eval(["--checkpoint", str(trained_run), "--task", "perplexity", "--data_file", str(data), "--device", "cpu",
                     "--quantize", "int8", "--output_json", str(tmp_path / "int8.json")])
    fp32_ppl, int8_ppl = fp32[str(trained_run)]["perplexity"], int8[str(trained_run)]["perplexity"]
    assert fp32_ppl < 400  # a trained model, not a random one
    assert int8_ppl != fp32_ppl and abs(int8_ppl / fp32_ppl - 1) < 0.05
    assert json.loads((tmp_path / "int8.json").read_text())["settings"]["quantize"] == "int8"


def test_eval_tables_several_checkpoints(tmp_path, trained_run, tiny_gpt2, capsys):
    results = load_script("run_eval").main(["--checkpoint", str(trained_run), str(tiny_gpt2), "--task", "multiple_choice",
                                            "--data_file", str(shared("commonsenseqa/dev_rand_split.jsonl")), "--limit", "10"])
    assert set(results) == {str(trained_run), str(tiny_gpt2)}
    assert all(r["examples"] == 10 and 0 <= r["acc"] <= 1 for r in results.values())
    table = capsys.readouterr().out
    assert "acc_norm" in table and str(tiny_gpt2) in table
    qa = load_script("run_eval").main(["--checkpoint", str(trained_run), "--task", "qa", "--limit", "4",
                                       "--data_file", str(shared("qa/webglm_nq_open.jsonl")), "--max_new_tokens", "4"])
    assert qa[str(trained_run)]["examples"] == 4


@pytest.mark.parametrize("case", ["qa answer past the context", "json object", "empty text", "missing text field", "zero stride",
                                  "text that is not UTF-8"])
def test_eval_bad_input_is_one_line_and_exit_2(case, tmp_path, trained_run, capsys):
    files = {"json object": ("o.json", '{"text": "hello"}'), "empty text": ("e.txt", ""),
             "missing text field": ("m.jsonl", '{"text": "a"}\n{"body": "b"}\n'), "qa answer past the context": ("q.jsonl", ""),
             "zero stride": ("z.txt", "hello"), "text that is not UTF-8": ("l.txt", "caf\u00e9")}
    name, content = files[case]
    (tmp_path / name).write_bytes(content.encode("latin-1" if case == "text that is not UTF-8" else "utf-8"))
    argv = ["--checkpoint", str(trained_run), "--task", "perplexity", "--data_file", str(tmp_path / name)]
    if case == "zero stride":
        argv += ["--stride", "0"]
    if case == "qa answer past the context":
        argv = ["--checkpoint", str(trained_run), "--task", "qa", "--data_file", str(shared("qa/webglm_nq_open.jsonl")),
                "--limit", "2", "--max_new_tokens", "64"]  # the context is 64
    with pytest.raises(SystemExit) as exited:
        load_script("run_eval").main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1, err


@pytest.mark.parametrize("flags,message", [
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be 1 or more"),
    (["--temperature", "0"], "--temperature 0.0: must be positive"),
    (["--temperature", "inf"], "--temperature inf: must be positive and finite"),
    (["--top_p", "0"], "--top_p 0.0: must be above 0 and at most 1"),
    (["--top_k", "-1"], "--top_k -1: must be 0 (off) or more"),
    (["--repetition_penalty", "0"], "--repetition_penalty 0.0: must be positive"),
    (["--do_sample", "false", "--num_return_sequences", "3"], "greedy decoding gives one answer per prompt"),
])
def test_decoding_settings_are_checked_when_parsed(flags, message):
    from clmlab.cli import UsageError, parse_args
    from clmlab.generation import DecodingSettings

    with pytest.raises(UsageError, match=re.escape(message)):
        parse_args([DecodingSettings], flags)
