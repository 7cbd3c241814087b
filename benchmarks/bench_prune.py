"""`make bench-prune`: does stopping hopeless trials early (--prune) save search time, and does the winner change?

The same search (strategy, seed, trial budget, fixed search noise) runs twice through the
library (`run_optimize`, nothing registered, no score cache: the second search would
otherwise reuse the first one's scores), without and with `--prune`, each in a study of
its own, one after the other on the same warm process. Reported: the search wall time
each way and the saved fraction (also in samples drawn, which the machine's load does not
move), the pruned trials and the rung they stopped at, the best trial's search FID each
way, and whether the winner changed (same trial, how far apart the coefficients are, and
the final FID of each on the same fresh paired seeds). Also how well an early rung ranks
the complete trials (Spearman's rho against the full count), the premise of pruning.

The digits run: bench-quality's (6k steps), if its checkpoints are cached under
benchmarks/work/full/cache; the last `--window` steps (raw + EMA) are imported into this
bench's own store under benchmarks/work/prune/ (reused on later runs; `--fresh` redoes
it). Without them it trains a shorter digits run there (`--train-steps`). Figures go to
benchmarks/results/prune.json and the section "Early stopping" of benchmarks/RESULTS.md.

`--quick` checks the plumbing in a minute or two: a 200-step run trained under
benchmarks/work/prune-quick/, 14 trials at 200 samples (enough complete trials for the
pruner to start), small final evaluations; it prints the section and writes no results.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: do not spin on the neighbours' cores
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
HEADING = "## Early stopping (bench_prune.py)"
# --quick: the sizes it changes (any of them given on the command line wins).
QUICK = dict(n_trials=14, search_samples=200, window=4, final_seeds=2, final_samples=300, train_steps=200)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def source_run(work: Path, uri: str, window: int, train_steps: int, reuse_full: bool = True) -> dict[str, Any]:
    """The digits run to search: bench-quality's checkpoints imported into this store, else a fresh training."""
    state_path = work / "state.json"
    if state_path.exists():
        return json.loads(state_path.read_text())
    full = HERE / "work" / "full"
    src = None
    if reuse_full and (full / "state.json").exists():
        trained = json.loads((full / "state.json").read_text())["train"]
        run_id = trained["run_id"]
        folder = full / "cache" / "checkpoints" / run_id
        steps = sorted({int(p.name[4:12]) for p in folder.glob("step*-raw.safetensors")}
                       & {int(p.name[4:12]) for p in folder.glob("step*-ema.safetensors")})
        if len(steps) >= window:
            src = (folder, steps[-window:], run_id, trained.get("config", {}).get("steps"))
    t = time.perf_counter()
    if src is not None:
        from safetensors import safe_open

        from lcsc_ops.spec import ModelSpec
        from lcsc_ops.importers.files import import_checkpoints

        folder, steps, origin, total = src
        with safe_open(str(folder / f"step{steps[-1]:08d}-raw.safetensors"), framework="pt") as f:
            spec = ModelSpec.from_json(f.metadata()["lcsc.spec"])
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ("raw", "ema"):
                (Path(tmp) / kind).mkdir()
                for s in steps:
                    name = f"step{s:08d}-{kind}.safetensors"
                    shutil.copyfile(folder / name, Path(tmp) / kind / name)  # the importer refuses links out
            run_id = import_checkpoints(Path(tmp) / "raw", spec=spec, kind="raw", ema_folder=Path(tmp) / "ema",
                                        experiment="bench-prune", run_name=f"bench-quality-{origin[:8]}-last{window}",
                                        tracking_uri=uri)
        info = {"run_id": run_id, "source": f"bench-quality's digits DDPM ({total} steps, run {origin[:8]}), its "
                                            f"last {window} checkpoint steps ({steps[0]}..{steps[-1]}, raw + EMA) "
                                            f"imported", "seconds": 0.0}
    else:
        from lcsc_ops.training import TrainConfig, train

        run_id = train(TrainConfig(steps=train_steps, experiment="bench-prune", run_name="bench-prune",
                                   tracking_uri=uri, seed=0))
        info = {"run_id": run_id, "source": f"digits DDPM trained here, {train_steps} steps", "seconds": 0.0}
    info["seconds"] = time.perf_counter() - t
    state_path.write_text(json.dumps(info, indent=1))
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def spearman(x: list[float], y: list[float]) -> float | None:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else None


def trial_records(report: dict[str, Any], storage: str) -> list[Any]:
    """The study's trials as the product reports them (``TrialRecord``), by number."""
    from lcsc_ops.search.study import SearchStudy

    return SearchStudy.open(report["study"], storage).records()


def study_figures(report: dict[str, Any], storage: str, search_samples: int, search_seeds: int) -> dict[str, Any]:
    records = trial_records(report, storage)
    # The start trial is the centre, scored before the search: no search trial, but it can be the best.
    start = next(t for t in records if t.start is not None)
    trials = [t for t in records if t.start is None and t.state in ("COMPLETE", "PRUNED")]
    done = [t for t in trials if t.state == "COMPLETE"]
    pruned = [t for t in trials if t.pruned]
    best = min((t for t in records if t.state == "COMPLETE"), key=lambda t: t.value)  # as the report's lcsc_top1
    bar = report["methods"][report["centre"]]["search_mean"]
    drawn = sum(search_samples if t.state == "COMPLETE" else max(t.rungs) for t in trials) * search_seeds
    rungs = sorted({s for t in done for s in t.rungs})
    rho = {str(s): spearman([t.rungs[s] for t in done], [t.value for t in done]) for s in rungs[:-1]}
    return {"trials": len(trials), "complete": len(done), "pruned": len(pruned),
            "pruned_at_samples": {str(k): v for k, v in sorted(Counter(max(t.rungs) for t in pruned).items())},
            "search_seconds": report["search_seconds"], "trial_seconds_sum": sum(t.duration_s or 0.0 for t in trials),
            "complete_trial_seconds_median": statistics.median(t.duration_s or 0.0 for t in done),
            "samples_drawn": drawn, "best_trial": best.number, "best_is_start": best.start is not None,
            "best_params": best.params, "best_search_fid": best.value, "best_coefficients": list(best.coefficients),
            "centre": report["centre"], "centre_search_fid": bar, "centre_coefficients": list(start.coefficients),
            "first_trial_beating_centre": next((t.number for t in done if t.value < bar), None),
            "rung_spearman_vs_full": rho}


def fates(reports: dict[str, dict[str, Any]], storages: dict[str, str], k: int = 5) -> dict[str, Any]:
    """What the pruned search did with the unpruned search's k best points, where it drew the same points
    (the random sampler always does; CMA-ES and evolution until their paths part). Both studies hold the
    same start trial (the centre): it is no drawn point and is left out."""
    a = trial_records(reports["plain"], storages["plain"])
    b = {t.number: t for t in trial_records(reports["prune"], storages["prune"])}
    top = sorted((t for t in a if t.value is not None and t.start is None), key=lambda t: t.value)[:k]
    same = [b[t.number] for t in top if t.number in b and b[t.number].params == t.params]
    pruned = [t for t in same if t.pruned]
    return {"top_k": len(top), "same_points": len(same), "pruned": len(pruned)}


def compare(plain: dict[str, Any], pruned: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    ca, cb, centre = a["best_coefficients"], b["best_coefficients"], a["centre_coefficients"]
    fa, fb = plain["methods"]["lcsc_top1"]["final"], pruned["methods"]["lcsc_top1"]["final"]
    d = [y - x for x, y in zip(fa, fb)]
    return {
        "search_seconds_saved_fraction": 1 - b["search_seconds"] / a["search_seconds"],
        "samples_saved_fraction": 1 - b["samples_drawn"] / a["samples_drawn"],
        "same_best_trial": a["best_trial"] == b["best_trial"] and a["best_params"] == b["best_params"],
        "coefficients_l1_between_winners": sum(abs(x - y) for x, y in zip(ca, cb)),
        "coefficients_max_abs_between_winners": max(abs(x - y) for x, y in zip(ca, cb)),
        "coefficients_l1_from_centre": {"plain": sum(abs(x - y) for x, y in zip(ca, centre)),
                                        "prune": sum(abs(x - y) for x, y in zip(cb, centre))},
        "final_fid_best_trial": {"plain": statistics.fmean(fa), "prune": statistics.fmean(fb)},
        "final_fid_diff_prune_minus_plain": statistics.fmean(d),
        "final_fid_diff_se": statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None,
        "report_winner": {"plain": plain["winner"], "prune": pruned["winner"]},
        "baseline_final": {n: r["final_mean"] for n, r in plain["methods"].items() if r["kind"] == "baseline"},
    }


def markdown(runs: dict[str, dict[str, Any]]) -> str:
    """The RESULTS.md section: one pair of columns (without / with --prune) per strategy measured."""
    first = runs.get("cmaes") or next(iter(runs.values()))
    cfg = first["config"]
    lines = [
        HEADING, "",
        f"Command: `make bench-prune` (CMA-ES, the default strategy; `--strategy NAME` adds a pair of columns). "
        f"Run: {first['source']}. Each strategy: the same seed ({cfg['seed']}) and budget "
        f"({cfg['n_trials']} trials, pruned ones included) with and without `--prune`, one after the other; window "
        f"{cfg['window']} (basis {cfg['basis']}, {len(first['plain']['best_coefficients'])} coefficients), search FID "
        f"at {cfg['search_samples']} samples × {cfg['search_seeds']} seed, batch {cfg['batch_size']}; final FID at "
        f"{cfg['final_samples']} samples on {cfg['final_seeds']} fresh paired seeds. `--prune`: rungs at "
        f"{first['rung_counts']} samples, {first['pruner']}. Figures: `benchmarks/results/prune.json`.", "",
    ]
    head, rule = ["| |"], ["|---"]
    for name in runs:
        head += [f" {name}: without |", f" {name}: with --prune |"]
        rule += ["|---", "|---"]
    lines += ["".join(head), "".join(rule) + "|"]

    def row(label: str, cell) -> str:
        cells = []
        for r in runs.values():
            cells += [cell(r, "plain"), cell(r, "prune")]
        return f"| {label} | " + " | ".join(cells) + " |"

    def saved(r: dict[str, Any], key: str) -> str:
        return f" ({r['comparison'][key]:.0%} saved)"

    lines += [
        row("search wall time", lambda r, k: f"{r[k]['search_seconds']:.1f} s"
            + (saved(r, "search_seconds_saved_fraction") if k == "prune" else "")),
        row("samples drawn in the search", lambda r, k: f"{r[k]['samples_drawn']}"
            + (saved(r, "samples_saved_fraction") if k == "prune" else "")),
        row("trials complete / pruned", lambda r, k: f"{r[k]['complete']} / {r[k]['pruned']}"),
        row("median seconds per complete trial", lambda r, k: f"{r[k]['complete_trial_seconds_median']:.2f}"
            if "complete_trial_seconds_median" in r[k] else "—"),
        row("pruned at (samples: trials)",
            lambda r, k: ", ".join(f"{n}: {v}" for n, v in r[k]["pruned_at_samples"].items()) or "—"),
        row("best trial (its search FID)", lambda r, k: f"#{r[k]['best_trial']} ({r[k]['best_search_fid']:.3f})"),
        row("first trial beating the centre's search FID",
            lambda r, k: "never" if r[k]["first_trial_beating_centre"] is None
            else f"#{r[k]['first_trial_beating_centre']}"),
        row("best trial's final FID", lambda r, k: f"{r['comparison']['final_fid_best_trial'][k]:.3f}"),
        row("registered winner (best on the final seeds)", lambda r, k: r["comparison"]["report_winner"][k]),
        "",
    ]
    for name, r in runs.items():
        c, m = r["comparison"], r["machine"]
        rho = ", ".join(f"{k} samples {v:.2f}" for k, v in r["prune"]["rung_spearman_vs_full"].items()
                        if v is not None) or "—"
        lines += [
            f"**{name}** ({m['date']}, {r['wall_seconds'] / 60:.1f} min in all; {m['cpu']}, {m['cores']} cores shared "
            f"with other jobs, load average {m['load_start'][0]:.1f} → {m['load_end'][0]:.1f}, torch {m['torch']}, "
            f"{m['threads']} thread). Centre {r['plain']['centre']} "
            f"(search FID {r['plain']['centre_search_fid']:.3f}). "
            f"Same best trial: {'yes' if c['same_best_trial'] else 'no'}; the two best trials' coefficients differ by "
            f"{c['coefficients_l1_between_winners']:.3f} in L1 (max {c['coefficients_max_abs_between_winners']:.3f}; "
            f"{c['coefficients_l1_from_centre']['plain']:.3f} and {c['coefficients_l1_from_centre']['prune']:.3f} "
            f"from the centre); final FID with − without = {c['final_fid_diff_prune_minus_plain']:+.3f}"
            + (f" ± {c['final_fid_diff_se']:.3f} (se over the paired seeds)" if c["final_fid_diff_se"] else "")
            + f". Rank agreement (Spearman) of an "
            f"early rung with the full count, over the complete trials: {rho}. {top_line(r)}{r['verdict']}", "",
        ]
    return "\n".join(lines + [conclusion(runs), ""])


def conclusion(runs: dict[str, dict[str, Any]]) -> str:
    saved = [r["comparison"]["search_seconds_saved_fraction"] for r in runs.values()]
    lost = [n for n, r in runs.items() if r["comparison"]["report_winner"]["plain"].startswith("lcsc")
            and not r["comparison"]["report_winner"]["prune"].startswith("lcsc")]
    worse = [n for n, r in runs.items() if r["comparison"]["final_fid_diff_prune_minus_plain"] > 0]
    return (f"Summary: on the same trial budget `--prune` saved {min(saved):.0%}–{max(saved):.0%} of the search "
            f"time; the best trial's final FID was worse with pruning for {' and '.join(worse) or 'no strategy'}, and "
            f"the registered model fell back from a merge to a baseline for {' and '.join(lost) or 'no strategy'}. "
            "One search seed per strategy: a pair of searches, not a distribution. `--prune` stays off by default.")


def top_line(r: dict[str, Any]) -> str:
    f = r.get("unpruned_top_in_pruned_search")
    if not f:
        return ""
    if not f["same_points"]:
        return f"The pruned search never drew the unpruned search's {f['top_k']} best points (the paths parted). "
    return (f"Of the unpruned search's {f['top_k']} best points, the pruned search drew {f['same_points']} too and "
            f"pruned {f['pruned']} of them. ")


def verdict(res: dict[str, Any]) -> str:
    c, a, b = res["comparison"], res["plain"], res["prune"]
    dt, ds = c["search_seconds_saved_fraction"], c["samples_saved_fraction"]
    text = (f"`--prune` stopped {b['pruned']} of {b['trials']} trials early and drew {ds:.0%} fewer samples; the "
            f"search took {abs(dt):.0%} {'less' if dt >= 0 else 'more'} wall time, and its best search FID was "
            f"{b['best_search_fid']:.3f} against {a['best_search_fid']:.3f}.")
    if res["config"]["strategy"].startswith("cmaes"):
        text += (" A pruned trial counts against the trial budget but not towards a CMA-ES generation (CMA-ES "
                 "learns from complete trials only), so on the same budget the pruned search completes fewer "
                 "generations: a smaller search, not the same search done faster.")
    return text


def write_results_md(section: str) -> None:
    """Replace (or append) this bench's section of RESULTS.md, leaving every other section as it is."""
    from _results_md import replace_section

    replace_section(HERE / "RESULTS.md", HEADING, section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategy", default="cmaes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-trials", type=int, default=40)
    ap.add_argument("--search-samples", type=int, default=1000)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--final-seeds", type=int, default=3)
    ap.add_argument("--final-samples", type=int, default=2000)
    ap.add_argument("--train-steps", type=int, default=2000, help="only without bench-quality's checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    ap.add_argument("--fresh", action="store_true", help="re-import (or retrain) the run")
    ap.add_argument("--no-write", action="store_true", help="print only; leave results/ and RESULTS.md alone")
    ap.add_argument("--render", action="store_true", help="only rewrite the RESULTS.md section from results/prune.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, its own work folder, writes no results "
                                                         "(a plumbing check)")
    args = ap.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
        args.no_write = True
    results = HERE / "results" / "prune.json"
    if args.render:
        runs = json.loads(results.read_text())["runs"]
        for r in runs.values():
            r["verdict"] = verdict(r)
        write_results_md(markdown(runs))
        print(markdown(runs))
        return

    import torch

    torch.set_num_threads(args.threads)
    from lcsc_ops.evaluation.rungs import rung_counts
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.pipeline.config import OptimizeConfig

    t0, load_start = time.perf_counter(), os.getloadavg()
    work = HERE / "work" / ("prune-quick" if args.quick else "prune")
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LCSC_OPS_CACHE"] = str(work / "cache")
    os.chdir(work)  # MLflow puts the artifacts of a sqlite store under ./mlruns
    uri = f"sqlite:///{work / 'mlflow.db'}"
    src = source_run(work, uri, args.window, args.train_steps, reuse_full=not args.quick)
    log(f"run {src['run_id']}: {src['source']}")

    cfgs, reports, figures = {}, {}, {}
    for name, prune in (("plain", False), ("prune", True)):
        db = work / f"optuna-{name}.db"  # a fresh study each invocation
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        cfgs[name] = OptimizeConfig(run_id=src["run_id"], window=args.window, basis="both", strategy=args.strategy,
                                    n_trials=args.n_trials, search_samples=args.search_samples, search_seeds=1,
                                    final_samples=args.final_samples, final_seeds=args.final_seeds, top_k=1,
                                    seed=args.seed,
                                    device="cpu", storage=f"sqlite:///{db}", tracking_uri=uri, register=False,
                                    prune=prune, score_cache=False)  # every score computed: timings comparable
        reports[name] = run_optimize(cfgs[name], log=lambda m, n=name: log(f"  {n}: {m}"))
        figures[name] = study_figures(reports[name], cfgs[name].storage, args.search_samples, 1)
        log(f"{name}: search {figures[name]['search_seconds']:.1f} s, {figures[name]['pruned']} pruned, "
            f"best {figures[name]['best_search_fid']:.3f} (trial {figures[name]['best_trial']})")

    from lcsc_ops.search.trials import RungPruner

    pruner = RungPruner()
    res = {
        "config": {k: v for k, v in dataclasses.asdict(cfgs["prune"]).items()
                   if k not in ("run_id", "storage", "tracking_uri")},
        "source": src["source"], "run_id": src["run_id"],
        "rung_counts": rung_counts(args.search_samples, cfgs["prune"].prune_rungs),
        "pruner": f"RungPruner: median (percentile {pruner.percentile:g}) of the complete trials at the same count, "
                  f"after {pruner.n_startup_trials} complete trials",
        "plain": figures["plain"], "prune": figures["prune"],
        "comparison": compare(reports["plain"], reports["prune"], figures["plain"], figures["prune"]),
        "unpruned_top_in_pruned_search": fates(reports, {n: c.storage for n, c in cfgs.items()}),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "load_start": load_start, "load_end": os.getloadavg(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    res["wall_seconds"] = time.perf_counter() - t0
    res["verdict"] = verdict(res)
    # One entry per strategy: a later `--strategy X` run replaces X's entry and keeps the others.
    runs = {} if args.no_write or not results.exists() else json.loads(results.read_text()).get("runs", {})
    runs[args.strategy if args.seed == 0 else f"{args.strategy} (seed {args.seed})"] = res
    if not args.no_write:
        results.parent.mkdir(exist_ok=True)
        results.write_text(json.dumps({"runs": runs}, indent=1))
        write_results_md(markdown(runs))
    print(markdown(runs))


if __name__ == "__main__":
    main()
