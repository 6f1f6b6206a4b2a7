"""Multiple-choice scoring: the rc and mc formulations, and the metrics beyond accuracy (centered accuracy,
gold log-probability, bits per byte, probability), each recomputed here independently (tiny model, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import shared
from clmlab.evaluation import (
    ChoiceExample,
    choice_examples,
    choice_records,
    detect_choice_task,
    encode_pair,
    hellaswag_example,
    loglikelihoods,
    multiple_choice_example,
    score_choices,
    summarize_choices,
)


@pytest.fixture(scope="module")
def tiny():
    from clmlab.checkpoints import load_for_inference

    model, tokenizer, _ = load_for_inference(str(shared("tiny_gpt2_random")), "cpu", "float32")
    return model, tokenizer


def read_lines(relative: str, n: int) -> list[dict]:
    with open(shared(relative), encoding="utf-8") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


@pytest.fixture(scope="module")
def csqa_docs() -> list[dict]:
    return read_lines("commonsenseqa/dev_rand_split.jsonl", 6)


@pytest.fixture(scope="module")
def hellaswag_docs() -> list[dict]:
    return read_lines("hellaswag/hellaswag_val.jsonl", 4)


@pytest.fixture(scope="module")
def mixed_examples(csqa_docs, hellaswag_docs) -> list[ChoiceExample]:
    """Both tasks, both formulations, and two made-up items: a context ending in a space (split_pair moves
    it into the continuation, so it counts in the bytes) and a choice whose bytes outnumber its characters."""
    made_up = [ChoiceExample("The cat sat on the ", ["mat", "hat", "caf\u00e9 table"], 2, delimiter=""),
               ChoiceExample("Best pastry:", ["cr\u00e8me br\u00fbl\u00e9e", "bread"], 0)]
    return (choice_examples(csqa_docs, "multiple_choice", "rc") + choice_examples(csqa_docs, "multiple_choice", "mc")
            + choice_examples(hellaswag_docs, "hellaswag", "rc") + choice_examples(hellaswag_docs, "hellaswag", "mc")
            + made_up)


def record(lls: list[float], gold: int) -> dict:
    return {"loglikelihoods": lls, "gold": gold, "bytes": [4] * len(lls), "chars": [4] * len(lls)}


# --------------------------------------------------------------------------------------------------- centered accuracy


def test_centered_accuracy_is_dclms_rescaling_to_chance():
    four = [[0.0, -1.0, -2.0, -3.0]] * 4  # the first choice always wins
    chance = [record(lls, gold) for lls, gold in zip(four, [0, 1, 2, 3])]  # 1 of 4 right: acc 0.25 = chance
    metrics = summarize_choices(chance)
    assert metrics["acc"] == 0.25 and metrics["acc_centered"] == pytest.approx(0.0, abs=1e-12)
    assert summarize_choices([record(lls, 0) for lls in four])["acc_centered"] == pytest.approx(1.0)

    # Two 4-choice and two 5-choice items, two right: random = (1/4 + 1/4 + 1/5 + 1/5) / 4 = 0.225.
    mixed = [record([0.0, -1, -1, -1], 0), record([0.0, -1, -1, -1], 3),
             record([0.0, -1, -1, -1, -1], 0), record([0.0, -1, -1, -1, -1], 4)]
    metrics = summarize_choices(mixed)
    assert metrics["acc"] == 0.5
    assert metrics["acc_centered"] == pytest.approx((0.5 - 0.225) / (1 - 0.225))
    assert metrics["examples"] == 4


def test_acc_norm_divides_by_the_choices_characters():
    lls = [-4.0, -6.0]
    kept = {"loglikelihoods": lls, "gold": 1, "bytes": [3, 5], "chars": [2, 6]}  # -2 per char vs -1 per char
    metrics = summarize_choices([kept])
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0


# --------------------------------------------------------------------------------------------------- gold_* on the model


def test_gold_bpb_logprob_and_prob_equal_a_recomputation(tiny, mixed_examples):
    model, tokenizer = tiny
    nats, n_bytes, logprobs, probs = 0.0, 0, [], []
    for example in mixed_examples:
        lls = [ll for ll, _ in loglikelihoods(model, [encode_pair(tokenizer, example.context, example.delimiter + c)
                                                      for c in example.choices], batch_size=1)]
        trailing = example.context[len(example.context.rstrip()):]  # the spaces that move to the continuation
        gold_text = trailing + example.delimiter + example.choices[example.gold]
        nats -= lls[example.gold]
        n_bytes += len(gold_text.encode("utf-8"))
        logprobs.append(lls[example.gold])
        probs.append(torch.softmax(torch.tensor(lls, dtype=torch.float64), 0)[example.gold].item())

    metrics = score_choices(model, tokenizer, mixed_examples, batch_size=7)
    assert metrics["examples"] == len(mixed_examples)
    assert metrics["gold_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert metrics["gold_logprob"] == pytest.approx(sum(logprobs) / len(logprobs), rel=1e-5)
    assert metrics["gold_prob"] == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    assert 0 < metrics["gold_prob"] < 1 and metrics["gold_bpb"] > 0
    # the made-up items: the moved space and the multi-byte characters are counted
    assert choice_records(model, tokenizer, mixed_examples[-2:])[0]["bytes"] == [4, 4, 12]
    assert choice_records(model, tokenizer, mixed_examples[-1:])[0]["bytes"] == [16, 6]


def test_shards_records_merge_to_the_whole(tiny, mixed_examples):
    model, tokenizer = tiny
    half = len(mixed_examples) // 2
    shards = [choice_records(model, tokenizer, mixed_examples[:half], batch_size=4),
              choice_records(model, tokenizer, mixed_examples[half:], batch_size=4)]
    gathered = json.loads(json.dumps(shards))  # what all_gather_object would carry: plain JSON values
    assert gathered == shards
    merged = summarize_choices([r for shard in gathered for r in shard])
    whole = score_choices(model, tokenizer, mixed_examples, batch_size=16)
    assert merged.keys() == whole.keys() == {"acc", "acc_norm", "acc_centered", "gold_logprob", "gold_bpb", "gold_prob",
                                             "examples"}
    assert merged == pytest.approx(whole, rel=1e-5)


# --------------------------------------------------------------------------------------------------- formulations


def test_mc_prompt_is_lm_evaluation_harness_commonsense_qa(csqa_docs):
    example = multiple_choice_example(csqa_docs[0], formulation="mc")
    # lm-evaluation-harness, lm_eval/tasks/commonsense_qa/default.yaml, rendered for this record by hand
    assert example.context == ("Question: A revolving door is convenient for two direction travel, but it also serves as a "
                               "security measure at a what?\n"
                               "A. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:")
    assert [example.delimiter + choice for choice in example.choices] == [" A", " B", " C", " D", " E"]
    assert example.gold == 0  # answerKey "A"
    rc = multiple_choice_example(csqa_docs[0])
    assert rc.context.endswith("at a what?\nAnswer:") and rc.choices[2] == "department store"


def test_mc_lists_the_records_own_labels_and_count():
    arc = {"question": "  Which is a gas?  ", "choices": {"label": ["1", "2", "3", "4"], "text": ["ice", "steam", "rock", "wood"]},
           "answerKey": "2"}
    example = multiple_choice_example(arc, "mc")
    assert example.context == "Question: Which is a gas?\n1. ice\n2. steam\n3. rock\n4. wood\nAnswer:"
    assert example.choices == ["1", "2", "3", "4"] and example.gold == 1 and example.delimiter == " "


def test_hellaswag_mc_letters_the_endings(hellaswag_docs):
    rc, mc = hellaswag_example(hellaswag_docs[0]), hellaswag_example(hellaswag_docs[0], "mc")
    assert mc.choices == ["A", "B", "C", "D"] and mc.gold == rc.gold
    assert mc.context == ("Question: " + rc.context + "\n"
                          + "".join(f"{letter}. {ending}\n" for letter, ending in zip("ABCD", rc.choices)) + "Answer:")


def test_tasks_are_detected_and_bad_formulations_refused(csqa_docs, hellaswag_docs):
    flat = {"question": "q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "answerKey": "B"}
    assert [detect_choice_task(d) for d in (hellaswag_docs[0], csqa_docs[0], flat)] == ["hellaswag", "multiple_choice",
                                                                                        "multiple_choice"]
    with pytest.raises(ValueError, match="neither HellaSwag"):
        detect_choice_task({"text": "hello"})
    with pytest.raises(ValueError, match="formulation 'letters'.*'rc'.*'mc'"):
        multiple_choice_example(csqa_docs[0], formulation="letters")
    with pytest.raises(ValueError, match="formulation"):
        hellaswag_example(hellaswag_docs[0], formulation="MC")
    with pytest.raises(ValueError, match="task 'arc'"):
        choice_examples(csqa_docs, "arc", "rc")


# --------------------------------------------------------------------------------------------------- run_eval


def test_run_eval_mc_reports_the_new_metrics(tmp_path, tiny_gpt2, capsys):
    from test_inference import load_script

    out = tmp_path / "mc.json"
    results = load_script("run_eval").main(["--checkpoint", str(tiny_gpt2), "--task", "multiple_choice", "--formulation", "mc",
                                            "--data_file", str(shared("commonsenseqa/dev_rand_split.jsonl")), "--limit", "6",
                                            "--device", "cpu", "--output_json", str(out)])
    table = capsys.readouterr().out
    assert "multiple_choice (mc)" in table and "acc_centered" in table and "gold_bpb" in table
    payload = json.loads(out.read_text())
    assert payload["settings"]["formulation"] == "mc"
    metrics = payload["results"][str(tiny_gpt2)]
    assert metrics["examples"] == 6 and {"gold_prob", "gold_logprob", "gold_bpb", "acc_centered"} <= metrics.keys()
    assert results[str(tiny_gpt2)]["gold_prob"] == metrics["gold_prob"]


def test_run_eval_refuses_formulation_for_other_tasks(tmp_path, tiny_gpt2, capsys):
    from test_inference import load_script

    text = tmp_path / "t.txt"
    text.write_text("hello there")
    with pytest.raises(SystemExit) as exited:
        load_script("run_eval").main(["--checkpoint", str(tiny_gpt2), "--task", "perplexity", "--formulation", "mc",
                                      "--data_file", str(text)])
    assert exited.value.code == 2 and "--formulation mc: only for --task hellaswag or multiple_choice" in capsys.readouterr().err
