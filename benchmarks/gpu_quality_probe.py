"""A fast probe of the quality recipe on a GPU (used to choose `make bench-quality`'s recipe).

`make bench-quality` must run on 2 CPU cores in under an hour, so its recipe (training
length, sampling steps, window, blocks, trials, search seeds) cannot be tuned there by
trial and error. This probe replays the same protocol with the library's own layers
(math: encoding, profiles, StackedMerger; models: DigitsUNet, DDIM and consistency
samplers; evaluation: FIDScorer with the digits CNN and the independent digits MLP) and
the `cmaes` package in place of Optuna's CmaEsSampler (same defaults: sigma0 = a sixth of
the box, bounds = the box), so it needs only torch, torchmetrics, scikit-learn and cmaes.
It trains in memory (no MLflow), keeps raw and online-EMA snapshots every `every` steps,
and for each variant prints the baselines, the LCSC candidates and the paired difference
on fresh final seeds. Its figures are a GPU's, not the benchmark's: they choose a recipe,
they do not replace `make bench-quality`.

    python benchmarks/gpu_quality_probe.py --variants '[{"name": "a"}, {"name": "b", "trials": 250}]'
    python benchmarks/gpu_quality_probe.py --quick     # one tiny variant: a plumbing check that runs on a CPU
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Spinning OpenMP threads on a shared CPU measure the neighbours (see bench_perf.py); no effect on
# the GPU's work. Must be set before torch loads OpenMP; the environment overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lcsc_ops.evaluation.data import load_digits_images  # noqa: E402
from lcsc_ops.evaluation.features import build_extractor  # noqa: E402
from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats  # noqa: E402
from lcsc_ops.math.ema import ema_update_  # noqa: E402
from lcsc_ops.math.encoding import AffineEncoding, partition_by_kind  # noqa: E402
from lcsc_ops.math.merge import StackedMerger  # noqa: E402
from lcsc_ops.math.profiles import ema_decay_grid, ema_profile, embed, one_hot, quantise, uniform  # noqa: E402
from lcsc_ops.models.consistency import ConsistencySampler  # noqa: E402
from lcsc_ops.models.diffusion import DDIMSampler  # noqa: E402
from lcsc_ops.models.unet import digits_unet  # noqa: E402

TRAIN_DEFAULTS = dict(kind="ddpm", steps=6000, lr=2e-3, batch=128, every=50, ema=0.999, extra_emas=(0.998, 0.9995),
                      seed=0, cm={})
SEARCH_DEFAULTS = dict(window=60, blocks=8, radius=0.3, trials=60, search_seeds=1, search_samples=1000,
                       final_seeds=10, final_samples=2000, strategy="cmaes", top_k=3, nfe=None, end_frac=1.0,
                       seed=0, eval_nfe=())
# --quick: one tiny variant (a minute on a CPU), every code path of a variant included.
QUICK_VARIANT = dict(name="quick", steps=100, every=10, extra_emas=(0.99,), window=5, blocks=2, trials=8,
                     search_samples=100, final_seeds=2, final_samples=100, top_k=2, eval_nfe=(5,))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_sampler(kind: str, steps: int, cm: dict[str, Any]):
    return DDIMSampler(steps=steps) if kind == "ddpm" else ConsistencySampler(steps=steps, **cm)


def train(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train in memory; snapshots (raw, EMA) every `every` steps on the CPU, online EMAs at the end."""
    torch.manual_seed(cfg["seed"])
    data = load_digits_images().to(device)
    model = digits_unet().to(device)
    sampler = make_sampler(cfg["kind"], 1, cfg["cm"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    decays = (cfg["ema"], *cfg["extra_emas"])
    emas = {d: {k: v.detach().clone() for k, v in model.state_dict().items()} for d in decays}
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    snaps: list[tuple[int, str, dict[str, torch.Tensor]]] = []
    t0 = time.perf_counter()
    for step in range(1, cfg["steps"] + 1):
        idx = torch.randint(0, len(data), (cfg["batch"],), device=device, generator=gen)
        loss = sampler.training_loss(model, data[idx], gen, step=step - 1, total_steps=cfg["steps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        state = model.state_dict()
        for d, ema in emas.items():
            ema_update_(ema, state, d)  # the logger's update, at a constant decay (no warm-up)
        if step % cfg["every"] == 0:
            snaps.append((step, "raw", {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}))
            snaps.append((step, "ema", {k: v.to("cpu", copy=True) for k, v in emas[cfg["ema"]].items()}))
    log(f"trained {cfg['kind']} {cfg['steps']} steps in {time.perf_counter() - t0:.0f} s, final loss {loss.item():.4f}")
    return {"snaps": snaps, "online": {d: {k: v.cpu() for k, v in e.items()} for d, e in emas.items()}}


class Evaluator:
    def __init__(self, kind: str, nfe: int, cm: dict[str, Any], device: torch.device) -> None:
        images = load_digits_images()
        self.model = digits_unet().to(device)
        self.scorers = []
        for name in ("digits-cnn", "digits-mlp"):
            ext = build_extractor(name, device=device)
            ref = compute_reference_stats(images, ext, device=device)
            self.scorers.append(FIDScorer(make_sampler(kind, nfe, cm), ext, ref, image_shape=(1, 8, 8),
                                          batch_size=1000, device=device))

    def scores(self, samples: int, seeds: list[int], second: bool = False) -> list[tuple[float, float | None]]:
        out = []
        for s in seeds:
            imgs = self.scorers[0].sample(self.model, samples, s)
            out.append((self.scorers[0].score_images(imgs), self.scorers[1].score_images(imgs) if second else None))
        return out


def probe(variant: dict[str, Any], runs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    tcfg = {**TRAIN_DEFAULTS, **{k: v for k, v in variant.items() if k in TRAIN_DEFAULTS}}
    scfg = {**SEARCH_DEFAULTS, **{k: v for k, v in variant.items() if k in SEARCH_DEFAULTS}}
    key = json.dumps(tcfg, sort_keys=True)
    if key not in runs:
        runs[key] = train(tcfg, device)
    run = runs[key]
    end = int(round(scfg["end_frac"] * tcfg["steps"] / tcfg["every"])) * tcfg["every"]
    snaps = [s for s in run["snaps"] if s[0] <= end]
    steps = sorted({s[0] for s in snaps})[-scfg["window"]:]
    snaps = [s for s in snaps if s[0] in steps]
    extra = [(f"online_ema{d}", st) for d, st in run["online"].items()] if end == tcfg["steps"] else []
    states = [s[2] for s in snaps] + [st for _, st in extra]
    kinds = [s[1] for s in snaps]
    n_all = len(states)
    raw = [i for i, k in enumerate(kinds) if k == "raw"]
    ema = [i for i, k in enumerate(kinds) if k == "ema"]
    basis = raw + ema
    default_nfe = 10 if tcfg["kind"] == "ddpm" else 1
    nfe = scfg["nfe"] or default_nfe
    ev = Evaluator(tcfg["kind"], nfe, tcfg["cm"], device)
    merger = StackedMerger(states, device=device)
    merger.bind(ev.model)
    ev.model.eval()
    search_seeds = list(range(scfg["search_seeds"]))
    final_seeds = [10_000 + i for i in range(scfg["final_seeds"])]

    def search(dense: list[float]) -> float:
        merger.merge(dense)
        return statistics.fmean(v for v, _ in ev.scores(scfg["search_samples"], search_seeds))

    def final(dense: list[float], evaluator: Evaluator | None = None) -> tuple[list[float], list[float]]:
        merger.merge(dense)
        if evaluator is not None:  # another sampler setting over the same merged weights
            evaluator.model.load_state_dict(ev.model.state_dict())
        r = (evaluator or ev).scores(scfg["final_samples"], final_seeds, second=True)
        return [a for a, _ in r], [b for _, b in r]

    k = len(raw)
    base = {"last": embed(one_hot(k, -1), raw, n_all), "uniform": embed(uniform(k), raw, n_all),
            "training_ema": embed([1.0], [ema[-1]], n_all)}
    grid = {g: embed(ema_profile(k, g), raw, n_all) for g in ema_decay_grid(k, 12)}
    gs = {g: search(d) for g, d in grid.items()}
    gbest = min(gs, key=gs.get)
    base["ema_star"] = grid[gbest]
    for i, (name, _) in enumerate(extra):
        base[name] = embed([1.0], [len(snaps) + i], n_all)
    bsearch = {b: search(d) for b, d in base.items()}
    expressible = [b for b in bsearch if all(abs(c) == 0 for j, c in enumerate(base[b]) if j not in basis)]
    centre_name = min(expressible, key=bsearch.get)
    centre = [base[centre_name][j] for j in basis]
    blocks = partition_by_kind(["raw"] * len(raw) + ["ema"] * len(ema), scfg["blocks"]) if scfg["blocks"] else None
    enc = AffineEncoding(centre=tuple(centre), radius=scfg["radius"], blocks=blocks)

    def dense_of(z) -> list[float]:
        return embed(enc.decode([float(v) for v in z]), basis, n_all)

    rng = np.random.default_rng(scfg["seed"])
    r = scfg["radius"]
    trials: list[tuple[float, list[float]]] = []
    t0 = time.perf_counter()
    if scfg["strategy"] == "cmaes":
        from cmaes import CMA

        es = CMA(mean=np.zeros(enc.dim), sigma=2 * r / 6, bounds=np.array([[-r, r]] * enc.dim), seed=scfg["seed"])
        while len(trials) < scfg["trials"]:
            sols = []
            for _ in range(es.population_size):
                z = es.ask()
                v = search(dense_of(z))
                trials.append((v, list(z)))
                sols.append((z, v))
                if len(trials) >= scfg["trials"]:
                    break
            if len(sols) == es.population_size:
                es.tell(sols)
    else:
        for _ in range(scfg["trials"]):
            z = rng.uniform(-r, r, enc.dim)
            trials.append((search(dense_of(z)), list(z)))
    search_s = time.perf_counter() - t0
    bar = min(bsearch.values())
    ttb = next((i + 1 for i, (v, _) in enumerate(trials) if v < bar), None)
    top = sorted(trials, key=lambda t: t[0])[:scfg["top_k"]]
    cands = {f"lcsc_top{i + 1}": dense_of(z) for i, (_, z) in enumerate(top)}
    avg = quantise([statistics.fmean(c) for c in zip(*[enc.decode(z) for _, z in top])])
    cands["lcsc_avg"] = embed(avg, basis, n_all)
    rows: dict[str, Any] = {}
    for name, d in {**base, **cands}.items():
        f, s2 = final(d)
        rows[name] = {"search": bsearch.get(name, search(d) if name == "lcsc_avg" else None), "final": f,
                      "final_mean": statistics.fmean(f), "second_mean": statistics.fmean(s2)}
    for nfe_x in scfg["eval_nfe"]:  # the same weights at other step counts (NFE row, CM 2-step base)
        ev_x = Evaluator(tcfg["kind"], nfe_x, tcfg["cm"], device)
        for name in ("training_ema", "ema_star", "uniform", "last"):
            f, s2 = final(base[name], ev_x)
            rows[f"{name}@{nfe_x}"] = {"final": f, "final_mean": statistics.fmean(f), "second_mean": statistics.fmean(s2)}
    for name in cands:
        if name == "lcsc_top1":
            rows[name]["search"] = top[0][0]
    base_names = [b for b in base if not b.startswith("online")] + [b for b in base if b.startswith("online")]
    strongest = min(base_names, key=lambda b: rows[b]["final_mean"])
    best = min(cands, key=lambda c: rows[c]["final_mean"])
    d = [a - b for a, b in zip(rows[best]["final"], rows[strongest]["final"])]
    diff, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    summary = {"variant": variant, "centre": centre_name, "ema_star_decay": gbest, "search_seconds": search_s,
               "trials_to_bar": ttb, "bar": bar, "strongest": strongest, "best": best,
               "ratio": rows[best]["final_mean"] / rows[strongest]["final_mean"], "diff": diff, "se": se,
               "t": diff / se if se else None,
               "second_ok": rows[best]["second_mean"] <= rows[strongest]["second_mean"], "rows": rows}
    log(f"== {variant.get('name')}: centre {centre_name}, strongest {strongest} {rows[strongest]['final_mean']:.3f}, "
        f"best {best} {rows[best]['final_mean']:.3f}, ratio {summary['ratio']:.3f}, t {summary['t']:.2f}, "
        f"2nd {rows[best]['second_mean']:.3f} vs {rows[strongest]['second_mean']:.3f}, ttb {ttb}, "
        f"search {search_s:.0f} s")
    for name, v in rows.items():
        log(f"   {name:>22}: search {v.get('search') if v.get('search') is None else round(v['search'], 3)}  "
            f"final {v['final_mean']:.3f}  2nd {v['second_mean']:.3f}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", help="JSON list of variant dicts (train and search settings)")
    ap.add_argument("--quick", action="store_true", help="one tiny variant instead (a plumbing check on a CPU)")
    ap.add_argument("--out", type=Path, help="write all summaries here (JSON)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    if (a.variants is None) == (not a.quick):
        ap.error("give --variants or --quick (one of them)")
    device = torch.device(a.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    runs: dict[str, Any] = {}
    out = []
    for v in [QUICK_VARIANT] if a.quick else json.loads(a.variants):
        try:
            out.append(probe(v, runs, device))
        except Exception as exc:  # one broken variant must not lose the others' figures
            log(f"variant {v.get('name')} failed: {type(exc).__name__}: {exc}")
            if a.quick:  # a plumbing check must fail loudly
                raise
        if a.out:
            a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
