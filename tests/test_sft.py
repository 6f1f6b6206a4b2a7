"""Instruction-tuning data: which tokens are trained, for every format, checked against text the test writes
out itself; the collator; truncation; the chat template saved with the tokenizer."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import shared
from clmlab import sft
from clmlab.args import SftDataArguments
from clmlab.cli import UsageError
from clmlab.generation import chat_end_token_id
from clmlab.templates import STYLES

EOS = "<|endoftext|>"
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:\n")


@pytest.fixture
def tokenizer():
    return AutoTokenizer.from_pretrained(shared("tiny_gpt2_random"))  # the GPT-2 tokenizer; no pad token


def read_records(relative: str, n: int) -> list[dict]:
    path = shared(relative)
    if path.suffix == ".json":
        return json.loads(path.read_text())[:n]
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def build(tmp_path, tokenizer, records, fmt, max_length=1024, **data_args):
    """Examples as run_sft.py makes them, every one kept in the training split."""
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = SftDataArguments(format=fmt, train_files=[str(path)], validation_split_percentage=0, **data_args)
    sft.prepare_tokenizer(tokenizer, STYLES[sft.FORMATS[fmt].style])
    return sft.build_sft_datasets(sft.load_records(args), tokenizer, args, max_length)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def spans(tokenizer, example) -> list[tuple[bool, str]]:
    """The example's text as contiguous runs of trained and masked tokens."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(example["input_ids"], example["labels"]):
        trained = label != sft.IGNORE_INDEX
        if trained:
            assert label == token
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, decode(tokenizer, ids)) for trained, ids in runs]


def expected_alpaca(record):
    template = ALPACA_INPUT if record["input"].strip() else ALPACA
    return template.format(**record), record["output"] + EOS


def expected_qa(record):
    refs = record.get("references") or []
    listed = "".join(f"[{i}] {r}\n" for i, r in enumerate(refs, 1))
    answer = record["answer"][0] if isinstance(record["answer"], list) else record["answer"]
    return (f"References:\n{listed}\n" if refs else "") + f"Question: {record['question']}\nAnswer:", f" {answer}{EOS}"


def expected_choice(record):
    question = record["question"]
    lines = "".join(f"\n{c['label']}. {c['text']}" for c in question["choices"])
    return f"Question: {question['stem']}{lines}\nAnswer:", f" {record['answerKey']}{EOS}"


CHAT_RECORDS = [{"prompt": "What is the capital of France?", "completion": "Paris."},
                {"prompt": "Write a haiku about rain.", "completion": "Soft rain on the roof,\n  drops count\tthe hours - 雨"}]
QA_RECORDS = [{"question": "Who wrote Hamlet?", "answer": "William Shakespeare",
               "references": ["Hamlet is a tragedy by William Shakespeare.", "It was written around 1600."]},
              {"question": "What is H2O?", "answer": "Water"}]


def single_turn_cases():
    return [
        ("alpaca", lambda: read_records("instruct/instruction-data.json", 60), expected_alpaca),
        ("multiple_choice", lambda: read_records("commonsenseqa/dev_rand_split.jsonl", 40), expected_choice),
        ("qa", lambda: read_records("qa/webglm_nq_open.jsonl", 40) + QA_RECORDS, expected_qa),
        ("chat", lambda: CHAT_RECORDS,
         lambda r: (f"<|user|>\n{r['prompt']}<|end|>\n<|assistant|>\n", r["completion"] + "<|end|>")),
        ("prompt_completion", lambda: [{"prompt": "The capital of France is", "completion": " Paris."},
                                       {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}],
         lambda r: (r["prompt"], r["completion"] + EOS)),
    ]


@pytest.mark.parametrize("fmt,records,expected", single_turn_cases(), ids=[c[0] for c in single_turn_cases()])
def test_trained_tokens_are_exactly_the_response_and_its_end_token(tmp_path, tokenizer, fmt, records, expected):
    records = records()
    examples = build(tmp_path, tokenizer, records, fmt).train
    assert len(examples) == len(records)
    for record, example in zip(records, examples):
        prompt, response = expected(record)
        got = spans(tokenizer, example)
        if fmt == "chat":  # the newline the template writes after <|end|> is masked
            assert got == [(False, prompt), (True, response), (False, "\n")]
        else:
            assert got == [(False, prompt), (True, response)]
        assert example["prompt"] == prompt


def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tmp_path, tokenizer):
    conversation = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    examples = build(tmp_path, tokenizer, [{"messages": conversation}], "messages").train
    assert spans(tokenizer, examples[0]) == [
        (False, "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n"), (True, "Hello.<|end|>"),
        (False, "\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"), (True, "4<|end|>"), (False, "\n")]
    # The samples prompt the model for the last answer with the whole conversation before it.
    assert examples[0]["prompt"] == ("<|system|>\nYou are terse.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n"
                                     "<|user|>\n2+2?<|end|>\n<|assistant|>\n")
    assert examples[0]["reference"] == "4"


def test_train_on_prompt_trains_every_token_and_tokenizes_the_same(tmp_path, tokenizer):
    records = read_records("instruct/instruction-data.json", 10)
    masked = build(tmp_path, tokenizer, records, "alpaca").train
    full = build(tmp_path, tokenizer, records, "alpaca", train_on_prompt=True).train
    assert full["input_ids"] == masked["input_ids"]
    assert all(labels == ids for labels, ids in zip(full["labels"], full["input_ids"]))


def test_truncation_drops_examples_left_without_response_and_counts_them(tmp_path, tokenizer):
    records = read_records("instruct/instruction-data.json", 300)
    max_length = 60
    data = build(tmp_path, tokenizer, records, "alpaca", max_length=max_length)
    prompt_lengths = [len(tokenizer(expected_alpaca(r)[0])["input_ids"]) for r in records]
    total_lengths = [p + len(tokenizer(r["output"])["input_ids"]) + 1 for p, r in zip(prompt_lengths, records)]
    dropped = sum(n >= max_length for n in prompt_lengths)
    assert 0 < dropped < len(records)
    stats = data.stats["train"]
    assert stats["examples"] == len(records) and stats["dropped"] == dropped and stats["kept"] == stats["used"] == len(records) - dropped
    assert stats["truncated"] == sum(p < max_length < t for p, t in zip(prompt_lengths, total_lengths)) > 0
    assert all(0 < len(ids) <= max_length for ids in data.train["input_ids"])
    assert stats["trained_tokens"] + stats["masked_tokens"] == stats["tokens"] == sum(map(len, data.train["input_ids"]))
    # Every batch, however the examples fall, has a trained token: no NaN loss.
    collate = sft.PadToLongestCollator(tokenizer.pad_token_id)
    for start in range(0, len(data.train), 4):
        batch = collate([data.train[i] for i in range(start, min(start + 4, len(data.train)))])
        assert (batch["labels"] != sft.IGNORE_INDEX).sum() > 0


def test_pad_equal_to_eos_still_trains_the_eos(tmp_path, tokenizer):
    records = [{"prompt": "Q: one\nA:", "completion": " 1"}, {"prompt": "Q: a longer question here\nA:", "completion": " a longer answer"}]
    examples = build(tmp_path, tokenizer, records, "prompt_completion").train
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # GPT-2 has no pad token: EOS stands in
    batch = sft.PadToLongestCollator(tokenizer.pad_token_id)([examples[0], examples[1]])
    n = len(examples[0]["input_ids"])
    assert n < batch["input_ids"].shape[1]
    assert batch["input_ids"][0, n - 1] == tokenizer.eos_token_id and batch["labels"][0, n - 1] == tokenizer.eos_token_id
    assert batch["labels"][1, -1] == tokenizer.eos_token_id  # the longer example's EOS, unpadded
    assert (batch["labels"][0, n:] == sft.IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == tokenizer.eos_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert batch["labels"][0, :n].tolist() == examples[0]["labels"]


def conversations():
    chosen = read_records("instruct/instruction-data.json", 8)
    return [
        ("alpaca", [r for r in chosen if r["input"]][:2] + [r for r in chosen if not r["input"]][:2]),
        ("chat", CHAT_RECORDS),
        ("messages", [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                                    {"role": "assistant", "content": "Bye!"}]}]),
        ("prompt_completion", [{"prompt": "1, 2, 3,", "completion": " 4"}]),
        ("qa", QA_RECORDS),
        ("multiple_choice", read_records("commonsenseqa/dev_rand_split.jsonl", 2)),
    ]


@pytest.mark.parametrize("fmt,records", conversations(), ids=[c[0] for c in conversations()])
def test_saved_chat_template_renders_the_training_text(tmp_path, tokenizer, fmt, records):
    examples = build(tmp_path, tokenizer, records, fmt).train
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = AutoTokenizer.from_pretrained(tmp_path / "saved")
    columns = sft.FORMATS[fmt].fields
    for record, example in zip(records, examples):
        messages = sft.FORMATS[fmt].to_messages(record, columns)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = saved.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        assert prompt == example["prompt"]
        assert saved.apply_chat_template(messages, tokenize=False) == decode(saved, example["input_ids"])
        if last == 1:  # single turn: the prompt is exactly the masked tokens
            assert spans(saved, example)[0] == (False, prompt)
    end = "<|end|>" if sft.FORMATS[fmt].style == "chat" else EOS
    assert chat_end_token_id(saved) == saved.convert_tokens_to_ids(end)  # where run_infer.py --chat stops


def test_validation_split_keeps_each_prompt_on_one_side(tokenizer):
    path = shared("instruct/instruction-data.json")
    args = SftDataArguments(train_files=[str(path)], validation_split_percentage=30)
    sft.prepare_tokenizer(tokenizer, STYLES["alpaca"])
    data = sft.build_sft_datasets(sft.load_records(args), tokenizer, args, 1024)
    train, validation = set(data.train["prompt"]), set(data.validation["prompt"])
    assert not train & validation
    assert 200 < len(data.validation) < 460 and len(data.train) + len(data.validation) == 1100
    assert len(train) < len(data.train)  # the file repeats some prompts; repeats stay together


def test_field_names_map_other_columns(tmp_path, tokenizer):
    records = [{"task": "Add 1 and 2.", "context": "", "answer": "3"}]
    examples = build(tmp_path, tokenizer, records, "alpaca", field_names="instruction=task,input=context,output=answer").train
    assert spans(tokenizer, examples[0]) == [(False, ALPACA.format(instruction="Add 1 and 2.")), (True, "3" + EOS)]
    chat = build(tmp_path, tokenizer, [{"q": "Hi", "a": "Hello"}], "chat", prompt_column="q", completion_column="a").train
    assert spans(tokenizer, chat[0])[1] == (True, "Hello<|end|>")


@pytest.mark.parametrize("fmt,records,kwargs,message", [
    ("alpaca", [{"prompt": "x", "completion": "y"}], {}, "reads the columns 'instruction', 'output'"),
    ("alpaca", [{"instruction": "x", "output": "y"}], {"field_names": "answer=output"}, "has the fields"),
    ("qa", [{"question": "x", "answer": "y"}], {"prompt_column": "x"}, "--prompt_column is for --format chat"),
    ("messages", [{"messages": [{"role": "user", "content": "only a question"}]}], {}, "no assistant turn"),
    ("multiple_choice", [{"question": {"stem": "s", "choices": [{"label": "A", "text": "t"}]}, "answerKey": "B"}], {},
     "is not one of the choice labels"),
])
def test_bad_examples_are_one_clear_error(tmp_path, tokenizer, fmt, records, kwargs, message):
    with pytest.raises(UsageError, match=message):
        build(tmp_path, tokenizer, records, fmt, **kwargs)


def test_saved_dataset_in_the_hub_layout_gives_the_same_examples(tmp_path, tokenizer):
    """tau/commonsense_qa's flat layout, read as --dataset_name from a save_to_disk folder, with its own
    validation split, trains the same tokens as the original nested records."""
    import datasets

    nested = read_records("commonsenseqa/dev_rand_split.jsonl", 12)
    flat = [{"id": r["id"], "question": r["question"]["stem"], "question_concept": r["question"]["question_concept"],
             "choices": {"label": [c["label"] for c in r["question"]["choices"]], "text": [c["text"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in nested]
    folder = tmp_path / "commonsense_qa"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat[:8]), "validation": datasets.Dataset.from_list(flat[8:])}).save_to_disk(folder)
    args = SftDataArguments(format="multiple_choice", dataset_name=str(folder))
    sft.prepare_tokenizer(tokenizer, STYLES["qa"])
    from_hub = sft.build_sft_datasets(sft.load_records(args), tokenizer, args, 1024)
    from_files = build(tmp_path, tokenizer, nested, "multiple_choice").train
    assert len(from_hub.train) == 8 and len(from_hub.validation) == 4
    for column in ("input_ids", "labels"):
        assert list(from_hub.train[column]) + list(from_hub.validation[column]) == list(from_files[column])


def test_eval_loss_is_the_mean_over_response_tokens_whatever_the_batch_size(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    examples = build(tmp_path, tokenizer, read_records("instruct/instruction-data.json", 23), "alpaca").train
    examples = examples.select_columns(sft.MODEL_COLUMNS)
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, vocab_size=len(tokenizer))).eval()
    total, count = 0.0, 0
    with torch.no_grad():  # one example at a time, written out: the definition
        for example in examples:
            logits = model(torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            trained = labels != sft.IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[trained], labels[trained], reduction="sum").item()
            count += int(trained.sum())
    expected = total / count

    def eval_loss(trainer_class, batch_size):
        args = TrainingArguments(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=batch_size, report_to="none",
                                 use_cpu=True, dataloader_pin_memory=False)
        trainer = trainer_class(model=model, args=args, eval_dataset=examples, data_collator=sft.PadToLongestCollator(tokenizer.pad_token_id))
        return trainer.evaluate()["eval_loss"]

    for batch_size in (1, 4, 7):
        assert eval_loss(sft.ResponseTokenTrainer, batch_size) == pytest.approx(expected, rel=1e-5)
    # The plain Trainer averages batch means over examples: off once batches mix lengths.
    assert eval_loss(Trainer, 7) != pytest.approx(expected, rel=1e-5)


LONG = "Say nothing at all about this. " * 40  # a prompt longer than --max_length 100: its example is dropped


def alpaca(output, instruction="Answer briefly."):
    return {"instruction": instruction, "input": "", "output": output}


def conversation(*answers, prompt="Hi", trailing_user=False):
    turns = [{"role": "system", "content": "Be brief."}]
    for answer in answers:
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": turns + ([{"role": "user", "content": "Thanks"}] if trailing_user else [])}


EMPTY_RESPONSE_CASES = {
    # (train records, validation records, empty responses among the train and validation examples used)
    "alpaca": ([alpaca("A."), alpaca(""), alpaca("   "), alpaca("B"), alpaca("\n\t "), alpaca("", instruction=LONG)],
               [alpaca(""), alpaca("C")], (3, 1)),
    # Only the last assistant turn counts: an empty earlier answer does not, one before a closing user turn does.
    "messages": ([conversation(""), conversation("", "ok"), conversation("x", "   "), conversation("fine"),
                  conversation("", trailing_user=True), conversation("", prompt=LONG)],
                 [conversation("Hello", " "), conversation("", "Bye")], (3, 1)),
}


def build_split(tmp_path, tokenizer, fmt, train, validation, **data_args):
    files = {}
    for split, records in (("train", train), ("validation", validation)):
        files[split] = tmp_path / f"{fmt}-{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    args = SftDataArguments(format=fmt, train_files=[str(files["train"])], validation_files=[str(files["validation"])],
                            **data_args)
    sft.prepare_tokenizer(tokenizer, STYLES[sft.FORMATS[fmt].style])
    return sft.build_sft_datasets(sft.load_records(args), tokenizer, args, 100)


def empty_response_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "empty response" in r.getMessage()]


@pytest.mark.parametrize("fmt,workers", [("alpaca", None), ("messages", 2)])
def test_empty_responses_are_counted_per_split_and_warned_of_once(tmp_path, tokenizer, caplog, fmt, workers):
    train, validation, (in_train, in_validation) = EMPTY_RESPONSE_CASES[fmt]
    with caplog.at_level(logging.WARNING):
        data = build_split(tmp_path, tokenizer, fmt, train, validation, preprocessing_num_workers=workers)
    assert data.stats["train"]["dropped"] == 1  # the long prompt's: not used, so not counted
    assert (data.stats["train"]["empty_responses"], data.stats["validation"]["empty_responses"]) == (in_train, in_validation)
    assert sum(data.train["empty_response"]) == in_train and sum(data.validation["empty_response"]) == in_validation
    assert empty_response_warnings(caplog) == [
        f"{in_train} training and {in_validation} validation examples have an empty response (blank or whitespace only): "
        "their answer is the end token alone; drop or fix them if that is not what you want"]

    # Counted over the examples used: the first two training examples hold one.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = build_split(tmp_path, tokenizer, fmt, train, validation[-1:], max_train_samples=2)
    assert (data.stats["train"]["empty_responses"], data.stats["validation"]["empty_responses"]) == (1, 0)
    assert empty_response_warnings(caplog) == [
        "1 training example has an empty response (blank or whitespace only): its answer is the end token alone; "
        "drop or fix it if that is not what you want"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        data = build_split(tmp_path, tokenizer, fmt, train[3:4], validation[-1:])  # no empty response: no word
    assert data.stats["train"]["empty_responses"] == data.stats["validation"]["empty_responses"] == 0
    assert empty_response_warnings(caplog) == []


@pytest.mark.parametrize("fmt,record,end", [
    ("alpaca", alpaca(""), EOS),
    ("prompt_completion", {"prompt": "The answer is", "completion": ""}, EOS),
    ("chat", {"prompt": "Say nothing.", "completion": ""}, "<|end|>"),
    ("messages", conversation(""), "<|end|>"),
], ids=["alpaca", "prompt_completion", "chat", "messages"])
def test_an_empty_response_trains_the_end_token_alone(tmp_path, tokenizer, fmt, record, end):
    data = build(tmp_path, tokenizer, [record], fmt)
    example = data.train[0]
    assert [label for label in example["labels"] if label != sft.IGNORE_INDEX] == [tokenizer.convert_tokens_to_ids(end)]
    assert example["empty_response"] and example["response_tokens"] == example["trained_tokens"] == 1
    assert data.stats["train"]["empty_responses"] == 1


def test_data_modules_import_nothing_of_training():
    """formats and encoding stay data code: reading and tokenizing records needs no model, Trainer or peft."""
    forbidden = ("torch.nn", "torch.optim", "transformers.trainer", "transformers.Trainer", "peft", "clmlab.modeling",
                 "clmlab.run", "clmlab.checkpoints", "clmlab.generation", "clmlab.evaluation", "clmlab.sft.training")
    for module in ("clmlab.sft.formats", "clmlab.sft.encoding"):
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                imported.add(f"{node.value.id}.{node.attr}")  # torch.nn used through a plain `import torch`
        assert not [name for name in imported if any(name == f or name.startswith(f + ".") for f in forbidden)], module
