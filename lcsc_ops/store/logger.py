"""Checkpoints as MLflow artifacts while training: :class:`CheckpointLogger`.

A manifest entry is added only after its file has been fully logged, so a reader never
sees an entry whose file is missing or partial.
"""
from __future__ import annotations

import json
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from lcsc_ops.checkpoints import (CHECKPOINT_DIR, MANIFEST_FORMAT, MANIFEST_NAME, SPEC_ARTIFACT, checkpoint_filename,
                                  sha256_file, write_checkpoint)
from lcsc_ops.errors import LcscError
from lcsc_ops.math.ema import ema_decay_at, ema_update_
from lcsc_ops.spec import ModelSpec


def _unwrap(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DataParallel / DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


class CheckpointUploader:
    """Checkpoint files of one MLflow run: each file is logged, then listed in the manifest.

    Used by :class:`CheckpointLogger` while training and by ``lcsc-ops import``. A manifest
    entry is added only after its file is fully logged, so a reader never sees an entry
    whose file is missing or partial.
    """

    def __init__(self, client: Any, run_id: str, spec: ModelSpec) -> None:
        self.client, self.run_id, self.spec = client, run_id, spec
        self.entries: list[dict[str, Any]] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="lcsc-manifest-")
        client.log_text(run_id, json.dumps(spec.to_dict(), indent=2, sort_keys=True), SPEC_ARTIFACT)
        client.set_tag(run_id, "lcsc.spec", spec.to_json())

    @classmethod
    def create_run(cls, spec: ModelSpec, *, experiment: str, run_name: str | None, tags: dict[str, str],
                   tracking_uri: str | None = None) -> "CheckpointUploader":
        """A new run in ``experiment`` (created if missing) to upload into."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        return cls(client, run_id, spec)

    def add(self, path: Path, entry: dict[str, Any]) -> None:
        """Log the checkpoint file at ``path``, then its manifest ``entry``."""
        self.client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
        self.entries.append(entry)
        manifest = Path(self._tmp.name) / MANIFEST_NAME
        manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "spec": self.spec.to_dict(),
                                        "entries": self.entries}, indent=1))
        self.client.log_artifact(self.run_id, str(manifest), CHECKPOINT_DIR)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
        self._tmp.cleanup()


class CheckpointLogger:
    """Log raw and EMA checkpoints of a model as artifacts of an MLflow run, from any training loop.

    Call :meth:`step` after every optimizer step: it updates the training EMA and, every
    ``every`` steps, snapshots the raw weights and the EMA and logs both (plus a manifest
    entry each) in a background thread, so training does not wait for disk or network;
    the loop waits only if the previous upload is still running. Under ``accelerate``
    pass the ``accelerator``: only the main process keeps an EMA and logs, the model is
    unwrapped first, and the other processes return at once. Call :meth:`close` at the
    end (or use the logger as a context manager) to wait for the last upload.
    """

    def __init__(self, spec: ModelSpec, *, every: int = 50, ema_decay: float = 0.999, ema_warmup: bool = True,
                 accelerator: Any = None, run_id: str | None = None, tracking_uri: str | None = None,
                 start_step: int = 0) -> None:
        if every < 1:
            raise LcscError(f"checkpoint interval must be >= 1, got {every}")
        if not 0.0 <= ema_decay < 1.0:
            raise LcscError(f"EMA decay must be in [0, 1), got {ema_decay}")
        self.spec, self.every, self.ema_decay = spec, int(every), float(ema_decay)
        self.ema_warmup, self._ema_updates = bool(ema_warmup), 0
        self.start_step = int(start_step)
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        self._ema: dict[str, torch.Tensor] | None = None
        self._pending: Future | None = None
        self.run_id = None
        if not self.is_main:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise LcscError("no active MLflow run: call mlflow.start_run() first or pass run_id")
            run_id = active.info.run_id
        self.run_id = run_id
        self._uploader = CheckpointUploader(MlflowClient(tracking_uri=tracking_uri), run_id, spec)
        self._tmp = tempfile.TemporaryDirectory(prefix="lcsc-ckpt-")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcsc-ckpt")

    # -- training-loop side -------------------------------------------------------------
    def step(self, model: torch.nn.Module, step: int) -> None:
        """Update the EMA with the current weights; log a checkpoint pair every ``every`` steps."""
        if not self.is_main:
            return
        net = _unwrap(model, self.accelerator)
        self._update_ema(net)
        if step >= self.start_step and step % self.every == 0:
            self.save(net, step)

    @torch.no_grad()
    def _update_ema(self, net: torch.nn.Module) -> None:
        state = net.state_dict()
        if self._ema is None:
            self._ema = {k: v.detach().clone() for k, v in state.items()}
            return
        self._ema_updates += 1
        ema_update_(self._ema, state, ema_decay_at(self.ema_decay, self._ema_updates, self.ema_warmup))

    @torch.no_grad()
    def save(self, model: torch.nn.Module, step: int) -> None:
        """Snapshot raw + EMA weights now and log them in the background."""
        if not self.is_main:
            return
        net = _unwrap(model, self.accelerator)
        if self._ema is None:
            self._update_ema(net)
        self.wait()  # back-pressure: at most one upload in flight
        raw = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        ema = {k: v.detach().to("cpu", copy=True) for k, v in self._ema.items()}
        self._pending = self._executor.submit(self._write_and_log, step, raw, ema)

    def wait(self) -> None:
        """Block until the upload in flight (if any) is done; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        if not self.is_main:
            return
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self._tmp.cleanup()

    def __enter__(self) -> "CheckpointLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self._uploader.entries) if self.is_main else []

    # -- background side ----------------------------------------------------------------
    def _write_and_log(self, step: int, raw: dict, ema: dict) -> None:
        for kind, state, extra in (("raw", raw, {}), ("ema", ema, {"lcsc.ema_decay": repr(self.ema_decay),
                                                                          "lcsc.ema_warmup": str(self.ema_warmup).lower()})):
            name = checkpoint_filename(step, kind)
            path = Path(self._tmp.name) / name
            write_checkpoint(path, state, step=step, kind=kind, spec=self.spec, extra=extra)
            entry = {"step": step, "kind": kind, "file": name, "sha256": sha256_file(path),
                     "bytes": path.stat().st_size}
            if kind == "ema":
                entry["ema_decay"], entry["ema_warmup"] = self.ema_decay, self.ema_warmup
            self._uploader.add(path, entry)
            path.unlink()
