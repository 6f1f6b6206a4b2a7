"""The comparison report over run folders: controls verified from the run records, tables, seed statistics,
paired verdicts, the null arm and the plots.

A comparison of datasets means something only if the runs differ in their data alone, so the report first
checks every control it can read (model shape, tokenizer, initial weights, tokens, batch, schedule, eval
data) and names each difference; then it compares datasets by seed-paired differences, because most of the
run-to-run spread of a small model comes from the seed and is shared by both datasets of a pair.

The logic here works on plain dicts and numbers (no torch, no Trainer); run_compare.py is the command.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from scipy import stats

from clmlab.cli import UsageError, first_line

logger = logging.getLogger(__name__)

# The names run_clm.py writes in a run folder (clmlab.run.INFO_FILE); not imported from there, since that
# module loads torch and the Trainer, which a report over JSON files has no use for.
INFO_FILE = "run_info.json"
STATE_FILE = "trainer_state.json"

NOT_RECORDED = "not recorded"  # a control a run's record lacks: unverifiable, so a difference
ABSENT = "absent"  # a key, eval set or benchmark that other runs have and this one lacks
# The run's own validation split as an eval set (clmlab.eval_sets.OWN_VALIDATION, not imported: that module loads
# torch). It is other text in every dataset's runs, so it is checked within a dataset and compared across none.
OWN_VALIDATION = "validation"
NULL_HALVES = ("~half0", "~half1")  # dataset labels of the two disjoint halves of one dataset (run_sweep.py)

# Config keys that say how the model was saved or called, not what it computes.
CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "return_dict",
                       "_commit_hash"}
SCHEDULE_KEYS = ("learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                 "adam_epsilon", "max_grad_norm", "optim", "max_steps")
# Checked only where some run records them: newer or older TrainingArguments may not have them, nor runs from
# before --matrix_optimizer. Muon's flags are clmlab.args.MUON_FLAGS (not imported: the report needs no transformers).
SCHEDULE_KEYS_IF_RECORDED = ("warmup_ratio", "lr_scheduler_kwargs", "optim_args", "matrix_optimizer", "muon_learning_rate",
                             "muon_momentum", "muon_nesterov", "muon_weight_decay", "muon_lr_adjustment")

EVAL_SET_MEASURES = ("loss", "bpb", "perplexity")
BENCHMARK_MEASURES = ("acc", "acc_norm", "acc_centered", "gold_logprob", "gold_bpb", "gold_prob")
LOWER_IS_BETTER = ("_loss", "_bpb", "_perplexity")
HIGHER_IS_BETTER = ("acc", "acc_norm", "acc_centered", "gold_logprob", "gold_prob")

CONFIDENCE = 0.95
POWER = 0.8
A_BETTER, B_BETTER, CANT_TELL = "A better", "B better", "can't tell"


# --------------------------------------------------------------------------------------------------- statistics


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of this metric is the better one: losses and bits per byte (gold_bpb included)
    are, accuracies and gold log-probabilities are not."""
    if metric.endswith(LOWER_IS_BETTER):
        return True
    if metric.endswith(HIGHER_IS_BETTER):
        return False
    raise ValueError(f"metric {metric!r}: no known direction (names end in {LOWER_IS_BETTER + HIGHER_IS_BETTER})")


@dataclass(frozen=True)
class SeedStatistics:
    """One dataset's figure over its seeds. `std` is the sample standard deviation (ddof=1) and `interval` the
    95% t-interval of the mean; both None with one seed, where there is no spread to estimate."""

    n: int
    mean: float | None
    std: float | None
    interval: tuple[float, float] | None


def seed_statistics(values: Sequence[float], confidence: float = CONFIDENCE) -> SeedStatistics:
    n = len(values)
    if n == 0:
        return SeedStatistics(0, None, None, None)
    mean = math.fsum(values) / n
    if n == 1:
        return SeedStatistics(1, mean, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return SeedStatistics(n, mean, std, (mean - half, mean + half))


@dataclass(frozen=True)
class Verdict:
    """Dataset A against dataset B on one metric, paired by seed. `mean_difference` is A − B over the shared
    seeds, `interval` its 95% paired-t interval, `detectable_difference` the smallest true |A − B| that this N and
    this spread would detect with power 0.8 at two-sided α = 0.05."""

    call: str  # A_BETTER, B_BETTER or CANT_TELL
    n: int
    seeds: tuple
    mean_difference: float | None
    interval: tuple[float, float] | None
    detectable_difference: float | None


def verdict(a: Mapping[Any, float], b: Mapping[Any, float], lower_is_better: bool,
            confidence: float = CONFIDENCE, power: float = POWER) -> Verdict:
    """The three-way verdict of A against B from {seed: value} of each. Only seeds present in both count: a
    seed's two runs start from the same weights, so their difference is free of the seed-to-seed spread that
    unpaired means would carry. "Better" only when the interval of the paired difference excludes 0; with
    fewer than two shared seeds there is no spread to judge by, so "can't tell"."""
    seeds = tuple(sorted(set(a) & set(b), key=lambda s: (str(type(s)), s)))
    differences = [a[s] - b[s] for s in seeds]
    n = len(differences)
    if n == 0:
        return Verdict(CANT_TELL, 0, seeds, None, None, None)
    mean = math.fsum(differences) / n
    if n == 1:
        return Verdict(CANT_TELL, 1, seeds, mean, None, None)
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    t_interval = stats.t.ppf(0.5 + confidence / 2, n - 1)
    half = t_interval * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    detectable = (t_interval + stats.t.ppf(power, n - 1)) * sd / math.sqrt(n)
    if high < 0 or low > 0:
        a_lower = high < 0
        call = A_BETTER if a_lower == lower_is_better else B_BETTER
    else:
        call = CANT_TELL
    return Verdict(call, n, seeds, mean, (low, high), detectable)


# --------------------------------------------------------------------------------------------------- run folders


@dataclass
class Run:
    """One run folder as the report reads it."""

    folder: Path
    name: str
    status: str
    dataset: str
    seed: Any
    info: dict
    log_history: list[dict] | None  # None: no trainer_state.json, so no curves

    @property
    def final_metrics(self) -> dict:
        return self.info.get("final_metrics") or {}


def is_run_folder(path: Path) -> bool:
    return (path / INFO_FILE).is_file()


def find_run_folders(paths: Iterable[str | Path]) -> list[Path]:
    """Every run folder named or held one level down in a sweep folder, in the order given."""
    found: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise UsageError(f"{given}: no such folder; give run folders (holding {INFO_FILE}) or sweep folders")
        if is_run_folder(given):
            found.append(given)
            continue
        runs = sorted(p for p in given.iterdir() if p.is_dir() and is_run_folder(p))
        if not runs:
            raise UsageError(f"{given}: not a run folder (no {INFO_FILE}) nor a sweep folder (no subfolder holds one)")
        found += runs
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [next(p for p in found if p.resolve() == u) for u in unique]


def is_sweep_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and not is_run_folder(path) and any(p.is_dir() and is_run_folder(p) for p in path.iterdir())


def default_output_dir(paths: Sequence[str | Path]) -> Path:
    """The sweep folder itself when it alone was given (its report lives with its runs), else ./comparison."""
    if len(paths) == 1 and is_sweep_folder(paths[0]):
        return Path(paths[0])
    return Path("comparison")


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except OSError as error:
        raise UsageError(f"{path}: cannot be read ({first_line(error)})") from None
    except ValueError as error:
        raise UsageError(f"{path}: not valid JSON ({first_line(error)})") from None
    if not isinstance(payload, dict):
        raise UsageError(f"{path}: holds a JSON {type(payload).__name__}, not the object run_clm.py writes")
    return payload


def training_arguments(info: dict) -> dict:
    """The TrainingArguments section of a record (ClmTrainingArguments, or the plain class in older runs)."""
    arguments = info.get("arguments") or {}
    for group, values in arguments.items():
        if group.endswith("TrainingArguments") and isinstance(values, dict):
            return values
    return {}


def dataset_label(info: dict) -> str:
    """The dataset's name in the comparison: the sweep's label, else what the run trained on."""
    recorded = (info.get("comparison") or {}).get("dataset")
    if recorded:
        return str(recorded)
    data_args = next((v for k, v in (info.get("arguments") or {}).items() if k.startswith("Data") and isinstance(v, dict)), {})
    if data_args.get("dataset_label"):
        return str(data_args["dataset_label"])
    if data_args.get("dataset_name"):
        config = data_args.get("dataset_config_name")
        return f"{data_args['dataset_name']}/{config}" if config else str(data_args["dataset_name"])
    if data_args.get("train_files"):
        return ",".join(Path(p).name for p in data_args["train_files"])
    folder = ((info.get("data") or {}).get("prepared") or {}).get("folder")
    return Path(folder).name if folder else "pydoc_data"


def read_run(folder: Path) -> Run:
    """A run folder's record and, for a finished run, its log (a running one may be rewriting it)."""
    info = _read_json(folder / INFO_FILE)
    seed = (info.get("comparison") or {}).get("seed")
    if seed is None:
        seed = training_arguments(info).get("seed")
    state_path = folder / STATE_FILE
    log_history = None
    if info.get("status") == "finished" and state_path.is_file():
        log_history = _read_json(state_path).get("log_history")
        if not isinstance(log_history, list):
            raise UsageError(f"{state_path}: no log_history list")
    return Run(folder, folder.name, str(info.get("status", NOT_RECORDED)), dataset_label(info), seed, info, log_history)


def load_runs(paths: Sequence[str | Path], force: bool = False) -> tuple[list[Run], list[dict]]:
    """The finished runs to compare, and the others, left out (refused without --force): a stopped or failed
    run has no final figures to put beside the others'."""
    folders = find_run_folders(paths)
    logger.info(f"reading {len(folders)} run folders")
    runs = [read_run(folder) for folder in folders]
    names = [r.name for r in runs]
    for run in runs:  # two sweeps with the same run names: say which sweep
        if names.count(run.name) > 1:
            run.name = f"{run.folder.parent.name}/{run.folder.name}"
    unfinished = [r for r in runs if r.status != "finished"]
    if unfinished and not force:
        listed = _some([f"{r.folder} ({r.status})" for r in unfinished], most=4)
        raise UsageError(f"runs not finished: {listed}; finish them, or pass --force to leave them out of the report")
    left_out = [{"name": r.name, "folder": str(r.folder), "status": r.status, "reason": f"status {r.status}, not finished"}
                for r in unfinished]
    runs = [r for r in runs if r.status == "finished"]
    if not runs:
        raise UsageError("no finished runs to compare")
    for run in runs:
        if run.seed is None:
            raise UsageError(f"{run.folder / INFO_FILE}: no seed recorded (comparison.seed or the training arguments' seed)")
        if not isinstance(run.info.get("final_metrics"), dict):
            raise UsageError(f"{run.folder / INFO_FILE}: status finished but no final_metrics")
    seen: dict[tuple, Run] = {}
    for run in runs:
        twin = seen.setdefault((run.dataset, run.seed), run)
        if twin is not run:
            raise UsageError(f"runs {twin.folder} and {run.folder} are both dataset {run.dataset!r} seed {run.seed}: "
                             "a seed counts once; give one of them")
    return runs, left_out


# --------------------------------------------------------------------------------------------------- controls


@dataclass
class Control:
    """One thing the runs must share. `values` maps each value as shown (hashes shortened) to the runs with it."""

    name: str
    passed: bool
    values: dict[str, list[str]] = field(default_factory=dict)

    def difference(self) -> str:
        """The difference in one phrase: which control, which runs, which values."""
        parts = [f"{value} ({_some(runs)})" for value, runs in self.values.items()]
        if len(self.values) == 1:
            return f"{self.name}: {parts[0]} in every run"
        return f"{self.name}: " + " vs ".join(parts)


def _some(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" +{len(names) - most} more" if len(names) > most else "")


_MISSING = object()
_HASH = re.compile(r"^[0-9a-f]{32,}$")


def shown(value) -> str:
    """A value as the report shows it: hashes shortened, absent ones said."""
    if value is _MISSING:
        return NOT_RECORDED
    if isinstance(value, str) and _HASH.match(value):
        return value[:12] + "…"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _dig(record: dict, *keys):
    for key in keys:
        if not isinstance(record, dict) or key not in record:
            return _MISSING
        record = record[key]
    return record


def _same(name: str, values: Mapping[str, Any]) -> Control:
    """A control from {run: value}: passed when every run recorded one and the same value."""
    grouped: dict[str, list[str]] = {}
    for run, value in values.items():
        grouped.setdefault(shown(value), []).append(run)
    passed = len(grouped) == 1 and NOT_RECORDED not in grouped
    return Control(name, passed, grouped)


def model_config(info: dict) -> dict | object:
    """The model config minus the keys that do not change what the model computes."""
    config = _dig(info, "model", "config")
    if not isinstance(config, dict):
        return _MISSING
    return {k: v for k, v in config.items() if k not in CONFIG_KEYS_IGNORED and not k.startswith("output_")}


def check_controls(runs: Sequence[Run]) -> list[Control]:
    """Every control of a fair comparison, read from the records: one Control per thing checked, so that a
    difference names what differs (a config key, a seed's initial weights, an eval set)."""
    controls: list[Control] = []
    configs = {r.name: model_config(r.info) for r in runs}
    recorded = {n: c for n, c in configs.items() if c is not _MISSING}
    first = next(iter(recorded.values()), None)
    if len(recorded) == len(configs) and all(c == first for c in recorded.values()):
        controls.append(Control("model config", True, {f"identical ({len(first)} keys)": list(configs)}))
    if len(recorded) < len(configs):
        controls.append(_same("model config", {n: "recorded" if n in recorded else _MISSING for n in configs}))
    for key in sorted({k for c in recorded.values() for k in c}):
        if len({shown(c.get(key, ABSENT)) for c in recorded.values()}) > 1:  # a key the recorded configs differ in
            controls.append(_same(f"model config {key}", {n: c.get(key, ABSENT) if c is not _MISSING else _MISSING
                                                           for n, c in configs.items()}))
    controls.append(_same("tokenizer sha256", {r.name: _dig(r.info, "model", "tokenizer_sha256") for r in runs}))
    seeds = sorted({r.seed for r in runs}, key=lambda s: (str(type(s)), s))
    for index, seed in enumerate(seeds):
        same_seed = {r.name: _dig(r.info, "model", "initial_weights_sha256") for r in runs if r.seed == seed}
        controls.append(_same(f"initial weights sha256, seed {seed} (seed index {index})", same_seed))
    controls.append(_same("tokens seen", {r.name: _dig(r.info, "tokens_seen") for r in runs}))
    controls.append(_same("tokens per step (global batch)", {r.name: _dig(r.info, "budget", "tokens_per_step") for r in runs}))
    controls.append(_same("block size", {r.name: _dig(r.info, "data", "block_size") for r in runs}))
    precisions = {r.name: _dig(r.info, "launch", "mixed_precision") for r in runs}
    if any(v is not _MISSING for v in precisions.values()):  # recorded since launch configs could set it unseen
        controls.append(_same("mixed precision", precisions))
    schedules = {r.name: training_arguments(r.info) for r in runs}
    for run in runs:  # the steps the run was set to take: --max_steps is -1 where --max_train_tokens set them
        steps = _dig(run.info, "budget", "max_steps")
        if steps is not _MISSING:
            schedules[run.name] = {**schedules[run.name], "max_steps": steps}
    optional = [k for k in SCHEDULE_KEYS_IF_RECORDED if any(k in s for s in schedules.values())]
    for key in (*SCHEDULE_KEYS, *optional):
        controls.append(_same(f"schedule {key}", {n: s.get(key, _MISSING) for n, s in schedules.items()}))
    for section, what in (("eval_sets", "eval set"), ("benchmarks", "benchmark")):
        sections = {r.name: r.info.get(section) for r in runs}
        names = sorted({name for s in sections.values() if isinstance(s, dict) for name in s})
        if any(not isinstance(s, dict) for s in sections.values()):
            controls.append(_same(f"{what}s", {n: ("recorded" if isinstance(s, dict) else _MISSING) for n, s in sections.items()}))
        for name in names:
            values = {n: (_MISSING if not isinstance(s, dict) else (s[name].get("sha256", _MISSING) if name in s else ABSENT))
                      for n, s in sections.items()}
            if what == "eval set" and name == OWN_VALIDATION:
                for dataset in sorted({r.dataset for r in runs}):
                    own = {r.name: values[r.name] for r in runs if r.dataset == dataset}
                    if any(v is not ABSENT for v in own.values()):
                        controls.append(_same(f"eval set {name} (own split of {dataset}) sha256", own))
                continue
            controls.append(_same(f"{what} {name} sha256", values))
    return controls


# --------------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    key: str  # the final_metrics key: eval_<target>_<measure>
    kind: str  # "eval set" or "benchmark"
    target: str  # the eval set's or the benchmark's name
    measure: str  # loss, bpb, acc, gold_logprob, ...

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.key)


def find_metrics(runs: Sequence[Run]) -> list[Metric]:
    """The eval-set and benchmark metrics in any run's final_metrics. Names come from the eval_sets and
    benchmarks sections where recorded (a name may hold underscores), else from the metric's ending. The
    run's own validation split (eval_loss, eval_bpb, eval_validation_*) is left out: it is other text in every
    dataset's runs, so it is shown beside each dataset (`own_validation_bpb`) and compared across none."""
    eval_sets = {n for r in runs for n in (r.info.get("eval_sets") or {})}
    benchmarks = {n for r in runs for n in (r.info.get("benchmarks") or {})}
    found: dict[str, Metric] = {}
    for key in (k for r in runs for k in r.final_metrics):
        if key in found or not key.startswith("eval_") or not isinstance(_first_number(runs, key), float):
            continue
        name = key[len("eval_"):]
        metric = None
        for target in sorted(benchmarks | eval_sets, key=len, reverse=True):
            measures = BENCHMARK_MEASURES if target in benchmarks else EVAL_SET_MEASURES
            rest = name[len(target) + 1:] if name.startswith(target + "_") else None
            if rest in measures:
                metric = Metric(key, "benchmark" if target in benchmarks else "eval set", target, rest)
                break
        if metric is None:
            for measures, kind in ((BENCHMARK_MEASURES, "benchmark"), (EVAL_SET_MEASURES, "eval set")):
                measure = next((m for m in sorted(measures, key=len, reverse=True) if name.endswith("_" + m)), None)
                if measure:
                    metric = Metric(key, kind, name[: -len(measure) - 1], measure)
                    break
        if metric is not None and not (metric.kind == "eval set" and metric.target == OWN_VALIDATION):
            found[key] = metric
    order = {("eval set", m): i for i, m in enumerate(EVAL_SET_MEASURES)} | {("benchmark", m): i for i, m in enumerate(BENCHMARK_MEASURES)}
    return sorted(found.values(), key=lambda m: (m.kind != "eval set", m.target, order[(m.kind, m.measure)]))


def _first_number(runs: Sequence[Run], key: str) -> float | None:
    for run in runs:
        value = run.final_metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def is_null_half(dataset: str) -> bool:
    return dataset.endswith(NULL_HALVES)


def null_pairs(datasets: Iterable[str]) -> list[tuple[str, str]]:
    """(half0, half1) for each dataset whose two halves both ran."""
    present = set(datasets)
    return [(d, d[: -len(NULL_HALVES[0])] + NULL_HALVES[1]) for d in sorted(present)
            if d.endswith(NULL_HALVES[0]) and d[: -len(NULL_HALVES[0])] + NULL_HALVES[1] in present]


# --------------------------------------------------------------------------------------------------- the report


METHOD = """\
Each verdict compares two datasets, A and B, on one metric, **paired by seed**: only seeds that both datasets
ran count (N), and for each of them the report takes the difference A − B between the two runs of that seed.
The two runs of one seed start from the same initial weights, so much of the seed-to-seed variation is shared
and cancels in the difference. The mean of the N differences gets a **95% interval** from the t-distribution
with N − 1 degrees of freedom: the range of true differences these runs are consistent with. A verdict says
"A better" or "B better" only when that interval excludes 0; otherwise it says "can't tell". With fewer than 2
shared seeds there is no spread to judge by, and the verdict is "can't tell".

The **detectable difference** is the smallest true difference that N seeds with this spread would detect 4
times in 5 (two-sided α = 0.05, power 0.8): (t₀.₉₇₅,N−1 + t₀.₈,N−1) · sd of the differences / √N. A "can't tell"
with a detectable difference larger than the difference you care about means the comparison needs more seeds,
not that the datasets are equal.

Each verdict is made at 95%, so about **1 in 20** comparisons of datasets that are truly no different is
called "better" by chance; over many metrics and pairs, expect a few such calls. The null arm, where present,
measures this rate on two halves of one dataset."""


def _values_by_seed(runs: Sequence[Run], dataset: str, key: str) -> dict:
    values = {}
    for run in runs:
        value = run.final_metrics.get(key)
        if run.dataset == dataset and isinstance(value, (int, float)) and not isinstance(value, bool):
            values[run.seed] = float(value)
    return dict(sorted(values.items(), key=lambda item: (str(type(item[0])), item[0])))


def _one_or_all(values: list):
    """A per-run figure of a dataset: the value when its runs agree, else every distinct value."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def passes(info: dict) -> float | None:
    """Passes over the run's training data: as the prepared folder recorded it, else tokens seen / train tokens."""
    recorded = _dig(info, "data", "prepared", "passes")
    if isinstance(recorded, (int, float)):
        return float(recorded)
    seen, tokens = info.get("tokens_seen"), _dig(info, "data", "train", "tokens")
    if isinstance(seen, (int, float)) and isinstance(tokens, (int, float)) and tokens > 0:
        return seen / tokens
    return None


def compare_datasets(runs: Sequence[Run], a: str, b: str, metric: Metric) -> dict:
    """The verdict of dataset A against dataset B on one metric, as the report records it."""
    result = verdict(_values_by_seed(runs, a, metric.key), _values_by_seed(runs, b, metric.key), metric.lower_is_better)
    better = {A_BETTER: a, B_BETTER: b}.get(result.call)
    return {"a": a, "b": b, "metric": metric.key, "lower_is_better": metric.lower_is_better, "n": result.n,
            "seeds": list(result.seeds), "mean_difference": result.mean_difference,
            "interval": list(result.interval) if result.interval else None,
            "detectable_difference": result.detectable_difference, "verdict": result.call, "better": better}


def build_report(runs: Sequence[Run], left_out: Sequence[dict] = (), force: bool = False) -> dict:
    """Everything the report shows, as plain data (report.json). Refuses, naming each difference, when a
    control is not met and `force` is not set."""
    controls = check_controls(runs)
    failed = [c for c in controls if not c.passed]
    if failed and not force:
        raise UsageError("controls not met: " + "; ".join(c.difference() for c in failed)
                         + " (pass --force to write the report anyway, with these listed first)")
    metrics = find_metrics(runs)
    datasets = sorted({r.dataset for r in runs})
    by_dataset = {d: [r for r in runs if r.dataset == d] for d in datasets}
    dataset_rows = [{"dataset": d, "null_half": is_null_half(d), "runs": [r.name for r in rs],
                     "seeds": sorted((r.seed for r in rs), key=lambda s: (str(type(s)), s)),
                     "parameters": _one_or_all([_dig(r.info, "model", "parameters") for r in rs]),
                     "tokens_seen": _one_or_all([r.info.get("tokens_seen") for r in rs]),
                     "passes": _one_or_all([passes(r.info) for r in rs]),
                     "own_validation_bpb": asdict(seed_statistics(list(_values_by_seed(runs, d, "eval_bpb").values())))}
                    for d, rs in by_dataset.items()]
    tables: dict[str, list[dict]] = {}
    for metric in metrics:
        rows = []
        for row in dataset_rows:
            values = _values_by_seed(runs, row["dataset"], metric.key)
            summary = seed_statistics(list(values.values()))
            rows.append({"dataset": row["dataset"], "parameters": row["parameters"], "tokens_seen": row["tokens_seen"],
                         "passes": row["passes"], "n": summary.n, "mean": summary.mean, "std": summary.std,
                         "interval": list(summary.interval) if summary.interval else None,
                         "values": {str(s): v for s, v in values.items()}})
        tables[metric.key] = rows
    eval_sets = _eval_set_names(metrics)
    means = {(row["dataset"], key): row["mean"] for key, rows in tables.items() for row in rows}
    matrix = {"metric": "eval_<set>_bpb", "unit": "bits per byte, mean over seeds", "rows": datasets, "columns": eval_sets,
              "values": [[means.get((d, f"eval_{s}_bpb")) for s in eval_sets] for d in datasets]}
    main = [d for d in datasets if not is_null_half(d)]
    # On one eval set, bits per byte is the loss times a constant (the same blocks in every run): one test, not
    # two, so the verdicts (and the null arm's count) take bits per byte alone.
    with_bpb = {m.target for m in metrics if m.kind == "eval set" and m.measure == "bpb"}
    judged = [m for m in metrics if not (m.kind == "eval set" and m.measure == "loss" and m.target in with_bpb)]
    verdicts = [compare_datasets(runs, a, b, m) for a, b in itertools.combinations(main, 2) for m in judged]
    null_arm = []
    for half0, half1 in null_pairs(datasets):
        pair = [compare_datasets(runs, half0, half1, m) for m in judged]
        called = sum(v["verdict"] != CANT_TELL for v in pair)
        n = max((v["n"] for v in pair), default=0)
        base = half0[: -len(NULL_HALVES[0])]
        reading = (f"The two halves are disjoint halves of {base} (split by document hash): the same kind of data, so every "
                   "verdict between them should be \"can't tell\". Any \"better\" here is a false positive, and their share is "
                   "this report's measured false-positive rate (about 5% is expected at 95%, more where metrics move together).")
        if n < 2:
            reading += f" With N = {n} shared seeds no verdict can be called: the null arm measures nothing until it has 2 or more."
        # The metrics of one eval set or benchmark move together: one effect there is several calls, so the
        # rate is also given by eval set and benchmark.
        targets = sorted({m.target for m in judged})
        called_targets = sorted({m.target for m, v in zip(judged, pair) if v["verdict"] != CANT_TELL})
        null_arm.append({"dataset": base, "half0": half0, "half1": half1, "verdicts": pair, "called": called,
                         "metrics": len(pair), "rate": called / len(pair) if pair else None, "n": n, "reading": reading,
                         "targets": len(targets), "called_targets": called_targets})
    return {
        "force": force,
        "controls": {"met": not failed, "checks": [{**asdict(c), "difference": None if c.passed else c.difference()} for c in controls],
                     "not_met": [c.difference() for c in failed]},
        "left_out": list(left_out),
        "runs": [{"name": r.name, "folder": str(r.folder), "dataset": r.dataset, "seed": r.seed, "status": r.status,
                  "parameters": (r.info.get("model") or {}).get("parameters"),
                  "tokens_seen": r.info.get("tokens_seen"), "passes": passes(r.info),
                  "final_metrics": {m.key: r.final_metrics.get(m.key) for m in metrics}} for r in runs],
        "datasets": dataset_rows,
        "metrics": [{**asdict(m), "lower_is_better": m.lower_is_better} for m in metrics],
        "tables": tables,
        "matrix": matrix,
        "verdicts": verdicts,
        "null_arm": null_arm,
        "method": METHOD,
        "plots": {"loss": {s: f"loss_{file_safe(s)}.png" for s in eval_sets}, "matrix": "matrix.png"},
    }


def _eval_set_names(metrics: Sequence[Metric]) -> list[str]:
    return list(dict.fromkeys(m.target for m in metrics if m.kind == "eval set"))


def file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# --------------------------------------------------------------------------------------------------- Markdown


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return " / ".join(_number(v, digits) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _passes(value) -> str:
    """Passes over the data: three significant figures, since a short run makes a small fraction of one."""
    if isinstance(value, list):
        return " / ".join(map(_passes, value))
    return "n/a" if value is None else f"{value:.3g}"


def _interval(interval) -> str:
    return "n/a" if not interval else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _mean_std(row: dict) -> str:
    if row["mean"] is None:
        return "n/a"
    spread = f" ± {row['std']:.4f}" if row["std"] is not None else " ± n/a"
    return f"{row['mean']:.4f}{spread} (N={row['n']})"


def _verdict_text(v: dict) -> str:
    return f"**{v['verdict']}** ({v['better']})" if v["better"] else v["verdict"]


def _verdict_rows(verdicts: Sequence[dict]) -> list[list[str]]:
    return [[v["a"], v["b"], f"{v['metric']} ({'lower' if v['lower_is_better'] else 'higher'} is better)", v["n"],
             _number(v["mean_difference"]), _interval(v["interval"]), _number(v["detectable_difference"]), _verdict_text(v)]
            for v in verdicts]


VERDICT_HEADER = ("A", "B", "metric", "N", "mean difference A − B", "95% interval", "detectable difference", "verdict")


def matrix_text(report: dict) -> str:
    """The cross-evaluation matrix as aligned plain text, for the terminal."""
    matrix = report["matrix"]
    width = max([len("training dataset")] + [len(d) for d in matrix["rows"]])
    columns = [max(10, len(c)) for c in matrix["columns"]]
    lines = [f"bits per byte (mean over seeds); rows: training dataset, columns: eval set",
             "training dataset".ljust(width) + "  " + "  ".join(c.rjust(w) for c, w in zip(matrix["columns"], columns))]
    for dataset, values in zip(matrix["rows"], matrix["values"]):
        lines.append(dataset.ljust(width) + "  " + "  ".join(_number(v).rjust(w) for v, w in zip(values, columns)))
    return "\n".join(lines)


def main_table(report: dict) -> str:
    """What the command prints: the cross-evaluation matrix, or the first benchmark's table where no eval set
    has bits per byte."""
    if report["matrix"]["columns"]:
        return matrix_text(report)
    if not report["metrics"]:
        return "no eval-set or benchmark metrics in the runs' final_metrics"
    key = report["metrics"][0]["key"]
    width = max(len("dataset"), *(len(row["dataset"]) for row in report["tables"][key]))
    lines = [f"{key}: mean ± std over seeds (N)", "dataset".ljust(width) + "  " + key]
    lines += [row["dataset"].ljust(width) + "  " + _mean_std(row) for row in report["tables"][key]]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """report.md: the same content as report.json, as tables a reader scans, with the plots linked."""
    out = ["# Dataset comparison", ""]
    if not report["controls"]["met"]:
        out += ["## ⚠ Controls NOT met", "",
                "These runs differ in more than their data, so differences below may come from these and not from the "
                "datasets. The report was written only because --force was given.", ""]
        out += [f"- {line}" for line in report["controls"]["not_met"]] + [""]
    datasets = report["datasets"]
    out += [f"{len(report['runs'])} finished runs of {len(datasets)} datasets.", ""]
    if report["left_out"]:
        out += ["## Left out", "", "Runs that did not finish are left out of every table and verdict (--force).", ""]
        out += _table(("run", "status", "folder"), ([r["name"], r["status"], r["folder"]] for r in report["left_out"])) + [""]
    out += ["## Controls", "", "Each is read from the runs' records, not assumed.", ""]
    out += _table(("control", "result", "values (runs)"),
                  ([c["name"], "pass" if c["passed"] else "**FAIL**", "; ".join(f"{v} ({_some(r)})" for v, r in c["values"].items())]
                   for c in report["controls"]["checks"])) + [""]
    out += ["## Datasets", ""]
    out += ["Bits per byte on its own validation split: other text for every dataset, so shown here and compared in "
            "no verdict.", ""]
    out += _table(("dataset", "seeds", "parameters", "tokens seen", "passes over its data", "own validation bpb"),
                  ([d["dataset"] + (" (null half)" if d["null_half"] else ""), ", ".join(map(str, d["seeds"])), _number(d["parameters"]),
                    _number(d["tokens_seen"]), _passes(d["passes"]), _mean_std(d["own_validation_bpb"])] for d in datasets)) + [""]
    matrix = report["matrix"]
    if matrix["columns"]:
        out += ["## Cross-evaluation matrix", "", "Bits per byte on each eval set (mean over seeds; lower is better). "
                "Rows: training dataset; columns: eval set.", ""]
        out += _table(("training dataset", *matrix["columns"]),
                      ([d, *map(_number, values)] for d, values in zip(matrix["rows"], matrix["values"]))) + [""]
        out += [f"![cross-evaluation matrix]({report['plots']['matrix']})", ""]
    metrics = report["metrics"]
    for kind in ("eval set", "benchmark"):
        for target in dict.fromkeys(m["target"] for m in metrics if m["kind"] == kind):
            own = [m for m in metrics if m["kind"] == kind and m["target"] == target]
            out += [f"## {kind.capitalize()} {target}", "", "Final scores, mean ± sample std over seeds (N seeds). "
                    + ", ".join(f"{m['measure']}: {'lower' if m['lower_is_better'] else 'higher'} is better" for m in own) + ".", ""]
            rows = []
            for i, d in enumerate(datasets):
                first = report["tables"][own[0]["key"]][i]
                rows.append([d["dataset"], _number(first["parameters"]), _number(first["tokens_seen"]), _passes(first["passes"]),
                             *(_mean_std(report["tables"][m["key"]][i]) for m in own)])
            out += _table(("dataset", "parameters", "tokens seen", "passes", *(m["measure"] for m in own)), rows) + [""]
            if kind == "eval set" and target in report["plots"]["loss"]:
                out += [f"![loss on {target} against tokens seen]({report['plots']['loss'][target]})", ""]
    out += ["## Seeds", "", "Per dataset and metric: each seed's final value, mean, sample std (ddof=1), the 95% t-interval "
            "of the mean and N. With one seed there is no spread: std and interval are n/a.", ""]
    rows = [[row["dataset"], key, ", ".join(f"{s}: {v:.4f}" for s, v in row["values"].items()), _number(row["mean"]),
             _number(row["std"]), _interval(row["interval"]), row["n"]]
            for key, table in report["tables"].items() for row in table]
    out += _table(("dataset", "metric", "values by seed", "mean", "std", "95% interval", "N"), rows) + [""]
    out += ["## Verdicts", "", report["method"], ""]
    if report["verdicts"]:
        out += _table(VERDICT_HEADER, _verdict_rows(report["verdicts"])) + [""]
    else:
        out += ["No pair of datasets to compare (null halves are compared only with each other, below).", ""]
    for arm in report["null_arm"]:
        out += [f"## Null arm: {arm['half0']} vs {arm['half1']}", "", arm["reading"], "",
                f"Its verdicts called a difference in {arm['called']} of {arm['metrics']} metrics "
                f"({100 * arm['rate']:.0f}%): in {len(arm['called_targets'])} of {arm['targets']} eval sets and benchmarks"
                f"{' (' + ', '.join(arm['called_targets']) + ')' if arm['called_targets'] else ''}."
                if arm["rate"] is not None else "No metric to compare.", ""]
        out += _table(VERDICT_HEADER, _verdict_rows(arm["verdicts"])) + [""]
    out += ["## Runs", ""]
    keys = [m["key"] for m in metrics]
    out += _table(("run", "dataset", "seed", *keys),
                  ([r["name"], r["dataset"], r["seed"], *(_number(r["final_metrics"][k]) for k in keys)] for r in report["runs"])) + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- plots


def _curve(run: Run, key: str, x_key: str) -> dict[int, tuple[float, float]]:
    """{step: (x, value)} of one metric in a run's log; a step logged twice (a resume) keeps its last value."""
    points = {}
    for entry in run.log_history or []:
        if key in entry and "step" in entry:
            points[int(entry["step"])] = (float(entry.get(x_key, entry["step"])), float(entry[key]))
    return dict(sorted(points.items()))


def plot_loss_curves(runs: Sequence[Run], eval_set: str, path: Path) -> None:
    """eval_<set>_loss against tokens seen: a thin line per run and a mean ± 1 std band per dataset, the band
    taken over the steps every run of the dataset logged (points aligned by step)."""
    import matplotlib

    matplotlib.use("Agg")  # no display where reports are made
    import matplotlib.pyplot as plt

    key = f"eval_{eval_set}_loss"
    entries = [e for r in runs for e in (r.log_history or []) if key in e]
    x_key = "num_input_tokens_seen" if entries and all("num_input_tokens_seen" in e for e in entries) else "step"
    figure, axes = plt.subplots(figsize=(8, 5))
    colours = plt.get_cmap("tab10")
    for i, dataset in enumerate(sorted({r.dataset for r in runs})):
        colour = colours(i % 10)
        curves = [c for c in (_curve(r, key, x_key) for r in runs if r.dataset == dataset) if c]
        for curve in curves:
            axes.plot([x for x, _ in curve.values()], [v for _, v in curve.values()], color=colour, linewidth=0.7, alpha=0.45)
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        xs = [sum(c[s][0] for c in curves) / len(curves) for s in steps]
        summaries = [seed_statistics([c[s][1] for c in curves]) for s in steps]
        means = [s.mean for s in summaries]
        spreads = [s.std or 0.0 for s in summaries]
        n = len(curves)
        label = f"{dataset}: mean ± 1 std over {n} seeds" if n > 1 else f"{dataset}: 1 seed (no spread)"
        axes.fill_between(xs, [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)], color=colour, alpha=0.2)
        axes.plot(xs, means, color=colour, linewidth=2, label=label)
    if entries:
        axes.legend(title="thin lines: single runs", fontsize="small")
    else:
        axes.text(0.5, 0.5, f"no run logged {key}", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("tokens seen" if x_key != "step" else "step")
    axes.set_ylabel(f"loss on {eval_set} (nats per token)")
    axes.set_title(f"Eval loss on {eval_set}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_matrix(report: dict, path: Path) -> None:
    """The cross-evaluation matrix as a heatmap, every cell annotated with its bits per byte."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = report["matrix"]
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix["values"]], dtype=float).reshape(
        len(matrix["rows"]), len(matrix["columns"]))
    figure, axes = plt.subplots(figsize=(2.5 + 1.4 * max(1, len(matrix["columns"])), 1.5 + 0.6 * max(1, len(matrix["rows"]))))
    if values.size:
        image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
        figure.colorbar(image, ax=axes, label="bits per byte (mean over seeds; lower is better)")
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), value in np.ndenumerate(values):
            axes.text(j, i, "n/a" if np.isnan(value) else f"{value:.3f}", ha="center", va="center",
                      color="white" if not np.isnan(value) and value > middle else "black", fontsize=9)
    else:
        axes.text(0.5, 0.5, "no eval set with bits per byte", ha="center", va="center", transform=axes.transAxes)
    axes.set_xticks(range(len(matrix["columns"])), matrix["columns"], rotation=30, ha="right")
    axes.set_yticks(range(len(matrix["rows"])), matrix["rows"])
    axes.set_xlabel("eval set")
    axes.set_ylabel("training dataset")
    axes.set_title("Cross-evaluation: bits per byte")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(report: dict, runs: Sequence[Run], output_dir: Path) -> list[Path]:
    """report.md, report.json and the plots, into output_dir; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.info(f"writing the report and {len(report['plots']['loss']) + 1} plots into {output_dir}")
    written = []
    for eval_set, file in report["plots"]["loss"].items():
        plot_loss_curves(runs, eval_set, output_dir / file)
        written.append(output_dir / file)
    plot_matrix(report, output_dir / report["plots"]["matrix"])
    written.append(output_dir / report["plots"]["matrix"])
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (output_dir / "report.md").write_text(render_markdown(report) + "\n")
    return [output_dir / "report.md", output_dir / "report.json", *written]
