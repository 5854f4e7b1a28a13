"""The loss / perplexity curves PNG written at the end of a run."""

from __future__ import annotations

import math
from pathlib import Path


def plot_curves(history: list[dict], path: Path, adapter_step: int | None, title: str = "") -> Path:
    """Train and validation loss (left) and perplexity (right) against steps, adapter start marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("kind") == "train"]
    val = [(r["step"], r["loss"]) for r in history if r.get("kind") == "eval" and r.get("set") == "val"]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            steps, losses = zip(*points, strict=True)
            ax_loss.plot(steps, losses, style, label=label)
            ax_ppl.plot(steps, [math.exp(min(v, 50.0)) for v in losses], style, label=label)
    for ax, ylabel in ((ax_loss, "loss (nats/token)"), (ax_ppl, "perplexity")):
        if adapter_step is not None:
            ax.axvline(adapter_step, color="grey", linestyle="--", label="adapters added")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_ppl.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
