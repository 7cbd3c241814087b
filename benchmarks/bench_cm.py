"""`make bench-cm`: does merging a shorter consistency-model training match the full one (the paper's claim)?

The CM recipe (iCT) trains for the full budget and for 1/8, 1/4 and 1/2 of it, each a run of
its own (the iCT curriculum spans each run's own length), every run logging checkpoints at
the same interval over its last `window` steps. On every run: `optimize --nfe 1` (the merge
searched and scored at 1 step; every baseline also at the spec's 2) and `optimize` at the
spec's 2 steps. Each shorter run's merge is compared with the strongest baseline of the full
run, at 1 step and at 2 steps, on the same fresh final seeds. The speed-up of the smallest
fraction that matches is the paper's accounting: full training steps / (short training steps
+ the whole 1-step optimization's wall time in training-step equivalents of the full run).

The same follows for consistency distillation from bench-quality's DDPM run (its training EMA
imported here as the teacher); `--no-cd` skips it (iCT and CD together: 49 min on 2 cores).

Figures: benchmarks/results/quality.json (`cm_shorter`), the section "Consistency training
cost" of benchmarks/RESULTS.md. Everything runs in this process, one step after another (the
training and the searches on the same two threads, so their times compare).
"""
from __future__ import annotations

import time
from typing import Any

from _stage_bench import StageBench, fmt, load_text, log, main_args, optimize, update_results, write_section

HEADING = "## Consistency training cost (make bench-cm)"
BASELINES = ("last", "training_ema", "ema_star", "uniform")
RECIPES: dict[str, dict[str, Any]] = {
    # bench-quality's CM recipe (iCT, 3,000 steps, s1 = 160, EMA 0.999, spec sampling 2 steps), checkpoints
    # every 25 steps over the last 12 (so the 1/8 run, 375 steps, has the same window as the others).
    # ~35 min on 2 idle cores: training ~9 min, 8 optimizations of 200 trials at 1 or 2 steps.
    "full": dict(steps=3000, fractions=(0.125, 0.25, 0.5), every=25, window=12, ema_decay=0.999,
                 cm_settings={"s1": 160}, sampler_steps=2, blocks=6, basis="both", radius=0.3, n_trials=200,
                 search_samples=1000, search_seeds=2, final_samples=2000, final_seeds=10, top_k=3),
    "quick": dict(steps=160, fractions=(0.125, 0.25, 0.5), every=5, window=4, ema_decay=0.99, cm_settings={"s1": 40},
                  sampler_steps=2, blocks=2, basis="both", radius=0.3, n_trials=4, search_samples=150, search_seeds=1,
                  final_samples=200, final_seeds=2, top_k=2),
}


class CmBench(StageBench):
    def run(self, cd: bool) -> dict[str, Any]:
        out = self.family("ict", None)
        if cd:
            teacher = self.ddpm_run(1, label="teacher")
            out["cd"] = self.family("cd", teacher["run_id"])
        else:
            out["cd"] = "skipped (--no-cd)"
        out.update(recipe=self.state["recipe"], wall_seconds=self.elapsed(), load_mean=self.load_mean())
        return out

    def family(self, kind: str, teacher: str | None) -> dict[str, Any]:
        r = self.r
        runs = {}
        for frac in (1.0, *r["fractions"]):
            run = self.stage(f"train:{kind}:{frac}", lambda frac=frac: self.train(kind, frac, teacher))
            for nfe in (1, r["sampler_steps"]):
                self.stage(f"opt:{kind}:{frac}:{nfe}", lambda run=run, frac=frac, nfe=nfe: self.optimize(
                    kind, frac, run["run_id"], nfe))
            runs[frac] = run
        return self.summary(kind, runs)

    def train(self, kind: str, frac: float, teacher: str | None) -> dict[str, Any]:
        from lcsc_ops.training import TrainConfig, train

        r = self.r
        steps = int(round(r["steps"] * frac / r["every"])) * r["every"]
        cfg = TrainConfig(steps=steps, checkpoint_every=r["every"],
                          checkpoint_start=max(r["every"], steps - (r["window"] - 1) * r["every"]),
                          ema_decay=r["ema_decay"], seed=0, model_kind="consistency", sampler_steps=r["sampler_steps"],
                          cm_settings=dict(r["cm_settings"]), teacher_run=teacher, experiment="bench-cm",
                          run_name=f"{kind}-{frac}", tracking_uri=self.uri)
        t = time.perf_counter()
        run_id = train(cfg)
        seconds = time.perf_counter() - t
        log(f"  {kind} {frac}: {steps} steps in {seconds:.0f} s")
        return {"run_id": run_id, "steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps}

    def optimize(self, kind: str, frac: float, run_id: str, nfe: int) -> dict[str, Any]:
        r = self.r
        cfg = self.config(run_id, window=r["window"], basis=r["basis"], strategy="cmaes", n_trials=r["n_trials"],
                          radius=r["radius"], blocks=r["blocks"], search_samples=r["search_samples"],
                          search_seeds=r["search_seeds"], final_samples=r["final_samples"],
                          final_seeds=r["final_seeds"], top_k=r["top_k"], seed=0,
                          nfe=None if nfe == r["sampler_steps"] else nfe)
        rep = optimize(self.work, f"{kind}-{frac}-nfe{nfe}", cfg)
        m, best = rep["methods"], rep["best_lcsc"]
        return {"wall_seconds": rep["wall_seconds"], "search_seconds": rep["search_seconds"], "lcsc_method": best,
                "lcsc_final_mean": m[best]["final_mean"], "lcsc_final": m[best]["final"],
                "baselines": {b: m[b]["final_mean"] for b in BASELINES if b in m},
                "baselines_final": {b: m[b]["final"] for b in BASELINES if b in m}}

    def summary(self, kind: str, runs: dict[float, Any]) -> dict[str, Any]:
        from lcsc_ops.pipeline.candidates import paired

        r, full = self.r, runs[1.0]
        per_step = full["seconds_per_step"]
        bars = {}
        for nfe in (1, r["sampler_steps"]):
            b = self.state[f"opt:{kind}:1.0:{nfe}"]["baselines"]
            name = min(b, key=b.get)
            bars[nfe] = (name, b[name], self.state[f"opt:{kind}:1.0:{nfe}"]["baselines_final"][name])
        tried: dict[str, Any] = {}
        for frac in (*r["fractions"], 1.0):
            row: dict[str, Any] = {"steps": runs[frac]["steps"], "train_seconds": runs[frac]["seconds"]}
            for nfe in (1, r["sampler_steps"]):
                o = self.state[f"opt:{kind}:{frac}:{nfe}"]
                diff, se = paired(o["lcsc_final"], bars[nfe][2])
                row[str(nfe)] = {"lcsc_final_mean": o["lcsc_final_mean"], "lcsc_method": o["lcsc_method"],
                                 "baselines": o["baselines"], "matched": o["lcsc_final_mean"] <= bars[nfe][1],
                                 "paired_vs_full_baseline": {"diff_mean": diff, "diff_se": se},
                                 "optimize_seconds": o["wall_seconds"]}
            search_steps = self.state[f"opt:{kind}:{frac}:1"]["wall_seconds"] / per_step
            row["search_step_equivalents"] = search_steps
            row["speedup"] = r["steps"] / (runs[frac]["steps"] + search_steps)
            tried[repr(frac)] = row
        matched = [f for f in r["fractions"] if tried[repr(f)]["1"]["matched"]]
        frac = min(matched) if matched else None
        at = tried[repr(frac if frac is not None else min(r["fractions"]))]
        return {"fraction": frac, "speedup": at["speedup"] if frac is not None else None,
                "lcsc_final_mean": at["1"]["lcsc_final_mean"], "full_baseline_final_mean": bars[1][1],
                "full_baseline_method": bars[1][0], "full_baseline_2step_final_mean": bars[r["sampler_steps"]][1],
                "full_baseline_2step_method": bars[r["sampler_steps"]][0],
                "ok": frac is not None and frac <= 0.25, "full_steps": r["steps"],
                "full_train_seconds_per_step": per_step, "tried": tried, "kind": kind}


def markdown(res: dict[str, Any]) -> str:
    r = res["recipe"]
    lines = [HEADING, "",
             f"Recipe: digits consistency model (iCT, s1 = {r['cm_settings'].get('s1')}, EMA {r['ema_decay']}, spec "
             f"sampling {r['sampler_steps']} steps) trained for {r['steps']} steps and for "
             + ", ".join(str(f) for f in r["fractions"]) + f" of them, each run its own curriculum, checkpoints "
             f"(raw + EMA) every {r['every']} steps over its last {r['window']}; per run `optimize --nfe 1` and "
             f"`optimize` at {r['sampler_steps']} steps (CMA-ES, {r['n_trials']} trials, basis {r['basis']}, "
             f"{r['blocks']} blocks per kind, search FID at {r['search_samples']} samples × {r['search_seeds']} fixed "
             f"seeds, top {r['top_k']} + their average), final FID at {r['final_samples']} samples on "
             f"{r['final_seeds']} fresh paired seeds. Wall time {res['wall_seconds'] / 60:.1f} min ({load_text(res)}); training "
             f"{res['full_train_seconds_per_step'] * 1000:.0f} ms/step.", ""]
    lines += _table(res, r["sampler_steps"])
    cd = res["cd"]
    if isinstance(cd, str):
        lines += ["", f"Consistency distillation: {cd}."]
    else:
        lines += ["", "Consistency distillation from bench-quality's DDPM (its training EMA as the teacher), the "
                      "same runs and searches:", ""] + _table(cd, r["sampler_steps"])
    return "\n".join(lines) + "\n"


def _table(res: dict[str, Any], two: int) -> list[str]:
    lines = [f"| training | LCSC @ 1 step | strongest baseline of the run @ 1 | LCSC @ {two} steps | "
             f"speed-up (1 step, search counted) |", "|---|---|---|---|---|"]
    for f, row in res["tried"].items():
        one, tw = row["1"], row[str(two)]
        p = one["paired_vs_full_baseline"]
        lines.append(f"| {f} ({row['steps']} steps) | {fmt(one['lcsc_final_mean'])} ({'match' if one['matched'] else 'no'}; "
                     f"{fmt(p['diff_mean'])} ± {fmt(p['diff_se'])}) | {fmt(min(one['baselines'].values()))} | "
                     f"{fmt(tw['lcsc_final_mean'])} ({'match' if tw['matched'] else 'no'}) | {row['speedup']:.2f}× |")
    lines += ["", f"Bar: the full run's strongest baseline, {res['full_baseline_method']} {fmt(res['full_baseline_final_mean'])} "
                  f"at 1 step, {res['full_baseline_2step_method']} {fmt(res['full_baseline_2step_final_mean'])} at {two} "
                  f"steps (LCSC − bar ± paired se in brackets). Smallest fraction that matched at 1 step: "
                  f"{res['fraction'] if res['fraction'] is not None else 'none'}"
                  + (f", speed-up {res['speedup']:.2f}×" if res["speedup"] else "") + "."]
    return lines


def main() -> None:
    import json

    ap = main_args(__doc__)
    ap.add_argument("--no-cd", dest="cd", action="store_false", help="skip consistency distillation (iCT only)")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    bench = CmBench("cm", mode, RECIPES[mode], args.fresh)
    res = bench.run(args.cd)
    (bench.work / "cm.json").write_text(json.dumps(res, indent=1))
    section = markdown(res)
    if mode == "full":
        update_results({"cm_shorter": res})
        write_section(HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
