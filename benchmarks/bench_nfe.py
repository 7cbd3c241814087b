"""`make bench-nfe`: does the merged DDPM sampled at 9 steps match the strongest baseline at 15?

The paper's setting: bench-quality's DDPM run (its last `window` checkpoint steps) is imported
here once per sampler, with a spec that samples at 15 steps (DDIM, and DPM-Solver++ 2M
"dpmpp-2m" with its default "ddim" spacing); `optimize --nfe 9` (and 12) searches the merge
at fewer steps and scores every baseline at the spec's 15 as well, on the same fresh final
seeds. The training EMA at bench-quality's extra decays is scored at 15 steps too, so the bar
is the strongest of them all. Each sampler is compared with its own base at 15 steps; the
searches run in two processes of one thread each.

Figures: benchmarks/results/quality.json (`nfe`), the section "Fewer sampling steps" of
benchmarks/RESULTS.md. `--quick` checks the plumbing in a few minutes (base 6 steps, tries 3, 4).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _stage_bench import StageBench, fmt, load_text, main_args, optimize, update_results, write_section

HEADING = "## Fewer sampling steps (make bench-nfe)"
BASELINES = ("last", "training_ema", "ema_star", "uniform")
RECIPES: dict[str, dict[str, Any]] = {
    # Sized for ~35 min on 2 idle cores (RESULTS.md): per sampler, 150 trials at 9 and at 12 steps, search
    # FID at 1,000 samples x 2 fixed seeds (what bench-quality found the gain needs), final FID at 2,000
    # samples on 5 fresh paired seeds; the two samplers in two one-thread processes.
    "full": dict(window=40, blocks=8, basis="both", radius=0.3, base_nfe=15, tries=(9, 12),
                 samplers=("ddim", "dpmpp-2m"), n_trials=150, search_samples=1000, search_seeds=2,
                 final_samples=2000, final_seeds=5, top_k=3, workers=2),
    "quick": dict(window=4, blocks=2, basis="both", radius=0.3, base_nfe=6, tries=(3, 4), samplers=("ddim", "dpmpp-2m"),
                  n_trials=5, search_samples=150, search_seeds=1, final_samples=200, final_seeds=2, top_k=2, workers=2),
}


def optimize_task(work: str, name: str, cfg: Any) -> dict[str, Any]:
    """One `optimize --nfe N` (in a worker process): the figures the table needs."""
    rep = optimize(Path(work), name, cfg)
    m = rep["methods"]
    best = rep["best_lcsc"]
    return {"report": f"reports/{name}.json", "wall_seconds": rep["wall_seconds"],
            "search_seconds": rep["search_seconds"], "nfe": rep["nfe"], "lcsc_method": best,
            "lcsc_final_mean": m[best]["final_mean"], "lcsc_final": m[best]["final"],
            "lcsc_second_metric_mean": m[best]["second_metric_mean"],
            "baselines_at_nfe": {b: m[b]["final_mean"] for b in BASELINES if b in m},
            "baselines_at_base": {b: m[b]["final_default_nfe_mean"] for b in BASELINES if b in m},
            "ema_star_note": m.get("ema_star", {}).get("note")}


def emas_task(cfg: Any, extra_ema: str, decays: list[float], cache_dir: str) -> dict[str, Any]:
    """The training EMA at bench-quality's extra decays, at the spec's own steps, on the final seeds."""
    from _quality_eval import ProtocolScorer, local_entry

    from lcsc_ops.store.fetch import fetch_window

    win = fetch_window(cfg.run_id, window=1, tracking_uri=cfg.tracking_uri)
    paths = [Path(extra_ema) / f"ema-{d}.safetensors" for d in decays]
    paths = [p for p in paths if p.exists()]
    if not paths:
        return {}
    ps = ProtocolScorer(cfg, win.spec, [local_entry(p, win.steps[-1]) for p in paths], Path(cache_dir))
    out = {}
    for i, p in enumerate(paths):
        final, second = ps.final(ps.one_hot(i))
        out[f"training_ema@{p.stem[4:]}"] = {"final": final, "final_mean": statistics.fmean(final),
                                            "second_metric_mean": statistics.fmean(second) if second else None}
    return out


class NfeBench(StageBench):
    def run(self) -> dict[str, Any]:
        r = self.r
        runs = {s: self.ddpm_run(r["window"], {"name": s, "steps": r["base_nfe"]}, label=s) for s in r["samplers"]}
        tasks: dict[str, tuple] = {}
        for n in r["tries"]:
            for s in r["samplers"]:
                tasks[f"opt:{s}:{n}"] = (str(self.work), f"{s}-nfe{n}", self.cfg(runs[s]["run_id"], nfe=n))
        done = self.parallel(tasks, optimize_task, r["workers"])
        emas = self.parallel({f"emas:{s}": (self.cfg(runs[s]["run_id"]), runs[s]["extra_ema"], runs[s]["extra_decays"],
                                            str(self.work / "cache")) for s in r["samplers"]}, emas_task, r["workers"])
        return self.summary(runs, done, emas)

    def cfg(self, run_id: str, **kw: Any):
        r = self.r
        return self.config(run_id, window=r["window"], basis=r["basis"], strategy="cmaes", n_trials=r["n_trials"],
                           radius=r["radius"], blocks=r["blocks"], search_samples=r["search_samples"],
                           search_seeds=r["search_seeds"], final_samples=r["final_samples"],
                           final_seeds=r["final_seeds"], top_k=r["top_k"], seed=0, **kw)

    def summary(self, runs: dict[str, Any], done: dict[str, Any], emas: dict[str, Any]) -> dict[str, Any]:
        r, base_n = self.r, str(self.r["base_nfe"])
        samplers: dict[str, Any] = {}
        for s in r["samplers"]:
            first = done[f"opt:{s}:{min(r['tries'])}"]
            at_base = {**first["baselines_at_base"], **{k: v["final_mean"] for k, v in emas[f"emas:{s}"].items()}}
            bar = min(at_base, key=at_base.get)
            row: dict[str, Any] = {"settings": runs[s]["sampler"],
                                   base_n: {"base_final_mean": at_base[bar], "base_method": bar, "baselines": at_base}}
            for n in r["tries"]:
                d = done[f"opt:{s}:{n}"]
                row[str(n)] = {k: d[k] for k in ("lcsc_final_mean", "lcsc_method", "lcsc_final",
                                                 "lcsc_second_metric_mean", "baselines_at_nfe", "search_seconds",
                                                 "wall_seconds")}
                row[str(n)]["matched"] = d["lcsc_final_mean"] <= at_base[bar]
                row[str(n)]["vs_base"] = d["lcsc_final_mean"] / at_base[bar]
            matched = [n for n in r["tries"] if row[str(n)]["matched"]]
            row["fewest_matched"] = min(matched) if matched else None
            samplers[s] = row
        # Headline: the sampler reaching its own base with the fewest steps (the spec's default, DDIM, on a tie).
        reached = [s for s in r["samplers"] if samplers[s]["fewest_matched"] is not None]
        head = min(reached, key=lambda s: samplers[s]["fewest_matched"]) if reached else r["samplers"][0]
        n_best = samplers[head]["fewest_matched"]
        low = str(min(r["tries"]))
        cross = {f"{s}@{low} vs {t}@{base_n}": samplers[s][low]["lcsc_final_mean"] / samplers[t][base_n]["base_final_mean"]
                 for s in r["samplers"] for t in r["samplers"] if s != t}
        return {"base_nfe": r["base_nfe"], "sampler": head, "base_final_mean": samplers[head][base_n]["base_final_mean"],
                "base_method": samplers[head][base_n]["base_method"], "lcsc_nfe": n_best,
                "lcsc_final_mean": samplers[head][str(n_best or min(r["tries"]))]["lcsc_final_mean"],
                "ok": n_best is not None and n_best <= 9 * r["base_nfe"] / 15, "samplers": samplers,
                "cross_sampler_ratio": cross, "source": {k: runs[r["samplers"][0]][k] for k in
                                                         ("source_run_id", "steps", "train_seconds", "train")},
                "recipe": self.state["recipe"], "wall_seconds": self.elapsed(), "load_mean": self.load_mean()}


def markdown(res: dict[str, Any]) -> str:
    r, src, b = res["recipe"], res["source"], str(res["base_nfe"])
    lines = [HEADING, "",
             f"Recipe: bench-quality's digits DDPM ({src['train']['steps']} steps), its last {r['window']} checkpoint "
             f"steps ({src['steps'][0]}..{src['steps'][-1]}, raw + EMA) imported once per sampler with a spec that "
             f"samples at {b} steps; `optimize --nfe N` (CMA-ES, {r['n_trials']} trials, basis {r['basis']}, "
             f"{r['blocks']} blocks per kind, search FID at {r['search_samples']} samples × {r['search_seeds']} fixed "
             f"seeds, top {r['top_k']} + their average re-scored), final FID at {r['final_samples']} samples on "
             f"{r['final_seeds']} fresh paired seeds, the baselines (and the training EMA at bench-quality's extra "
             f"decays) at {b} steps on the same seeds. Wall time {res['wall_seconds'] / 60:.1f} min ({load_text(res)}).",
             "", f"| sampler | strongest baseline @ {b} | "
             + " | ".join(f"LCSC @ {n} (vs base @ {b})" for n in r["tries"])
             + " | " + " | ".join(f"strongest baseline @ {n}" for n in r["tries"]) + " |",
             "|---|---|" + "---|" * (2 * len(r["tries"]))]
    for s, row in res["samplers"].items():
        cells = [f"{fmt(row[b]['base_final_mean'])} ({row[b]['base_method']})"]
        cells += [f"{fmt(row[str(n)]['lcsc_final_mean'])} ({row[str(n)]['vs_base']:.2f}×"
                  f"{', match' if row[str(n)]['matched'] else ''})" for n in r["tries"]]
        cells += [fmt(min(row[str(n)]["baselines_at_nfe"].values())) for n in r["tries"]]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", f"Headline ({res['sampler']}): base at {b} steps {fmt(res['base_final_mean'])} ({res['base_method']}); "
                  f"fewest steps at which the merge matched it: {res['lcsc_nfe'] or 'none tried'}"
                  f" (LCSC {fmt(res['lcsc_final_mean'])}). Across samplers (LCSC / other sampler's base): "
              + ", ".join(f"{k} {v:.2f}×" for k, v in res["cross_sampler_ratio"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import json

    ap = main_args(__doc__)
    ap.add_argument("--tries", help="comma-separated step counts to search (default: the recipe's); a rerun "
                                    "with more resumes")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    recipe = dict(RECIPES[mode])
    if args.tries:
        recipe["tries"] = tuple(int(n) for n in args.tries.split(","))
    bench = NfeBench("nfe", mode, recipe, args.fresh)
    res = bench.run()
    (bench.work / "nfe.json").write_text(json.dumps(res, indent=1))
    section = markdown(res)
    if mode == "full":
        update_results({"nfe": res})
        write_section(HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
