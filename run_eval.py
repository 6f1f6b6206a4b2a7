#!/usr/bin/env python
"""Score checkpoints: perplexity, HellaSwag, multiple-choice accuracy, open QA. Several checkpoints give
one comparison table.

    python run_eval.py --checkpoint runs/a runs/b --task perplexity --data_file ../shared/data/wikitext2/test.txt
    python run_eval.py --checkpoint runs/a --task hellaswag --data_file ../shared/data/hellaswag/hellaswag_val.jsonl
    python run_eval.py --checkpoint runs/a --task multiple_choice --data_file ../shared/data/commonsenseqa/dev_rand_split.jsonl
    python run_eval.py --checkpoint runs/a --task multiple_choice --formulation mc --data_file ../shared/data/commonsenseqa/dev_rand_split.jsonl
    python run_eval.py --checkpoint runs/a --task qa --data_file ../shared/data/qa/webglm_nq_open.jsonl --limit 100
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from clmlab import evaluation
from clmlab.checkpoints import LoadArguments, load_for_inference
from clmlab.data import invalid_utf8_bytes
from clmlab.cli import UsageError, exits_on_usage_error, first_line, parse_args, require, setup_logging
from clmlab.generation import DecodingSettings, generate

TASKS = ("perplexity", "hellaswag", "multiple_choice", "qa")
HUB_DEFAULTS = {"hellaswag": ("Rowan/hellaswag", "validation"), "multiple_choice": ("tau/commonsense_qa", "validation")}


@dataclass
class EvalArguments:
    checkpoint: list[str] = field(metadata={"help": "One or more run folders or checkpoint-N folders.", "nargs": "+"})
    task: str = field(default="perplexity", metadata={"help": "What to measure.", "choices": list(TASKS)})
    formulation: str = field(default="rc", metadata={
        "help": "hellaswag and multiple_choice: rc scores each choice's text as the continuation; mc lists the choices "
                "with letters in the prompt and scores the letter (lm-evaluation-harness's commonsense_qa prompt).",
        "choices": list(evaluation.FORMULATIONS)})
    data_file: str | None = field(default=None, metadata={"help": "Local data: text or jsonl (perplexity), jsonl (the other tasks)."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset instead of --data_file."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    split: str = field(default="validation", metadata={"help": "Split of --dataset_name."})
    text_column: str = field(default="text", metadata={"help": "Text field of jsonl or dataset records (perplexity)."})
    stride: int | None = field(default=None, metadata={"help": "Perplexity: each window after the first scores N new tokens (default and most: the context)."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first N examples."})
    batch_size: int = field(default=16, metadata={"help": "Sequences scored together."})
    max_new_tokens: int = field(default=24, metadata={"help": "Answer length for --task qa (greedy)."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})

    def __post_init__(self):
        for flag in ("batch_size", "max_new_tokens", "limit", "stride"):
            value = getattr(self, flag)
            require(value is None or value >= 1, flag, value, "must be 1 or more")
        require(self.formulation == "rc" or self.task in evaluation.CHOICE_TASKS, "formulation", self.formulation,
                f"only for --task {' or '.join(evaluation.CHOICE_TASKS)}")


def load_records(args: EvalArguments) -> list[dict]:
    """The task's records, from --data_file or the Hub."""
    if args.data_file:
        path = Path(args.data_file)
        if not path.is_file():
            raise UsageError(f"--data_file {path}: no such file")
        invalid_utf8_bytes(str(path), flag="--data_file")  # the text scored must be the text in the file
        if args.task == "perplexity" and path.suffix not in (".jsonl", ".json"):
            return [{args.text_column: path.read_text(encoding="utf-8")}]
        try:
            if path.suffix == ".json":
                records = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(records, list):
                    raise UsageError(f"--data_file {path} holds one JSON object; give a JSON array of records or jsonl")
                return records[: args.limit] if args.limit else records
            return list(evaluation.read_jsonl(str(path), args.limit))
        except ValueError as error:
            raise UsageError(f"--data_file {path} is not valid JSON: {first_line(error)}") from None
    name, split = args.dataset_name, args.split
    if name is None:
        if args.task not in HUB_DEFAULTS:
            raise UsageError(f"--task {args.task} needs --data_file or --dataset_name")
        name, split = HUB_DEFAULTS[args.task]
    import datasets

    try:
        records = datasets.load_dataset(name, args.dataset_config_name, split=split)
    except Exception as error:  # offline, not found, bad split
        raise UsageError(f"could not load dataset {name!r} ({split}): {first_line(error)}; pass a local --data_file") from None
    return list(records.select(range(min(args.limit, len(records)))) if args.limit else records)


def perplexity_text(args: EvalArguments, records: list[dict]) -> str:
    if not all(isinstance(r, dict) and isinstance(r.get(args.text_column), str) for r in records):
        raise UsageError(f"every record needs a text field {args.text_column!r}; pass the right one with --text_column")
    text = "\n\n".join(r[args.text_column] for r in records)
    if not text.strip():
        raise UsageError("the text to score is empty")
    return text


def evaluate_checkpoint(model, tokenizer, args: EvalArguments, records: list[dict], label: str, text: str | None) -> dict:
    if args.task == "perplexity":
        with tqdm(desc=f"{label}: perplexity windows", unit="window") as bar:
            result = evaluation.sliding_window_perplexity(model, tokenizer, text, args.stride, progress=bar.update)
        return {"loss": result.loss, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
                "tokens": result.tokens, "bytes": result.bytes}
    if args.task == "qa":
        try:
            questions = [r["question"] for r in records]
            references = [r["answer"] if isinstance(r["answer"], list) else [r["answer"]] for r in records]
        except KeyError as missing:
            raise UsageError(f"--task qa wants records with 'question' and 'answer'; one lacks {missing}") from None
        prompts = [f"Question: {q}\nAnswer:" for q in questions]
        settings = DecodingSettings(max_new_tokens=args.max_new_tokens, do_sample=False)
        answers = []
        for start in tqdm(range(0, len(prompts), args.batch_size), desc=f"{label}: qa", unit="batch"):
            try:
                outputs = generate(model, tokenizer, prompts[start : start + args.batch_size], settings, args.batch_size)
            except ValueError as error:  # max_new_tokens past the context
                raise UsageError(f"--max_new_tokens {args.max_new_tokens}: {error}") from None
            answers += [texts[0].strip().split("\n")[0] for texts in outputs]
        return evaluation.qa_scores(answers, references)
    try:
        examples = evaluation.choice_examples(records, args.task, args.formulation)
    except (KeyError, ValueError, TypeError) as error:
        raise UsageError(f"--task {args.task}: a record is not in the expected layout ({type(error).__name__}: {error})") from None
    with tqdm(total=sum(len(e.choices) for e in examples), desc=f"{label}: {args.task} ({args.formulation})", unit="choice") as bar:
        return evaluation.score_choices(model, tokenizer, examples, args.batch_size, bar.update)


def comparison_table(results: dict[str, dict]) -> str:
    columns = [k for k in next(iter(results.values())) if k not in ("seconds",)] + ["seconds"]
    width = max(len(name) for name in results)
    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    lines = ["checkpoint".ljust(width) + "  " + "  ".join(c.rjust(12) for c in columns)]
    for name, metrics in results.items():
        lines.append(name.ljust(width) + "  " + "  ".join(cell(metrics[c]).rjust(12) for c in columns))
    return "\n".join(lines)


@exits_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    args, placement = parse_args([EvalArguments, LoadArguments], argv, prog="run_eval.py")
    records = load_records(args)  # bad data fails before any model is loaded
    if not records:
        raise UsageError("no records to evaluate")
    text = perplexity_text(args, records) if args.task == "perplexity" else None
    loaded = [(path, *load_for_inference(path, placement.device, placement.dtype, placement.quantize)) for path in args.checkpoint]
    results = {}
    for path, model, tokenizer, _ in loaded:
        started = time.perf_counter()
        metrics = evaluate_checkpoint(model, tokenizer, args, records, path, text)
        metrics["seconds"] = round(time.perf_counter() - started, 2)
        results[path] = metrics
    formulation = args.formulation if args.task in evaluation.CHOICE_TASKS else None
    print(f"\n{args.task}{f' ({formulation})' if formulation else ''}"
          f" on {args.data_file or args.dataset_name or HUB_DEFAULTS.get(args.task, ('',))[0]}"
          f" ({len(records)} records{', int8' if placement.quantize else ''})")
    print(comparison_table(results))
    if args.output_json:
        payload = {"task": args.task, "data": args.data_file or args.dataset_name, "records": len(records),
                   "settings": {"formulation": formulation, "stride": args.stride, "limit": args.limit, "dtype": placement.dtype,
                                "quantize": placement.quantize},
                   "results": results}
        Path(args.output_json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"Wrote {args.output_json}")
    return results


if __name__ == "__main__":
    main()
