"""MLflow 3 model checkpoints: a loop calling ``mlflow.pytorch.log_model(model, name=f"checkpoint-{step}",
step=step)`` inside one run.

Checked against MLflow 3.17 (``mlflow/models/model.py``, ``mlflow/pytorch/__init__.py``): each call makes
one LoggedModel (its artifacts under ``<experiment artifact root>/models/<model id>/artifacts/``, not in
the run's), found by ``search_logged_models(filter_string="source_run_id='<run>'")`` (paged) and
recorded in the run's ``outputs.model_outputs`` as ``LoggedModelOutput(model_id, step)``: the step is
there, not in the model. The weights are ``data/model.pt2`` with the default
``serialization_format="pt2"`` (a ``torch.export`` archive; it needs an ``input_example`` to log; read
by :mod:`~lcsc_ops.store.sources.pt2` without ``torch.export.load``, which unpickles) or
``data/model.pth`` with ``"pickle"`` (``torch.save`` of the whole module: refused with one line
unless the user allows pickle; ``weights_only`` first). Keys are the logged module's own.

When every model carries the same step (``log_model`` without ``step=``) and the names end in
distinct numbers (``checkpoint-<n>``), the names give the steps, and the log says so.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from lcsc_ops.checkpoints import CheckpointEntry
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.sources.base import Listing, RunContext, RunReader, SourceEntry
from lcsc_ops.store.sources.convert import fetch_converted, no_window_error, torch_loader
from lcsc_ops.store.sources.logged_models import LoggedModelRef, entry_path, model_files, run_models
from lcsc_ops.store.sources.pt2 import load_pt2_weights

PT2, PICKLED = "model.pt2", "model.pth"
NUMBER = re.compile(r".*?(\d+)$")
HOW = 'log one model per save: mlflow.pytorch.log_model(model, name=f"checkpoint-{step}", step=step)'


def _weights(ctx: RunContext, model: LoggedModelRef) -> Any:
    files = {PurePosixPath(f.path).name: f for f in model_files(ctx, model, "data") if not f.is_dir}
    return files.get(PT2) or files.get(PICKLED)


def load_weights(path: Path, name: str, allow_pickle: bool) -> Any:
    """``model.pt2`` read safely, ``model.pth`` as any ``torch.save`` file (weights-only first)."""
    if name.endswith(PT2):
        return load_pt2_weights(path, name, allow_pickle)
    return torch_loader(path, name, allow_pickle)


class LoggedModelReader(RunReader):
    """Runs whose LoggedModels hold ``data/model.pt2`` or ``data/model.pth`` (``mlflow.pytorch.log_model``)."""

    name = "mlflow-models"
    priority = 60
    description = "MLflow 3 mlflow.pytorch.log_model(..., step=): one LoggedModel per checkpoint"

    def detect(self, ctx: RunContext) -> bool:
        models = run_models(ctx)
        return bool(models) and _weights(ctx, models[-1]) is not None

    def list_entries(self, ctx: RunContext) -> Listing:
        rows = [(m, w) for m in run_models(ctx) if (w := _weights(ctx, m)) is not None]
        if len(rows) < 2:
            raise no_window_error(ctx.run_id, self.name, rows[0][0].name if rows else "a logged model", HOW)
        steps = _steps(ctx, [m for m, _ in rows])
        entries = [SourceEntry(step=step, kind="raw", path=entry_path(ctx, m, w.path), bytes=w.file_size,
                               extra={"model": m.name})
                   for (m, w), step in zip(rows, steps)]
        return Listing(self.name, tuple(entries), complete=ctx.run.info.status == "FINISHED").sorted()

    def fetch(self, ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec
              ) -> list[CheckpointEntry]:
        run_models(ctx)  # the models' artifact locations, for ctx.download
        return fetch_converted(ctx, entries, root, spec, loader=load_weights)


def _steps(ctx: RunContext, models: list[LoggedModelRef]) -> list[int]:
    """The step the run's outputs record for each model; the names' numbers if those all coincide."""
    recorded = [m.step for m in models]
    if None not in recorded and len(set(recorded)) == len(recorded):
        return recorded
    named = [NUMBER.fullmatch(m.name) for m in models]
    numbers = [int(n.group(1)) for n in named if n]
    if len(numbers) == len(models) and len(set(numbers)) == len(numbers):
        ctx.log(f"run {ctx.run_id}: its {len(models)} logged models carry no distinct steps; the steps are the "
                f"numbers their names end in")
        return numbers
    twice = sorted({s for s in recorded if recorded.count(s) > 1 or s is None}, key=str)
    raise LcscError(f"run {ctx.run_id}: its logged models carry step(s) {', '.join(map(str, twice))} more than once "
                    f"or none; {HOW}")
