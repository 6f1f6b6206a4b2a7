"""Finding a model or a checkpoint in a run folder, and loading it for inference or evaluation, from any plain
Hugging Face checkpoint folder. The one place that knows what a complete checkpoint is."""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from clmlab.cli import UsageError, first_line

ARGS_FILE = "run_args.json"  # a clmlab run's folder holds one
COMPLETE_MARKER = "checkpoint_complete.json"  # written last, once every process has saved
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
logger = logging.getLogger(__name__)


@dataclass
class LoadArguments:
    """How run_infer.py and run_eval.py place a model: the same flags in both."""

    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda.", "choices": ["auto", "cpu", "cuda"]})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype.", "choices": ["auto", "float32", "bfloat16", "float16"]})
    quantize: str | None = field(default=None, metadata={"help": "int8: dynamic int8 linear layers (CPU).", "choices": ["int8"]})


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete_checkpoint(path: Path) -> bool:
    """A checkpoint resume may take. In a clmlab run's folder that is one with a completion marker whose files
    are all there at their sizes: the Trainer writes a checkpoint in place, rank by rank, and a process killed
    during the save leaves a folder that looks whole to any one file. A checkpoint of a plain Trainer run (no
    run_args.json beside it) has no marker; there, a readable trainer_state.json (written last by the main
    process) is the best sign there is."""
    path = Path(path)
    if read_json(path / "trainer_state.json") is None:
        return False
    marker = read_json(path / COMPLETE_MARKER)
    if marker is None:
        return not (path.parent / ARGS_FILE).is_file()
    try:
        return all((path / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, KeyError, AttributeError, TypeError):
        return False


def mark_complete(path: str | Path, step: int, world_size: int) -> None:
    """Write the completion marker, listing every file of the checkpoint with its size, through a temporary
    file and a rename: the marker is either absent or whole. Called once every process has finished saving."""
    path = Path(path)
    files = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file() and f.name != COMPLETE_MARKER}
    tmp = path / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1) + "\n")
    os.replace(tmp, path / COMPLETE_MARKER)


def unmark(path: str | Path) -> None:
    """Take the marker away first, so a checkpoint half deleted never counts as complete."""
    (Path(path) / COMPLETE_MARKER).unlink(missing_ok=True)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    return int(read_json(Path(checkpoint) / "trainer_state.json")["global_step"])


def checkpoints_by_step(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every checkpoint-N folder of a run, complete or not, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and path.is_dir():
            found.append((int(suffix), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str) -> str | None:
    complete = [path for _, path in checkpoints_by_step(output_dir) if is_complete_checkpoint(path)]
    return str(complete[-1]) if complete else None


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)


def find_model_dir(path: str, flag: str = "--checkpoint") -> Path:
    """A run's output directory (its final model, else its latest complete checkpoint) or a checkpoint-N folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: no such folder")
    if _has_model(folder):
        return folder
    latest = last_complete_checkpoint(str(folder))
    if latest and _has_model(Path(latest)):
        logger.info(f"{path} has no final model yet: using its latest checkpoint {latest}")
        return Path(latest)
    raise UsageError(
        f"{flag} {path} holds no model (no config.json with weights, no complete checkpoint-N folder); "
        "give a run's output directory or one of its checkpoint-N folders"
    )


def locate_model(name_or_path: str) -> tuple[str, str]:
    """(model folder or Hub id, tokenizer folder or Hub id): a run's output directory gives its final model,
    else its latest checkpoint, whose tokenizer may sit in the run folder above it."""
    if not Path(name_or_path).is_dir():
        if Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise UsageError(f"--model_name_or_path {name_or_path}: no such folder (give a run's output directory, a checkpoint folder or a Hub id)")
        return name_or_path, name_or_path
    model_dir = find_model_dir(name_or_path, "--model_name_or_path")
    tokenizer_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else model_dir.parent
    return str(model_dir), str(tokenizer_dir)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def conv1d_to_linear(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-2's projections are transformers' Conv1D (weights stored transposed), which torch's dynamic
    quantization does not recognise; an equivalent nn.Linear lets every projection be quantized."""
    from transformers.pytorch_utils import Conv1D

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
                linear.weight.data = child.weight.data.t().contiguous()
                if child.bias is not None:
                    linear.bias.data = child.bias.data.clone()
                setattr(module, child_name, linear)
    return model


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every linear layer (weights int8, activations quantized on the fly):
    a CPU inference mode."""
    model = conv1d_to_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation on every call
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_for_inference(path: str, device: str = "auto", dtype: str = "auto", quantize: str | None = None):
    """Model (eval mode, on its device) and tokenizer of a checkpoint folder; the tokenizer comes from the
    run's folder when a checkpoint-N folder has none."""
    model_dir = find_model_dir(path)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if quantize == "int8" and (torch_device.type != "cpu" or torch_dtype != torch.float32):
        raise UsageError("--quantize int8 is CPU inference in float32: use --device cpu --dtype float32 (or auto on a CPU machine)")
    tokenizer_dir = model_dir if (model_dir / "tokenizer_config.json").is_file() else model_dir.parent
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    except Exception as error:  # a corrupt or foreign folder
        raise UsageError(f"could not load the model in {model_dir}: {first_line(error)}") from None
    model.eval()
    if quantize == "int8":
        model = quantize_int8(model)
    model.to(torch_device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batches need a pad id; attention masks hide it
    return model, tokenizer, model_dir
