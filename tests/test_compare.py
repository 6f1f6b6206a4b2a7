"""The comparison report: the verdict and seed statistics against figures computed here independently, and
the report over synthetic run folders (controls named and refused, tables equal to the records, the matrix,
the null arm, the plots)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import run_script
from clmlab import compare
from clmlab.compare import A_BETTER, B_BETTER, CANT_TELL, seed_statistics, verdict

import run_compare

# ------------------------------------------------------------------------------------------------ the verdict


def test_verdict_three_way_and_direction():
    low = {0: 1.00, 1: 1.01, 2: 0.99, 3: 1.02}
    high = {0: 1.50, 1: 1.52, 2: 1.49, 3: 1.51}
    assert verdict(low, high, lower_is_better=True).call == A_BETTER
    assert verdict(high, low, lower_is_better=True).call == B_BETTER
    assert verdict(low, high, lower_is_better=False).call == B_BETTER  # accuracy: the higher one wins
    assert verdict(high, low, lower_is_better=False).call == A_BETTER
    overlapping = {0: 1.01, 1: 0.98, 2: 1.02, 3: 0.99}
    assert verdict(low, overlapping, lower_is_better=True).call == CANT_TELL
    one = verdict({0: 1.0}, {0: 2.0}, lower_is_better=True)  # no spread to judge by
    assert (one.call, one.n, one.interval, one.detectable_difference) == (CANT_TELL, 1, None, None)
    assert verdict({0: 1.0}, {1: 2.0}, lower_is_better=True).n == 0


def test_verdict_pairs_by_seed():
    # Seed-to-seed spread far larger than the difference, shared by both datasets: only pairing sees the shift.
    shared = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    noise = np.array([0.001, -0.002, 0.0015, -0.001, 0.0005])
    a = {seed: float(v) for seed, v in enumerate(shared + noise)}
    b = {seed: float(v) for seed, v in enumerate(shared + 0.1)}
    assert stats.ttest_ind(list(a.values()), list(b.values())).pvalue > 0.5  # unpaired: nowhere near a call
    a[99] = -100.0  # a seed only A ran: must not count
    b[7] = 100.0  # and one only B ran
    result = verdict(a, b, lower_is_better=True)
    assert result.call == A_BETTER and result.n == 5 and result.seeds == (0, 1, 2, 3, 4)
    # The figures, computed here another way: scipy's paired t-test and the power formula.
    da, db = [a[s] for s in range(5)], [b[s] for s in range(5)]
    differences = np.array(da) - np.array(db)
    interval = stats.ttest_rel(da, db).confidence_interval(0.95)
    assert result.mean_difference == pytest.approx(differences.mean())
    assert result.interval == pytest.approx((interval.low, interval.high))
    sd = differences.std(ddof=1)
    assert result.detectable_difference == pytest.approx((stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / math.sqrt(5))


def test_seed_statistics():
    values = [1.0, 2.0, 4.0, 3.5]
    summary = seed_statistics(values)
    sem = np.std(values, ddof=1) / math.sqrt(4)
    assert summary.n == 4
    assert summary.mean == pytest.approx(np.mean(values))
    assert summary.std == pytest.approx(np.std(values, ddof=1))
    assert summary.interval == pytest.approx(stats.t.interval(0.95, 3, loc=np.mean(values), scale=sem))
    assert seed_statistics([2.5]) == compare.SeedStatistics(1, 2.5, None, None)


# ------------------------------------------------------------------------------------------------ run folders

EVAL_SETS = ("wiki", "stories")
BENCHMARK = "hellaswag"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def figure(dataset: str, seed: int, name: str) -> float:
    """A run's final figure, distinct per dataset, seed and metric."""
    return round(1.0 + int(sha(f"{dataset}/{seed}/{name}")[:6], 16) / 16**6, 6)


def make_run(root: Path, dataset: str, seed: int, status: str = "finished", **change) -> Path:
    """A consistent run folder: what run_clm.py writes, with only the dataset and the seed varying. `change`
    edits the record: {"model.config.n_embd": 128, "model.tokenizer_sha256": None (removed), ...}."""
    folder = root / f"{dataset}-s{seed}"
    folder.mkdir(parents=True)
    own = figure(dataset, seed, "own")  # the run's own validation split: other text in every dataset
    metrics = {"eval_loss": own, "eval_bpb": own + 0.5, "eval_validation_loss": own, "eval_validation_bpb": own + 0.5}
    for name in EVAL_SETS:
        metrics |= {f"eval_{name}_loss": figure(dataset, seed, f"{name}_loss"), f"eval_{name}_bpb": figure(dataset, seed, f"{name}_bpb")}
    metrics |= {f"eval_{BENCHMARK}_{measure}": figure(dataset, seed, measure) - 0.7 for measure in ("acc", "acc_norm")}
    info = {
        "status": status,
        "arguments": {"ModelArguments": {}, "DataArguments": {"dataset_name": dataset},
                      "ClmTrainingArguments": {"learning_rate": 6e-4, "lr_scheduler_type": "cosine", "warmup_steps": 10,
                                               "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8,
                                               "max_grad_norm": 1.0, "optim": "adamw_torch", "max_steps": 30, "seed": seed}},
        "data": {"block_size": 128, "train": {"documents": 100, "tokens": 40_000, "blocks": 312},
                 "prepared": {"folder": f"prepared/{dataset}", "content_id": sha(dataset), "passes": 2.5}},
        "model": {"parameters": 1_234_567, "initial_weights_sha256": sha(f"init {seed}"),
                  "config": {"n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 8000, "_name_or_path": str(folder),
                             "transformers_version": "x", "output_hidden_states": False},
                  "tokenizer_tokens": 8000, "tokenizer_sha256": sha("tokenizer")},
        "budget": {"max_steps": 30, "tokens_per_step": 1024, "max_train_tokens": 30 * 1024},
        "launch": {"world_size": 1 + seed, "processes_per_node": 1 + seed, "device": "cuda", "mixed_precision": "bf16",
                   "parallelism": "ddp" if seed else "single process", "slurm_job_id": None},  # N processes train what 1 trains
        "comparison": {"name": "test", "dataset": dataset, "seed": seed},
        "eval_sets": {name: {"source": f"{name}.txt", "blocks": 8, "tokens_predicted": 1016, "bytes": 4000, "sha256": sha(name)}
                      for name in EVAL_SETS}
                     | {"validation": {"source": "the run's validation split", "blocks": 8, "tokens_predicted": 1016, "bytes": 4000,
                                       "sha256": sha(f"{dataset} validation")}},
        "benchmarks": {BENCHMARK: {"source": "hs.jsonl", "formulation": "rc", "examples": 50, "sha256": sha(BENCHMARK)}},
        "step": 30, "tokens_seen": 30 * 1024, "wall_seconds": 12.0,
        "final_metrics": metrics,
    }
    for dotted, value in change.items():
        *path, key = dotted.split(".")
        section = info
        for part in path:
            section = section[part]
        if value is None:
            del section[key]
        else:
            section[key] = value
    log = [{"step": step, "num_input_tokens_seen": step * 1024, "loss": 5.0 - step / 10} for step in (10, 20, 30)]
    log += [{"step": step, "num_input_tokens_seen": step * 1024, f"eval_{name}_loss": metrics[f"eval_{name}_loss"] + (30 - step) / 10}
            for step in (10, 20, 30) for name in EVAL_SETS]
    (folder / "run_info.json").write_text(json.dumps(info))
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    return folder


DATASETS = ("stories", "wiki", "books~half0", "books~half1")


@pytest.fixture
def sweep(tmp_path) -> Path:
    for dataset in DATASETS:
        for seed in (0, 1, 2):
            make_run(tmp_path / "sweep", dataset, seed)
    return tmp_path / "sweep"


def test_report_tables_matrix_null_arm_and_plots(sweep, tmp_path):
    runs, left_out = compare.load_runs([sweep])
    report = compare.build_report(runs, left_out)
    assert report["controls"]["met"] and not left_out  # the own validation splits differ by dataset, as they should
    infos = {p.name: json.loads((p / "run_info.json").read_text()) for p in sweep.iterdir()}
    keys = {m["key"] for m in report["metrics"]}
    assert keys == {f"eval_{name}_{measure}" for name in EVAL_SETS for measure in ("loss", "bpb")} \
        | {"eval_hellaswag_acc", "eval_hellaswag_acc_norm"}  # not the own validation split's
    for run in report["runs"]:  # straight from run_info
        assert run["final_metrics"] == {k: infos[run["name"]]["final_metrics"][k] for k in keys}
    for key, rows in report["tables"].items():
        for row in rows:
            mine = [infos[f"{row['dataset']}-s{s}"]["final_metrics"][key] for s in (0, 1, 2)]
            assert row["values"] == {str(s): v for s, v in zip((0, 1, 2), mine)}
            assert row["mean"] == pytest.approx(np.mean(mine)) and row["std"] == pytest.approx(np.std(mine, ddof=1))
            assert (row["n"], row["parameters"], row["tokens_seen"], row["passes"]) == (3, 1_234_567, 30 * 1024, 2.5)
    for row in report["datasets"]:
        mine = [infos[f"{row['dataset']}-s{s}"]["final_metrics"]["eval_bpb"] for s in (0, 1, 2)]
        assert row["own_validation_bpb"]["mean"] == pytest.approx(np.mean(mine))
    matrix = report["matrix"]
    assert matrix["rows"] == sorted(DATASETS) and matrix["columns"] == ["stories", "wiki"]
    for dataset, values in zip(matrix["rows"], matrix["values"]):
        assert values == [pytest.approx(np.mean([infos[f"{dataset}-s{s}"]["final_metrics"][f"eval_{e}_bpb"] for s in (0, 1, 2)]))
                          for e in matrix["columns"]]
    # Null halves are in the tables, kept out of the main verdicts, and compared with each other in the null arm.
    assert {(v["a"], v["b"]) for v in report["verdicts"]} == {("stories", "wiki")}
    # Verdicts on an eval set take its bits per byte alone (its loss is the same test, scaled).
    judged = {k for k in keys if not (k.endswith("_loss") and k.replace("_loss", "_bpb") in keys)}
    assert {v["metric"] for v in report["verdicts"]} == judged and len(report["verdicts"]) == len(judged)
    (arm,) = report["null_arm"]
    assert (arm["half0"], arm["half1"], arm["metrics"]) == ("books~half0", "books~half1", len(judged))
    assert arm["called"] == sum(v["verdict"] != CANT_TELL for v in arm["verdicts"])

    written = compare.write_report(report, runs, tmp_path / "out")
    for name in ("report.md", "report.json", "loss_wiki.png", "loss_stories.png", "matrix.png"):
        assert (tmp_path / "out" / name) in written and (tmp_path / "out" / name).stat().st_size > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Null arm: books~half0 vs books~half1" in markdown
    assert f"called a difference in {arm['called']} of {len(judged)} metrics" in markdown
    assert "Controls NOT met" not in markdown and "](loss_wiki.png)" in markdown and "](matrix.png)" in markdown
    assert json.loads((tmp_path / "out" / "report.json").read_text())["null_arm"][0]["called"] == arm["called"]


@pytest.mark.parametrize("change, named", [
    ({"model.config.n_embd": 128}, "model config n_embd: 64"),
    ({"model.tokenizer_sha256": sha("another tokenizer")}, "tokenizer sha256: "),
    ({"model.initial_weights_sha256": sha("other init")}, "initial weights sha256, seed 1"),
    ({"tokens_seen": 20 * 1024}, "tokens seen: 30720"),
    ({"eval_sets.wiki.sha256": sha("other wiki")}, "eval set wiki sha256"),
    ({"launch.mixed_precision": "no"}, "mixed precision: bf16"),  # e.g. one run launched without the bf16 accelerate config
    ({"eval_sets.validation.sha256": sha("other split")}, "eval set validation (own split of wiki) sha256"),
    ({"model.tokenizer_sha256": None}, "tokenizer sha256: "),  # an older run: not recorded, so not verified
    ({"arguments.ClmTrainingArguments.matrix_optimizer": "muon"}, "schedule matrix_optimizer"),
    ({"arguments.ClmTrainingArguments.muon_nesterov": False}, "schedule muon_nesterov"),
])
def test_a_difference_in_a_control_is_named_and_refused(tmp_path, capsys, change, named):
    for seed in (0, 1):
        make_run(tmp_path / "sweep", "stories", seed)
        make_run(tmp_path / "sweep", "wiki", seed, **(change if seed == 1 else {}))
    with pytest.raises(SystemExit) as exit:
        run_compare.main([str(tmp_path / "sweep")])
    stderr = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(stderr.splitlines()) == 1 and named in stderr and "wiki-s1" in stderr
    if change == {"model.tokenizer_sha256": None}:
        assert "not recorded (wiki-s1)" in stderr
    assert not (tmp_path / "sweep" / "report.md").exists()  # nothing written


def test_every_optimizer_flag_of_clmlab_is_a_control():
    from clmlab.args import MUON_FLAGS

    assert {"matrix_optimizer", *MUON_FLAGS} <= set(compare.SCHEDULE_KEYS_IF_RECORDED)


def test_script_refuses_then_forced_writes_the_differences_first(tmp_path):
    for seed in (0, 1):
        make_run(tmp_path / "sweep", "stories", seed)
        make_run(tmp_path / "sweep", "wiki", seed, **({"model.config.n_embd": 128} if seed == 0 else {}))
    make_run(tmp_path / "sweep", "wiki", 2, status="stopped")
    refused = run_script("run_compare.py", tmp_path / "sweep", check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error: runs not finished")
    assert refused.stderr.count("error:") == 1  # one line; progress messages before it are logging's
    assert "wiki-s2 (stopped)" in refused.stderr and "Traceback" not in refused.stderr
    done = run_script("run_compare.py", tmp_path / "sweep", "--force")
    markdown = (tmp_path / "sweep" / "report.md").read_text()
    assert markdown.split("\n")[2] == "## ⚠ Controls NOT met"
    assert "model config n_embd: 64 (stories-s0, stories-s1, wiki-s1) vs 128 (wiki-s0)" in markdown
    report = json.loads((tmp_path / "sweep" / "report.json").read_text())
    assert report["left_out"][0]["name"] == "wiki-s2" and not report["controls"]["met"]
    assert "Controls NOT met" in done.stdout and "report.md" in done.stdout and "training dataset" in done.stdout


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = make_run(tmp_path / "runs", "stories", 0)
    (broken / "run_info.json").write_text("{not json")
    for argv, says in (([str(tmp_path / "empty")], "not a run folder"), ([str(broken)], "not valid JSON"), ([], "no run folders")):
        with pytest.raises(SystemExit) as exit:
            run_compare.main(argv)
        stderr = capsys.readouterr().err.strip()
        assert exit.value.code == 2 and len(stderr.splitlines()) == 1 and says in stderr


def test_old_runs_fall_back_for_label_and_seed(tmp_path):
    folder = make_run(tmp_path, "stories", 3, **{"comparison": None})
    run = compare.read_run(folder)
    assert (run.dataset, run.seed) == ("stories", 3)  # DataArguments.dataset_name, ClmTrainingArguments.seed
