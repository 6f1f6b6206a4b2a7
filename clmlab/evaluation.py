"""Scoring a causal language model: log-likelihoods of continuations, sliding-window perplexity, and the
benchmark tasks built on them (HellaSwag, multiple choice, open QA). Written once here, so the scripts
and in-training evaluation score alike."""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from clmlab.data import choice_fields
from clmlab.modeling import context_length

Progress = Callable[[int], None]  # called with the number of items just finished


# --------------------------------------------------------------------------------------------------- log-likelihoods


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as lm-evaluation-harness makes them: spaces at the end of the
    context move to the continuation, and the continuation's tokens are those the joined text adds."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   progress: Progress | None = None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation, and
    whether greedy decoding would have produced it. Contexts too long for the model lose their left end.

    Requests are scored longest first (less padding) and returned in their own order.
    """
    max_length = context_length(model.config) or 1024
    device = next(model.parameters()).device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        inputs, spans = [], []
        for i in batch:
            context, continuation = requests[i]
            ids = (list(context) + list(continuation))[-(max_length + 1):][:-1]
            inputs.append(ids)
            spans.append(min(len(continuation), len(ids)))  # a continuation longer than the context: its end
        width = max(len(ids) for ids in inputs)
        input_ids = torch.zeros(len(inputs), width, dtype=torch.long)
        attention = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, ids in enumerate(inputs):  # right padding: positions stay 0..n-1, as when scored alone
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
        # The vocabulary projection only where a continuation token is predicted: with GPT-2's 50k vocabulary
        # it is most of the cost, and contexts are most of the positions.
        rows = [hidden[row, len(inputs[row]) - spans[row] : len(inputs[row])] for row in range(len(batch))]
        logprobs = torch.log_softmax(model.get_output_embeddings()(torch.cat(rows)).float(), dim=-1).cpu()
        offset = 0
        for row, i in enumerate(batch):
            span = spans[row]
            targets = torch.tensor(requests[i][1][-span:])
            scores = logprobs[offset : offset + span]
            offset += span
            total = scores.gather(1, targets[:, None]).sum().item()
            results[i] = (total, bool((scores.argmax(-1) == targets).all()))
        if progress:
            progress(len(batch))
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    loss: float  # mean negative log-likelihood per token, nats
    perplexity: float
    bits_per_byte: float  # tokenizer-independent: compares models with different vocabularies
    tokens: int
    bytes: int


@torch.no_grad()
def sliding_window_perplexity(model, tokenizer, text: str, stride: int | None = None, max_length: int | None = None,
                              progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of one text read in windows of the model's context that start every `stride` tokens;
    each token is scored once, with up to max_length - stride tokens of left context beyond its window's
    start. An EOS in front gives the first token a context."""
    max_length = max_length or context_length(model.config) or 1024
    stride = min(stride or max_length, max_length)
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    device = next(model.parameters()).device
    total_nll, scored, scored_until = 0.0, 0, 1
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + max_length, len(ids))
        first_target = max(scored_until, begin + 1)
        if first_target >= end:
            continue
        window = torch.tensor(ids[begin:end], device=device)[None]
        logprobs = torch.log_softmax(model(input_ids=window).logits.float()[0], dim=-1)
        targets = window[0, first_target - begin :]
        predicted = logprobs[first_target - begin - 1 : end - begin - 1]
        total_nll -= predicted.gather(1, targets[:, None]).sum().item()
        scored += end - first_target
        scored_until = end
        if progress:
            progress(1)
        if end == len(ids):
            break
    n_bytes = len(text.encode("utf-8"))
    loss = total_nll / max(scored, 1)
    return PerplexityResult(loss, math.exp(loss), total_nll / math.log(2) / max(n_bytes, 1), scored, n_bytes)


# --------------------------------------------------------------------------------------------------- choice tasks


@dataclass
class ChoiceExample:
    context: str
    choices: list[str]  # scored as continuations after `delimiter`
    gold: int
    delimiter: str = " "


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleanup of HellaSwag's WikiHow text."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict) -> ChoiceExample:
    context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return ChoiceExample(hellaswag_preprocess(context), [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def multiple_choice_example(doc: dict) -> ChoiceExample:
    stem, labels, texts, answer = choice_fields(doc)
    return ChoiceExample(f"Question: {stem}\nAnswer:", texts, labels.index(answer))


def score_choices(model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 16,
                  progress: Progress | None = None) -> dict:
    """acc: the choice with the highest summed log-likelihood; acc_norm: the highest log-likelihood per
    character of the choice (lm-evaluation-harness's normalisation)."""
    requests, owners = [], []
    for index, example in enumerate(examples):
        for choice in example.choices:
            requests.append(encode_pair(tokenizer, example.context, example.delimiter + choice))
            owners.append(index)
    scores = loglikelihoods(model, requests, batch_size, progress)
    correct = correct_norm = 0
    cursor = 0
    for example in examples:
        lls = [scores[cursor + k][0] for k in range(len(example.choices))]
        cursor += len(example.choices)
        normed = [ll / len(choice) for ll, choice in zip(lls, example.choices)]
        correct += max(range(len(lls)), key=lls.__getitem__) == example.gold
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == example.gold
    n = max(len(examples), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": len(examples)}


# --------------------------------------------------------------------------------------------------- open QA


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Exact match and token F1, each the best over a question's reference answers."""
    em = [max(normalize_answer(p) == normalize_answer(r) for r in refs) for p, refs in zip(predictions, references)]
    f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    n = max(len(predictions), 1)
    return {"exact_match": sum(em) / n, "f1": sum(f1) / n, "examples": len(predictions)}


def read_jsonl(path: str, limit: int | None = None) -> Iterable[dict]:
    with open(path, encoding="utf-8") as handle:
        for count, line in enumerate(handle):
            if limit is not None and count >= limit:
                return
            if line.strip():
                yield json.loads(line)
