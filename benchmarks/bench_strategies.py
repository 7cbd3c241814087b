"""`make bench-strategies`: which search strategy registers the best merge at equal trial budgets?

Every strategy of the registry runs one full-length search per search seed on bench-quality's
DDPM run (its last `window` checkpoint steps imported here), through the library
(`run_optimize`, nothing registered). What the product would register after k trials is then
reproduced from the study: the top-k trials by search FID among the start trial (the strongest
baseline, the centre of the box) and the first k searched trials, scored on the fresh final
seeds, against the baselines on the same seeds; the best of them is the winner, as
`pick_candidates` + `final_evaluation` + `build_report` choose it at the end of a search.
Identical coefficient sets hit the score cache, so a top trial that stays the top trial is
scored once. The searches run in two processes of one thread each.

Figures: benchmarks/results/quality.json (`strategies.<name>.final_at_budget`,
`default_strategy`), a plot at benchmarks/results/strategies.png, the section "Strategies at
equal budgets" of benchmarks/RESULTS.md. `--quick` checks the plumbing in a few minutes.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from _stage_bench import (HERE, StageBench, fmt, load_text, log, main_args, optimize, spread, update_results,
                          write_section)

HEADING = "## Strategies at equal budgets (make bench-strategies)"
STRATEGIES = ("cmaes", "gp", "tpe", "random", "evolution")
RECIPES: dict[str, dict[str, Any]] = {
    # Sized for ~40 min on 2 idle cores: 5 strategies x 5 search seeds x 150 trials in two one-thread
    # processes; search FID at 400 samples x 1 fixed seed (64-d features), the winners' final FID at 1,000
    # samples on 3 fresh seeds; top_k 1 (what the product registers with --top-k 1: the best trial by
    # search FID or, if it scores worse on the final seeds, the strongest baseline).
    "full": dict(window=40, blocks=8, basis="both", radius=0.3, n_trials=150, budgets=(25, 50, 100, 150),
                 strategies=STRATEGIES, seeds=(0, 1, 2, 3, 4), search_samples=400, search_seeds=1,
                 final_samples=1000, final_seeds=3, top_k=1, workers=2),
    "quick": dict(window=4, blocks=2, basis="both", radius=0.3, n_trials=8, budgets=(3, 5, 8), strategies=STRATEGIES,
                  seeds=(0, 1), search_samples=100, search_seeds=1, final_samples=200, final_seeds=2, top_k=1,
                  workers=2),
}


def search_task(work: str, name: str, cfg: Any, budgets: tuple[int, ...]) -> dict[str, Any]:
    """One search (in a worker process), then the product's choice after each budget."""
    t = time.perf_counter()
    report = optimize(Path(work), name, cfg)
    out = {"report": f"reports/{name}.json", "search_seconds": report["search_seconds"],
           "trials": report["trials"], "winner_at_end": report["winner"],
           "winner_at_end_final_mean": report["methods"][report["winner"]]["final_mean"]}
    out["at_budget"] = winners_at_budgets(cfg, report, budgets)
    out["wall_seconds"] = time.perf_counter() - t
    last = out["at_budget"][str(max(budgets))]
    if abs(last["final_mean"] - out["winner_at_end_final_mean"]) > 1e-9 and max(budgets) == cfg.n_trials:
        log(f"  {name}: the reproduced choice at {max(budgets)} trials ({last['winner']}) differs from the "
            f"product's ({report['winner']})")
    return out


def winners_at_budgets(cfg: Any, report: dict[str, Any], budgets: tuple[int, ...]) -> dict[str, Any]:
    from lcsc_ops.pipeline.candidates import Candidate, average_coefficients
    from lcsc_ops.pipeline.optimize import final_evaluation, prepare
    from lcsc_ops.search.study import SearchStudy

    job = prepare(cfg, lambda m: None)
    records = SearchStudy.open(report["study"], cfg.storage).records()
    start = [t for t in records if t.start is not None and t.value is not None]
    searched = [t for t in records if t.start is None and t.state == "COMPLETE"]  # one worker: in trial order
    base = {n: r for n, r in report["methods"].items() if r["kind"] == "baseline"}
    out = {}
    for k in budgets:
        top = sorted(start + searched[:k], key=lambda t: t.value)[:cfg.top_k]
        cands = [Candidate(f"lcsc_top{i + 1}", tuple(job.basis), tuple(t.coefficients), "lcsc", search_fid=t.value,
                           note=f"trial {t.number}") for i, t in enumerate(top)]
        if len(cands) > 1:  # its search score does not enter the choice: not computed
            cands.append(Candidate("lcsc_avg", tuple(job.basis), tuple(average_coefficients([c.coeffs for c in cands])),
                                   "lcsc", note=f"mean of top {len(cands)}"))
        final_evaluation(job, cands)
        rows = {**{n: (r["final_mean"], r["note"]) for n, r in base.items()},
                **{c.name: (c.final_mean, c.note) for c in cands}}
        winner = min(rows, key=lambda n: rows[n][0])
        out[str(k)] = {"winner": winner, "note": rows[winner][1], "final_mean": rows[winner][0],
                       "lcsc_top1_final_mean": cands[0].final_mean, "lcsc_top1_trial": cands[0].note,
                       "best_search": top[0].value, "searched": len(searched[:k])}
    return out


class StrategiesBench(StageBench):
    def run(self) -> dict[str, Any]:
        r = self.r
        src = self.ddpm_run(r["window"])
        tasks = {}
        for seed in r["seeds"]:
            for s in r["strategies"]:
                cfg = self.config(src["run_id"], window=r["window"], basis=r["basis"], strategy=s,
                                  n_trials=r["n_trials"], radius=r["radius"], blocks=r["blocks"],
                                  search_samples=r["search_samples"], search_seeds=r["search_seeds"],
                                  final_samples=r["final_samples"], final_seeds=r["final_seeds"], top_k=r["top_k"],
                                  seed=seed)
                tasks[f"search:{s}:{seed}"] = (str(self.work), f"{s}-s{seed}", cfg, tuple(r["budgets"]))
        done = self.parallel(tasks, search_task, r["workers"])
        return self.summary(src, done)

    def summary(self, src: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
        r = self.r
        first = self.report_of(next(iter(done.values())))
        base = {n: m["final_mean"] for n, m in first["methods"].items() if m["kind"] == "baseline"}
        out: dict[str, Any] = {}
        for s in r["strategies"]:
            runs = {seed: done[f"search:{s}:{seed}"] for seed in r["seeds"]}
            at = {}
            for k in r["budgets"]:
                rows = {seed: v["at_budget"][str(k)] for seed, v in runs.items()}
                at[str(k)] = {**spread([row["final_mean"] for row in rows.values()]),
                              "per_seed": {str(seed): row["final_mean"] for seed, row in rows.items()},
                              "winners": {str(seed): row["winner"] for seed, row in rows.items()},
                              "lcsc_top1": spread([row["lcsc_top1_final_mean"] for row in rows.values()]),
                              "best_search_median": statistics.median(row["best_search"] for row in rows.values())}
            out[s] = {"final_at_budget": at, "search_seeds_run": list(r["seeds"]),
                      "search_seconds_median": statistics.median(v["search_seconds"] for v in runs.values()),
                      "search_seconds_per_seed": [v["search_seconds"] for v in runs.values()]}
        ref = 100 if 100 in r["budgets"] else sorted(r["budgets"])[len(r["budgets"]) // 2]
        default = min(r["strategies"], key=lambda s: out[s]["final_at_budget"][str(ref)]["median"])
        return {"strategies": out, "default_strategy": default, "default_strategy_budget": ref,
                "baselines_final_mean": base, "strongest_baseline": min(base, key=base.get),
                "source": {k: src[k] for k in ("source_run_id", "steps", "train_seconds", "train")},
                "recipe": self.state["recipe"], "wall_seconds": self.elapsed(), "load_mean": self.load_mean()}

    def report_of(self, task: dict[str, Any]) -> dict[str, Any]:
        import json

        return json.loads((self.work / task["report"]).read_text())


def plot(res: dict[str, Any], path: Path) -> bool:
    """Median final FID of the registered merge per budget, min-max bars, one line per strategy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    budgets = [int(k) for k in next(iter(res["strategies"].values()))["final_at_budget"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (s, v) in enumerate(res["strategies"].items()):
        rows = [v["final_at_budget"][str(k)] for k in budgets]
        x = [k * (1 + 0.015 * (i - 2)) for k in budgets]  # side by side, so the bars do not hide each other
        med = [row["median"] for row in rows]
        ax.errorbar(x, med, yerr=[[m - row["min"] for m, row in zip(med, rows)],
                                  [row["max"] - m for m, row in zip(med, rows)]], marker="o", capsize=3, label=s)
    b = res["strongest_baseline"]
    ax.axhline(res["baselines_final_mean"][b], color="grey", ls="--", label=f"{b} (strongest baseline)")
    ax.set_xlabel("trials")
    ax.set_ylabel("final FID of the registered merge")
    ax.set_xticks(budgets)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_title(f"median and min-max over {len(res['recipe']['seeds'])} search seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(res: dict[str, Any], image: str | None) -> str:
    r, src = res["recipe"], res["source"]
    budgets = [str(k) for k in r["budgets"]]
    lines = [HEADING, "",
             f"Recipe: bench-quality's digits DDPM ({src['train']['steps']} steps), its last {r['window']} checkpoint "
             f"steps ({src['steps'][0]}..{src['steps'][-1]}, raw + EMA) imported; basis {r['basis']}, {r['blocks']} "
             f"blocks per kind, radius {r['radius']}. Each strategy: {len(r['seeds'])} search seeds × {r['n_trials']} "
             f"trials, search FID at {r['search_samples']} samples × {r['search_seeds']} fixed seed(s); the merge the "
             f"product would register after k trials (top {r['top_k']} of the start trial and the first k trials by "
             f"search FID, then the best of them and the baselines on the final seeds) scored at {r['final_samples']} "
             f"samples on {r['final_seeds']} fresh paired seeds. Two processes of one thread; wall time "
             f"{res['wall_seconds'] / 60:.1f} min ({load_text(res)}). Baselines (final FID): "
             + ", ".join(f"{n} {fmt(v)}" for n, v in res["baselines_final_mean"].items()) + ".",
             "", "| strategy | " + " | ".join(f"{k} trials" for k in budgets) + " | search s (median) |",
             "|---|" + "---|" * len(budgets) + "---|"]
    for s, v in res["strategies"].items():
        cells = [f"{fmt(v['final_at_budget'][k]['median'])} [{fmt(v['final_at_budget'][k]['min'])}–"
                 f"{fmt(v['final_at_budget'][k]['max'])}]" for k in budgets]
        label = s + (" ★" if s == res["default_strategy"] else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fmt(v['search_seconds_median'], 0)} |")
    lines += ["", f"Cells: final FID of the registered merge, median [min–max] over the search seeds. ★ "
                  f"`default_strategy` = best median at {res['default_strategy_budget']} trials: "
                  f"{res['default_strategy']}."]
    full = len(RECIPES["full"]["seeds"])
    if len(r["seeds"]) < full:
        lines += ["", f"Search seeds: the first {len(r['seeds'])} of the recipe's {full} (`--seeds {len(r['seeds'])}`): "
                      "a rerun with more resumes."]
    fell = {s: {k: sum(not w.startswith("lcsc") for w in v["final_at_budget"][k]["winners"].values()) for k in budgets}
            for s, v in res["strategies"].items()}
    lines += ["", "Searches whose best trial lost to a baseline on the fresh seeds (the product then registers the "
                  "baseline), per budget: " + "; ".join(f"{s} " + "/".join(str(fell[s][k]) for k in budgets)
                                                       for s in fell)
              + f" of {len(r['seeds'])}. Search FID at {r['search_samples']} samples is noisy: the more trials, "
                "the more a search's best trial owes to that noise (the winner's curse)."]
    if image:
        lines += ["", f"![final FID by trial budget]({image})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = main_args(__doc__)
    ap.add_argument("--seeds", type=int, help="run the recipe's first N search seeds (a rerun with more resumes)")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    recipe = dict(RECIPES[mode])
    if args.seeds:
        recipe["seeds"] = recipe["seeds"][:args.seeds]
    bench = StrategiesBench("strategies", mode, recipe, args.fresh)
    res = bench.run()
    (bench.work / "strategies.json").write_text(__import__("json").dumps(res, indent=1))
    png = (HERE / "results" / "strategies.png") if mode == "full" else bench.work / "strategies.png"
    image = "results/strategies.png" if plot(res, png) and mode == "full" else None
    section = markdown(res, image)
    if mode == "full":
        update_results({"strategies": {s: {"final_at_budget": v["final_at_budget"],
                                           "search_seeds_run": v["search_seeds_run"],
                                           "budget_search_seconds_median": v["search_seconds_median"]}
                                       for s, v in res["strategies"].items()},
                        "default_strategy": res["default_strategy"],
                        "strategies_at_budget": {k: v for k, v in res.items() if k != "strategies"}},
                       merge_keys=("strategies",))
        write_section(HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
