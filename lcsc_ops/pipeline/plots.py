"""The report's pictures: the search curve, the coefficients over training, the sample grid.

Each is drawn at a fixed size (about 1000 × 600 pixels) whatever the number of trials, checkpoints
or samples, so it reads on a laptop screen and in the MLflow UI's artifact view.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

DPI = 110
# Baselines as horizontal lines: no two share a colour and a line style; the trials and the best so
# far use neither of these colours.
LINE_STYLES = [("tab:blue", "--"), ("tab:green", ":"), ("tab:purple", "-."), ("tab:orange", (0, (5, 1, 1, 1))),
               ("tab:brown", (0, (1, 1))), ("tab:cyan", (0, (3, 1, 1, 1, 1, 1))), ("tab:olive", (0, (8, 2))),
               ("tab:pink", (0, (2, 2)))]
KIND_NAMES = {"raw": "raw checkpoints", "ema": "EMA snapshots"}
# One look per series of the coefficient plot, in the order given: the report passes the strongest
# baseline first (dashed), then the merge (solid, on top).
SERIES_STYLES = [dict(color="tab:blue", ls="--", marker="s"), dict(color="tab:red", ls="-", marker="o"),
                 dict(color="tab:green", ls=":", marker="^")]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_search_curve(trials: Sequence[tuple[int, float]], baselines: dict[str, float], path: Path, *,
                      metric: str, start: str | None = None) -> Path:
    """Every trial's score, the best so far, and each baseline as a labelled horizontal line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    trials = sorted((n, v) for n, v in trials if math.isfinite(v))
    fig, ax = plt.subplots(figsize=(9, 5))
    xs, ys = [n for n, _ in trials], [v for _, v in trials]
    ax.scatter(xs, ys, s=10, color="0.55", alpha=0.7, label="trial", zorder=2)
    if ys:
        best = [min(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, best, where="post", color="tab:red", lw=3, alpha=0.6, label=f"best so far ({best[-1]:.4g})",
                zorder=3)
    finite = {n: v for n, v in baselines.items() if v is not None and math.isfinite(v)}
    for i, (name, value) in enumerate(sorted(finite.items(), key=lambda kv: kv[1])):
        colour, style = LINE_STYLES[i % len(LINE_STYLES)]
        ax.axhline(value, color=colour, ls=style, lw=1.6, label=f"{name} ({value:.4g})", zorder=4)
    # The axis shows every baseline and 90% of the trials: a few wild trials must not flatten the rest.
    p90 = [sorted(ys)[int(0.9 * (len(ys) - 1))]] if ys else []
    top = max([*finite.values(), *p90], default=None)
    hidden = sum(v > top * 1.05 for v in ys) if top is not None and top > 0 else 0
    if hidden:
        ax.set_ylim(top=top * 1.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trials are whole numbers
    ax.set_xlabel("trial")
    ax.set_ylabel(f"search {metric}")
    ax.set_title(f"search: {len(ys)} scored trials" + (f", trial 0 = the start ({start})" if start else "")
                 + (f"; {hidden} above the top edge" if hidden else ""), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _by_kind(labels: Sequence[str]) -> dict[str, list[tuple[int, int]]]:
    """``kind@step`` labels grouped by kind, in order of first appearance: kind -> [(step, index)]."""
    kinds: dict[str, list[tuple[int, int]]] = {}
    for i, label in enumerate(labels):
        kind, _, step = label.rpartition("@")
        kinds.setdefault(kind or "checkpoint", []).append((int(step), i))
    return {kind: sorted(points) for kind, points in kinds.items()}


def plot_coefficients(labels: Sequence[str], series: dict[str, Sequence[float]], path: Path, *, title: str) -> Path:
    """Each series' coefficients against the training step, one panel per checkpoint kind (raw, EMA)
    over a shared step axis; ``labels`` are the checkpoints as ``kind@step``. Lines with markers, not
    one bar per checkpoint, so the figure keeps its size for any window."""
    plt = _pyplot()
    kinds = _by_kind(labels)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 2.2 + 2.2 * len(kinds)), sharex=True, squeeze=False)
    for ax, (kind, points) in zip(axes[:, 0], kinds.items()):
        steps = [step for step, _ in points]
        small = len(points) <= 40  # markers only while they stay apart
        for (name, values), style in zip(series.items(), SERIES_STYLES):
            ax.plot(steps, [values[i] for _, i in points], label=name, lw=1.6, ms=4 if small else 0,
                    **{k: v for k, v in style.items() if small or k != "marker"})
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_ylabel(f"coefficient\n({KIND_NAMES.get(kind, kind)})")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title, fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("training step of the checkpoint")
    fig.text(0.99, 0.01, "each set of coefficients sums to 1 over all panels", ha="right", va="bottom",
             fontsize=7, color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_samples(rows: Sequence[tuple[str, Any]], path: Path, *, title: str) -> Path:
    """One row of images per model ((N, C, H, W) in [-1, 1]); column j is the same noise in every row."""
    import torch

    plt = _pyplot()
    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, 0.9 * n + 2), 1.2 * len(rows) + 0.6), squeeze=False)
    for ax, (name, images) in zip(axes[:, 0], rows):
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        pad = torch.full((x.shape[0], x.shape[1], x.shape[2], max(1, x.shape[3] // 4)), 0.5)  # grey gaps
        strip = torch.cat([t for img, sep in zip(x, pad) for t in (img, sep)][:-1], dim=2)
        ax.imshow(strip.permute(1, 2, 0).numpy().squeeze(), cmap="gray" if x.shape[1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
