"""A comparison file: one architecture and budget, several datasets, several seeds. Read here into the list of
runs it stands for; run_sweep.py prepares the datasets, trains every (dataset, seed) and writes the report.

    comparison: three-corpora             # the tracker's group and the report's title
    output_dir: runs/three-corpora        # prepared/<dataset>/, runs/<dataset>-seed<seed>/, report/
    seeds: [0, 1, 2]
    run: {...}                            # run_clm.py flags every run shares (one tokenizer: tokenizer_name, or
    shared_tokenizer: 4096                #   a byte-level BPE of this many tokens trained on all the datasets' files)
    datasets:                             # name -> run_clm.py data flags
      tinyshakespeare: {train_files: [...]}
    eval_sets: {name: PATH}               # more evaluation sets; every dataset's held-out split is one already
    benchmarks: {hellaswag: PATH, "csqa:mc": PATH}
    benchmark_limit: 200
    sample_prompts: [...]
    null_arm: tinyshakespeare             # two runs per seed on two disjoint halves of one dataset

Every run is a plain run_clm.py command (`commands`), so a SLURM array can run task i of the list and the
report can be the last job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from clmlab.cli import UsageError, mapping_to_argv, read_yaml

NULL_HALVES = ("~half0", "~half1")  # a null arm's two datasets: <dataset>~half0 and <dataset>~half1
KEYS = {"comparison", "output_dir", "seeds", "run", "datasets", "eval_sets", "benchmarks", "benchmark_limit", "sample_prompts", "null_arm",
        "shared_tokenizer"}
# Flags a comparison file sets itself, per run; the `run` and `datasets` sections may not.
OWN_FLAGS = {"output_dir", "seed", "comparison", "dataset_label", "eval_files", "benchmark", "benchmark_limit", "sample_prompts",
             "prepare_to", "document_subset", "overwrite_output_dir", "resume_from_checkpoint"}
SOURCE_FLAGS = {"dataset_name", "dataset_config_name", "train_files", "validation_files"}


@dataclass
class PlannedRun:
    dataset: str
    seed: int
    output_dir: Path
    argv: list[str]  # run_clm.py's arguments


@dataclass
class Comparison:
    name: str
    output_dir: Path
    seeds: list[int]
    shared: dict
    datasets: dict[str, dict]  # null halves included, with their document_subset
    eval_sets: dict[str, str]
    benchmarks: dict[str, str]
    benchmark_limit: int | None
    sample_prompts: list[str]
    null_arm: str | None = None
    shared_tokenizer: int | None = None  # vocabulary of a BPE trained on every dataset's training files
    runs: list[PlannedRun] = field(default_factory=list)

    def tokenizer_folder(self) -> Path:
        """A prepared folder of every dataset's training files together, made for its tokenizer."""
        return self.output_dir / "prepared" / "shared-tokenizer"

    def prepared_folder(self, dataset: str) -> Path:
        return self.output_dir / "prepared" / dataset

    def runs_folder(self) -> Path:
        return self.output_dir / "runs"

    def report_folder(self) -> Path:
        return self.output_dir / "report"


NAMED_LISTS = {"eval_files", "benchmark"}  # flags whose values are name=PATH items


def _flags(values: dict) -> list[str]:
    return mapping_to_argv(values, lists=NAMED_LISTS)


def data_argument_flags() -> set[str]:
    from clmlab.args import DataArguments

    return {f.name for f in fields(DataArguments) if f.init}


def run_clm_flags() -> set[str]:
    from clmlab.args import ClmTrainingArguments, DataArguments, InTrainingEvalArguments, ModelArguments

    return {f.name for cls in (ModelArguments, DataArguments, InTrainingEvalArguments, ClmTrainingArguments) for f in fields(cls) if f.init}


def load_comparison(path: str | Path, null_arm: str | None = None) -> Comparison:
    """Read and check a comparison file; paths in it are read relative to the directory it is run from, as
    run_clm.py's YAML files are."""
    spec = read_yaml(path, "comparison file")
    if not isinstance(spec, dict):
        raise UsageError(f"comparison file {path} must be a mapping with keys {sorted(KEYS)}")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise UsageError(f"comparison file {path}: unknown keys {unknown}; the keys are {sorted(KEYS)}")
    for key in ("comparison", "output_dir", "seeds", "datasets"):
        if not spec.get(key):
            raise UsageError(f"comparison file {path}: give {key!r}")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"comparison file {path}: seeds must be a list of distinct whole numbers, e.g. [0, 1, 2]")
    shared, datasets = spec.get("run") or {}, spec["datasets"]
    if not isinstance(shared, dict) or not isinstance(datasets, dict) or not all(isinstance(v, dict) for v in datasets.values()):
        raise UsageError(f"comparison file {path}: 'run' is a mapping of run_clm.py flags, 'datasets' a mapping of name -> data flags")
    known, data_flags = run_clm_flags(), data_argument_flags()
    for where, flags in [("run", shared), *((f"datasets.{name}", values) for name, values in datasets.items())]:
        if set(flags) - known:
            raise UsageError(f"comparison file {path}: {where} has keys run_clm.py does not know: {sorted(set(flags) - known)}")
        if where != "run" and set(flags) - data_flags:
            raise UsageError(f"comparison file {path}: {where} sets {sorted(set(flags) - data_flags)}, which are not data flags: "
                             "runs on different datasets differ in their data only; put them under run")
        for key in ("train_files", "validation_files"):
            if key in flags and not (isinstance(flags[key], list) and all(isinstance(f, str) for f in flags[key])):
                raise UsageError(f"comparison file {path}: {where}.{key} is a list of paths, e.g. [data/a.txt]")
        if set(flags) & OWN_FLAGS:
            raise UsageError(f"comparison file {path}: {where} sets {sorted(set(flags) & OWN_FLAGS)}, which the comparison sets "
                             "for each run; give them at the top level (seeds, eval_sets, benchmarks, ...) or drop them")
    if set(shared) & SOURCE_FLAGS:
        raise UsageError(f"comparison file {path}: 'run' names data ({sorted(set(shared) & SOURCE_FLAGS)}); data goes under datasets")
    for name, values in datasets.items():
        if not set(values) & SOURCE_FLAGS:
            raise UsageError(f"comparison file {path}: datasets.{name} names no data; give train_files or dataset_name")
        if not all(ch.isalnum() or ch in "_-" for ch in str(name)):
            raise UsageError(f"comparison file {path}: dataset name {name!r}: use letters, digits, '_' or '-'")
    vocab = spec.get("shared_tokenizer")
    if vocab is not None:
        if not isinstance(vocab, int) or vocab < 257 or shared.get("tokenizer_name"):
            raise UsageError(f"comparison file {path}: shared_tokenizer is the vocabulary size (257 or more) of a BPE trained on "
                             "all the datasets, instead of run.tokenizer_name; give one of the two")
        if not all(values.get("train_files") for values in datasets.values()):
            raise UsageError(f"comparison file {path}: shared_tokenizer trains on the datasets' train_files; every dataset needs them "
                             "(or give run.tokenizer_name)")
        shared = {**shared, "tokenizer_name": str(Path(spec["output_dir"]) / "prepared" / "shared-tokenizer" / "tokenizer")}
    if not (shared.get("tokenizer_name") or shared.get("model_name_or_path")):
        raise UsageError(f"comparison file {path}: set run.tokenizer_name or shared_tokenizer: runs on different data compare only "
                         "with one tokenizer (a BPE trained on each dataset would differ between them)")
    for key in ("eval_sets", "benchmarks"):
        value = spec.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise UsageError(f"comparison file {path}: {key} is a mapping of name -> path, e.g. {{hellaswag: data/hellaswag.jsonl}}")
        missing = [f"{name}={where}" for name, where in value.items() if not os.path.exists(where)]
        if missing:
            raise UsageError(f"comparison file {path}: {key} {missing[0]}: no such file or folder")
    prompts = spec.get("sample_prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UsageError(f"comparison file {path}: sample_prompts is a list of strings, e.g. [\"Once upon a time\"]")
    limit = spec.get("benchmark_limit")
    if limit is not None and not (isinstance(limit, int) and limit >= 1):
        raise UsageError(f"comparison file {path}: benchmark_limit is a whole number of examples, 1 or more")
    null_arm = null_arm or spec.get("null_arm")
    if null_arm and null_arm not in datasets:
        raise UsageError(f"null arm {null_arm!r} is not one of the datasets {sorted(datasets)}")
    all_datasets = {str(name): dict(values) for name, values in datasets.items()}
    if null_arm:
        for index, suffix in enumerate(NULL_HALVES):
            all_datasets[f"{null_arm}{suffix}"] = {**datasets[null_arm], "document_subset": f"{index}/2"}
    comparison = Comparison(
        name=str(spec["comparison"]), output_dir=Path(spec["output_dir"]), seeds=seeds, shared=shared, datasets=all_datasets,
        eval_sets={str(k): str(v) for k, v in (spec.get("eval_sets") or {}).items()},
        benchmarks={str(k): str(v) for k, v in (spec.get("benchmarks") or {}).items()},
        benchmark_limit=spec.get("benchmark_limit"), sample_prompts=list(spec.get("sample_prompts") or []), null_arm=null_arm,
        shared_tokenizer=vocab)
    clash = set(comparison.eval_sets) & set(datasets)
    if clash:
        raise UsageError(f"comparison file {path}: eval_sets {sorted(clash)} have a dataset's name; each dataset's held-out text "
                         "is an evaluation set already")
    comparison.runs = plan_runs(comparison)
    return comparison


def plan_runs(comparison: Comparison) -> list[PlannedRun]:
    """Every (dataset, seed), seed-major: after the first seed, every dataset has one run to compare."""
    held_out = {name: str(comparison.prepared_folder(name)) for name in comparison.datasets if not is_null_half(name)}
    runs = []
    for seed in comparison.seeds:
        for name, data_flags in comparison.datasets.items():
            out = comparison.runs_folder() / f"{name}-seed{seed}"
            values = {**comparison.shared, **data_flags, "prepare_to": str(comparison.prepared_folder(name)),
                      "dataset_label": name, "comparison": comparison.name, "seed": seed, "output_dir": str(out),
                      "eval_files": {**held_out, **comparison.eval_sets}, "benchmark": comparison.benchmarks or None,
                      "benchmark_limit": comparison.benchmark_limit if comparison.benchmarks else None,
                      "sample_prompts": comparison.sample_prompts or None}
            runs.append(PlannedRun(name, seed, out, _flags(values)))
    return runs


def is_null_half(dataset: str) -> bool:
    return dataset.endswith(NULL_HALVES)


def shared_tokenizer_flags(comparison: Comparison) -> list[str]:
    """run_prepare.py's arguments for the folder whose tokenizer every run uses: all the datasets' training
    files, every document of them offered to the BPE trainer (no dataset's documents crowd out another's)."""
    files = [f for name, values in comparison.datasets.items() if not is_null_half(name) for f in values["train_files"]]
    shared = {k: v for k, v in comparison.shared.items()
              if k in ("text_documents", "document_separator", "decode_errors", "validation_split_percentage")}
    return _flags({**shared, "train_files": files, "tokenizer_vocab_size": comparison.shared_tokenizer,
                   "tokenizer_train_documents": 10**12, "output_dir": str(comparison.tokenizer_folder())})


def prepare_flags(comparison: Comparison, dataset: str) -> list[str]:
    """run_prepare.py's arguments for one dataset: its data flags, the shared ones run_prepare.py reads, and
    the folder every run on it reads (run_clm.py --prepare_to) and every other run evaluates on."""
    from clmlab.args import DataArguments
    from clmlab.prepare import PrepareArguments

    known = {f.name for cls in (DataArguments, PrepareArguments) for f in fields(cls) if f.init} - {"prepare_to", "output_dir"}
    values = {k: v for k, v in {**comparison.shared, **comparison.datasets[dataset]}.items() if k in known and k != "tokenizer_vocab_size"}
    return _flags({**values, "output_dir": str(comparison.prepared_folder(dataset))})
