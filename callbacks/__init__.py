"""TrainerCallbacks shared by the clmlab scripts."""

from callbacks.benchmarks import BenchmarkCallback
from callbacks.checkpoints import CompleteCheckpointsCallback
from callbacks.eval_sets import EvalSetsCallback
from callbacks.loss_plot import LossPlotCallback
from callbacks.perplexity import PerplexityCallback
from callbacks.preemption import PreemptionCallback
from callbacks.samples import PretrainingSamplesCallback, SamplesCallback
from callbacks.throughput import ThroughputCallback

__all__ = ["BenchmarkCallback", "CompleteCheckpointsCallback", "EvalSetsCallback", "LossPlotCallback", "PerplexityCallback",
           "PreemptionCallback", "PretrainingSamplesCallback", "SamplesCallback", "ThroughputCallback", "add_log_callbacks"]


def add_log_callbacks(trainer, *log_callbacks) -> None:
    """Put callbacks that add values to the logs first in line.

    Trainer runs callbacks in order and its reporters (progress bar, console, wandb) come first by default;
    placed ahead of them, the values these callbacks add are printed and reported like the Trainer's own.
    """
    for callback in reversed(log_callbacks):
        trainer.callback_handler.callbacks.insert(0, callback)
