"""curves.png: a file from a run's records, the learning-rate / gradient-norm panel, and records of older runs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from slope.train.plots import curves_figure, plot_curves


def history(with_grad_norm: bool = True) -> list[dict]:
    records = []
    for step in range(10, 210, 10):
        record = {"kind": "train", "step": step, "loss": 8.0 - step / 50, "lr": 3e-3 * min(1.0, step / 20),
                  "tokens": step * 2048, "tokens_per_s": 2000.0}
        if with_grad_norm:
            record.update(grad_norm=2.0 - step / 200, clipped=int(step < 100))
        records.append(record)
        if step % 50 == 0:
            records.append({"kind": "eval", "set": "val", "step": step, "loss": 8.2 - step / 50, "ppl": 1.0})
    records.append({"kind": "event", "step": 198, "params": 1000})
    records.append({"kind": "eval", "set": "milton", "step": 200, "loss": 9.0})  # not on the validation curve
    return records


def _lines(ax) -> dict[str, list]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


def test_plot_writes_a_png(tmp_path):
    path = plot_curves(history(), tmp_path / "curves.png", adapter_step=198, title="run (slope)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_right_panel_is_learning_rate_and_grad_norm_on_twin_axes():
    fig = curves_figure(history(), adapter_step=198)
    ax_loss, ax_lr, ax_norm = fig.axes
    loss = _lines(ax_loss)
    assert len(loss["train"]) == 20 and loss["validation"] == pytest.approx([8.2 - s / 50 for s in (50, 100, 150, 200)])
    assert ax_lr.get_ylabel() == "learning rate" and ax_norm.get_ylabel() == "gradient norm"
    assert _lines(ax_lr)["learning rate"][:3] == pytest.approx([1.5e-3, 3e-3, 3e-3])
    assert _lines(ax_norm)["gradient norm (before clipping)"][0] == pytest.approx(1.95)
    for ax in (ax_loss, ax_lr):  # the adapter start is marked on both panels
        marker = next(line for line in ax.get_lines() if line.get_label() == "adapters added")
        assert list(marker.get_xdata()) == [198, 198]
    assert {t.get_text() for t in ax_lr.get_legend().get_texts()} == {
        "learning rate", "gradient norm (before clipping)", "adapters added"}
    plt.close(fig)


def test_records_of_an_older_run_without_grad_norm(tmp_path):
    fig = curves_figure(history(with_grad_norm=False), adapter_step=None)
    assert len(fig.axes) == 2  # no twin axis without gradient norms
    assert "learning rate" in _lines(fig.axes[1]) and "adapters added" not in _lines(fig.axes[0])
    plt.close(fig)
    # nothing but losses (or nothing at all): still a file
    plot_curves([{"kind": "train", "step": 1, "loss": 5.0}], tmp_path / "a.png", None)
    plot_curves([], tmp_path / "b.png", None)
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0
