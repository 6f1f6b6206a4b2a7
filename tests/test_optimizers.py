"""--matrix_optimizer muon (clmlab.optimizers): Muon for the blocks' weight matrices, AdamW for the rest, as one
optimizer the Trainer schedules and checkpoints."""

from __future__ import annotations

import copy
import io
import json
import re

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer

from clmlab import optimizers
from clmlab.cli import UsageError
from conftest import logged, stop_at_step
from test_lifecycle import clm_args, load_script

BLOCK_MATRIX = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
MUON = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1}


def tiny_gpt2(tied: bool = True, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=3, n_head=2, n_positions=16, vocab_size=64, bos_token_id=0, eos_token_id=0,
                        tie_word_embeddings=tied, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: steps repeat exactly
    return GPT2LMHeadModel(config)


def build(model, adjustment="match_rms_adamw", weight_decay=0.1):
    return optimizers.muon_with_adamw(model, adamw={"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "fused": True},
                                      adamw_weight_decay=weight_decay, muon={**MUON, "adjust_lr_fn": adjustment})


def train_step(model, optimizer, seed):
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_the_split_covers_every_parameter_once_and_gives_muon_only_the_block_matrices(tied):
    model = tiny_gpt2(tied)
    split = optimizers.split_parameters(model)
    ids = [id(p) for share in split.values() for _, p in share]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied  # a tied weight is one parameter, counted once
    muon = [name for name, _ in split["muon"]]
    assert len(muon) == 4 * model.config.n_layer and all(BLOCK_MATRIX.fullmatch(n) for n in muon)
    assert all(p.ndim == 2 for _, p in split["muon"])
    adamw = {name for key in ("adamw_decay", "adamw_no_decay") for name, _ in split[key]}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= adamw
    assert ("lm_head.weight" in adamw) == (not tied)  # the output layer is AdamW's
    # AdamW decays what the Trainer's own AdamW decays: not biases, not norms.
    decay = set(Trainer.get_decay_parameter_names(None, model))
    assert {n for n, _ in split["adamw_decay"]} == adamw & decay
    assert all(n.endswith("bias") or ".ln_" in n for n, _ in split["adamw_no_decay"])

    optimizer = build(model)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(set(ids))
    assert [g["optimizer"] for g in optimizer.param_groups][:2] == ["adamw", "adamw"]  # the logged learning rate is AdamW's


@pytest.mark.parametrize("adjustment", ["match_rms_adamw", "original"])
@pytest.mark.parametrize("layer", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
def test_a_conv1d_matrix_gets_the_update_torch_muon_gives_the_same_layer_as_nn_linear(adjustment, layer):
    """GPT-2's Conv1D stores [in, out]; torch's Muon reads a shape as nn.Linear's [out, in]."""
    model = tiny_gpt2()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    model(tokens, labels=tokens).loss.backward()
    weight = model.get_submodule(f"transformer.h.1.{layer}").weight
    before, grad = weight.detach().clone(), weight.grad.clone()
    build(model, adjustment).step()

    linear = nn.Parameter(before.T.clone())  # the same layer stored as nn.Linear stores it
    linear.grad = grad.T.clone()
    torch.optim.Muon([linear], **MUON, adjust_lr_fn=adjustment).step()
    expected = (linear.detach() - before.T).T
    # Newton-Schulz runs in bf16 on the wide orientation of a matrix: the same arithmetic either way round, but a
    # square one is iterated on W or on W^T, which round differently (and get the same lr factor either way).
    tolerance = 1e-5 if weight.shape[0] != weight.shape[1] else 0.1
    torch.testing.assert_close(weight.detach() - before, expected, rtol=0, atol=tolerance * expected.abs().max().item())


def test_the_combined_state_dict_round_trips_and_the_loaded_groups_are_the_ones_stepped():
    model = tiny_gpt2()
    optimizer = build(model, "original")
    for seed in range(2):
        train_step(model, optimizer, seed)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # as the Trainer saves optimizer.pt

    resumed_model = copy.deepcopy(model)
    resumed = build(resumed_model, "original")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))  # as the Trainer loads it
    assert len(resumed.state) == len(optimizer.state) == sum(1 for _ in model.parameters())
    train_step(model, optimizer, 2)
    train_step(resumed_model, resumed, 2)
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(p, q), name  # the same step: the same momentum buffers, moments and step counts

    # The lr the scheduler writes into the groups is the lr both optimizers use: at 0, nothing moves (not even decay).
    for group in resumed.param_groups:
        group["lr"] = 0.0
    frozen = [p.detach().clone() for p in resumed_model.parameters()]
    train_step(resumed_model, resumed, 3)
    assert all(torch.equal(p, q) for p, q in zip(resumed_model.parameters(), frozen))


def test_an_optimizer_state_of_other_groups_is_refused_in_one_line():
    model = tiny_gpt2()
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(UsageError, match="resume it with the --matrix_optimizer it was saved with"):
        build(model).load_state_dict(plain.state_dict())


def test_orientation_scale_turns_the_stored_shape_into_the_layers():
    # c_fc: Conv1D [in 32, out 128]; Keller Jordan's factor for it is sqrt(128 / 32) = 2, torch reads 1 from [32, 128].
    assert optimizers.orientation_scale("original", torch.Size([32, 128]), 128, 32) == 2.0
    assert optimizers.orientation_scale("original", torch.Size([128, 32]), 32, 128) == 0.5
    assert optimizers.orientation_scale("original", torch.Size([128, 32]), 128, 32) == 1.0  # nn.Linear: already right
    assert optimizers.orientation_scale("match_rms_adamw", torch.Size([32, 128]), 128, 32) == 1.0


BAD_FLAGS = {
    "a Muon flag without Muon": (["--muon_learning_rate", "0.02"], "--muon_learning_rate is a setting of Muon: add --matrix_optimizer muon"),
    "no such matrix optimizer": (["--matrix_optimizer", "sophia"], "invalid choice: 'sophia' (choose from 'adamw', 'muon')"),
    "negative Muon lr": (["--matrix_optimizer", "muon", "--muon_learning_rate", "-1"], "--muon_learning_rate -1.0: must be positive"),
    "momentum 1": (["--matrix_optimizer", "muon", "--muon_momentum", "1"], "--muon_momentum 1.0: must be at least 0 and below 1"),
    "negative Muon decay": (["--matrix_optimizer", "muon", "--muon_weight_decay", "-0.1"], "--muon_weight_decay -0.1: must be 0 or more"),
    "original without a Muon lr": (["--matrix_optimizer", "muon", "--muon_lr_adjustment", "original"], "give --muon_learning_rate"),
    "not AdamW beside Muon": (["--matrix_optimizer", "muon", "--optim", "sgd"], "--optim sgd is not AdamW"),
    "FSDP": (["--matrix_optimizer", "muon", "--fsdp", "full_shard"], "FSDP and DeepSpeed split them between processes"),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_muon_flags_are_one_line_and_exit_2(case, tmp_path, capsys, shakespeare):
    argv, expected = BAD_FLAGS[case]
    out = tmp_path / "never_made"
    with pytest.raises(SystemExit) as exited:
        load_script("run_clm.py").main(["--train_files", str(shakespeare), "--output_dir", str(out), "--max_steps", "2", *argv])
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exited.value.code == 2 and len(message) == 1 and expected in message[0], err
    assert "Traceback" not in err and not out.exists()


def test_muon_refused_under_an_accelerate_config_that_shards(tmp_path, capsys, shakespeare, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # how `accelerate launch --config_file fsdp2.yaml` says so
    with pytest.raises(SystemExit) as exited:
        load_script("run_clm.py").main(["--train_files", str(shakespeare), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                                        "--matrix_optimizer", "muon"])
    assert exited.value.code == 2 and "FSDP and DeepSpeed" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_muon_run_trains_records_its_split_and_resumes_exactly(tmp_path, monkeypatch):
    muon = ["--matrix_optimizer", "muon", "--muon_learning_rate", "0.01"]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    main = load_script("run_clm.py").main
    main(clm_args(whole, 6, *muon))
    record = json.loads((whole / "run_info.json").read_text())
    assert record["status"] == "finished" and record["eval_loss_after"] < record["eval_loss_before"]
    split = record["optimizer"]
    assert split["muon"]["tensors"] == 4 * 2 and split["muon"]["lr"] == 0.01 and split["muon"]["lr_adjustment"] == "match_rms_adamw"
    assert split["adamw"]["lr"] == 3e-3 and split["adamw"]["optim"] == "adamw_torch_fused"
    assert split["muon"]["parameters"] + split["adamw"]["parameters"] == record["model"]["parameters"]

    stop_at_step(monkeypatch, 3)
    main(clm_args(stopped, 6, *muon))
    saved = torch.load(stopped / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {g["optimizer"] for g in saved["param_groups"]} == {"adamw", "muon"}
    monkeypatch.undo()
    main(clm_args(stopped, 6, *muon))
    assert json.loads((stopped / "run_info.json").read_text())["resumed_from"] == str(stopped / "checkpoint-3")
    assert logged(stopped, "loss") == logged(whole, "loss") and len(logged(whole, "loss")) == 6
