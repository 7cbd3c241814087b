"""The weights of a ``torch.export`` archive (``.pt2``, MLflow 3's default ``serialization_format``), read
without ``torch.export.load``.

``torch.export.load`` is not safe on an untrusted file: it unpickles (``weights_only=False``) every
weight or constant the archive marks ``use_pickle`` (tensor subclasses), its custom objects and its
sample inputs (``data/sample_inputs/<model>.pt``), and loads any bundled AOTInductor library (checked in
torch 2.13's ``torch/export/pt2_archive/_package.py``; MLflow 3.17 says the same of it and scans an
archive before loading it). The weights alone need none of that: ``<root>/data/weights/<model>_weights_config.json``
maps each state-dict key to a record (``path_name``) and its ``tensor_meta`` (dtype, sizes, strides,
storage offset), and a record with ``use_pickle: false`` is the tensor's raw bytes in the archive's
``byteorder``. Those are read here as plain bytes; a pickled record is refused with one line unless
the user allows pickle, and even then loaded ``weights_only`` first.
"""
from __future__ import annotations

import functools
import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.weightfiles import PICKLE_HINT, first_line, load_torch_file

CONFIG = re.compile(r"([^/]+)/data/weights/([A-Za-z0-9_.-]+)_weights_config\.json")
RECORD = re.compile(r"[A-Za-z0-9_]+")


@functools.cache
def _dtypes() -> Mapping[int, torch.dtype]:
    """The archive's dtype numbers (``torch._export.serde.schema.ScalarType``) -> torch dtypes, from torch's
    own serializer (no public name for it; torch is pinned)."""
    try:
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
    except ImportError:
        raise LcscError(f"this torch ({torch.__version__}) does not say how .pt2 archives number dtypes") from None
    return {int(k): v for k, v in _SERIALIZE_TO_TORCH_DTYPE.items()}


def _ints(values: Any, what: str, name: str) -> list[int]:
    try:
        out = [v["as_int"] for v in values] if isinstance(values, list) else [values["as_int"]]
    except (KeyError, TypeError):
        out = None
    if out is None or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise LcscError(f"{name}: a weight's {what} is not a list of plain sizes (a symbolic shape?)")
    return out


def _raw_tensor(archive: zipfile.ZipFile, record: str, meta: Mapping[str, Any], limit: int, name: str,
                little: bool) -> torch.Tensor:
    """One weight from its raw record: bytes -> flat tensor -> strided view, cloned."""
    dtype = _dtypes().get(meta.get("dtype"))
    if dtype is None:
        raise LcscError(f"{name}: a weight has an unknown dtype {meta.get('dtype')!r}")
    sizes = _ints(meta.get("sizes"), "sizes", name)
    strides = _ints(meta.get("strides"), "strides", name)
    offset = _ints(meta.get("storage_offset"), "storage offset", name)[0]
    if archive.getinfo(record).file_size > limit:  # torch writes records uncompressed: no record outgrows the file
        raise LcscError(f"{name}: record {record} is larger than the archive")
    data = bytearray(archive.read(record))
    flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    if not little and flat.element_size() > 1:
        flat = flat.view(torch.uint8).view(-1, flat.element_size()).flip(1).reshape(-1).view(dtype)
    if len(sizes) != len(strides):
        raise LcscError(f"{name}: a weight's sizes and strides differ in length")
    extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides)) + 1 if all(sizes) else 0
    if extent > flat.numel():
        raise LcscError(f"{name}: record {record} holds {flat.numel()} elements, a weight needs {extent}")
    return torch.as_strided(flat, sizes, strides, offset).clone()


def _pickled_tensor(archive: zipfile.ZipFile, record: str, allow_pickle: bool, name: str, tmp: Path) -> torch.Tensor:
    if not allow_pickle:
        raise LcscError(f"refusing to unpickle {name}: its weight record {record} is pickled (a tensor subclass); "
                        f"pass {PICKLE_HINT} if you trust it")
    local = tmp / "pickled-weight.pt"
    local.write_bytes(archive.read(record))
    got = load_torch_file(local, allow_pickle, name=f"{name}:{record}")
    if not isinstance(got, torch.Tensor):
        raise LcscError(f"{name}: record {record} holds a {type(got).__name__}, not a tensor")
    return got


def load_pt2_weights(path: Path, name: str, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict stored in the ``.pt2`` archive at ``path`` (``name``: as the user knows it), read
    without running anything from it; LcscError (one line) on anything but one exported model's weights."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise LcscError(f"cannot read {name}: not a .pt2 archive ({first_line(exc)})") from None
    with archive:
        configs = [m for n in archive.namelist() if (m := CONFIG.fullmatch(n))]
        if len(configs) != 1:
            raise LcscError(f"cannot read {name}: expected the weights of one exported model, found {len(configs)} "
                            f"weight configs (a legacy or multi-model archive)")
        root = configs[0].group(1)
        order = archive.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in archive.namelist() \
            else "little"
        try:
            config = json.loads(archive.read(configs[0].group(0)))["config"]
        except (ValueError, KeyError, TypeError):
            raise LcscError(f"cannot read {name}: its weights config is not valid JSON") from None
        if not isinstance(config, dict) or order not in ("little", "big"):
            raise LcscError(f"cannot read {name}: its weights config is not a mapping of weights")
        return _read_weights(archive, root, config, path, name, allow_pickle, order == "little")


def _read_weights(archive: zipfile.ZipFile, root: str, config: Mapping[str, Any], path: Path, name: str,
                  allow_pickle: bool, little: bool) -> dict[str, torch.Tensor]:
    limit = path.stat().st_size
    state: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="lcsc-pt2-") as tmp:
        for key, meta in config.items():
            record = meta.get("path_name") if isinstance(meta, dict) else None
            if not (isinstance(key, str) and isinstance(record, str) and RECORD.fullmatch(record)):
                raise LcscError(f"cannot read {name}: weight {key!r} names no plain record")
            record = f"{root}/data/weights/{record}"
            if record not in archive.namelist():
                raise LcscError(f"cannot read {name}: weight {key!r} has no record {record}")
            try:
                if meta.get("use_pickle") is False:
                    state[key] = _raw_tensor(archive, record, meta.get("tensor_meta") or {}, limit, name, little)
                else:
                    state[key] = _pickled_tensor(archive, record, allow_pickle, name, Path(tmp))
            except (RuntimeError, ValueError, zipfile.BadZipFile) as exc:
                raise LcscError(f"cannot read {name}: weight {key!r}: {first_line(exc)}") from None
    if not state:
        raise LcscError(f"{name} holds no weights")
    return state
