"""MLflow's PyTorch autolog layout: ``mlflow.pytorch.autolog(checkpoint=True, checkpoint_save_best_only=False)``
around a Lightning ``Trainer.fit`` (autolog patches ``lightning`` and ``pytorch_lightning``; plain PyTorch
loops get no checkpoints from it).

Checked against MLflow 3.17 (``mlflow/utils/checkpoint_utils.py``, ``mlflow/pytorch/_lightning_autolog.py``):
each save uploads ``checkpoints/epoch_<n>/checkpoint.pth`` (``checkpoint_save_freq="epoch"``, the
default) or ``checkpoints/global_step_<n>/checkpoint.pth`` (an integer frequency), and
``checkpoint.weights.pth`` instead with ``checkpoint_save_weights_only=True``, beside
``checkpoint_metrics.json`` = the logged metrics plus ``{"epoch": e, "global_step": s}``. The ``.pth`` is
Lightning's checkpoint dict (``state_dict`` keyed by the LightningModule's attributes, e.g. ``net.``,
``global_step``, ``epoch``, and, unless weights-only, the optimizer state: it cannot be partly
downloaded). The run's tag ``mlflow.latest_checkpoint_artifact`` names the newest. With
``checkpoint_save_best_only=True`` (autolog's default) there is one file overwritten in place,
``checkpoints/latest_checkpoint.pth``: no window. Autolog's default ``log_models=True`` also logs
the final model as a LoggedModel named ``model`` (step 0): this reader comes before the LoggedModel one.

The step of each checkpoint is ``global_step`` from its ``checkpoint_metrics.json`` (a few bytes,
downloaded when listing); a ``global_step_<n>`` folder must agree with it.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from lcsc_ops.checkpoints import CheckpointEntry
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.sources.base import Listing, RunContext, RunReader, SourceEntry, check_artifact_path
from lcsc_ops.store.sources.convert import fetch_converted, no_window_error, torch_loader

ROOT = "checkpoints"
FOLDER = re.compile(r"(epoch|global_step)_(\d+)")
FILES = ("checkpoint.pth", "checkpoint.weights.pth")
METRICS = "checkpoint_metrics.json"
IN_PLACE = ("latest_checkpoint.pth", "latest_checkpoint.weights.pth")
MAX_METRICS_BYTES = 1 << 20
HOW = ("log every checkpoint: mlflow.pytorch.autolog(checkpoint=True, checkpoint_save_best_only=False), "
       "then rerun")
NOTE = "autolog's checkpoint.pth holds the optimizer state too and cannot be partly downloaded"


def _folders(ctx: RunContext) -> list[tuple[Any, re.Match]]:
    return [(f, m) for f in ctx.ls(ROOT) if f.is_dir and (m := FOLDER.fullmatch(PurePosixPath(f.path).name))]


def _in_place(ctx: RunContext) -> Any:
    return next((f for f in ctx.ls(ROOT) if not f.is_dir and PurePosixPath(f.path).name in IN_PLACE), None)


class AutologReader(RunReader):
    """Runs holding ``checkpoints/epoch_<n>/checkpoint.pth`` (``mlflow.pytorch.autolog(checkpoint=True)``)."""

    name = "autolog"
    priority = 20
    description = "mlflow.pytorch.autolog(checkpoint=True): checkpoints/epoch_<n>/checkpoint.pth"

    def detect(self, ctx: RunContext) -> bool:
        return bool(_folders(ctx)) or _in_place(ctx) is not None

    def list_entries(self, ctx: RunContext) -> Listing:
        found = []
        for folder, match in _folders(ctx):
            files = {PurePosixPath(f.path).name: f for f in ctx.ls(folder.path) if not f.is_dir}
            weights = next((files[n] for n in FILES if n in files), None)
            if weights is not None and METRICS in files:
                found.append((folder, match, weights, files[METRICS]))
        if len(found) < 2:
            only = found[0][2].path if found else getattr(_in_place(ctx), "path", f"{ROOT}/")
            raise no_window_error(ctx.run_id, self.name, only, HOW)
        steps = _steps(ctx, [(m, metrics) for _, m, _, metrics in found])
        entries, seen = [], {}
        for (folder, _, weights, _), step in zip(found, steps):
            check_artifact_path(weights.path, ctx.run_id)
            if step in seen:
                raise LcscError(f"run {ctx.run_id}: two autolog checkpoints of step {step}: {seen[step]} and "
                                f"{weights.path}")
            seen[step] = weights.path
            entries.append(SourceEntry(step=step, kind="raw", path=weights.path, bytes=weights.file_size))
        return Listing(self.name, tuple(entries), complete=ctx.run.info.status == "FINISHED").sorted()

    def fetch(self, ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec
              ) -> list[CheckpointEntry]:
        return fetch_converted(ctx, entries, root, spec, loader=torch_loader, note=NOTE)


def _steps(ctx: RunContext, found: list[tuple[re.Match, Any]]) -> list[int]:
    """The ``global_step`` each ``checkpoint_metrics.json`` records (a ``global_step_<n>`` folder must agree)."""
    steps = []
    with tempfile.TemporaryDirectory(prefix="lcsc-autolog-") as tmp:
        for i, (match, metrics) in enumerate(found):
            if (metrics.file_size or 0) > MAX_METRICS_BYTES:
                raise LcscError(f"run {ctx.run_id}: {metrics.path} is {metrics.file_size} bytes, not a metrics file")
            dst = Path(tmp) / str(i)
            dst.mkdir()
            local = ctx.download(check_artifact_path(metrics.path, ctx.run_id), str(dst))
            try:
                step = json.loads(local.read_text()).get("global_step")
            except (ValueError, UnicodeDecodeError, AttributeError):
                step = None
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                raise LcscError(f"run {ctx.run_id}: {metrics.path} records no global_step")
            if match.group(1) == "global_step" and int(match.group(2)) != step:
                raise LcscError(f"run {ctx.run_id}: {metrics.path} records global_step {step}, its folder says "
                                f"{match.group(2)}")
            steps.append(step)
    return steps
