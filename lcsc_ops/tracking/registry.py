"""MLflow edges of an optimization: trial child runs, the registered model, aliases.

The objective never logs; these functions are called from Optuna callbacks and from the
orchestration in :mod:`lcsc_ops.optimize` (tracking at the edge).
"""
from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import torch

from lcsc_ops.errors import LcscError

PARENT_TAG = "mlflow.parentRunId"


def coefficient_params(coeffs: Sequence[float]) -> dict[str, str]:
    """MLflow params ``c00``, ``c01``, ... holding the exact (round-trip) coefficient values."""
    width = max(2, len(str(len(coeffs) - 1)))
    return {f"c{i:0{width}d}": repr(float(c)) for i, c in enumerate(coeffs)}


class TrialRunLogger:
    """Optuna callback: one MLflow child run per finished trial, under the optimization's parent run.

    The child run holds the coefficients as params ``c00…``, the search score as metric
    ``fid`` and the trial number as tag ``lcsc.trial``; the start trial (the centre, a
    baseline scored before the search) is tagged ``lcsc.start=<baseline>``. With ``--prune`` the scores at the
    rungs are the history of metric ``fid_by_samples`` (step = sample count); a pruned trial
    gets no ``fid`` (its scores come from fewer samples), ends ``KILLED`` and is tagged
    ``lcsc.pruned=true`` and ``lcsc.pruned_at_samples``. Runs are written by one background
    thread, so the next trial's sampling does not wait for the tracking store; call
    :meth:`flush` to wait for them (it re-raises a failed write). Trials already logged (a
    resumed study) are skipped, and :meth:`backfill` logs any finished trial that lacks a run.
    """

    def __init__(self, parent_run_id: str, *, tracking_uri: str | None = None, metric: str = "fid") -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.parent = self.client.get_run(parent_run_id)
        self.metric = metric
        self.logged = self._existing()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcsc-trial-log")
        self._pending: list[Future] = []

    def _existing(self) -> set[int]:
        runs = self.client.search_runs([self.parent.info.experiment_id],
                                       filter_string=f"tags.`{PARENT_TAG}` = '{self.parent.info.run_id}'",
                                       max_results=50_000)
        return {int(r.data.tags["lcsc.trial"]) for r in runs if "lcsc.trial" in r.data.tags}

    def __call__(self, study: Any, trial: Any) -> None:
        from lcsc_ops.tracking.study import START_ATTR

        pruned = getattr(trial.state, "name", "") == "PRUNED"
        if (trial.value is None and not pruned) or trial.number in self.logged:
            return
        self.logged.add(trial.number)
        duration = trial.duration.total_seconds() if trial.duration else None
        self._pending.append(self._executor.submit(
            self._log, study.study_name, trial.number, None if pruned else float(trial.value),
            list(trial.user_attrs.get("coefficients", [])), dict(trial.params), duration,
            dict(trial.intermediate_values), trial.user_attrs.get(START_ATTR)))

    def _log(self, study_name: str, number: int, value: float | None, coeffs: list[float], z: dict[str, float],
             duration: float | None, rungs: dict[int, float] | None = None, start: str | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        try:
            run = self.client.create_run(self.parent.info.experiment_id, run_name=f"trial-{number:04d}",
                                         tags={PARENT_TAG: self.parent.info.run_id, "lcsc.trial": str(number),
                                               "lcsc.kind": "trial", "optuna.study": study_name})
            params = [Param(k, v) for k, v in coefficient_params(coeffs).items()]
            params += [Param(k, repr(v)) for k, v in z.items()]
            tags = [RunTag("lcsc.duration_s", f"{duration:.3f}")] if duration is not None else []
            if start is not None:  # the search's starting point: a baseline scored before the search
                tags.append(RunTag("lcsc.start", start))
            now = int(time.time() * 1000)
            rungs = rungs or {}
            metrics = [Metric(f"{self.metric}_by_samples", float(v), now, int(n)) for n, v in sorted(rungs.items())]
            if value is None:  # pruned
                tags += [RunTag("lcsc.pruned", "true"), RunTag("lcsc.pruned_at_samples", str(max(rungs, default=0)))]
            else:
                metrics.append(Metric(self.metric, value, now, number))
            self.client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
            self.client.set_terminated(run.info.run_id, "FINISHED" if value is not None else "KILLED")
        except BaseException:
            self.logged.discard(number)  # so a later backfill retries it
            raise

    def flush(self) -> None:
        """Wait for every child run submitted so far; re-raise the first failure."""
        pending, self._pending = self._pending, []
        errors = [f.exception() for f in pending]
        for error in errors:
            if error is not None:
                raise error

    def backfill(self, study: Any) -> int:
        """Log finished (complete or pruned) trials without a child run yet (e.g. after a crash); returns how many."""
        self.flush()
        before = len(self.logged)
        for trial in study.get_trials(deepcopy=False):
            self(study, trial)
        self.flush()
        return len(self.logged) - before

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)


def model_requirements(model: torch.nn.Module) -> list[str]:
    """pip requirements to unpickle ``model``: torch, safetensors, and the installed distribution
    that defines the model's class (``lcsc-ops`` for the built-in U-Net, ``diffusers`` for a
    ``UNet2DModel``, the user's own package for a user's factory), pinned to its version here."""
    from importlib import metadata

    requirements = [f"torch=={torch.__version__.split('+')[0]}", "safetensors"]
    top = type(model).__module__.split(".")[0]
    for dist in dict.fromkeys(metadata.packages_distributions().get(top, [])):
        if dist.lower() not in ("torch", "safetensors"):
            requirements.append(f"{dist}=={metadata.version(dist)}")
    return requirements


def register_model(model: torch.nn.Module, *, name: str, spec: Mapping[str, Any], tags: Mapping[str, str],
                   run_id: str, tracking_uri: str | None = None) -> str:
    """Log ``model`` as an MLflow PyTorch model of ``run_id`` and register it as a new version of ``name``.

    The model is pickled (``serialization_format="pickle"``) so that ``mlflow.pytorch.load_model``
    returns the user's own ``nn.Module`` class, not a GraphModule; the spec travels in the
    model's metadata and the lineage in version tags. Returns the version number.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    requirements = model_requirements(model)
    client = MlflowClient(tracking_uri=tracking_uri)
    # start_run(run_id=...) refuses a run outside the active experiment, so select the run's own.
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pytorch.log_model(model.cpu().eval(), name="model", serialization_format="pickle",
                                        pip_requirements=requirements, metadata={"lcsc_spec": dict(spec)},
                                        registered_model_name=name)
    version = getattr(info, "registered_model_version", None)
    if version is None:
        raise LcscError(f"MLflow did not register model {name!r}")
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return str(version)


def promote(name: str, version: str, alias: str, *, tracking_uri: str | None = None) -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (LcscError for unknown name/version)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LcscError(f"unknown registered model {name!r}") from None
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise LcscError(f"registered model {name!r} has no version {version!r}") from None
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise LcscError(f"cannot set alias {alias!r}: {str(exc).splitlines()[0]}") from None


def to_json_tag(value: Any) -> str:
    """Compact JSON for a model-version tag value; refuses to truncate lineage silently.

    MLflow allows 100,000 characters in a model-version tag value: a window of ~1,000
    checkpoints' hashes. Beyond that, registration fails with a clear message instead of
    registering a version whose lineage cannot be recomputed.
    """
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > 100_000:
        raise LcscError(f"lineage tag of {len(text)} characters exceeds MLflow's 100,000; use a smaller --window")
    return text
