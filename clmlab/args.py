"""The arguments of the training scripts, as dataclasses that HfArgumentParser turns into flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

TEXT_DOCUMENT_MODES = ("auto", "separator", "paragraph", "line", "file")


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


@dataclass
class DataArguments:
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
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Share of documents, chosen by a hash of their text, held out for validation."}
    )
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training block. Unset: the model's n_positions (at most 1024)."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on the first N validation blocks: the same blocks at every evaluation and in every run on the same data."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    streaming: bool = field(
        default=False, metadata={"help": "Read the training data as a stream (needs --max_steps or --max_train_tokens)."}
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Documents in the streaming shuffle buffer."})
    tokenizer_train_documents: int = field(
        default=100_000, metadata={"help": "With --streaming, train the BPE tokenizer on this many leading training documents."}
    )


@dataclass
class ClmTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for language-model pretraining, plus a token budget and resume policy."""

    output_dir: str | None = field(default="runs/clm", metadata={"help": "Where checkpoints, the model, plots and run_info.json go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete an output directory that holds a different run and start afresh."}
    )
    resume_from_checkpoint: str | None = field(
        default="auto",
        metadata={"help": "'auto': resume from the last complete checkpoint in --output_dir if any; 'no': never; or a checkpoint path."},
    )
    max_train_tokens: int | None = field(
        default=None,
        metadata={"help": "Token budget, turned into --max_steps from block size x batch x accumulation x world size."},
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
    learning_rate: float = field(default=6e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warmup steps, or a fraction of the run below 1."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})

    def __post_init__(self):
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Launched with several ranks on a machine with no GPU: without use_cpu the Trainer quietly
                # runs each rank as a separate single-process run instead of DDP over gloo.
                self.use_cpu = True
        super().__post_init__()
