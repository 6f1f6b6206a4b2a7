"""Instruction tuning: records -> chat messages -> segments, each trained or not -> tokens and labels; the
collator, and the model around them.

Each segment is tokenized on its own and the pieces are concatenated, so the tokens with label -100 are
exactly the prompt's: nothing searches for a response marker that could tokenize differently in context.
The layout of the segments is a prompt template (clmlab.templates), saved with the tokenizer as its chat
template, so the tuned model is prompted at inference exactly as it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, Trainer, set_seed

from clmlab import data
from clmlab.args import SFT_FORMATS
from clmlab.cli import UsageError, first_line
from clmlab.modeling import context_length
from clmlab.templates import STYLES, PromptStyle, Segment

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
ROLES = ("system", "user", "assistant")
SAMPLES_FILE = "samples.jsonl"


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
assert set(FORMATS) == set(SFT_FORMATS)


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


# ----------------------------------------------------------------------------------------- tokens and labels


def encode_segments(tokenizer, examples: Sequence[Sequence[Segment]]) -> list[tuple[list[int], list[int]]]:
    """For each example, token ids and labels: the ids on trained segments, -100 elsewhere. Every segment
    is tokenized on its own (in one batched call: the Rust tokenizer works through them in parallel)."""
    encoded = iter(tokenizer([s.text for segments in examples for s in segments], add_special_tokens=False)["input_ids"])
    results = []
    for segments in examples:
        input_ids, labels = [], []
        for segment in segments:
            ids = next(encoded)
            input_ids += ids
            labels += ids if segment.trained else [IGNORE_INDEX] * len(ids)
        results.append((input_ids, labels))
    return results


@dataclass
class SftEncoder:
    """Turns batches of records into training examples; one picklable object so datasets can cache and
    parallelise the map."""

    tokenizer: object
    format: str
    columns: dict
    max_length: int
    train_on_prompt: bool = False

    def conversations(self, batch: dict) -> list[list[dict]]:
        fmt = FORMATS[self.format]
        conversations = []
        for i in range(len(next(iter(batch.values())))):
            record = {k: v[i] for k, v in batch.items()}
            try:
                conversations.append(fmt.to_messages(record, self.columns))
            except BadExample as error:
                raise UsageError(f"--format {fmt.name}: {error} (record: {json.dumps(record, default=str)[:120]}); "
                                 "map your columns with --field_names") from None
        return conversations

    def __call__(self, batch: dict) -> dict:
        style = STYLES[FORMATS[self.format].style]
        end = style.end_token(self.tokenizer)
        conversations = self.conversations(batch)
        encoded = encode_segments(self.tokenizer, [style.segments(messages, end) for messages in conversations])
        out = {k: [] for k in ("input_ids", "labels", "response_tokens", "trained_tokens", "truncated", "prompt_key", "prompt", "reference")}
        for messages, (input_ids, response_labels) in zip(conversations, encoded):
            labels = input_ids if self.train_on_prompt else response_labels
            cut = len(input_ids) > self.max_length
            input_ids, labels, response_labels = (x[: self.max_length] for x in (input_ids, labels, response_labels))
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out["response_tokens"].append(sum(label != IGNORE_INDEX for label in response_labels))
            out["trained_tokens"].append(sum(label != IGNORE_INDEX for label in labels))
            out["truncated"].append(cut)
            # Examples are split by their prompt: one question asked twice lands on one side only.
            out["prompt_key"].append(json.dumps([m for m in messages if m["role"] != "assistant"], sort_keys=True))
            out["prompt"].append(style.prompt_text(messages[:last], end))
            out["reference"].append(messages[last]["content"])
        return out


def split_stats(encoded: datasets.Dataset, kept: datasets.Dataset, used: datasets.Dataset) -> dict:
    """Examples read, dropped (no response token left), truncated and kept; then the examples used (the
    first --max_*_samples of those kept) and their tokens, trained and masked."""
    tokens = sum(len(ids) for ids in used["input_ids"])
    trained = sum(used["trained_tokens"])
    return {"examples": len(encoded), "dropped": len(encoded) - len(kept), "truncated": sum(kept["truncated"]),
            "kept": len(kept), "used": len(used), "tokens": tokens, "trained_tokens": trained, "masked_tokens": tokens - trained}


@dataclass
class SftData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: dict


MODEL_COLUMNS = ["input_ids", "labels"]


def check_data_arguments(data_args) -> dict[str, str]:
    """What can be checked before any data is read; the format's fields mapped to the data's columns."""
    if bool(data_args.dataset_name) == bool(data_args.train_files):
        raise UsageError("give the instruction data with --train_files (json, jsonl, parquet) or --dataset_name, one of the two")
    if data_args.validation_files and not data_args.train_files:
        raise UsageError("--validation_files needs --train_files")
    if not 0 <= data_args.validation_split_percentage < 100:
        raise UsageError("--validation_split_percentage must be at least 0 and below 100")
    if data_args.num_samples < 0:
        raise UsageError("--num_samples must be 0 or more")
    _record_files(data_args)
    return column_names(data_args)


def _record_files(data_args) -> dict[str, tuple[str, list[str]]]:
    found = {}
    for split, patterns in (("train", data_args.train_files), ("validation", data_args.validation_files)):
        if patterns:
            flag = f"--{split}_files"
            files = data.resolve_files(patterns, flag)
            kind = data.file_format(files, flag)
            if kind == "text":
                raise UsageError(f"{flag} {files[0]}: instruction data is records; give .json, .jsonl or .parquet files")
            found[split] = (kind, files)
    return found


def load_records(data_args) -> dict:
    """{"train": records, "validation": records or None}, from local files or a Hub/saved dataset; the
    arguments were checked by check_data_arguments."""
    if data_args.train_files:
        loaded = {split: data.read_record_files(kind, files, f"--{split}_files")
                  for split, (kind, files) in _record_files(data_args).items()}
        return {"train": loaded["train"], "validation": loaded.get("validation")}
    loaded = data.load_named_dataset(data_args.dataset_name, data_args.dataset_config_name, streaming=False)
    return {"train": loaded["train"], "validation": loaded.get("validation")}


def build_sft_datasets(records: dict, tokenizer, data_args, max_length: int) -> SftData:
    fmt, columns = FORMATS[data_args.format], column_names(data_args)
    encoder = SftEncoder(tokenizer, fmt.name, columns, max_length, data_args.train_on_prompt)
    encoded = {}
    for split, raw in records.items():
        if raw is None:
            continue
        missing = [f"{columns[f]!r}" for f in fmt.required if columns[f] not in raw.column_names]
        if missing:
            raise UsageError(f"--format {fmt.name} reads the columns {', '.join(missing)}, which {split} data lacks "
                             f"(its columns: {raw.column_names}); name yours with --field_names, e.g. "
                             f"{fmt.required[0]}={raw.column_names[0]}")
        encoded[split] = raw.map(encoder, batched=True, remove_columns=raw.column_names,
                                 num_proc=data_args.preprocessing_num_workers, desc=f"tokenizing {split} examples")
    if "validation" not in encoded:
        held_out = data.DocumentSplit(data_args.validation_split_percentage)
        flags = [held_out.is_validation(key) for key in encoded["train"]["prompt_key"]]
        encoded["validation"] = encoded["train"].select([i for i, v in enumerate(flags) if v])
        encoded["train"] = encoded["train"].select([i for i, v in enumerate(flags) if not v])
    stats, kept = {}, {}
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        # An example whose response was cut away entirely has no token to learn from (and a batch of only
        # such examples would give a NaN loss): dropped, and counted.
        kept[split] = encoded[split].filter(lambda n: [x > 0 for x in n], input_columns="response_tokens", batched=True)
        used = kept[split].select(range(min(limit, len(kept[split])))) if limit is not None else kept[split]
        stats[split] = split_stats(encoded[split], kept[split], used)
        kept[split] = used
    if not len(kept["train"]):
        raise UsageError(f"no training example keeps a response token within --max_length {max_length}; raise --max_length")
    return SftData(kept["train"], kept["validation"] if len(kept["validation"]) else None, stats)


@dataclass
class PadToLongestCollator:
    """Pads a batch to its longest example, on the right, and masks padding by position.

    Written here rather than taken from transformers: its language-modeling collator sets labels to -100
    wherever the id equals the pad id, which erases every trained EOS when pad == EOS (GPT-2's usual setup),
    so the model never learns to stop.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(feature["labels"])
        if not (labels != IGNORE_INDEX).any():
            raise ValueError("a batch with no trained token: its loss would be NaN")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class ResponseTokenTrainer(Trainer):
    """A Trainer whose eval_loss is the mean loss over every trained token of the eval set.

    Written here because the Trainer's own eval_loss is the mean over examples of their batch's per-token
    mean: with examples of different lengths it moves with the eval batch size and the number of processes,
    so two runs evaluated differently could not be compared. Per-example sums and counts go through the
    Trainer's own loop, which gathers them across processes and drops the examples repeated to even out
    the last batch.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)
        sums, counts = nll.sum(1, keepdim=True), (labels != IGNORE_INDEX).sum(1, keepdim=True).float()
        return sums.sum() / counts.sum(), sums, counts

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        if output.predictions is not None and output.label_ids is not None:
            total = float(np.sum(output.label_ids, dtype=np.float64))
            output.metrics[f"{metric_key_prefix}_loss"] = float(np.sum(output.predictions, dtype=np.float64)) / total
        return output


# ----------------------------------------------------------------------------------------- model and tokenizer


def prepare_tokenizer(tokenizer, style: PromptStyle) -> list[int]:
    """Add the style's special tokens, set its chat template and a pad token; the ids of the added tokens."""
    if style.special_tokens:
        missing = [t for t in style.special_tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token_id is None:
        # Batches need some pad id; padding is masked by position (PadToLongestCollator), so pad == EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = style.template
    # transformers warns on every decode of a BPE tokenizer saved with this on, and would strip spaces before
    # punctuation in the samples if it obeyed it.
    tokenizer.clean_up_tokenization_spaces = False
    return [tokenizer.convert_tokens_to_ids(t) for t in style.special_tokens]


def load_model(model_dir: str, tokenizer, style: PromptStyle, seed: int):
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as error:  # offline, not found, not a causal LM
        raise UsageError(f"could not load a causal LM from {model_dir!r}: {first_line(error)}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        set_seed(seed)  # new rows are drawn around the mean of the old ones: seeded, so runs repeat
        model.resize_token_embeddings(len(tokenizer))
    end_ids = [tokenizer.convert_tokens_to_ids(style.end_token(tokenizer))]
    # pipeline() and generate() stop at the end of the answer, whichever end token the template uses.
    model.generation_config.eos_token_id = list(dict.fromkeys(end_ids + [tokenizer.eos_token_id]))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def check_max_length(max_length: int | None, config) -> int:
    context = context_length(config) or 1024
    if max_length is None:
        return context
    if not 0 < max_length <= context:
        raise UsageError(f"--max_length {max_length}: must be between 1 and the model's context of {context} tokens")
    return max_length


def add_lora(model, model_args, new_token_ids: Sequence[int]):
    """LoRA on GPT-2's Conv1D projections (weights stored transposed: fan_in_fan_out). Tokens the template
    added are trained too: their embedding rows start untrained and LoRA alone would leave them so."""
    from peft import LoraConfig, get_peft_model

    targets = [m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()]
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=targets, fan_in_fan_out=model.config.model_type == "gpt2", task_type="CAUSAL_LM",
                        trainable_token_indices=list(new_token_ids) or None)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(f"--lora_target_modules {model_args.lora_target_modules}: {first_line(error)}") from None


def save_tuned_model(trainer, output_dir: str) -> None:
    """A plain Hugging Face folder either way: a LoRA adapter is merged into the weights first."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        if trainer.is_world_process_zero():
            model.merge_and_unload().save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
