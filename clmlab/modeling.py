"""Model configuration and initialisation: any GPT-2 shape, checked before any data is read."""

from __future__ import annotations

import hashlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from clmlab.cli import UsageError, first_line


def _load_config(name_or_path: str, what: str):
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # OSError offline or not found, ValueError for an unknown model_type
        raise UsageError(f"could not load {what} {name_or_path!r}: {first_line(error)}") from None


def apply_config_overrides(config, overrides: str) -> None:
    """Apply "key=value,..." to a config, naming the valid keys when a key is unknown."""
    valid = sorted(config.to_dict())
    for item in overrides.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"--config_overrides item {item!r} is not key=value; write e.g. 'n_embd=128,n_layer=4,n_head=4'")
        if key.strip() not in valid:
            raise UsageError(f"--config_overrides key {key.strip()!r} is not a {config.model_type} config key; valid keys: {', '.join(valid)}")
    try:
        config.update_from_string(",".join(item.strip() for item in overrides.split(",")))
    except ValueError as error:
        raise UsageError(f"--config_overrides {overrides!r}: {error}") from None


def build_config(model_args):
    """The model's config: from the checkpoint, a named config, or --model_type's default plus overrides."""
    if model_args.model_name_or_path:
        if model_args.config_overrides:
            raise UsageError("--config_overrides shapes a model built from scratch; drop it or drop --model_name_or_path")
        return _load_config(model_args.config_name or model_args.model_name_or_path, "model")
    if model_args.config_name:
        config = _load_config(model_args.config_name, "config")
    else:
        try:
            config = AutoConfig.for_model(model_args.model_type)
        except ValueError:
            raise UsageError(f"--model_type {model_args.model_type!r} is not a model type transformers knows (e.g. gpt2)") from None
    if model_args.config_overrides:
        apply_config_overrides(config, model_args.config_overrides)
    return config


def context_length(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_shape(config, block_size: int) -> None:
    for key in ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size"):
        value = getattr(config, key, None)
        if value is not None and value < 1:
            raise UsageError(f"{key}={value}: must be a positive number")
    if block_size < 1:
        raise UsageError(f"--block_size {block_size}: must be a positive number of tokens")
    n_embd, n_head = getattr(config, "n_embd", None), getattr(config, "n_head", None)
    if n_embd and n_head and n_embd % n_head:
        raise UsageError(f"n_embd={n_embd} is not divisible by n_head={n_head}; choose n_embd as a multiple of n_head")
    positions = context_length(config)
    if positions and block_size > positions:
        raise UsageError(f"--block_size {block_size} is above the model's n_positions={positions}; lower --block_size or raise n_positions")


def fit_config_to_tokenizer(config, tokenizer, from_scratch: bool, min_vocab_size: int = 0) -> None:
    """From scratch the vocabulary and special ids come from the tokenizer; a checkpoint must already cover it.

    `min_vocab_size` is the size asked of a BPE trained on the run's data: a small corpus can give fewer
    merges, and sizing the embeddings by it would make the initial weights depend on the data.
    """
    if from_scratch:
        config.vocab_size = max(len(tokenizer), min_vocab_size)
        config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        config.eos_token_id = tokenizer.eos_token_id
    elif len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {config.vocab_size}; "
            "use the checkpoint's own tokenizer (drop --tokenizer_name)"
        )


def init_model(config, model_name_or_path: str | None, seed: int):
    """Weights depend on the seed and the config alone: seeded right here, before any data is read, so runs
    that differ only in their data start from bit-identical weights."""
    if model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, config=config)
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def weights_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parameter_count(model: torch.nn.Module) -> int:
    """Unique parameters (the tied lm_head is counted once)."""
    return sum(p.numel() for p in model.parameters())
