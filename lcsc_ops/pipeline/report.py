"""The results of an optimization: one JSON-able report, the table printed from it, the plots, and
the report ``lcsc-ops report`` (and ``optimize`` at its end) logs under ``report/`` of the parent
run: the search curve, the coefficients beside the strongest baseline's, samples of the last
checkpoint / strongest baseline / best merge from the same noise, and the table in Markdown."""
from __future__ import annotations

import math
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lcsc_ops.errors import LcscError
from lcsc_ops.options import option
from lcsc_ops.pipeline.candidates import FINAL_SEED_BASE, Candidate, choose, fresh_seeds, merged_state, paired
from lcsc_ops.pipeline.checks import check_window
from lcsc_ops.pipeline.plots import plot_coefficients, plot_samples, plot_search_curve
from lcsc_ops.spec import ModelSpec, parse_module_prefixes

BASELINE_ORDER = ("last", "training_ema", "ema_star", "uniform")


def seeds_used(cfg: Any) -> dict[str, list[int]]:
    """The noise seeds of an optimization, disjoint: the fixed search seeds ``0..S-1`` (every candidate
    of the search sees the same noise), then fresh seeds never used in the search: the test seeds
    ``10000 + i`` (every reported final figure) and the selection seeds after them (the choice only)."""
    return {"search": list(range(cfg.search_seeds)), **fresh_seeds(cfg.final_seeds, cfg.selection_seeds)}


def source_of(cfg: Any, window: Any) -> dict[str, Any]:
    """How the source run was read: its layout and, for a run that records no model spec (another
    tool's), the spec and key prefix the options gave, so ``lcsc-ops report`` reads it again."""
    source: dict[str, Any] = {"layout": getattr(window, "layout", "lcsc")}
    if getattr(cfg, "factory", None) is not None:
        source.update(spec=window.spec.to_dict(), key_prefix=cfg.key_prefix)
    return source


def build_report(cfg: Any, window: Any, base: Sequence[Candidate], cands: Sequence[Candidate], centre: Candidate,
                 *, metric: str, search_seconds: float, trials: int, study: str, storage: str,
                 parent_run_id: str, default_nfe: int | None = None, second_metric: str | None = None,
                 no_second: str | None = None, default_guidance: float | None = None,
                 no_classes: str | None = None) -> dict[str, Any]:
    """Everything the table, the JSON output and the lineage tags are made from.

    The strongest baseline (the bar the merge must clear) and the winner (the best of all, so a
    search that fails to beat the baselines registers the best baseline instead and says so) are
    chosen on the selection seeds; every mean ± std and the paired difference come from the test
    seeds, which the choice never saw.
    ``second_metric`` names the second metric; without one, ``no_second`` says why. A conditional
    model (``default_guidance`` given) adds the guidance scales and each method's per-class
    accuracy (``no_classes``: why there is none).
    """
    strongest, best_lcsc, winner = choose(base, cands)
    diff, se = paired(best_lcsc.final, strongest.final)
    search_gain = best_lcsc.search_fid - strongest.search_fid
    second_worse = (best_lcsc.second_mean is not None and strongest.second_mean is not None
                    and best_lcsc.second_mean > strongest.second_mean)
    report = {
        "source_run_id": cfg.run_id, "parent_run_id": parent_run_id, "metric": metric,
        "source": source_of(cfg, window),
        "window_steps": list(window.steps), "basis": cfg.basis, "strategy": cfg.strategy,
        "trials": trials, "search_seconds": search_seconds, "study": study, "storage": storage,
        "search_samples": cfg.search_samples, "search_seeds": cfg.search_seeds,
        "final_samples": cfg.final_samples, "final_seeds": cfg.final_seeds,
        "selection_seeds": cfg.selection_seeds, "seeds": seeds_used(cfg),
        "centre": centre.name, "strongest_baseline": strongest.name, "best_lcsc": best_lcsc.name,
        "winner": winner.name,
        "paired": {"diff_mean": diff, "diff_se": se,
                   "t": diff / se if se and not math.isnan(se) and se > 0 else None},
        "winners_curse": {"search_gain": search_gain, "final_gain": diff},
        "second_metric": second_metric, "second_metric_note": None if second_metric else no_second,
        "second_metric_worse": bool(second_worse),
        "nfe": {"default": default_nfe, "used": cfg.nfe or default_nfe},
        "methods": {c.name: _method_row(c, window) for c in [*base, *cands]},
    }
    if default_guidance is not None:  # only for conditional models: other reports stay as they were
        report["guidance"] = {"default": default_guidance,
                              "used": default_guidance if cfg.guidance is None else float(cfg.guidance)}
        report["class_accuracy_note"] = no_classes
        for c in [*base, *cands]:
            report["methods"][c.name]["class_accuracy"] = list(c.class_accuracy) or None
    return report


def class_accuracy_metrics(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a conditional model's per-class accuracy: ``class_acc.<method>`` (the mean
    over classes) and ``class_acc_<k>.<method>``; none for an unconditional model."""
    out = {}
    for name, row in report["methods"].items():
        accs = row.get("class_accuracy") or []
        finite = [a for a in accs if math.isfinite(a)]
        if finite:
            out[f"class_acc.{name}"] = statistics.fmean(finite)
        out.update({f"class_acc_{k}.{name}": a for k, a in enumerate(accs) if math.isfinite(a)})
    return out


def sampling_labels(report: dict[str, Any]) -> tuple[str, str] | None:
    """``(used, default)`` sampling settings, e.g. ``("NFE 1, w 3", "NFE 2, w 2")``, when the search
    sampled otherwise than the spec (--nfe, --guidance); None when it did not."""
    nfe, guidance = report.get("nfe") or {}, report.get("guidance") or {}
    used, default = [], []
    if nfe.get("used") != nfe.get("default"):
        used.append(f"NFE {nfe.get('used')}")
        default.append(f"NFE {nfe.get('default')}")
    if guidance.get("used") != guidance.get("default"):
        used.append(f"w {guidance.get('used'):g}")
        default.append(f"w {guidance.get('default'):g}")
    return (", ".join(used), ", ".join(default)) if used else None


def _method_row(c: Candidate, window: Any) -> dict[str, Any]:
    return {"kind": c.kind, "search_mean": c.search_fid, "final_mean": c.final_mean, "final_std": c.final_std,
            "final": c.final, "selection": c.selection, "selection_mean": c.selection_mean,
            "second_metric_mean": c.second_mean, "note": c.note,
            "checkpoints": [window.entries[i].label for i in c.indices],
            "final_default_nfe_mean": statistics.fmean(c.final_default_nfe) if c.final_default_nfe else None,
            "coefficients": list(c.coeffs)}


def no_second_note(results: dict[str, Any]) -> str | None:
    """Why the second-metric column is empty (None when some method has a second score). Reports
    written before the reason was recorded get a generic line."""
    if any(r.get("second_metric_mean") is not None for r in results["methods"].values()):
        return None
    return results.get("second_metric_note") or "no second metric was scored"


def second_header(results: dict[str, Any]) -> str:
    name = results.get("second_metric")
    return f"2nd metric: {name}" if name else "2nd metric"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render_table(report: dict[str, Any]) -> Any:
    """A rich Table: one row per method, baselines first, the winner marked; the caption says what
    ± and the paired difference's ± are, and why the second-metric column is empty if it is."""
    from rich.table import Table

    m = report["metric"]
    table = Table(title=f"LCSC on run {report['source_run_id']} — {report['trials']} trials "
                        f"({report['strategy']}, basis {report['basis']})")
    reduced, classes = sampling_labels(report), has_class_accuracy(report)
    cols = ["method", f"search {m}", f"final {m} (mean ± std)"]
    if reduced:
        cols[2] = f"final {m} @ {reduced[0]} (mean ± std)"
        cols.append(f"final {m} @ {reduced[1]}")
    if classes:
        cols.append("class acc (worst class)")
    for col in (*cols, second_header(report), "note"):
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
        if classes:
            cells.append(class_accuracy_cell(row.get("class_accuracy")))
        table.add_row(*cells, _fmt(row["second_metric_mean"]), row["note"])
    table.caption = _caption(report)
    return table


def has_class_accuracy(results: dict[str, Any]) -> bool:
    return any(r.get("class_accuracy") for r in results["methods"].values())


def class_accuracy_cell(accs: Sequence[float] | None) -> str:
    """``0.94 (0.71 @ 8)``: the mean over classes, then the worst class and its accuracy."""
    finite = [(a, k) for k, a in enumerate(accs or []) if math.isfinite(a)]
    if not finite:
        return "—"
    worst, k = min(finite)
    return f"{statistics.fmean(a for a, _ in finite):.2f} ({worst:.2f} @ {k})"


def _caption(report: dict[str, Any]) -> str:
    p, n = report["paired"], report["final_seeds"]
    note, seeds = no_second_note(report), _seed_text(report)
    return (f"search {report['metric']}: {_seed_list(report, 'search')}. {_choice_text(report)} final: {n} "
            f"fresh paired seeds{f' ({seeds[2:]})' if seeds else ''} × {report['final_samples']} "
            f"samples; ± = standard deviation across the {n} seeds. {report['best_lcsc']} − "
            f"{report['strongest_baseline']} = {_fmt(p['diff_mean'])} ± {_fmt(p['diff_se'])} (paired standard "
            f"error over the same test seeds); search gain {_fmt(report['winners_curse']['search_gain'])}"
            + ("; ⚠ worse than the strongest baseline on the second metric" if report["second_metric_worse"] else "")
            + (f". {note[0].upper() + note[1:]}." if note else ""))


# --- lcsc-ops report: the search curve, the coefficients, samples, the table in Markdown -------------

REPORT_FILES = ("search_curve.png", "coefficients.png", "samples.png", "results.md")
SAMPLE_SEED = FINAL_SEED_BASE  # fresh noise, never used in the search


@dataclass(frozen=True)
class ReportConfig:
    """``lcsc-ops report``: what to read, where to sample, what to trust."""

    run_id: str = option(help="MLflow run id of the optimize (parent) run.")
    out: Path | None = option(None, "Also keep the report files in this folder (created if missing).")
    samples: int = option(8, "Samples per model in the sample grid (the same noise for every model).")
    device: str = option("auto", "Device to sample on: auto, cpu, cuda, cuda:1 …")
    trust_factory: tuple[str, ...] = option((), "Module prefixes whose model factories the source run's spec may "
                                                "name, comma-separated (as for optimize; also from "
                                                "LCSC_OPS_TRUST_FACTORY).",
                                            parse=lambda t: parse_module_prefixes(t, ""))
    trust_remote_code: bool = option(False, "Build whatever model factory the source run's spec names.")
    allow_pickle: bool = option(False, "Fully unpickle the source run's checkpoint files that need it (as for "
                                       "optimize; runs code from the files).")
    tracking_uri: str | None = option(None, cli=False)


def _cell(x: Any, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The results table in Markdown: one row per method, with what ± means underneath."""
    m, methods, strongest = results["metric"], results["methods"], results["strongest_baseline"]
    reduced = sampling_labels(results)
    n_final = results["final_seeds"]
    head = ["method", "kind", f"search {m}", f"final {m} (mean ± std)", f"Δ vs {strongest} (mean ± SE)",
            second_header(results), "note"]
    if reduced:
        head.insert(4, f"final {m} @ {reduced[1]}")
    lines = [f"## LCSC on run `{results['source_run_id']}`", "", _summary(results), "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---:" if 1 < i < len(head) - 1 else "---"
                                                        for i in range(len(head))) + "|"]
    order = [n for n in BASELINE_ORDER if n in methods] + [n for n in methods if n not in BASELINE_ORDER]
    for name in order:
        row = methods[name]
        diff, se = paired(row["final"], methods[strongest]["final"])
        label = f"**{name}** ★" if name == results["winner"] else name
        cells = [label, row["kind"], _cell(row["search_mean"]),
                 f"{_cell(row['final_mean'])} ± {_cell(row['final_std'])}",
                 "(reference)" if name == strongest else f"{_cell(diff, sign=True)} ± {_cell(se)}",
                 _cell(row.get("second_metric_mean")), str(row.get("note") or "").replace("|", "\\|")]
        if reduced:
            cells.insert(4, _cell(row.get("final_default_nfe_mean")))
        lines.append("| " + " | ".join(cells) + " |")
    star = "best mean on the selection seeds" if (results.get("seeds") or {}).get("selection") else "best final mean"
    lines += ["", f"search {m}: {_seed_list(results, 'search')}. {_choice_text(results)} "
                  f"± after a final {m}: the standard deviation across the {n_final} final seeds "
                  f"({results['final_samples']} samples each, fresh noise never used in the search"
                  f"{_seed_text(results)}). "
                  f"Δ: the mean of the per-seed differences to the strongest baseline ({strongest}) on the same "
                  f"seeds (paired), ± its standard error (std of the differences / √{n_final}); "
                  f"negative is better. ★: the winner ({star})."]
    if results.get("second_metric_worse"):
        lines += ["", "⚠ the best LCSC merge is worse than the strongest baseline on the second metric."]
    note = no_second_note(results)
    if note:
        lines += ["", note[0].upper() + note[1:] + "."]
    return "\n".join(lines + _class_accuracy_lines(results, order)) + "\n"


def _class_accuracy_lines(results: dict[str, Any], order: Sequence[str]) -> list[str]:
    """A conditional model's per-class accuracy table (empty for an unconditional one)."""
    if not has_class_accuracy(results):
        note = results.get("class_accuracy_note")
        return ["", note[0].upper() + note[1:] + "."] if note else []
    methods = results["methods"]
    k = max(len(r.get("class_accuracy") or []) for r in methods.values())
    lines = ["", "### Class-conditional accuracy", "",
             "Share of each class's samples (balanced labels, final seeds) that the data set's classifier "
             "labels as that class: a merge that trades one class for another shows here, not in FID.", "",
             "| method | mean | " + " | ".join(str(c) for c in range(k)) + " |", "|---|" + "---:|" * (k + 1)]
    for name in order:
        accs = methods[name].get("class_accuracy") or []
        finite = [a for a in accs if math.isfinite(a)]
        lines.append(f"| {name} | {_cell(statistics.fmean(finite) if finite else None, 2)} | "
                     + " | ".join(_cell(a, 2) for a in accs) + " |")
    return lines


def _seed_text(results: dict[str, Any]) -> str:
    """``: seeds 10000–10004`` (the test seeds, from results.json's ``seeds``; an older report's
    ``final`` seeds; "" for reports older still)."""
    seeds = results.get("seeds") or {}
    test = seeds.get("test", seeds.get("final")) or []
    return f": {_seed_range(test)}" if test else ""


def _seed_list(results: dict[str, Any], key: str) -> str:
    seeds = (results.get("seeds") or {}).get(key)
    return _seed_range(seeds) if seeds else "seeds not recorded"


def _seed_range(seeds: Sequence[int]) -> str:
    """``seeds 10000–10004`` for consecutive seeds, ``seed 7``, else ``seeds 1, 5, 9``."""
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"seeds {seeds[0]}–{seeds[-1]}"
    return "seeds " + ", ".join(map(str, seeds))


def _choice_text(results: dict[str, Any]) -> str:
    """Which seeds chose the strongest baseline and the winner (an older report: the final seeds)."""
    selection = (results.get("seeds") or {}).get("selection")
    if not selection:
        return "The strongest baseline and the winner (★) were chosen on the same final seeds."
    return (f"The strongest baseline and the winner (★) were chosen by their means on the selection "
            f"{_seed_range(selection)} (never reported); every final figure comes from the test seeds.")


def _summary(results: dict[str, Any]) -> str:
    steps = results["window_steps"]
    reg = results.get("registered_model")
    registered = f"registered as `{reg['name']}` version {reg['version']}" if reg else "not registered"
    return (f"{results['trials']} trials ({results['strategy']}, basis {results['basis']}) over checkpoint steps "
            f"{steps[0]}–{steps[-1]} ({len(steps)} steps); search: {results['search_seeds']} fixed seed(s) × "
            f"{results['search_samples']} samples. Winner: **{results['winner']}**, {registered}; "
            f"optimize run `{results['parent_run_id']}`.")


def method_candidate(results: dict[str, Any], name: str, window: Any) -> Candidate:
    """Method ``name`` of ``results`` as a candidate over ``window`` (its checkpoints found by label)."""
    row = results["methods"][name]
    index = {e.label: i for i, e in enumerate(window.entries)}
    missing = [label for label in row["checkpoints"] if label not in index]
    if missing:
        raise LcscError(f"method {name}: checkpoint {missing[0]} is not in the window of run {window.run_id}")
    return Candidate(name, tuple(index[label] for label in row["checkpoints"]),
                     tuple(float(c) for c in row["coefficients"]), row["kind"])


def sample_rows(results: dict[str, Any], window: Any, spec: ModelSpec, *, device: str,
                samples: int) -> list[tuple[str, Any]]:
    """Samples of the last checkpoint, the strongest baseline and the best LCSC merge, all from the
    same fixed noise (and, for a conditional model, the same balanced labels and guidance scale);
    each merge rebuilt from the verified checkpoint files and its coefficients."""
    import torch

    from lcsc_ops.evaluation.conditional import make_labels
    from lcsc_ops.evaluation.fid import make_noise, sample_batch
    from lcsc_ops.models.sampling import guidance_for
    from lcsc_ops.math.merge import load_checkpoint_state
    from lcsc_ops.models.diffusion import make_sampler

    raw = window.indices("raw") or window.indices()
    last = Candidate("last", (raw[-1],), (1.0,), "baseline")
    strongest, best = results["strongest_baseline"], results["best_lcsc"]
    picks = [(f"last checkpoint\n{window.entries[raw[-1]].label}", last),
             (f"{strongest}\n(strongest baseline)", method_candidate(results, strongest, window)),
             (f"{best}\n(LCSC)", method_candidate(results, best, window))]
    noise, sampler, rows = make_noise(samples, spec.image_shape, SAMPLE_SEED), make_sampler(spec.sampler), []
    cond = spec.conditioning
    guidance = None if cond is None else guidance_for(cond, make_labels(samples, cond.num_classes, SAMPLE_SEED))
    for name, cand in picks:
        model = load_checkpoint_state(spec.build(), merged_state(window, cand)).to(device).eval()
        with torch.inference_mode():
            rows.append((name, sample_batch(sampler, model, noise.to(device), guidance).cpu()))
        del model
    return rows


def make_labels_of(spec: ModelSpec, samples: int) -> list[int]:
    """The labels of the sample grid's columns (a conditional model's)."""
    from lcsc_ops.evaluation.conditional import make_labels

    return make_labels(samples, spec.conditioning.num_classes, SAMPLE_SEED).tolist()


def _coefficients_over(labels: Sequence[str], row: dict[str, Any]) -> list[float]:
    own = dict(zip(row["checkpoints"], row["coefficients"]))
    return [float(own.get(label, 0.0)) for label in labels]


def write_report_files(results: dict[str, Any], trials: Sequence[tuple[int, float]], window: Any, spec: ModelSpec,
                       folder: Path, *, device: str, samples: int = 8) -> list[Path]:
    """``search_curve.png``, ``coefficients.png``, ``samples.png`` (only for a spec with an image
    shape (C, H, W)) and ``results.md`` in ``folder``."""
    metric, methods = results["metric"], results["methods"]
    strongest, best = results["strongest_baseline"], results["best_lcsc"]
    files = [plot_search_curve(trials, {n: r["search_mean"] for n, r in methods.items() if r["kind"] == "baseline"},
                               folder / "search_curve.png", metric=metric, start=results.get("centre"))]
    used = set(methods[strongest]["checkpoints"]) | set(methods[best]["checkpoints"])
    labels = [e.label for e in window.entries if e.label in used]
    series = {f"{strongest} (strongest baseline)": _coefficients_over(labels, methods[strongest]),
              f"{best} (LCSC)": _coefficients_over(labels, methods[best])}
    files.append(plot_coefficients(labels, series, folder / "coefficients.png",
                                   title=f"{best} beside {strongest}, over the same checkpoints"))
    steps = spec.sampler.get("steps")
    images = spec.image_shape is not None and len(spec.image_shape) == 3
    if images:
        files.append(plot_samples(sample_rows(results, window, spec, device=device, samples=samples),
                                  folder / "samples.png",
                                  title=f"the same noise (seed {SAMPLE_SEED}) through each model; sampler "
                                        f"{spec.sampler.get('name', '?')}" + (f", {steps} steps" if steps else "")
                                        + (f"; labels {', '.join(map(str, make_labels_of(spec, samples)))}, "
                                           f"guidance {spec.conditioning.guidance:g}" if spec.conditioning else "")))
    files.append(folder / "results.md")
    files[-1].write_text(render_markdown(results) + ("" if images else
                         "\nNo samples.png: the model spec has no image shape (C, H, W).\n"))
    return files


def publish_report(results: dict[str, Any], trials: Sequence[tuple[int, float]], window: Any, spec: ModelSpec, *,
                   device: str, tracking_uri: str | None, log: Callable[[str], None], run_id: str | None = None,
                   out: Path | None = None, samples: int = 8) -> dict[str, Any]:
    """Write the report, log it under ``report/`` of the optimize run, keep a copy in ``out`` (if
    given; only once every file is written) and set the table as the registered version's description."""
    from lcsc_ops.store import reports

    run_id = run_id or results["parent_run_id"]
    with tempfile.TemporaryDirectory(prefix="lcsc-report-") as tmp:
        files = write_report_files(results, trials, window, spec, Path(tmp), device=device, samples=samples)
        uri = reports.log_report(run_id, Path(tmp), tracking_uri)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy2(f, out / f.name)
        markdown = files[-1].read_text()
    described, reg = None, results.get("registered_model")
    if reg and reports.version_exists(reg["name"], reg["version"], tracking_uri):
        reports.describe_version(reg["name"], reg["version"], markdown, tracking_uri)
        described = f"{reg['name']}/{reg['version']}"
    elif reg:
        log(f"report: {reg['name']} version {reg['version']} no longer exists; no description set")
    log(f"report: {', '.join(f.name for f in files)} logged to {uri}"
        + (f", kept in {out}" if out is not None else "") + (f"; table set as {described}'s description"
                                                              if described else ""))
    return {"artifact_uri": uri, "files": [str(out / f.name) for f in files] if out is not None else [],
            "version_description": described}


_RESULT_KEYS = ("source_run_id", "metric", "window_steps", "methods", "strongest_baseline", "best_lcsc", "winner",
                "trials", "strategy", "basis", "search_seeds", "search_samples", "final_seeds", "final_samples")
_ROW_KEYS = ("kind", "search_mean", "final_mean", "final_std", "final", "checkpoints", "coefficients")


def check_results(results: dict[str, Any], run_id: str) -> None:
    """LcscError (one line) unless ``results`` has what the report reads: results.json is whatever
    the tracking store holds."""
    from lcsc_ops.checkpoints import validate_run_id

    where = f"optimize run {run_id}: results.json"
    missing = [k for k in _RESULT_KEYS if k not in results]
    if missing:
        raise LcscError(f"{where} lacks {', '.join(missing)}")
    validate_run_id(results["source_run_id"])
    steps, methods = results["window_steps"], results["methods"]
    if not (isinstance(steps, list) and steps and all(isinstance(s, int) and s >= 0 for s in steps)):
        raise LcscError(f"{where}: window_steps must be a non-empty list of steps")
    if not isinstance(methods, dict) or not all(isinstance(r, dict) for r in methods.values()):
        raise LcscError(f"{where}: methods must be an object of objects")
    for key in ("strongest_baseline", "best_lcsc", "winner"):
        if results[key] not in methods:
            raise LcscError(f"{where}: {key} {results[key]!r} is not one of its methods")
    for name, row in methods.items():
        lacking = [k for k in _ROW_KEYS if k not in row]
        if lacking:
            raise LcscError(f"{where}: method {name} lacks {', '.join(lacking)}")
        labels, coeffs = row["checkpoints"], row["coefficients"]
        if not (isinstance(labels, list) and isinstance(coeffs, list) and len(labels) == len(coeffs)
                and all(isinstance(c, (int, float)) for c in [*coeffs, *row["final"]])):
            raise LcscError(f"{where}: method {name} needs as many numeric coefficients as checkpoints")


def _source_options(results: dict[str, Any], trust: Any, cfg: ReportConfig, log: Callable[[str], None]) -> Any:
    """How the optimization read its source run (``results["source"]``): the same layout, and for a run
    that records no spec the one the optimization used (read from the store: vouched for by ``trust``)."""
    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.store.sources import SourceOptions

    source = results.get("source") if isinstance(results.get("source"), dict) else {}
    spec = source.get("spec")
    if spec is not None:
        spec = trust.vouch(ModelSpec.from_dict(spec, origin=f"optimize run {cfg.run_id}"))
    prefix = source.get("key_prefix")
    return SourceOptions(spec=spec, key_prefix=prefix if isinstance(prefix, str) else None,
                         allow_pickle=cfg.allow_pickle, layout=source.get("layout"), log=log)


def run_report(cfg: ReportConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """``lcsc-ops report``: rebuild the report of a finished optimization from its results.json, its
    trials' child runs and the source run's checkpoints (fetched and verified under ``cfg``'s trust)."""
    from lcsc_ops.evaluation.evaluators import resolve_device
    from lcsc_ops.spec import Trust
    from lcsc_ops.store import fetch, reports, sources

    if cfg.samples < 1:
        raise LcscError(f"--samples must be >= 1, got {cfg.samples}")
    if cfg.out is not None and cfg.out.exists() and not cfg.out.is_dir():
        raise LcscError(f"--out {cfg.out} exists and is not a folder")
    trust = Trust(factory=tuple(cfg.trust_factory), remote_code=cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    uri = fetch.resolve_tracking_uri(cfg.tracking_uri)
    results = reports.load_results(cfg.run_id, uri)
    check_results(results, cfg.run_id)
    steps = results["window_steps"]
    window = sources.fetch_window(results["source_run_id"], window=len(steps), end_step=steps[-1], tracking_uri=uri,
                                  trust=trust, options=_source_options(results, trust, cfg, log))
    if list(window.steps) != steps:
        raise LcscError(f"run {results['source_run_id']}'s checkpoints no longer match the optimization's window "
                        f"(steps {steps[0]}..{steps[-1]})")
    check_window(window, log)
    nfe, guidance = results.get("nfe") or {}, results.get("guidance") or {}
    spec = window.spec
    if nfe.get("used") and nfe.get("used") != nfe.get("default"):
        spec = spec.with_sampler(steps=int(nfe["used"]))
    if guidance.get("used") is not None and guidance.get("used") != guidance.get("default"):
        spec = spec.with_guidance(float(guidance["used"]))
    trials = reports.trial_scores(cfg.run_id, results["metric"], uri)
    return publish_report(results, trials, window, spec, device=device, tracking_uri=uri, log=log, run_id=cfg.run_id,
                          out=cfg.out, samples=cfg.samples)
