"""Conversations -> segments, each trained or not -> token ids and labels; the per-split counts and the
datasets that training reads.

Data code: it imports nothing of the model, the Trainer or peft; clmlab.sft.training builds on it, never
the other way round.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

import datasets

from clmlab import data
from clmlab.cli import UsageError
from clmlab.sft.formats import FORMATS, BadExample, column_names
from clmlab.templates import STYLES, Segment

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


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
        out = {k: [] for k in ("input_ids", "labels", "response_tokens", "trained_tokens", "truncated", "empty_response",
                               "prompt_key", "prompt", "reference")}
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
            # A conversation is judged by its last answer, the one its reference and samples show.
            out["empty_response"].append(not messages[last]["content"].strip())
            # Examples are split by their prompt: one question asked twice lands on one side only.
            out["prompt_key"].append(json.dumps([m for m in messages if m["role"] != "assistant"], sort_keys=True))
            out["prompt"].append(style.prompt_text(messages[:last], end))
            out["reference"].append(messages[last]["content"])
        return out


def split_stats(encoded: datasets.Dataset, kept: datasets.Dataset, used: datasets.Dataset) -> dict:
    """Examples read, dropped (no response token left), truncated and kept; then the examples used (the
    first --max_*_samples of those kept), their tokens, trained and masked, and how many have an empty
    response."""
    tokens = sum(len(ids) for ids in used["input_ids"])
    trained = sum(used["trained_tokens"])
    return {"examples": len(encoded), "dropped": len(encoded) - len(kept), "truncated": sum(kept["truncated"]),
            "kept": len(kept), "used": len(used), "tokens": tokens, "trained_tokens": trained, "masked_tokens": tokens - trained,
            "empty_responses": sum(used["empty_response"])}


@dataclass
class SftData:
    train: datasets.Dataset
    validation: datasets.Dataset | None
    stats: dict


MODEL_COLUMNS = ["input_ids", "labels"]


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
    _warn_of_empty_responses(stats)
    return SftData(kept["train"], kept["validation"] if len(kept["validation"]) else None, stats)


def _warn_of_empty_responses(stats: dict) -> None:
    # An empty answer still trains its end token (a real target: say nothing), so such examples are kept; but
    # it is more often a broken record or a wrong --field_names than a wish, so it is said, once for all splits.
    counts = [(stats[split]["empty_responses"], name) for split, name in (("train", "training"), ("validation", "validation"))]
    counts = [(n, name) for n, name in counts if n]
    if not counts:
        return
    one = sum(n for n, _ in counts) == 1
    logger.warning(f"{' and '.join(f'{n:,} {name}' for n, name in counts)} {'example has' if one else 'examples have'} "
                   f"an empty response (blank or whitespace only): {'its' if one else 'their'} answer is the end token "
                   f"alone; drop or fix {'it' if one else 'them'} if that is not what you want")
