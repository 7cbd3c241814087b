"""A model spec's state layout and its checkpoints', compared without allocating either.

A run's spec and files are untrusted: a spec with blown-up kwargs would allocate far more
than its checkpoints hold, and a checkpoint with one tensor of another shape would fail deep
inside a merge. Both are found here first: the spec's model is built on the meta device (no
memory), the checkpoints' layouts come from their safetensors headers (no tensor read).
"""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, brief_repr

# name -> (shape, dtype name as safetensors writes it: "F32", "BF16", ...)
Layout = dict[str, tuple[tuple[int, ...], str]]

_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_NAMES = {torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16",
          torch.float16: "F16", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
# A model's state, counted in its checkpoints' dtypes, may exceed its largest checkpoint by this
# much (a few buffers a checkpoint leaves out); beyond it the spec is refused before allocating.
SIZE_MARGIN = 0.10
SIZE_SLACK = 1 << 20


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"464 B"``, ``"5.0 MiB"``, ``"363.8 TiB"``."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def spec_layout(spec: ModelSpec) -> tuple[Layout, dict[str, int]] | None:
    """The layout of the spec's model and the element count of each of its tensors (tied ones
    once), built on the meta device; None if the factory cannot build there (e.g. it loads
    weights from a file)."""
    try:
        with torch.device("meta"):
            model = spec.build()
    except LcscError:
        raise
    except Exception:  # noqa: BLE001 - a factory that needs real tensors; the caller says so
        return None
    layout: Layout = {}
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        layout[name] = (tuple(t.shape), _NAMES.get(t.dtype, str(t.dtype)))
        if id(t) not in seen:
            seen.add(id(t))
            counts[name] = t.numel()
    return layout, counts


def state_bytes(model: Layout, counts: Mapping[str, int], stored: Mapping[str, int] | None = None,
                only: Collection[str] | None = None) -> int:
    """The bytes of the model's state (of the tensors in ``only``, if given), each tensor at its
    own dtype or at the item size a checkpoint stores it with (``stored``: name -> bytes)."""
    def itemsize(name: str) -> int:
        if stored is not None and name in stored:
            return stored[name]
        return _ITEMSIZE.get(model[name][1], 4)

    return sum(n * itemsize(name) for name, n in counts.items() if only is None or name in only)


def itemsizes(layout: Layout) -> dict[str, int]:
    """name -> bytes per element of a checkpoint's layout."""
    return {name: _ITEMSIZE.get(dtype, 4) for name, (_, dtype) in layout.items()}


def file_layout(path: Path, label: str) -> Layout:
    """A safetensors file's tensor names, shapes and dtypes, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out: Layout = {}
            for key in f.keys():
                s = f.get_slice(key)
                out[key] = (tuple(s.get_shape()), s.get_dtype())
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise LcscError(f"{label} is not a readable safetensors file: {str(exc).splitlines()[0] if str(exc) else exc}"
                        ) from None


def check_model_size(model_bytes: int, stored_bytes: int, checkpoint_bytes: int, what: str) -> None:
    """LcscError (one line, both sizes) if the model's state, counted at the checkpoints' dtypes
    (``stored_bytes``), exceeds the largest checkpoint (``checkpoint_bytes``) by more than
    :data:`SIZE_MARGIN` and :data:`SIZE_SLACK`; ``model_bytes`` is what building it allocates."""
    if stored_bytes > checkpoint_bytes * (1 + SIZE_MARGIN) + SIZE_SLACK:
        raise LcscError(f"{what} builds a model of {human_bytes(model_bytes)}, but its largest checkpoint holds "
                        f"{human_bytes(checkpoint_bytes)}: refused before allocating it (the spec's kwargs do not "
                        "match the checkpoints)")


def check_file_layout(label: str, found: Layout, model: Layout | None, first: tuple[str, Layout] | None) -> None:
    """LcscError (one line naming ``label`` and the tensor) unless ``found`` has the model's shapes
    for keys the model has (a subset of them: adapter checkpoints), and the first file's keys
    and dtypes."""
    if model is not None:
        for key, (shape, _) in found.items():
            if key not in model:
                raise LcscError(f"{label}: tensor {brief_repr(key)} is not in the model built from the spec")
            if shape != model[key][0]:
                raise LcscError(f"{label}: tensor {brief_repr(key)} has shape {shape}, the model spec's is "
                                f"{model[key][0]}")
    if first is not None:
        first_label, first_layout = first
        diff = sorted(set(found) ^ set(first_layout))
        if diff:
            raise LcscError(f"{label}: tensor {brief_repr(diff[0])} is in only one of it and {first_label}")
        for key, (shape, dtype) in found.items():
            if (shape, dtype) != first_layout[key]:
                raise LcscError(f"{label}: tensor {brief_repr(key)} is {dtype} {shape}, in {first_label} it is "
                                f"{first_layout[key][1]} {first_layout[key][0]}")


def check_checkpoints(spec: ModelSpec, files: Sequence[tuple[str, Path, int]], what: str, where: str = "") -> bool:
    """Check checkpoint files ``(name, path, bytes)`` against ``spec`` before any allocation: the
    model's size (:func:`check_model_size`, ``what`` names the spec), then every file's layout
    (:func:`check_file_layout`; ``where`` prefixes the first file's name in an error). Returns
    False when the factory cannot build on the meta device (the files are only compared with
    each other then)."""
    layouts = [(name, file_layout(path, where + name)) for name, path, _ in files]
    built = spec_layout(spec)
    model = None
    if built is not None:
        model, counts = built
        stored = itemsizes(layouts[0][1]) if layouts else None
        check_model_size(state_bytes(model, counts), state_bytes(model, counts, stored),
                         max((b for _, _, b in files), default=0), what)
    first = None
    for name, lay in layouts:
        check_file_layout(where + name, lay, model, first)
        first = first or (name, lay)
    return built is not None
