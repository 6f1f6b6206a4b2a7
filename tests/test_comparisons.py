"""What a dataset comparison relies on during training: named evaluation sets with bits per byte, samples and
benchmarks at every evaluation that leave training as it was, a tracker's group, hash halves of a corpus,
and a sweep from one comparison file to its report."""

from __future__ import annotations

import glob
import json
import math

import numpy as np
import pytest
import torch

from conftest import REPO, logged, run_script, shared
from test_lifecycle import CLM_TINY, load_script

pytestmark = pytest.mark.e2e


def clm(out, *extra, steps=4):
    return ["--train_files", str(shared("tinyshakespeare/input.txt")), "--output_dir", str(out), "--max_steps", str(steps),
            "--eval_steps", "2", "--save_steps", "100", *CLM_TINY, *map(str, extra)]


def history(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def test_named_eval_sets_give_loss_and_bits_per_byte_each_and_the_own_split_keeps_its_names(tmp_path):
    stories, wiki = shared("tinystories/tinystories_v1_valid_sample.txt"), shared("wikitext2/test.txt")
    load_script("run_clm.py").main(clm(tmp_path / "run", "--eval_files", f"stories={stories}", f"wiki={wiki}"))
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert list(info["eval_sets"]) == ["validation", "stories", "wiki"]
    for name, identity in info["eval_sets"].items():
        losses, bpbs = logged(tmp_path / "run", f"eval_{name}_loss"), logged(tmp_path / "run", f"eval_{name}_bpb")
        assert sorted(losses) == [0, 2, 4] and sorted(bpbs) == [0, 2, 4]
        for step, loss in losses.items():
            assert bpbs[step] == pytest.approx(loss * identity["tokens_predicted"] / (math.log(2) * identity["bytes"]))
        assert identity["blocks"] == 4 and identity["tokens_predicted"] == 4 * 63
    assert logged(tmp_path / "run", "eval_loss") == logged(tmp_path / "run", "eval_validation_loss")
    final = info["final_metrics"]
    assert final["eval_wiki_bpb"] == logged(tmp_path / "run", "eval_wiki_bpb")[4] and final["eval_loss"] == final["eval_validation_loss"]
    # Two sets of different text never share an identity; a rerun of the same set gives the same one.
    assert len({identity["sha256"] for identity in info["eval_sets"].values()}) == 3


def test_bits_per_byte_is_summed_nats_over_ln2_times_the_bytes_of_the_scored_text(tmp_path, gpt2_tokenizer, tiny_gpt2):
    from transformers import AutoModelForCausalLM

    from clmlab.args import DataArguments
    from clmlab.eval_sets import bits_per_byte, load_eval_set

    text = tmp_path / "fixed.txt"
    text.write_text("The cat sat on the mat. Caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 \u2014 \u65e5\u672c\u8a9e.\n\n" * 30)
    evalset = load_eval_set("fixed", str(text), gpt2_tokenizer, 32, 5, DataArguments(train_files=[str(text)]))
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    nats, n_bytes, scored = 0.0, 0, 0
    for i in range(len(evalset.blocks)):
        ids = evalset.blocks[i]["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids[None]).logits[0, :-1].double(), -1)
        nats -= logprobs.gather(1, ids[1:, None]).sum().item()
        scored += len(ids) - 1
        # The bytes of the scored tokens, from the tokenizer's own decoding of whole documents' worth of tokens.
        n_bytes += len(gpt2_tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
    assert evalset.identity["tokens_predicted"] == scored == 5 * 31
    assert abs(evalset.identity["bytes"] - n_bytes) <= 6 * len(evalset.blocks)  # decoding a block's cut characters adds U+FFFD bytes
    assert bits_per_byte(nats / scored, scored, evalset.identity["bytes"]) == pytest.approx(nats / (math.log(2) * evalset.identity["bytes"]))


def test_token_bytes_of_a_byte_level_bpe_are_exact_even_for_cut_characters(gpt2_tokenizer):
    from clmlab.eval_sets import token_byte_lengths

    lengths = token_byte_lengths(gpt2_tokenizer)
    text = "na\u00efve \u65e5\u672c\u8a9e \U0001F600 ok"
    ids = gpt2_tokenizer(text)["input_ids"]
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert lengths[gpt2_tokenizer.eos_token_id] == 0


def test_samples_are_written_per_prompt_per_evaluation_and_leave_training_unchanged(tmp_path):
    main = load_script("run_clm.py").main
    main(clm(tmp_path / "plain", "--eval_on_start", "true"))
    main(clm(tmp_path / "sampled", "--eval_on_start", "true", "--sample_prompts", "ROMEO:", "Once upon", "--sample_max_new_tokens", "5"))
    records = [json.loads(line) for line in (tmp_path / "sampled" / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in records] == [(s, p) for s in (0, 2, 4) for p in ("ROMEO:", "Once upon")]
    assert [r["tokens_seen"] for r in records[::2]] == [0, 2 * 4 * 64, 4 * 4 * 64]
    assert all(isinstance(r["text"], str) and r["text"] for r in records)
    # Sampling draws random numbers; they are put back, so the run trains exactly as the one without samples.
    assert logged(tmp_path / "sampled", "loss") == logged(tmp_path / "plain", "loss")
    assert not (tmp_path / "plain" / "samples.jsonl").exists()


def test_in_training_hellaswag_equals_run_eval_on_that_steps_checkpoint(tmp_path):
    hellaswag = shared("hellaswag/hellaswag_val.jsonl")
    csqa = shared("commonsenseqa/dev_rand_split.jsonl")
    out = tmp_path / "run"
    load_script("run_clm.py").main(clm(out, "--save_steps", "2", "--benchmark", f"hellaswag={hellaswag}", f"csqa:mc={csqa}",
                                       "--benchmark_limit", "6"))
    run_eval = load_script("run_eval.py").main
    for name, task, formulation, data in (("hellaswag", "hellaswag", "rc", hellaswag), ("csqa_mc", "multiple_choice", "mc", csqa)):
        at_step = run_eval(["--checkpoint", str(out / "checkpoint-2"), "--task", task, "--formulation", formulation,
                            "--data_file", str(data), "--limit", "6"])[str(out / "checkpoint-2")]
        for metric in ("acc", "acc_norm", "acc_centered", "gold_logprob", "gold_bpb", "gold_prob"):
            assert logged(out, f"eval_{name}_{metric}")[2] == pytest.approx(at_step[metric], rel=1e-6, abs=1e-9), (name, metric)
    info = json.loads((out / "run_info.json").read_text())
    assert info["benchmarks"]["hellaswag"]["examples"] == 6 and info["benchmarks"]["csqa_mc"]["formulation"] == "mc"


def test_an_offline_wandb_run_holds_the_metrics_group_and_run_name(tmp_path):
    out = tmp_path / "run"
    done = run_script("run_clm.py", *clm(out, "--report_to", "wandb", "--comparison", "my-comparison", "--dataset_label", "shakes"),
                      check=False, env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-2000:]
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    record = open(files[0], "rb").read()
    assert b"my-comparison" in record and b"shakes-seed3" in record and b"dataset:shakes" in record
    eval_loss = logged(out, "eval_loss")[4]
    assert b"eval/loss" in record and json.dumps(eval_loss).encode() in record
    assert b"initial_weights_sha256" in record  # the run record is in the config


def test_hash_halves_are_disjoint_cover_the_corpus_and_keep_the_validation_split():
    from clmlab.cli import UsageError
    from clmlab.data import DocumentSplit, DocumentSubset, iter_text_documents

    texts = [d["text"] for d in iter_text_documents([(str(shared("tinyshakespeare/input.txt")), 0, 0)], "paragraph", "<|endoftext|>")]
    halves = [DocumentSubset.parse("0/2"), DocumentSubset.parse("1/2")]
    kept = [[t for t in texts if h.keeps(t)] for h in halves]
    assert len(kept[0]) + len(kept[1]) == len(texts) and abs(len(kept[0]) - len(kept[1])) < 0.1 * len(texts)
    split = DocumentSplit(5.0)
    held_out = {t for t in texts if split.is_validation(t)}
    # Each half's held-out documents are the corpus's held-out documents in it: no half trains on another's validation text.
    assert {t for t in kept[0] if split.is_validation(t)} | {t for t in kept[1] if split.is_validation(t)} == held_out
    for bad in ("2/2", "0/1", "a/b", "1"):
        with pytest.raises(UsageError, match="index/count"):
            DocumentSubset.parse(bad)


def test_eval_files_as_a_yaml_mapping(tmp_path):
    from clmlab.args import InTrainingEvalArguments
    from clmlab.cli import parse_args

    config = tmp_path / "run.yaml"
    config.write_text(f"eval_files:\n  wiki: {shared('wikitext2/test.txt')}\n  stories: {shared('tinystories/tinystories_v1_valid_sample.txt')}\n")
    (evals,) = parse_args([InTrainingEvalArguments], [str(config)])
    assert list(evals.named_eval_files) == ["wiki", "stories"]


def test_bad_eval_sets_and_benchmarks_are_one_line(tmp_path):
    for extra, words in ((["--eval_files", "nameless"], "name=PATH"), (["--eval_files", f"x={tmp_path / 'none.txt'}"], "no such file"),
                         (["--benchmark", f"h:xx={shared('hellaswag/hellaswag_val.jsonl')}"], "formulation"),
                         (["--eval_files", f"validation={shared('wikitext2/test.txt')}"], "own validation")):
        done = run_script("run_clm.py", *clm(tmp_path / "bad", *extra), check=False)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr[-1500:]
        assert not (tmp_path / "bad").exists()


def test_a_sweep_trains_every_dataset_and_seed_reuses_what_is_done_and_reports(tmp_path):
    comparison = tmp_path / "tiny.yaml"
    out = tmp_path / "sweep"
    comparison.write_text(f"""
comparison: tiny
output_dir: {out}
seeds: [0, 1]
shared_tokenizer: 300
run:
  config_overrides: n_embd=16,n_layer=1,n_head=2,n_positions=32
  block_size: 32
  per_device_train_batch_size: 4
  max_steps: 4
  eval_steps: 2
  max_eval_samples: 4
  disable_tqdm: true
datasets:
  shakespeare: {{train_files: [{shared('tinyshakespeare/input.txt')}]}}
  stories: {{train_files: [{shared('tinystories/tinystories_v1_valid_sample.txt')}]}}
null_arm: stories
""")
    done = run_script("run_sweep.py", comparison, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(f"{d}-seed{s}" for d in ("shakespeare", "stories", "stories~half0", "stories~half1") for s in (0, 1))
    infos = {name: json.loads((out / "runs" / name / "run_info.json").read_text()) for name in runs}
    # One tokenizer, and the same initial weights for one seed on every dataset; every model on every held-out split.
    assert len({i["model"]["tokenizer_sha256"] for i in infos.values()}) == 1
    assert len({i["model"]["initial_weights_sha256"] for n, i in infos.items() if n.endswith("seed0")}) == 1
    for name, info in infos.items():
        # A half's own split is its own set ("validation"), unless its first blocks happen to be the corpus's.
        assert set(info["eval_sets"]) - {"validation"} == {"shakespeare", "stories"} and ("~" in name or "validation" not in info["eval_sets"])
    assert infos["stories-seed0"]["eval_sets"]["stories"]["sha256"] == infos["shakespeare-seed1"]["eval_sets"]["stories"]["sha256"]
    assert infos["stories~half0-seed0"]["data"]["train"]["documents"] + infos["stories~half1-seed0"]["data"]["train"]["documents"] \
        == infos["stories-seed0"]["data"]["train"]["documents"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert all(check["passed"] for check in report["controls"]["checks"])
    # The report's figures are the runs' own: each table's per-seed values are run_info's final metrics.
    for key, rows in report["tables"].items():
        for row in rows:
            assert row["values"] == {str(seed): infos[f"{row['dataset']}-seed{seed}"]["final_metrics"][key] for seed in (0, 1)}, key
    assert report["matrix"]["columns"] == ["shakespeare", "stories"] and all(None not in r for r in report["matrix"]["values"])
    assert [(arm["half0"], arm["half1"]) for arm in report["null_arm"]] == [("stories~half0", "stories~half1")]
    assert (out / "report" / "report.md").is_file() and (out / "report" / "matrix.png").is_file()
    again = run_script("run_sweep.py", comparison)
    assert again.stdout.count("finished before, nothing to do") == 8
    # An edited comparison file never reports the runs made with the old one.
    comparison.write_text(comparison.read_text().replace("max_steps: 4", "max_steps: 5"))
    edited = run_script("run_sweep.py", comparison, check=False)
    assert edited.returncode == 1 and "refused by run_clm.py" in edited.stderr and "holds a different run" in edited.stderr, edited.stderr[-2000:]


def test_two_processes_score_the_benchmark_as_one_does(tmp_path):
    """Each process scores its share of the examples; merged in order, the figures are the one-process run's."""
    common = [*clm(tmp_path / "x", "--benchmark", f"hellaswag={shared('hellaswag/hellaswag_val.jsonl')}", "--benchmark_limit", "7",
                   "--per_device_train_batch_size", "2", "--global_batch_size", "4")]
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("run_clm.py", *common, "--output_dir", one)
    run_script("run_clm.py", *common, "--output_dir", two, ranks=2)
    for metric in ("acc", "acc_norm", "gold_logprob", "gold_bpb", "gold_prob"):
        a, b = logged(one, f"eval_hellaswag_{metric}"), logged(two, f"eval_hellaswag_{metric}")
        assert sorted(a) == sorted(b) == [0, 2, 4]
        # Before the first step both score the same weights: the merged shards are the one-process figures (batched
        # otherwise, so equal up to float rounding). After it, dropout draws differ by process and so do the weights.
        assert a[0] == pytest.approx(b[0], rel=1e-6), (metric, a, b)


def test_evaluation_sets_and_how_often_they_run_leave_training_unchanged(tmp_path):
    """Each evaluation dataloader draws from torch's generator, the one dropout uses on CPU: it is put back."""
    main = load_script("run_clm.py").main
    main(clm(tmp_path / "plain", "--eval_steps", "3"))
    main(clm(tmp_path / "evaluated", "--eval_steps", "1", "--eval_files", f"wiki={shared('wikitext2/test.txt')}",
             f"stories={shared('tinystories/tinystories_v1_valid_sample.txt')}"))
    assert logged(tmp_path / "evaluated", "loss") == logged(tmp_path / "plain", "loss")
