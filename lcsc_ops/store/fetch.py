"""Reading a training run's checkpoints back from MLflow: manifest, download, sha256 check, window."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lcsc_ops.checkpoints import (CHECKPOINT_DIR, FRAGMENT_DIR, FRAGMENT_NAME, MANIFEST_FORMAT, MANIFEST_NAME,
                                  SPEC_ARTIFACT, CheckpointEntry, CheckpointWindow, default_cache_dir, select_window,
                                  sha256_file, validate_manifest, validate_run_id)
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
    local = _artifact(run_id, f"{CHECKPOINT_DIR}/{name}", dst, tracking_uri)
    if local is None:
        raise LcscError(missing)
    return local


def read_manifest(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A run's manifest, validated (:func:`~lcsc_ops.checkpoints.validate_manifest`); key
    ``complete`` says whether the run finished logging (LcscError if it has no checkpoints).

    A finished run has ``checkpoints/manifest.json`` marked complete. A run without it (still
    training, or killed) is read from its per-step fragments ``checkpoints/manifest.d/``: each
    is logged after its files, so every entry listed there is whole."""
    validate_run_id(run_id)
    run = get_run_or_fail(run_id, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = _artifact(run_id, f"{CHECKPOINT_DIR}/{MANIFEST_NAME}", tmp, tracking_uri)
        if local is not None:
            manifest = _json(local, run_id, MANIFEST_NAME)
        else:
            manifest = _from_fragments(run_id, tracking_uri, Path(tmp))
    validate_manifest(manifest, run_id)
    # Runs logged before the end marker existed are complete when MLflow says they finished.
    manifest["complete"] = manifest.get("complete") is True or (
        "complete" not in manifest and run.info.status == "FINISHED")
    return manifest


def _json(path: str, run_id: str, name: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcscError(f"run {run_id}: {CHECKPOINT_DIR}/{name} is not valid JSON ({type(exc).__name__})") from None


def _from_fragments(run_id: str, tracking_uri: str | None, tmp: Path) -> dict[str, Any]:
    """The manifest of a partial run, from its fragments (names checked before download)."""
    missing = f"run {run_id} has no checkpoints (no {CHECKPOINT_DIR}/{MANIFEST_NAME} or {FRAGMENT_DIR}/ artifact)"
    names = [Path(a.path).name for a in _client(tracking_uri).list_artifacts(run_id, f"{CHECKPOINT_DIR}/{FRAGMENT_DIR}")]
    if not names:
        raise LcscError(missing)
    bad = [n for n in names if not FRAGMENT_NAME.fullmatch(n)]
    if bad:
        raise LcscError(f"run {run_id}: unexpected manifest fragment {bad[0]!r}")
    entries: list[Any] = []
    for name in sorted(names):
        local = _artifact(run_id, f"{CHECKPOINT_DIR}/{FRAGMENT_DIR}/{name}", str(tmp), tracking_uri)
        if local is None:
            raise LcscError(missing)
        fragment = _json(local, run_id, name)
        if not isinstance(fragment, dict) or not isinstance(fragment.get("entries"), list):
            raise LcscError(f"run {run_id}: manifest fragment {name} holds no entry list")
        entries += fragment["entries"]
    local = _artifact(run_id, SPEC_ARTIFACT, str(tmp), tracking_uri)
    if local is None:
        raise LcscError(f"run {run_id}: partial run without its model spec ({SPEC_ARTIFACT})")
    return {"format": MANIFEST_FORMAT, "spec": _json(local, run_id, SPEC_ARTIFACT), "complete": False,
            "entries": entries}


def _artifact(run_id: str, path: str, dst: str, tracking_uri: str | None) -> str | None:
    """Download one artifact of a run into ``dst``; None if the run does not have it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst,
                                                   tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        return None


def _inside(path: Path, root: Path, run_id: str, what: str) -> Path:
    """``path`` if it lies inside ``root`` once resolved (symlinks followed); LcscError otherwise."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise LcscError(f"run {run_id}: {what} would lie outside the cache folder {root}")
    return path


def fetch_window(run_id: str, *, window: int | None = None, end_step: int | None = None, tracking_uri: str | None = None,
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
                            steps=tuple(steps), complete=manifest["complete"])
