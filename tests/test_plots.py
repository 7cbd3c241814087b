"""The report's coefficient plot: coefficients against the training step, one panel per checkpoint
kind, at one size whatever the window (the bar chart it replaces was 5632 px wide at 80 checkpoints)."""
from __future__ import annotations

import pytest

from lcsc_ops.pipeline.plots import plot_coefficients


def _window(steps: int) -> tuple[list[str], dict[str, list[float]]]:
    labels = [f"raw@{50 * (i + 1)}" for i in range(steps)] + [f"ema@{50 * (i + 1)}" for i in range(steps)]
    merge = [0.5 / steps] * steps + [0.0] * (steps - 1) + [0.5]
    ema = [0.0] * (2 * steps - 1) + [1.0]
    return labels, {"lcsc_top1 (LCSC)": merge, "training_ema (strongest baseline)": ema}


@pytest.mark.parametrize("steps", [3, 40, 400])
def test_the_coefficient_plot_keeps_its_size_for_any_window(tmp_path, steps):
    from PIL import Image

    labels, series = _window(steps)
    path = plot_coefficients(labels, series, tmp_path / "c.png", title="t")
    assert Image.open(path).size == (990, 726)  # two panels; fits a laptop screen and MLflow's artifact view


def test_coefficients_are_drawn_against_the_step_raw_and_ema_apart(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figure to look at it
    labels, series = _window(4)
    labels[0], labels[1] = labels[1], labels[0]  # the window's order need not be the steps'
    series = {name: [values[1], values[0], *values[2:]] for name, values in series.items()}
    plot_coefficients(labels, series, tmp_path / "c.png", title="t")
    fig = plt.gcf()
    raw, ema = fig.axes
    assert "raw" in raw.get_ylabel() and "EMA" in ema.get_ylabel()
    merge_raw = raw.get_lines()[0]
    assert list(merge_raw.get_xdata()) == [50, 100, 150, 200]
    assert list(merge_raw.get_ydata()) == [0.125] * 4
    merge_ema, baseline_ema = ema.get_lines()[:2]
    assert list(baseline_ema.get_ydata()) == [0.0, 0.0, 0.0, 1.0]
    assert merge_ema.get_label() == "lcsc_top1 (LCSC)"
    monkeypatch.undo()
    plt.close(fig)
