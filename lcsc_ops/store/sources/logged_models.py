"""MLflow 3 LoggedModels of a run, as the readers of the transformers and ``log_model(..., step=)`` layouts
see them: which models the run logged (``search_logged_models(filter_string="source_run_id='<run>'")``,
every page), the step each carries (the run's ``outputs.model_outputs``), their files, one file downloaded.

An entry's path is ``<model id>/<path in the model>``: listing the models records their artifact locations in
``ctx.models``, and :meth:`~lcsc_ops.store.sources.base.RunContext.download` fetches such paths like the run's own.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import brief_repr
from lcsc_ops.store.sources.base import RunContext, check_artifact_path

MODEL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
PAGE = 100
_CACHE: "weakref.WeakKeyDictionary[RunContext, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LoggedModelRef:
    """One LoggedModel of the run: id, name, the step the run's outputs record for it (None: none)."""

    model_id: str
    name: str
    step: int | None
    artifact_location: str


def _cache(ctx: RunContext) -> dict:
    return _CACHE.setdefault(ctx, {})


def run_models(ctx: RunContext) -> list[LoggedModelRef]:
    """Every LoggedModel whose source is the run, oldest first (cached on ``ctx``): those the search finds in
    the run's experiment, and any other the run's outputs name. None for a store without LoggedModels."""
    cache = _cache(ctx)
    if "models" not in cache:
        from mlflow.exceptions import MlflowException

        steps = {o.model_id: o.step for o in (getattr(ctx.run.outputs, "model_outputs", None) or [])}
        try:
            found = {m.model_id: m for m in _search(ctx)}
        except MlflowException:  # a tracking server that predates LoggedModels
            found = {}
        for model_id in (i for i in steps if i not in found):
            try:
                found[model_id] = ctx.client.get_logged_model(model_id)
            except MlflowException:  # deleted since
                continue
        refs = []
        for m in sorted(found.values(), key=lambda m: (m.creation_timestamp or 0, m.model_id)):
            if not MODEL_ID.fullmatch(str(m.model_id)):
                raise LcscError(f"run {ctx.run_id}: refusing the logged model id {brief_repr(m.model_id)}")
            refs.append(LoggedModelRef(m.model_id, str(m.name), steps.get(m.model_id), m.artifact_location))
        cache["models"] = refs
        ctx.models.update({ref.model_id: ref.artifact_location for ref in refs})
    return cache["models"]


def _search(ctx: RunContext) -> list[Any]:
    """``search_logged_models(filter_string="source_run_id='<run>'")`` over every page."""
    found, token = [], None
    while True:
        page = ctx.client.search_logged_models([ctx.run.info.experiment_id], max_results=PAGE, page_token=token,
                                               filter_string=f"source_run_id='{ctx.run_id}'")
        found += list(page)
        token = page.token
        if not token:
            return found


def model_files(ctx: RunContext, model: LoggedModelRef, path: str = "") -> list[Any]:
    """The files and folders directly under ``path`` in the model's artifacts (``FileInfo``, cached)."""
    cache = _cache(ctx).setdefault("files", {})
    key = (model.model_id, path)
    if key not in cache:
        if path:
            check_artifact_path(path, ctx.run_id)
        cache[key] = list(ctx.client.list_logged_model_artifacts(model.model_id, path or None))
    return cache[key]


def entry_path(ctx: RunContext, model: LoggedModelRef, path: str) -> str:
    """An entry's path: ``<model id>/<path in the model>`` (:meth:`RunContext.download` fetches it)."""
    return f"{model.model_id}/{check_artifact_path(path, ctx.run_id)}"


def download_model_file(ctx: RunContext, model: LoggedModelRef, path: str, dst: str) -> Path:
    """One file of the model's artifacts into ``dst`` (LcscError if missing or not a plain file there)."""
    return ctx.download(entry_path(ctx, model, path), dst)
