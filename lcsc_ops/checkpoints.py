"""Checkpoint files and the window an optimization works on: plain data, no tracking library.

Layout inside a training run's artifacts::

    lcsc/spec.json                          the model spec (factory, kwargs, sampler, data set)
    checkpoints/step00000050-raw.safetensors
    checkpoints/step00000050-ema.safetensors
    checkpoints/manifest.json               {"format", "spec", "entries": [{step, kind, file, sha256, bytes, ...}]}

Step, kind and spec also live in each file's safetensors metadata, so a renamed file still
says what it is.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

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


def select_window(entries: list[dict], window: int, end_step: int | None = None
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


