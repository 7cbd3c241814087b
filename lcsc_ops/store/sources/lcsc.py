"""Our own layout: the manifest that :class:`~lcsc_ops.store.logger.CheckpointLogger` and
``lcsc-ops import`` write (``checkpoints/manifest.json``, or per-step fragments in
``checkpoints/manifest.d/`` while the run trains), read and validated once
(:func:`~lcsc_ops.checkpoints.validate_manifest`)."""
from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from lcsc_ops.checkpoints import (CHECKPOINT_DIR, FRAGMENT_DIR, FRAGMENT_NAME, MANIFEST_FORMAT, MANIFEST_NAME,
                                  SPEC_ARTIFACT, CheckpointEntry, sha256_file, validate_manifest, validate_run_id)
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store import tracking
from lcsc_ops.store.sources.base import Listing, RunContext, RunReader, SourceEntry, inside

FETCH_THREADS = min(4, os.cpu_count() or 1)


def _json(path: str, run_id: str, name: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcscError(f"run {run_id}: {CHECKPOINT_DIR}/{name} is not valid JSON ({type(exc).__name__})") from None


def read_manifest(run_id: str, tracking_uri: str | None = None, run: Any = None) -> dict[str, Any]:
    """A run's manifest, validated (:func:`~lcsc_ops.checkpoints.validate_manifest`); key
    ``complete`` says whether the run finished logging (LcscError if it has no checkpoints).

    A finished run has ``checkpoints/manifest.json`` marked complete. A run without it (still
    training, or killed) is read from its per-step fragments ``checkpoints/manifest.d/``: each
    is logged after its files, so every entry listed there is whole."""
    validate_run_id(run_id)
    run = run or tracking.get_run_or_fail(run_id, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = tracking.download_artifact(run_id, f"{CHECKPOINT_DIR}/{MANIFEST_NAME}", tmp, tracking_uri)
        if local is not None:
            manifest = _json(local, run_id, MANIFEST_NAME)
        else:
            manifest = _from_fragments(run_id, tracking_uri, Path(tmp))
    validate_manifest(manifest, run_id)
    # Runs logged before the end marker existed are complete when MLflow says they finished.
    manifest["complete"] = manifest.get("complete") is True or (
        "complete" not in manifest and run.info.status == "FINISHED")
    return manifest


def _from_fragments(run_id: str, tracking_uri: str | None, tmp: Path) -> dict[str, Any]:
    """The manifest of a partial run, from its fragments (names checked before download)."""
    missing = f"run {run_id} has no checkpoints (no {CHECKPOINT_DIR}/{MANIFEST_NAME} or {FRAGMENT_DIR}/ artifact)"
    listed = tracking.client(tracking_uri).list_artifacts(run_id, f"{CHECKPOINT_DIR}/{FRAGMENT_DIR}")
    names = [Path(a.path).name for a in listed]
    if not names:
        raise LcscError(missing)
    bad = [n for n in names if not FRAGMENT_NAME.fullmatch(n)]
    if bad:
        raise LcscError(f"run {run_id}: unexpected manifest fragment {bad[0]!r}")
    entries: list[Any] = []
    for name in sorted(names):
        local = tracking.download_artifact(run_id, f"{CHECKPOINT_DIR}/{FRAGMENT_DIR}/{name}", str(tmp), tracking_uri)
        if local is None:
            raise LcscError(missing)
        fragment = _json(local, run_id, name)
        if not isinstance(fragment, dict) or not isinstance(fragment.get("entries"), list):
            raise LcscError(f"run {run_id}: manifest fragment {name} holds no entry list")
        entries += fragment["entries"]
    local = tracking.download_artifact(run_id, SPEC_ARTIFACT, str(tmp), tracking_uri)
    if local is None:
        raise LcscError(f"run {run_id}: partial run without its model spec ({SPEC_ARTIFACT})")
    return {"format": MANIFEST_FORMAT, "spec": _json(local, run_id, SPEC_ARTIFACT), "complete": False,
            "entries": entries}


class LcscReader(RunReader):
    """Runs with our manifest: step, kind, file, sha256 and bytes of every checkpoint, and the model
    spec, all recorded by the writer; files downloaded as they are and checked against their sha256."""

    name = "lcsc"
    priority = 0
    description = "CheckpointLogger / lcsc-ops train / lcsc-ops import (checkpoints/manifest.json)"

    def detect(self, ctx: RunContext) -> bool:
        if ctx.tags.get("lcsc.kind") in ("training", "import"):
            return True
        names = {Path(f.path).name for f in ctx.ls(CHECKPOINT_DIR)} if _has_dir(ctx, CHECKPOINT_DIR) else set()
        return MANIFEST_NAME in names or FRAGMENT_DIR in names

    def list_entries(self, ctx: RunContext) -> Listing:
        manifest = read_manifest(ctx.run_id, ctx.tracking_uri, ctx.run)
        spec = ModelSpec.from_dict(manifest["spec"], origin=f"run {ctx.run_id}")
        entries = tuple(SourceEntry(step=e["step"], kind=e["kind"], path=f"{CHECKPOINT_DIR}/{e['file']}",
                                    bytes=e["bytes"], sha256=e["sha256"], extra=e) for e in manifest["entries"])
        return Listing(self.name, entries, complete=manifest["complete"], spec=spec).sorted()

    def fetch(self, ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec
              ) -> list[CheckpointEntry]:
        # Files are fetched and hashed on up to FETCH_THREADS threads (hashlib and file I/O release the
        # interpreter lock): sha256 on one core was the fetch's limit from 1e8 parameters on (the size sweep).
        # Each lands in a staging folder first and enters the cache only once every file is verified, so a
        # failed fetch leaves the cache as it was.
        with tempfile.TemporaryDirectory(dir=root) as tmp, \
                ThreadPoolExecutor(max_workers=max(1, min(FETCH_THREADS, len(entries)))) as pool:
            staged = list(pool.map(lambda ie: self._stage(ctx, ie[1], root, Path(tmp) / str(ie[0])),
                                    enumerate(entries)))
            for e, got in zip(entries, staged):
                if got is not None:
                    os.replace(got, root / e.file)
        return [CheckpointEntry(step=e.step, kind=e.kind, file=e.file, sha256=e.sha256, bytes=e.bytes,
                                path=root / e.file, source=e.path, source_sha256=e.sha256) for e in entries]

    def _stage(self, ctx: RunContext, e: SourceEntry, root: Path, tmp: Path) -> Path | None:
        """None if the cache holds ``e`` intact; else ``e`` downloaded into ``tmp`` and verified."""
        run_id = ctx.run_id
        local = inside(root / e.file, root, run_id, f"checkpoint {e.file!r}")
        if local.is_file() and local.stat().st_size == e.bytes and sha256_file(local) == e.sha256:
            return None
        tmp.mkdir()
        got = ctx.download(e.path, str(tmp))
        digest = ctx.digests.pop(str(got), None) or sha256_file(got)
        if digest != e.sha256:
            raise LcscError(f"run {run_id}: checkpoint {e.file} fails its sha256 check "
                            f"(expected {e.sha256[:12]}…, got {digest[:12]}…)")
        return Path(got)


def _has_dir(ctx: RunContext, name: str) -> bool:
    return any(f.is_dir and Path(f.path).name == name for f in ctx.ls(""))

