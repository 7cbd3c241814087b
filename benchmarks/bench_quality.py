"""`make bench-quality`: does LCSC beat the strongest baseline, and how fast do the strategies get there?

One fixed digits recipe trains once (sqlite MLflow store under benchmarks/work/); every
search strategy then runs through the library (`run_optimize`, nothing registered) with
the same trial budget, the same fixed search noise and the same fresh final seeds. Then:
extra search seeds for the trials-to-baseline comparison, the train-shorter use case
(merge the checkpoints of an early part of training) and the checkpoint-density check.
Figures go to benchmarks/results/quality.json, the table to benchmarks/RESULTS.md.

Every stage is saved in benchmarks/work/<mode>/state.json as soon as it finishes, so a
rerun resumes where a crash stopped it (``--fresh`` starts over). ``--quick`` runs a tiny
recipe in a couple of minutes to check the plumbing; it writes under work/quick and does
not touch the results files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# On a shared machine, spinning OpenMP threads of two torch processes starve each other
# (measured here: 1.7 training steps/s instead of 26); passive waiting degrades gracefully.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RECIPES: dict[str, dict[str, Any]] = {
    # Chosen with benchmarks/gpu_quality_probe.py on an H200 (benchmarks/results/gpu_probe.json): at 6k
    # steps the digits model sits near the FID floor of 1,000 samples and LCSC gains 12-14%; at 3k steps
    # (mid-training, the paper's regime) 23-38%; 60 trials on 1 search seed gain ~5% either way, 150-250
    # trials on 2 seeds is what it takes. `cm` is the consistency-model section (issue 4), `nfe_tries`
    # the step counts tried for the NFE-reduction row (fewest first). Stages past budget_s * 0.8 are
    # skipped (train-shorter's second fraction, the NFE row's second try, evolution's extra seeds);
    # BENCH_BUDGET_S=<seconds> on a rerun resumes and runs them. budget_s was 3300 until a run on a day the
    # machine was 17-30% slower per stage took 60.7 min (evolution's extra seeds still ran at 48.8 min);
    # 3000 skips them past 45 min.
    "full": dict(steps=3000, every=50, ema_decay=0.999, extra_decays=(0.99, 0.995, 0.998), window=40, blocks=8,
                 basis="both", radius=0.3, n_trials=150, search_samples=1000, search_seeds=2, final_samples=2000,
                 final_seeds=10, top_k=3, extra_seeds=(1, 2, 3, 4), extra_seed_trials=50, fractions=(0.5, 0.25, 0.75),
                 shorter_final_seeds=5, shorter_trials=100, density_seeds=3, density_intervals=(50, 250),
                 nfe_tries=(6, 8), nfe_trials=100, nfe_final_seeds=5,
                 cm=dict(steps=3000, sampler_steps=2, nfe=1, cm_settings={"s1": 160}), budget_s=3000),
    "quick": dict(steps=400, every=20, ema_decay=0.99, extra_decays=(0.95, 0.98), window=8, blocks=2, basis="both",
                  radius=0.3, n_trials=8, search_samples=200, search_seeds=1, final_samples=300, final_seeds=2,
                  top_k=2, extra_seeds=(1,), extra_seed_trials=6, fractions=(0.5, 0.25, 0.75),
                  shorter_final_seeds=2, shorter_trials=6, nfe_trials=6, nfe_final_seeds=2, density_seeds=2,
                  density_intervals=(20, 40), nfe_tries=(3, 5),
                  cm=dict(steps=300, sampler_steps=2, nfe=1, cm_settings={"s1": 40}), budget_s=600),
}
STRATEGIES = ("cmaes", "evolution", "random")
BASELINES = ("last", "training_ema", "ema_star", "uniform")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, mode: str, fresh: bool) -> None:
        self.mode, self.r = mode, dict(RECIPES[mode])
        if os.environ.get("BENCH_BUDGET_S"):  # time left for the optional stages (shorter's 2nd try, more seeds)
            self.r["budget_s"] = float(os.environ["BENCH_BUDGET_S"])
        self.work = HERE / "work" / mode
        if fresh and self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "reports").mkdir(parents=True, exist_ok=True)
        os.environ["LCSC_OPS_CACHE"] = str(self.work / "cache")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.chdir(self.work)  # MLflow puts the artifacts of a sqlite store under ./mlruns
        self.uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self.storage = None  # the product's default: optuna.journal beside mlflow.db
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        recipe = json.loads(json.dumps({k: v for k, v in self.r.items() if k != "budget_s"}))
        if self.state and self.state.get("recipe") != recipe:  # saved stages of another recipe: start over
            log(f"{self.work} holds stages of another recipe: starting over")
            shutil.rmtree(self.work)
            (self.work / "reports").mkdir(parents=True)
            os.chdir(self.work)  # the old folder was the working directory
            self.state = {}
        self.state["recipe"] = recipe
        self.t0 = time.perf_counter() - self.state.get("elapsed_s", 0.0)
        self.ran_any = False

    # --- bookkeeping ---------------------------------------------------------------------
    def save(self) -> None:
        self.state["elapsed_s"] = time.perf_counter() - self.t0
        self.state_path.write_text(json.dumps(self.state, indent=1))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, key: str, fn) -> Any:
        if key not in self.state:
            self.ran_any = True
            t = time.perf_counter()
            self.state[key] = fn()
            log(f"stage {key} done in {time.perf_counter() - t:.0f} s (total {self.elapsed():.0f} s)")
            self.save()
        return self.state[key]

    # --- stages --------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from _quality_eval import extra_online_emas

        from lcsc_ops.training import TrainConfig, train

        r = self.r
        cfg = TrainConfig(steps=r["steps"], checkpoint_every=r["every"], ema_decay=r["ema_decay"], seed=0,
                          experiment="bench-quality", run_name=f"bench-quality-{self.mode}", tracking_uri=self.uri)
        t = time.perf_counter()
        with extra_online_emas(r["extra_decays"], self.work / "extra_ema"):
            run_id = train(cfg)
        return {"run_id": run_id, "seconds": time.perf_counter() - t, "config": {
            k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "channels", "sampler_steps",
                                         "checkpoint_every", "ema_decay", "ema_warmup", "seed")}}

    def train_cm(self) -> dict[str, Any]:
        """The consistency model (iCT), trained and logged exactly like the diffusion run."""
        from lcsc_ops.training import TrainConfig, train

        r, c = self.r, self.r["cm"]
        cfg = TrainConfig(steps=c["steps"], checkpoint_every=r["every"], ema_decay=r["ema_decay"], seed=0,
                          model_kind="consistency", sampler_steps=c["sampler_steps"], cm_settings=dict(c["cm_settings"]),
                          experiment="bench-quality", run_name=f"bench-quality-cm-{self.mode}", tracking_uri=self.uri)
        t = time.perf_counter()
        run_id = train(cfg)
        return {"run_id": run_id, "seconds": time.perf_counter() - t,
                "config": {"steps": cfg.steps, "sampler_steps": cfg.sampler_steps, "cm_settings": cfg.cm_settings,
                           "checkpoint_every": cfg.checkpoint_every, "ema_decay": cfg.ema_decay}}

    def cm(self) -> dict[str, Any]:
        """Issue 4: the merged consistency model at 1 step against the baselines at 1 and 2 steps.

        The CM run's spec samples with 2 steps; `optimize --nfe 1` searches the merge for 1 step and
        scores every baseline at both (the --nfe report's `final_default_nfe`)."""
        c = self.r["cm"]
        run = self.stage("cm:train", self.train_cm)
        self.stage("cm:optimize", lambda: self.optimize("cm-cmaes", self.config(
            "cmaes", 0, run_id=run["run_id"], nfe=c["nfe"])))
        rep = self.report("cm-cmaes")
        m = rep["methods"]
        base = [b for b in BASELINES if b in m]
        b1 = min(base, key=lambda b: m[b]["final_mean"])
        b2 = min(base, key=lambda b: m[b]["final_default_nfe_mean"])
        best = rep["best_lcsc"]
        return {"run_id": run["run_id"], "train_seconds": run["seconds"], "train": run["config"],
                "base_1step": m[b1]["final_mean"], "base_1step_method": b1,
                "base_2step": m[b2]["final_default_nfe_mean"], "base_2step_method": b2,
                "lcsc_1step": m[best]["final_mean"], "lcsc_method": best,
                "lcsc_1step_second_metric": m[best]["second_metric_mean"],
                "baselines": {b: {"final_1step": m[b]["final_mean"], "final_2step": m[b]["final_default_nfe_mean"]}
                              for b in base},
                "ok": m[best]["final_mean"] < m[b2]["final_default_nfe_mean"]}

    def nfe(self, strongest: str, strongest_final: float) -> dict[str, Any]:
        """Issue 4: the fewest DDIM steps at which the merged model matches the strongest baseline at the
        spec's default step count (fewest tried first; a larger count only if the smaller one missed)."""
        r = self.r
        default = int(self.state["train"]["config"]["sampler_steps"])
        tried: dict[str, Any] = {}
        for n in sorted(r["nfe_tries"]):
            if tried and self.elapsed() > r["budget_s"] * 0.8 and f"nfe:{n}" not in self.state:
                break
            self.stage(f"nfe:{n}", lambda n=n: self.optimize(f"nfe{n}-cmaes", self.config(
                "cmaes", 0, nfe=n, n_trials=r["nfe_trials"], final_seeds=r["nfe_final_seeds"], top_k=2)))
            rep = self.report(f"nfe{n}-cmaes")
            best = rep["best_lcsc"]
            lc = rep["methods"][best]["final_mean"]
            tried[str(n)] = {"lcsc_final_mean": lc, "lcsc_method": best, "matched": lc <= strongest_final,
                             "baselines_at_nfe": {b: rep["methods"][b]["final_mean"] for b in BASELINES
                                                  if b in rep["methods"]}}
            log(f"  NFE {n}: LCSC {lc:.3f} vs {strongest} at {default} steps {strongest_final:.3f}")
            if lc <= strongest_final:
                break
        matched = [int(n) for n, v in tried.items() if v["matched"]]
        n_best = min(matched) if matched else None
        return {"base_nfe": default, "base_final_mean": strongest_final, "base_method": strongest,
                "lcsc_nfe": n_best, "lcsc_final_mean": tried[str(n_best)]["lcsc_final_mean"] if matched else None,
                "tried": tried, "cut_fraction": (1 - n_best / default) if matched else None,
                "ok": bool(matched) and n_best <= 0.6 * default}

    def config(self, strategy: str, seed: int, **over: Any):
        from lcsc_ops.pipeline.config import OptimizeConfig

        r = self.r
        kw = dict(run_id=self.state["train"]["run_id"], window=r["window"], basis=r["basis"], strategy=strategy,
                  n_trials=r["n_trials"], radius=r["radius"], blocks=r["blocks"], search_samples=r["search_samples"],
                  search_seeds=r["search_seeds"], final_samples=r["final_samples"], final_seeds=r["final_seeds"],
                  top_k=r["top_k"], seed=seed, device="cpu", storage=self.storage, tracking_uri=self.uri,
                  register=False)
        kw.update(over)
        return OptimizeConfig(**kw)

    def optimize(self, name: str, cfg, stop_below: float | None = None) -> dict[str, Any]:
        """One `lcsc-ops optimize` through the library; with ``stop_below``, the search stops at the
        first trial whose search score beats it (all a trials-to-baseline count needs)."""
        from lcsc_ops.pipeline.optimize import run_optimize

        t = time.perf_counter()
        report = run_optimize(cfg, log=lambda m: log(f"  {name}: {m}"), stop_below=stop_below)
        report["wall_seconds"] = time.perf_counter() - t
        report["trial_values"] = trial_values(report)
        (self.work / "reports" / f"{name}.json").write_text(json.dumps(report, indent=1))
        return {"report": f"reports/{name}.json", "wall_seconds": report["wall_seconds"]}

    def report(self, name: str) -> dict[str, Any]:
        return json.loads((self.work / "reports" / f"{name}.json").read_text())

    def extra_emas(self) -> dict[str, Any]:
        """The training EMA at more decays, scored under the optimize protocol (tuning the baseline)."""
        from _quality_eval import ProtocolScorer, local_entry

        from lcsc_ops.store.fetch import fetch_window

        cfg = self.config("cmaes", 0)
        win = fetch_window(cfg.run_id, window=1, tracking_uri=self.uri)
        step = win.steps[-1]
        entries = [local_entry(self.work / "extra_ema" / f"ema-{d}.safetensors", step) for d in self.r["extra_decays"]]
        ps = ProtocolScorer(cfg, win.spec, entries, self.work / "cache")
        out = {}
        for i, d in enumerate(self.r["extra_decays"]):
            dense = ps.one_hot(i)
            final, second = ps.final(dense)
            out[repr(d)] = {"search_mean": ps.search(dense), "final": final, "second": second,
                            "selection": ps.selection(dense)}
            log(f"  online EMA {d}: search {out[repr(d)]['search_mean']:.3f}, final {statistics.fmean(final):.3f}")
        return out

    def density(self) -> dict[str, Any]:
        """Post-hoc EMA over raw checkpoints `interval` steps apart vs the online EMA at the last step."""
        from _quality_eval import ProtocolScorer, local_entry, posthoc_ema_state, relative_distance

        from lcsc_ops.checkpoints import write_checkpoint
        from lcsc_ops.store.fetch import fetch_window, read_manifest

        r = self.r
        cfg = self.config("cmaes", 0)
        # The whole run: as many steps as it logged raw checkpoints (a longer window is refused).
        raw_steps = {e["step"] for e in read_manifest(cfg.run_id, self.uri)["entries"] if e["kind"] == "raw"}
        win = fetch_window(cfg.run_id, window=len(raw_steps), tracking_uri=self.uri)
        raw = [win.entries[i] for i in win.indices("raw")]
        online = win.training_ema.load()
        last = raw[-1].load()
        step = raw[-1].step
        entries, rows = [local_entry(win.training_ema.path, step)], {}
        for interval in r["density_intervals"]:
            sub = [e for e in raw if (step - e.step) % interval == 0]
            state = posthoc_ema_state(sub, r["ema_decay"], self.state["train"]["config"].get("ema_warmup", True))
            path = self.work / f"posthoc-{interval}.safetensors"
            write_checkpoint(path, state, step=step, kind="ema", spec=win.spec)
            entries.append(local_entry(path, step))
            rows[str(interval)] = {"checkpoints": len(sub),
                                   "rel_distance_to_online": relative_distance(state, online, last)}
        ps = ProtocolScorer(cfg, win.spec, entries, self.work / "cache")
        online_final, _ = ps.final(ps.one_hot(0), r["density_seeds"])
        for j, interval in enumerate(r["density_intervals"], start=1):
            final, _ = ps.final(ps.one_hot(j), r["density_seeds"])
            d = [a - b for a, b in zip(final, online_final)]
            rows[str(interval)].update(final_mean=statistics.fmean(final), diff_vs_online_mean=statistics.fmean(d),
                                       diff_vs_online_se=statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None)
            log(f"  post-hoc EMA every {interval}: {rows[str(interval)]}")
        return {"online_ema_decay": r["ema_decay"], "online_final_mean": statistics.fmean(online_final),
                "seeds": r["density_seeds"], "intervals": rows}

    def shorter(self, strategy: str, strongest_final: float) -> dict[str, Any]:
        """Smallest fraction of training whose merged checkpoints match the full-training strongest baseline."""
        r, tried = self.r, {}
        order = list(r["fractions"])  # first, then smaller if it matched, larger if not
        first, smaller, larger = order[0], order[1], order[2]
        for frac in (first, None):
            if frac is None:
                frac = smaller if tried[repr(first)]["matched"] else larger
            end = max(r["every"], int(round(frac * r["steps"] / r["every"])) * r["every"])
            name = f"shorter-{frac}-{strategy}"
            key = f"shorter:{frac}"
            # The window shrinks with the run: asking for more steps than it holds is an error since 942144a.
            self.stage(key, lambda: self.optimize(name, self.config(strategy, 0, end_step=end,
                                                                    window=min(r["window"], end // r["every"]),
                                                                    final_seeds=r["shorter_final_seeds"], top_k=2,
                                                                    n_trials=r["shorter_trials"])))
            rep = self.report(name)
            lcsc = rep["methods"][rep["best_lcsc"]]
            tried[repr(frac)] = {"end_step": end, "lcsc_final_mean": lcsc["final_mean"],
                                 "best_lcsc": rep["best_lcsc"], "lcsc_final": lcsc["final"],
                                 "matched": lcsc["final_mean"] <= strongest_final,
                                 "baselines_at_fraction": {b: rep["methods"][b]["final_mean"]
                                                           for b in BASELINES if b in rep["methods"]}}
            log(f"  train-shorter {frac}: LCSC {lcsc['final_mean']:.3f} vs full baseline {strongest_final:.3f}")
            if self.elapsed() > r["budget_s"] * 0.8:
                break
        matched = [float(f) for f, v in tried.items() if v["matched"]]
        best = min(matched) if matched else min(float(f) for f in tried)
        return {"strategy": strategy, "tried": tried, "fraction": best if matched else None,
                "smallest_fraction_tried": min(float(f) for f in tried), "matched_any": bool(matched),
                "lcsc_final_mean": tried[repr(best)]["lcsc_final_mean"], "baseline_full_final_mean": strongest_final}

    # --- the whole benchmark -------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        r = self.r
        train = self.stage("train", self.train)
        log(f"training run {train['run_id']} ({train['seconds']:.0f} s)")
        for s in STRATEGIES:
            self.stage(f"main:{s}", lambda s=s: self.optimize(f"{s}-s0", self.config(s, 0)))
        self.stage("extra_emas", self.extra_emas)
        self.stage("density", self.density)
        methods, strongest = self.methods()
        bar = min(methods[b]["search_mean"] for b in BASELINES)
        # Trials-to-baseline only: each extra search stops once it beats the bar, or after extra_seed_trials
        # (a censored count: "not within N"); CMA-ES's count only has to be half of random's.
        for seed in r["extra_seeds"]:
            for s in ("cmaes", "random"):
                self.stage(f"seed:{s}:{seed}", lambda s=s, seed=seed: self.optimize(
                    f"{s}-s{seed}", self.config(s, seed, final_seeds=1, top_k=1, n_trials=r["extra_seed_trials"]),
                    stop_below=bar))
        best_strategy = min(STRATEGIES, key=lambda s: methods[f"lcsc_{s}"]["selection_mean"])
        short = self.state.get("shorter")
        if short and len(short["tried"]) < 2 and self.elapsed() < r["budget_s"] * 0.8:
            del self.state["shorter"]  # a resumed run with time left tries the second fraction too
        # Compared on the seeds the shorter searches are finally scored on (the first shorter_final_seeds).
        self.stage("shorter", lambda: self.shorter(
            best_strategy, statistics.fmean(methods[strongest]["final"][:r["shorter_final_seeds"]])))
        for seed in r["extra_seeds"]:
            if self.elapsed() < r["budget_s"] * 0.9 or f"seed:evolution:{seed}" in self.state:
                self.stage(f"seed:evolution:{seed}", lambda seed=seed: self.optimize(
                    f"evolution-s{seed}", self.config("evolution", seed, final_seeds=1, top_k=1,
                                                      n_trials=r["extra_seed_trials"]), stop_below=bar))
        self.stage("cm", self.cm)
        # Compared on the seeds the merged model at fewer steps is finally scored on (the first nfe_final_seeds).
        self.stage("nfe", lambda: self.nfe(strongest, statistics.fmean(methods[strongest]["final"][:r["nfe_final_seeds"]])))
        return self.summary(methods, strongest)

    def methods(self) -> tuple[dict[str, Any], str]:
        """Baselines (training EMA tuned over decays by search FID) and each strategy's best LCSC candidate."""
        main = self.report("cmaes-s0")
        out: dict[str, Any] = {}
        for b in ("last", "ema_star", "uniform"):
            out[b] = row(main["methods"][b], note=main["methods"][b]["note"])
        emas = {repr(self.r["ema_decay"]): {"search_mean": main["methods"]["training_ema"]["search_mean"],
                                            "final": main["methods"]["training_ema"]["final"],
                                            "selection": main["methods"]["training_ema"]["selection"],
                                            "second": None, "second_mean": main["methods"]["training_ema"]
                                            ["second_metric_mean"]}}
        for d, v in self.state["extra_emas"].items():
            emas[d] = {**v, "second_mean": statistics.fmean(v["second"]) if v["second"] else None}
        pick = min(emas, key=lambda d: emas[d]["search_mean"])
        e = emas[pick]
        out["training_ema"] = {"search_mean": e["search_mean"], "final": e["final"],
                               "final_mean": statistics.fmean(e["final"]), "final_std": statistics.stdev(e["final"]),
                               "selection": e["selection"], "selection_mean": statistics.fmean(e["selection"]),
                               "second_metric_mean": e["second_mean"],
                               "note": f"online EMA decay {pick}, best by search FID of {sorted(emas)}"}
        out["training_ema_decays"] = {d: {"search_mean": v["search_mean"], "final_mean": statistics.fmean(v["final"]),
                                          "second_metric_mean": v["second_mean"]} for d, v in emas.items()}
        strongest = min(BASELINES, key=lambda b: out[b]["selection_mean"])  # chosen on the selection seeds
        for s in STRATEGIES:
            rep = self.report(f"{s}-s0")
            out[f"lcsc_{s}"] = row(rep["methods"][rep["best_lcsc"]], note=rep["best_lcsc"])
        return out, strongest

    def summary(self, methods: dict[str, Any], strongest: str) -> dict[str, Any]:
        from lcsc_ops.pipeline.candidates import paired

        r = self.r
        best = min((f"lcsc_{s}" for s in STRATEGIES), key=lambda m: methods[m]["selection_mean"])
        diff, se = paired(methods[best]["final"], methods[strongest]["final"])  # the test seeds only
        # The bar: the strongest baseline's search FID, or any baseline's if lower. The search is
        # centred on the best baseline by search FID, so a strategy that proposes the origin
        # first would otherwise "beat" a weaker bar in one trial without searching at all.
        bar = min(methods[b]["search_mean"] for b in BASELINES)
        strategies = {}
        for s in STRATEGIES:
            per_seed = {}
            for seed in (0, *r["extra_seeds"]):
                name = f"{s}-s{seed}"
                if not (self.work / "reports" / f"{name}.json").exists():
                    continue
                rep = self.report(name)
                per_seed[seed] = {"trials_to_baseline": first_below(rep["trial_values"], bar),
                                  "search_seconds": rep["search_seconds"], "best_search": min(rep["trial_values"]),
                                  "trials_run": len(rep["trial_values"])}
            ttb = [v["trials_to_baseline"] for v in per_seed.values()]
            # Censored seeds count as the trials they ran: a lower bound on their trials-to-baseline.
            ttb_lower = statistics.median(v["trials_to_baseline"] or v["trials_run"] + 1 for v in per_seed.values())
            d_s, se_s = paired(methods[f"lcsc_{s}"]["final"], methods[strongest]["final"])
            strategies[s] = {"trials_to_baseline": median_censored(ttb), "trials_to_baseline_per_seed": ttb,
                             "trials_to_baseline_lower_bound": ttb_lower,
                             "trials_run_per_seed": [v["trials_run"] for v in per_seed.values()],
                             "paired_vs_strongest": {"diff_mean": d_s, "diff_se": se_s},
                             # the full-budget search (seed 0); the extra seeds stop at the bar
                             "search_seconds": per_seed[0]["search_seconds"],
                             "best_search_per_seed": [v["best_search"] for v in per_seed.values()],
                             "n_trials": r["n_trials"], "seeds": list(per_seed)}
        shorter = dict(self.state["shorter"])
        if not shorter["matched_any"] and methods[best]["final_mean"] <= methods[strongest]["final_mean"]:
            # No earlier fraction matched: the smallest fraction reached is the whole run.
            shorter.update(fraction=1.0, lcsc_final_mean=methods[best]["final_mean"],
                           note=f"no tried fraction matched; only full training did ({best})")
        sec = {m: methods[m]["second_metric_mean"] for m in (best, strongest)}
        ttb_c, ttb_r = strategies["cmaes"]["trials_to_baseline"], strategies["random"]["trials_to_baseline"]
        acceptance = {
            "ratio_best_lcsc_to_strongest": methods[best]["final_mean"] / methods[strongest]["final_mean"],
            "ratio_ok": methods[best]["final_mean"] <= 0.90 * methods[strongest]["final_mean"],
            "paired_t": diff / se if se else None, "paired_ok": bool(se and diff < -3 * se),
            "second_metric_ok": None if None in sec.values() else sec[best] <= sec[strongest],
            "cmaes_vs_random_trials_ok": (ttb_c is not None and ttb_c <= strategies["random"]
                                          ["trials_to_baseline_lower_bound"] / 2),
            "cmaes_vs_random_note": ("random's median is censored: it did not reach the bar within the trials run; "
                                     f"lower bound {strategies['random']['trials_to_baseline_lower_bound']}"
                                     if ttb_r is None else ""),
            "train_shorter_ok": shorter["fraction"] is not None and shorter["fraction"] <= 0.25,
            "cm_1step_below_base_2step": self.state["cm"]["ok"],
            "nfe_cut_40pct": self.state["nfe"]["ok"],
            "final_seeds": r["final_seeds"], "wall_seconds": self.elapsed(),
            "wall_ok": self.elapsed() < 3600,
        }
        t = self.state["train"]
        return {
            "recipe": {**{k: v for k, v in r.items() if k != "budget_s"}, "train_seconds": t["seconds"],
                       "train": t["config"], "run_id": t["run_id"]},
            "methods": methods, "strongest_baseline": strongest, "best_lcsc": best,
            "paired": {"diff_mean": diff, "diff_se": se, "method": best, "baseline": strongest},
            "seeds": self.report("cmaes-s0")["seeds"],
            "search_bar": bar,
            "strategies": strategies,
            "train_shorter": shorter,
            "checkpoint_density": self.state["density"],
            "cm": self.state["cm"],
            "nfe": self.state["nfe"],
            "acceptance": acceptance,
            "wall_seconds": self.elapsed(),
        }


def row(m: dict[str, Any], note: str = "") -> dict[str, Any]:
    return {"search_mean": m["search_mean"], "final": m["final"], "final_mean": m["final_mean"],
            "final_std": m["final_std"], "selection": m["selection"], "selection_mean": m["selection_mean"], "second_metric_mean": m["second_metric_mean"], "note": note}


def trial_values(report: dict[str, Any]) -> list[float]:
    """Search values of the study's complete trials, in trial order; the start trial (the centre,
    scored before the search, see ``add_start_trial``) is no search evaluation and is left out."""
    from lcsc_ops.search.study import SearchStudy

    records = SearchStudy.open(report["study"], report["storage"]).records()  # by trial number
    return [t.value for t in records if t.state == "COMPLETE" and t.start is None]


def first_below(values: list[float], bar: float) -> int | None:
    """1-based count of trials until the search value first beats ``bar`` (None: never)."""
    return next((i + 1 for i, v in enumerate(values) if v < bar), None)


def median_censored(xs: list[int | None]) -> float | None:
    """Median where None (never reached) counts as infinitely many trials; None if the median is."""
    m = statistics.median([math.inf if x is None else x for x in xs])
    return None if math.isinf(m) else m


def seed_text(res: dict[str, Any]) -> str:
    """Which seeds chose and which measured (the report's ``seeds``; older results have none)."""
    seeds = res.get("seeds") or {}
    sel, test = seeds.get("selection"), seeds.get("test")
    if not (sel and test):
        return "the strongest baseline and the best LCSC chosen on the same seeds"
    return (f"{test[0]}–{test[-1]}; the strongest baseline, each strategy's best candidate and the best strategy "
            f"chosen by their means on {len(sel)} more selection seeds {sel[0]}–{sel[-1]}, never reported")


def fmt(x: Any, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def markdown(res: dict[str, Any]) -> str:
    r, m, a = res["recipe"], res["methods"], res["acceptance"]
    lines = ["## Quality (make bench-quality)", "",
             f"Recipe: digits DDPM (U-Net, {r['train']['channels']} channels), {r['steps']} steps, batch "
             f"{r['train']['batch_size']}, checkpoints (raw + online EMA {r['ema_decay']}) every {r['every']} steps; "
             f"window {r['window']} checkpoint steps, basis {r['basis']}, {r['blocks']} blocks per kind, radius "
             f"{r['radius']}; {r['n_trials']} trials per strategy, search FID at {r['search_samples']} samples × "
             f"{r['search_seeds']} fixed seed(s); final FID at {r['final_samples']} samples on {r['final_seeds']} fresh "
             f"paired test seeds ({seed_text(res)}); second metric = FID under the independent digits MLP features. "
             f"Wall time {res['wall_seconds'] / 60:.1f} min on 2 CPU cores (training {r['train_seconds'] / 60:.1f} min)"
             + ("; cumulative at the end of each pass (a rerun resumes): "
                + ", ".join(f"{x / 60:.1f}" for x in res.get("passes_s", [])) + " min" if len(res.get("passes_s", [])) > 1
                else "") + ".",
             "", "| method | search FID | final FID (mean ± std) | 2nd metric | note |", "|---|---|---|---|---|"]
    for name in ("last", "training_ema", "ema_star", "uniform", "lcsc_cmaes", "lcsc_evolution", "lcsc_random"):
        v = m[name]
        label = name + (" (strongest baseline)" if name == res["strongest_baseline"] else "") \
            + (" ★" if name == res["best_lcsc"] else "")
        lines.append(f"| {label} | {fmt(v['search_mean'])} | {fmt(v['final_mean'])} ± {fmt(v['final_std'])} | "
                     f"{fmt(v['second_metric_mean'])} | {v['note']} |")
    p = res["paired"]
    lines += ["", f"Paired ({a['final_seeds']} seeds): {p['method']} − {p['baseline']} = {fmt(p['diff_mean'])} ± "
                  f"{fmt(p['diff_se'])} (se), t = {fmt(a['paired_t'], 2)}; ratio {fmt(a['ratio_best_lcsc_to_strongest'])}.",
              "", f"| strategy | trials to beat every baseline's search FID ({fmt(res['search_bar'])}) (median; per seed) | "
                  "search seconds (median) | best search FID per seed | final − strongest (± se) |",
              "|---|---|---|---|---|"]
    for s, v in res["strategies"].items():
        per = ", ".join(f"not in {n}" if x is None else str(x)
                        for x, n in zip(v["trials_to_baseline_per_seed"], v["trials_run_per_seed"]))
        med = "never" if v["trials_to_baseline"] is None else fmt(float(v["trials_to_baseline"]), 0)
        lines.append(f"| {s} | {med} ({per}) of {v['n_trials']} | {fmt(v['search_seconds'], 0)} | "
                     + ", ".join(fmt(x) for x in v["best_search_per_seed"])
                     + f" | {fmt(v['paired_vs_strongest']['diff_mean'])} ± {fmt(v['paired_vs_strongest']['diff_se'])} |")
    ts = res["train_shorter"]
    tried = "; ".join(f"{f}: LCSC {fmt(v['lcsc_final_mean'])} ({'match' if v['matched'] else 'no match'})"
                      for f, v in ts["tried"].items())
    lines += ["", f"Train-shorter ({ts['strategy']}, {r.get('shorter_trials', r['n_trials'])} trials): fraction "
                  f"{ts['fraction']}"
                  + (f" ({ts['note']})" if ts.get("note") else "") + f"; smallest tried "
                  f"{ts['smallest_fraction_tried']}; strongest baseline after full training "
                  f"(on the same {r.get('shorter_final_seeds', r['final_seeds'])} final seeds) "
                  f"{fmt(ts['baseline_full_final_mean'])}; {tried}."]
    dens = res["checkpoint_density"]
    lines += ["", f"Checkpoint density: post-hoc EMA ({dens['online_ema_decay']}, the online EMA's recursion and warm-up "
                  f"replayed) over raw checkpoints vs the online "
                  f"EMA (final FID {fmt(dens['online_final_mean'])}, {dens['seeds']} seeds): "
              + "; ".join(f"every {k} steps: weight distance {fmt(v['rel_distance_to_online'])} of raw→EMA, "
                          f"FID {fmt(v['final_mean'])} ({'+' if v['diff_vs_online_mean'] >= 0 else ''}"
                          f"{fmt(v['diff_vs_online_mean'])} ± {fmt(v['diff_vs_online_se'])})"
                          for k, v in dens["intervals"].items()) + "."]
    lines += ["", "Training EMA decays (online, scored under the same protocol): "
              + ", ".join(f"{d}: search {fmt(v['search_mean'])}, final {fmt(v['final_mean'])}"
                          for d, v in sorted(m["training_ema_decays"].items())) + "."]
    c = res["cm"]
    lines += ["", f"Consistency model (iCT, {c['train']['steps']} steps, s1 = {c['train']['cm_settings'].get('s1')}, "
                  f"trained in {c['train_seconds'] / 60:.1f} min; `optimize --nfe 1` on a run whose spec samples 2 steps): "
                  f"merged at 1 step {fmt(c['lcsc_1step'])} ({c['lcsc_method']}); strongest baseline at 1 step "
                  f"{fmt(c['base_1step'])} ({c['base_1step_method']}), at 2 steps {fmt(c['base_2step'])} "
                  f"({c['base_2step_method']}). Baselines at 1 / 2 steps: "
              + ", ".join(f"{b} {fmt(v['final_1step'])} / {fmt(v['final_2step'])}" for b, v in c["baselines"].items())
              + "."]
    n = res["nfe"]
    tried = "; ".join(f"{k} steps: LCSC {fmt(v['lcsc_final_mean'])} ({'match' if v['matched'] else 'no match'}; "
                      f"baselines at {k}: " + ", ".join(f"{b} {fmt(x)}" for b, x in v["baselines_at_nfe"].items()) + ")"
                      for k, v in n["tried"].items())
    lines += ["", f"Fewer steps (diffusion model): the strongest baseline ({n['base_method']}) at its default "
                  f"{n['base_nfe']} DDIM steps scores {fmt(n['base_final_mean'])} (first {r.get('nfe_final_seeds', r['final_seeds'])} "
                  f"final seeds); the merged model searched at fewer steps ({r.get('nfe_trials', r['n_trials'])} trials): "
                  f"{tried}. Smallest NFE matched: {n['lcsc_nfe'] if n['lcsc_nfe'] is not None else 'none of those tried'}."]
    checks = [("best LCSC ≤ 0.90 × strongest baseline", a["ratio_ok"]),
              ("paired difference beyond 3 se", a["paired_ok"]),
              ("second metric no worse", a["second_metric_ok"]),
              ("CMA-ES ≤ ½ random's trials to the bar", a["cmaes_vs_random_trials_ok"]),
              ("train-shorter fraction ≤ 0.25", a["train_shorter_ok"]),
              ("under 60 minutes", a["wall_ok"]),
              ("CM merged 1-step below base 2-step", a["cm_1step_below_base_2step"]),
              ("NFE cut ≥ 40% at equal FID", a["nfe_cut_40pct"])]
    lines += ["", "Acceptance: " + "; ".join(f"{n}: {'met' if ok else 'NOT met'}" for n, ok in checks) + "."]
    return "\n".join(lines) + "\n"


def write_results_md(section: str) -> None:
    from _results_md import replace_section

    replace_section(HERE / "RESULTS.md", "## Quality (make bench-quality)", section)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny recipe, a couple of minutes (plumbing check)")
    ap.add_argument("--fresh", action="store_true", help="discard saved stages and start over")
    args = ap.parse_args()
    mode = "quick" if args.quick or os.environ.get("BENCH_QUICK") else "full"
    if os.environ.get("BENCH_THREADS"):  # e.g. 1 while another job shares the 2 cores
        import torch

        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
    bench = Bench(mode, args.fresh)
    res = bench.run()
    if bench.ran_any:  # cumulative wall time at the end of each invocation that ran a stage
        bench.state.setdefault("passes_s", []).append(bench.elapsed())
        bench.save()
    res["passes_s"] = bench.state.get("passes_s", [])
    (bench.work / "quality.json").write_text(json.dumps(res, indent=1))
    section = markdown(res)
    if mode == "full":
        from _stage_bench import update_results

        # Merged into the file the issue-14 stages share: `nfe` is bench-nfe's (15 -> 9 steps), so this
        # older row (from the default 10 DDIM steps) goes under its own key; `strategies` is merged per strategy.
        update_results({**{k: v for k, v in res.items() if k != "nfe"}, "nfe_ddim10": res["nfe"]},
                       merge_keys=("strategies",))
        write_results_md(section)
    print(section)


if __name__ == "__main__":
    main()
