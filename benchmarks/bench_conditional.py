"""`make bench-conditional`: does LCSC beat the strongest baseline on a class-conditional model?

One conditional digits recipe (classifier-free guidance at the spec's default scale) trains
once in a sqlite MLflow store under benchmarks/work/conditional; the search runs through the
library (`run_optimize`, nothing registered) with fixed search noise and fresh paired final
seeds, as in `make bench-quality`. The training EMA is tuned over decays (online EMAs kept
while training, the decay picked by search FID); EMA*, last and uniform are the product's.
Besides FID: FID under the second (MLP) features and the digits classifier's per-class
accuracy on each method's samples (mean and worst class). Figures go to
benchmarks/results/conditional.json, the table to its section of benchmarks/RESULTS.md.

Stages are saved in the work folder's state.json as they finish, so a rerun resumes
(``--fresh`` starts over; a changed recipe is an error naming it). ``--quick`` runs a tiny
recipe under work/quick-conditional and writes no results files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a shared machine: do not spin
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from _load import mean_load, sample_load  # noqa: E402
from bench_quality import fmt, log, row, seed_text, trial_values  # noqa: E402

RECIPES: dict[str, dict[str, Any]] = {
    # Chosen from probes on 2 cores (RESULTS.md): the conditional model learns faster than the unconditional
    # one (at w = 1 its EMA sits at the FID floor of 1,000 samples by 3k steps), and FID at the product's
    # default w = 2 mostly measures the guidance's loss of diversity (there the raw weights beat the EMA), so
    # mid-training at w = 1.5. A guided sample costs ~2x an unguided one (doubled batch), and the final
    # evaluation samples each candidate twice per seed (FID pair, then class accuracy). With the EMA warm-up
    # (decay at most (1+n)/(10+n)) every decay above 0.994 is the same EMA at 1500 steps. top_k 1: the best
    # trial alone is finally scored (no pick among LCSC candidates on the final seeds; 2 fewer candidates).
    "full": dict(steps=1500, channels=32, every=50, ema_decay=0.999, extra_decays=(0.98, 0.99), label_dropout=0.1,
                 guidance=1.5, window=30, blocks=8, basis="both", radius=0.3, strategies=("cmaes",), n_trials=120,
                 search_samples=1000, search_seeds=2, final_samples=2000, final_seeds=10, top_k=1),
    "quick": dict(steps=300, channels=16, every=20, ema_decay=0.99, extra_decays=(0.95, 0.98), label_dropout=0.1,
                  guidance=1.5, window=8, blocks=2, basis="both", radius=0.3, strategies=("cmaes",), n_trials=6,
                  search_samples=200, search_seeds=1, final_samples=300, final_seeds=3, top_k=1),
}
# How the recipe was chosen (one 3000-step run of this model recorded at w = 2; search FID at 1000 samples x 2
# seeds unless noted; a shared machine), written under the table.
PROBES = (
    "Recipe probes (a 3000-step run of the same model; search FID at 1,000 samples × 2 seeds): at w = 2 the raw "
    "weights at steps 500 / 1000 / 1500 / 2000 / 3000 score 1.47 / 2.08 / 2.25 / 1.75 / 1.13 and the training EMA "
    "1.98 / 2.17 / 1.94 / 1.88 / 1.78; at w = 1.5, steps 1500 / 3000: raw 1.32 / 0.89, EMA 0.84 / 0.96; at w = 1: "
    "raw 2.46 / 1.65, EMA 0.54 / 0.30. Real digits resampled score 0.31–0.46 at 1,000 samples (0.13–0.26 at 2,000): "
    "the conditional EMA reaches that floor by 3k steps at w = 1, and at w = 2 FID mostly measures the guidance's "
    "loss of diversity (raw beats EMA; a CMA-ES search on the 3k run at w = 2 gained 2.2% over `last` in its first "
    "15 trials). At w = 1.5 on the first 1500 steps (window 30, 40 trials on 1 search seed) the best trial's search "
    "FID was 0.47 vs the training EMA's 0.90, and its final FID (1,000 samples × 2 seeds) 0.55 vs 0.85 for the "
    "strongest baseline (uniform), class accuracy unchanged. Hence 1500 steps at w = 1.5, the scale recorded in the spec and used throughout.")
TRAIN_KEYS = ("steps", "channels", "every", "ema_decay", "extra_decays", "label_dropout", "guidance")
BASELINES = ("last", "training_ema", "ema_star", "uniform")
SECTION = "## Conditional models (make bench-conditional)"


def machine() -> dict[str, Any]:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_avg": list(os.getloadavg())}


class CondBench:
    def __init__(self, mode: str, fresh: bool, fresh_search: bool = False) -> None:
        self.mode, self.r = mode, RECIPES[mode]
        self.work = HERE / "work" / ("conditional" if mode == "full" else "quick-conditional")
        recipe = json.loads(json.dumps(self.r))
        state_path = self.work / "state.json"
        old = json.loads(state_path.read_text()) if state_path.exists() else {}
        if old and not fresh and fresh_search:
            if train_part(old.get("recipe", {})) != train_part(recipe) or "train" not in old:
                raise SystemExit(f"error: {self.work} holds another training recipe; rerun with --fresh")
            log(f"{self.work}: keeping the training run, discarding the searches")
            shutil.rmtree(self.work / "reports", ignore_errors=True)
            (self.work / "optuna.journal").unlink(missing_ok=True)
            old = {"train": old["train"], "elapsed_s": old["train"]["seconds"],
                   **{k: {"train": old[k]["train"]} for k in ("stage_seconds", "stage_cpu_seconds")
                      if "train" in old.get(k, {})}}
        elif old and not fresh and old.get("recipe") != recipe:
            raise SystemExit(f"error: {self.work} holds stages of another recipe; rerun with --fresh to discard them "
                             "(--fresh-search keeps the training run when only the search recipe changed)")
        if fresh:
            shutil.rmtree(self.work, ignore_errors=True)
            old = {}
        (self.work / "reports").mkdir(parents=True, exist_ok=True)
        os.environ["LCSC_OPS_CACHE"] = str(self.work / "cache")
        os.chdir(self.work)  # MLflow puts the artifacts of a sqlite store under ./mlruns
        self.uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self.state_path, self.state = state_path, {**old, "recipe": recipe}
        self.t0 = time.perf_counter() - self.state.get("elapsed_s", 0.0)
        self.ran_any = False

    def save(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        self.state_path.write_text(json.dumps(self.state, indent=1))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def stage(self, key: str, fn) -> Any:
        if key not in self.state:
            self.ran_any, t, cpu = True, time.perf_counter(), time.process_time()
            self.state[key] = fn()
            self.state.setdefault("stage_seconds", {})[key] = time.perf_counter() - t
            # CPU seconds of this process: on a shared machine, a steadier measure of the cost than wall time
            self.state.setdefault("stage_cpu_seconds", {})[key] = time.process_time() - cpu
            log(f"stage {key} done in {time.perf_counter() - t:.0f} s (total {self.elapsed():.0f} s)")
            self.save()
        return self.state[key]

    def report(self, name: str) -> dict[str, Any]:
        return json.loads((self.work / "reports" / f"{name}.json").read_text())

    # --- stages --------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        from _quality_eval import extra_online_emas

        from lcsc_ops.training import TrainConfig, train

        r = self.r
        cfg = TrainConfig(steps=r["steps"], channels=r["channels"], checkpoint_every=r["every"],
                          ema_decay=r["ema_decay"], conditional=True, label_dropout=r["label_dropout"],
                          guidance=r["guidance"], seed=0, quiet=True, experiment="bench-conditional",
                          run_name=f"bench-conditional-{self.mode}", tracking_uri=self.uri)
        t = time.perf_counter()
        with extra_online_emas(r["extra_decays"], self.work / "extra_ema"):
            run_id = train(cfg)
        return {"run_id": run_id, "seconds": time.perf_counter() - t, "config": {
            k: getattr(cfg, k) for k in ("steps", "batch_size", "lr", "channels", "sampler_steps", "checkpoint_every",
                                         "ema_decay", "ema_warmup", "label_dropout", "guidance", "seed")}}

    def config(self, strategy: str):
        from lcsc_ops.pipeline.config import OptimizeConfig

        r = self.r
        return OptimizeConfig(run_id=self.state["train"]["run_id"], window=r["window"], basis=r["basis"],
                              strategy=strategy, n_trials=r["n_trials"], radius=r["radius"], blocks=r["blocks"],
                              search_samples=r["search_samples"], search_seeds=r["search_seeds"],
                              final_samples=r["final_samples"], final_seeds=r["final_seeds"], top_k=r["top_k"],
                              seed=0, device="cpu", tracking_uri=self.uri, register=False)

    def optimize(self, strategy: str) -> dict[str, Any]:
        from lcsc_ops.pipeline.optimize import run_optimize

        t = time.perf_counter()
        report = run_optimize(self.config(strategy), log=lambda m: log(f"  {strategy}: {m}"))
        report["wall_seconds"] = time.perf_counter() - t
        report["trial_values"] = trial_values(report)
        (self.work / "reports" / f"{strategy}.json").write_text(json.dumps(report, indent=1))
        return {"report": f"reports/{strategy}.json", "wall_seconds": report["wall_seconds"]}

    def extra_emas(self) -> dict[str, Any]:
        """The online EMAs at the other decays: search FID for each (the pick is by search FID, as the
        search's own centre is), final FID, second metric and class accuracy for the pick only
        (unless the pick is the logged EMA, which the product's report already scores)."""
        from _quality_eval import ProtocolScorer, local_entry

        from lcsc_ops.evaluation.conditional import ClassAccuracy
        from lcsc_ops.evaluation.features import build_extractor, classifier_for
        from lcsc_ops.pipeline.candidates import FINAL_SEED_BASE
        from lcsc_ops.store.fetch import fetch_window

        r, cfg = self.r, self.config(r_strategy(self.r))
        win = fetch_window(cfg.run_id, window=1, tracking_uri=self.uri)
        decays = list(r["extra_decays"])
        entries = [local_entry(self.work / "extra_ema" / f"ema-{d}.safetensors", win.steps[-1]) for d in decays]
        ps = ProtocolScorer(cfg, win.spec, entries, self.work / "cache")
        out = {repr(d): {"search_mean": ps.search(ps.one_hot(i))} for i, d in enumerate(decays)}
        logged = self.report(r_strategy(r))["methods"]["training_ema"]["search_mean"]
        pick = min(out, key=lambda d: out[d]["search_mean"])
        log("  online EMA search FID: " + ", ".join(f"{d} {v['search_mean']:.3f}" for d, v in out.items())
            + f"; logged {r['ema_decay']} {logged:.3f}")
        if out[pick]["search_mean"] < logged:
            dense = ps.one_hot(decays.index(float(pick)))
            final, second = ps.final(dense)
            classes = ClassAccuracy(getattr(ps.first, "inner", ps.first), build_extractor(classifier_for("digits")),
                                    win.spec.conditioning.num_classes)
            per_seed = ps.scorer.per_seed_values(dense, classes, cfg.final_samples,
                                                 [FINAL_SEED_BASE + i for i in range(cfg.final_seeds)])
            out[pick].update(final=final, second=second, class_accuracy=[statistics.fmean(a) for a in zip(*per_seed)],
                             selection=ps.selection(dense))
            log(f"  online EMA {pick}: final {statistics.fmean(final):.3f}")
        return out

    def run(self) -> dict[str, Any]:
        train = self.stage("train", self.train)
        log(f"training run {train['run_id']} ({train['seconds']:.0f} s)")
        for s in self.r["strategies"]:
            self.stage(f"main:{s}", lambda s=s: self.optimize(s))
        self.stage("extra_emas", self.extra_emas)
        return self.summary()

    # --- figures -------------------------------------------------------------------------
    def methods(self) -> tuple[dict[str, Any], str]:
        r = self.r
        main = self.report(r_strategy(r))
        out = {b: cond_row(main["methods"][b], main["methods"][b]["note"]) for b in ("last", "ema_star", "uniform")}
        searched = {repr(r["ema_decay"]): main["methods"]["training_ema"]["search_mean"],
                    **{d: v["search_mean"] for d, v in self.state["extra_emas"].items()}}
        pick = min(searched, key=searched.get)
        note = f"online EMA decay {pick}, best by search FID of {sorted(searched)}"
        if pick == repr(r["ema_decay"]):
            out["training_ema"] = cond_row(main["methods"]["training_ema"], note)
        else:
            e = self.state["extra_emas"][pick]
            out["training_ema"] = cond_row({"search_mean": e["search_mean"], "final": e["final"],
                                            "final_mean": statistics.fmean(e["final"]),
                                            "final_std": statistics.stdev(e["final"]),
                                            "selection": e["selection"],
                                            "selection_mean": statistics.fmean(e["selection"]),
                                            "second_metric_mean": statistics.fmean(e["second"]) if e["second"] else None,
                                            "class_accuracy": e["class_accuracy"]}, note)
        out["training_ema"]["search_by_decay"] = searched
        strongest = min(BASELINES, key=lambda b: out[b]["selection_mean"])  # chosen on the selection seeds
        for s in r["strategies"]:
            rep = self.report(s)
            out[f"lcsc_{s}"] = cond_row(rep["methods"][rep["best_lcsc"]], rep["best_lcsc"])
            out[f"lcsc_{s}"]["search_seconds"] = rep["search_seconds"]
        return out, strongest

    def summary(self) -> dict[str, Any]:
        from lcsc_ops.pipeline.candidates import paired

        r = self.r
        methods, strongest = self.methods()
        best = min((f"lcsc_{s}" for s in r["strategies"]), key=lambda m: methods[m]["selection_mean"])
        diff, se = paired(methods[best]["final"], methods[strongest]["final"])  # the test seeds only
        b, s = methods[best], methods[strongest]
        ratio = b["final_mean"] / s["final_mean"]
        acceptance = {
            "ratio_best_lcsc_to_strongest": ratio, "ratio_ok": ratio <= 0.90,
            "paired_t": diff / se if se else None, "paired_ok": bool(se and diff < -3 * se),
            "second_metric_ok": None if None in (b["second_metric_mean"], s["second_metric_mean"])
            else b["second_metric_mean"] <= s["second_metric_mean"],
            # FID cannot see a merge that trades one class for another: the classifier can.
            "class_accuracy_ok": b["class_acc_mean"] >= s["class_acc_mean"] - 0.01
            and b["class_acc_worst"] >= s["class_acc_worst"] - 0.02,
            "final_seeds": r["final_seeds"], "wall_seconds": self.elapsed(),
            # judged only on a quiet machine: on a shared one the wall time says little about the recipe
            "wall_ok": self.elapsed() <= 1800 if mean_load(self.state) < 1.5 else None,
        }
        t = self.state["train"]
        return {"recipe": {**r, "train_seconds": t["seconds"], "train": t["config"], "run_id": t["run_id"]},
                "guidance": self.report(r_strategy(r)).get("guidance"),
                "methods": methods, "strongest_baseline": strongest, "best_lcsc": best,
                "ratio_best_lcsc_to_strongest": ratio,
                "paired": {"diff_mean": diff, "diff_se": se, "method": best, "baseline": strongest},
                "seeds": self.report(r_strategy(r))["seeds"],
                "class_accuracy": {m: {"mean": v["class_acc_mean"], "worst": v["class_acc_worst"],
                                       "worst_class": v["class_acc_worst_class"]} for m, v in methods.items()},
                "stage_seconds": self.state.get("stage_seconds", {}),
                "stage_cpu_seconds": self.state.get("stage_cpu_seconds", {}),
                "acceptance": acceptance, "wall_seconds": self.elapsed()}


def train_part(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: recipe.get(k) for k in TRAIN_KEYS}


def r_strategy(r: dict[str, Any]) -> str:
    return r["strategies"][0]  # the search whose report holds the product's baselines


def cond_row(m: dict[str, Any], note: str) -> dict[str, Any]:
    acc = m.get("class_accuracy") or []
    finite = [a for a in acc if math.isfinite(a)]
    worst = min(range(len(acc)), key=lambda k: acc[k] if math.isfinite(acc[k]) else math.inf) if finite else None
    return {**row(m, note), "class_accuracy": acc, "class_acc_mean": statistics.fmean(finite) if finite else None,
            "class_acc_worst": acc[worst] if finite else None, "class_acc_worst_class": worst}


def markdown(res: dict[str, Any]) -> str:
    r, m, a, t = res["recipe"], res["methods"], res["acceptance"], res["recipe"]["train"]
    mach = res.get("machine", {})
    lines = [SECTION, "",
             f"Recipe: class-conditional digits DDPM (U-Net, {t['channels']} channels, label dropout "
             f"{t['label_dropout']}), {r['steps']} steps, batch {t['batch_size']}, checkpoints (raw + online EMA "
             f"{r['ema_decay']}) every {r['every']} steps; sampled with classifier-free guidance at the spec's "
             f"w = {t['guidance']:g} ({t['sampler_steps']} DDIM steps, both predictions in one doubled batch); window "
             f"{r['window']} checkpoint steps, basis {r['basis']}, {r['blocks']} blocks per kind, radius {r['radius']}; "
             f"{r['n_trials']} trials ({', '.join(r['strategies'])}), search FID (class-balanced samples) at "
             f"{r['search_samples']} samples × {r['search_seeds']} fixed seed(s); final FID at {r['final_samples']} "
             f"samples on {r['final_seeds']} fresh paired test seeds ({seed_text(res)}); second metric = FID under the digits MLP features; "
             f"class accuracy = share of the samples of class k the digits CNN labels k (mean over classes, worst "
             f"class). Wall time {res['wall_seconds'] / 60:.1f} min (training {r['train_seconds'] / 60:.1f} min) on "
             f"{mach.get('cores')} cores ({mach.get('cpu', '?')}); load average (1 min) "
             f"{fmt(res.get('load_before', [None])[0], 2)} before, {fmt(res.get('load_after', [None])[0], 2)} after, "
             f"{fmt(res.get('load_mean'), 2)} on average while it ran; CPU time of the benchmark's process "
             f"{sum(res['stage_cpu_seconds'].values()) / 60:.1f} min"
             + (f"; cumulative at the end of each pass (a rerun resumes): "
                + ", ".join(f"{x / 60:.1f}" for x in res["passes_s"]) + " min" if len(res.get("passes_s", [])) > 1
                else "") + ".",
             "", "| method | search FID | final FID (mean ± std) | 2nd metric | class acc mean | worst class | note |",
             "|---|---|---|---|---|---|---|"]
    for name in (*BASELINES, *(f"lcsc_{s}" for s in r["strategies"])):
        v = m[name]
        label = name + (" (strongest baseline)" if name == res["strongest_baseline"] else "") \
            + (" ★" if name == res["best_lcsc"] else "")
        worst = "—" if v["class_acc_worst"] is None else f"{v['class_acc_worst']:.3f} ({v['class_acc_worst_class']})"
        lines.append(f"| {label} | {fmt(v['search_mean'])} | {fmt(v['final_mean'])} ± {fmt(v['final_std'])} | "
                     f"{fmt(v['second_metric_mean'])} | {fmt(v['class_acc_mean'])} | {worst} | {v['note']} |")
    p = res["paired"]
    emas = m["training_ema"]["search_by_decay"]
    lines += ["", f"Paired ({a['final_seeds']} seeds): {p['method']} − {p['baseline']} = {fmt(p['diff_mean'])} ± "
                  f"{fmt(p['diff_se'])} (se), t = {fmt(a['paired_t'], 2)}; ratio {fmt(a['ratio_best_lcsc_to_strongest'])}. "
                  "Training EMA search FID by decay: "
                  + ", ".join(f"{d}: {fmt(v)}" for d, v in sorted(emas.items())) + "."]
    checks = [("best LCSC ≤ 0.90 × strongest baseline", a["ratio_ok"]),
              ("paired difference beyond 3 se", a["paired_ok"]), ("second metric no worse", a["second_metric_ok"]),
              ("class accuracy no worse (mean −0.01, worst class −0.02)", a["class_accuracy_ok"]),
              ("under 30 minutes (judged when the mean load stayed under 1.5)", a["wall_ok"])]
    verdict = {True: "met", False: "NOT met", None: "not judged"}
    lines += ["", PROBES]
    lines += ["", "Acceptance: " + "; ".join(f"{n}: {verdict[ok]}" for n, ok in checks) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny recipe, a few minutes (plumbing check)")
    ap.add_argument("--fresh", action="store_true", help="discard saved stages and start over")
    ap.add_argument("--fresh-search", action="store_true", help="keep the training run, discard the searches "
                    "(the score cache stays: wall times of such a pass are not the recipe's)")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    bench = CondBench(mode, args.fresh, args.fresh_search)
    bench.state.setdefault("load_before", list(os.getloadavg()))
    sample_load(bench.state)
    res = bench.run()
    if bench.ran_any:  # cumulative wall time at the end of each invocation that ran a stage
        bench.state.setdefault("passes_s", []).append(bench.elapsed())
    bench.state["load_after"] = list(os.getloadavg())
    bench.save()
    res.update(machine=machine(), load_before=bench.state["load_before"], load_after=bench.state["load_after"],
               passes_s=bench.state.get("passes_s", []), load_mean=mean_load(bench.state))
    (bench.work / "conditional.json").write_text(json.dumps(res, indent=1))
    section = markdown(res)
    if mode == "full":
        from _results_md import replace_section

        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "conditional.json").write_text(json.dumps(res, indent=1))
        replace_section(HERE / "RESULTS.md", SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
