"""Model configuration and initialisation: any GPT-2 shape, checked before any data is read."""

from __future__ import annotations

import hashlib
import logging
import sys
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


def init_model(config, model_name_or_path: str | None, seed: int, attn_implementation: str | None = None,
               fused_cross_entropy: bool = False):
    """Weights depend on the seed and the config alone: seeded right here, before any data is read, so runs
    that differ only in their data start from bit-identical weights. `attn_implementation` is the attention
    kernel (None: transformers' default, SDPA for GPT-2); it does not change the weights."""
    kernel = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        if model_name_or_path:
            model = AutoModelForCausalLM.from_pretrained(model_name_or_path, config=config, **kernel)
        else:
            set_seed(seed)
            model = AutoModelForCausalLM.from_config(config, **kernel)
    except (ImportError, ValueError) as error:
        if not attn_implementation or not any(word in str(error).lower() for word in ("attn", "attention")):
            raise
        # transformers refuses a kernel the architecture lacks (ValueError) or whose package is missing (ImportError)
        raise UsageError(f"--attn_implementation {attn_implementation}: {first_line(error)}") from None
    set_loss_type(model)
    if fused_cross_entropy:
        use_fused_cross_entropy(model)
    return model


def set_loss_type(model) -> None:
    """Name the loss a causal LM computes. GPT2LMHeadModel's class name matches no entry of transformers'
    LOSS_MAPPING, so its `loss_type` is None and every forward pass with labels logs a warning (once): a call
    that breaks the graph under torch.compile. The loss function it falls back to is the same ForCausalLMLoss.
    Named, the Trainer also counts the tokens a step averages its loss over as that loss does, over the shifted
    labels (`Trainer._loss_shifts_labels`); unnamed it counts one label per row too many, and the logged
    training loss was (block - 1) / block of the mean loss per predicted token."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"


# --------------------------------------------------------------------------------------------------- kernels

def use_fused_cross_entropy(model) -> None:
    """Training forward passes with labels compute the loss straight from the last hidden states and the output
    layer's weight, a chunk of tokens at a time (liger-kernel's LigerFusedLinearCrossEntropyLoss, which also
    makes the gradients in the same pass), so the batch x sequence x vocabulary logits are never held whole;
    the output carries no logits. Evaluation, generation and calls without labels run the model's own forward.

    Written here rather than through liger's own patching: liger has no GPT-2 entry (Trainer's
    --use_liger_kernel leaves GPT-2 unchanged), and replacing the forward of this one instance leaves the class,
    and so the saved checkpoint, plain GPT2LMHeadModel. The loss is transformers' ForCausalLMLoss computed
    differently: labels shifted by padding the last position with the ignore index, summed and divided by
    the Trainer's `num_items_in_batch` when it passes one, else averaged over the predicted tokens."""
    import functools

    import torch.nn.functional as F
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    loss_sum = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum")
    plain_forward = model.forward

    @functools.wraps(plain_forward)  # the Trainer reads the signature: its columns, and **kwargs for num_items_in_batch
    def forward(*args, labels=None, **kwargs):
        if not model.training or labels is None or args or kwargs.get("logits_to_keep") or kwargs.get("return_dict") is False:
            return plain_forward(*args, labels=labels, **kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        outputs = model.transformer(**kwargs)  # what GPT2LMHeadModel.forward runs before its output layer
        hidden = outputs.last_hidden_state
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:]  # position t predicts token t + 1, as ForCausalLMLoss shifts
        total = loss_sum(model.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device))
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        loss = total / (count.to(total.device) if torch.is_tensor(count) else count)
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                                 cross_attentions=outputs.cross_attentions)

    model.forward = forward
    model.fused_cross_entropy = True


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


# --------------------------------------------------------------------------------------------------- speed


def peak_dtype(mixed_precision: str, device: torch.device) -> str | None:
    """The dtype a training step's matrix multiplies run in, as PEAK_FLOPS names it: the autocast dtype under
    bf16/fp16 mixed precision (TrainingArguments.mixed_precision: --bf16, --fp16 or ACCELERATE_MIXED_PRECISION),
    else float32, which the table's GPUs from Ampere on reach only with TF32 matmuls; None for fp32 without TF32
    on such a GPU, whose peak the table does not hold."""
    if mixed_precision in ("bf16", "fp16"):
        return {"bf16": "bfloat16", "fp16": "float16"}[mixed_precision]
    if mixed_precision not in ("no", None, ""):
        return None  # fp8: no peak in the table
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8:
        precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)  # torch >= 2.9; reading the old flag then raises
        tf32 = precision == "tf32" if precision is not None else torch.backends.cuda.matmul.allow_tf32
        return "float32" if tf32 else None
    return "float32"


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """The most memory this process has held so far, in bytes, and what the figure measures: on a GPU the
    most its tensors took at once (torch.cuda.max_memory_allocated, not the allocator's cache); elsewhere the
    process's peak resident set (getrusage), which also counts the Python interpreter, libraries and data."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "max resident set size (getrusage)"  # Linux counts KiB


# --------------------------------------------------------------------------------------------------- FLOPs

# Dense (not sparsity) peak tensor FLOP/s by GPU name fragment and compute dtype, from the vendors' data sheets;
# the first fragment found in torch.cuda.get_device_name() wins. float32 means TF32 tensor cores where the
# GPU has them (clmlab turns TF32 matmuls on), plain FP32 where it does not (V100).
PEAK_FLOPS = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835e12, "float16": 835e12, "float32": 417e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "float32": 183e12},
    "L40": {"bfloat16": 181e12, "float16": 181e12, "float32": 90.5e12},  # before "L4", which its name contains
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
