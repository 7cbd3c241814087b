"""MLflow side of ``lcsc-ops report``: an optimization's results and trial scores in, the report out.

The parent run of an optimization holds ``results.json`` (what the table and the plots are
made of) and one child run per trial (its score as a metric); the report goes back to the
parent run under ``report/``, and its table becomes the registered version's description.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lcsc_ops.checkpoints import validate_run_id
from lcsc_ops.errors import LcscError
from lcsc_ops.store.runs import PARENT_TAG

REPORT_DIR = "report"
RESULTS_NAME = "results.json"
DESCRIPTION_LIMIT = 5000  # characters MLflow's SQL stores keep of a model version's description


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def load_results(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The ``results.json`` of optimize run ``run_id`` (LcscError: unknown run, not an optimize
    run, not finished yet, or not valid JSON)."""
    from mlflow.exceptions import MlflowException

    import mlflow

    validate_run_id(run_id)
    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LcscError(f"unknown run id {run_id!r} in tracking store {tracking_uri or mlflow.get_tracking_uri()}") \
            from None
    kind = run.data.tags.get("lcsc.kind")
    if kind != "optimize":
        raise LcscError(f"run {run_id} is not an optimize run (lcsc.kind: {kind or 'none'}); "
                        "give the parent run id that lcsc-ops optimize prints in its results")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RESULTS_NAME, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
            results = json.loads(Path(local).read_text())
        except (MlflowException, OSError):
            raise LcscError(f"optimize run {run_id} has no {RESULTS_NAME} yet (status {run.info.status}): "
                            "its final evaluation has not finished") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LcscError(f"optimize run {run_id}: {RESULTS_NAME} is not valid JSON") from None
    if not isinstance(results, dict):
        raise LcscError(f"optimize run {run_id}: {RESULTS_NAME} is not a JSON object")
    return results


def trial_scores(run_id: str, metric: str, tracking_uri: str | None = None) -> list[tuple[int, float]]:
    """``(trial number, score)`` of every finished trial's child run of optimize run ``run_id``, by
    number (pruned trials have no score and are left out)."""
    client = _client(tracking_uri)
    exp = client.get_run(run_id).info.experiment_id
    out, token = [], None
    while True:
        page = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=1000,
                                  page_token=token)
        for r in page:
            trial, value = r.data.tags.get("lcsc.trial"), r.data.metrics.get(metric)
            if trial is not None and trial.isdigit() and value is not None:
                out.append((int(trial), float(value)))
        token = page.token
        if not token:
            return sorted(out)


def log_report(run_id: str, folder: Path, tracking_uri: str | None = None) -> str:
    """Log every file of ``folder`` under ``report/`` of run ``run_id``; returns that artifact URI."""
    client = _client(tracking_uri)
    client.log_artifacts(run_id, str(folder), REPORT_DIR)
    return f"{client.get_run(run_id).info.artifact_uri}/{REPORT_DIR}"


def version_exists(name: str, version: str, tracking_uri: str | None = None) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client(tracking_uri).get_model_version(name, str(version))
        return True
    except MlflowException:
        return False


def describe_version(name: str, version: str, text: str, tracking_uri: str | None = None) -> None:
    """Set the description of model version ``name``/``version`` (cut to what the store keeps)."""
    if len(text) > DESCRIPTION_LIMIT:
        text = text[: DESCRIPTION_LIMIT - 40].rsplit("\n", 1)[0] + "\n\n(cut: see report/results.md)"
    _client(tracking_uri).update_model_version(name, str(version), description=text)
