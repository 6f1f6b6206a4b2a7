from __future__ import annotations

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
