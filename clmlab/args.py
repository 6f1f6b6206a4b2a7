"""The arguments of the training scripts, as dataclasses that HfArgumentParser turns into flags.

Each dataclass checks its own values in `__post_init__`, so a bad flag is refused when it is parsed, before
anything is read or written. Checks that need the data (a column, a file's bytes) run where it is read.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from clmlab import data
from clmlab.cli import UsageError, require
from clmlab.sft.formats import FORMATS

TEXT_DOCUMENT_MODES = ("auto", "separator", "paragraph", "line", "file")
# Batch-loading processes on a GPU: reading and collating the next batches then overlaps the step. The blocks are
# memory-mapped and cheap to read, so two suffice, and leave the other cores to the main process.
DEFAULT_GPU_DATALOADER_WORKERS = 2
# The Trainer's --optim values that build torch.optim.AdamW: the only ones the parameters beside Muon's are given to.
ADAMW_OPTIMS = ("adamw_torch", "adamw_torch_fused")
# Muon's flags (clmlab.args.ClmTrainingArguments), unset unless --matrix_optimizer muon.
MUON_FLAGS = ("muon_learning_rate", "muon_momentum", "muon_nesterov", "muon_weight_decay", "muon_lr_adjustment")
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------- kernels

# The attention kernels transformers' GPT-2 takes (GPT2PreTrainedModel: _supports_sdpa, _supports_flash_attn);
# it refuses flex_attention. flash_attention_3 (the flash-attn-3 package) needs a Hopper GPU, and transformers
# names it too; the list holds what a user of GPT-2 is likely to have.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def check_attention_implementation(name: str) -> None:
    """Refuse, before any data is read, an attention kernel GPT-2 does not take or this machine cannot run."""
    import importlib.util

    if name == "flex_attention":
        raise UsageError("--attn_implementation flex_attention: transformers' GPT-2 does not support flex attention; "
                         "use sdpa (the default), eager or flash_attention_2")
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise UsageError(f"--attn_implementation {name!r} is not an attention kernel GPT-2 takes; choose one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    package = {"flash_attention_2": ("flash_attn", "flash-attn"), "flash_attention_3": ("flash_attn_interface", "flash-attn-3")}.get(name)
    if package is None:
        return
    if importlib.util.find_spec(package[0]) is None:
        raise UsageError(f"--attn_implementation {name} needs the {package[1]} package, which is not installed "
                         f"(pip install {package[1]} --no-build-isolation, on a machine with a CUDA GPU); or use sdpa, the default")
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--attn_implementation {name} runs on a CUDA GPU only, and this machine has none; use sdpa, the default")


def check_fused_cross_entropy() -> None:
    """liger-kernel's loss is Triton code: it needs the package and a CUDA GPU."""
    import importlib.util

    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        raise UsageError("--fused_cross_entropy needs liger-kernel, which is not installed: pip install -e '.[liger]' "
                         "(on a machine with a CUDA GPU), or drop the flag")
    if not torch.cuda.is_available():
        raise UsageError("--fused_cross_entropy runs liger-kernel's Triton kernels, which need a CUDA GPU, and this machine "
                         "has none; drop the flag")


def parse_overrides(overrides: str | None) -> dict[str, str]:
    """"key=value,..." as a mapping; the keys are checked against the model's config where it is built."""
    parsed = {}
    for item in filter(str.strip, (overrides or "").split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise UsageError(f"--config_overrides item {item.strip()!r} is not key=value; write e.g. 'n_embd=128,n_layer=4,n_head=4'")
        parsed[key] = value
    return parsed


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint (Hub id or local folder) to continue training from. Leave unset to train from scratch."},
    )
    model_type: str = field(default="gpt2", metadata={"help": "Architecture to build from scratch."})
    config_name: str | None = field(
        default=None, metadata={"help": "Config (Hub id or local folder) to build from scratch, instead of --model_type's default."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Shape of a from-scratch model, e.g. 'n_embd=128,n_layer=4,n_head=4,n_positions=256'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer (Hub id or local folder). Unset: the checkpoint's, or a byte-level BPE trained on the training documents."},
    )
    tokenizer_vocab_size: int = field(
        default=8192, metadata={"help": "Vocabulary size of the BPE tokenizer trained when no tokenizer is given."}
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={"help": "Attention kernel: 'sdpa' (torch's scaled_dot_product_attention, which picks a flash or memory-efficient "
                  "kernel on a GPU), 'eager' (transformers' matmul-softmax-matmul), or 'flash_attention_2' (the flash-attn package, "
                  "CUDA only)."},
    )

    def __post_init__(self):
        check_attention_implementation(self.attn_implementation)
        require(self.tokenizer_vocab_size >= 257, "tokenizer_vocab_size", self.tokenizer_vocab_size,
                "a byte-level BPE needs at least 257 tokens (256 bytes + EOS)")
        overrides = parse_overrides(self.config_overrides)
        if self.model_name_or_path and overrides:
            raise UsageError("--config_overrides shapes a model built from scratch; drop it or drop --model_name_or_path")
        if "vocab_size" in overrides:
            try:
                vocab = int(overrides["vocab_size"])
            except ValueError:
                raise UsageError(f"--config_overrides vocab_size={overrides['vocab_size']}: give a whole number of embedding rows") from None
            require(vocab >= 1, "config_overrides", f"vocab_size={vocab}", "must be a positive number of embedding rows")
        if "vocab_size" in overrides and not self.tokenizer_name:
            require(vocab >= self.tokenizer_vocab_size, "config_overrides", f"vocab_size={overrides['vocab_size']}",
                    f"smaller than the {self.tokenizer_vocab_size:,}-token BPE this run trains (--tokenizer_vocab_size); "
                    "give at least that many rows, or a smaller --tokenizer_vocab_size")


@dataclass
class DataSourceArguments:
    """Where the training data comes from: the flags, and their checks, that every training script shares."""

    # Kinds of local files the script reads (clmlab.data.FILE_FORMATS), and what to say to someone who gave another.
    FILE_KINDS = ("text", "json", "parquet")
    FILE_HINT = "use .txt, .json, .jsonl or .parquet"
    # Whether 0% held out (no validation split) is allowed.
    ALLOWS_NO_VALIDATION = False

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id or local dataset folder. With neither this nor --train_files: the built-in Python documentation corpus."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "Training files or globs (.txt, .json, .jsonl, .parquet).", "nargs": "+"}
    )
    validation_files: list[str] | None = field(
        default=None,
        metadata={"help": "Validation files or globs. Unset: documents are split off the training data by hash.", "nargs": "+"},
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Share of documents, chosen by a hash of their text, held out for validation."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})

    def __post_init__(self):
        if self.dataset_name and self.train_files:
            raise UsageError("give either --dataset_name or --train_files, not both")
        if self.validation_files and not self.train_files:
            raise UsageError("--validation_files needs --train_files")
        share = self.validation_split_percentage
        require((0 <= share if self.ALLOWS_NO_VALIDATION else 0 < share) and share < 100, "validation_split_percentage", share,
                f"must be {'at least 0' if self.ALLOWS_NO_VALIDATION else 'above 0'} and below 100")
        require(self.preprocessing_num_workers is None or self.preprocessing_num_workers >= 1, "preprocessing_num_workers",
                self.preprocessing_num_workers, "must be 1 or more")
        for split, files in self.local_files().items():
            kind = data.file_format(files, f"--{split}_files")
            if kind not in self.FILE_KINDS:
                raise UsageError(f"--{split}_files {files[0]}: {self.FILE_HINT}")
            if all(os.path.getsize(path) == 0 for path in files):
                raise UsageError(f"--{split}_files {files[0]}{' ...' if len(files) > 1 else ''}: empty (0 bytes); give files that hold data")

    def local_files(self) -> dict[str, list[str]]:
        """{"train": files, "validation": files} of the globs given, expanded; every glob must match a file."""
        return {split: data.resolve_files(patterns, f"--{split}_files")
                for split, patterns in (("train", self.train_files), ("validation", self.validation_files)) if patterns}


@dataclass
class DataArguments(DataSourceArguments):
    text_column: str = field(default="text", metadata={"help": "Column holding the document text (json, parquet, Hub)."})
    document_separator: str = field(
        default="<|endoftext|>", metadata={"help": "In text files, a line holding only this ends a document (TinyStories' format)."}
    )
    text_documents: str = field(
        default="auto",
        metadata={
            "help": "How text files divide into documents: 'separator' lines, blank-line 'paragraph's, one per 'line', "
            "one per 'file'; 'auto' takes 'separator' where a file has separator lines and 'paragraph' otherwise.",
            "choices": list(TEXT_DOCUMENT_MODES),
        },
    )
    decode_errors: str = field(
        default="strict",
        metadata={"help": "Bytes of a text file that are not UTF-8: 'strict' refuses the file, naming the offset of the first; "
                  "'replace' reads them as U+FFFD and counts them in run_info.json.", "choices": ["strict", "replace"]},
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training block. Unset: the model's n_positions (at most 1024)."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on the first N validation blocks: the same blocks at every evaluation and in every run on the same data."},
    )
    streaming: bool = field(
        default=False, metadata={"help": "Read the training data as a stream (needs --max_steps or --max_train_tokens)."}
    )
    prepare_to: str | None = field(
        default=None,
        metadata={"help": "Prepare the data into this folder on first use (run_prepare.py's format; one process prepares, the "
                  "others wait) and train from it; later runs reuse it. Unset: a folder in the datasets cache, keyed by "
                  "source and tokenizer."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Documents in the streaming shuffle buffer."})
    tokenizer_train_documents: int = field(
        default=100_000, metadata={"help": "Train the BPE tokenizer on this many leading training documents."}
    )
    document_subset: str | None = field(
        default=None,
        metadata={"help": "Keep only the documents whose text hashes into bucket K of N ('K/N'): 0/2 and 1/2 are two disjoint "
                  "halves of one corpus, a null pair for a comparison (run_sweep.py --null_arm)."},
    )
    dataset_label: str | None = field(
        default=None,
        metadata={"help": "This dataset's name in comparisons, trackers and reports. Unset: from --dataset_name or --train_files."},
    )

    def __post_init__(self):
        super().__post_init__()
        for flag in ("block_size", "max_eval_samples"):
            value = getattr(self, flag)
            require(value is None or value >= 1, flag, value, "must be 1 or more")
        for flag in ("shuffle_buffer_size", "tokenizer_train_documents"):
            require(getattr(self, flag) >= 1, flag, getattr(self, flag), "must be 1 or more")
        if self.prepare_to and self.streaming:
            raise UsageError("--prepare_to prepares the data once and reads it in place; drop --streaming, or drop --prepare_to to stream")
        data.DocumentSubset.parse(self.document_subset)
        if self.document_subset and self.streaming:
            raise UsageError("--document_subset keeps a hash bucket of a prepared corpus; drop --streaming")
        if not self.document_separator.strip():
            raise UsageError("--document_separator is empty; give the text of the line that ends a document, e.g. '<|endoftext|>'")


@dataclass
class InTrainingEvalArguments:
    """What run_clm.py measures at every evaluation besides the loss on its own validation split."""

    eval_files: list[str] | None = field(
        default=None,
        metadata={"help": "Named evaluation sets, name=PATH (text, jsonl, or a prepared folder: its validation split); in YAML a "
                  "mapping. Each is logged as eval_<name>_loss and eval_<name>_bpb on its first --max_eval_samples blocks.",
                  "nargs": "+"},
    )
    benchmark: list[str] | None = field(
        default=None,
        metadata={"help": "Multiple-choice benchmarks scored at every evaluation, name=PATH (HellaSwag or CommonsenseQA/ARC "
                  "jsonl), or name:mc=PATH for the lettered-choices formulation (logged as <name>_mc); logged as eval_<name>_acc, _acc_norm, "
                  "_acc_centered, _gold_logprob, _gold_bpb, _gold_prob.", "nargs": "+"},
    )
    benchmark_limit: int | None = field(default=200, metadata={"help": "Score the first N examples of each benchmark (a fixed subset)."})
    sample_prompts: list[str] | None = field(
        default=None,
        metadata={"help": "Prompts continued at every evaluation (fixed seed and decoding), written to samples.jsonl.", "nargs": "+"},
    )
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per sample prompt."})
    sample_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature of the samples (top-k 50, seed 0)."})

    def __post_init__(self):
        from clmlab.eval_sets import parse_named

        self.named_eval_files = parse_named(self.eval_files, "eval_files")
        self.named_benchmarks = parse_named(self.benchmark, "benchmark")
        for name, path in {**self.named_eval_files, **self.named_benchmarks}.items():
            flag = "eval_files" if name in self.named_eval_files else "benchmark"
            if not os.path.exists(path):
                raise UsageError(f"--{flag} {name}={path}: no such file or folder")
        logged = set()
        for name in self.named_benchmarks:
            stem, _, formulation = name.partition(":")
            if (formulation or "rc") not in ("rc", "mc"):
                raise UsageError(f"--benchmark {name}=...: the formulation after ':' is rc (choices scored as text) or mc (letters)")
            metric_name = f"{stem}_mc" if formulation == "mc" else stem
            if metric_name in logged or metric_name in self.named_eval_files:
                raise UsageError(f"--benchmark {name}: its metrics (eval_{metric_name}_*) would clash with another's; rename it")
            logged.add(metric_name)
        require(self.benchmark_limit is None or self.benchmark_limit >= 1, "benchmark_limit", self.benchmark_limit, "must be 1 or more")
        require(self.sample_max_new_tokens >= 1, "sample_max_new_tokens", self.sample_max_new_tokens, "must be 1 or more")
        require(0 < self.sample_temperature < float("inf"), "sample_temperature", self.sample_temperature, "must be positive and finite")


@dataclass
class RunTrainingArguments(TrainingArguments):
    """What every clmlab training script adds to TrainingArguments: a resume policy, evaluation from the
    first step, token counting, and DDP that works on machines with no GPU."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete an output directory that holds a different run and start afresh."}
    )
    resume_from_checkpoint: str | None = field(
        default="auto",
        metadata={"help": "'auto': resume from the last complete checkpoint in --output_dir if any; 'no': never; or a checkpoint path."},
    )
    eval_strategy: str = field(default="steps", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."})
    eval_steps: float | None = field(default=200, metadata={"help": "Evaluate every N steps."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    # Typed `str` here: the parent's `str | bool` makes HfArgumentParser accept only booleans on the command line.
    include_num_input_tokens_seen: str = field(
        default="all",
        metadata={"help": "Count tokens seen; logged as num_input_tokens_seen.", "choices": ["all", "non_padding", "no"]},
    )
    eval_on_start: bool = field(default=True, metadata={"help": "Evaluate before the first step, so every curve shows where it began."})
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Sequences per optimizer step, whatever the number of processes: gradient accumulation is derived "
                  "from it, the world size and --per_device_train_batch_size, so 1 GPU and 8 GPUs train on the same batches."},
    )
    # GPT-2 uses every parameter at every step (LoRA adapters too): the search for unused ones would only cost
    # an extra walk over the autograd graph each step, and DDP warns about it.
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP: look for parameters a step did not use."})
    # The GPU fast path, on by default where it is safe; unset means "decide for this machine" (resolve_defaults).
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision (autocast; fp32 weights and optimizer). Unset: on where the GPU has native bf16 (Ampere on), "
                  "unless --fp16 is given or an accelerate launch sets the precision; off on CPU (faster there only on CPUs "
                  "with bf16 matrix units, e.g. AMX: --bf16 true)."},
    )
    tf32: bool | None = field(
        default=None,
        metadata={"help": "TF32 tensor cores for float32 matmuls (Ampere GPUs and later). Unset: on where the GPU has them."},
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes loading batches. Unset: 2 on a GPU (0 for a streamed dataset, whose order would depend "
                  "on the number of workers), 0 on CPU, where workers compete with training for the cores."},
    )

    @property
    def shards_the_model(self) -> bool:
        """FSDP or DeepSpeed, asked for by a flag or by an accelerate config (which says so only in the
        environment it launches the script in)."""
        launched = any(os.environ.get(name, "").lower() in ("true", "1") for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))
        return bool(self.fsdp or self.deepspeed) or launched

    def __post_init__(self):
        self.resolve_defaults()
        self.check_ranges()
        import importlib.util

        import torch

        asked = self.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1")
        if asked and importlib.util.find_spec("deepspeed") is None:  # else TrainingArguments fails deep in a version check
            raise UsageError("DeepSpeed was asked for (--deepspeed or an accelerate config) and is not installed: "
                             "pip install -e '.[deepspeed]', or launch with configs/accelerate/ddp_bf16.yaml or fsdp2.yaml")

        if not torch.cuda.is_available():
            if self.dataloader_pin_memory:
                logger.debug("no GPU: dataloader_pin_memory off (pinning needs an accelerator; on CPU it only warns)")
                self.dataloader_pin_memory = False
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu:
                # Launched with several ranks on a machine with no GPU: without use_cpu the Trainer quietly
                # runs each rank as a separate single-process run instead of DDP over gloo.
                logger.info("several ranks and no GPU: use_cpu on, for DDP over gloo")
                self.use_cpu = True
        super().__post_init__()

    def resolve_defaults(self) -> None:
        """The fast path's unset flags, decided for this machine before anything acts on them; the resolved
        arguments (run_args.json) then record what ran."""
        import torch

        gpu = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 is None:
            # An accelerate launch puts its config's precision ('no' without one) in ACCELERATE_MIXED_PRECISION, which
            # TrainingArguments reads unless --bf16 or --fp16 overrides it: the launcher's choice stands.
            # Native bf16 only (Ampere on): torch would emulate it on a V100, slower than float32 there.
            self.bf16 = (gpu and not self.fp16 and "ACCELERATE_MIXED_PRECISION" not in os.environ
                         and torch.cuda.is_bf16_supported(including_emulation=False))
            if self.bf16:
                logger.info("bf16 mixed precision on (this GPU supports it; --bf16 false turns it off)")
        elif self.bf16 and not self.use_cpu:
            if not torch.cuda.is_available():  # TrainingArguments refuses bf16 here unless told to train on the CPU
                logger.info("--bf16 with no GPU: bf16 autocast on the CPU (use_cpu on)")
                self.use_cpu = True
            elif not torch.cuda.is_bf16_supported():  # never quietly move a GPU machine's run to its CPU
                raise UsageError(f"--bf16 true: this GPU ({torch.cuda.get_device_name()}) does not support bf16; "
                                 "use --fp16 true, or --bf16 false for float32")
        if self.tf32 is None and gpu and torch.cuda.get_device_capability()[0] >= 8:
            self.tf32 = True  # TrainingArguments then sets torch.backends.fp32_precision = "tf32"
        self.default_dataloader_workers = self.dataloader_num_workers is None
        if self.default_dataloader_workers:
            self.dataloader_num_workers = DEFAULT_GPU_DATALOADER_WORKERS if gpu else 0

    def check_ranges(self) -> None:
        """Every training flag that has a range, checked before TrainingArguments acts on any of them."""
        for flag in ("learning_rate", "num_train_epochs", "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "max_grad_norm", "label_smoothing_factor"):
            require(math.isfinite(getattr(self, flag)), flag, getattr(self, flag), "must be a finite number")
        require(0 <= self.label_smoothing_factor < 1, "label_smoothing_factor", self.label_smoothing_factor, "must be at least 0 and below 1")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be positive (e.g. 6e-4)")
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, flag) >= 1, flag, getattr(self, flag), "must be 1 or more")
        require(self.max_steps == -1 or self.max_steps >= 1, "max_steps", self.max_steps, "must be 1 or more (or -1: count by epochs)")
        require(self.num_train_epochs > 0, "num_train_epochs", self.num_train_epochs, "must be positive")
        require(self.warmup_steps >= 0 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()), "warmup_steps",
                self.warmup_steps, "must be a whole number of steps, or a fraction of the run below 1")
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be 0 or more")
        for flag in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, flag) < 1, flag, getattr(self, flag), "must be at least 0 and below 1")
        require(self.adam_epsilon > 0, "adam_epsilon", self.adam_epsilon, "must be positive")
        require(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "must be 0 (no clipping) or more")
        for flag in ("logging_steps", "save_steps", "eval_steps"):
            value = getattr(self, flag)
            require(value is None or value > 0, flag, value, "must be positive (a fraction below 1 is a share of the run)")
        require(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit", self.save_total_limit, "must be 1 or more")
        require(self.seed >= 0, "seed", self.seed, "must be 0 or more")
        if getattr(self, "enable_jit_checkpoint", False):
            raise UsageError("--enable_jit_checkpoint is the Trainer's own SIGTERM checkpoint, which lets each process stop at a step "
                             "of its own; clmlab already stops on SIGTERM and SIGUSR1 after a step every process agrees on, with a "
                             "checkpoint: drop the flag")
        require(self.dataloader_num_workers >= 0, "dataloader_num_workers", self.dataloader_num_workers, "must be 0 or more")
        require(self.global_batch_size is None or self.global_batch_size >= 1, "global_batch_size", self.global_batch_size, "must be 1 or more")
        if self.global_batch_size and self.gradient_accumulation_steps != 1:
            raise UsageError("give --global_batch_size or --gradient_accumulation_steps, not both: accumulation is derived from the global batch")


@dataclass
class ClmTrainingArguments(RunTrainingArguments):
    """TrainingArguments with defaults for language-model pretraining, plus a token budget."""

    output_dir: str | None = field(default="runs/clm", metadata={"help": "Where checkpoints, the model, plots and run_info.json go."})
    max_train_tokens: int | None = field(
        default=None,
        metadata={"help": "Token budget, turned into --max_steps from block size x batch x accumulation x world size."},
    )
    learning_rate: float = field(default=6e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of the run below 1."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    fused_cross_entropy: bool = field(
        default=False,
        metadata={"help": "Compute the training loss from the last hidden states and the output layer in chunks (liger-kernel's "
                  "fused linear cross-entropy; CUDA GPU), never holding the batch x sequence x vocabulary logits."},
    )
    peak_tflops: float | None = field(
        default=None,
        metadata={"help": "Peak dense TFLOP/s of one device for the logged MFU. Unset: clmlab's table for the GPU and the compute "
                  "dtype; no MFU where the peak is unknown (CPUs)."},
    )
    comparison: str | None = field(
        default=None, metadata={"help": "The comparison this run belongs to: the tracker's group, and the report's title."}
    )
    run_tags: list[str] | None = field(default=None, metadata={"help": "Tags for the tracker (wandb).", "nargs": "+"})
    tracker_project: str = field(default="clmlab", metadata={"help": "The tracker's project (wandb; WANDB_PROJECT wins if set)."})
    # Not --optim muon: TrainingArguments turns --optim into its OptimizerNames enum, and --optim still names the
    # AdamW that trains the other parameters.
    matrix_optimizer: str = field(
        default="adamw",
        metadata={"help": "Optimizer of the transformer blocks' weight matrices: 'adamw' (--optim trains every parameter) or 'muon' "
                  "(torch.optim.Muon; --optim's AdamW trains the embeddings, output layer, biases and norms).", "choices": ["adamw", "muon"]},
    )
    muon_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Muon's peak learning rate, on the same schedule as --learning_rate. Unset: --learning_rate (with the "
                  "default --muon_lr_adjustment, Muon's update has the size of AdamW's, so AdamW's rate carries over)."},
    )
    muon_momentum: float | None = field(default=None, metadata={"help": "Muon's momentum. Unset: 0.95."})
    muon_nesterov: bool | None = field(default=None, metadata={"help": "Nesterov momentum in Muon. Unset: true."})
    muon_weight_decay: float | None = field(
        default=None, metadata={"help": "Muon's decoupled weight decay (each step shrinks the matrices by lr x decay). Unset: --weight_decay."}
    )
    muon_lr_adjustment: str | None = field(
        default=None,
        metadata={"help": "How Muon scales its update by each matrix's shape: 'match_rms_adamw' (unset; Moonshot's 0.2 x sqrt(max(out, in)), "
                  "AdamW's update size) or 'original' (Keller Jordan's sqrt(max(1, out / in)); wants --muon_learning_rate about 0.02).",
                  "choices": ["match_rms_adamw", "original"]},
    )

    def check_ranges(self) -> None:
        super().check_ranges()
        if self.max_train_tokens is not None:
            require(self.max_train_tokens >= 1, "max_train_tokens", self.max_train_tokens, "must be a positive number of tokens")
            if self.max_steps > 0:
                raise UsageError("give --max_steps or --max_train_tokens, not both")
        require(self.peak_tflops is None or (math.isfinite(self.peak_tflops) and self.peak_tflops > 0), "peak_tflops",
                self.peak_tflops, "must be a positive number of TFLOP/s")
        if self.fused_cross_entropy:
            check_fused_cross_entropy()
            if self.label_smoothing_factor:
                raise UsageError("--fused_cross_entropy computes the plain loss inside the model, and --label_smoothing_factor has the "
                                 "Trainer compute its own from the logits: drop one of them")
        self.check_matrix_optimizer()

    def check_matrix_optimizer(self) -> None:
        if self.matrix_optimizer != "muon":
            given = [flag for flag in MUON_FLAGS if getattr(self, flag) is not None]
            if given:
                raise UsageError(f"--{given[0]} is a setting of Muon: add --matrix_optimizer muon, or drop it")
            return
        import torch

        if not hasattr(torch.optim, "Muon"):
            raise UsageError(f"--matrix_optimizer muon needs torch.optim.Muon, which torch {torch.__version__} lacks: install a torch that has it")
        optim = getattr(self.optim, "value", self.optim)
        if optim not in ADAMW_OPTIMS:
            raise UsageError(f"--matrix_optimizer muon gives the parameters beside Muon's to AdamW, and --optim {optim} is not AdamW: "
                             f"give --optim {' or '.join(ADAMW_OPTIMS)}")
        if self.shards_the_model:
            raise UsageError("--matrix_optimizer muon orthogonalises each weight matrix whole, and FSDP and DeepSpeed split them between "
                             "processes: train with DDP (e.g. configs/accelerate/ddp_bf16.yaml), or with --matrix_optimizer adamw")
        lr, momentum, decay = self.muon_learning_rate, self.muon_momentum, self.muon_weight_decay
        require(lr is None or (math.isfinite(lr) and lr > 0), "muon_learning_rate", lr, "must be positive and finite")
        require(momentum is None or 0 <= momentum < 1, "muon_momentum", momentum, "must be at least 0 and below 1")
        require(decay is None or (math.isfinite(decay) and decay >= 0), "muon_weight_decay", decay, "must be 0 or more, and finite")
        if self.muon_lr_adjustment == "original" and lr is None:
            raise UsageError("--muon_lr_adjustment original wants a learning rate far above AdamW's: give --muon_learning_rate "
                             "(about 0.02 in Keller Jordan's runs)")




@dataclass
class SftModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "Model to tune: a run_clm.py output directory, any checkpoint folder, or a Hub causal LM."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 tunes every weight. The adapter is merged into the saved model."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="c_attn,c_proj,c_fc", metadata={"help": "Comma-separated module names LoRA adapts (GPT-2's attention and MLP)."}
    )

    def __post_init__(self):
        require(self.lora_r >= 0, "lora_r", self.lora_r, "must be 0 (no LoRA) or more")
        require(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "must be positive")
        require(0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout, "must be at least 0 and below 1")
        if self.lora_r and not any(m.strip() for m in self.lora_target_modules.split(",")):
            raise UsageError("--lora_target_modules is empty; name the modules LoRA adapts, e.g. c_attn,c_proj,c_fc")


@dataclass
class SftDataArguments(DataSourceArguments):
    FILE_KINDS = ("json", "parquet")
    FILE_HINT = "instruction data is records; give .json, .jsonl or .parquet files"
    ALLOWS_NO_VALIDATION = True

    format: str = field(
        default="alpaca",
        metadata={"help": "Layout of the examples and the prompt template they are trained in.", "choices": list(FORMATS)},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id or local dataset folder."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Training records (.json, .jsonl, .parquet).", "nargs": "+"})
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Validation records. Unset: examples are split off the training data by a hash of their prompt.", "nargs": "+"}
    )
    validation_split_percentage: float = field(default=5.0, metadata={"help": "Share of examples held out for validation (0: none)."})
    field_names: str | None = field(
        default=None,
        metadata={"help": "Columns under other names, e.g. 'instruction=task,output=answer'; the keys are the format's fields."},
    )
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt column for --format chat and prompt_completion."})
    completion_column: str | None = field(default=None, metadata={"help": "Completion column for --format chat and prompt_completion."})
    max_length: int | None = field(
        default=None, metadata={"help": "Tokens per example, at most the model's context (the default); longer examples are cut."}
    )
    train_on_prompt: bool = field(default=False, metadata={"help": "Train on prompt tokens too, not only on responses."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N validation examples."})
    num_samples: int = field(default=4, metadata={"help": "Held-out prompts answered before and after tuning (samples.jsonl)."})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "Length of those answers (greedy)."})

    def __post_init__(self):
        if not (self.dataset_name or self.train_files):
            raise UsageError("give the instruction data with --train_files (json, jsonl, parquet) or --dataset_name, one of the two")
        super().__post_init__()
        for flag in ("max_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, flag)
            require(value is None or value >= 1, flag, value, "must be 1 or more")
        require(self.num_samples >= 0, "num_samples", self.num_samples, "must be 0 or more")
        require(self.sample_max_new_tokens >= 1, "sample_max_new_tokens", self.sample_max_new_tokens, "must be 1 or more")


@dataclass
class SftTrainingArguments(RunTrainingArguments):
    """TrainingArguments with defaults for instruction tuning a pretrained model."""

    output_dir: str | None = field(default="runs/sft", metadata={"help": "Where checkpoints, the model, samples and run_info.json go."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the training examples."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Examples per batch and device."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (LoRA usually wants about 2e-4)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps, or a fraction of the run below 1."})
    eval_steps: float | None = field(default=50, metadata={"help": "Evaluate every N steps."})
    include_num_input_tokens_seen: str = field(
        default="non_padding",
        metadata={"help": "Count tokens seen; logged as num_input_tokens_seen.", "choices": ["all", "non_padding", "no"]},
    )
