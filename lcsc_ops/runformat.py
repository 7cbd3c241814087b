"""The checkpoint-run format, once: artifact names, the manifest, its per-step fragments, their entries,
and the framing of a safetensors file. Standard library only, so the uploader process
(:mod:`lcsc_ops.store.upload_worker`, which imports neither torch nor the package) loads this file
itself and writes exactly what :class:`~lcsc_ops.store.logger.CheckpointLogger` and ``lcsc-ops
import`` write; readers validate it in :func:`lcsc_ops.checkpoints.validate_manifest`.

Layout inside a run's artifacts::

    lcsc/spec.json                          the model spec (factory, kwargs, sampler, data set)
    checkpoints/step00000050-raw.safetensors
    checkpoints/step00000050-ema.safetensors
    checkpoints/manifest.d/step00000050-raw+ema.json   a fragment: the entries of one step (or batch)
    checkpoints/manifest.json               {"format", "spec", "complete", "entries": [...]}

An entry: ``{step, kind, file, sha256, bytes, ...}`` (:func:`manifest_entry`).

A step's files are logged before its fragment, so a reader never sees an entry whose file is missing;
the whole manifest, marked complete, is written once at the end of the run.
"""
from __future__ import annotations

import json
import re
import struct
from typing import Any, Iterable, Mapping

MANIFEST_FORMAT = "lcsc-checkpoints/1"
CHECKPOINT_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
SPEC_ARTIFACT = "lcsc/spec.json"
FRAGMENT_DIR = "manifest.d"  # one small manifest per logged step, so no upload grows with the run
FRAGMENT_PATH = f"{CHECKPOINT_DIR}/{FRAGMENT_DIR}"
FRAGMENT_NAME = re.compile(r"step\d{8}-[a-z+]+\.json")
KINDS = ("raw", "ema")
RUN_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,255}")  # an MLflow run id; a folder name in the cache
SHA256 = re.compile(r"[0-9a-f]{64}")


def fragment_filename(step: int, kinds: str) -> str:
    return f"step{step:08d}-{kinds}.json"


def checkpoint_filename(step: int, kind: str) -> str:
    return f"step{step:08d}-{kind}.safetensors"


def manifest_entry(step: int, kind: str, sha256: str, size: int, extra: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """One checkpoint's entry in a fragment and the manifest: step, kind, file name, sha256, bytes, extra."""
    return {"step": step, "kind": kind, "file": checkpoint_filename(step, kind), "sha256": sha256, "bytes": size,
            **(extra or {})}


def fragment_doc(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A manifest fragment: the entries of the step(s) whose files were just logged."""
    return {"format": MANIFEST_FORMAT, "entries": list(entries)}


def fragment_name_for(entries: list[Mapping[str, Any]]) -> str:
    """The fragment's file name: the first entry's step and the kinds logged with it."""
    first = entries[0]["step"]
    return fragment_filename(first, "+".join(e["kind"] for e in entries if e["step"] == first))


def manifest_doc(spec: Mapping[str, Any], entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole manifest of a finished run (``complete``: every checkpoint of the run is logged)."""
    return {"format": MANIFEST_FORMAT, "spec": dict(spec), "complete": True, "entries": list(entries)}


def manifest_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=1)


def safetensors_prefix(header_text: str) -> bytes:
    """What a safetensors file holds before its data: the header's length (8 bytes, little-endian) and
    the JSON header, padded with spaces to a multiple of 8 bytes."""
    header = header_text.encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header
