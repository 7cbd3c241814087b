"""Checkpoints as MLflow artifacts: the logger used while training, the reader used by optimize.

Layout inside a training run's artifacts::

    lcsc/spec.json                          the model spec (factory, kwargs, sampler, data set)
    checkpoints/step00000050-raw.safetensors
    checkpoints/step00000050-ema.safetensors
    checkpoints/manifest.json               {"format", "spec", "entries": [{step, kind, file, sha256, bytes, ...}]}

Step, kind and spec also live in each file's safetensors metadata (a renamed file still
says what it is). A manifest entry is added only after its file has been fully logged,
so a reader never sees an entry whose file is missing or partial; the sha256 in the
entry is checked on download.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec

MANIFEST_FORMAT = "lcsc-checkpoints/1"
CHECKPOINT_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
SPEC_ARTIFACT = "lcsc/spec.json"
KINDS = ("raw", "ema")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_filename(step: int, kind: str) -> str:
    return f"step{step:08d}-{kind}.safetensors"


def write_checkpoint(path: Path, state: Mapping[str, torch.Tensor], *, step: int, kind: str,
                     spec: ModelSpec, extra: Mapping[str, str] | None = None) -> None:
    """Write a state dict as safetensors with step, kind and spec in the metadata (atomic rename)."""
    metadata = {"lcsc.format": MANIFEST_FORMAT, "lcsc.step": str(step), "lcsc.kind": kind,
                "lcsc.spec": spec.to_json(), **(extra or {})}
    tmp = path.with_suffix(".tmp")
    # safetensors refuses tensors that share memory; a snapshot made with clone() never does.
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _unwrap(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module  # DataParallel / DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def ema_decay_at(decay: float, update: int, warmup: bool = True) -> float:
    """The decay used by the ``update``-th EMA update (1, 2, ...; the EMA starts as a copy).

    With ``warmup`` it is ``min(decay, (1 + update) / (10 + update))``, the warm-up of
    diffusers' ``EMAModel`` (and timm's): early updates forget the first, untrained weights
    fast, so a short run's EMA is not dragged towards its initialisation (with a plain
    0.999 EMA, weights from the first steps still hold ~5% after 3,000 steps).
    """
    return min(decay, (1.0 + update) / (10.0 + update)) if warmup else decay


@torch.no_grad()
def ema_update_(ema: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * state`` in place; non-floating tensors are copied.

    Every floating tensor in one fused call (a per-tensor loop costs ~1 ms/step).
    """
    floats, sources = [], []
    for k, v in state.items():
        e = ema[k]
        if e.is_floating_point():
            floats.append(e)
            sources.append(v.detach())
        else:
            e.copy_(v)
    torch._foreach_lerp_(floats, sources, 1.0 - decay)


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
        self._entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
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
        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._client.log_text(run_id, json.dumps(spec.to_dict(), indent=2, sort_keys=True), SPEC_ARTIFACT)
        self._client.set_tag(run_id, "lcsc.spec", spec.to_json())
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
        return list(self._entries)

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
            self._client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
            path.unlink()
            # Only now, with the file fully logged, does the manifest list it.
            with self._lock:
                self._entries.append(entry)
                self._log_manifest()

    def _log_manifest(self) -> None:
        manifest = {"format": MANIFEST_FORMAT, "spec": self.spec.to_dict(), "entries": self._entries}
        path = Path(self._tmp.name) / MANIFEST_NAME
        path.write_text(json.dumps(manifest, indent=1))
        self._client.log_artifact(self.run_id, str(path), CHECKPOINT_DIR)


# ---------------------------------------------------------------------------------------
# Reading a window back
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    kind: str
    file: str
    sha256: str
    bytes: int
    path: Path  # verified local copy

    def load(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self.path), device=str(device))

    @property
    def label(self) -> str:
        return f"{self.kind}@{self.step}"


@dataclass(frozen=True)
class CheckpointWindow:
    """The verified checkpoints an optimization works on: raw ones by step, then EMA ones by step."""

    run_id: str
    spec: ModelSpec
    entries: tuple[CheckpointEntry, ...]
    training_ema: CheckpointEntry | None  # EMA snapshot at the last step of the window
    steps: tuple[int, ...]

    def indices(self, *kinds: str) -> list[int]:
        """Positions of the entries of the given kinds (all kinds when none are given)."""
        return [i for i, e in enumerate(self.entries) if not kinds or e.kind in kinds]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LCSC_OPS_CACHE", Path.home() / ".cache" / "lcsc-ops"))


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def get_run_or_fail(run_id: str, tracking_uri: str | None = None):
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_run(run_id)
    except MlflowException:
        raise LcscError(f"unknown run id {run_id!r} in tracking store {_store(tracking_uri)}") from None


def _store(tracking_uri: str | None) -> str:
    import mlflow

    return tracking_uri or mlflow.get_tracking_uri()


def _download(run_id: str, name: str, dst: str, tracking_uri: str | None, missing: str) -> str:
    """Download ``checkpoints/<name>`` of a run into ``dst``; LcscError(``missing``) if it is not there."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{name}",
                                                   dst_path=dst, tracking_uri=tracking_uri)
    except (MlflowException, OSError):
        raise LcscError(missing) from None


def read_manifest(run_id: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download and parse ``checkpoints/manifest.json`` of a run (LcscError if absent)."""
    get_run_or_fail(run_id, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(run_id, MANIFEST_NAME, tmp, tracking_uri,
                          f"run {run_id} has no checkpoints (no {CHECKPOINT_DIR}/{MANIFEST_NAME} artifact)")
        manifest = json.loads(Path(local).read_text())
    if manifest.get("format") != MANIFEST_FORMAT or not manifest.get("entries"):
        raise LcscError(f"run {run_id} has no checkpoints listed in its manifest")
    return manifest


def _select(entries: list[dict], window: int, end_step: int | None = None
            ) -> tuple[list[dict], dict | None, list[int]]:
    """The last ``window`` checkpoint steps (at or before ``end_step``): every entry at those
    steps, raw by step, then EMA by step."""
    if window < 1:
        raise LcscError(f"window must be >= 1, got {window}")
    if end_step is not None:
        entries = [e for e in entries if e["step"] <= end_step]
        if not entries:
            raise LcscError(f"no checkpoints at or before step {end_step}")
    raw_steps = sorted({e["step"] for e in entries if e["kind"] == "raw"})
    steps = (raw_steps or sorted({e["step"] for e in entries}))[-window:]
    chosen = sorted((e for e in entries if e["step"] in set(steps)),
                    key=lambda e: (KINDS.index(e["kind"]) if e["kind"] in KINDS else len(KINDS), e["step"]))
    emas = sorted((e for e in entries if e["kind"] == "ema" and e["step"] <= steps[-1]), key=lambda e: e["step"])
    return chosen, (emas[-1] if emas else None), steps


def fetch_window(run_id: str, *, window: int = 16, end_step: int | None = None, tracking_uri: str | None = None,
                 cache_dir: Path | None = None) -> CheckpointWindow:
    """Download (once, into a local cache) and sha256-verify the last ``window`` checkpoint steps of a run
    (at or before ``end_step`` when given: merging an earlier part of training).

    All checkpoints at those steps (raw and EMA) come back as ``entries``; which of them
    form the search basis is the caller's choice. ``training_ema`` is the newest EMA
    snapshot at or before the window's last step.
    """
    manifest = read_manifest(run_id, tracking_uri)
    chosen, ema_entry, steps = _select(manifest["entries"], window, end_step)
    root = (cache_dir or default_cache_dir()) / "checkpoints" / run_id
    root.mkdir(parents=True, exist_ok=True)

    def fetch(e: dict) -> CheckpointEntry:
        local = root / e["file"]
        if not (local.exists() and local.stat().st_size == e["bytes"] and sha256_file(local) == e["sha256"]):
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                got = _download(run_id, e["file"], tmp, tracking_uri,
                                f"run {run_id}: checkpoint {e['file']} is listed but missing")
                digest = sha256_file(got)
                if digest != e["sha256"]:
                    raise LcscError(f"run {run_id}: checkpoint {e['file']} fails its sha256 check "
                                    f"(expected {e['sha256'][:12]}…, got {digest[:12]}…)")
                os.replace(got, local)
        return CheckpointEntry(step=e["step"], kind=e["kind"], file=e["file"], sha256=e["sha256"],
                               bytes=e["bytes"], path=local)

    fetched = tuple(fetch(e) for e in chosen)
    by_file = {e.file: e for e in fetched}
    training_ema = None
    if ema_entry is not None:
        training_ema = by_file.get(ema_entry["file"]) or fetch(ema_entry)
    return CheckpointWindow(run_id=run_id, spec=ModelSpec.from_dict(manifest["spec"]), entries=fetched,
                            training_ema=training_ema, steps=tuple(steps))
