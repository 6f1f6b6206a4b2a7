"""configs/accelerate/: each launch config read by accelerate's own launch code, as `accelerate launch
--config_file ...` reads it, down to the environment and torchrun arguments the training script would get;
and the DDP config launched for real on two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from conftest import REPO, logged, shared

CONFIGS = REPO / "configs" / "accelerate"
DDP = CONFIGS / "ddp_bf16.yaml"
# The SLURM scripts' calling convention (configs/slurm/): what differs per job or node is on the command line.
MULTI_NODE_FLAGS = ["--num_machines", "3", "--num_processes", "24", "--machine_rank", "1",
                    "--main_process_ip", "head-node", "--main_process_port", "29511", "--rdzv_backend", "c10d"]


def launch(config: Path, *flags: str):
    """Everything `accelerate launch --config_file CONFIG FLAGS run_clm.py` does before it starts a process,
    in launch_command's order (accelerate/commands/launch.py): parse, merge the config file, pick the launcher
    and build the script's environment. Returns (launcher, args, env)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), *flags, "run_clm.py", "--max_steps", "3"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return "deepspeed", args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return "torchrun", args, prepare_multi_gpu_env(args)
    return "python", args, prepare_simple_launcher_cmd_env(args)[1]


def torchrun_config(args):
    """The LaunchConfig torchrun builds from what multi_gpu_launcher hands it (accelerate's _filter_args)."""
    import torch.distributed.run as distrib_run
    from accelerate.utils.launch import _filter_args

    torchrun_args = _filter_args(args, distrib_run.get_args_parser(),
                                 ["--training_script", args.training_script, "--training_script_args", args.training_script_args])
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1"}):  # config_from_args would set it otherwise
        config, _, script_args = distrib_run.config_from_args(torchrun_args)
    return torchrun_args, config, script_args


def variant(tmp_path, config: Path, **changes) -> Path:
    """A copy of a config with top-level or fsdp_config keys changed (None: removed)."""
    values = yaml.safe_load(config.read_text())
    for key, value in changes.items():
        section = values["fsdp_config"] if key.startswith("fsdp_") else values
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(values))
    return path


def test_every_config_has_a_launch_line_and_no_machine_path():
    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("#") and f"--config_file configs/accelerate/{path.name}" in text, path.name
        assert not [s for s in strings(yaml.safe_load(text)) if s.startswith(("/", "~"))], path.name


def test_single_gpu_runs_one_plain_process_in_bf16():
    launcher, args, env = launch(CONFIGS / "single_gpu.yaml")
    assert launcher == "python" and args.num_processes == 1 and not args.multi_gpu
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["ACCELERATE_USE_CPU"] == "False"
    assert env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")  # the scheduler's GPU is kept


def test_ddp_runs_torchrun_in_bf16_and_the_command_line_sets_the_process_count():
    launcher, args, env = launch(DDP)
    assert launcher == "torchrun" and args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert args.num_processes == 8 and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env

    _, args, _ = launch(DDP, "--num_processes", "2")
    _, config, _ = torchrun_config(args)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 1, 2)
    assert config.rdzv_backend == "static" and config.rdzv_configs["rank"] == 0

    _, _, env = launch(DDP, "--num_processes", "2", "--mixed_precision", "no")  # how to train this config in fp32
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp2_sets_version_2_wrapping_gpt2_blocks_with_a_full_state_dict_in_bf16():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    launcher, args, env = launch(CONFIGS / "fsdp2.yaml")
    assert launcher == "torchrun" and args.use_fsdp and args.num_processes == 8
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "GPT2Block"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"  # with --activation_checkpointing it would raise
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"

    # What the script's Accelerator builds from that environment.
    with mock.patch.dict(os.environ, env, clear=True):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.state_dict_type == StateDictType.FULL_STATE_DICT
    assert plugin.transformer_cls_names_to_wrap == ["GPT2Block"] and plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.reshard_after_forward is True and plugin.activation_checkpointing is False


def test_fsdp2_without_the_state_dict_type_would_save_sharded(tmp_path):
    """Why fsdp2.yaml names FULL_STATE_DICT: FSDP2's default is sharded, and trainer.save_model() then writes no model."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    _, _, env = launch(variant(tmp_path, CONFIGS / "fsdp2.yaml", fsdp_state_dict_type=None))
    assert "FSDP_STATE_DICT_TYPE" not in env
    with mock.patch.dict(os.environ, env, clear=True):
        assert FullyShardedDataParallelPlugin().state_dict_type == StateDictType.SHARDED_STATE_DICT


def test_multi_node_takes_the_rendezvous_from_the_command_line():
    launcher, args, env = launch(CONFIGS / "multi_node.yaml", *MULTI_NODE_FLAGS)
    assert launcher == "torchrun" and args.multi_gpu and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    torchrun_args, config, _ = torchrun_config(args)
    # --num_processes is the total over all nodes: each node starts total / nodes.
    assert (torchrun_args.nnodes, torchrun_args.nproc_per_node) == ("3", "8")
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (3, 3, 8)
    assert config.rdzv_backend == "c10d" and config.rdzv_endpoint == "head-node:29511"
    # torchrun is handed the node rank, but only the static rendezvous uses it; c10d assigns node ranks itself.
    assert torchrun_args.node_rank == 1 and "rank" not in config.rdzv_configs


def test_multi_node_defaults_and_a_rendezvous_backend_in_the_yaml_is_ignored(tmp_path):
    """Why the rendezvous backend is a flag: accelerate reads rdzv_backend from the command line only."""
    without_the_flag = MULTI_NODE_FLAGS[:MULTI_NODE_FLAGS.index("--rdzv_backend")]
    _, args, _ = launch(variant(tmp_path, CONFIGS / "multi_node.yaml", rdzv_backend="c10d"), *without_the_flag)
    _, config, _ = torchrun_config(args)
    assert config.rdzv_backend == "static" and config.rdzv_configs["rank"] == 1

    _, args, _ = launch(CONFIGS / "multi_node.yaml", "--machine_rank", "1", "--main_process_ip", "head-node")
    assert (args.num_machines, args.num_processes) == (2, 16)  # the file's defaults: two 8-GPU nodes


def deepspeed_json() -> tuple[Path, dict]:
    _, _, env = launch(CONFIGS / "deepspeed_zero2.yaml")
    path = Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert not path.is_absolute()  # relative to the repository root, where the launch line runs
    return REPO / path, json.loads((REPO / path).read_text())


def test_deepspeed_zero2_points_at_a_json_the_trainer_fills_in():
    launcher, args, env = launch(CONFIGS / "deepspeed_zero2.yaml")
    assert launcher == "deepspeed" and args.use_deepspeed and args.num_processes == 8
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"
    # No precision from the YAML: with a deepspeed_config_file accelerate refuses one (see the next test).
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    path, ds = deepspeed_json()
    assert ds["zero_optimization"]["stage"] == 2
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert ds[key] == "auto", key
    assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"  # follow run_clm's --bf16 / --fp16
    # Anything HfTrainerDeepSpeedConfig would check against a Trainer flag must be "auto", or it mismatches.
    for section, keys in {"optimizer": ("lr", "betas", "eps", "weight_decay"),
                          "scheduler": ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")}.items():
        for key in keys:
            assert ds.get(section, {}).get("params", {}).get(key, "auto") == "auto", f"{section}.params.{key}"


def test_deepspeed_plugin_accepts_the_launch_environment_without_deepspeed_installed(tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    _, _, env = launch(CONFIGS / "deepspeed_zero2.yaml")
    with mock.patch.dict(os.environ, {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(deepspeed_json()[0])}, clear=True):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2 and plugin.deepspeed_config["zero_optimization"]["stage"] == 2

    # A mixed_precision in the YAML next to a deepspeed_config_file is refused in the script.
    _, _, env = launch(variant(tmp_path, CONFIGS / "deepspeed_zero2.yaml", mixed_precision="bf16"))
    with mock.patch.dict(os.environ, {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(deepspeed_json()[0])}, clear=True):
        with pytest.raises(ValueError, match="deepspeed_config_file"):
            DeepSpeedPlugin()


def test_deepspeed_json_is_filled_from_the_training_flags(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is optional (pip install -e '.[deepspeed]'); "
                        "its JSON is still checked above, without the Trainer's filling-in")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_grad_norm=0.5, bf16=True, use_cpu=True, report_to="none")
    config = HfTrainerDeepSpeedConfig(str(deepspeed_json()[0]))  # registers itself for the whole process
    try:
        config.trainer_config_process(args)
        config.trainer_config_finalize(args, GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2)), num_training_steps=10)
        filled = config.config
    finally:
        unset_hf_deepspeed_config()
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"], filled["gradient_clipping"]) == (4, 2, 0.5)
    assert filled["train_batch_size"] == 8 * args.world_size
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(filled)


def test_trainer_takes_the_precision_from_accelerate_unless_a_precision_flag_is_given(tmp_path):
    """TrainingArguments.mixed_precision (what the Trainer hands its Accelerator): accelerate's
    ACCELERATE_MIXED_PRECISION, replaced by --bf16 true or --fp16 true; --bf16 false cannot turn it off."""
    from transformers import TrainingArguments

    def precision(env_value, **flags):
        with mock.patch.dict(os.environ, {"ACCELERATE_MIXED_PRECISION": env_value}):
            return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **flags).mixed_precision

    assert precision("bf16") == "bf16" and precision("bf16", bf16=False) == "bf16"
    assert precision("no", bf16=True) == "bf16" and precision("no") == "no"


# --------------------------------------------------------------------------------------------------- a real launch


def tiny_flag(name: str) -> int:
    from test_lifecycle import CLM_TINY

    return int(CLM_TINY[CLM_TINY.index(name) + 1])


def accelerate_launch(out: Path, *flags: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/ddp_bf16.yaml --num_processes 2 run_clm.py` of a tiny run.
    A free port rather than 29500, which torchrun tests running beside this one use."""
    from test_lifecycle import CLM_TINY

    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(DDP),
               "--num_processes", "2", "--main_process_port", "0", *flags, "run_clm.py",
               "--train_files", str(shared("tinyshakespeare/input.txt")), "--output_dir", str(out), "--max_steps", "3",
               "--eval_on_start", "false", "--eval_steps", "100", "--save_steps", "100", *CLM_TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"accelerate launch exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def resolved_training_arguments(out: Path):
    import torch

    return torch.load(out / "training_args.bin", weights_only=False)  # the Trainer's own, after __post_init__


@pytest.mark.e2e
def test_the_ddp_config_trains_on_two_processes_in_bf16(tmp_path):
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    accelerate_launch(bf16)
    accelerate_launch(fp32, "--mixed_precision", "no")  # the same run with accelerate's precision overridden

    record = json.loads((bf16 / "run_info.json").read_text())
    assert record["status"] == "finished" and record["step"] == 3
    per_step = 2 * tiny_flag("--per_device_train_batch_size") * tiny_flag("--block_size")  # 2 processes
    assert record["budget"]["tokens_per_step"] == per_step and record["tokens_seen"] == 3 * per_step
    assert logged(bf16, "num_input_tokens_seen")[1] == per_step  # counted over both processes

    # run_clm.py got no --bf16: the precision came from the config through ACCELERATE_MIXED_PRECISION.
    args = resolved_training_arguments(bf16)
    assert args.bf16 is False and args.mixed_precision == "bf16"
    assert resolved_training_arguments(fp32).mixed_precision == "no"
    # The run record says so, where a comparison report checks it.
    launch = {k: v for k, v in record["launch"].items() if k != "slurm_job_id"}
    assert launch == {"world_size": 2, "processes_per_node": 2, "device": "cpu", "mixed_precision": "bf16", "parallelism": "ddp"}
    assert json.loads((fp32 / "run_info.json").read_text())["launch"]["mixed_precision"] == "no"
    # And bf16 autocast really ran on CPU: the same first batch on the same initial weights gives another loss.
    first_bf16, first_fp32 = logged(bf16, "loss")[1], logged(fp32, "loss")[1]
    assert first_bf16 != first_fp32 and abs(first_bf16 - first_fp32) < 1e-2
