"""Argument files, the token budget and the output-directory policy."""

from __future__ import annotations

import json

import pytest

from clmlab.checkpoints import is_complete_checkpoint, last_complete_checkpoint, mark_complete
from clmlab.args import ClmTrainingArguments, DataArguments, ModelArguments
from clmlab.cli import UsageError, parse_args
from clmlab.run import ARGS_FILE, INFO_FILE, plan_output_dir, resolved_arguments, steps_for_token_budget, tokens_per_step

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
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("text\n")
    config.write_text(f"max_steps: 100\nconfig_overrides: n_embd=64,n_layer=2,n_head=2\ntrain_files: [{tmp_path}/a.txt, {tmp_path}/b.txt]\n"
                      "streaming: true\nlearning_rate: 3.0e-4\n")
    model, data, training = parse_args(TYPES, [str(config), "--max_steps", "7"])
    assert training.max_steps == 7
    assert training.learning_rate == 3e-4
    assert model.config_overrides == "n_embd=64,n_layer=2,n_head=2"
    assert data.train_files == [f"{tmp_path}/a.txt", f"{tmp_path}/b.txt"] and data.streaming is True


def test_a_budget_flag_replaces_the_yaml_budget(tmp_path):
    config = tmp_path / "x.yaml"
    config.write_text("max_train_tokens: 409600\n")
    alternatives = [("max_steps", "max_train_tokens")]
    _, _, training = parse_args(TYPES, [str(config), "--max_steps", "100"], alternatives=alternatives)
    assert training.max_steps == 100 and training.max_train_tokens is None
    _, _, training = parse_args(TYPES, [str(config)], alternatives=alternatives)
    assert training.max_steps == -1 and training.max_train_tokens == 409600


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


def _make_checkpoint(out, step, complete=True, marked=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text('{"global_step": %d}' % step if complete else '{"global_st')
    if marked:
        mark_complete(path, step, world_size=1)
    return path


def test_same_run_resumes_from_last_complete_checkpoint(tmp_path):
    resolved = _resolved(output_dir=str(tmp_path), max_steps=30)
    (tmp_path / ARGS_FILE).write_text(json.dumps(resolved))
    _make_checkpoint(tmp_path, 10)
    _make_checkpoint(tmp_path, 20)
    _make_checkpoint(tmp_path, 30, complete=False)  # preempted while writing trainer_state.json
    _make_checkpoint(tmp_path, 40, marked=False)  # preempted before every process had saved: whole to the eye, no marker
    assert plan_output_dir(str(tmp_path), resolved, "auto", False).resume_from == str(tmp_path / "checkpoint-20")
    assert plan_output_dir(str(tmp_path), resolved, "no", False).resume_from is None
    for cut_short in (30, 40):
        with pytest.raises(UsageError, match="not a complete checkpoint"):
            plan_output_dir(str(tmp_path), resolved, str(tmp_path / f"checkpoint-{cut_short}"), False)


def test_a_marked_checkpoint_with_a_file_changed_after_marking_is_not_complete(tmp_path):
    (tmp_path / ARGS_FILE).write_text("{}")
    path = _make_checkpoint(tmp_path, 10)
    (path / "model.safetensors").write_bytes(b"x" * 100)
    mark_complete(path, 10, world_size=1)
    assert is_complete_checkpoint(path) and last_complete_checkpoint(str(tmp_path)) == str(path)
    (path / "model.safetensors").write_bytes(b"x" * 50)  # a process still writing, or a copy cut short
    assert not is_complete_checkpoint(path) and last_complete_checkpoint(str(tmp_path)) is None
    (path / "model.safetensors").unlink()
    assert not is_complete_checkpoint(path)


def test_a_plain_trainer_checkpoint_outside_a_clmlab_run_needs_no_marker(tmp_path):
    path = _make_checkpoint(tmp_path, 10, marked=False)  # no run_args.json beside it: another tool's Trainer run
    assert is_complete_checkpoint(path)
    (tmp_path / ARGS_FILE).write_text("{}")
    assert not is_complete_checkpoint(path)


def test_rotation_keeps_the_newest_complete_and_the_best_checkpoints_and_skips_unmarked_ones(tmp_path):
    from types import SimpleNamespace

    from callbacks.checkpoints import CompleteCheckpointsCallback

    (tmp_path / ARGS_FILE).write_text("{}")
    for step in (10, 20, 30, 40):
        _make_checkpoint(tmp_path, step)
    _make_checkpoint(tmp_path, 50, marked=False)  # a save in progress or cut short: not rotation's to judge
    args = SimpleNamespace(save_total_limit=2)
    rotation = CompleteCheckpointsCallback(args)
    assert args.save_total_limit is None  # the Trainer's own rotation, which runs before other processes finish, is off
    rotation.rotate(tmp_path, best=str(tmp_path / "checkpoint-10"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-30", "checkpoint-40", "checkpoint-50"]
    CompleteCheckpointsCallback(SimpleNamespace(save_total_limit=1)).rotate(tmp_path, best=None)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-50"]


def test_same_run_finished_is_left_alone(tmp_path):
    resolved = _resolved(output_dir=str(tmp_path), max_steps=30)
    (tmp_path / ARGS_FILE).write_text(json.dumps(resolved))
    _make_checkpoint(tmp_path, 30)
    (tmp_path / INFO_FILE).write_text(json.dumps({"status": "finished", "final_metrics": {"eval_loss": 3.0}}))
    plan = plan_output_dir(str(tmp_path), resolved, "auto", False)
    assert plan.finished["final_metrics"]["eval_loss"] == 3.0 and plan.resume_from is None
    assert plan_output_dir(str(tmp_path), resolved, "auto", True).clear_first


def test_a_different_run_is_refused_and_nothing_is_touched(tmp_path):
    (tmp_path / ARGS_FILE).write_text(json.dumps(_resolved(output_dir=str(tmp_path), max_steps=30)))
    checkpoint = _make_checkpoint(tmp_path, 10)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=r"holds a different run \(max_steps: 30 -> 40\)"):
        plan_output_dir(str(tmp_path), _resolved(output_dir=str(tmp_path), max_steps=40), "auto", False)
    with pytest.raises(UsageError, match="holds a different run"):  # a checkpoint path does not open the door
        plan_output_dir(str(tmp_path), _resolved(max_steps=40), str(checkpoint), False)
    with pytest.raises(UsageError, match="would delete --resume_from_checkpoint"):
        plan_output_dir(str(tmp_path), _resolved(max_steps=40), str(checkpoint), True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    plan = plan_output_dir(str(tmp_path), _resolved(max_steps=40), "auto", True)
    assert plan.clear_first and plan.resume_from is None


def test_foreign_directory_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="holds no clmlab run"):
            plan_output_dir(str(tmp_path), _resolved(), "auto", overwrite)
    with pytest.raises(UsageError, match="is a file"):
        plan_output_dir(str(tmp_path / "notes.txt"), _resolved(), "auto", False)
