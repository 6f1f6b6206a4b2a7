"""Argument files, the token budget and the output-directory policy."""

from __future__ import annotations

import json

import pytest

from clmlab.args import ClmTrainingArguments, DataArguments, ModelArguments
from clmlab.cli import UsageError, parse_args
from clmlab.run import ARGS_FILE, prepare_output_dir, resolved_arguments, steps_for_token_budget, tokens_per_step

TYPES = [ModelArguments, DataArguments, ClmTrainingArguments]


def test_token_budget_becomes_steps():
    step = tokens_per_step(block_size=128, per_device_batch=16, accumulation=2, world_size=4)
    assert step == 16_384
    assert steps_for_token_budget(16_384 * 100, step) == 100
    assert steps_for_token_budget(16_384 * 100 + 1, step) == 101  # never fewer tokens than asked
    with pytest.raises(UsageError):
        steps_for_token_budget(0, step)


def test_yaml_first_then_flags_override_it(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("max_steps: 100\nconfig_overrides: n_embd=64,n_layer=2,n_head=2\ntrain_files: [a.txt, b.txt]\n"
                      "streaming: true\nlearning_rate: 3.0e-4\n")
    model, data, training = parse_args(TYPES, [str(config), "--max_steps", "7"])
    assert training.max_steps == 7
    assert training.learning_rate == 3e-4
    assert model.config_overrides == "n_embd=64,n_layer=2,n_head=2"
    assert data.train_files == ["a.txt", "b.txt"] and data.streaming is True


def test_yaml_unknown_key_is_refused(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("max_step: 100\n")
    with pytest.raises(UsageError, match=r"unknown keys \['max_step'\]"):
        parse_args(TYPES, [str(config)])


def test_unknown_flag_is_one_line():
    with pytest.raises(UsageError, match=r"unrecognized arguments \[.--nope., .1.\] \(see `run_clm.py --help`") as raised:
        parse_args(TYPES, ["--nope", "1"], prog="run_clm.py")
    assert "\n" not in str(raised.value)


def _resolved(**training):
    return resolved_arguments(ModelArguments(), DataArguments(), ClmTrainingArguments(**training))


def _make_checkpoint(out, step, complete=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_same_run_resumes_from_last_complete_checkpoint(tmp_path):
    resolved = _resolved(output_dir=str(tmp_path), max_steps=30)
    (tmp_path / ARGS_FILE).write_text(json.dumps(resolved))
    _make_checkpoint(tmp_path, 10)
    _make_checkpoint(tmp_path, 20)
    _make_checkpoint(tmp_path, 30, complete=False)  # cut short while saving
    assert prepare_output_dir(str(tmp_path), resolved, "auto", False) == str(tmp_path / "checkpoint-20")
    assert prepare_output_dir(str(tmp_path), resolved, "no", False) is None


def test_a_different_run_is_refused_and_nothing_is_touched(tmp_path):
    (tmp_path / ARGS_FILE).write_text(json.dumps(_resolved(output_dir=str(tmp_path), max_steps=30)))
    _make_checkpoint(tmp_path, 10)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=r"holds a different run \(max_steps: 30 -> 40\)"):
        prepare_output_dir(str(tmp_path), _resolved(output_dir=str(tmp_path), max_steps=40), "auto", False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert prepare_output_dir(str(tmp_path), _resolved(max_steps=40), "auto", True) is None


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no clmlab run"):
        prepare_output_dir(str(tmp_path), _resolved(), "auto", False)
