"""The optimize job: wires the window, the evaluators, the study and MLflow together.

One call of :func:`run_optimize` is one MLflow parent run (reused when the same study is
resumed) with one child run per trial, the baselines and final figures as metrics, the
plots and results as artifacts, and the winning merge registered with lineage tags.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.math.encoding import AffineEncoding, partition_by_kind
from lcsc_ops.optimize import (BASIS_KINDS, FINAL_SEED_BASE, Candidate, OptimizeConfig, Scorer,
                               average_coefficients, baselines, centre_in_basis, merged_state, restrict)
from lcsc_ops.spec import ModelSpec


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LcscError(f"device {name!r} requested but no CUDA device is visible")
    return name


def build_evaluators(spec: ModelSpec, cfg: OptimizeConfig, device: str, cache_dir: Path
                     ) -> tuple[Callable, Callable | None, Path | None, str]:
    """The search/final evaluator, an independent second one (None for a user evaluator), the
    reference-statistics file, and the metric's name."""
    from lcsc_ops.evaluation.fid import load_evaluator

    if cfg.evaluator:
        return load_evaluator(cfg.evaluator), None, None, "score"
    from lcsc_ops.evaluation.features import build_extractor, default_extractor_for, second_extractor_for
    from lcsc_ops.evaluation.fid import FIDScorer, ReferenceCache
    from lcsc_ops.models.diffusion import make_sampler

    sampler = make_sampler(spec.sampler)
    cache = ReferenceCache(cache_dir / "fid", device=device)
    scorers, first_path = [], None
    names = [cfg.feature_extractor or default_extractor_for(spec.dataset)]
    second = second_extractor_for(spec.dataset)
    if second != names[0]:
        names.append(second)
    for name in names:
        extractor = build_extractor(name, device=device, inception_weights=cfg.inception_weights)
        stats, path, _ = cache.get(spec.dataset, name, extractor)
        first_path = first_path or path
        scorers.append(FIDScorer(sampler, extractor, stats, image_shape=spec.image_shape,
                                 batch_size=cfg.batch_size, device=device))
    return scorers[0], (scorers[1] if len(scorers) > 1 else None), first_path, "fid"


def run_optimize(cfg: OptimizeConfig, *, log: Callable[[str], None] = print,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the whole optimization; returns the report (also logged as ``results.json``)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lcsc_ops.tracking.checkpoints import default_cache_dir, fetch_window, get_run_or_fail
    from lcsc_ops.tracking.registry import TrialRunLogger
    from lcsc_ops.tracking.study import (completed, default_storage, make_strategy, open_study, run_trials,
                                         study_name)

    cfg.validate()
    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    cache_dir = cache_dir or default_cache_dir()
    source = get_run_or_fail(cfg.run_id, uri)
    window = fetch_window(cfg.run_id, window=cfg.window, end_step=cfg.end_step, tracking_uri=uri,
                          cache_dir=cache_dir)
    spec = window.spec if cfg.nfe is None else window.spec.with_sampler(steps=cfg.nfe)
    device = resolve_device(cfg.device)
    strategy = make_strategy(cfg.strategy, cfg.seed)
    evaluator, second, ref_path, metric = build_evaluators(spec, cfg, device, cache_dir)
    basis = window.indices(*BASIS_KINDS[cfg.basis])
    if not basis:
        raise LcscError(f"run {cfg.run_id} has no {cfg.basis} checkpoints in the window")
    log(f"window: steps {window.steps[0]}..{window.steps[-1]} ({len(window.steps)} steps, "
        f"{len(window.entries)} checkpoints, basis {cfg.basis}: {len(basis)})")
    scorer = Scorer(window, spec.build, device, max_stack_memory=cfg.max_stack_memory)
    if scorer.mode == "streaming":
        log(f"merge: streaming from the checkpoint files (the stack would exceed {cfg.max_stack_memory} GiB)")
    size, search_seeds = len(window.entries), list(range(cfg.search_seeds))

    def search_score(dense: list[float]) -> float:
        return statistics.fmean(scorer.per_seed(dense, evaluator, cfg.search_samples, search_seeds))

    base = baselines(window, cfg.ema_grid, lambda c: search_score(c.dense(size)))
    centre = centre_in_basis(base, basis)
    blocks = None
    if cfg.blocks:
        kinds = [window.entries[i].kind for i in basis]
        blocks = partition_by_kind(kinds, cfg.blocks)
    encoding = AffineEncoding(centre=tuple(restrict(centre, basis)), radius=cfg.radius, blocks=blocks)
    log("baselines (search " + metric + "): " + ", ".join(f"{c.name} {c.search_fid:.3f}" for c in base)
        + f"; search centred on {centre.name}")

    storage = cfg.storage or default_storage(uri)
    study = open_study(study_name(cfg.run_id, cfg.study_key()), storage, strategy)
    parent_id = _parent_run(client, study, source, cfg, storage)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = _search_and_finish(cfg, client, study, parent_id, window, spec, source, basis, base, centre,
                                        encoding, scorer, evaluator, second, search_score, metric, ref_path,
                                        storage, Path(tmp), log, completed, run_trials, TrialRunLogger)
        except BaseException:
            client.set_terminated(parent_id, "FAILED")
            raise
    client.set_terminated(parent_id, "FINISHED")
    return report


def _parent_run(client: Any, study: Any, source: Any, cfg: OptimizeConfig, storage: str) -> str:
    from mlflow.exceptions import MlflowException

    parent_id = study.user_attrs.get("mlflow_parent_run_id")
    if parent_id:
        try:
            client.get_run(parent_id)
            client.update_run(parent_id, status="RUNNING")
            return parent_id
        except MlflowException:
            pass  # the store was reset: start a new parent run
    run = client.create_run(source.info.experiment_id, run_name=f"optimize-{source.info.run_name or cfg.run_id[:8]}",
                            tags={"lcsc.kind": "optimize", "lcsc.source_run": cfg.run_id,
                                  "optuna.study": study.study_name, "optuna.storage": storage})
    params = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k not in ("tracking_uri",)}
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def _search_and_finish(cfg, client, study, parent_id, window, spec, source, basis, base, centre, encoding, scorer,
                       evaluator, second, search_score, metric, ref_path, storage, tmp, log, completed, run_trials,
                       TrialRunLogger) -> dict[str, Any]:
    import time

    from lcsc_ops.report import build_report, save_plots
    from lcsc_ops.tracking.registry import register_model

    for c in base:
        client.log_metric(parent_id, f"search_{metric}.{c.name}", c.search_fid)
    if ref_path is not None:
        client.log_artifact(parent_id, str(ref_path), "fid")

    def embed(coeffs: list[float]) -> list[float]:
        dense = [0.0] * len(window.entries)
        for i, c in zip(basis, coeffs):
            dense[i] = c
        return dense

    trial_logger = TrialRunLogger(parent_id, metric=metric)
    trial_logger.backfill(study)
    t0 = time.perf_counter()
    ran = run_trials(study, encoding, lambda coeffs: search_score(embed(coeffs)), cfg.n_trials, [trial_logger])
    search_seconds = time.perf_counter() - t0
    trial_logger.backfill(study)
    done = sorted(completed(study), key=lambda t: t.value)
    log(f"search: {ran} new trials ({len(done)} in study {study.study_name}) in {search_seconds:.1f} s; "
        f"best search {metric} {done[0].value:.3f} (trial {done[0].number})")

    cands = [Candidate(f"lcsc_top{r + 1}", tuple(basis), tuple(t.user_attrs["coefficients"]), "lcsc",
                       search_fid=t.value, note=f"trial {t.number}") for r, t in enumerate(done[:cfg.top_k])]
    if len(cands) > 1:
        avg = Candidate("lcsc_avg", tuple(basis), tuple(average_coefficients([c.coeffs for c in cands])), "lcsc",
                        note=f"mean of top {len(cands)}")
        avg.search_fid = search_score(avg.dense(len(window.entries)))
        cands.append(avg)
    final_seeds = [FINAL_SEED_BASE + i for i in range(cfg.final_seeds)]
    for c in base + cands:
        dense = c.dense(len(window.entries))
        if second is not None:
            c.final, c.second = scorer.per_seed_pair(dense, evaluator, second, cfg.final_samples, final_seeds)
        else:
            c.final = scorer.per_seed(dense, evaluator, cfg.final_samples, final_seeds)

    report = build_report(cfg, window, base, cands, centre, metric=metric, search_seconds=search_seconds,
                          trials=len(done), study=study.study_name, storage=storage, parent_run_id=parent_id)
    for name, row in report["methods"].items():
        client.log_metric(parent_id, f"final_{metric}.{name}", row["final_mean"])
    winner = next(c for c in base + cands if c.name == report["winner"])
    if cfg.register:
        from lcsc_ops.math.merge import load_checkpoint_state

        # Checkpoints may hold only part of the model (adapters): the factory's base fills the rest.
        model = load_checkpoint_state(spec.build(), merged_state(window, winner))
        entries = [window.entries[i] for i in winner.indices]
        tags = _lineage_tags(cfg, report, winner, entries)
        name = cfg.model_name or source.data.tags.get("lcsc.model_name") or "lcsc-model"
        version = register_model(model, name=name, spec=spec.to_dict(), tags=tags, run_id=parent_id)
        report["registered_model"] = {"name": name, "version": version}
        client.set_tag(parent_id, "lcsc.registered_model", f"{name}/{version}")
        log(f"registered {name} version {version} ({winner.name})")
    (tmp / "results.json").write_text(json.dumps(report, indent=2))
    client.log_artifact(parent_id, str(tmp / "results.json"))
    for path in save_plots(study, base, cands, winner, window, tmp, metric=metric):
        client.log_artifact(parent_id, str(path), "plots")
    return report


def _lineage_tags(cfg, report, winner: Candidate, entries) -> dict[str, str]:
    from lcsc_ops.tracking.registry import to_json_tag

    methods = report["methods"]
    return {
        "lcsc.source_run": cfg.run_id,
        "lcsc.optimize_run": report["parent_run_id"],
        "lcsc.winner": winner.name,
        "lcsc.window_steps": to_json_tag(report["window_steps"]),
        "lcsc.checkpoints": to_json_tag([e.file for e in entries]),
        "lcsc.coefficients": to_json_tag([float(c) for c in winner.coeffs]),
        "lcsc.checkpoint_sha256": to_json_tag([e.sha256 for e in entries]),
        "lcsc.search_fid": repr(winner.search_fid),
        "lcsc.final_fid": repr(methods[winner.name]["final_mean"]),
        "lcsc.baseline_fids": to_json_tag({n: r["final_mean"] for n, r in methods.items() if r["kind"] == "baseline"}),
        "lcsc.strongest_baseline": report["strongest_baseline"],
        "lcsc.second_metric_flag": str(report["second_metric_worse"]).lower(),
        "lcsc.study": report["study"],
    }
