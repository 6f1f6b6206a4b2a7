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

    def __post_init__(self):
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                # Launched with several ranks on a machine with no GPU: without use_cpu the Trainer quietly
                # runs each rank as a separate single-process run instead of DDP over gloo.
                self.use_cpu = True
        super().__post_init__()


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


SFT_FORMATS = ("alpaca", "chat", "messages", "prompt_completion", "qa", "multiple_choice")


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


@dataclass
class SftDataArguments:
    format: str = field(
        default="alpaca",
        metadata={"help": "Layout of the examples and the prompt template they are trained in.", "choices": list(SFT_FORMATS)},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id or local dataset folder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_files: list[str] | None = field(default=None, metadata={"help": "Training records (.json, .jsonl, .parquet).", "nargs": "+"})
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "Validation records. Unset: examples are split off the training data by a hash of their prompt.", "nargs": "+"}
    )
    validation_split_percentage: float = field(default=5.0, metadata={"help": "Share of examples held out for validation."})
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
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


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
