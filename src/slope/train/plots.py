"""The curves PNG written at the end of a run: the losses, and the optimizer's view of the same steps."""

from __future__ import annotations

from pathlib import Path


def _points(history: list[dict], key: str, kind: str = "train", set_name: str | None = None) -> list[tuple]:
    """(step, value) of every `kind` record holding a number under `key` (runs of older versions lack some keys)."""
    return [(r["step"], r[key]) for r in history
            if r.get("kind") == kind and (set_name is None or r.get("set") == set_name)
            and isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r]


def curves_figure(history: list[dict], adapter_step: int | None, title: str = ""):
    """The figure: train and validation loss (left); learning rate and gradient norm (right, twin axes).

    The right panel shows what the loss alone hides: the warm-up and decay the loss moved under, and
    whether the gradients were being clipped (points above the clip line) or spiking.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for points, label, style in ((_points(history, "loss"), "train", "-"),
                                 (_points(history, "loss", "eval", "val"), "validation", "o-")):
        if points:
            ax_loss.plot(*zip(*points, strict=True), style, label=label)
    ax_loss.set_ylabel("loss (nats/token)")

    lr, grad_norm = _points(history, "lr"), _points(history, "grad_norm")
    handles = []
    if lr:
        handles += ax_lr.plot(*zip(*lr, strict=True), "-", color="tab:green", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if grad_norm:  # absent from runs of versions that did not log it
        ax_norm = ax_lr.twinx()
        handles += ax_norm.plot(*zip(*grad_norm, strict=True), ".-", color="tab:purple", alpha=0.7,
                                label="gradient norm (before clipping)")
        ax_norm.set_ylabel("gradient norm")
    if not handles:
        ax_lr.text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=ax_lr.transAxes)

    for ax in (ax_loss, ax_lr):
        if adapter_step is not None:
            marker = ax.axvline(adapter_step, color="grey", linestyle="--", label="adapters added")
            if ax is ax_lr:
                handles.append(marker)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend()
    if handles:  # one legend for both y axes of the right panel
        ax_lr.legend(handles=handles, loc="upper right", fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], path: Path, adapter_step: int | None, title: str = "") -> Path:
    """Write `curves_figure` of the run's metrics records to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curves_figure(history, adapter_step, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
