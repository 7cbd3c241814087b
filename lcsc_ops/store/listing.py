"""What the tracking store holds, for ``lcsc-ops runs`` and ``lcsc-ops checkpoints``: plain dicts.

Training runs (``lcsc.kind`` ``training`` or ``import``) with their checkpoint count and size
(from the run's ``checkpoints/`` artifacts) and a summary of their model spec (tag
``lcsc.spec``); optimize runs with their source run, status and registered version; one run's
checkpoints from its manifest (or, while it is still training, from its manifest fragments).
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lcsc_ops.checkpoints import (CHECKPOINT_DIR, FRAGMENT_DIR, KINDS, MANIFEST_NAME, SHA256, checkpoint_filename,
                                  validate_run_id)
from lcsc_ops.errors import LcscError

CHECKPOINT_FILE = re.compile(r"step(\d{8})-(raw|ema)\.safetensors")
SOURCE_KINDS = ("training", "import")


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _experiments(client: Any, name: str | None) -> dict[str, str]:
    """Experiment id -> name: the one named ``name`` (LcscError if none is), else every active one."""
    if name is not None:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise LcscError(f"unknown experiment {name!r}")
        return {exp.experiment_id: exp.name}
    return {e.experiment_id: e.name for e in client.search_experiments()}


def _runs(client: Any, experiment_ids: list[str], kind: str) -> Iterator[Any]:
    token = None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string=f"tags.`lcsc.kind` = '{kind}'", max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _spec_summary(tag: str | None) -> dict[str, Any]:
    try:
        spec = json.loads(tag) if tag else {}
    except json.JSONDecodeError:
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    sampler = spec.get("sampler") if isinstance(spec.get("sampler"), dict) else {}
    return {"factory": spec.get("factory"), "sampler": sampler.get("name"), "sampler_steps": sampler.get("steps"),
            "dataset": spec.get("dataset")}


def _checkpoint_files(client: Any, run_id: str) -> dict[str, Any]:
    files = client.list_artifacts(run_id, CHECKPOINT_DIR)
    found = [(CHECKPOINT_FILE.fullmatch(Path(f.path).name), f) for f in files if not f.is_dir]
    ckpts = [(int(m.group(1)), f.file_size or 0) for m, f in found if m]
    return {"checkpoints": len(ckpts), "bytes": sum(size for _, size in ckpts),
            "last_step": max((step for step, _ in ckpts), default=None),
            "complete": any(Path(f.path).name == MANIFEST_NAME for f in files)}


def list_runs(experiment: str | None = None, tracking_uri: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """``{"training": [...], "optimize": [...]}``, newest first, in ``experiment`` or in all of them."""
    client = _client(tracking_uri)
    names = _experiments(client, experiment)
    ids = list(names)
    training = []
    for kind in SOURCE_KINDS:
        for r in _runs(client, ids, kind):
            info, tags = r.info, r.data.tags
            training.append({"run_id": info.run_id, "name": info.run_name, "experiment": names.get(info.experiment_id),
                             "kind": kind, "status": info.status, "start_time": info.start_time,
                             "train_steps": _int(r.data.params.get("steps")), **_spec_summary(tags.get("lcsc.spec")),
                             **_checkpoint_files(client, info.run_id)})
    training.sort(key=lambda row: row["start_time"] or 0, reverse=True)
    optimize = []
    for r in _runs(client, ids, "optimize"):
        info, tags = r.info, r.data.tags
        optimize.append({"run_id": info.run_id, "name": info.run_name, "experiment": names.get(info.experiment_id),
                         "source_run": tags.get("lcsc.source_run"), "status": info.status,
                         "start_time": info.start_time, "registered_model": tags.get("lcsc.registered_model")})
    return {"training": training, "optimize": optimize}


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _checked(entry: Any, where: str) -> dict[str, Any]:
    """A manifest entry with the fields the listing shows, each checked (the manifest is untrusted)."""
    if not isinstance(entry, dict):
        raise LcscError(f"{where} must be a JSON object")
    step, kind, sha, size = (entry.get(k) for k in ("step", "kind", "sha256", "bytes"))
    ok = (isinstance(step, int) and step >= 0 and kind in KINDS and isinstance(sha, str) and SHA256.fullmatch(sha)
          and isinstance(size, int) and size >= 0 and entry.get("file") == checkpoint_filename(step, kind))
    if not ok:
        raise LcscError(f"{where} is malformed (step, kind, file, sha256 or bytes)")
    return {"step": step, "kind": kind, "bytes": size, "sha256": sha, "file": entry["file"]}


def checkpoint_entries(run_id: str, tracking_uri: str | None = None) -> tuple[list[dict[str, Any]], bool]:
    """The checkpoints of run ``run_id`` by step and kind, and whether its manifest is complete (a run
    still training, or killed, has only per-step fragments). LcscError: unknown run, none logged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    validate_run_id(run_id)
    client = _client(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise LcscError(f"unknown run id {run_id!r} in tracking store {tracking_uri or mlflow.get_tracking_uri()}") \
            from None
    names = {Path(f.path).name for f in client.list_artifacts(run_id, CHECKPOINT_DIR)}
    complete = MANIFEST_NAME in names
    if not complete and FRAGMENT_DIR not in names:
        raise LcscError(f"run {run_id} has no checkpoints (no {CHECKPOINT_DIR}/{MANIFEST_NAME} artifact)")
    path = f"{CHECKPOINT_DIR}/{MANIFEST_NAME if complete else FRAGMENT_DIR}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        docs = [local] if complete else sorted(local.glob("*.json"))
        entries = [_checked(e, f"run {run_id}: {CHECKPOINT_DIR}/{p.name} entry {i}")
                   for p in docs for i, e in enumerate(_entries_of(p, run_id))]
    return sorted(entries, key=lambda e: (e["step"], KINDS.index(e["kind"]))), complete


def _entries_of(path: Path, run_id: str) -> list[Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise LcscError(f"run {run_id}: {CHECKPOINT_DIR}/{path.name} is not valid JSON") from None
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise LcscError(f"run {run_id}: {CHECKPOINT_DIR}/{path.name} has no list of entries")
    return entries
