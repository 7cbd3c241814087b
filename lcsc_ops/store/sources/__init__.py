"""Checkpoint sources: every layout of checkpoints in an MLflow run that ``optimize`` reads, behind one seam.

A source is one reader (:class:`~lcsc_ops.store.sources.base.RunReader`) with

- ``name``: the layout (``"lcsc"``, ``"lightning"``, ...), the registry's key, shown by
  ``lcsc-ops checkpoints`` and ``lcsc-ops runs`` and recorded in the registered version's lineage;
- ``detect(ctx) -> bool``: whether a run holds this layout, from artifact listings only;
- ``list_entries(ctx) -> Listing``: every checkpoint (step, kind raw/ema, artifact path, bytes,
  sha256 when the source records it) and the model spec if the run records one;
- ``fetch(ctx, entries, root, spec) -> [CheckpointEntry]``: download ONLY the weight files of
  those entries into the cache folder ``root``, verify them, convert them to safetensors there
  when needed (:func:`~lcsc_ops.store.sources.convert.fetch_converted` does all of it for a
  foreign file format: safe loading, raw/EMA extraction, key prefixes, cache reuse, bytes logged).

``optimize``, ``report``, ``checkpoints``, ``runs`` and ``import`` call the functions here
(:func:`fetch_window`, :func:`list_checkpoints`, :func:`detect_layout`), never a reader.

Adding a reader (say for ``mylayout``):

1. Write ``lcsc_ops/store/sources/mylayout.py`` with ``class MyReader(RunReader)``: set ``name =
   "mylayout"``, ``priority`` (detection order, lower first; ``lcsc`` is 0, ``lightning`` 30) and a
   one-line ``description``; implement ``detect``, ``list_entries`` and ``fetch``. Names from the run
   are untrusted: check paths with :func:`~lcsc_ops.store.sources.base.check_artifact_path`, raise
   :class:`~lcsc_ops.errors.LcscError` (one line) for anything wrong. A run with a single file
   overwritten in place gets :func:`~lcsc_ops.store.sources.convert.no_window_error`.
2. Add its import path to ``BUILTIN`` below (the registry fills itself from it on first use);
   a plugin outside the package calls :func:`register` instead.
3. Add a fixture for it to ``tests/test_sources.py`` (the contract suite runs every reader on
   the same cases: lists steps, fetches verified windows, refuses a tampered file and path
   traversal, one-line error on an empty run).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from lcsc_ops.checkpoints import KINDS, CheckpointWindow, default_cache_dir, select_window
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, Trust
from lcsc_ops.store.sources.base import (Listing, RunContext, RunReader, SourceEntry, SourceOptions,
                                         cache_folder)

__all__ = ["BUILTIN", "READERS", "Listing", "RunContext", "RunReader", "SourceEntry", "SourceOptions",
           "detect_layout", "fetch_window", "list_checkpoints", "reader_for", "register", "readers"]

# module:class of every built-in reader
BUILTIN = (
    "lcsc_ops.store.sources.lcsc:LcscReader",
    "lcsc_ops.store.sources.lightning:LightningReader",
    "lcsc_ops.store.sources.autolog:AutologReader",
    "lcsc_ops.store.sources.transformers:TransformersReader",
    "lcsc_ops.store.sources.mlflow3:LoggedModelReader",
)
READERS: dict[str, RunReader] = {}


def register(reader: RunReader) -> RunReader:
    """Add ``reader`` under its ``name`` (a second reader of the same name is an error)."""
    if not reader.name or reader.name in READERS and type(READERS[reader.name]) is not type(reader):
        raise LcscError(f"checkpoint reader {reader.name!r}: no name, or the name is taken")
    READERS[reader.name] = reader
    return reader


def readers() -> list[RunReader]:
    """Every registered reader, in detection order."""
    for path in BUILTIN:
        module, cls = path.split(":")
        if not any(type(r).__name__ == cls and type(r).__module__ == module for r in READERS.values()):
            register(getattr(importlib.import_module(module), cls)())
    return sorted(READERS.values(), key=lambda r: (r.priority, r.name))


def reader_for(ctx: RunContext) -> RunReader:
    """The reader of the run's layout: the one the user named (``--layout``), else the first that
    detects it; LcscError naming the layouts known if none does."""
    known = readers()
    names = ", ".join(r.name for r in known)
    kind = ctx.tags.get("lcsc.kind")
    if kind in ("optimize", "trial"):  # ours: the registered merge it logged is no window of checkpoints
        raise LcscError(f"run {ctx.run_id} is an lcsc-ops {kind} run and has no checkpoints to merge (its source "
                        f"run: {ctx.tags.get('lcsc.source_run', 'see its parent run')})")
    if ctx.options.layout is not None:
        if ctx.options.layout not in READERS:
            raise LcscError(f"unknown checkpoint layout {ctx.options.layout!r} (known: {names})")
        return READERS[ctx.options.layout]
    for reader in known:
        if reader.detect(ctx):
            return reader
    raise LcscError(f"run {ctx.run_id} has no checkpoints in a layout lcsc-ops reads ({names}); "
                    f"see docs/runs-you-have.md for how to log them")


def detect_layout(ctx: RunContext) -> str | None:
    """The name of the run's layout, or None if it holds no checkpoints lcsc-ops reads."""
    try:
        return reader_for(ctx).name
    except LcscError:
        return None


def list_checkpoints(run_id: str, tracking_uri: str | None = None, options: SourceOptions | None = None) -> Listing:
    """Every checkpoint of a run, in whatever layout it holds them (``lcsc-ops checkpoints``)."""
    ctx = RunContext(run_id, tracking_uri, options)
    return reader_for(ctx).list_entries(ctx)


def window_spec(ctx: RunContext, listing: Listing, trust: Trust | None) -> ModelSpec:
    """The model spec of the window: the one the run records (untrusted: vouched for by ``trust``),
    or the user's (options) for a run that records none; LcscError if both or neither are there."""
    given = ctx.options.spec
    if listing.spec is not None:
        if given is not None:
            raise LcscError(f"run {ctx.run_id} ({listing.layout}) records its own model spec: "
                            f"drop --factory and the other model-spec options")
        return trust.vouch(listing.spec) if trust is not None else listing.spec
    if given is None:
        raise LcscError(f"run {ctx.run_id} holds {listing.layout} checkpoints but no model spec: pass --factory "
                        f"'module:callable' (and --factory-kwargs, --dataset, --image-shape as for lcsc-ops import)")
    return given


def fetch_window(run_id: str, *, window: int | None = None, end_step: int | None = None,
                 tracking_uri: str | None = None, cache_dir: Path | None = None, trust: Trust | None = None,
                 options: SourceOptions | None = None) -> CheckpointWindow:
    """Download (once, into a local cache) and verify the last ``window`` checkpoint steps of a run, in
    any layout a reader knows (at or before ``end_step`` when given: merging an earlier part of training).

    All checkpoints at those steps (raw and EMA) come back as ``entries``; which of them form the
    search basis is the caller's choice. ``training_ema`` is the newest EMA snapshot at or before
    the window's last step. A spec the run records is untrusted (``origin`` = the run): with
    ``trust``, its factory is checked before any checkpoint is downloaded and it comes back
    vouched for. A run that records none takes ``options.spec``."""
    ctx = RunContext(run_id, tracking_uri, options)
    reader = reader_for(ctx)
    listing = reader.list_entries(ctx)
    if not listing.entries:
        raise LcscError(f"run {run_id} ({listing.layout}) lists no checkpoints")
    spec = window_spec(ctx, listing, trust)
    rows = [{"step": e.step, "kind": e.kind, "entry": e} for e in listing.entries]
    chosen, ema_row, steps = select_window(rows, window, end_step)
    wanted = [r["entry"] for r in chosen]
    if ema_row is not None and ema_row["entry"] not in wanted:
        wanted.append(ema_row["entry"])
    root = cache_folder(cache_dir or default_cache_dir(), run_id, reader.name)
    got = reader.fetch(ctx, wanted, root, spec)
    entries, training_ema = _arrange(got, chosen, ema_row, steps)
    return CheckpointWindow(run_id=run_id, spec=spec, entries=entries, training_ema=training_ema,
                            steps=tuple(steps), complete=listing.complete, layout=reader.name)


def _arrange(got: list, chosen: list[dict], ema_row: dict | None, steps: list[int]) -> tuple[tuple, object]:
    """The window's entries (raw by step, then EMA by step) and its training EMA, from what a reader
    fetched: what was asked for, and the EMA it found inside the same files (a Lightning ``.ckpt``)."""
    fetched = {(e.step, e.kind): e for e in got}
    asked = {(r["step"], r["kind"]) for r in chosen}
    extra = [e for e in got if (e.step, e.kind) not in asked and e.step in set(steps)]
    entries = sorted([fetched[r["step"], r["kind"]] for r in chosen] + extra,
                     key=lambda e: (KINDS.index(e.kind), e.step))
    if ema_row is not None:
        return tuple(entries), fetched[ema_row["step"], "ema"]
    emas = sorted((e for e in got if e.kind == "ema" and e.step <= steps[-1]), key=lambda e: e.step)
    return tuple(entries), (emas[-1] if emas else None)
