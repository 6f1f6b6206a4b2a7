from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from transformers import TrainerCallback

from clmlab.generation import DecodingSettings, generate
from clmlab.modeling import context_length


def read_samples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SamplesCallback(TrainerCallback):
    """Answers a few held-out prompts before training and again after it, into one JSONL file: a record per
    prompt with its reference answer, the answer before and the answer after (the before/after table).

    A resumed run keeps the answers written before its first step: they are the untrained model's. The
    file is written once the first step has ended (a run writes nothing to its output directory before),
    and the answers after are written only when training ran to its end, not when it was stopped early.
    """

    def __init__(self, path: str | Path, prompts: Sequence[str], references: Sequence[str], tokenizer,
                 settings: DecodingSettings, stop_token_id: int | None = None):
        self.path, self.prompts, self.references = Path(path), list(prompts), list(references)
        self.tokenizer, self.settings, self.stop_token_id = tokenizer, settings, stop_token_id

    def _answers(self, model) -> list[str]:
        # Shorter answers rather than prompts cut from the left: a prompt without its start is not the
        # prompt the model was trained on.
        longest = max(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.prompts)
        room = (context_length(model.config) or 1024) - longest
        settings = replace(self.settings, max_new_tokens=max(1, min(self.settings.max_new_tokens, room)))
        was_training = model.training
        model.eval()
        try:
            answers = generate(model, self.tokenizer, self.prompts, settings, stop_token_id=self.stop_token_id)
        finally:
            model.train(was_training)
        return [texts[0] for texts in answers]

    def _write(self, before: Sequence[str], after: Sequence[str | None]) -> None:
        records = [{"prompt": p, "reference": r, "before": b, "after": a}
                   for p, r, b, a in zip(self.prompts, self.references, before, after)]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        tmp.replace(self.path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not self.prompts:
            return
        saved = read_samples(self.path)
        if state.global_step > 0 and [s["prompt"] for s in saved] == self.prompts:
            self.before = [s["before"] for s in saved]
            return
        self.before = self._answers(model)
        self._unwritten = True

    def on_step_end(self, args, state, control, **kwargs):
        if getattr(self, "_unwritten", False):
            self._write(self.before, [None] * len(self.prompts))
            self._unwritten = False

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and self.prompts and state.global_step >= state.max_steps:
            self._write(self.before, self._answers(model))


class PretrainingSamplesCallback(TrainerCallback):
    """Continues fixed prompts at every evaluation, with a fixed seed and decoding, into samples.jsonl: one
    record per prompt per evaluation, {step, tokens_seen, prompt, text}; with wandb, also a table.

    The random-number state of training is saved before sampling and put back after it, so a run with
    samples trains exactly as one without. Records of an evaluation before the first step are held until that
    step ends (a run writes nothing to its output directory before); a resumed run keeps the records up to
    the step it resumed at and writes the rest again.
    """

    def __init__(self, path: str | Path, prompts: Sequence[str], tokenizer, settings: DecodingSettings):
        self.path, self.prompts, self.tokenizer, self.settings = Path(path), list(prompts), tokenizer, settings
        if tokenizer.pad_token_id is None:  # batched generation pads; a copy, so the tokenizer saved with the run stays as it is
            self.tokenizer = copy.deepcopy(tokenizer)
            self.tokenizer.pad_token = tokenizer.eos_token
        self.records: list[dict] | None = None  # read from samples.jsonl when first needed
        self._unwritten = False
        self._sampled_step: int | None = None

    def _load(self, state) -> None:
        if self.records is None:
            self.records = [r for r in read_samples(self.path) if r.get("step", 0) <= state.global_step] if state.global_step else []

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._load(state)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if not logs or "eval_loss" not in logs or not state.is_world_process_zero or state.global_step == self._sampled_step:
            return
        self._load(state)  # also where training did not run again (a run resumed at its last step)
        self._sampled_step = state.global_step
        self.records = [r for r in self.records if r["step"] != state.global_step]
        texts = self._continue(model)
        self.records += [{"step": state.global_step, "tokens_seen": state.num_input_tokens_seen, "prompt": p, "text": t}
                         for p, t in zip(self.prompts, texts)]
        self._unwritten = True
        if state.global_step > 0:
            self._write()
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=["step", "tokens_seen", "prompt", "text"],
                                    data=[[r["step"], r["tokens_seen"], r["prompt"], r["text"]] for r in self.records])
                wandb.log({"samples": table, "train/global_step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        # Runs after the lifecycle's own first-step callback (it is first in line): the run's folder is ready.
        if self._unwritten and state.global_step > 0:
            self._write()

    def _continue(self, model) -> list[str]:
        import random

        import numpy as np
        import torch

        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                 torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        was_training = model.training
        model.eval()
        try:
            longest = max(len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.prompts)
            room = (context_length(model.config) or 1024) - longest
            settings = replace(self.settings, max_new_tokens=max(1, min(self.settings.max_new_tokens, room)))
            return [texts[0] for texts in generate(model, self.tokenizer, self.prompts, settings)]
        finally:
            model.train(was_training)
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
            if saved[3] is not None:
                torch.cuda.set_rng_state_all(saved[3])

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
        tmp.replace(self.path)
        self._unwritten = False
