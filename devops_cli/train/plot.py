"""training_loss.png from the Trainer's log history (train loss, smoothed, and eval loss)."""

from __future__ import annotations

from pathlib import Path


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", label="train loss")
        smooth, ema, w = [], 0.0, 0.8
        for t, x in enumerate(losses, 1):  # debiased exponential moving average, as TensorBoard smooths
            ema = w * ema + (1 - w) * x
            smooth.append(ema / (1 - w**t))
        if len(losses) > 20:  # a short run reads better raw
            ax.plot(steps, smooth, color="#08519c", label="train loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="#e6550d", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training loss — {path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
