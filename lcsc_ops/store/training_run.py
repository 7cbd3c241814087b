"""The MLflow run of a training job: config as params, loss as metrics, a clear end state."""
from __future__ import annotations

import json
from typing import Any, Mapping

import mlflow


class TrainingRun:
    """The main process's MLflow run while training (the other processes hold none)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    @classmethod
    def start(cls, *, experiment: str, run_name: str | None, config: Mapping[str, Any], tags: Mapping[str, str],
              tracking_uri: str | None = None) -> "TrainingRun":
        """Start the run and record ``config`` whole (params and ``lcsc/train_config.json``)."""
        from lcsc_ops.store.fetch import resolve_tracking_uri

        resolve_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in config.items()})
        mlflow.set_tags(dict(tags))
        mlflow.log_dict(dict(config), "lcsc/train_config.json")
        return cls(run.info.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        mlflow.log_metrics(dict(metrics), step=step)

    def end(self, status: str = "FINISHED") -> None:
        mlflow.end_run(status=status)
