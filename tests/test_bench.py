"""bench/train_throughput.py: its tiny mode prints one JSON report with every field, figures consistent with
each other, and the three pipelines training the same model from the same weights. Correctness only: no
timing is compared with any threshold."""

from __future__ import annotations

import json
import math

from conftest import run_script, shared

PIPELINES = {"bare_loop", "hf_example", "clmlab"}
PIPELINE_FIELDS = {"tokens_per_second", "step_time_ms", "mfu", "peak_memory_bytes", "end_to_end_seconds", "before_training_seconds",
                   "training_seconds", "after_training_seconds", "final_loss", "final_loss_per_predicted_token", "losses",
                   "initial_weights_sha256", "attn_implementation", "other_processes_cores"}


def test_the_tiny_benchmark_reports_three_pipelines_that_trained_the_same_model():
    shared("tinyshakespeare/input.txt")
    done = run_script("bench/train_throughput.py", "--tiny")
    report = json.loads(done.stdout)  # stdout holds the JSON alone: what the Trainer and run_clm.py print goes to stderr

    assert {"device", "device_name", "versions", "dtype", "model", "block_size", "batch", "steps", "warmup", "tokens_per_step",
            "peak_memory_kind", "measures", "pipelines", "ratios"} <= report.keys()
    assert {"torch", "transformers"} <= report["versions"].keys()
    assert report["dtype"] in ("float32", "bfloat16")
    assert report["torch_compile"] is None  # compiled only with --torch_compile
    model = report["model"]
    assert model["parameters"] > 0 and model["vocab_size"] >= 512 and model["n_layer"] >= 1
    block, steps, warmup = report["block_size"], report["steps"], report["warmup"]
    assert report["tokens_per_step"] == block * report["batch"]
    assert report["peak_memory_kind"] == ("cuda_max_memory_allocated" if report["device"] == "cuda" else "rss_peak_minus_start")
    assert set(report["pipelines"]) == PIPELINES

    logging_steps = report["logging_steps"]
    for name, result in report["pipelines"].items():
        assert PIPELINE_FIELDS <= result.keys(), name
        assert result["tokens_per_second"] > 0, name
        mean, median = result["step_time_ms"]["mean"], result["step_time_ms"]["median"]
        assert mean > 0 and median > 0, name
        # Both figures come from the same window: its tokens over its seconds, and its seconds over its steps.
        assert math.isclose(result["tokens_per_second"] * mean / 1000, report["tokens_per_step"], rel_tol=0.01), name
        assert (result["mfu"] is None) == (report["peak_flops"] is None), name
        assert isinstance(result["peak_memory_bytes"], int) and result["peak_memory_bytes"] >= 0, name
        parts = result["before_training_seconds"] + result["training_seconds"] + result["after_training_seconds"]
        assert result["end_to_end_seconds"] >= result["training_seconds"] > 0 and abs(result["end_to_end_seconds"] - parts) < 0.05, name
        # The training window lies inside the training time.
        assert result["training_seconds"] >= steps * mean / 1000 - 0.01, name
        assert [int(s) for s in result["losses"]] == list(range(logging_steps, warmup + steps + 1, logging_steps)), name
        assert result["final_loss"] == result["losses"][str(warmup + steps)] and math.isfinite(result["final_loss"]), name

    pipelines = report["pipelines"]
    # One seed, one config: the three start from bit-identical weights (clmlab's from its own run record).
    assert len({p["initial_weights_sha256"] for p in pipelines.values()}) == 1
    assert {p["attn_implementation"] for p in pipelines.values()} == {"sdpa"}  # transformers' default for GPT-2, clmlab's too
    # The HF example's Trainer averages GPT-2's loss over one label per row too many (its model has no loss_type).
    hf = pipelines["hf_example"]
    assert math.isclose(hf["final_loss_per_predicted_token"], hf["final_loss"] * block / (block - 1), abs_tol=1e-3)
    assert pipelines["bare_loop"]["final_loss_per_predicted_token"] == pipelines["bare_loop"]["final_loss"]
    # Same weights, same schedule, the same text cut into blocks by each pipeline's own code (so not the same
    # batches): after a few steps from one starting point the losses per predicted token are close, not equal.
    losses = [p["final_loss_per_predicted_token"] for p in pipelines.values()]
    assert max(losses) - min(losses) < 0.05 * min(losses), losses

    for of in ("bare_loop", "hf_example"):
        ratios = report["ratios"][f"clmlab_over_{of}"]
        for key in ("tokens_per_second", "end_to_end_seconds"):
            assert math.isclose(ratios[key], pipelines["clmlab"][key] / pipelines[of][key], rel_tol=0.01), (of, key)

    logged = pipelines["clmlab"]["as_logged"]  # clmlab's own figures over the same steps
    assert logged["steps"] == steps and logged["tokens_per_second"] > 0


def test_a_bad_flag_is_one_line_and_exit_status_2():
    done = run_script("bench/train_throughput.py", "--tiny", "--vocab", "12", check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: --vocab 12: give 'gpt2' or a BPE size of at least 257 (256 bytes + EOS)"]
