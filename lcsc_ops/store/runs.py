"""MLflow runs of an optimization: one parent run, one child run per trial.

The objective never logs: :class:`TrialRunLogger` receives finished trials as plain
:class:`~lcsc_ops.records.TrialRecord` and writes their child runs from a background
thread; :class:`OptimizeRun` is the parent run (params, baseline and final metrics,
results and plots as artifacts).
"""
from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from lcsc_ops.records import TrialRecord
from lcsc_ops.redact import mask_credentials

PARENT_TAG = "mlflow.parentRunId"


def coefficient_params(coeffs: Sequence[float]) -> dict[str, str]:
    """MLflow params ``c00``, ``c01``, ... holding the exact (round-trip) coefficient values."""
    width = max(2, len(str(len(coeffs) - 1)))
    return {f"c{i:0{width}d}": repr(float(c)) for i, c in enumerate(coeffs)}


class OptimizeRun:
    """The parent run of one optimization (reused when its study is resumed)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, tracking_uri: str, existing: str | None, *, source: Any, study: str, storage: str,
             params: Mapping[str, Any]) -> "OptimizeRun":
        """Reopen ``existing`` (a resumed study) if the store still has it, else create the parent run.

        Params and the storage tag are written with credentials masked."""
        client = MlflowClient(tracking_uri=tracking_uri)
        if existing:
            try:
                client.get_run(existing)
                client.update_run(existing, status="RUNNING")
                return cls(client, existing)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise  # a busy or unreachable store: never a second parent run
                pass  # the store was reset: start a new parent run
        name = f"optimize-{source.info.run_name or source.info.run_id[:8]}"
        run = client.create_run(source.info.experiment_id, run_name=name,
                                tags={"lcsc.kind": "optimize", "lcsc.source_run": source.info.run_id,
                                      "optuna.study": study, "optuna.storage": mask_credentials(storage)})
        client.log_batch(run.info.run_id, params=[Param(k, mask_credentials(str(v))[:6000])
                                                  for k, v in params.items()])
        return cls(client, run.info.run_id)

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "OptimizeRun":
        return cls(MlflowClient(tracking_uri=tracking_uri), run_id)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_json(self, data: Any, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self.client.log_artifact(self.run_id, str(path))

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class TrialRunLogger:
    """One MLflow child run per finished trial, under the parent run.

    The child run holds the coefficients as params ``c00…``, the search score as metric
    ``<metric>`` and the trial number as tag ``lcsc.trial``; the start trial is tagged
    ``lcsc.start=<baseline>``. With ``--prune`` the rung scores are the history of metric
    ``<metric>_by_samples``; a pruned trial ends ``KILLED`` without ``<metric>``. Writes run
    on one background thread; :meth:`flush` waits for them and re-raises a failure.
    """

    def __init__(self, parent_run_id: str, *, tracking_uri: str | None = None, metric: str = "fid") -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.parent = self.client.get_run(parent_run_id)
        self.metric = metric
        self._unfinished: dict[int, Any] = {}  # trial number -> its child run left RUNNING
        self.logged = self._existing()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcsc-trial-log")
        self._pending: list[Future] = []

    def _existing(self) -> set[int]:
        """The trials that have their child run. A child run left RUNNING (its writer was killed
        between creating and ending it) is kept in ``_unfinished`` and completed in place when its
        trial is logged again (:meth:`backfill`): never a second run for one trial, none left RUNNING."""
        runs = self.client.search_runs([self.parent.info.experiment_id],
                                       filter_string=f"tags.`{PARENT_TAG}` = '{self.parent.info.run_id}'",
                                       max_results=50_000)
        done: set[int] = set()
        for run in runs:
            if "lcsc.trial" not in run.data.tags:
                continue
            number = int(run.data.tags["lcsc.trial"])
            if run.info.status == "RUNNING":
                self._unfinished.setdefault(number, run)
            else:
                done.add(number)
        return done

    def __call__(self, trial: TrialRecord, study_name: str = "") -> None:
        if (trial.value is None and not trial.pruned) or trial.number in self.logged:
            return
        self.logged.add(trial.number)
        self._pending.append(self._executor.submit(self._log, trial, study_name))

    def _log(self, trial: TrialRecord, study_name: str) -> None:
        run = self._unfinished.pop(trial.number, None)
        try:
            metrics, params, tags = self._contents(trial)
            if run is None:
                run = self.client.create_run(self.parent.info.experiment_id, run_name=f"trial-{trial.number:04d}",
                                             tags={PARENT_TAG: self.parent.info.run_id, "lcsc.trial": str(trial.number),
                                                   "lcsc.kind": "trial", "optuna.study": study_name})
            else:  # completed in place: metrics its killed writer logged are not logged twice (params may be)
                metrics = [m for m in metrics if m.key not in run.data.metrics]
            self.client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=tags)
            self.client.set_terminated(run.info.run_id, "KILLED" if trial.pruned else "FINISHED")
        except BaseException:
            self.logged.discard(trial.number)  # so a later backfill retries it
            if run is not None and run.info.status == "RUNNING":
                self._unfinished.setdefault(trial.number, run)  # ...in the same run
            raise

    def _contents(self, trial: TrialRecord) -> tuple[list[Metric], list[Param], list[RunTag]]:
        params = [Param(k, v) for k, v in coefficient_params(trial.coefficients).items()]
        params += [Param(k, repr(v)) for k, v in trial.params.items()]
        tags = [RunTag("lcsc.duration_s", f"{trial.duration_s:.3f}")] if trial.duration_s is not None else []
        if trial.start is not None:  # the search's starting point: a baseline scored before the search
            tags.append(RunTag("lcsc.start", trial.start))
        now = int(time.time() * 1000)
        metrics = [Metric(f"{self.metric}_by_samples", float(v), now, int(n)) for n, v in sorted(trial.rungs.items())]
        if trial.pruned:
            tags += [RunTag("lcsc.pruned", "true"), RunTag("lcsc.pruned_at_samples", str(max(trial.rungs, default=0)))]
        else:
            metrics.append(Metric(self.metric, float(trial.value), now, trial.number))
        return metrics, params, tags

    def flush(self) -> None:
        """Wait for every child run submitted so far; re-raise the first failure."""
        pending, self._pending = self._pending, []
        for error in [f.exception() for f in pending]:
            if error is not None:
                raise error

    def backfill(self, trials: Iterable[TrialRecord], study_name: str = "") -> int:
        """Log finished trials without a child run yet (e.g. after a crash); returns how many.
        The store is asked again first: another worker may have logged some since this logger began."""
        self.flush()
        self.logged |= self._existing()
        before = len(self.logged)
        for trial in trials:
            self(trial, study_name)
        self.flush()
        return len(self.logged) - before

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._executor.shutdown(wait=True)
