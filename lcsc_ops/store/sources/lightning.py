"""Lightning's layout: ``MLFlowLogger(log_model="all")`` uploads each checkpoint ``ModelCheckpoint``
saves as ``<stem>/<stem>.ckpt`` (Lightning 2.5-2.6; 1.9-2.4: ``model/checkpoints/<stem>/<stem>.ckpt``;
2.5.1+ may put a prefix in front), with ``metadata.yaml`` and ``aliases.txt`` beside it.

A ``.ckpt`` is one ``torch.save`` dict: ``state_dict`` (keys prefixed by the LightningModule's
attribute, e.g. ``net.``), ``global_step``, ``epoch``, and usually the optimizer state and the
callbacks' (a ``WeightAveraging``/EMA callback: the average in ``state_dict``, the live weights in
``current_model_state``). It cannot be partly downloaded: the log says what the window costs.
The step is the name's ``step=<n>`` (ModelCheckpoint's default name), else the file's ``global_step``.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from lcsc_ops.checkpoints import CheckpointEntry
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.sources.base import Listing, RunContext, RunReader, SourceEntry, check_artifact_path
from lcsc_ops.store.sources.convert import fetch_converted, mb, no_window_error, torch_loader

SUFFIX = ".ckpt"
STEP = re.compile(r"(?:^|[-_])step=(\d+)")
DEPTH = 4  # folders down to look for .ckpt files (model/checkpoints/<stem>/, a prefix)
HOW = ("log every checkpoint: MLFlowLogger(log_model='all') with ModelCheckpoint(every_n_train_steps=N, "
       "save_top_k=-1), then rerun")
NOTE = "a .ckpt cannot be partly downloaded (it holds the optimizer and callback state too)"


def _files(ctx: RunContext) -> list[Any]:
    return [f for f in ctx.walk("", DEPTH) if f.path.endswith(SUFFIX)]


class LightningReader(RunReader):
    """Runs holding Lightning ``.ckpt`` files (``MLFlowLogger`` with ``log_model``)."""

    name = "lightning"
    priority = 30
    description = "Lightning MLFlowLogger(log_model='all'): <stem>/<stem>.ckpt"

    def detect(self, ctx: RunContext) -> bool:
        return bool(_files(ctx))

    def list_entries(self, ctx: RunContext) -> Listing:
        files = _files(ctx)
        if not files:
            raise LcscError(f"run {ctx.run_id} holds no Lightning checkpoints (*{SUFFIX})")
        for f in files:
            check_artifact_path(f.path, ctx.run_id)
        named = {f.path: _name_step(f.path) for f in files}
        unnamed = [f for f in files if named[f.path] is None]
        if len(files) == 1:
            raise no_window_error(ctx.run_id, self.name, files[0].path, HOW)
        if unnamed and len(unnamed) < len(files):  # last.ckpt beside stepped files: a copy of the newest
            ctx.log(f"run {ctx.run_id}: left out {', '.join(f.path for f in unnamed)} (no step=<n> in the name: "
                    f"a copy saved in place, e.g. last.ckpt)")
            files = [f for f in files if named[f.path] is not None]
        elif unnamed:
            named.update(_file_steps(ctx, unnamed))
        entries, seen = [], {}
        for f in files:
            step = named[f.path]
            if step in seen:
                raise LcscError(f"run {ctx.run_id}: two checkpoints of step {step}: {seen[step]} and {f.path}; "
                                f"pass --end-step or log one run per training")
            seen[step] = f.path
            entries.append(SourceEntry(step=step, kind="raw", path=f.path, bytes=f.file_size))
        if len(entries) < 2:
            raise no_window_error(ctx.run_id, self.name, entries[0].path if entries else files[0].path, HOW)
        return Listing(self.name, tuple(entries), complete=ctx.run.info.status == "FINISHED").sorted()

    def fetch(self, ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec
              ) -> list[CheckpointEntry]:
        return fetch_converted(ctx, entries, root, spec, loader=torch_loader, note=NOTE)


def _name_step(path: str) -> int | None:
    found = STEP.search(PurePosixPath(path).stem)
    return int(found.group(1)) if found else None


def _file_steps(ctx: RunContext, files: list[Any]) -> dict[str, int]:
    """The ``global_step`` inside files whose names carry no step (read once, weights-only)."""
    ctx.log(f"run {ctx.run_id}: reading {len(files)} .ckpt file(s) without step=<n> in the name for their "
            f"global_step, {mb(sum(f.file_size or 0 for f in files))}")
    steps = {}
    with tempfile.TemporaryDirectory(prefix="lcsc-ckpt-step-") as tmp:
        for f in files:
            local = ctx.download(f.path, tmp)
            obj = torch_loader(local, f.path, ctx.options.allow_pickle)
            step = obj.get("global_step") if isinstance(obj, dict) else None
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                raise LcscError(f"run {ctx.run_id}: {f.path} has no step=<n> in its name and no global_step inside")
            steps[f.path] = step
            local.unlink()
    return steps
