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


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Context and continuation as they are scored: spaces at the end of the context move to the
    continuation (lm-evaluation-harness's rule), so a context ending in a space and a continuation starting
    with one tokenize alike. Bits per byte counts the bytes of the continuation as split here."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of context and continuation as lm-evaluation-harness makes them: spaces at the end of the
    context move to the continuation, and the continuation's tokens are those the joined text adds."""
    context, continuation = split_pair(context, continuation)
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


FORMULATIONS = ("rc", "mc")
CHOICE_TASKS = ("hellaswag", "multiple_choice")


@dataclass
class ChoiceExample:
    """One multiple-choice item as scored: each choice is a continuation of `context` after `delimiter`, and
    the model's choice is the one it finds most likely."""

    context: str
    choices: list[str]  # scored as continuations after `delimiter`
    gold: int
    delimiter: str = " "


def _check_formulation(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation {formulation!r}: must be 'rc' (score each choice's text as the continuation) "
                         f"or 'mc' (list the choices with letters and score the letter)")


def lettered_prompt(stem: str, labels: Sequence[str], texts: Sequence[str]) -> str:
    r"""The multiple-choice ('mc') prompt: the question, then one line per choice, "<label>. <text>", then
    "Answer:"; the labels are what is scored, after a space.

    Mirrors the doc_to_text of lm-evaluation-harness's commonsense_qa task
    (lm_eval/tasks/commonsense_qa/default.yaml: "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}\n
    ... E. {{choices['text'][4]}}\nAnswer:", doc_to_choice ['A', 'B', 'C', 'D', 'E'], and the default
    target_delimiter " "). That file writes out five lettered lines; here there are as many lines as the record
    has choices, under the record's own labels, so ARC's "1".."4" or A-D items render the same way."""
    lines = [f"Question: {stem.strip()}"] + [f"{label}. {text}" for label, text in zip(labels, texts)]
    return "\n".join(lines) + "\nAnswer:"


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleanup of HellaSwag's WikiHow text."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict, formulation: str = "rc") -> ChoiceExample:
    """A HellaSwag record (activity_label, ctx_a, ctx_b, endings, label) as a ChoiceExample.

    rc: lm-evaluation-harness's hellaswag task: each cleaned ending scored after the cleaned context.
    mc: clmlab's own (lm-evaluation-harness has no multiple-choice HellaSwag): the cleaned context in the
    question's place of the commonsense_qa prompt (lettered_prompt), the endings listed as A-D, and the
    letter scored."""
    _check_formulation(formulation)
    context = hellaswag_preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    endings = [hellaswag_preprocess(e) for e in doc["endings"]]
    gold = int(doc["label"])
    if formulation == "mc":
        labels = list(string.ascii_uppercase[: len(endings)])
        return ChoiceExample(lettered_prompt(context, labels, endings), labels, gold)
    return ChoiceExample(context, endings, gold)


def multiple_choice_example(doc: dict, formulation: str = "rc") -> ChoiceExample:
    r"""A CommonsenseQA / ARC record (question, choices, answerKey; either layout, see clmlab.data.choice_fields)
    as a ChoiceExample.

    rc: "Question: <stem>\nAnswer:" and each choice's text scored after it (lm-evaluation-harness's
    commonsense_qa/main.yaml and arc prompts). mc: the commonsense_qa default.yaml prompt (lettered_prompt)
    with the record's labels scored."""
    _check_formulation(formulation)
    stem, labels, texts, answer = choice_fields(doc)
    if formulation == "mc":
        return ChoiceExample(lettered_prompt(stem, labels, texts), list(labels), labels.index(answer))
    return ChoiceExample(f"Question: {stem}\nAnswer:", texts, labels.index(answer))


def detect_choice_task(record: dict) -> str:
    """The task of a record, "hellaswag" or "multiple_choice", from the record's fields: HellaSwag has ctx_a, ctx_b, endings and
    label; CommonsenseQA / ARC have question, choices (top level, or inside question in the original layout)
    and answerKey. So one data file says what it holds without a flag."""
    if isinstance(record, dict):
        if all(key in record for key in ("ctx_a", "ctx_b", "endings", "label")):
            return "hellaswag"
        question = record.get("question")
        has_choices = "choices" in record or (isinstance(question, dict) and "choices" in question)
        if question is not None and has_choices and "answerKey" in record:
            return "multiple_choice"
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"a record with fields {fields} is neither HellaSwag (ctx_a, ctx_b, endings, label) "
                     f"nor CommonsenseQA/ARC (question, choices, answerKey)")


def choice_examples(records: Iterable[dict], task: str, formulation: str = "rc") -> list[ChoiceExample]:
    """The ChoiceExamples of a task's records, task "hellaswag" or "multiple_choice", in either formulation."""
    _check_formulation(formulation)
    if task not in CHOICE_TASKS:
        raise ValueError(f"task {task!r}: must be one of {', '.join(CHOICE_TASKS)}")
    make = hellaswag_example if task == "hellaswag" else multiple_choice_example
    return [make(record, formulation) for record in records]


def choice_records(model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 16,
                   progress: Progress | None = None) -> list[dict]:
    """The per-example part of choice scoring, one plain JSON-able dict an example, so that processes can
    each score a shard, gather the records (torch.distributed.all_gather_object) and summarize them once:
    {"loglikelihoods": summed log-probability of each choice's continuation (nats),
     "gold": index of the right choice,
     "bytes": UTF-8 bytes of each continuation as scored (its delimiter, and any spaces split_pair moved
              from the context, included),
     "chars": characters of each choice's text (lm-evaluation-harness's acc_norm length)}."""
    requests, spans = [], []
    for example in examples:
        spans.append(len(example.choices))
        for choice in example.choices:
            requests.append(encode_pair(tokenizer, example.context, example.delimiter + choice))
    scores = loglikelihoods(model, requests, batch_size, progress)
    records, cursor = [], 0
    for example, n in zip(examples, spans):
        records.append({
            "loglikelihoods": [float(ll) for ll, _ in scores[cursor : cursor + n]],
            "gold": int(example.gold),
            "bytes": [len(split_pair(example.context, example.delimiter + c)[1].encode("utf-8")) for c in example.choices],
            "chars": [len(c) for c in example.choices],
        })
        cursor += n
    return records


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's argmax


def summarize_choices(records: Sequence[dict]) -> dict:
    """The metrics of choice_records' records (all of a task's, from one process or gathered from several):

    acc: the choice with the highest summed log-likelihood is the gold one.
    acc_norm: the same with log-likelihood per character of the choice (lm-evaluation-harness's acc_norm).
    acc_centered: (acc - random) / (1 - random), random = mean over examples of 1 / number of choices: 0 for
        chance, 1 for all right, comparable across tasks with different numbers of choices (DCLM's centered
        accuracy: Li et al. 2024, "DataComp-LM").
    gold_logprob: mean over examples of the gold continuation's summed log-probability (nats).
    gold_bpb: bits per byte of the gold continuations, sum of -log-likelihoods / (ln 2 * their UTF-8 bytes).
    gold_prob: mean over examples of the gold choice's probability among the choices (softmax of the
        choices' summed log-likelihoods).
    The three gold_* are continuous: they move before accuracy does, and DataDecide (Magnusson et al. 2025)
    found such proxies the most predictive of large-scale results from small runs."""
    n = len(records)
    correct = correct_norm = 0
    chance = gold_ll = gold_nll = gold_prob = 0.0
    gold_bytes = 0
    for record in records:
        lls, gold = record["loglikelihoods"], record["gold"]
        correct += _argmax(lls) == gold
        correct_norm += _argmax([ll / max(chars, 1) for ll, chars in zip(lls, record["chars"])]) == gold
        chance += 1 / len(lls)
        gold_ll += lls[gold]
        gold_nll -= lls[gold]
        gold_bytes += record["bytes"][gold]
        top = max(lls)
        gold_prob += math.exp(lls[gold] - top) / sum(math.exp(ll - top) for ll in lls)
    denominator = max(n, 1)
    acc, random = correct / denominator, chance / denominator
    return {
        "acc": acc,
        "acc_norm": correct_norm / denominator,
        "acc_centered": (acc - random) / (1 - random) if random < 1 else float("nan"),
        "gold_logprob": gold_ll / denominator,
        "gold_bpb": gold_nll / (math.log(2) * gold_bytes) if gold_bytes else float("nan"),
        "gold_prob": gold_prob / denominator,
        "examples": n,
    }


def score_choices(model, tokenizer, examples: Sequence[ChoiceExample], batch_size: int = 16,
                  progress: Progress | None = None) -> dict:
    """All of summarize_choices' metrics for the examples, scored in this process."""
    return summarize_choices(choice_records(model, tokenizer, examples, batch_size, progress))


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
