"""Instruction tuning: records -> chat messages -> segments, each trained or not -> tokens and labels; the
collator, and the model around them.

Each segment is tokenized on its own and the pieces are concatenated, so the tokens with label -100 are
exactly the prompt's: nothing searches for a response marker that could tokenize differently in context.
The layout of the segments is a prompt template (clmlab.templates), saved with the tokenizer as its chat
template, so the tuned model is prompted at inference exactly as it was trained.

    formats   the record formats (--format) as chat messages, their fields mapped to columns; reading records
    encoding  segments -> token ids and labels, the per-split counts, the datasets training reads
    training  the collator and the eval loss over response tokens; tokenizer, model, LoRA, saving
formats and encoding are data code: they import nothing of the model, the Trainer or peft, and training builds
on them, never the other way round. Every public name is here too, as clmlab.sft.NAME.
"""

from __future__ import annotations

from clmlab.sft.encoding import (
    IGNORE_INDEX,
    MODEL_COLUMNS,
    SftData,
    SftEncoder,
    build_sft_datasets,
    encode_segments,
    split_stats,
)
from clmlab.sft.formats import (
    FORMATS,
    ROLES,
    BadExample,
    ExampleFormat,
    column_names,
    load_records,
)
# The training pieces load on first use, so that importing the data modules (formats, encoding) does not
# bring in the Trainer, torch's modules or peft.
_TRAINING_NAMES = {"SAMPLES_FILE", "PadToLongestCollator", "ResponseTokenTrainer", "add_lora", "check_max_length",
                   "load_model", "prepare_tokenizer", "save_tuned_model"}


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from clmlab.sft import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadExample", "ExampleFormat", "FORMATS", "IGNORE_INDEX", "MODEL_COLUMNS", "PadToLongestCollator", "ROLES",
    "ResponseTokenTrainer", "SAMPLES_FILE", "SftData", "SftEncoder", "add_lora", "build_sft_datasets",
    "check_max_length", "column_names", "encode_segments", "load_model", "load_records",
    "prepare_tokenizer", "save_tuned_model", "split_stats",
]
