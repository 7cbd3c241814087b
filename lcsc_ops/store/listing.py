"""What the tracking store holds, for ``lcsc-ops runs`` and ``lcsc-ops checkpoints``: plain dicts.

Training runs: ours (``lcsc.kind`` ``training`` or ``import``) with their checkpoint count and size
(from the run's ``checkpoints/`` artifacts) and a summary of their model spec (tag ``lcsc.spec``),
and every other run holding checkpoints in a layout a reader knows (Lightning, ...), with its
layout; optimize runs with their source run, status and registered version; one run's
checkpoints as its layout's reader lists them (:mod:`lcsc_ops.store.sources`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from lcsc_ops.checkpoints import CHECKPOINT_DIR, MANIFEST_NAME
from lcsc_ops.errors import LcscError
from lcsc_ops.store.sources import RunContext, list_checkpoints, reader_for

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


def _runs(client: Any, experiment_ids: list[str], kind: str | None) -> Iterator[Any]:
    """The runs tagged ``lcsc.kind`` = ``kind`` (None: every run), newest first."""
    token = None
    where = f"tags.`lcsc.kind` = '{kind}'" if kind is not None else ""
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string=where, max_results=1000,
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
            training.append(_row(r, names, kind, "lcsc", _spec_summary(r.data.tags.get("lcsc.spec")),
                                 _checkpoint_files(client, r.info.run_id)))
    training += _foreign_rows(client, ids, names, tracking_uri)
    training.sort(key=lambda row: row["start_time"] or 0, reverse=True)
    optimize = []
    for r in _runs(client, ids, "optimize"):
        info, tags = r.info, r.data.tags
        optimize.append({"run_id": info.run_id, "name": info.run_name, "experiment": names.get(info.experiment_id),
                         "source_run": tags.get("lcsc.source_run"), "status": info.status,
                         "start_time": info.start_time, "registered_model": tags.get("lcsc.registered_model")})
    return {"training": training, "optimize": optimize}


def _row(r: Any, names: dict[str, str], kind: str, layout: str, spec: dict[str, Any], files: dict[str, Any]
         ) -> dict[str, Any]:
    info = r.info
    return {"run_id": info.run_id, "name": info.run_name, "experiment": names.get(info.experiment_id), "kind": kind,
            "layout": layout, "status": info.status, "start_time": info.start_time,
            "train_steps": _int(r.data.params.get("steps")), **spec, **files}


def _foreign_rows(client: Any, ids: list[str], names: dict[str, str], tracking_uri: str | None) -> list[dict]:
    """Runs without an ``lcsc.kind`` tag that hold checkpoints in a layout a reader knows (a run of
    another tool, or one an older CheckpointLogger wrote), with what the reader lists."""
    rows = []
    for r in _runs(client, ids, None):
        if "lcsc.kind" in r.data.tags:
            continue
        ctx = RunContext(r.info.run_id, tracking_uri, run=r)
        try:
            reader = reader_for(ctx)
        except LcscError:
            continue
        note = None
        try:
            listing = reader.list_entries(ctx)
            entries, complete = listing.entries, listing.complete
        except LcscError as exc:  # e.g. one file overwritten in place: listed, with why it cannot be optimized
            entries, complete, note = (), False, str(exc)
        spec = _spec_summary(r.data.tags.get("lcsc.spec")) if reader.name == "lcsc" else _spec_summary(None)
        files = {"checkpoints": len(entries), "bytes": sum(e.bytes or 0 for e in entries),
                 "last_step": max((e.step for e in entries), default=None), "complete": complete}
        row = _row(r, names, "training" if reader.name == "lcsc" else "foreign", reader.name, spec, files)
        rows.append({**row, "note": note} if note else row)
    return rows


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def checkpoint_entries(run_id: str, tracking_uri: str | None = None) -> tuple[list[dict[str, Any]], bool, str]:
    """The checkpoints of run ``run_id`` by step and kind, whether the run finished logging them, and its
    layout (the reader that found them: ``lcsc``, ``lightning``, ...). LcscError: unknown run, none logged."""
    listing = list_checkpoints(run_id, tracking_uri)
    rows = []
    for e in listing.entries:
        row = {"step": e.step, "kind": e.kind, "file": e.file, "sha256": e.sha256, "bytes": e.bytes}
        if e.path != f"{CHECKPOINT_DIR}/{e.file}":
            row["path"] = e.path
        rows.append(row)
    return rows, listing.complete, listing.layout
