#!/usr/bin/env python
"""Instruction-tune a causal LM, with the loss on response tokens only.

    python run_sft.py --model_name_or_path runs/quickstart --train_files ../shared/data/instruct/instruction-data.json
    python run_sft.py --model_name_or_path runs/base --format chat --train_files chats.jsonl --lora_r 16 --learning_rate 2e-4
    accelerate launch run_sft.py --model_name_or_path openai-community/gpt2 --dataset_name tatsu-lab/alpaca --bf16 true
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers.trainer_utils import IntervalStrategy

from callbacks import (CompleteCheckpointsCallback, LossPlotCallback, PerplexityCallback, PreemptionCallback, SamplesCallback,
                       ThroughputCallback, add_log_callbacks)
from clmlab import checkpoints, data, modeling, run, sft
from clmlab.args import SftDataArguments, SftModelArguments, SftTrainingArguments
from clmlab.cli import exits_on_usage_error, parse_args, setup_logging
from clmlab.generation import DecodingSettings
from clmlab.templates import STYLES
from clmlab.tokenizer import load_tokenizer

logger = logging.getLogger("run_sft")


@exits_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments, each checked as it is parsed; the format's fields mapped to the data's columns.
    setup_logging()
    model_args, data_args, args = parse_args([SftModelArguments, SftDataArguments, SftTrainingArguments],
                                             sys.argv[1:] if argv is None else argv, prog="run_sft.py")
    fmt = sft.FORMATS[data_args.format]
    style = STYLES[fmt.style]
    columns = sft.column_names(data_args)
    model_dir, tokenizer_dir = checkpoints.locate_model(model_args.model_name_or_path)
    resolved = run.resolved_arguments(model_args, data_args, args)  # before the callbacks below take over any flag
    training = run.TrainingRun(args, resolved, PreemptionCallback(), CompleteCheckpointsCallback(args))
    if training.finished:
        return training.finished["final_metrics"]

    # 2. Tokenizer with the template's tokens, model, examples as segments (prompt masked) of tokens.
    tokenizer = load_tokenizer(model_args.tokenizer_name or tokenizer_dir)
    added_ids = sft.prepare_tokenizer(tokenizer, style)
    model = sft.load_model(model_dir, tokenizer, style, args.seed)
    max_length = sft.check_max_length(data_args.max_length, model.config)
    with args.main_process_first(desc="tokenizing examples"):
        examples = sft.build_sft_datasets(sft.load_records(data_args), tokenizer, data_args, max_length)
    for split, counts in examples.stats.items():
        limited = f", the first {counts['used']:,} used" if counts["used"] < counts["kept"] else ""
        logger.info(f"{split}: {counts['kept']:,} examples ({counts['dropped']:,} dropped: response cut away by --max_length "
                    f"{max_length}; {counts['truncated']:,} truncated{limited}), {counts['trained_tokens']:,} trained and "
                    f"{counts['masked_tokens']:,} masked tokens")
    if model_args.lora_r:
        model = sft.add_lora(model, model_args, added_ids)
    if examples.validation is None:
        logger.warning("no validation examples: no eval loss, and the samples are answers to training prompts")
        args.eval_strategy, args.eval_on_start = IntervalStrategy.NO, False

    # 3. Train, answering a few held-out prompts before and after; save (LoRA merged), evaluate, record.
    out = Path(args.output_dir)
    trainer = sft.ResponseTokenTrainer(
        model=model, args=args, train_dataset=examples.train.select_columns(sft.MODEL_COLUMNS),
        eval_dataset=examples.validation.select_columns(sft.MODEL_COLUMNS) if examples.validation else None,
        processing_class=tokenizer, data_collator=sft.PadToLongestCollator(tokenizer.pad_token_id))
    add_log_callbacks(trainer, ThroughputCallback(), PerplexityCallback())
    trainer.add_callback(LossPlotCallback(f"{fmt.name} instruction tuning - {Path(model_args.model_name_or_path).name}"))
    held_out = examples.validation or examples.train
    shown = held_out.select(range(min(data_args.num_samples, len(held_out))))
    end_id = tokenizer.convert_tokens_to_ids(style.end_token(tokenizer))
    trainer.add_callback(SamplesCallback(out / sft.SAMPLES_FILE, shown["prompt"], shown["reference"], tokenizer,
                                         DecodingSettings(max_new_tokens=data_args.sample_max_new_tokens, do_sample=False), end_id))
    return training.train(
        trainer, sequence_length=max_length, save_model=lambda: sft.save_tuned_model(trainer, args.output_dir),
        record={"data": {"format": fmt.name, "template": style.name, "columns": columns, "sources": data.describe_sources(data_args),
                         "max_length": max_length, "train_on_prompt": data_args.train_on_prompt, **examples.stats},
                "model": {"from": model_dir, "parameters": modeling.parameter_count(model),
                          "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "added_tokens": tokenizer.convert_ids_to_tokens(added_ids), "end_token": style.end_token(tokenizer),
                          "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha} if model_args.lora_r else None}},
        report=[f"Model:   {out}/  (run_infer.py --checkpoint {out} --chat, or transformers.pipeline)"]
        + ([f"Samples: {out / sft.SAMPLES_FILE}  (held-out prompts answered before and after)"] if len(shown) else []))


if __name__ == "__main__":
    main()
