from __future__ import annotations

from transformers import TrainerCallback

from callbacks.log_values import add_to_log
from clmlab.eval_sets import bits_per_byte


class EvalSetsCallback(TrainerCallback):
    """Adds bits per byte beside each evaluation set's loss, and the run's own validation split's figures under
    the Trainer's usual names (eval_loss, eval_bpb), so the final metrics, the plots and the summary read them
    whatever the split is named.

    `sets` is {name: clmlab.eval_sets.EvalSet identity}; `named` says whether the Trainer evaluates a dict of
    sets (metrics eval_<name>_loss) or the own split alone (eval_loss)."""

    def __init__(self, sets: dict[str, dict], own: str, named: bool):
        self.sets, self.own, self.named = sets, own, named

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
            if name == self.own:
                values.update(eval_loss=logs[loss_key], eval_bpb=bpb)
        if values:
            add_to_log(state, logs, values)
