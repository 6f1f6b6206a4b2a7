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
    """Perplexity of one text, every token of it scored exactly once, by windows of at most max_length
    (default: the model's context, L) input tokens.

    An EOS in front gives the first token a context. The first window reads EOS and the first L - 1 tokens
    and scores the first L tokens, each after all the text before it. Every later window scores the next
    `stride` tokens (the last one what is left) and reads the L tokens just before its last target, so each
    target has as much context as a window holds: L - stride + 1 tokens for a window's first target, L for
    its last. A smaller stride buys longer contexts, nearer the model's perplexity on running text, for
    about one forward pass every `stride` tokens. The default stride, L, makes the windows disjoint and the
    total exactly lm-evaluation-harness's rolling log-likelihood, so the figures compare with its wikitext
    task. A stride above L is capped at L: the tokens between two windows would otherwise go unscored.
    """
    max_length = max_length or context_length(model.config) or 1024
    if stride is not None and stride < 1:
        raise ValueError(f"stride {stride}: must be at least 1 token")
    stride = max_length if stride is None else min(stride, max_length)
    ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_tokens = len(ids) - 1
    # (start, first, end): the window reads ids[start:end - 1] and scores ids[first:end].
    windows, end = [], 1
    while end <= n_tokens:
        first, end = end, min(end + (max_length if end == 1 else stride), n_tokens + 1)
        windows.append((max(0, end - 1 - max_length), first, end))
    device = next(model.parameters()).device
    # Every window after the first reads L tokens, so they batch without padding; the cap bounds the
    # logits, which with GPT-2's 50k vocabulary take most of the memory.
    per_batch = max(1, 2048 // max_length)
    total_nll, scored, cursor = 0.0, 0, 0
    while cursor < len(windows):
        batch = [windows[cursor]]
        for window in windows[cursor + 1 : cursor + per_batch]:
            if window[2] - window[0] != batch[0][2] - batch[0][0]:
                break
            batch.append(window)
        cursor += len(batch)
        inputs = torch.tensor([ids[start : end - 1] for start, _, end in batch], device=device)
        keep = max(end - first for _, first, end in batch)  # a window's targets are its last positions
        logits = model(input_ids=inputs, logits_to_keep=keep).logits
        for row, (_, first, end) in enumerate(batch):
            logprobs = torch.log_softmax(logits[row, keep - (end - first) :].float(), dim=-1)
            targets = torch.tensor(ids[first:end], device=device)
            total_nll -= logprobs.gather(1, targets[:, None]).sum().item()
            scored += end - first
        if progress:
            progress(len(batch))
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
