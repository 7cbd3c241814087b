"""``lcsc-ops optimize`` as stages over plain data: window → baselines → search → final evaluation → registration.

Each stage is a function of a :class:`Job` (what was prepared) and the previous stage's
result. MLflow is reached only through :mod:`lcsc_ops.store`, Optuna only through
:class:`~lcsc_ops.search.study.SearchStudy`; the scoring itself is pure (merge + evaluator).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lcsc_ops.checkpoints import CheckpointWindow, default_cache_dir
from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.evaluators import Evaluators, build_evaluators, resolve_device
from lcsc_ops.evaluation.score_cache import ScoreCache
from lcsc_ops.interrupts import deferred
from lcsc_ops.math.encoding import AffineEncoding, partition_by_kind
from lcsc_ops.math.profiles import ema_decay_grid, ema_profile, embed
from lcsc_ops.pipeline.candidates import (Candidate, average_coefficients, baselines,
                                          centre_in_basis, finite_baselines, merged_state, restrict)
from lcsc_ops.pipeline.checks import checked_window
from lcsc_ops.pipeline.config import BASIS_KINDS, OptimizeConfig
from lcsc_ops.pipeline import stopping
from lcsc_ops.pipeline.progress import PlainProgress, Progress, SilentProgress
from lcsc_ops.pipeline.report import build_report, class_accuracy_metrics, publish_report, seeds_used
from lcsc_ops.pipeline.scoring import Scorer
from lcsc_ops.redact import mask_credentials
from lcsc_ops.search.evolution import seed_points_from_profiles
from lcsc_ops.search.storage import default_storage, study_name
from lcsc_ops.search.study import SearchStudy
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store import sources, tracking
from lcsc_ops.store.registry import find_version, register_model, to_json_tag
from lcsc_ops.store.runs import OptimizeRun, TrialRunLogger

Log = Callable[[str], None]


@dataclass
class Job:
    """What every stage needs, prepared once: the window, the evaluators and the scorer."""

    cfg: OptimizeConfig
    log: Log
    tracking_uri: str
    source: Any  # the training run (MLflow entity)
    window: CheckpointWindow
    spec: ModelSpec  # the window's spec, with --nfe and --guidance applied
    basis: list[int]  # the entries the merge may combine
    evaluators: Evaluators
    scorer: Scorer
    score_cache: ScoreCache | None
    progress: Progress = field(default_factory=SilentProgress)

    @property
    def default_nfe(self) -> int | None:
        """The spec's own NFE: with --nfe, the bar is the base model at it (the paper's 15 -> 9 steps)."""
        return int(self.window.spec.sampler.get("steps", 0)) or None

    @property
    def default_guidance(self) -> float | None:
        """The spec's own guidance scale (None for an unconditional model)."""
        cond = self.window.spec.conditioning
        return None if cond is None else cond.guidance

    def search_score(self, dense: Sequence[float]) -> float:
        """The search objective: mean score over the fixed search seeds (common random numbers)."""
        seeds = seeds_used(self.cfg)["search"]
        return statistics.fmean(self.scorer.per_seed(dense, self.evaluators.main, self.cfg.search_samples, seeds))

    def dense(self, coeffs: Sequence[float]) -> list[float]:
        """Basis coefficients over the whole window."""
        return embed(coeffs, self.basis, len(self.window.entries))


@dataclass
class Search:
    """The study, its centre and encoding, and the parent run it logs under."""

    study: SearchStudy
    centre: Candidate
    encoding: AffineEncoding
    run: OptimizeRun
    storage: str
    base: Sequence[Candidate] = ()  # the baselines, with their search scores


def prepare(cfg: OptimizeConfig, log: Log, cache_dir: Path | None = None, progress: Progress | None = None) -> Job:
    """Check the options, fetch and verify the window, build the evaluators and the scorer.

    The run's model spec is untrusted: its factory is checked against --trust-factory /
    --trust-remote-code (and LCSC_OPS_TRUST_FACTORY) before any checkpoint is downloaded."""
    from lcsc_ops.spec import Trust

    cfg.validate()
    uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    cache_dir = cache_dir or default_cache_dir()
    source = tracking.get_run_or_fail(cfg.run_id, uri)
    SearchStudy.check_storage(cfg.storage or default_storage(uri))  # a database that refuses us: before any download
    trust = Trust(factory=tuple(cfg.trust_factory), remote_code=cfg.trust_remote_code)
    window = checked_window(sources.fetch_window(cfg.run_id, window=cfg.window, end_step=cfg.end_step,
                                                 tracking_uri=uri, cache_dir=cache_dir, trust=trust,
                                                 options=source_options(cfg, log)), log)
    spec = window.spec if cfg.nfe is None else window.spec.with_sampler(steps=cfg.nfe)
    if cfg.guidance is not None:
        if spec.conditioning is None:
            raise LcscError(f"--guidance applies to class-conditional models: run {cfg.run_id}'s model spec has "
                            "no conditioning")
        spec = spec.with_guidance(cfg.guidance)
    device = resolve_device(cfg.device)
    evaluators = build_evaluators(spec, evaluator=cfg.evaluator, feature_extractor=cfg.feature_extractor,
                                  inception_weights=cfg.inception_weights, batch_size=cfg.batch_size, device=device,
                                  cache_dir=cache_dir, metric_name=cfg.metric_name,
                                  second_evaluator=cfg.second_evaluator, evaluator_version=cfg.evaluator_version)
    basis = window.indices(*BASIS_KINDS[cfg.basis])
    if not basis:
        raise LcscError(f"run {cfg.run_id} has no {cfg.basis} checkpoints in the window")
    if not window.complete:
        log(f"run {cfg.run_id} is partial (no end marker: still training, or stopped before it finished): "
            f"using the checkpoints logged so far")
    log(f"window: steps {window.steps[0]}..{window.steps[-1]} ({len(window.steps)} steps, "
        f"{len(window.entries)} checkpoints, basis {cfg.basis}: {len(basis)})")
    cache = ScoreCache(cache_dir / "scores.sqlite") if cfg.score_cache else None
    scorer = Scorer(window, spec.build, device, max_stack_memory=cfg.max_stack_memory,
                    precision=cfg.search_precision, cache=cache, model_identity=spec.to_json())
    log(scorer.choice)
    if cfg.search_precision != "fp32":
        log(f"search evaluations in {cfg.search_precision} ({scorer.merger.dtype} merge); "
            "the final evaluation and the registered model in full precision")
    return Job(cfg, log, uri, source, window, spec, basis, evaluators, scorer, cache,
               progress if progress is not None else PlainProgress(log))


def source_options(cfg: OptimizeConfig, log: Log) -> sources.SourceOptions:
    """What the options say about the source run: for a run another tool logged (no model spec of
    its own), the spec from --factory and friends, the key prefix, the layout; the pickle option."""
    from lcsc_ops.spec import spec_from_options

    spec = None
    if cfg.factory is not None:
        spec = spec_from_options(cfg.factory, cfg.factory_kwargs, sampler_steps=cfg.sampler_steps, dataset=cfg.dataset,
                                 image_shape=cfg.image_shape, conditioning=cfg.conditioning)
    return sources.SourceOptions(spec=spec, key_prefix=cfg.key_prefix, allow_pickle=cfg.allow_pickle,
                                 layout=cfg.layout, log=log)


def score_baselines(job: Job) -> list[Candidate]:
    """Last, uniform, EMA* and training EMA under the search protocol."""
    n = len(job.window.entries)
    job.progress.stage("baselines", baseline_count(job.window, job.cfg.ema_grid), unit="scored")

    def score(c: Candidate) -> float:
        value = job.search_score(c.dense(n))
        job.progress.advance(status=f"{c.name} {value:.3f}")
        return value

    return finite_baselines(baselines(job.window, job.cfg.ema_grid, score), job.log)


def baseline_count(window: CheckpointWindow, ema_grid: int) -> int:
    """How many evaluations :func:`~lcsc_ops.pipeline.candidates.baselines` makes: last, uniform,
    the EMA* grid (EMA* itself is the grid's best, not scored again) and the training EMA."""
    k = len(window.indices("raw")) or len(window.entries)
    return 2 + len(ema_decay_grid(k, ema_grid)) + (window.training_ema is not None)


def open_search(job: Job) -> tuple[Search, list[Candidate]]:
    """Open (or join, or resume) the study and its shared setup: the baselines, the centre of the
    box (the strongest expressible baseline), the MLflow parent run and the start trial are made
    once per study, by the first worker, and reused by every other worker and by a resume."""
    cfg = job.cfg
    storage = cfg.storage or default_storage(job.tracking_uri)
    study = SearchStudy.open(study_name(cfg.run_id, cfg.study_key()), storage, prune=cfg.prune)
    waiting = _Waiting(job.log, "another worker scores the baselines")
    setup = study.once("setup", lambda: _setup(job, study, storage), on_wait=waiting)
    base = [Candidate.from_dict(d) for d in setup["baselines"]]
    centre = next(c for c in base if c.name == setup["centre"])
    encoding = _encoding(job, setup["coefficients"])
    study.use_strategy(cfg.strategy, cfg.seed, profile_points(job, encoding))
    job.log(f"baselines (search {job.evaluators.metric}): "
            + ", ".join(f"{c.name} {c.search_fid:.3f}" for c in base) + f"; search centred on {centre.name}")
    run = _parent_run(job, study, storage, setup["parent_run_id"])
    return Search(study, centre, encoding, run, storage, base), base


def _setup(job: Job, study: SearchStudy, storage: str) -> dict[str, Any]:
    job.log("scoring the baselines (shared by every worker of the study)")
    base = score_baselines(job)
    centre = centre_in_basis(base, job.basis)
    coeffs = restrict(centre, job.basis)
    run = _parent_run(job, study, storage, None)
    try:
        log_baselines(job, run, base)
        study.add_start(_encoding(job, coeffs), centre.search_fid, centre.name)
    except KeyboardInterrupt:
        run.end("KILLED")  # not yet the study's: a rerun makes its own
        raise
    return {"baselines": [c.to_dict() for c in base], "centre": centre.name, "coefficients": list(coeffs),
            "parent_run_id": run.run_id}


def _encoding(job: Job, coeffs: Sequence[float]) -> AffineEncoding:
    kinds = [job.window.entries[i].kind for i in job.basis]
    blocks = partition_by_kind(kinds, job.cfg.blocks) if job.cfg.blocks else None
    return AffineEncoding(centre=tuple(coeffs), radius=job.cfg.radius, blocks=blocks)


def _parent_run(job: Job, study: SearchStudy, storage: str, existing: str | None) -> OptimizeRun:
    params = {k: v for k, v in dataclasses.asdict(job.cfg).items() if k not in ("tracking_uri", "quiet")}
    return OptimizeRun.open(job.tracking_uri, existing, source=job.source, study=study.name, storage=storage,
                            params=params)


class _Waiting:
    """``on_wait`` for a shared stage: one line the first time, then one a minute."""

    def __init__(self, log: Log, what: str) -> None:
        self.log, self.what, self.last = log, what, 0.0

    def __call__(self) -> None:
        if time.monotonic() - self.last > 60:
            self.log(f"waiting: {self.what}")
            self.last = time.monotonic()


def profile_points(job: Job, encoding: AffineEncoding) -> list[list[float]]:
    """EMA profiles (the LCSC paper's initialisation) in the search encoding: post-hoc EMAs over
    the basis's raw checkpoints (its EMA snapshots if it has none) at every other EMA* rate."""
    kinds = [job.window.entries[i].kind for i in job.basis]
    pos = [j for j, k in enumerate(kinds) if k == "raw"] or list(range(len(kinds)))
    grid = ema_decay_grid(len(pos), job.cfg.ema_grid)[::2]
    return seed_points_from_profiles(encoding, [embed(ema_profile(len(pos), g), pos, len(kinds)) for g in grid])


def run_search(job: Job, search: Search, stop_below: float | None = None) -> float:
    """Run this worker's share of the missing trials (each a child run); returns its seconds.
    With ``stop_below``, the search ends after the first trial that scores below it."""
    study, metric = search.study, job.evaluators.metric
    trial_logger = TrialRunLogger(search.run.run_id, tracking_uri=job.tracking_uri, metric=metric)
    try:
        _backfill(study, trial_logger)  # the start trial, and trials a crashed worker left without a child run
        t0 = time.perf_counter()
        rungs = prune_rungs(job) if job.cfg.prune else None
        ticker = SearchTicker(job, search)
        ran = study.run(search.encoding, lambda c: job.search_score(job.dense(c)), job.cfg.n_trials,
                        lambda t: (trial_logger(t, study.name), ticker(t)), rungs=rungs, stop_below=stop_below,
                        on_wait=_waiting_for_trials(job.log))
        seconds = time.perf_counter() - t0
        trial_logger.flush()
        _backfill(study, trial_logger)  # a worker that died during the search
    finally:
        trial_logger.close()  # every finished trial has its child run before we go on
    best = study.top(1)[0]
    job.log(f"search: {ran} new trials ({study.n_searched} in study {study.name}, plus the start trial"
            + (f", {study.n_pruned} more pruned" if study.n_pruned else "") + f") in {seconds:.1f} s; "
            f"best search {metric} {best.value:.3f} (trial {best.number})")
    return seconds


def _waiting_for_trials(log: Log) -> Callable[[int], None]:
    """The budget is claimed by other workers' running trials: one line each time their number changes."""
    said: list[int] = []

    def note(n: int) -> None:
        if not said or said[-1] != n:
            log(f"search: the budget is claimed; waiting for {n} running trials (a failed one reopens a place)")
            said.append(n)
    return note


class SearchTicker:
    """The search's progress: trials finished (this worker's, counted from what the study held
    when it started), the best score so far against the strongest baseline's."""

    def __init__(self, job: Job, search: Search) -> None:
        self.progress, self.total = job.progress, job.cfg.n_trials
        self.done = search.study.n_searched + search.study.n_pruned  # the budget counts pruned trials too
        top = search.study.top(1)  # the start trial included: the search starts from the centre
        self.best, self.best_trial = (top[0].value, top[0].number) if top else (math.inf, None)
        self.ref = min(search.base or [search.centre], key=lambda c: c.search_fid)
        self.progress.stage("search", self.total, unit="trials", done=min(self.done, self.total), per="min")

    def __call__(self, trial: Any) -> None:
        if trial.start is not None or (trial.value is None and not trial.pruned):
            return  # the start trial, a failed or surplus one
        self.done += 1
        if trial.value is not None and trial.value < self.best:
            self.best, self.best_trial = trial.value, trial.number
        self.progress.advance(done=min(self.done, self.total), status=self.status())

    def status(self) -> str:
        ref = self.ref.search_fid
        gain = f" ({(self.best - ref) / ref:+.1%})" if ref and math.isfinite(ref) and math.isfinite(self.best) else ""
        return f"best {self.best:.3f} (trial {self.best_trial}) vs {self.ref.name} {ref:.3f}{gain}"


def _backfill(study: SearchStudy, trial_logger: TrialRunLogger) -> None:
    """Child runs for finished trials no live worker will log (their worker died; the start trial):
    one worker does it for each such set."""
    orphans = study.orphans()
    if orphans:
        key = "backfill-" + hashlib.sha256(",".join(str(t.number) for t in orphans).encode()).hexdigest()[:12]
        study.once(key, lambda: trial_logger.backfill(orphans, study.name) or True)


def prune_rungs(job: Job) -> Any:
    """The search objective at growing sample counts (``--prune``): the first n samples of the
    same fixed noise per seed, the mean over seeds at each count; the last is the full score."""
    from lcsc_ops.evaluation.rungs import fid_rungs, rung_counts
    from lcsc_ops.search.trials import Rungs

    counts = rung_counts(job.cfg.search_samples, job.cfg.prune_rungs)
    seeds = seeds_used(job.cfg)["search"]

    def scores(coeffs: Sequence[float]) -> Any:
        job.scorer.merger.merge(job.dense(coeffs))
        return job.scorer.lazily(fid_rungs(job.evaluators.main, job.scorer.model, counts, seeds))

    return Rungs(counts, scores)


def log_baselines(job: Job, run: OptimizeRun, base: Sequence[Candidate]) -> None:
    run.log_metrics({f"search_{job.evaluators.metric}.{c.name}": c.search_fid for c in base})
    if job.evaluators.reference_path is not None:
        run.log_artifact(job.evaluators.reference_path, "fid")


def pick_candidates(job: Job, search: Search) -> list[Candidate]:
    """The top-k trials, plus the average of their coefficients (which shrinks the winner's curse)."""
    basis = tuple(job.basis)
    cands = [Candidate(f"lcsc_top{r + 1}", basis, tuple(t.coefficients), "lcsc", search_fid=t.value,
                       note=f"trial {t.number}") for r, t in enumerate(search.study.top(job.cfg.top_k))]
    if len(cands) > 1:
        avg = Candidate("lcsc_avg", basis, tuple(average_coefficients([c.coeffs for c in cands])), "lcsc",
                        note=f"mean of top {len(cands)}")
        avg.search_fid = job.search_score(job.dense(avg.coeffs))
        cands.append(avg)
    return cands


def final_evaluation(job: Job, cands: Sequence[Candidate]) -> None:
    """Every candidate on the same fresh seeds (paired), never used in the search, in full precision:
    the test seeds (every reported figure) and the selection seeds (the choice of the strongest baseline
    and the winner), from one merge. With ``--nfe`` (``--guidance``) the baselines are also scored at
    the spec's default NFE (guidance scale), the figure a merged model at fewer steps must match; a
    conditional model's candidates also get the classifier's per-class accuracy (test seeds only)."""
    cfg, ev = job.cfg, job.evaluators
    fresh, n = seeds_used(cfg), cfg.final_samples
    seeds, k = [*fresh["test"], *fresh["selection"]], len(fresh["test"])
    job.scorer.full_precision()
    at_default = None
    if (cfg.nfe is not None and cfg.nfe != job.default_nfe) or \
            (cfg.guidance is not None and cfg.guidance != job.default_guidance):
        at_default = ev.with_sampler(dict(job.window.spec.sampler), job.default_guidance)
    job.progress.stage("final evaluation", len(cands), unit="candidates")
    for c in cands:
        dense = c.dense(len(job.window.entries))
        if ev.second is not None:  # the second metric is reported, never chosen on: test seeds only
            final, second = job.scorer.per_seed_pair(dense, ev.main, ev.second, n, fresh["test"])
            scores, c.second = [*final, *job.scorer.per_seed(dense, ev.main, n, fresh["selection"])], list(second)
        else:
            scores = job.scorer.per_seed(dense, ev.main, n, seeds)
        c.final, c.selection = scores[:k], scores[k:]
        if at_default is not None and c.kind == "baseline":
            c.final_default_nfe = job.scorer.per_seed(dense, at_default, n, fresh["test"])
        if ev.classes is not None:
            per_seed = job.scorer.per_seed_values(dense, ev.classes, n, fresh["test"])
            c.class_accuracy = [statistics.fmean(accs) for accs in zip(*per_seed)]
        job.progress.advance(status=f"{c.name} {c.final_mean:.3f} ± {c.final_std:.3f}")


def register(job: Job, search: Search, winner: Candidate, report: dict[str, Any]) -> dict[str, Any]:
    """Register the winner as a new version with its lineage tags, unless this optimization
    already registered the same merge (same winner, checkpoint hashes and coefficients)."""
    from lcsc_ops.math.merge import load_checkpoint_state

    entries = [job.window.entries[i] for i in winner.indices]
    name = job.cfg.model_name or job.source.data.tags.get("lcsc.model_name") or "lcsc-model"
    tags = lineage_tags(job.cfg, report, winner, entries)
    match = {k: tags[k] for k in ("lcsc.winner", "lcsc.checkpoint_sha256", "lcsc.coefficients")}
    same = find_version(name, search.run.run_id, match, tracking_uri=job.tracking_uri)
    if same is not None:  # registered before (a rerun after a crash): the parent run names it all the same
        search.run.set_tag("lcsc.registered_model", f"{name}/{same}")
        job.log(f"{name} version {same} is already this merge ({winner.name}); nothing registered")
        return {"name": name, "version": same, "existing": True}
    # Checkpoints may hold only part of the model (adapters): the factory's base fills the rest.
    model = load_checkpoint_state(job.spec.build(), merged_state(job.window, winner))
    with deferred():  # SIGINT/SIGTERM wait for the version and its tag: a rerun then finds it, never half
        version = register_model(model, name=name, spec=job.spec.to_dict(), tags=tags, run_id=search.run.run_id,
                                 tracking_uri=job.tracking_uri)
        search.run.set_tag("lcsc.registered_model", f"{name}/{version}")
    job.log(f"registered {name} version {version} ({winner.name})")
    return {"name": name, "version": version}


def lineage_tags(cfg: OptimizeConfig, report: dict[str, Any], winner: Candidate, entries: Sequence[Any]) -> dict[str, str]:
    """The registered version's tags; the scores' are named after the metric (``lcsc.search_fid``,
    ``lcsc.final_fid``, ``lcsc.baseline_fids`` for the built-in FID; ``lcsc.final_score`` … for
    ``--evaluator``; ``lcsc.final_<--metric-name>`` …)."""
    methods, m = report["methods"], report["metric"]
    return {
        "lcsc.source_run": cfg.run_id,
        "lcsc.optimize_run": report["parent_run_id"],
        "lcsc.winner": winner.name,
        "lcsc.window_steps": to_json_tag(report["window_steps"]),
        "lcsc.checkpoints": to_json_tag([e.file for e in entries]),
        "lcsc.coefficients": to_json_tag([float(c) for c in winner.coeffs]),
        "lcsc.checkpoint_sha256": to_json_tag([e.sha256 for e in entries]),
        "lcsc.source_layout": report.get("source", {}).get("layout", "lcsc"),
        # each merged checkpoint's artifact in the source run and that artifact's sha256 (a foreign
        # file was converted: its own hash, not the converted file's)
        "lcsc.source_artifacts": to_json_tag([[getattr(e, "source", "") or f"checkpoints/{e.file}",
                                               getattr(e, "source_sha256", "") or e.sha256] for e in entries]),
        f"lcsc.search_{m}": repr(winner.search_fid),
        f"lcsc.final_{m}": repr(methods[winner.name]["final_mean"]),
        f"lcsc.baseline_{m}s": to_json_tag({n: r["final_mean"] for n, r in methods.items() if r["kind"] == "baseline"}),
        "lcsc.strongest_baseline": report["strongest_baseline"],
        "lcsc.second_metric_flag": str(report["second_metric_worse"]).lower(),
        "lcsc.study": report["study"],
    }


def make_report(job: Job, search: Search, base: Sequence[Candidate], cands: Sequence[Candidate],
                seconds: float) -> dict[str, Any]:
    ev = job.evaluators
    report = build_report(job.cfg, job.window, base, cands, search.centre, metric=ev.metric,
                          search_seconds=seconds, trials=search.study.n_searched, study=search.study.name,
                          storage=mask_credentials(search.storage), parent_run_id=search.run.run_id, default_nfe=job.default_nfe,
                          second_metric=ev.second_name, no_second=ev.no_second, default_guidance=job.default_guidance,
                          no_classes=ev.no_classes)
    if job.cfg.prune:
        report["pruned_trials"] = search.study.n_pruned
    if job.score_cache is not None:
        report["score_cache"] = {"reused": job.score_cache.hits, "computed": job.score_cache.misses}
    return report


def log_results(job: Job, search: Search, report: dict[str, Any]) -> None:
    run = search.run
    run.log_metrics({f"final_{job.evaluators.metric}.{n}": r["final_mean"] for n, r in report["methods"].items()})
    run.log_metrics(class_accuracy_metrics(report))
    run.log_json(report, "results.json")  # the plots are the report's (report/), written at the end


def conclude(job: Job, search: Search, base: Sequence[Candidate], seconds: float) -> dict[str, Any]:
    """The final evaluation, the report and the registration: done once per finished study, by
    one worker; the others (and a rerun of a finished command) get its report."""
    n = search.study.n_searched

    def current(report: dict[str, Any]) -> bool:
        return report["trials"] == n and (not job.cfg.register or "registered_model" in report)

    waiting = _Waiting(job.log, "another worker runs the final evaluation")
    mine: list[dict[str, Any]] = []
    report = search.study.once(f"result-{n}", lambda: mine.append(_conclude(job, search, base, seconds)) or mine[0],
                               ready=current, on_wait=waiting)
    if not mine and "registered_model" in report:  # another worker's (or an earlier run's) registration
        report["registered_model"] = {**report["registered_model"], "existing": True}
        job.log(f"{report['registered_model']['name']} version {report['registered_model']['version']} "
                f"is this optimization's result, registered before; nothing registered")
    return report


def _conclude(job: Job, search: Search, base: Sequence[Candidate], seconds: float) -> dict[str, Any]:
    cands = pick_candidates(job, search)
    final_evaluation(job, [*base, *cands])
    report = make_report(job, search, base, cands, seconds)
    winner = next(c for c in [*base, *cands] if c.name == report["winner"])
    if job.cfg.register:
        report["registered_model"] = register(job, search, winner, report)
    log_results(job, search, report)
    write_report(job, search, report)
    return report


def write_report(job: Job, search: Search, report: dict[str, Any]) -> None:
    """The report (search curve, coefficients, samples, Markdown table) under ``report/`` of the
    parent run, and the table as the registered version's description. The optimization has
    succeeded by now: a failure here is named, with the command that retries it."""
    trials = [(t.number, t.value) for t in search.study.records() if t.value is not None and not t.pruned]
    try:
        publish_report(report, trials, job.window, job.spec, device=job.scorer.device, tracking_uri=job.tracking_uri,
                       log=job.log)
    except Exception as exc:  # noqa: BLE001 - the registered model and results.json are already logged
        job.log(f"report: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"retry with: lcsc-ops report {search.run.run_id}")


def run_optimize(cfg: OptimizeConfig, *, log: Log = print, cache_dir: Path | None = None,
                 stop_below: float | None = None, progress: Progress | None = None,
                 watchdog: bool = False, others_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or join, or resume) the whole optimization; returns the report (also logged as
    ``results.json``). The parent run ends FINISHED, FAILED on an error, KILLED on SIGINT/SIGTERM
    (:class:`~lcsc_ops.interrupts.Interrupted` says what was ended; ``others_done`` waits for
    this command's other workers first). ``stop_below`` ends the search early (every worker's).
    With ``cfg.workers > 1`` the other local workers run as processes.
    ``progress`` shows the stages (default: plain lines through ``log``; every worker's are plain);
    ``cfg.quiet`` silences both. ``watchdog`` (the CLI's choice) starts a process that cleans
    up after this one if it is killed (:mod:`lcsc_ops.pipeline.watchdog`)."""
    if cfg.quiet:
        log, progress = _silent, SilentProgress()
    if cfg.workers > 1:
        from lcsc_ops.pipeline.workers import run_workers

        cfg.validate()
        return run_workers(cfg, run_optimize, log=log, cache_dir=cache_dir, stop_below=stop_below,
                           watchdog=watchdog)
    stage = "fetching the checkpoints"
    try:  # SIGINT/SIGTERM: lcsc_ops.interrupts; each stage ends what it holds (pipeline/stopping.py)
        job = prepare(cfg, log, cache_dir, progress)
        stage = "scoring the baselines"
        search, base = open_search(job)
    except KeyboardInterrupt as exc:
        raise stopping.before_search(exc, stage) from None
    stage = "the search"
    try:
        if watchdog:
            from lcsc_ops.pipeline import watchdog as dog

            dog.start(search.study.name, search.storage, search.run.run_id, job.tracking_uri)
        with search.study.worker_heartbeat():
            seconds = run_search(job, search, stop_below)
            stage = "the final evaluation"
            report = conclude(job, search, base, seconds)
    except KeyboardInterrupt as exc:
        raise stopping.after_search_began(exc, search, cfg.n_trials, stage, others_done) from None
    except BaseException:
        search.run.end("FAILED")
        raise
    search.run.end("FINISHED")
    if job.score_cache is not None and job.score_cache.hits:
        log(f"score cache: {job.score_cache.hits} evaluations reused, {job.score_cache.misses} computed")
    return report


def _silent(text: str) -> None:
    pass
