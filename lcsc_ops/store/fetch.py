"""Reading a training run's checkpoints back from MLflow: manifest, download, sha256 check, window."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lcsc_ops.checkpoints import (CHECKPOINT_DIR, MANIFEST_NAME, CheckpointEntry, CheckpointWindow,
                                  default_cache_dir, select_window, sha256_file, validate_manifest, validate_run_id)
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, Trust


def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """Make ``tracking_uri`` (or MLflow's default) the process's tracking URI and return it."""
    import mlflow

    from lcsc_ops.store.server import check_reachable

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    check_reachable(uri)
    return uri


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def get_run_or_fail(run_id: str, tracking_uri: str | None = None):
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_run(run_id)
    except MlflowException:
        raise LcscError(f"unknown run id {run_id!r} in tracking store {_store(tracking_uri)}") from None


def _store(tracking_uri: str | None) -> str:
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def _download(run_id: str, name: str, dst: str, tracking_uri: str | None, missing: str) -> str:
    """Download ``checkpoints/<name>`` of a run into ``dst``; LcscError(``missing``) if it is not there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{name}",
                                                   dst_path=dst, tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        raise LcscError(missing) from None


def read_manifest(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download, parse and validate (:func:`~lcsc_ops.checkpoints.validate_manifest`)
    ``checkpoints/manifest.json`` of a run (LcscError if absent or malformed)."""
    validate_run_id(run_id)
    get_run_or_fail(run_id, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(run_id, MANIFEST_NAME, tmp, tracking_uri,
                          f"run {run_id} has no checkpoints (no {CHECKPOINT_DIR}/{MANIFEST_NAME} artifact)")
        try:
            manifest = json.loads(Path(local).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LcscError(f"run {run_id}: {CHECKPOINT_DIR}/{MANIFEST_NAME} is not valid JSON "
                            f"({type(exc).__name__})") from None
    validate_manifest(manifest, run_id)
    return manifest


def _inside(path: Path, root: Path, run_id: str, what: str) -> Path:
    """``path`` if it lies inside ``root`` once resolved (symlinks followed); LcscError otherwise."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise LcscError(f"run {run_id}: {what} would lie outside the cache folder {root}")
    return path


def fetch_window(run_id: str, *, window: int = 16, end_step: int | None = None, tracking_uri: str | None = None,
                 cache_dir: Path | None = None, trust: Trust | None = None) -> CheckpointWindow:
    """Download (once, into a local cache) and sha256-verify the last ``window`` checkpoint steps of a run
    (at or before ``end_step`` when given: merging an earlier part of training).

    All checkpoints at those steps (raw and EMA) come back as ``entries``; which of them
    form the search basis is the caller's choice. ``training_ema`` is the newest EMA
    snapshot at or before the window's last step.

    The manifest is validated before anything is written, and every local path must lie
    inside the cache. The window's spec is untrusted (``origin`` = the run): it builds only
    if its factory is trusted. With ``trust``, the factory is checked before any checkpoint
    is downloaded and the spec comes back vouched for.
    """
    validate_run_id(run_id)
    manifest = read_manifest(run_id, tracking_uri)
    spec = ModelSpec.from_dict(manifest["spec"], origin=f"run {run_id}")
    if trust is not None:
        spec = trust.vouch(spec)
    chosen, ema_entry, steps = select_window(manifest["entries"], window, end_step)
    cache_root = cache_dir or default_cache_dir()
    root = _inside(cache_root / "checkpoints" / run_id, cache_root, run_id, "its checkpoint folder")
    root.mkdir(parents=True, exist_ok=True)

    def fetch(e: dict) -> CheckpointEntry:
        local = _inside(root / e["file"], root, run_id, f"checkpoint {e['file']!r}")
        if not (local.is_file() and local.stat().st_size == e["bytes"] and sha256_file(local) == e["sha256"]):
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                got = _download(run_id, e["file"], tmp, tracking_uri,
                                f"run {run_id}: checkpoint {e['file']} is listed but missing")
                if not (Path(got).is_file() and Path(got).resolve().is_relative_to(Path(tmp).resolve())):
                    raise LcscError(f"run {run_id}: checkpoint {e['file']} is not a file in the run's artifacts")
                digest = sha256_file(got)
                if digest != e["sha256"]:
                    raise LcscError(f"run {run_id}: checkpoint {e['file']} fails its sha256 check "
                                    f"(expected {e['sha256'][:12]}…, got {digest[:12]}…)")
                os.replace(got, local)
        return CheckpointEntry(step=e["step"], kind=e["kind"], file=e["file"], sha256=e["sha256"],
                               bytes=e["bytes"], path=local)

    fetched = tuple(fetch(e) for e in chosen)
    by_file = {e.file: e for e in fetched}
    training_ema = None
    if ema_entry is not None:
        training_ema = by_file.get(ema_entry["file"]) or fetch(ema_entry)
    return CheckpointWindow(run_id=run_id, spec=spec, entries=fetched, training_ema=training_ema,
                            steps=tuple(steps))
