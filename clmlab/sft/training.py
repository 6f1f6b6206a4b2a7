"""The training side of instruction tuning: batches and the eval loss over response tokens; the tokenizer
and the model set up for a prompt template, LoRA, and the tuned model saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Trainer, set_seed

from clmlab.cli import UsageError, first_line
from clmlab.modeling import context_length, set_loss_type
from clmlab.sft.encoding import IGNORE_INDEX
from clmlab.templates import PromptStyle

SAMPLES_FILE = "samples.jsonl"


# ----------------------------------------------------------------------------------------- batches and eval loss


@dataclass
class PadToLongestCollator:
    """Pads a batch to its longest example, on the right, and masks padding by position.

    Written here rather than taken from transformers: its language-modeling collator sets labels to -100
    wherever the id equals the pad id, which erases every trained EOS when pad == EOS (GPT-2's usual setup),
    so the model never learns to stop.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.as_tensor(feature["labels"])
        if not (labels != IGNORE_INDEX).any():
            raise ValueError("a batch with no trained token: its loss would be NaN")
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class ResponseTokenTrainer(Trainer):
    """A Trainer whose eval_loss is the mean loss over every trained token of the eval set.

    Written here because the Trainer's own eval_loss is the mean over examples of their batch's per-token
    mean: with examples of different lengths it moves with the eval batch size and the number of processes,
    so two runs evaluated differently could not be compared. Per-example sums and counts go through the
    Trainer's own loop, which gathers them across processes and drops the examples repeated to even out
    the last batch.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)
        sums, counts = nll.sum(1, keepdim=True), (labels != IGNORE_INDEX).sum(1, keepdim=True).float()
        return sums.sum() / counts.sum(), sums, counts

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, False, ignore_keys, metric_key_prefix)
        if output.predictions is not None and output.label_ids is not None:
            total = float(np.sum(output.label_ids, dtype=np.float64))
            output.metrics[f"{metric_key_prefix}_loss"] = float(np.sum(output.predictions, dtype=np.float64)) / total
        return output



# ----------------------------------------------------------------------------------------- model and tokenizer


def prepare_tokenizer(tokenizer, style: PromptStyle) -> list[int]:
    """Add the style's special tokens, set its chat template and a pad token; the ids of the added tokens."""
    if style.special_tokens:
        missing = [t for t in style.special_tokens if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token_id is None:
        # Batches need some pad id; padding is masked by position (PadToLongestCollator), so pad == EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = style.template
    # transformers warns on every decode of a BPE tokenizer saved with this on, and would strip spaces before
    # punctuation in the samples if it obeyed it.
    tokenizer.clean_up_tokenization_spaces = False
    return [tokenizer.convert_tokens_to_ids(t) for t in style.special_tokens]


def load_model(model_dir: str, tokenizer, style: PromptStyle, seed: int):
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as error:  # offline, not found, not a causal LM
        raise UsageError(f"could not load a causal LM from {model_dir!r}: {first_line(error)}") from None
    set_loss_type(model)  # as in pretraining: no graph break under --torch_compile, the loss averaged over predicted tokens
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        set_seed(seed)  # new rows are drawn around the mean of the old ones: seeded, so runs repeat
        model.resize_token_embeddings(len(tokenizer))
    end_ids = [tokenizer.convert_tokens_to_ids(style.end_token(tokenizer))]
    # pipeline() and generate() stop at the end of the answer, whichever end token the template uses.
    model.generation_config.eos_token_id = list(dict.fromkeys(end_ids + [tokenizer.eos_token_id]))
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def check_max_length(max_length: int | None, config) -> int:
    context = context_length(config) or 1024
    if max_length is None:
        return context
    if not 0 < max_length <= context:
        raise UsageError(f"--max_length {max_length}: must be between 1 and the model's context of {context} tokens")
    return max_length


def add_lora(model, model_args, new_token_ids: Sequence[int]):
    """LoRA on GPT-2's Conv1D projections (weights stored transposed: fan_in_fan_out). Tokens the template
    added are trained too: their embedding rows start untrained and LoRA alone would leave them so."""
    from peft import LoraConfig, get_peft_model

    targets = [m.strip() for m in model_args.lora_target_modules.split(",") if m.strip()]
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=targets, fan_in_fan_out=model.config.model_type == "gpt2", task_type="CAUSAL_LM",
                        trainable_token_indices=list(new_token_ids) or None)
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(f"--lora_target_modules {model_args.lora_target_modules}: {first_line(error)}") from None


def save_tuned_model(trainer, output_dir: str) -> None:
    """A plain Hugging Face folder either way: a LoRA adapter is merged into the weights first."""
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        if trainer.is_world_process_zero():
            model.merge_and_unload().save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
