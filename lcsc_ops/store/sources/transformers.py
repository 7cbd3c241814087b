"""transformers' layout: ``Trainer`` with ``MLflowCallback`` (``report_to=["mlflow"]``) and
``HF_MLFLOW_LOG_ARTIFACTS=1``.

Checked against transformers 5.25 (``integrations/integration_utils.py``, ``MLflowCallback.on_save``) and
MLflow 3.17: each save calls ``mlflow.pyfunc.log_model("checkpoint-<step>", artifacts={"model_path":
<output_dir>/checkpoint-<step>}, python_model=PythonModel())``, which on MLflow 3 makes one LoggedModel
per save, named ``checkpoint-<step>``, recorded in the run's ``outputs.model_outputs`` with step 0 (no
step is passed); on MLflow 2 the same model went into the run's own artifacts, ``checkpoint-<step>/``
(read too). Its artifacts hold the whole checkpoint folder under ``artifacts/checkpoint-<step>/``:
``model.safetensors`` (the weights, keys as the ``PreTrainedModel`` names them, e.g. ``net.``),
``config.json``, ``trainer_state.json`` (``global_step``), and ``optimizer.pt``, ``scheduler.pt``,
``rng_state.pth`` and ``training_args.bin`` (a pickle), beside the pyfunc's ``python_model.pkl``.

Only ``model.safetensors`` is ever downloaded. The step is the ``<step>`` of the model's name and of
the folder inside it: transformers names both ``checkpoint-{state.global_step}`` (the ``global_step``
that ``trainer_state.json`` records too). A sharded checkpoint (``model.safetensors.index.json``) is
refused with one line.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from lcsc_ops.checkpoints import CheckpointEntry
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.sources.base import Listing, RunContext, RunReader, SourceEntry, check_artifact_path
from lcsc_ops.store.sources.convert import fetch_converted, no_window_error
from lcsc_ops.store.sources.logged_models import LoggedModelRef, entry_path, model_files, run_models
from lcsc_ops.weightfiles import first_line

NAME = re.compile(r"checkpoint-(\d+)")
WEIGHTS, SHARDED = "model.safetensors", "model.safetensors.index.json"
HOW = "log every checkpoint: TrainingArguments(save_steps=N, save_total_limit=None) with HF_MLFLOW_LOG_ARTIFACTS=1"


def _candidates(ctx: RunContext) -> list[LoggedModelRef]:
    return [m for m in run_models(ctx) if NAME.fullmatch(m.name)]


def _folder(ctx: RunContext, model: LoggedModelRef) -> dict[str, Any] | None:
    """The checkpoint folder ``artifacts/<model name>/``: file name -> FileInfo; None if it has none."""
    for d in model_files(ctx, model, "artifacts"):
        if d.is_dir and PurePosixPath(d.path).name == model.name:
            files = {PurePosixPath(f.path).name: f for f in model_files(ctx, model, d.path) if not f.is_dir}
            if WEIGHTS in files or SHARDED in files:
                return files
    return None


def _run_folders(ctx: RunContext) -> list[tuple[str, dict[str, Any]]]:
    """MLflow 2's place for the same model: the run's own ``checkpoint-<step>/artifacts/checkpoint-<step>/``."""
    found = []
    for d in ctx.ls(""):
        name = PurePosixPath(d.path).name
        if d.is_dir and NAME.fullmatch(name):
            files = {PurePosixPath(f.path).name: f for f in ctx.ls(f"{d.path}/artifacts/{name}") if not f.is_dir}
            if WEIGHTS in files or SHARDED in files:
                found.append((name, files))
    return found


def _checkpoints(ctx: RunContext) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """(name, where, files, weights' entry path) of every checkpoint: the run's LoggedModels (MLflow 3),
    else the run's own folders (MLflow 2)."""
    rows = []
    for m in _candidates(ctx):
        files = _folder(ctx, m)
        if files is not None:
            rows.append((m.name, m.model_id, files, entry_path(ctx, m, files[WEIGHTS].path) if WEIGHTS in files
                         else None))
    if not rows:
        rows = [(name, name, files, files[WEIGHTS].path if WEIGHTS in files else None)
                for name, files in _run_folders(ctx)]
    return rows


def load_safetensors(path: Path, name: str, allow_pickle: bool) -> dict:
    """A ``model.safetensors`` file's tensors (plain data: nothing to unpickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LcscError(f"cannot read {name}: {first_line(exc)}") from None


class TransformersReader(RunReader):
    """Runs whose LoggedModels ``checkpoint-<step>`` hold a transformers checkpoint folder."""

    name = "transformers"
    priority = 40
    description = "transformers Trainer + MLflowCallback (HF_MLFLOW_LOG_ARTIFACTS=1): checkpoint-<step> models"

    def detect(self, ctx: RunContext) -> bool:
        found = _candidates(ctx)
        return _folder(ctx, found[-1]) is not None if found else bool(_run_folders(ctx))

    def list_entries(self, ctx: RunContext) -> Listing:
        rows = _checkpoints(ctx)
        if len(rows) < 2:
            raise no_window_error(ctx.run_id, self.name, rows[0][0] if rows else "checkpoint-<step>", HOW)
        entries, seen = [], {}
        for name, where, files, weights in rows:
            if weights is None:
                raise LcscError(f"run {ctx.run_id}: {name} is sharded ({SHARDED}); lcsc-ops reads one "
                                f"{WEIGHTS} per checkpoint (save with a larger max_shard_size)")
            step = int(NAME.fullmatch(name).group(1))
            if step in seen:
                raise LcscError(f"run {ctx.run_id}: two checkpoints of step {step}: {seen[step]} and {where}")
            seen[step] = where
            check_artifact_path(weights, ctx.run_id)
            entries.append(SourceEntry(step=step, kind="raw", path=weights, bytes=files[WEIGHTS].file_size,
                                       extra={"model": name}))
        return Listing(self.name, tuple(entries), complete=ctx.run.info.status == "FINISHED").sorted()

    def fetch(self, ctx: RunContext, entries: Sequence[SourceEntry], root: Path, spec: ModelSpec
              ) -> list[CheckpointEntry]:
        run_models(ctx)  # the models' artifact locations, for ctx.download
        return fetch_converted(ctx, entries, root, spec, loader=load_safetensors,
                               note="model.safetensors only (never optimizer.pt, scheduler.pt, training_args.bin)")
