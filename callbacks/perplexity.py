from __future__ import annotations

import math

from transformers import TrainerCallback


class PerplexityCallback(TrainerCallback):
    """Adds `eval_perplexity` = exp(eval_loss) beside every evaluation's loss."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "eval_loss" not in logs:
            return
        logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))  # capped: exp overflows past ~709
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1]["eval_perplexity"] = logs["eval_perplexity"]
