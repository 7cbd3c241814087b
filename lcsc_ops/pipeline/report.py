"""The results of an optimization: one JSON-able report, the table printed from it, the plots."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from lcsc_ops.pipeline.candidates import Candidate, paired

BASELINE_ORDER = ("last", "training_ema", "ema_star", "uniform")


def build_report(cfg: Any, window: Any, base: Sequence[Candidate], cands: Sequence[Candidate], centre: Candidate,
                 *, metric: str, search_seconds: float, trials: int, study: str, storage: str,
                 parent_run_id: str, default_nfe: int | None = None) -> dict[str, Any]:
    """Everything the table, the JSON output and the lineage tags are made from.

    The strongest baseline is the one with the best mean on the fresh final seeds (the bar
    the merge must clear); the winner is the best of all candidates on those seeds, so a
    search that fails to beat the baselines registers the best baseline instead and says so.
    """
    strongest = min(base, key=lambda c: c.final_mean)
    best_lcsc = min(cands, key=lambda c: c.final_mean)
    winner = min([*base, *cands], key=lambda c: c.final_mean)
    diff, se = paired(best_lcsc.final, strongest.final)
    search_gain = best_lcsc.search_fid - strongest.search_fid
    second_worse = (best_lcsc.second_mean is not None and strongest.second_mean is not None
                    and best_lcsc.second_mean > strongest.second_mean)
    methods = {}
    for c in [*base, *cands]:
        methods[c.name] = {"kind": c.kind, "search_mean": c.search_fid, "final_mean": c.final_mean,
                           "final_std": c.final_std, "final": c.final, "second_metric_mean": c.second_mean,
                           "note": c.note, "checkpoints": [window.entries[i].label for i in c.indices],
                           "final_default_nfe_mean": (statistics.fmean(c.final_default_nfe)
                                                      if c.final_default_nfe else None),
                           "coefficients": list(c.coeffs)}
    return {
        "source_run_id": cfg.run_id, "parent_run_id": parent_run_id, "metric": metric,
        "window_steps": list(window.steps), "basis": cfg.basis, "strategy": cfg.strategy,
        "trials": trials, "search_seconds": search_seconds, "study": study, "storage": storage,
        "search_samples": cfg.search_samples, "search_seeds": cfg.search_seeds,
        "final_samples": cfg.final_samples, "final_seeds": cfg.final_seeds,
        "centre": centre.name, "strongest_baseline": strongest.name, "best_lcsc": best_lcsc.name,
        "winner": winner.name,
        "paired": {"diff_mean": diff, "diff_se": se,
                   "t": diff / se if se and not math.isnan(se) and se > 0 else None},
        "winners_curse": {"search_gain": search_gain, "final_gain": diff},
        "second_metric_worse": bool(second_worse),
        "nfe": {"default": default_nfe, "used": cfg.nfe or default_nfe},
        "methods": methods,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_table(report: dict[str, Any]) -> Any:
    """A rich Table: one row per method, baselines first, the winner marked."""
    from rich.table import Table

    m = report["metric"]
    table = Table(title=f"LCSC on run {report['source_run_id']} — {report['trials']} trials "
                        f"({report['strategy']}, basis {report['basis']})")
    nfe = report.get("nfe") or {}
    reduced = nfe.get("used") != nfe.get("default")
    cols = ["method", f"search {m}", f"final {m} (mean ± std)"]
    if reduced:
        cols[2] = f"final {m} @ NFE {nfe['used']} (mean ± std)"
        cols.append(f"final {m} @ NFE {nfe['default']}")
    for col in (*cols, "2nd metric", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    methods = report["methods"]
    order = [n for n in BASELINE_ORDER if n in methods] + [n for n in methods if n not in BASELINE_ORDER]
    for name in order:
        row = methods[name]
        tag = " ★" if name == report["winner"] else ""
        label = name + (" (strongest baseline)" if name == report["strongest_baseline"] else "")
        cells = [label + tag, _fmt(row["search_mean"]), f"{_fmt(row['final_mean'])} ± {_fmt(row['final_std'])}"]
        if reduced:
            cells.append(_fmt(row.get("final_default_nfe_mean")))
        table.add_row(*cells, _fmt(row["second_metric_mean"]), row["note"])
    p = report["paired"]
    table.caption = (f"final: {report['final_seeds']} fresh paired seeds × {report['final_samples']} samples; "
                     f"{report['best_lcsc']} − {report['strongest_baseline']} = {_fmt(p['diff_mean'])} "
                     f"± {_fmt(p['diff_se'])} (se); search gain {_fmt(report['winners_curse']['search_gain'])}"
                     + ("; ⚠ worse than the strongest baseline on the second metric"
                        if report["second_metric_worse"] else ""))
    return table


def save_plots(trials: Sequence[Any], base: Sequence[Candidate], cands: Sequence[Candidate], winner: Candidate,
               window: Any, out: Path, *, metric: str) -> list[Path]:
    """Search history (each trial, best so far, baselines) and the winner's coefficients, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = sorted((t for t in trials if t.value is not None and not t.pruned), key=lambda t: t.number)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [t.number for t in trials]
    ys = [t.value for t in trials]
    best = [min(ys[: i + 1]) for i in range(len(ys))]
    ax.scatter(xs, ys, s=8, alpha=0.5, label="trial")
    ax.plot(xs, best, color="C3", label="best so far")
    for i, c in enumerate(base):
        ax.axhline(c.search_fid, ls="--", lw=0.8, color=f"C{i + 4}", label=c.name)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"search {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "search_history.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [window.entries[i].label for i in winner.indices]
    ax.bar(range(len(labels)), winner.coeffs)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("coefficient")
    ax.set_title(f"{winner.name}: merge coefficients (sum = 1)")
    fig.tight_layout()
    paths.append(out / "coefficients.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
