"""Model configuration and initialisation: any GPT-2 shape, checked before any data is read."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, set_seed

from clmlab.cli import UsageError, first_line, require

logger = logging.getLogger(__name__)


def _load_config(name_or_path: str, what: str):
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as error:  # OSError offline or not found, ValueError for an unknown model_type
        raise UsageError(f"could not load {what} {name_or_path!r}: {first_line(error)}") from None


def apply_config_overrides(config, overrides: str) -> None:
    """Apply "key=value,..." to a config, naming the valid keys when a key is unknown."""
    from clmlab.args import parse_overrides

    valid = sorted(config.to_dict())
    parsed = parse_overrides(overrides)
    for key in parsed:
        if key not in valid:
            raise UsageError(f"--config_overrides key {key!r} is not a {config.model_type} config key; valid keys: {', '.join(valid)}")
    try:
        config.update_from_string(",".join(f"{k}={v}" for k, v in parsed.items()))
    except ValueError as error:
        raise UsageError(f"--config_overrides {overrides!r}: {error}") from None
    for key in parsed:  # ranges the model would otherwise only refuse at its first forward pass, or never
        value = getattr(config, key)
        if key.endswith(("pdrop", "dropout")) and isinstance(value, (int, float)):
            require(0 <= value < 1, "config_overrides", f"{key}={value}", "a dropout probability must be at least 0 and below 1")
        if key.endswith("epsilon") and isinstance(value, (int, float)):
            require(0 < value < 1, "config_overrides", f"{key}={value}", "must be a small positive number")


def build_config(model_args):
    """The model's config: from the checkpoint, a named config, or --model_type's default plus overrides
    (ModelArguments has refused overrides together with a checkpoint)."""
    if model_args.model_name_or_path:
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


def fit_config_to_tokenizer(config, tokenizer, from_scratch: bool, min_vocab_size: int = 0, vocab_override: int | None = None) -> None:
    """From scratch the vocabulary and special ids come from the tokenizer; a checkpoint must already cover it.

    `min_vocab_size` is the size asked of a BPE trained on the run's data: a small corpus can give fewer
    merges, and sizing the embeddings by it would make the initial weights depend on the data.
    `vocab_override` (vocab_size in --config_overrides) may pad the embeddings beyond the tokenizer, e.g.
    GPT-2's 50,257 to 50,304, a multiple of 64 that matrix kernels run faster on; it may not cut them.
    """
    if from_scratch:
        needed = max(len(tokenizer), min_vocab_size)
        if vocab_override is not None and vocab_override < needed:
            raise UsageError(f"--config_overrides vocab_size={vocab_override} is smaller than the tokenizer's {needed:,} tokens; "
                             f"give at least {needed:,} (a multiple of 64 above it, e.g. {-(-needed // 64) * 64:,}, trains faster) or drop it")
        config.vocab_size = vocab_override or needed
        if vocab_override and vocab_override > needed:
            logger.info(f"vocabulary padded to {vocab_override:,} embedding rows for a {needed:,}-token tokenizer (--config_overrides)")
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


# --------------------------------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """Bytes one training process needs, by what holds them."""

    weights_gradients_optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights_gradients_optimizer + self.activations + self.logits

    def describe(self) -> str:
        return (f"{size(self.total)} (weights, gradients and AdamW state {size(self.weights_gradients_optimizer)}, "
                f"activations {size(self.activations)}, logits {size(self.logits)})")


def size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def training_memory(config, batch: int, sequence: int, parameters: int, trainable: int, mixed_precision: bool = False,
                    activation_checkpointing: bool = False, attention_scores: bool = True) -> MemoryEstimate:
    """A first-order estimate of one training step's peak memory for a GPT-2-shaped model.

    fp32 weights (kept in fp32 under bf16/fp16 autocast), fp32 gradients and AdamW's two moments for the
    trained parameters. Activations kept for the backward pass: about 45 values per token, layer and hidden
    unit (measured on transformers' GPT-2, whose MLP keeps several 4 x n_embd intermediates; Korthikanti et
    al. 2022 count 17 for a fused implementation), plus the attention scores, probabilities and dropout
    mask per head where the attention kernel stores them (`attention_scores`: the CPU path; fused GPU
    kernels do not); with activation checkpointing, each layer's input and one layer's activations. Logits:
    batch x sequence x vocabulary, with their fp32 copies and gradients in the loss. bench/memory_estimate.py
    sets this against measured peaks.
    """
    n_embd, n_layer = getattr(config, "n_embd", 768), getattr(config, "n_layer", 12)
    n_head, vocab = getattr(config, "n_head", 12), getattr(config, "vocab_size", 50257)
    tokens = batch * sequence
    value = 2 if mixed_precision else 4
    layer = tokens * n_embd * 45 * value + (batch * n_head * sequence ** 2 * (3 * value + 1) if attention_scores else 0)
    kept = n_layer * tokens * n_embd * value + layer if activation_checkpointing else n_layer * layer
    return MemoryEstimate(weights_gradients_optimizer=4 * parameters + 12 * trainable, activations=kept,
                          logits=tokens * vocab * (value + 16))


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device a process trains on; None where that cannot be read."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            import psutil

            return psutil.virtual_memory().available
    except Exception:  # an exotic device or a sandbox that hides memory figures: no warning rather than a crash
        return None
    return None


# --------------------------------------------------------------------------------------------------- FLOPs

# Dense (not sparsity) peak tensor FLOP/s by GPU name fragment and compute dtype, from the vendors' data sheets;
# the first fragment found in torch.cuda.get_device_name() wins. float32 means TF32 tensor cores where the
# GPU has them (clmlab turns TF32 matmuls on), plain FP32 where it does not (V100).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
    "V100": {"float16": 125e12, "float32": 15.7e12},
}


def training_flops_per_token(config, sequence_length: int) -> int:
    """FLOPs of one training token (forward and backward) of a GPT-2: 6 per weight that multiplies (every
    parameter but the position embeddings, a lookup; the token embeddings count once, as the tied output
    layer), plus the attention scores and their weighted sum, 12 x layers x width x sequence (PaLM's
    appendix B; a causal kernel that skips the masked half does less, which MFU conventionally ignores)."""
    n_embd, n_layer, n_inner = config.n_embd, config.n_layer, getattr(config, "n_inner", None) or 4 * config.n_embd
    per_layer = 4 * n_embd * n_embd + 2 * n_embd * n_inner  # attention in/out projections, MLP in/out
    matmul_weights = n_layer * per_layer + config.vocab_size * n_embd
    return 6 * matmul_weights + 12 * n_layer * n_embd * sequence_length


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """The device's peak FLOP/s for `dtype` ("bfloat16", "float16", "float32"), or None where unknown (CPUs,
    unlisted GPUs): then MFU is not logged unless --peak_tflops says the peak."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in name:
            return peaks.get(dtype)
    return None
