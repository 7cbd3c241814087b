"""The tracking store as every store module reaches it: the URI, a client, a run, one artifact."""
from __future__ import annotations

from typing import Any

from lcsc_ops.errors import LcscError


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """Make ``tracking_uri`` (or MLflow's default) the process's tracking URI and return it."""
    import mlflow

    from lcsc_ops.store.server import check_reachable

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    check_reachable(uri)
    return uri


def client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def store_name(tracking_uri: str | None) -> str:
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def get_run_or_fail(run_id: str, tracking_uri: str | None = None) -> Any:
    """The MLflow run ``run_id``; LcscError naming the store if it has none."""
    from mlflow.exceptions import MlflowException

    try:
        return client(tracking_uri).get_run(run_id)
    except MlflowException:
        raise LcscError(f"unknown run id {run_id!r} in tracking store {store_name(tracking_uri)}") from None


def download_artifact(run_id: str, path: str, dst: str, tracking_uri: str | None) -> str | None:
    """Download one artifact (file or folder) of a run into ``dst``; None if the run does not have it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst,
                                                   tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        return None


def download_from(location: str, path: str, dst: str) -> str | None:
    """Download one file under an artifact location (a LoggedModel's) into ``dst``; None if it is not there."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    try:
        return get_artifact_repository(location).download_artifacts(path, dst)
    except (MlflowException, OSError):
        return None
