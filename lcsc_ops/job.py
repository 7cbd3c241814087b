"""The optimize job: wires the window, the evaluators, the study and MLflow together.

One call of :func:`run_optimize` is one MLflow parent run (reused when the same study is
resumed) with one child run per trial, the baselines and final figures as metrics, the
plots and results as artifacts, and the winning merge registered with lineage tags.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.score_cache import ScoreCache
from lcsc_ops.math.encoding import AffineEncoding, partition_by_kind
from lcsc_ops.math.profiles import ema_decay_grid, ema_profile, embed
from lcsc_ops.optimize import (BASIS_KINDS, FINAL_SEED_BASE, Candidate, OptimizeConfig, Scorer,
                               average_coefficients, baselines, centre_in_basis, merged_state, restrict)
from lcsc_ops.report import build_report, save_plots
from lcsc_ops.spec import ModelSpec
from lcsc_ops.tracking.study import add_start_trial, completed, pruned, run_trials, searched


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
        scorer = FIDScorer(sampler, extractor, stats, image_shape=spec.image_shape,
                           batch_size=cfg.batch_size, device=device)
        # What the score cache (lcsc_ops.evaluation.score_cache) keys this evaluator by.
        scorer.identity = {"fid": name, "reference": stats.metadata, "sampler": dict(spec.sampler),
                           "image_shape": list(spec.image_shape), "batch_size": cfg.batch_size}
        scorers.append(scorer)
    return scorers[0], (scorers[1] if len(scorers) > 1 else None), first_path, "fid"


def run_optimize(cfg: OptimizeConfig, *, log: Callable[[str], None] = print,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the whole optimization; returns the report (also logged as ``results.json``)."""
    job = OptimizeJob(cfg, log=log, cache_dir=cache_dir)
    job.prepare()
    return job.run()


class OptimizeJob:
    """One optimization, in stages: prepare (window, evaluators, baselines, study), search,
    final evaluation, registration. MLflow and Optuna are only touched here and in the
    tracking modules; the scoring itself is pure (merge + evaluator)."""

    def __init__(self, cfg: OptimizeConfig, *, log: Callable[[str], None] = print,
                 cache_dir: Path | None = None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        from lcsc_ops.tracking.checkpoints import default_cache_dir

        cfg.validate()
        if cfg.tracking_uri:
            mlflow.set_tracking_uri(cfg.tracking_uri)
        self.cfg, self.log = cfg, log
        self.uri = mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.cache_dir = cache_dir or default_cache_dir()

    # -- stage 1 -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Fetch the window, build the evaluators and the merger, score the baselines, open the study."""
        from lcsc_ops.tracking.checkpoints import fetch_window, get_run_or_fail
        from lcsc_ops.tracking.study import RungPruner, default_storage, make_strategy, open_study, study_name

        cfg, log = self.cfg, self.log
        self.source = get_run_or_fail(cfg.run_id, self.uri)
        self.window = window = fetch_window(cfg.run_id, window=cfg.window, end_step=cfg.end_step,
                                            tracking_uri=self.uri, cache_dir=self.cache_dir)
        self.spec = window.spec if cfg.nfe is None else window.spec.with_sampler(steps=cfg.nfe)
        # With --nfe the bar is the base model at ITS default NFE (the paper's 15 -> 9 steps claim).
        self.default_nfe = int(window.spec.sampler.get("steps", 0)) or None
        if cfg.nfe is not None and cfg.evaluator:
            raise LcscError("--nfe applies to the built-in FID only; a custom evaluator samples by itself")
        device = resolve_device(cfg.device)
        strategy = make_strategy(cfg.strategy, cfg.seed)
        self.evaluator, self.second, self.ref_path, self.metric = build_evaluators(
            self.spec, cfg, device, self.cache_dir)
        self.basis = window.indices(*BASIS_KINDS[cfg.basis])
        if not self.basis:
            raise LcscError(f"run {cfg.run_id} has no {cfg.basis} checkpoints in the window")
        log(f"window: steps {window.steps[0]}..{window.steps[-1]} ({len(window.steps)} steps, "
            f"{len(window.entries)} checkpoints, basis {cfg.basis}: {len(self.basis)})")
        self.score_cache = ScoreCache(self.cache_dir / "scores.sqlite") if cfg.score_cache else None
        self.scorer = Scorer(window, self.spec.build, device, max_stack_memory=cfg.max_stack_memory,
                             precision=cfg.search_precision, cache=self.score_cache, model_identity=self.spec.to_json())
        if self.scorer.mode == "streaming":
            log(f"merge: streaming from the checkpoint files (the stack would exceed {cfg.max_stack_memory} GiB)")
        if cfg.search_precision != "fp32":
            log(f"search evaluations in {cfg.search_precision} ({self.scorer.merger.dtype} merge); "
                "the final evaluation and the registered model in full precision")

        self.base = baselines(window, cfg.ema_grid, lambda c: self.search_score(c.dense(len(window.entries))))
        self.storage = cfg.storage or default_storage(self.uri)
        self.study = open_study(study_name(cfg.run_id, cfg.study_key()), self.storage, strategy,
                                pruner=RungPruner() if cfg.prune else None)
        self.centre, self.encoding = self._encoding()
        self._seed_population()
        log(f"baselines (search {self.metric}): " + ", ".join(f"{c.name} {c.search_fid:.3f}" for c in self.base)
            + f"; search centred on {self.centre.name}")
        self.parent_id = _parent_run(self.client, self.study, self.source, cfg, self.storage)

    def search_score(self, dense: Sequence[float]) -> float:
        """The search objective: mean score over the fixed search seeds (common random numbers)."""
        seeds = list(range(self.cfg.search_seeds))
        return statistics.fmean(self.scorer.per_seed(dense, self.evaluator, self.cfg.search_samples, seeds))

    def search_rungs(self) -> Any:
        """The search objective at growing sample counts (``--prune``): the same fixed noise, its
        first n samples per seed, the mean over seeds at each count; the last count is
        :meth:`search_score` itself (see :mod:`lcsc_ops.evaluation.rungs`)."""
        from lcsc_ops.evaluation.rungs import fid_rungs, rung_counts
        from lcsc_ops.tracking.study import Rungs

        counts = rung_counts(self.cfg.search_samples, self.cfg.prune_rungs)
        seeds = list(range(self.cfg.search_seeds))

        def scores(coeffs: Sequence[float]) -> Any:
            self.scorer.merger.merge(self._embed(coeffs))
            return self.scorer.lazily(fid_rungs(self.evaluator, self.scorer.model, counts, seeds))

        return Rungs(counts, scores)

    def _encoding(self) -> tuple[Candidate, AffineEncoding]:
        """Centre the search on the strongest expressible baseline. A resumed study keeps the
        centre it started with (stored in the study), so its trials keep their meaning."""
        centre = centre_in_basis(self.base, self.basis)
        stored = self.study.user_attrs.get("centre")
        if stored is not None:
            centre = next(c for c in self.base if c.name == stored["name"])
            coeffs = tuple(stored["coefficients"])
        else:
            coeffs = tuple(restrict(centre, self.basis))
            self.study.set_user_attr("centre", {"name": centre.name, "coefficients": list(coeffs)})
        blocks = None
        if self.cfg.blocks:
            blocks = partition_by_kind([self.window.entries[i].kind for i in self.basis], self.cfg.blocks)
        return centre, AffineEncoding(centre=coeffs, radius=self.cfg.radius, blocks=blocks)

    def _seed_population(self) -> None:
        """The evolution strategy starts from EMA profiles (the LCSC paper's initialisation):
        post-hoc EMAs over the basis's raw checkpoints (its EMA snapshots if it has none) at
        every other rate of the EMA* grid, expressed in the search encoding."""
        from lcsc_ops.tracking.evolution import EvolutionSampler, seed_points_from_profiles

        sampler = self.study.sampler
        if not isinstance(sampler, EvolutionSampler) or sampler.seed_points:
            return
        kinds = [self.window.entries[i].kind for i in self.basis]
        pos = [j for j, k in enumerate(kinds) if k == "raw"] or list(range(len(kinds)))
        grid = ema_decay_grid(len(pos), self.cfg.ema_grid)[::2]
        profiles = [embed(ema_profile(len(pos), g), pos, len(kinds)) for g in grid]
        sampler.seed_points = seed_points_from_profiles(self.encoding, profiles)  # gen 0: these, the centre, jitter

    # -- stages 2-4 ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Search, evaluate, register; the parent run ends FINISHED (or FAILED on an error)."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                self._log_baselines()
                search_seconds = self._search()
                cands = self._candidates()
                self._final_evaluation([*self.base, *cands])
                report = build_report(self.cfg, self.window, self.base, cands, self.centre, metric=self.metric,
                                      search_seconds=search_seconds, trials=len(searched(self.study)),
                                      study=self.study.study_name, storage=self.storage,
                                      parent_run_id=self.parent_id, default_nfe=self.default_nfe)
                if self.cfg.prune:
                    report["pruned_trials"] = len(pruned(self.study))
                if self.score_cache is not None:
                    report["score_cache"] = {"reused": self.score_cache.hits, "computed": self.score_cache.misses}
                winner = next(c for c in [*self.base, *cands] if c.name == report["winner"])
                if self.cfg.register:
                    report["registered_model"] = self._register(winner, report)
                self._log_results(report, cands, winner, Path(tmp))
        except BaseException:
            self.client.set_terminated(self.parent_id, "FAILED")
            raise
        self.client.set_terminated(self.parent_id, "FINISHED")
        if self.score_cache is not None and self.score_cache.hits:
            self.log(f"score cache: {self.score_cache.hits} evaluations reused, {self.score_cache.misses} computed")
        return report

    def _log_baselines(self) -> None:
        for c in self.base:
            self.client.log_metric(self.parent_id, f"search_{self.metric}.{c.name}", c.search_fid)
        if self.ref_path is not None:
            self.client.log_artifact(self.parent_id, str(self.ref_path), "fid")

    def _embed(self, coeffs: Sequence[float]) -> list[float]:
        dense = [0.0] * len(self.window.entries)
        for i, c in zip(self.basis, coeffs):
            dense[i] = c
        return dense

    def _search(self) -> float:
        from lcsc_ops.tracking.registry import TrialRunLogger

        trial_logger = TrialRunLogger(self.parent_id, metric=self.metric)
        add_start_trial(self.study, self.encoding, self.centre.search_fid, self.centre.name)
        try:
            trial_logger.backfill(self.study)  # the start trial, and trials a crash left without a child run
            t0 = time.perf_counter()
            ran = run_trials(self.study, self.encoding, lambda c: self.search_score(self._embed(c)),
                             self.cfg.n_trials, [trial_logger], rungs=self.search_rungs() if self.cfg.prune else None)
            seconds = time.perf_counter() - t0
        finally:
            trial_logger.close()  # every finished trial has its child run before we go on
        best = self.study.best_trial
        n_pruned = len(pruned(self.study))
        self.log(f"search: {ran} new trials ({len(searched(self.study))} in study {self.study.study_name}, plus the start trial"
                 + (f", {n_pruned} more pruned" if n_pruned else "") + f") in {seconds:.1f} s; "
                 f"best search {self.metric} {best.value:.3f} (trial {best.number})")
        return seconds

    def _candidates(self) -> list[Candidate]:
        """The top-k trials, plus the average of their coefficients (which shrinks the winner's curse)."""
        done = sorted(completed(self.study), key=lambda t: t.value)[:self.cfg.top_k]
        basis = tuple(self.basis)
        cands = [Candidate(f"lcsc_top{r + 1}", basis, tuple(t.user_attrs["coefficients"]), "lcsc",
                           search_fid=t.value, note=f"trial {t.number}") for r, t in enumerate(done)]
        if len(cands) > 1:
            avg = Candidate("lcsc_avg", basis, tuple(average_coefficients([c.coeffs for c in cands])), "lcsc",
                            note=f"mean of top {len(cands)}")
            avg.search_fid = self.search_score(self._embed(avg.coeffs))
            cands.append(avg)
        return cands

    def _final_evaluation(self, cands: Sequence[Candidate]) -> None:
        """Every candidate on the same fresh seeds (paired), never used in the search.

        With ``--nfe`` the baselines are also scored at the spec's default NFE
        (``final_default_nfe``), the figure a merged model at fewer steps must match."""
        seeds = [FINAL_SEED_BASE + i for i in range(self.cfg.final_seeds)]
        n = self.cfg.final_samples
        self.scorer.full_precision()  # whatever --search-precision was: float32 merge, no autocast, no TF32
        at_default = None
        if self.cfg.nfe is not None and self.cfg.nfe != self.default_nfe:
            from lcsc_ops.models.diffusion import make_sampler

            at_default = copy.copy(self.evaluator)  # same extractor and reference, default sampler
            at_default.sampler = make_sampler(self.window.spec.sampler)
            if getattr(self.evaluator, "identity", None) is not None:
                at_default.identity = {**self.evaluator.identity, "sampler": dict(self.window.spec.sampler)}
        for c in cands:
            dense = c.dense(len(self.window.entries))
            if self.second is not None:
                c.final, c.second = self.scorer.per_seed_pair(dense, self.evaluator, self.second, n, seeds)
            else:
                c.final = self.scorer.per_seed(dense, self.evaluator, n, seeds)
            if at_default is not None and c.kind == "baseline":
                c.final_default_nfe = self.scorer.per_seed(dense, at_default, n, seeds)

    def _register(self, winner: Candidate, report: dict[str, Any]) -> dict[str, str]:
        from lcsc_ops.math.merge import load_checkpoint_state
        from lcsc_ops.tracking.registry import register_model

        entries = [self.window.entries[i] for i in winner.indices]
        name = self.cfg.model_name or self.source.data.tags.get("lcsc.model_name") or "lcsc-model"
        tags = _lineage_tags(self.cfg, report, winner, entries)
        same = self._registered_already(name, tags)
        if same is not None:  # the same command run again on a finished study: no duplicate version
            self.log(f"{name} version {same} is already this merge ({winner.name}); nothing registered")
            return {"name": name, "version": same, "existing": True}
        # Checkpoints may hold only part of the model (adapters): the factory's base fills the rest.
        model = load_checkpoint_state(self.spec.build(), merged_state(self.window, winner))
        version = register_model(model, name=name, spec=self.spec.to_dict(), tags=tags, run_id=self.parent_id)
        self.client.set_tag(self.parent_id, "lcsc.registered_model", f"{name}/{version}")
        self.log(f"registered {name} version {version} ({winner.name})")
        return {"name": name, "version": version}

    def _registered_already(self, name: str, tags: dict[str, str]) -> str | None:
        """A version of ``name`` logged by this optimization's parent run whose merge is the same
        (winner, checkpoint hashes and coefficients), if any."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.parent_id}'")
        except MlflowException:
            return None  # no such registered model yet
        keys = ("lcsc.winner", "lcsc.checkpoint_sha256", "lcsc.coefficients")
        for mv in sorted(versions, key=lambda v: int(v.version)):
            if all(mv.tags.get(k) == tags[k] for k in keys):
                return str(mv.version)
        return None

    def _log_results(self, report: dict[str, Any], cands: Sequence[Candidate], winner: Candidate, tmp: Path) -> None:
        for name, row in report["methods"].items():
            self.client.log_metric(self.parent_id, f"final_{self.metric}.{name}", row["final_mean"])
        (tmp / "results.json").write_text(json.dumps(report, indent=2))
        self.client.log_artifact(self.parent_id, str(tmp / "results.json"))
        for path in save_plots(self.study, self.base, cands, winner, self.window, tmp, metric=self.metric):
            self.client.log_artifact(self.parent_id, str(path), "plots")


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
