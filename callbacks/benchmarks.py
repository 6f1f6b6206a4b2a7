from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from callbacks.log_values import add_to_log
from clmlab import evaluation
from clmlab.cli import UsageError, first_line

# What a benchmark logs, as eval_<name>_<metric>: accuracy in three readings, and the continuous proxies on
# the gold answer that rank data best at small scale (DataDecide).
METRICS = ("acc", "acc_norm", "acc_centered", "gold_logprob", "gold_bpb", "gold_prob")
logger = logging.getLogger(__name__)


@dataclass
class Benchmark:
    name: str
    formulation: str  # rc: each choice's text scored as the continuation; mc: the choices lettered, the letter scored
    source: str
    examples: list

    def record(self) -> dict:
        """The benchmark's identity: a report checks that every run scored the same examples."""
        payload = json.dumps([[e.context, e.choices, e.gold, e.delimiter] for e in self.examples], ensure_ascii=False)
        return {"source": self.source, "formulation": self.formulation, "examples": len(self.examples),
                "sha256": hashlib.sha256(payload.encode("utf-8")).hexdigest()}


def benchmark_name(spec: str) -> str:
    name, _, formulation = spec.partition(":")
    return f"{name}_mc" if formulation == "mc" else name


def load_benchmark(spec: str, path: str, limit: int | None) -> Benchmark:
    """`name` or `name:mc` and a HellaSwag or CommonsenseQA/ARC jsonl file: its first `limit` examples. The
    lettered formulation of a benchmark is logged as `<name>_mc`, so both formulations of one file can be run."""
    name, _, formulation = spec.partition(":")
    formulation = formulation or "rc"
    name = benchmark_name(spec)
    try:
        records = list(evaluation.read_jsonl(path, limit))
    except (OSError, ValueError) as error:
        raise UsageError(f"--benchmark {spec}={path}: not a readable jsonl file ({first_line(error)})") from None
    if not records:
        raise UsageError(f"--benchmark {spec}={path} holds no records")
    try:
        task = evaluation.detect_choice_task(records[0])
        examples = evaluation.choice_examples(records, task, formulation)
    except (KeyError, ValueError, TypeError) as error:
        raise UsageError(f"--benchmark {spec}={path}: not HellaSwag or CommonsenseQA/ARC records ({type(error).__name__}: {error})") from None
    return Benchmark(name, formulation, str(Path(path).resolve()), examples)


class BenchmarkCallback(TrainerCallback):
    """Scores multiple-choice benchmarks at every evaluation, with run_eval.py's scoring (clmlab.evaluation), so
    the figure at a step is the one run_eval.py gives for that step's checkpoint.

    Every process scores its share of the examples (every world-size-th) and the main process merges them in
    the examples' own order; scoring draws no random numbers, so training goes on exactly as without it."""

    def __init__(self, benchmarks: list[Benchmark], tokenizer, batch_size: int = 16):
        self.benchmarks, self.tokenizer, self.batch_size = benchmarks, tokenizer, batch_size
        self._scored_step: int | None = None

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "eval_loss" not in logs or state.global_step == self._scored_step or model is None:
            return
        self._scored_step = state.global_step
        distributed = args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        was_training = model.training
        model.eval()
        values = {}
        try:
            for benchmark in self.benchmarks:
                mine = evaluation.choice_records(model, self.tokenizer, benchmark.examples[rank::world], self.batch_size)
                if distributed:
                    shards = [None] * world
                    torch.distributed.all_gather_object(shards, mine)
                    # Example i was scored by process i % world, as its (i // world)-th.
                    mine = [shards[i % world][i // world] for i in range(len(benchmark.examples))]
                scores = evaluation.summarize_choices(mine)
                values.update({f"eval_{benchmark.name}_{metric}": scores[metric] for metric in METRICS})
        finally:
            model.train(was_training)
        add_to_log(state, logs, values)
