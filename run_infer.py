#!/usr/bin/env python
"""Generate text from one checkpoint, or the same prompts through several side by side.

    python run_infer.py --checkpoint runs/quickstart --prompt "The for statement"
    python run_infer.py --checkpoint runs/sft --chat --prompt "Name three primary colors." --do_sample false
    python run_infer.py --checkpoint runs/sft --compare runs/base --prompts_file prompts.txt --output_jsonl out.jsonl
    python run_infer.py --checkpoint runs/quickstart            # no prompt: an interactive prompt loop
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

from clmlab.checkpoints import LoadArguments, load_for_inference
from clmlab.cli import UsageError, exits_on_usage_error, parse_args, require, setup_logging
from clmlab.generation import DecodingSettings, chat_end_token_id, chat_prompt, generate


@dataclass
class InferArguments:
    checkpoint: str = field(metadata={"help": "A run's output directory or a checkpoint-N folder."})
    compare: list[str] | None = field(default=None, metadata={"help": "More checkpoints: the same prompts through each, side by side.", "nargs": "+"})
    prompt: list[str] | None = field(default=None, metadata={"help": "A prompt; repeat the flag for several.", "action": "append"})
    prompts_file: str | None = field(default=None, metadata={"help": "Prompts: a text file (one per line) or jsonl with a 'prompt' field."})
    chat: bool = field(default=False, metadata={"help": "Wrap prompts in the checkpoint's chat template and stop at its end token."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together (left-padded)."})
    output_jsonl: str | None = field(default=None, metadata={"help": "Also write prompt, checkpoint, settings and text here."})

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be 1 or more")


def read_prompts(args: InferArguments) -> list[str]:
    # `--prompt a --prompt b c` arrives as [[a], [b, c]]: repeatable, and each may hold several prompts.
    prompts = [p for group in args.prompt or [] for p in (group if isinstance(group, list) else [group])]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts_file {path}: no such file")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (ValueError, KeyError, TypeError):
                    raise UsageError(f"--prompts_file {path} line {number}: expected a JSON object with a 'prompt' field") from None
            else:
                prompts.append(line)
    return prompts


def side_by_side(columns: list[tuple[str, str]]) -> str:
    width = max(20, (shutil.get_terminal_size((120, 20)).columns - 3 * (len(columns) - 1)) // len(columns))
    wrapped = [[title[:width], "-" * min(width, len(title))] + textwrap.wrap(text, width) or [""] for title, text in columns]
    return "\n".join(" | ".join(cell.ljust(width) for cell in row).rstrip() for row in zip_longest(*wrapped, fillvalue=""))


@exits_on_usage_error
def main(argv: list[str] | None = None) -> list[dict]:
    setup_logging()
    args, placement, settings = parse_args([InferArguments, LoadArguments, DecodingSettings], argv, prog="run_infer.py")
    prompts = read_prompts(args)
    models = [(path, *load_for_inference(path, placement.device, placement.dtype, placement.quantize)) for path in [args.checkpoint, *(args.compare or [])]]
    if args.chat and not models[0][2].chat_template:
        raise UsageError(f"--chat: the tokenizer of {args.checkpoint} has no chat template; train it with run_sft.py or drop --chat")
    for path, _, tokenizer, _ in models[1:]:
        if args.chat and not tokenizer.chat_template:  # a base model beside its instruction-tuned version
            print(f"note: {path} has no chat template: it gets the plain prompts", file=sys.stderr)

    def run(prompt_batch: list[str], stream: bool) -> list[dict]:
        records = []
        for _, model, tokenizer, model_dir in models:
            chat = args.chat and bool(tokenizer.chat_template)
            texts = [chat_prompt(tokenizer, p) for p in prompt_batch] if chat else prompt_batch
            stop = chat_end_token_id(tokenizer) if chat else None
            started = time.perf_counter()
            try:
                outputs = generate(model, tokenizer, texts, settings, args.batch_size, stop, stream)
            except ValueError as error:  # max_new_tokens past the context
                raise UsageError(str(error)) from None
            seconds = time.perf_counter() - started
            for prompt, sent, samples in zip(prompt_batch, texts, outputs):
                for sample in samples:
                    records.append({"prompt": prompt, "model_input": sent, "checkpoint": str(model_dir), "text": sample,
                                    "settings": settings.as_dict(), "seconds": round(seconds, 3)})
        return records

    records: list[dict] = []
    if prompts:
        single = len(prompts) == 1 and len(models) == 1 and settings.num_return_sequences == 1 and sys.stdout.isatty()
        if single:
            print(prompts[0], end="", flush=True)
        records = run(prompts, stream=single)
        if not single:
            show(records, prompts, len(models) > 1)
    else:
        interactive = sys.stdin.isatty()
        if interactive:
            print("Type a prompt and press Enter (empty line or Ctrl-D to quit).")
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            if not line.strip() and interactive:
                break
            batch = run([line], stream=interactive and len(models) == 1 and settings.num_return_sequences == 1)
            if not (interactive and len(models) == 1):
                show(batch, [line], len(models) > 1)
            print()
            records += batch
    if args.output_jsonl:
        with open(args.output_jsonl, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"Wrote {len(records)} generations to {args.output_jsonl}")
    return records


def show(records: list[dict], prompts: list[str], compare: bool) -> None:
    for prompt in prompts:
        mine = [r for r in records if r["prompt"] == prompt]
        print(f"\n=== {prompt}")
        if compare:
            print(side_by_side([(r["checkpoint"], r["text"]) for r in mine]))
        else:
            for r in mine:
                print(prompt + r["text"] if r["model_input"] == prompt else r["text"])
                if len(mine) > 1:
                    print("---")


if __name__ == "__main__":
    main()
