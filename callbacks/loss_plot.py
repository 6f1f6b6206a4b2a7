from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

PLOT_FILE = "loss.png"


def plot_losses(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    """Train and eval loss against tokens seen (steps where tokens were not counted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    def series(key):
        points = [e for e in log_history if key in e]
        x_key = "num_input_tokens_seen" if all("num_input_tokens_seen" in e for e in points) else "step"
        return [e[x_key] for e in points], [e[key] for e in points], x_key

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        xs, ys, x_key = series(key)
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=4)
    ax.set_xlabel("tokens seen" if x_key == "num_input_tokens_seen" else "step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


class LossPlotCallback(TrainerCallback):
    """Redraws loss.png in the output directory after every evaluation and at the end of training, so a
    plot of a run in progress is always at hand. Not before the first step: a run writes nothing to its
    output directory until it has trained a step (clmlab.run.TrainingRun)."""

    def __init__(self, title: str = ""):
        self.title = title

    def _draw(self, args, state):
        if state.is_world_process_zero and state.log_history and state.global_step > 0:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            plot_losses(state.log_history, Path(args.output_dir) / PLOT_FILE, self.title)

    def on_evaluate(self, args, state, control, **kwargs):
        self._draw(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)
