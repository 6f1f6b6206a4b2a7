"""Instruction records and how their fields map to a conversation: one converter per --format, turning a
record into chat messages ({role, content} turns) that a prompt template lays out; and reading the records.

Data code: it imports nothing of the model, the Trainer or peft; clmlab.sft.training builds on it, never
the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from clmlab import data
from clmlab.cli import UsageError, first_line

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ExampleFormat:
    name: str
    style: str
    fields: dict[str, str]  # field -> default column
    required: tuple[str, ...]
    to_messages: Callable[[dict, dict], list[dict]] = field(repr=False)


class BadExample(ValueError):
    pass


def _text(record: dict, column: str, what: str) -> str:
    value = record.get(column)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # several reference answers (NQ-open, WebQuestions): train on the first
    if not isinstance(value, str):
        raise BadExample(f"{what} column {column!r} holds {type(value).__name__}, not text")
    return value


def _alpaca(record: dict, cols: dict) -> list[dict]:
    user = {"role": "user", "content": _text(record, cols["instruction"], "instruction")}
    given = record.get(cols["input"])
    if isinstance(given, str) and given.strip():
        user["input"] = given
    return [user, {"role": "assistant", "content": _text(record, cols["output"], "output")}]


def _single_turn(record: dict, cols: dict) -> list[dict]:
    return [{"role": "user", "content": _text(record, cols["prompt"], "prompt")},
            {"role": "assistant", "content": _text(record, cols["completion"], "completion")}]


def _messages(record: dict, cols: dict) -> list[dict]:
    turns = record.get(cols["messages"])
    if not isinstance(turns, list) or not turns:
        raise BadExample(f"column {cols['messages']!r} must hold a list of {{role, content}} turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise BadExample(f"every turn needs a role in {list(ROLES)} and text content, not {str(turn)[:80]}")
        messages.append({"role": turn["role"], "content": turn["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadExample("a conversation with no assistant turn has nothing to train on")
    return messages


def _qa(record: dict, cols: dict) -> list[dict]:
    user = {"role": "user", "content": _text(record, cols["question"], "question")}
    references = record.get(cols["references"])
    if isinstance(references, str):
        references = [references]
    if references:
        user["references"] = [str(r) for r in references]
    return [user, {"role": "assistant", "content": _text(record, cols["answer"], "answer")}]


def _multiple_choice(record: dict, cols: dict) -> list[dict]:
    try:
        stem, labels, texts, answer = data.choice_fields(record, cols["question"], cols["choices"], cols["answer"])
    except (KeyError, TypeError) as error:
        raise BadExample(f"not a CommonsenseQA/ARC record (missing {first_line(error)})") from None
    if answer not in labels:
        raise BadExample(f"answer {answer!r} is not one of the choice labels {labels}")
    listed = "".join(f"\n{label}. {text}" for label, text in zip(labels, texts))
    return [{"role": "user", "content": stem + listed}, {"role": "assistant", "content": answer}]


FORMATS = {
    "alpaca": ExampleFormat("alpaca", "alpaca", {"instruction": "instruction", "input": "input", "output": "output"},
                            ("instruction", "output"), _alpaca),
    "chat": ExampleFormat("chat", "chat", {"prompt": "prompt", "completion": "completion"}, ("prompt", "completion"), _single_turn),
    "messages": ExampleFormat("messages", "chat", {"messages": "messages"}, ("messages",), _messages),
    "prompt_completion": ExampleFormat("prompt_completion", "plain", {"prompt": "prompt", "completion": "completion"},
                                       ("prompt", "completion"), _single_turn),
    "qa": ExampleFormat("qa", "qa", {"question": "question", "answer": "answer", "references": "references"},
                        ("question", "answer"), _qa),
    "multiple_choice": ExampleFormat("multiple_choice", "qa", {"question": "question", "choices": "choices", "answer": "answerKey"},
                                     ("question", "answer"), _multiple_choice),
}


def column_names(data_args) -> dict[str, str]:
    """The format's fields mapped to the data's columns: defaults, then --prompt_column/--completion_column,
    then --field_names."""
    fmt = FORMATS[data_args.format]
    columns = dict(fmt.fields)
    for key, given in (("prompt", data_args.prompt_column), ("completion", data_args.completion_column)):
        if given:
            if key not in columns:
                raise UsageError(f"--{key}_column is for --format chat or prompt_completion; for --format {fmt.name} "
                                 f"use --field_names with the fields {list(fmt.fields)}")
            columns[key] = given
    for pair in filter(None, (data_args.field_names or "").split(",")):
        key, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not column or key not in columns:
            raise UsageError(f"--field_names {pair!r}: give field=column pairs; --format {fmt.name} has the fields {list(fmt.fields)}")
        columns[key] = column
    return columns


# ----------------------------------------------------------------------------------------- reading records


def load_records(data_args) -> dict:
    """{"train": records, "validation": records or None}, from local files or a Hub/saved dataset; the
    arguments were checked when they were parsed (clmlab.args.SftDataArguments)."""
    if data_args.train_files:
        loaded = {split: data.read_record_files(data.file_format(files, f"--{split}_files"), files, f"--{split}_files")
                  for split, files in data_args.local_files().items()}
        return {"train": loaded["train"], "validation": loaded.get("validation")}
    loaded = data.load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming=False)
    return {"train": loaded["train"], "validation": loaded.get("validation")}
