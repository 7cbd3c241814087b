"""Trial overhead and per-trial FID, measured through the real code path (bench_perf sections 3 + 4).

Trials run as ``lcsc-ops optimize`` runs them: ``SearchStudy.run`` (Optuna CMA-ES on the
default storage, Optuna's journal file, starting from a start trial) with a ``TrialRunLogger``
callback (one MLflow child run per trial, sqlite store), scoring with ``Scorer`` + ``FIDScorer``
on the digits DDPM. Sampling and feature extraction are timed by thin wrappers around the
sampler and the extractor; everything else in the trial's wall time is overhead. Where
Optuna's share goes is measured on raw Optuna studies (one per storage) run by the same
``run_trials`` with a constant objective.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from _perf_common import best, interleaved, write_window


class _TimedSampler:
    def __init__(self, inner: Any, clock: dict) -> None:
        self.inner, self.clock = inner, clock

    def sample(self, model: torch.nn.Module, noise: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner.sample(model, noise)
        finally:
            self.clock["sampling"] += time.perf_counter() - t0


class _TimedExtractor(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, clock: dict) -> None:
        super().__init__()
        self.inner, self.clock, self.num_features = inner, clock, int(inner.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            return self.inner(x)
        finally:
            self.clock["features"] += time.perf_counter() - t0


def bench_trials_and_fid(work: Path, cfg: dict) -> tuple[dict, dict]:
    import optuna
    from mlflow.tracking import MlflowClient
    from torchmetrics.image.fid import FrechetInceptionDistance

    from lcsc_ops.evaluation.data import load_dataset
    from lcsc_ops.evaluation.features import build_extractor
    from lcsc_ops.evaluation.fid import FIDScorer, ReferenceCache
    from lcsc_ops.math.encoding import AffineEncoding
    from lcsc_ops.math.profiles import uniform
    from lcsc_ops.models.diffusion import DDIMSampler
    from lcsc_ops.pipeline.scoring import Scorer
    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.checkpoints import CheckpointEntry, CheckpointWindow, sha256_file
    from lcsc_ops.records import TrialRecord
    from lcsc_ops.search.storage import default_storage, make_storage
    from lcsc_ops.search.strategies import make_strategy
    from lcsc_ops.search.study import SearchStudy
    from lcsc_ops.search.trials import add_start_trial, run_trials
    from lcsc_ops.store.runs import TrialRunLogger

    k, channels, samples = cfg["k"], cfg["trial_channels"], cfg["samples"]
    spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": channels},
                     sampler={"name": "ddim", "steps": 10})
    paths = write_window(work / "trial-window", channels, k)
    entries = tuple(CheckpointEntry(step=50 * i, kind="raw", file=p.name, sha256=sha256_file(p),
                                    bytes=p.stat().st_size, path=p) for i, p in enumerate(paths))
    window = CheckpointWindow(run_id="bench", spec=spec, entries=entries, training_ema=None,
                              steps=tuple(e.step for e in entries))
    scorer = Scorer(window, spec.build, "cpu")
    clock = {"sampling": 0.0, "features": 0.0, "merge": 0.0, "objective": 0.0, "mlflow": 0.0}
    extractor = build_extractor("digits-cnn")
    stats, _, _ = ReferenceCache(work / "fid").get("digits", "digits-cnn", extractor)
    timed = FIDScorer(_TimedSampler(DDIMSampler(steps=10), clock), _TimedExtractor(extractor, clock), stats,
                      image_shape=(1, 8, 8), batch_size=500)
    merge = scorer.merger.merge

    def timed_merge(coeffs: list[float]) -> None:
        t0 = time.perf_counter()
        merge(coeffs)
        clock["merge"] += time.perf_counter() - t0

    scorer.merger.merge = timed_merge  # instance attribute: the Scorer's own call goes through the clock

    def score(coeffs: list[float]) -> float:  # as job.run_optimize's search_score
        t0 = time.perf_counter()
        try:
            return statistics.fmean(scorer.per_seed(coeffs, timed, samples, [0]))
        finally:
            clock["objective"] += time.perf_counter() - t0

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bench-trials", artifact_location=(work / "artifacts").as_uri())
    parent = client.create_run(exp, run_name="optimize-bench", tags={"lcsc.kind": "optimize"}).info.run_id
    study = SearchStudy.open("bench", default_storage(uri))
    study.use_strategy("cmaes", 0)
    trial_logger = TrialRunLogger(parent, tracking_uri=uri)

    def log_trial(trial: TrialRecord) -> None:
        t0 = time.perf_counter()
        trial_logger(trial, study.name)
        clock["mlflow"] += time.perf_counter() - t0

    encoding = AffineEncoding(centre=tuple(uniform(k)), radius=0.3)
    warm, n = cfg["warmup_trials"], cfg["trials"]

    def timed_trials(run: Callable[[int], int], after: Callable[[], None] | None = None) -> float:
        """Wall seconds of ``n`` trials after ``warm`` untimed ones (plus ``after()``, e.g. waiting
        for the background child runs); resets the clock first. ``run(total)`` runs trials until
        the study holds ``total`` searched ones and returns how many it ran."""
        run(warm)
        if after is not None:
            after()
        clock.update({name: 0.0 for name in clock})
        t0 = time.perf_counter()
        assert run(warm + n) == n
        if after is not None:
            after()
        return time.perf_counter() - t0

    # As `lcsc-ops optimize`: the centre, already scored, is the study's start trial.
    study.add_start(encoding, score(list(encoding.centre)), "uniform")
    try:
        wall = timed_trials(lambda total: study.run(encoding, score, total, log_trial), after=trial_logger.flush)
        assert len(trial_logger.logged) == warm + n
    finally:
        trial_logger.close()
    per = {name: 1e3 * v / n for name, v in clock.items()}
    trial = {"trials": n, "samples_per_trial": samples, "k": k, "params": scorer.merger.num_parameters,
             "wall_ms": 1e3 * wall / n, "sampling_ms": per["sampling"], "features_ms": per["features"],
             "merge_ms": per["merge"],
             "fid_statistics_ms": per["objective"] - per["merge"] - per["sampling"] - per["features"],
             "mlflow_child_run_ms": per["mlflow"],
             "optuna_ms": 1e3 * wall / n - per["objective"] - per["mlflow"]}
    trial["overhead_fraction"] = 1.0 - (per["sampling"] + per["features"]) / (1e3 * wall / n)
    # Where Optuna's share goes: the same CMA-ES study with a constant objective, run by the same
    # run_trials (budget claims, stale-trial checks and heartbeats included), on each storage.
    for name, storage in (("sqlite", make_storage(f"sqlite:///{work / 'optuna-bare.db'}")),
                          ("sqlite_plain_journal_mode",
                           optuna.storages.RDBStorage(f"sqlite:///{work / 'optuna-plain.db'}")),
                          ("journal", make_storage(str(work / "optuna-default.journal"))),
                          ("memory", optuna.storages.InMemoryStorage())):
        bare = optuna.create_study(study_name=f"bench-bare-{name}", storage=storage, direction="minimize",
                                   sampler=make_strategy("cmaes", 0))
        add_start_trial(bare, encoding, 1.0, "uniform")
        trial[f"optuna_only_{name}_ms"] = 1e3 * timed_trials(
            lambda total, bare=bare, storage=storage: run_trials(bare, encoding, lambda coeffs: 1.0, total,
                                                                 storage=storage)) / n
    print(f"trials [{n} x {samples} samples, K={k}]: {trial['wall_ms']:.0f} ms/trial = sampling "
          f"{trial['sampling_ms']:.0f} + features {trial['features_ms']:.0f} + merge {trial['merge_ms']:.1f} + "
          f"FID statistics {trial['fid_statistics_ms']:.1f} + MLflow {trial['mlflow_child_run_ms']:.0f} + "
          f"Optuna {trial['optuna_ms']:.0f}; overhead {trial['overhead_fraction']:.1%} (Optuna alone, ms/trial: sqlite "
          f"WAL {trial['optuna_only_sqlite_ms']:.0f}, sqlite default journal mode "
          f"{trial['optuna_only_sqlite_plain_journal_mode_ms']:.0f}, journal file (the default) "
          f"{trial['optuna_only_journal_ms']:.0f}, in memory {trial['optuna_only_memory_ms']:.1f})", flush=True)

    # FID of one trial's samples: cached reference vs recomputing both sides each trial.
    del scorer.merger.merge  # the class's own method again
    scorer.merger.merge(uniform(k))
    cached = FIDScorer(DDIMSampler(steps=10), extractor, stats, image_shape=(1, 8, 8), batch_size=500)
    t0 = time.perf_counter()
    images = cached.sample(scorer.model, samples, 0)
    sampling_s = time.perf_counter() - t0
    real = load_dataset("digits")
    fresh = FrechetInceptionDistance(feature=extractor, reset_real_features=True)
    values: dict[str, float] = {}

    def recompute() -> None:
        fresh.reset()
        with torch.no_grad():
            for batch in real.split(500):
                fresh.update(batch, real=True)
            for batch in images.split(500):
                fresh.update(batch, real=False)
        values["recompute"] = float(fresh.compute())

    def from_cache() -> None:
        values["cached"] = cached.score_images(images)

    times = interleaved({"cached": from_cache, "recompute": recompute}, cfg["fid_reps"])
    c_ms, r_ms = 1e3 * best(times["cached"]), 1e3 * best(times["recompute"])
    fid = {"samples": samples, "reference_images": len(real), "cached_ms": c_ms, "recompute_ms": r_ms,
           "speedup": r_ms / c_ms, "sampling_ms": 1e3 * sampling_s,
           "speedup_including_sampling": (r_ms + 1e3 * sampling_s) / (c_ms + 1e3 * sampling_s),
           "fid_cached": values["cached"], "fid_recomputed": values["recompute"]}
    assert abs(values["cached"] - values["recompute"]) <= 1e-6 * max(1.0, abs(values["recompute"])), values
    print(f"FID [{samples} samples vs {len(real)} reference images]: cached {c_ms:.1f} ms, recomputed "
          f"{r_ms:.1f} ms ({fid['speedup']:.2f}x; same value {values['cached']:.4f})", flush=True)
    return trial, fid
