"""Checkpoint files and the window an optimization works on: plain data, no tracking library.

Layout inside a training run's artifacts (names and documents: :mod:`lcsc_ops.runformat`)::

    lcsc/spec.json                          the model spec (factory, kwargs, sampler, data set)
    checkpoints/step00000050-raw.safetensors
    checkpoints/step00000050-ema.safetensors
    checkpoints/manifest.json               {"format", "spec", "entries": [{step, kind, file, sha256, bytes, ...}]}

Step, kind and spec also live in each file's safetensors metadata, so a renamed file still
says what it is.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from lcsc_ops.errors import LcscError
# The run format's names and documents live in lcsc_ops.runformat (the uploader process reads it too).
from lcsc_ops.runformat import (CHECKPOINT_DIR, FRAGMENT_DIR, FRAGMENT_NAME, KINDS, MANIFEST_FORMAT,  # noqa: F401
                                MANIFEST_NAME, RUN_ID, SHA256, SPEC_ARTIFACT, checkpoint_filename, fragment_filename,
                                safetensors_prefix)
from lcsc_ops.spec import ModelSpec, brief_repr


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_metadata(step: int, kind: str, spec: ModelSpec | str,
                        extra: Mapping[str, str] | None) -> dict[str, str]:
    """A checkpoint file's safetensors metadata: format, step, kind, spec JSON and ``extra``."""
    return {"lcsc.format": MANIFEST_FORMAT, "lcsc.step": str(step), "lcsc.kind": kind,
            "lcsc.spec": spec if isinstance(spec, str) else spec.to_json(), **(extra or {})}


def write_checkpoint(path: Path, state: Mapping[str, torch.Tensor], *, step: int, kind: str,
                     spec: ModelSpec | str, extra: Mapping[str, str] | None = None) -> None:
    """Write a state dict as safetensors with step, kind and spec (or its JSON) in the metadata
    (atomic rename). The same state and metadata give the same bytes (safetensors' own writer
    orders the metadata differently in every process): a file converted again hashes the same."""
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().contiguous() for k, v in state.items()}
    metadata = checkpoint_metadata(step, kind, spec, extra)
    layout = safetensors_layout(state)
    if layout is None:  # safetensors refuses tensors that share memory; a clone() never does
        save_file(state, str(tmp), metadata=metadata)
    else:
        with open(tmp, "wb") as f:
            f.write(safetensors_prefix(layout.header_text(metadata)))
            for name in layout.names:
                f.write(state[name].cpu().reshape(-1).view(torch.uint8).numpy())
    os.replace(tmp, path)


# safetensors' dtype names, in the rank its writer orders tensors by (highest first, then by name)
_DTYPES = {torch.int64: ("I64", 13), torch.float64: ("F64", 12), torch.float32: ("F32", 11),
           torch.int32: ("I32", 9), torch.bfloat16: ("BF16", 8), torch.float16: ("F16", 7), torch.int16: ("I16", 5),
           torch.int8: ("I8", 2), torch.uint8: ("U8", 1), torch.bool: ("BOOL", 0)}


@dataclass(frozen=True)
class SafetensorsLayout:
    """Where each tensor of a state sits in a safetensors file's data section."""

    names: tuple[str, ...]  # in safetensors' order
    spans: tuple[tuple[int, int], ...]  # [begin, end) of each, in bytes
    tensors_json: str  # the header's tensor entries, between its braces

    @property
    def nbytes(self) -> int:
        return self.spans[-1][1] if self.spans else 0

    def header_text(self, metadata: Mapping[str, str]) -> str:
        """The file's JSON header, not padded: the file is the header's length (8 bytes,
        little-endian), the header padded with spaces to a multiple of 8 bytes, then the data."""
        parts = [self.tensors_json] if self.tensors_json else []
        if metadata:
            parts.insert(0, '"__metadata__":' + json.dumps(dict(sorted(metadata.items())), separators=(",", ":"),
                                                          ensure_ascii=False))
        return "{" + ",".join(parts) + "}"

    def header_around(self, metadata: Mapping[str, str], key: str) -> tuple[str, str]:
        """The header's text before and after the value of ``metadata[key]``: a header for another
        value ``v`` (one JSON needs no escapes for, such as a step number) is ``before + v + after``."""
        marker = uuid.uuid4().hex
        text = self.header_text({**metadata, key: marker})
        if text.count(marker) != 1:  # pragma: no cover - a 128-bit random marker
            raise RuntimeError("header marker collision")
        before, after = text.split(marker)
        return before, after


def safetensors_layout(state: Mapping[str, torch.Tensor]) -> SafetensorsLayout | None:
    """The layout ``safetensors.torch.save`` gives ``state`` (the checkpoint logger writes small
    snapshots with it, without safetensors' per-tensor work); None for a dtype not handled here
    or tensors sharing memory (which safetensors refuses)."""
    tensors = list(state.values())
    if any(t.dtype not in _DTYPES for t in tensors):
        return None
    if len({t.untyped_storage().data_ptr() for t in tensors if t.numel()}) < sum(t.numel() > 0 for t in tensors):
        return None
    names, spans, entries, offset = [], [], [], 0
    for name, t in sorted(state.items(), key=lambda kv: (-_DTYPES[kv[1].dtype][1], kv[0])):
        end = offset + t.numel() * t.element_size()
        names.append(name)
        spans.append((offset, end))
        entries.append(json.dumps(name, ensure_ascii=False) + ":" + json.dumps(
            {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, end]},
            separators=(",", ":")))
        offset = end
    return SafetensorsLayout(tuple(names), tuple(spans), ",".join(entries))


@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    kind: str
    file: str
    sha256: str
    bytes: int
    path: Path  # verified local copy
    source: str = ""  # where in the run it came from (artifact path; default: checkpoints/<file>)
    source_sha256: str = ""  # that artifact's sha256 (a foreign file converted here: not the file's)

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
    complete: bool = True  # False: the run has no end marker (still training, or it died)
    layout: str = "lcsc"  # the reader that found it (lcsc_ops.store.sources): "lcsc", "lightning", ...

    def indices(self, *kinds: str) -> list[int]:
        """Positions of the entries of the given kinds (all kinds when none are given)."""
        return [i for i, e in enumerate(self.entries) if not kinds or e.kind in kinds]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LCSC_OPS_CACHE", Path.home() / ".cache" / "lcsc-ops"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_run_id(run_id: Any) -> str:
    """``run_id`` if it looks like an MLflow run id (letters, digits, ``_``, ``-``): it becomes a
    folder name in the checkpoint cache, so nothing like ``..`` or ``/`` may pass."""
    if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        raise LcscError(f"not an MLflow run id: {brief_repr(run_id)} (expected letters, digits, '_' or '-')")
    return run_id


def validate_manifest(manifest: Any, run_id: str) -> list[dict]:
    """The entries of a run's ``checkpoints/manifest.json``, every field checked before anything
    is written: the manifest is whatever the store holds, and each ``file`` becomes a path in
    the local cache. ``file`` must be exactly the name the logger writes
    (:func:`checkpoint_filename`), ``step`` and ``bytes`` non-negative ints, ``kind`` one of
    :data:`KINDS`, ``sha256`` 64 lowercase hex digits, and ``spec`` a valid model spec.
    LcscError names the run and the entry."""
    validate_run_id(run_id)
    if not isinstance(manifest, dict):
        raise LcscError(f"run {run_id}: manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT or not manifest.get("entries"):
        raise LcscError(f"run {run_id} has no checkpoints listed in its manifest")
    try:
        ModelSpec.from_dict(manifest.get("spec"))
    except LcscError as exc:
        raise LcscError(f"run {run_id}: manifest spec: {exc}") from None
    entries = manifest["entries"]
    if not isinstance(entries, list):
        raise LcscError(f"run {run_id}: manifest entries must be a list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        where = f"run {run_id}: manifest entry {i}"
        if not isinstance(e, dict):
            raise LcscError(f"{where} must be a JSON object, got {type(e).__name__}")
        for key in ("step", "kind", "file", "sha256", "bytes"):
            if key not in e:
                raise LcscError(f"{where} lacks {key!r}")
        step, kind, name = e["step"], e["kind"], e["file"]
        if not (_is_int(step) and step >= 0):
            raise LcscError(f"{where}: step must be a non-negative integer, got {brief_repr(step)}")
        if kind not in KINDS:
            raise LcscError(f"{where}: kind must be one of {', '.join(KINDS)}, got {brief_repr(kind)}")
        if name != checkpoint_filename(step, kind):
            raise LcscError(f"{where}: file {brief_repr(name)} is not the checkpoint name "
                            f"{checkpoint_filename(step, kind)!r} of step {step} ({kind})")
        if not (isinstance(e["sha256"], str) and SHA256.fullmatch(e["sha256"])):
            raise LcscError(f"{where} ({name}): sha256 must be 64 lowercase hex digits, got {brief_repr(e['sha256'])}")
        if not (_is_int(e["bytes"]) and e["bytes"] >= 0):
            raise LcscError(f"{where} ({name}): bytes must be a non-negative integer, got {brief_repr(e['bytes'])}")
    return list(entries)


DEFAULT_WINDOW = 16


def select_window(entries: list[dict], window: int | None, end_step: int | None = None
                  ) -> tuple[list[dict], dict | None, list[int]]:
    """The last ``window`` checkpoint steps (at or before ``end_step``): every entry at those
    steps, raw by step, then EMA by step. ``None``: the last :data:`DEFAULT_WINDOW`, or all
    there are if fewer. A window asked for that is longer than the steps there are is an
    LcscError naming how many there are (it would silently merge fewer checkpoints)."""
    if window is not None and window < 1:
        raise LcscError(f"--window must be >= 1, got {window}")
    if end_step is not None:
        entries = [e for e in entries if e["step"] <= end_step]
        if not entries:
            raise LcscError(f"no checkpoints at or before step {end_step}")
    raw_steps = sorted({e["step"] for e in entries if e["kind"] == "raw"})
    available = raw_steps or sorted({e["step"] for e in entries})
    window = min(DEFAULT_WINDOW, len(available)) if window is None else window
    if window > len(available):
        where = f" at or before step {end_step}" if end_step is not None else ""
        raise LcscError(f"--window {window}: the run has {len(available)} checkpoint steps{where} "
                        f"({available[0]}..{available[-1]}); use --window {len(available)} or less")
    steps = available[-window:]
    chosen = sorted((e for e in entries if e["step"] in set(steps)),
                    key=lambda e: (KINDS.index(e["kind"]) if e["kind"] in KINDS else len(KINDS), e["step"]))
    emas = sorted((e for e in entries if e["kind"] == "ema" and e["step"] <= steps[-1]), key=lambda e: e["step"])
    return chosen, (emas[-1] if emas else None), steps


