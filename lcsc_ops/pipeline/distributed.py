"""``lcsc-ops optimize`` under ``accelerate launch``: N processes, one optimization, every FID sharded.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no -m lcsc_ops.cli optimize <run-id> ...

(on CPUs: the same with ``ACCELERATE_USE_CPU=true``). Rank 0 runs the ordinary pipeline
(:mod:`lcsc_ops.pipeline.optimize`: prepare, baselines and search, final evaluation,
registration), with its FID evaluators wrapped so that every evaluation is sharded over
the processes (:mod:`lcsc_ops.evaluation.sharding`). The other ranks prepare the same
window after rank 0 (so downloads and reference statistics are cache hits), then follow
rank 0's commands: merge the same coefficients, sample their rows, score them. Only rank 0
talks to MLflow and Optuna, logs, and returns the report.

Each process uses its own device (``--device auto``: accelerate's, cuda:<local rank>). A
custom ``--evaluator`` is not sharded (it runs on rank 0); neither are ``--prune``'s rung
evaluations (rank 0 too); baselines, full search scores and the final evaluation are.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.fid import FIDScorer
from lcsc_ops.evaluation.precision import precision_context
from lcsc_ops.evaluation.sharding import (READY, STOP, Command, ShardedFID, ShardGroup, ShardWorker, describe,
                                          follow, stop)
from lcsc_ops.pipeline.config import OptimizeConfig
from lcsc_ops.pipeline.progress import Progress, SilentProgress
from lcsc_ops.pipeline.scoring import Scorer

Log = Callable[[str], None]


def launched_world_size() -> int:
    """The number of processes a launcher (``accelerate launch``, ``torchrun``) started; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def launched_rank() -> int:
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def run_distributed(cfg: OptimizeConfig, *, log: Log = print, cache_dir: Path | None = None,
                    progress: Progress | None = None, watchdog: bool = False) -> dict[str, Any] | None:
    """Run the optimization over the launched processes; the report on rank 0, None on the others.

    Call it in every process of the launch. A bad option fails on every rank before the
    process group forms; only rank 0 says why (the others return None quietly)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    main = launched_rank() == 0
    if cfg.quiet or not main:
        log, progress = _silent, SilentProgress()
    try:
        if cfg.workers > 1:
            raise LcscError("--workers does not combine with accelerate launch: the launched processes share "
                            "each evaluation instead (more study workers may still join with the same --storage)")
        cfg.validate()
        cpu = cfg.device == "cpu" or not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
        state = PartialState(cpu=cpu)
        cfg = _on_device(cfg, state)
    except LcscError:
        if main:
            raise
        return None  # the same error on every rank: rank 0 says it and fails the launch (this one
        # exiting 0 lets the launcher wait for rank 0's message instead of killing it first)
    group = ShardGroup.create()
    try:
        if state.is_main_process:
            return _lead(cfg, group, log, cache_dir, progress, watchdog)
        _follow(cfg, group, cache_dir)
        return None
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Every rank tears its process group down before it exits: left to interpreter shutdown, a
    gloo thread was sometimes still joinable and rank 0 died of SIGABRT ("terminate called without
    an active exception") after its work was done, failing the launch."""
    import torch.distributed as dist

    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway; the work is done or its error is on its way
        pass


def _on_device(cfg: OptimizeConfig, state: Any) -> OptimizeConfig:
    """Each process on its own device: ``auto``/``cuda`` become accelerate's device for this rank."""
    if cfg.device in ("auto", "cuda"):
        return dataclasses.replace(cfg, device=str(state.device))
    if cfg.device.startswith("cuda:") and state.num_processes > 1:
        raise LcscError(f"--device {cfg.device}: under accelerate launch each process takes its own GPU; "
                        "use --device auto (or choose GPUs with CUDA_VISIBLE_DEVICES / --gpu_ids)")
    return cfg


def _lead(cfg: OptimizeConfig, group: ShardGroup, log: Log, cache_dir: Path | None, progress: Progress | None,
          watchdog: bool) -> dict[str, Any]:
    """Rank 0: prepare, let the others prepare, then the pipeline with sharded evaluators."""
    from lcsc_ops.pipeline.optimize import prepare

    try:
        job = prepare(cfg, log, cache_dir, progress)
    except BaseException:
        stop(group)
        raise
    try:
        group.send(Command(READY))
        failed = [f"process {r}: {e}" for r, e in enumerate(group.exchange(None)) if e]
        if failed:
            raise LcscError("preparing the evaluation failed on " + "; ".join(failed))
        shard_evaluators(job, group)
        return _optimize(job, watchdog)
    finally:
        stop(group)


def _follow(cfg: OptimizeConfig, group: ShardGroup, cache_dir: Path | None) -> None:
    """Ranks > 0: prepare the same window and evaluators (quietly, no score cache), then follow."""
    from lcsc_ops.pipeline.optimize import prepare

    if group.receive().op == STOP:  # rank 0 failed to prepare and says why
        return
    worker, error = None, None
    try:
        job = prepare(dataclasses.replace(cfg, score_cache=False), _silent, cache_dir, SilentProgress())
        if isinstance(job.evaluators.main, FIDScorer):
            worker = follower_worker(job.scorer, job.evaluators, group)
    except Exception as exc:  # noqa: BLE001 - reported by rank 0
        error = describe(exc)
    group.exchange(error)
    follow(group, worker)


def follower_worker(scorer: Scorer, evaluators: Any, group: ShardGroup) -> ShardWorker:
    """A rank > 0's worker: its own Scorer merges the coefficients rank 0 sends, at rank 0's precision."""

    def model_for(coeffs: Sequence[float], precision: str) -> torch.nn.Module:
        if precision != scorer.precision:
            if precision != "fp32":
                raise LcscError(f"precision {precision} after {scorer.precision}")
            scorer.full_precision()  # the final evaluation
        scorer.merger.merge(coeffs)
        return scorer.model

    return ShardWorker(group, fid_scorers(evaluators), model_for,
                       context=lambda precision: precision_context(precision, scorer.device))


def fid_scorers(evaluators: Any) -> dict[str, FIDScorer]:
    """The evaluators a rank shards, by name: the FID scorers among main and second."""
    named = {"main": evaluators.main, "second": evaluators.second}
    return {k: v for k, v in named.items() if isinstance(v, FIDScorer)}


def shard_evaluators(job: Any, group: ShardGroup) -> None:
    """Rank 0: wrap the job's FID evaluators so that every evaluation is sharded over the group."""
    ev = job.evaluators
    if not isinstance(ev.main, FIDScorer):
        job.log(f"evaluator {job.cfg.evaluator}: runs on the main process only (not sharded over "
                f"{group.world} processes)")
        return
    coefficients = record_coefficients(job.scorer)
    worker = ShardWorker(group, fid_scorers(ev))

    def wrap(inner: Any, name: str) -> Any:  # a user's --second-evaluator runs on rank 0, as it is
        return ShardedFID(inner, name, worker, coefficients, lambda: job.scorer.precision) \
            if isinstance(inner, FIDScorer) else inner

    job.evaluators = dataclasses.replace(ev, main=wrap(ev.main, "main"), second=wrap(ev.second, "second"))
    job.log(f"FID evaluations sharded over {group.world} processes"
            + ("; --prune's rung evaluations run on the main process only" if job.cfg.prune else ""))


def record_coefficients(scorer: Scorer) -> Callable[[], list[float] | None]:
    """The coefficients the scorer's model is merged with while ``per_seed``/``per_seed_pair``
    evaluates (None outside them): what the other ranks must merge."""
    current: list[list[float] | None] = [None]

    def recording(method: Callable) -> Callable:
        def call(coeffs: Sequence[float], *args: Any, **kwargs: Any) -> Any:
            current[0] = [float(c) for c in coeffs]
            try:
                return method(coeffs, *args, **kwargs)
            finally:
                current[0] = None
        return call

    scorer.per_seed = recording(scorer.per_seed)
    scorer.per_seed_pair = recording(scorer.per_seed_pair)
    return lambda: current[0]


def _optimize(job: Any, watchdog: bool) -> dict[str, Any]:
    """The stages of :func:`~lcsc_ops.pipeline.optimize.run_optimize` after ``prepare``."""
    from lcsc_ops.pipeline import stopping
    from lcsc_ops.pipeline.optimize import conclude, open_search, run_search

    try:
        search, base = open_search(job)
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: as in run_optimize
        raise stopping.before_search(exc, "scoring the baselines") from None
    stage = "the search"
    try:
        if watchdog:
            from lcsc_ops.pipeline import watchdog as dog

            dog.start(search.study.name, search.storage, search.run.run_id, job.tracking_uri)
        with search.study.worker_heartbeat():
            seconds = run_search(job, search)
            stage = "the final evaluation"
            report = conclude(job, search, base, seconds)
    except KeyboardInterrupt as exc:
        raise stopping.after_search_began(exc, search, job.cfg.n_trials, stage) from None
    except BaseException:
        search.run.end("FAILED")
        raise
    search.run.end("FINISHED")
    if job.score_cache is not None and job.score_cache.hits:
        job.log(f"score cache: {job.score_cache.hits} evaluations reused, {job.score_cache.misses} computed")
    return report


def _silent(text: str) -> None:
    pass
