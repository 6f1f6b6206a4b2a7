#!/usr/bin/env python
"""Pretrain a GPT-2 of any shape on any dataset, or continue training a checkpoint.

    python run_clm.py                                      # the built-in quickstart, no download
    python run_clm.py configs/experiments/tinyshakespeare.yaml --max_steps 100
    accelerate launch run_clm.py --dataset_name roneneldan/TinyStories \\
        --config_overrides n_embd=256,n_layer=6,n_head=8,n_positions=512 --max_train_tokens 200_000_000
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from transformers import Trainer, default_data_collator

from callbacks import (BenchmarkCallback, CompleteCheckpointsCallback, EvalSetsCallback, LossPlotCallback, PerplexityCallback,
                       PreemptionCallback, PretrainingSamplesCallback, ThroughputCallback, add_log_callbacks)
from callbacks.benchmarks import load_benchmark
from callbacks.loss_plot import PLOT_FILE
from clmlab import data, eval_sets, modeling, optimizers, prepare, prepared, run, trackers
from clmlab.args import ClmTrainingArguments, DataArguments, InTrainingEvalArguments, ModelArguments, parse_overrides
from clmlab.cli import UsageError, exits_on_usage_error, parse_args, setup_logging
from clmlab.generation import DecodingSettings
from clmlab.tokenizer import tokenizer_for_run, trains_tokenizer

QUICKSTART = Path(__file__).resolve().parent / "configs" / "experiments" / "quickstart.yaml"
DATA_OR_MODEL = ("dataset_name", "train_files", "model_name_or_path", "config_name")  # without any: the quickstart is the base
logger = logging.getLogger("run_clm")


@exits_on_usage_error
def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments, each checked as it is parsed. With no data and no model, the quickstart is the base.
    setup_logging()
    model_args, data_args, evals, args = parse_args(
        [ModelArguments, DataArguments, InTrainingEvalArguments, ClmTrainingArguments], sys.argv[1:] if argv is None else argv, prog="run_clm.py",
        alternatives=[("max_steps", "max_train_tokens")],
        base_config=(QUICKSTART, DATA_OR_MODEL))
    if data_args.streaming and args.max_steps <= 0 and not args.max_train_tokens:
        raise UsageError("--streaming has no length to count epochs by; give --max_steps or --max_train_tokens")
    if (evals.sample_prompts or evals.benchmark) and args.shards_the_model:
        raise UsageError("--sample_prompts and --benchmark run the model outside the Trainer's step, which FSDP and DeepSpeed "
                         "shard; drop them and score the checkpoints with run_eval.py")
    config = modeling.build_config(model_args)
    block_size = data_args.block_size or min(modeling.context_length(config) or 1024, 1024)
    modeling.check_shape(config, block_size)
    resolved = run.resolved_arguments(model_args, data_args, evals, args)  # before the callbacks below take over any flag
    training = run.TrainingRun(args, resolved, PreemptionCallback(), CompleteCheckpointsCallback(args))
    if training.finished:
        return training.finished["final_metrics"]

    # 2. A prepared folder to read (given, or made now: every corpus that is not streamed is tokenized once into
    #    one), or documents to stream; the tokenizer; the model, seeded before any token is made.
    corpus = data_args.dataset_name if prepared.is_prepared(data_args.dataset_name) else None
    if corpus and data_args.streaming:
        raise UsageError(f"--dataset_name {corpus} is a prepared folder: it is read in place, never streamed; drop --streaming")
    if not corpus and not data_args.streaming:
        named = None if trains_tokenizer(model_args) else model_args.tokenizer_name or model_args.model_name_or_path
        folder = data_args.prepare_to or prepare.cache_folder(data_args, named, model_args.tokenizer_vocab_size)
        corpus = prepare.prepare_on_first_use(data_args, folder, named, model_args.tokenizer_vocab_size, args.process_index == 0)
    documents = None if corpus else data.load_documents(data_args, streaming=True)
    tokenizer = prepared.tokenizer_for_prepared(corpus, model_args) if corpus else tokenizer_for_run(model_args, data_args, documents)
    # A vocabulary wider than the tokenizer, from --config_overrides or a named config, is padding kept on purpose.
    vocab_override = parse_overrides(model_args.config_overrides).get("vocab_size") or (config.vocab_size if model_args.config_name else None)
    modeling.fit_config_to_tokenizer(config, tokenizer, from_scratch=not model_args.model_name_or_path,
                                     min_vocab_size=prepared.trained_vocab_size(corpus) if corpus else
                                     model_args.tokenizer_vocab_size if trains_tokenizer(model_args) else 0,
                                     vocab_override=int(vocab_override) if vocab_override else None)
    model = modeling.init_model(config, model_args.model_name_or_path, args.seed, model_args.attn_implementation, args.fused_cross_entropy)
    initial_checksum = modeling.weights_checksum(model)
    n_params = modeling.parameter_count(model)
    logger.info(f"model: {n_params:,} parameters, initial weights sha256 {initial_checksum[:16]}...")

    # 3. The budget: runs on different data stop at the same step, having seen the same number of tokens.
    step_tokens = run.tokens_per_step(block_size, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size)
    global_batch = step_tokens // block_size
    if args.max_train_tokens:
        args.max_steps = run.steps_for_token_budget(args.max_train_tokens, step_tokens)
        logger.info(f"--max_train_tokens {args.max_train_tokens:,} = {args.max_steps:,} steps of {step_tokens:,} tokens "
                    f"(block {block_size} x batch {args.per_device_train_batch_size} x accumulation "
                    f"{args.gradient_accumulation_steps} x world {args.world_size})")
    elif corpus and args.max_steps <= 0:
        args.max_steps = prepared.steps_for_epochs(corpus, block_size, args.num_train_epochs, global_batch)
        logger.info(f"--num_train_epochs {args.num_train_epochs} = {args.max_steps:,} steps of {global_batch} blocks")

    # 4. Blocks: read from the prepared folder in the run's own order, or packed from the stream as it is read.
    if corpus:
        lm_data = prepared.load_prepared(corpus, block_size, args.seed, global_batch, args.max_steps, data_args.max_eval_samples)
        training.read_in_order(lm_data.train, global_batch)
    else:
        lm_data = data.build_lm_datasets(documents, tokenizer, data_args, block_size, args.seed, global_batch)
    for split in ("train", "validation"):
        counts = [f"{v:,} {k}" for k, v in lm_data.stats[split].items() if type(v) is int]
        logger.info(f"{split}: {', '.join(counts) or 'streamed, counted as it is read'}")

    # 5. What every evaluation measures: the loss and bits per byte of each named set (the run's own validation
    #    split among them), multiple-choice benchmarks, samples of fixed prompts.
    sets, own = eval_sets.eval_sets_for_run(evals.named_eval_files, lm_data.validation, tokenizer, block_size, data_args)
    benchmarks = [load_benchmark(spec, path, evals.benchmark_limit) for spec, path in evals.named_benchmarks.items()]
    dataset = data_args.dataset_label or describe_data(data_args)
    trackers.configure_trackers(args, dataset, args.seed)

    # 6. Train, save, evaluate, record.
    trainer = Trainer(model=model, args=args, train_dataset=lm_data.train, processing_class=tokenizer, data_collator=default_data_collator,
                      eval_dataset={name: s.blocks for name, s in sets.items()} if len(sets) > 1 else lm_data.validation,
                      optimizer_cls_and_kwargs=optimizers.trainer_optimizer(args))  # None: the Trainer's own
    add_log_callbacks(trainer, EvalSetsCallback({name: s.identity for name, s in sets.items()}, own, named=len(sets) > 1),
                      *([BenchmarkCallback(benchmarks, tokenizer, args.per_device_eval_batch_size)] if benchmarks else []),
                      ThroughputCallback(sequence_length=block_size), PerplexityCallback())
    trainer.add_callback(LossPlotCallback(f"{dataset} - GPT-2 {n_params / 1e6:.2f}M params"))
    out = Path(args.output_dir)
    if evals.sample_prompts:
        settings = DecodingSettings(max_new_tokens=evals.sample_max_new_tokens, temperature=evals.sample_temperature, seed=0)
        trainer.add_callback(PretrainingSamplesCallback(out / "samples.jsonl", evals.sample_prompts, tokenizer, settings))
    return training.train(
        trainer, sequence_length=block_size,
        record={"data": {"sources": data.describe_sources(data_args), "block_size": block_size, **lm_data.stats},
                "model": {"parameters": n_params, "initial_weights_sha256": initial_checksum, "config": config.to_dict(),
                          "tokenizer_tokens": len(tokenizer), "tokenizer_sha256": prepared.tokenizer_sha256(tokenizer)},
                "comparison": {"name": args.comparison, "dataset": dataset, "seed": args.seed},
                "optimizer": optimizers.optimizer_record(model, args),
                "eval_sets": {name: s.record() for name, s in sets.items()}, "benchmarks": {b.name: b.record() for b in benchmarks},
                "budget": {"max_steps": args.max_steps, "tokens_per_step": step_tokens,
                           "max_train_tokens": args.max_steps * step_tokens if args.max_steps > 0 else None}},
        report=[f"Checkpoint: {out}/  (AutoModelForCausalLM.from_pretrained or transformers.pipeline)",
                f"Loss plot:  {out / PLOT_FILE}"])


def describe_data(data_args) -> str:
    if data_args.dataset_name:
        return data_args.dataset_name
    if data_args.train_files:
        names = [Path(p).name for p in data_args.train_files]
        return ", ".join(names[:2]) + (" ..." if len(names) > 2 else "")
    return "Python docs (pydoc_data)"


if __name__ == "__main__":
    main()
