"""Checkpoints as MLflow artifacts while training (:class:`CheckpointLogger`) or importing.

Per checkpoint step (or per batch of steps queued behind a slow upload), two artifact calls:
the files, then a manifest fragment ``checkpoints/manifest.d/step<N>.json`` listing them, so
a reader never sees an entry whose file is missing, and no call grows with the number of
checkpoints. At the end of the run the whole manifest is written once, marked complete: a
run without it is partial (still training, or killed). While training, the calls run in a
separate process (:mod:`lcsc_ops.store.upload_worker`), not in the training process.
"""
from __future__ import annotations

import itertools
import json
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from lcsc_ops import runformat
from lcsc_ops.checkpoints import (CHECKPOINT_DIR, MANIFEST_NAME, SPEC_ARTIFACT, checkpoint_filename, sha256_file,
                                  write_checkpoint)
from lcsc_ops.errors import LcscError
from lcsc_ops.math.ema import EmaPlan, ema_decay_at
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.shared_memory import FRAGMENT_PATH, ShmOwner, Slots, _layout_key, sweep_shared_memory
from lcsc_ops.store.upload_process import UploadProcess

__all__ = ["CheckpointLogger", "CheckpointUploader", "FRAGMENT_PATH", "sweep_shared_memory", "upload_job",
           "write_fragment"]


def _unwrap(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DataParallel / DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def write_fragment(folder: Path, entries: list[dict[str, Any]]) -> Path:
    """The manifest fragment listing one step's ``entries``, written into ``folder``."""
    path = folder / runformat.fragment_name_for(entries)
    path.write_text(json.dumps(runformat.fragment_doc(entries)))
    return path


def upload_job(step: int, folder: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What the uploader process gets for one step: its spool ``folder`` holding the files,
    and the fragment listing ``entries`` (written by the uploader, named as :func:`write_fragment`)."""
    return {"step": step, "folder": str(folder), "files_path": CHECKPOINT_DIR, "fragment_path": FRAGMENT_PATH,
            "fragment_name": runformat.fragment_name_for(entries), "fragment": runformat.fragment_doc(entries)}


class CheckpointUploader:
    """The checkpoint artifacts of one MLflow run: :meth:`add_step` per step, :meth:`end` once."""

    def __init__(self, client: Any, run_id: str, spec: ModelSpec) -> None:
        self.client, self.run_id, self.spec = client, run_id, spec
        self.entries: list[dict[str, Any]] = []
        client.log_text(run_id, json.dumps(spec.to_dict(), indent=2, sort_keys=True), SPEC_ARTIFACT)
        client.set_tag(run_id, "lcsc.spec", spec.to_json())

    @classmethod
    def create_run(cls, spec: ModelSpec, *, experiment: str, run_name: str | None, tags: dict[str, str],
                   tracking_uri: str | None = None) -> "CheckpointUploader":
        """A new run in ``experiment`` (created if missing) to upload into."""
        from mlflow.tracking import MlflowClient

        from lcsc_ops.store.fetch import resolve_tracking_uri

        client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        return cls(client, run_id, spec)

    def add_step(self, folder: Path, entries: list[dict[str, Any]]) -> None:
        """Log the checkpoint files in ``folder`` (one step's), then the fragment listing ``entries``."""
        self.client.log_artifacts(self.run_id, str(folder), CHECKPOINT_DIR)
        with tempfile.TemporaryDirectory(prefix="lcsc-fragment-") as tmp:
            self.client.log_artifact(self.run_id, str(write_fragment(Path(tmp), entries)), FRAGMENT_PATH)
        self.entries.extend(entries)

    def finish(self) -> None:
        """Write the whole manifest once, marked complete: every checkpoint of the run is logged."""
        with tempfile.TemporaryDirectory(prefix="lcsc-manifest-") as tmp:
            path = Path(tmp) / MANIFEST_NAME
            path.write_text(runformat.manifest_json(runformat.manifest_doc(self.spec.to_dict(), self.entries)))
            self.client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)

    def end(self, status: str) -> None:
        """Finish (a FINISHED run only) and end the run with ``status``."""
        if status == "FINISHED":
            self.finish()
        self.client.set_terminated(self.run_id, status)


class CheckpointLogger:
    """Log raw and EMA checkpoints of a model as artifacts of an MLflow run, from any training loop.

    Call :meth:`step` after every optimizer step: it updates the training EMA (unless the
    loop passes its own, ``ema=``) and, every ``every`` steps, snapshots the raw weights and
    the EMA. They are spooled (a small pair through a shared-memory slot that the uploader
    process writes out into shared memory, up to ``FAST_SPOOL_BYTES``, else to local disk; a
    larger one to local disk by a writer thread) and uploaded by that separate
    process, so the loop waits only while every slot or the previous large snapshot (at most
    one pair in memory) are still being written, or while more than ``max_spool_bytes`` wait
    for a slow server, and MLflow's calls do not compete with the loop for the interpreter lock.
    Under ``accelerate`` pass the ``accelerator``: only the main process keeps an EMA and logs.
    :meth:`close` waits for the uploads and writes the complete manifest (as a context manager:
    only if the block did not raise); the run itself belongs to the caller.
    """

    def __init__(self, spec: ModelSpec, *, every: int = 50, ema_decay: float = 0.999, ema_warmup: bool = True,
                 accelerator: Any = None, run_id: str | None = None, tracking_uri: str | None = None,
                 start_step: int = 0, max_spool_bytes: int = 8 << 30, model_name: str | None = None,
                 ema: torch.nn.Module | Callable[[], Mapping[str, torch.Tensor]] | None = None) -> None:
        """``model_name`` sets the run tag ``lcsc.model_name``: the name ``lcsc-ops optimize``
        registers the merge under by default. ``ema``: the loop's own EMA, a module with the
        model's state-dict keys (e.g. ``AveragedModel(...).module``, ema-pytorch's ``ema_model``)
        or a callable returning such a state dict; it is logged as the EMA checkpoint and none is
        kept here (no work per step), ``ema_decay`` and ``ema_warmup`` then only describe it. On
        the main process the spec is checked first (:func:`~lcsc_ops.evaluation.evaluators.check_spec`:
        its factory builds, its sampler and data set are known), before anything is logged: a bad
        spec is one LcscError naming the field."""
        if every < 1:
            raise LcscError(f"checkpoint interval must be >= 1, got {every}")
        if not 0.0 <= ema_decay < 1.0:
            raise LcscError(f"EMA decay must be in [0, 1), got {ema_decay}")
        if model_name is not None and not (isinstance(model_name, str) and model_name.strip()):
            raise LcscError(f"model_name must be a non-empty string, got {model_name!r}")
        self.spec, self.every, self.ema_decay = spec, int(every), float(ema_decay)
        self._spec_json = spec.to_json()
        self.ema_warmup, self._ema_updates, self._ema_decay_now = bool(ema_warmup), 0, None
        self.start_step, self.max_spool_bytes = int(start_step), int(max_spool_bytes)
        self.accelerator = accelerator
        self.is_main = accelerator is None or accelerator.is_main_process
        self._ema: dict[str, torch.Tensor] | None = None
        if ema is not None and not (isinstance(ema, torch.nn.Module) or callable(ema)):
            raise LcscError(f"ema must be a module or a callable returning a state dict, got {type(ema).__name__}")
        self._user_ema = ema.state_dict if isinstance(ema, torch.nn.Module) else ema
        self._written: Future | None = None
        self._slots: Slots | None = None
        self._wrapped = self._net = None
        self.run_id = None
        if self.is_main:
            from lcsc_ops.evaluation.evaluators import check_spec

            check_spec(spec)
            self._open(run_id, tracking_uri)
            if model_name is not None:
                self._uploader.client.set_tag(self.run_id, "lcsc.model_name", model_name)

    def _open(self, run_id: str | None, tracking_uri: str | None) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise LcscError("no active MLflow run: call mlflow.start_run() first or pass run_id")
            run_id = active.info.run_id
        self.run_id = run_id
        client = MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())
        if "lcsc.kind" not in client.get_run(run_id).data.tags:  # the user's own loop: a training run to list
            client.set_tag(run_id, "lcsc.kind", "training")
        self._uploader = CheckpointUploader(client, run_id, self.spec)
        self._spool = tempfile.TemporaryDirectory(prefix="lcsc-spool-")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcsc-ckpt-write")
        self._owner = ShmOwner()  # before the uploader: it inherits the owner's lock
        try:
            self._sender = UploadProcess(client.tracking_uri, run_id, self._owner)
        except BaseException:
            self._owner.release(remove=True)
            raise

    # -- training-loop side -------------------------------------------------------------
    def step(self, model: torch.nn.Module, step: int) -> None:
        """Update the EMA with the current weights; log a checkpoint pair every ``every`` steps."""
        if not self.is_main:
            return
        if model is not self._wrapped:  # unwrapped once per model object, not every step
            self._wrapped, self._net = model, _unwrap(model, self.accelerator)
        net = self._net
        if self._user_ema is None:
            self._update_ema(net)
        if step >= self.start_step and step % self.every == 0:
            self.save(net, step)

    def _update_ema(self, net: torch.nn.Module) -> None:
        if self._ema is None:
            self._ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
            self._plan_ema(net)
            return
        if [t.data_ptr() for t in self._ema_watch] != self._ema_watch_ptrs:  # a weight moved or was cast
            self._plan_ema(net)
        self._ema_updates += 1
        decay = self._ema_decay_now
        if decay is None:  # still warming up; then fixed: no call per step
            decay = ema_decay_at(self.ema_decay, self._ema_updates, self.ema_warmup)
            self._ema_decay_now = decay if decay == self.ema_decay else None
        self._ema_plan.apply_(decay)

    def _plan_ema(self, net: torch.nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """The EMA's plan: views of the weights, so a step costs one fused update and no
        ``state_dict()``. Rebuilt when a weight's storage changes (checked every step) or a weight
        was replaced by a new tensor (checked at every checkpoint, in its state dict)."""
        state = net.state_dict() if state is None else state
        self._ema_plan = EmaPlan(self._ema, state)
        self._ema_ptrs = [v.data_ptr() for v in state.values()]
        self._ema_watch = list(itertools.chain(net.parameters(), net.buffers()))
        self._ema_watch_ptrs = [t.data_ptr() for t in self._ema_watch]

    @torch.no_grad()
    def save(self, model: torch.nn.Module, step: int) -> None:
        """Snapshot raw + EMA weights now; write and upload them in the background."""
        if not self.is_main:
            return
        net = _unwrap(model, self.accelerator)
        raw = net.state_dict()
        if self._user_ema is None:
            if self._ema is None:
                self._update_ema(net)
            elif [v.data_ptr() for v in raw.values()] != self._ema_ptrs:
                self._plan_ema(net, raw)
        self._wait_written()  # memory bound: one snapshot pair not yet on disk
        self._wait_spool()
        ema = self._ema if self._user_ema is None else self._user_ema()
        if self._user_ema is not None and set(ema) != set(raw):
            extra = sorted(set(ema) ^ set(raw))[:3]
            raise LcscError(f"the EMA passed as ema= has other state-dict keys than the model (e.g. {extra}): "
                            "pass the averaged module itself, e.g. AveragedModel(...).module")
        if self._slots is not None and self._slots.key == (_layout_key(raw), _layout_key(ema)):
            self._send_slot(step, raw, ema)
        elif Slots.fits(raw, ema):
            self._new_slots(raw, ema)
            self._send_slot(step, raw, ema)
        else:
            snapshot = lambda state: {k: v.detach().to("cpu", copy=True) for k, v in state.items()}  # noqa: E731
            self._written = self._writer.submit(self._write, step, snapshot(raw), snapshot(ema))

    def _send_slot(self, step: int, raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor]) -> None:
        """Copy the pair into a free slot; the uploader writes its files, then uploads them."""
        slot = self._free_slot()
        self._slots.copy_(slot, raw, ema)
        self._sender.send_slot(step, slot, self._slots.bytes_per_pair)

    def _new_slots(self, raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor]) -> None:
        """Slots for this layout, once the uploader has written out the old ones."""
        if self._slots is not None:
            for _ in range(self._slots.count):  # every slot back: the uploader is done with the old file
                self._free_slot()
            self._slots.close()
        else:
            sweep_shared_memory()
        self._slots = Slots(self._spool.name, raw, ema, self._owner)
        extras = {kind: {"metadata": self._extra(kind), "entry": self._entry_extra(kind)} for kind in ("raw", "ema")}
        self._sender.send(self._slots.describe(self._spool.name, self._spec_json, extras))
        self._sender.reset_slots(self._slots.count)

    def _free_slot(self) -> int:
        while True:
            slot = self._sender.free_slot(timeout=0.1)
            if slot is not None:
                return slot
            while self._confirm(block=False):  # raises a failed upload, or an uploader that is gone
                pass

    def _extra(self, kind: str) -> dict[str, str] | None:
        """The metadata an EMA file has beyond step, kind and spec."""
        if kind == "ema":
            return {"lcsc.ema_decay": repr(self.ema_decay), "lcsc.ema_warmup": str(self.ema_warmup).lower()}
        return None

    def _entry_extra(self, kind: str) -> dict[str, Any]:
        """What a manifest entry of this kind has beyond step, kind, file, hash and size."""
        return {"ema_decay": self.ema_decay, "ema_warmup": self.ema_warmup} if kind == "ema" else {}

    def _wait_written(self) -> None:
        if self._written is not None:
            pending, self._written = self._written, None
            pending.result()

    def _confirm(self, block: bool, read: bool = True) -> bool:
        entries = self._sender.take(block, read)
        if entries is not None:
            self._uploader.entries.extend(entries)
        return entries is not None

    def _wait_spool(self) -> None:
        """Raise a failed upload; wait while the spool holds more than ``max_spool_bytes``. The
        answers are read here for a large pair; for small ones, when no slot is left free (every
        few checkpoints): a system call costs the loop more than the rest of a save."""
        while self._confirm(block=False, read=self._slots is None):
            pass
        while self._sender.pending and self._sender.pending_bytes() > self.max_spool_bytes:
            self._confirm(block=True)

    def wait(self) -> None:
        """Block until every snapshot so far is written and uploaded; re-raise an error."""
        if not self.is_main:
            return
        self._wait_written()
        while self._sender.pending:
            self._confirm(block=True)

    def close(self, complete: bool = True) -> None:
        """Wait for the uploads, then write the complete manifest: not if an upload failed, nor
        with ``complete=False`` (the training stopped before its end: the run stays partial, its
        checkpoints readable from the fragments)."""
        if not self.is_main:
            return
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)
            self._sender.stop()
            if self._slots is not None:
                self._slots.close()
            self._spool.cleanup()
            self._owner.release()
        if complete:
            self._uploader.finish()

    def __enter__(self) -> "CheckpointLogger":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(complete=exc_type is None)  # a loop that raised (Ctrl-C too) leaves a partial run

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The manifest entries uploaded so far (the uploader's answers are read here; a failed
        upload is raised)."""
        if not self.is_main:
            return []
        while self._sender.pending and self._confirm(block=False):
            pass
        return list(self._uploader.entries)

    # -- background side ----------------------------------------------------------------
    def _write(self, step: int, raw: dict, ema: dict) -> None:
        """Write one step's files to the spool (a large pair, on the writer thread); hand them and
        their fragment to the uploader."""
        folder = Path(self._spool.name) / f"step{step:08d}"
        folder.mkdir()
        entries = []
        for kind, state in (("raw", raw), ("ema", ema)):
            path = folder / checkpoint_filename(step, kind)
            write_checkpoint(path, state, step=step, kind=kind, spec=self._spec_json,
                             extra=self._extra(kind))
            entries.append(runformat.manifest_entry(step, kind, sha256_file(path), path.stat().st_size,
                                                    self._entry_extra(kind)))
        self._sender.send(upload_job(step, folder, entries), sum(e["bytes"] for e in entries))
