"""Fetching a foreign run's weight files into the cache: download, verify, convert to safetensors.

Every foreign reader's ``fetch`` comes here. One artifact may hold several entries (a Lightning
``.ckpt`` with the live weights and a ``WeightAveraging`` average): it is downloaded once, loaded
safely (:func:`~lcsc_ops.weightfiles.load_torch_file`, or the reader's own loader), its raw and
EMA states found (:func:`~lcsc_ops.weightfiles.weight_states`), their keys mapped onto the
model's (:func:`~lcsc_ops.weightfiles.find_key_prefix`), checked, and written as
``step<N>-<kind>.safetensors`` beside a record (``sources.json``) of what each came from: the
artifact's path, size and sha256. A rerun reuses a converted file only if its own sha256 still
matches the record (the cache verifies what it downloaded) and the run still lists the artifact
at the recorded size; an artifact whose sha256 differs from the one it had when first fetched is
refused (a run's file changed in place: merges and lineage would mix two files under one name).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lcsc_ops.checkpoints import CheckpointEntry, sha256_file, write_checkpoint
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.sources.base import RunContext, SourceEntry, inside
from lcsc_ops.layouts import spec_layout
from lcsc_ops.weightfiles import (apply_key_prefix, check_states, find_key_prefix, first_line, load_torch_file,
                                  weight_states)

RECORD = "sources.json"
Loader = Callable[[Path, str, bool], Any]  # (local file, its path in the run, allow_pickle) -> loaded object


def torch_loader(path: Path, name: str, allow_pickle: bool) -> Any:
    """A ``torch.save`` file, ``weights_only`` first (see :func:`~lcsc_ops.weightfiles.load_torch_file`)."""
    return load_torch_file(path, allow_pickle, name=name)


def no_window_error(run_id: str, layout: str, path: str, how: str) -> LcscError:
    """The one line for a run that logged a single checkpoint file, overwritten in place: no window
    of checkpoints to combine. ``how``: how to log one with the run's tool."""
    return LcscError(f"run {run_id} ({layout}) holds no window of checkpoints: only {path}, overwritten in place "
                     f"at every save; {how}")


def mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:.1f} MB)"


class _Record:
    """``sources.json`` in a cache folder: artifact path -> what was converted from it."""

    def __init__(self, root: Path) -> None:
        self.path = root / RECORD
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}

    def reusable(self, path: str, entries: Sequence[SourceEntry], key: str, root: Path) -> bool:
        rec = self.data.get(path)
        if not isinstance(rec, dict) or rec.get("key") != key:
            return False
        if any(e.bytes is not None and e.bytes != rec.get("bytes") for e in entries):
            return False  # the run's file changed since it was converted
        files = rec.get("files") if isinstance(rec.get("files"), dict) else {}
        if any(e.kind not in files for e in entries):
            return False
        for kind, f in files.items():  # every file converted from it (an EMA found inside too) verified
            local = root / str(f.get("file") if isinstance(f, dict) else "")
            if not (isinstance(f, dict) and local.is_file() and local.parent == root
                    and local.stat().st_size == f.get("bytes") and sha256_file(local) == f.get("sha256")):
                return False
        return True

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def entries(self, path: str, step: int, root: Path) -> list[CheckpointEntry]:
        """Every entry converted from artifact ``path`` (raw first), as verified local checkpoints."""
        rec = self.data[path]
        return [CheckpointEntry(step=step, kind=kind, file=f["file"], sha256=f["sha256"], bytes=f["bytes"],
                                path=root / f["file"], source=path, source_sha256=rec["sha256"])
                for kind, f in sorted(rec["files"].items(), key=lambda kv: kv[0] != "raw")]


def model_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model ``spec`` builds: on the meta device (no memory, no initialisation)
    when the factory allows it, else on the CPU; a failing factory is one line."""
    built = spec_layout(spec)
    if built is not None:
        return {k: shape for k, (shape, _) in built[0].items()}
    try:
        return {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    except LcscError:
        raise
    except Exception as exc:
        raise LcscError(f"factory {spec.factory!r} failed: {type(exc).__name__}: {first_line(exc)}") from None


def _conversion_key(layout: Mapping[str, Any], spec: ModelSpec, key_prefix: str | None) -> str:
    """What a converted file depends on beyond the artifact: the model's keys and shapes, the prefix option."""
    text = json.dumps([spec.factory, sorted((k, list(s)) for k, s in layout.items()), key_prefix])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fetch_converted(ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec, *,
                    loader: Loader = torch_loader, note: str = "") -> list[CheckpointEntry]:
    """The entries' artifacts downloaded (each once; only those not already converted and verified in
    ``root``), checked against the sizes the run lists, converted to safetensors; the bytes to
    download are logged first (``note`` says why they are what they are). An EMA found inside a
    file asked for its raw weights comes back too (kind ``ema``, same step): the file is whole."""
    layout = model_shapes(spec)
    key = _conversion_key(layout, spec, ctx.options.key_prefix)
    groups: dict[str, list[SourceEntry]] = {}
    for e in entries:
        groups.setdefault(e.path, []).append(e)
    record = _Record(root)
    todo = [p for p, es in groups.items() if not record.reusable(p, es, key, root)]
    if todo:
        total = sum(groups[p][0].bytes or 0 for p in todo)
        ctx.log(f"run {ctx.run_id}: downloading {len(todo)} checkpoint file(s), {mb(total)}"
                + (f"; {note}" if note else ""))
    for path in todo:
        before = record.data.get(path)
        known = before.get("sha256") if isinstance(before, dict) else None
        record.data[path] = _convert(ctx, path, groups[path], root, spec, layout, loader, known)
        record.data[path]["key"] = key
        record.save()
    return [c for p, es in groups.items() for c in record.entries(p, es[0].step, root)]


def _convert(ctx: RunContext, path: str, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec,
             layout: Mapping[str, Any], loader: Loader, known: str | None) -> dict[str, Any]:
    """Download one artifact, verify it (against the size the run lists, the sha256 it records, and
    the sha256 it had when first fetched: ``known``), write the safetensors of each of its entries;
    their record."""
    run_id = ctx.run_id
    with tempfile.TemporaryDirectory(dir=root, prefix="download-") as tmp:
        got = ctx.download(path, tmp)
        size, digest = got.stat().st_size, sha256_file(got)
        listed = entries[0].bytes
        if listed is not None and size != listed:
            raise LcscError(f"run {run_id}: {path} has {size} bytes, the run lists {listed}: it changed after it was "
                            f"logged; refusing it")
        if entries[0].sha256 is not None and digest != entries[0].sha256:
            raise LcscError(f"run {run_id}: {path} fails its sha256 check (expected {entries[0].sha256[:12]}…, "
                            f"got {digest[:12]}…)")
        if known is not None and digest != known:
            raise LcscError(f"run {run_id}: {path} changed since it was first fetched (sha256 {known[:12]}… then, "
                            f"{digest[:12]}… now); refusing it (remove {root} to start over if the change is meant)")
        states = weight_states(loader(got, path, ctx.options.allow_pickle), path)
    files = {}
    asked = {e.kind for e in entries}
    step = entries[0].step
    for kind in (*asked, *(k for k in states if k not in asked)):  # an EMA inside the file: kept too
        state = states.get(kind)
        if state is None:
            raise LcscError(f"run {run_id}: {path} holds no {kind} weights (found: {', '.join(states)})")
        try:
            prefix = find_key_prefix(state.keys(), layout.keys(), ctx.options.key_prefix, path)
            state = apply_key_prefix(state, prefix, layout.keys())
            check_states(path, state, layout)
        except LcscError as exc:
            if kind in asked:
                raise
            ctx.log(f"run {run_id}: the {kind} weights inside {path} are left out: {exc}")
            continue
        name = SourceEntry(step=step, kind=kind, path=path).file
        local = inside(root / name, root, run_id, f"checkpoint {name!r}")
        write_checkpoint(local, state, step=step, kind=kind, spec=spec,
                         extra={"lcsc.source": path, "lcsc.source_sha256": digest, "lcsc.key_prefix": prefix})
        files[kind] = {"file": name, "sha256": sha256_file(local), "bytes": local.stat().st_size,
                       "key_prefix": prefix}
    return {"sha256": digest, "bytes": size, "files": files}
