"""The speed path: MFU and memory in the logs and run_info.json, the attention kernels, the loss type that
lets torch.compile trace GPT-2 whole, checkpoints of a compiled run, the GPU defaults, and the fused linear
cross-entropy (on a GPU with liger-kernel)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types

import pytest
import torch

from clmlab.cli import UsageError
from conftest import logged, shared
from test_lifecycle import CLM_TINY, load_script

TINY = {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 128, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
HAS_GPU_AND_LIGER = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def tiny_config(**changes):
    from transformers import AutoConfig

    return AutoConfig.for_model("gpt2", **{**TINY, **changes})


def batch(rows=3, length=32, vocab=128, seed=0):
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------- FLOPs


def test_training_flops_per_token_of_gpt2_124m_by_hand_and_against_nanogpts_6n_plus_12lhqt():
    from transformers import AutoConfig, GPT2LMHeadModel

    from clmlab.modeling import training_flops_per_token

    config = AutoConfig.for_model("gpt2")  # GPT-2 124M: 12 layers of width 768, 50,257 tokens, 1,024 positions
    # By hand: each layer multiplies by 4 x 768^2 (attention in and out) and 8 x 768^2 (MLP) weights, the output
    # layer by 50,257 x 768; 6 FLOPs per weight and token, plus 12 x layers x width x sequence for attention.
    by_hand = 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 768 * 1024
    assert training_flops_per_token(config, 1024) == by_hand == 854_438_400  # 0.854 GFLOPs per token

    # nanoGPT's estimate_mfu counts N = every parameter but the position embeddings (get_num_params), biases and
    # norms included: 6 FLOPs more per bias and norm parameter, about 0.1% more.
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    vectors = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 1)  # biases and norms
    nanogpt = 6 * n + 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * 1024
    assert nanogpt == 855_166_464 and nanogpt - training_flops_per_token(config, 1024) == 6 * vectors


def test_the_peak_of_a_cpu_is_unknown_and_the_peak_dtype_follows_the_precision():
    from clmlab.modeling import peak_dtype, peak_flops

    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bfloat16") is None and peak_flops(cpu, "float32") is None
    assert [peak_dtype(p, cpu) for p in ("bf16", "fp16", "no", "fp8")] == ["bfloat16", "float16", "float32", None]


def test_the_peak_table_names_each_gpu_before_any_name_inside_it():
    """The first fragment found in a GPU's name wins: "L4" must not answer for an L40 or L40S, "H100" for an H100 PCIe or NVL."""
    from clmlab.modeling import PEAK_FLOPS

    fragments = list(PEAK_FLOPS)
    for i, fragment in enumerate(fragments):
        assert not any(earlier in fragment for earlier in fragments[:i]), fragment


# --------------------------------------------------------------------------------------------------- runs


def clm(out, *extra):
    return ["--train_files", str(shared("tinyshakespeare/input.txt")), "--output_dir", str(out), "--max_steps", "4",
            "--eval_steps", "4", "--save_steps", "4", *CLM_TINY, *map(str, extra)]


@pytest.mark.e2e
def test_a_cpu_run_logs_memory_and_tokens_per_second_but_no_mfu_and_records_its_speed(tmp_path, capsys):
    out = tmp_path / "run"
    load_script("run_clm.py").main(clm(out))
    state = json.loads((out / "trainer_state.json").read_text())
    trained = [e for e in state["log_history"] if "loss" in e]
    assert len(trained) == 4 and all(e["tokens_per_second"] > 0 and e["peak_cpu_memory_gib"] > 0 for e in trained)
    assert not any("mfu" in e for e in state["log_history"])  # no peak known for a CPU: no key, not a 0

    speed = json.loads((out / "run_info.json").read_text())["speed"]
    assert speed["tokens"] == 4 * 4 * 64 and speed["step_seconds"] > 0
    assert speed["tokens_per_second"] == pytest.approx(speed["tokens"] / speed["step_seconds"], rel=1e-3)
    assert speed["mfu"] is None and speed["peak_flops_per_device"] is None
    assert speed["flops_per_token"] == 6 * (2 * 12 * 32**2 + 512 * 32) + 12 * 2 * 32 * 64 and speed["sequence_length"] == 64
    assert speed["peak_memory_measure"].startswith("max resident set") and speed["peak_memory_bytes"] > 2**20
    assert speed["attn_implementation"] == "sdpa" and speed["fused_cross_entropy"] is False and speed["torch_compile"] is False
    assert speed["dataloader_num_workers"] == 0 and speed["dataloader_pin_memory"] is False  # the CPU defaults
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Speed: ")]
    assert len(printed) == 1 and "tokens/s" in printed[0] and "MFU" not in printed[0] and "peak resident memory" in printed[0]


@pytest.mark.e2e
def test_a_run_trains_exactly_what_a_bare_pytorch_loop_trains_over_its_blocks(tmp_path):
    """The harness adds nothing to the arithmetic of a step. Over the blocks run_clm.py feeds it, in its order, a bare
    loop with the defaults the README documents (fused AdamW, betas (0.9, 0.95), weight decay 0.1 on the matrices
    only, cosine schedule after warmup, clipping at 1.0, the model's own loss: the mean over predicted tokens) logs
    the loss run_clm.py logs at every step and ends at the weights it saves. (Before GPT-2's loss type was named, the
    Trainer's losses and gradients were 63/64 of these.)"""
    from safetensors.torch import load_file
    from transformers import AutoConfig, get_cosine_schedule_with_warmup

    from clmlab import modeling, prepared

    out, steps, seed, batch_size, block = tmp_path / "run", 6, 3, 4, 64
    load_script("run_clm.py").main([
        "--train_files", str(shared("tinyshakespeare/input.txt")), "--output_dir", str(out), "--prepare_to", str(tmp_path / "prepared"),
        "--config_overrides", f"n_embd=32,n_layer=2,n_head=2,n_positions={block},resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
        "--block_size", str(block), "--per_device_train_batch_size", str(batch_size), "--tokenizer_vocab_size", "512",
        "--max_steps", str(steps), "--warmup_steps", "2", "--logging_steps", "1", "--eval_on_start", "false", "--eval_strategy", "no",
        "--max_eval_samples", "4", "--seed", str(seed), "--disable_tqdm", "true"])

    model = modeling.init_model(AutoConfig.from_pretrained(out), None, seed)
    assert modeling.weights_checksum(model) == json.loads((out / "run_info.json").read_text())["model"]["initial_weights_sha256"]
    blocks = prepared.load_prepared(tmp_path / "prepared", block, seed, batch_size, steps, 4).train
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]  # GPT-2's biases and LayerNorm weights: the Trainer's no-decay set
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    schedule = get_cosine_schedule_with_warmup(optimizer, 2, steps)
    losses = {}
    model.train()
    for step, batch in enumerate(torch.utils.data.DataLoader(blocks, batch_size=batch_size), start=1):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses[step] = loss.item()

    run_losses = logged(out, "loss")
    assert sorted(run_losses) == list(range(1, steps + 1))
    assert [run_losses[s] for s in losses] == pytest.approx(list(losses.values()), rel=1e-5)
    saved = load_file(out / "model.safetensors")
    for name, weight in model.state_dict().items():
        if name in saved:  # the tied output layer is saved once, as the embeddings
            torch.testing.assert_close(saved[name], weight, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.e2e
def test_a_compiled_run_logs_mfu_against_the_given_peak_and_saves_plain_gpt2(tmp_path, capsys):
    """aot_eager: dynamo and AOTAutograd as inductor uses them, without inductor's C++ compilation (seconds, not minutes)."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    out = tmp_path / "compiled"
    load_script("run_clm.py").main(clm(out, "--torch_compile", "true", "--torch_compile_backend", "aot_eager", "--peak_tflops", "0.001"))
    info = json.loads((out / "run_info.json").read_text())
    speed, flops = info["speed"], info["speed"]["flops_per_token"]
    assert speed["torch_compile"] is True and speed["peak_flops_per_device"] == pytest.approx(1e9)
    assert speed["peak_flops_source"] == "--peak_tflops" and speed["world_size"] == 1
    assert speed["mfu"] == pytest.approx(speed["tokens_per_second"] * flops / 1e9, abs=1e-4)
    trained = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(trained) == 4 and all(e["mfu"] == pytest.approx(e["tokens_per_second"] * flops / 1e9, abs=1e-4) for e in trained)
    assert "MFU " in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Speed: "))

    # The Trainer saves the model it was given, not the compiled wrapper: no `_orig_mod.` in any name.
    for folder in (out, out / "checkpoint-4"):
        saved = load_file(folder / "model.safetensors")
        assert saved and not any("_orig_mod" in name for name in saved)
        assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
        model, loading = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
        assert not any(loading.values()), loading  # no missing, unexpected or mismatched weights
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in saved.items())
    final, step_4 = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert final.keys() == step_4.keys() and all(torch.equal(final[k], step_4[k]) for k in final)  # the same trained weights


# --------------------------------------------------------------------------------------------------- attention and loss


def test_sdpa_and_eager_attention_agree_within_1e5_without_dropout():
    from clmlab.modeling import init_model, weights_checksum

    # One config each: from_config writes the kernel into the config it is given.
    eager, sdpa = (init_model(tiny_config(), None, 0, kernel).eval() for kernel in ("eager", "sdpa"))
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    assert weights_checksum(eager) == weights_checksum(sdpa)  # the kernel is not part of the initialisation
    ids = batch()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # a left-padded row: padded positions attend to nothing, and their outputs are not compared
    with torch.no_grad():
        plain = (eager(input_ids=ids).logits - sdpa(input_ids=ids).logits).abs().max()
        padded = (eager(input_ids=ids, attention_mask=mask).logits - sdpa(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert plain < 1e-5 and padded.abs().max() < 1e-5


def test_the_named_loss_type_computes_the_same_loss_and_leaves_no_graph_break():
    from clmlab.modeling import init_model

    model = init_model(tiny_config(), None, 0).eval()
    assert model.loss_type == "ForCausalLM"
    ids = batch()
    named = model(input_ids=ids, labels=ids).loss
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count == 0
    model.loss_type = None  # what transformers leaves on GPT2LMHeadModel: a warning logged inside forward
    assert torch.equal(model(input_ids=ids, labels=ids).loss, named)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count >= 1
    torch._dynamo.reset()


def test_with_the_loss_type_named_the_trainer_averages_over_the_predicted_tokens(tmp_path):
    """The Trainer divides the summed loss by the labels it counts (num_items_in_batch); for a loss type it knows
    shifts the labels, it counts one label fewer per row, as many as the loss predicts."""
    from transformers import Trainer

    from clmlab.args import ClmTrainingArguments
    from clmlab.modeling import init_model

    ids = batch(rows=3, length=32)
    args = ClmTrainingArguments(output_dir=str(tmp_path), max_steps=1, eval_strategy="no", report_to="none")
    counts = {}
    for loss_type in ("ForCausalLM", None):
        model = init_model(tiny_config(), None, 0)
        model.loss_type = loss_type
        counts[loss_type] = int(Trainer(model=model, args=args)._get_num_items_in_batch([{"input_ids": ids, "labels": ids}], "cpu"))
    assert counts == {"ForCausalLM": 3 * 31, None: 3 * 32}


# --------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("flags, expected", [
    (["--attn_implementation", "flex_attention"], "does not support flex attention"),
    (["--attn_implementation", "flash"], "is not an attention kernel GPT-2 takes"),
    pytest.param(["--attn_implementation", "flash_attention_2"], "needs the flash-attn package",
                 marks=pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")),
    pytest.param(["--fused_cross_entropy", "true"], "--fused_cross_entropy",
                 marks=pytest.mark.skipif(HAS_GPU_AND_LIGER, reason="liger-kernel and a GPU are here: the flag is accepted")),
    (["--peak_tflops", "0"], "--peak_tflops 0.0: must be a positive number"),
])
def test_a_kernel_this_machine_or_gpt2_cannot_run_is_one_line_and_exit_2_before_any_data_work(flags, expected, tmp_path, capsys):
    out = tmp_path / "never_made"
    with pytest.raises(SystemExit) as exited:
        load_script("run_clm.py").main(["--output_dir", str(out), "--train_files", str(shared("tinyshakespeare/input.txt")), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    message = [line for line in err if line.startswith("error: ")]
    assert exited.value.code == 2 and len(message) == 1 and expected in message[0], err
    assert "Traceback" not in "\n".join(err) and not out.exists()


# --------------------------------------------------------------------------------------------------- defaults


def test_the_gpu_defaults_are_decided_for_the_machine(tmp_path, monkeypatch):
    from clmlab.args import DEFAULT_GPU_DATALOADER_WORKERS, ClmTrainingArguments

    args = ClmTrainingArguments(output_dir=str(tmp_path))  # this machine: a CPU
    if not torch.cuda.is_available():
        assert (args.bf16, args.tf32, args.dataloader_num_workers, args.dataloader_pin_memory) == (False, None, 0, False)
        assert args.mixed_precision == "no"
        asked = ClmTrainingArguments(output_dir=str(tmp_path), bf16=True)  # CPU autocast: TrainingArguments wants use_cpu for it
        assert asked.use_cpu and asked.mixed_precision == "bf16" and asked.device.type == "cpu"

    def decided(**given):
        """resolve_defaults as on a Hopper GPU (bf16, TF32); TrainingArguments' own setup is not run."""
        fresh = copy.copy(args)
        fresh.bf16, fresh.fp16, fresh.tf32, fresh.dataloader_num_workers, fresh.use_cpu = None, False, None, None, False
        for key, value in given.items():
            setattr(fresh, key, value)
        with pytest.MonkeyPatch.context() as gpu:
            gpu.setattr(torch.cuda, "is_available", lambda: True)
            gpu.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
            gpu.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
            fresh.resolve_defaults()
        return fresh.bf16, fresh.tf32, fresh.dataloader_num_workers

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert decided() == (True, True, DEFAULT_GPU_DATALOADER_WORKERS)
    assert decided(fp16=True)[0] is False and decided(bf16=False)[0] is False and decided(dataloader_num_workers=0)[2] == 0
    assert decided(use_cpu=True) == (False, None, 0)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # an accelerate launch decided the precision
    assert decided()[0] is False

    # A V100: bf16 only emulated, so not by default; asked for on a GPU that has none at all, one line (the run is never
    # moved quietly to the CPU).
    with pytest.MonkeyPatch.context() as gpu:
        gpu.setattr(torch.cuda, "is_available", lambda: True)
        gpu.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
        gpu.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 0))
        gpu.delenv("ACCELERATE_MIXED_PRECISION")
        fresh = copy.copy(args)
        fresh.bf16, fresh.fp16, fresh.tf32, fresh.dataloader_num_workers, fresh.use_cpu = None, False, None, None, False
        fresh.resolve_defaults()
        assert (fresh.bf16, fresh.tf32) == (False, None)
        gpu.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
        gpu.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla P100-PCIE-16GB")
        fresh.bf16 = True
        with pytest.raises(UsageError, match=r"this GPU \(Tesla P100-PCIE-16GB\) does not support bf16"):
            fresh.resolve_defaults()
        assert not fresh.use_cpu


# --------------------------------------------------------------------------------------------------- fused cross-entropy


def reference_liger(monkeypatch):
    """liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss as its source defines it (0.8.5: forward(lin_weight,
    _input, target, bias=None); ignore_index and reduction as torch's cross_entropy), in plain torch, for testing
    how clmlab calls it on a machine that cannot run liger's Triton kernels."""

    class LigerFusedLinearCrossEntropyLoss(torch.nn.Module):
        def __init__(self, ignore_index=-100, reduction="mean", **unused):
            super().__init__()
            self.ignore_index, self.reduction, self.calls = ignore_index, reduction, []

        def forward(self, lin_weight, _input, target, bias=None):
            self.calls.append((tuple(_input.shape), tuple(target.shape)))
            return torch.nn.functional.cross_entropy(_input @ lin_weight.t(), target, ignore_index=self.ignore_index,
                                                     reduction=self.reduction)

    package, transformers_module = types.ModuleType("liger_kernel"), types.ModuleType("liger_kernel.transformers")
    transformers_module.LigerFusedLinearCrossEntropyLoss = LigerFusedLinearCrossEntropyLoss
    package.transformers = transformers_module
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", transformers_module)


def fused_and_plain(device="cpu"):
    from clmlab.modeling import init_model, use_fused_cross_entropy

    plain = init_model(tiny_config(), None, 0).to(device).train()
    fused = copy.deepcopy(plain)
    use_fused_cross_entropy(fused)
    return fused, plain


@pytest.mark.parametrize("num_items_in_batch", [None, 40])
def test_the_fused_forward_computes_the_models_own_loss_from_the_hidden_states(monkeypatch, num_items_in_batch):
    reference_liger(monkeypatch)
    fused, plain = fused_and_plain()
    ids = batch()
    labels = ids.clone()
    labels[1, :10] = -100  # masked tokens, as an SFT prompt's
    kwargs = {"num_items_in_batch": torch.tensor(num_items_in_batch)} if num_items_in_batch else {}
    out = fused(input_ids=ids, labels=labels, **kwargs)
    expected = plain(input_ids=ids, labels=labels, **kwargs).loss
    assert out.logits is None and torch.allclose(out.loss, expected, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    expected.backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-6), name
    fused.eval()  # evaluation and generation: the model's own forward, with logits
    assert fused(input_ids=ids, labels=labels).logits.shape == (3, 32, 128)


def test_the_trainer_sees_the_fused_forward_as_the_models_own(monkeypatch, tmp_path):
    """Its signature: the Trainer keeps the same dataset columns and passes num_items_in_batch to it."""
    from transformers import Trainer

    from clmlab.args import ClmTrainingArguments

    reference_liger(monkeypatch)
    fused, _ = fused_and_plain()
    trainer = Trainer(model=fused, args=ClmTrainingArguments(output_dir=str(tmp_path), max_steps=1, eval_strategy="no", report_to="none"))
    assert trainer.model_accepts_loss_kwargs and trainer._loss_shifts_labels
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "labels", "attention_mask"} <= set(trainer._signature_columns)


@pytest.mark.skipif(not HAS_GPU_AND_LIGER, reason="needs liger-kernel (pip install -e '.[liger]') and a CUDA GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_loss_equals_the_plain_loss_on_a_gpu(autocast):
    """liger's kernels against the model's own loss: within float32 rounding, or bf16's under autocast."""
    fused, plain = fused_and_plain("cuda")
    ids = batch(rows=4, length=32).cuda()
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-4, "atol": 1e-5}
    losses = []
    for model in (fused, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * 31, device="cuda")).loss
        loss.backward()
        losses.append(loss.float())
    assert torch.allclose(losses[0], losses[1], **tolerance)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, **tolerance), name
