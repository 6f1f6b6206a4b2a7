from __future__ import annotations

import torch
from transformers import TrainerCallback

from callbacks.log_values import add_to_log
from clmlab.eval_sets import OWN_VALIDATION, bits_per_byte


class EvalSetsCallback(TrainerCallback):
    """Adds bits per byte beside each evaluation set's loss, and the run's own validation split's figures under
    the Trainer's usual names (eval_loss, eval_bpb), so the final metrics, the plots and the summary read them
    whatever the split is named.

    `sets` is {name: clmlab.eval_sets.EvalSet identity}; `named` says whether the Trainer evaluates a dict of
    sets (metrics eval_<name>_loss) or the own split alone (eval_loss)."""

    def __init__(self, sets: dict[str, dict], own: str, named: bool):
        self.sets, self.own, self.named = sets, own, named
        self._training_rng: tuple | None = None

    # Building each evaluation dataloader draws a seed from torch's generator (the one CPU dropout uses), so
    # without this the number of evaluation sets and how often they run would change what a run trains. The
    # generators are put back as they were at the step's end after every evaluation.
    def on_train_begin(self, args, state, control, **kwargs):
        self._training_rng = _rng_state()

    def on_step_end(self, args, state, control, **kwargs):
        self._training_rng = _rng_state()

    def on_evaluate(self, args, state, control, **kwargs):
        if self._training_rng is not None:
            torch.set_rng_state(self._training_rng[0])
            if self._training_rng[1] is not None:
                torch.cuda.set_rng_state_all(self._training_rng[1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        values = {}
        for name, identity in self.sets.items():
            loss_key = f"eval_{name}_loss" if self.named else "eval_loss"
            if loss_key not in logs:
                continue
            bpb = bits_per_byte(logs[loss_key], identity["tokens_predicted"], identity["bytes"])
            if self.named:
                values[f"eval_{name}_bpb"] = bpb
            elif name != OWN_VALIDATION:  # the only set, named: reported under its name too, as in every other run
                values.update({f"eval_{name}_loss": logs[loss_key], f"eval_{name}_bpb": bpb})
            if name == self.own:
                values.update(eval_loss=logs[loss_key], eval_bpb=bpb)
        if values:
            add_to_log(state, logs, values)


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
