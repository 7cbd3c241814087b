"""Streaming merge: Eq. 1 of the LCSC paper computed slice by slice from the safetensors files.

``StackedMerger`` holds the whole window as a ``(K, P)`` stack: the fastest merge, but K
model copies of memory. When that does not fit, ``StreamingMerger`` computes the same
``theta = sum_i a_i * theta_i`` straight from the checkpoint files, accumulating into
the bound model's own parameters, so its peak is about one model copy whatever K is.
``make_merger`` picks one of the two from a byte budget.

This is the one math module that reads files: not loading the window is its purpose. It
imports torch and safetensors only, so it runs on a bare GPU box.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from lcsc_ops.math.merge import Layout, StackedMerger, bind_targets, check_layout

__all__ = ["LazyFiles", "StreamingMerger", "make_merger", "stack_nbytes"]

# Elements of one tensor slice read from every file and merged while in cache: 1 Mi elements
# (4 MiB of float32 accumulator) on the CPU, larger on an accelerator, where each copy has a fixed cost.
SLICE_ELEMENTS = 1 << 20
SLICE_ELEMENTS_DEVICE = 1 << 24


def _path(source: Any) -> str:
    """A checkpoint source: a path, or an object with a ``path`` (e.g. a ``CheckpointEntry``)."""
    return os.fspath(getattr(source, "path", source))


def _read_layout(path: str) -> Layout:
    # get_tensor on a CPU safe_open returns a view of the memory map: shape and dtype come
    # from the header without reading (or paging in) any weights.
    with safe_open(path, framework="pt") as f:
        return {name: (t.shape, t.dtype) for name in f.keys() for t in (f.get_tensor(name),)}


def _data_offsets(path: str, layout: Layout) -> dict[str, int]:
    """Each tensor's byte offset in the file, from its header; checked against ``layout`` (which
    ``safe_open`` read and validated) so a read below never leaves the tensor it is meant for."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, (shape, dtype) in layout.items():
        begin, end = header[name]["data_offsets"]
        if end - begin != shape.numel() * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, not {shape.numel() * dtype.itemsize}")
        out[name] = 8 + n + begin
    return out


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (plain reads: no mapping stays resident)."""
    while view:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise ValueError(f"checkpoint file ended early at byte {offset}")
        view, offset = view[got:], offset + got


def _affine(coeffs: Sequence[float], k: int) -> list[float]:
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) != k:
        raise ValueError(f"expected {k} coefficients, got {len(coeffs)}")
    total = math.fsum(coeffs)
    if not all(math.isfinite(c) for c in coeffs) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"merge coefficients must be finite and sum to 1, sum is {total!r}")
    return coeffs


def stack_nbytes(sources: Sequence[Any], dtype: torch.dtype = torch.float32) -> int:
    """Bytes a ``StackedMerger`` of ``sources`` would hold: K x (floating scalars) x itemsize.

    Read from the first file's header only (no weights are loaded). An upper bound: the
    stack leaves out tensors that are equal in every checkpoint.
    """
    if not sources:
        raise ValueError("no checkpoints given")
    layout = _read_layout(_path(sources[0]))
    floating = sum(shape.numel() for shape, dt in layout.values() if dt.is_floating_point)
    return len(sources) * floating * dtype.itemsize


class StreamingMerger:
    """Merges a window of K safetensors checkpoints, read from the files, into one bound model.

    Same interface as ``StackedMerger`` (``k``, ``bind``, ``merge``, ``state_dict``), but
    holds only the K file paths. ``merge(a)`` accumulates ``a_i * theta_i`` into the bound
    model's parameters, which are the accumulators (float32 or float64), one slice of one
    tensor at a time: the slice is read from every file with plain ``pread`` calls into a
    small reused buffer and added while it is still in the CPU's cache. So a merge reads each
    file once, writes the model once, and maps nothing (mapped pages would stay resident and
    a 1e9-parameter window would not fit beside its model; benchmarks/RESULTS.md, "Model size").

    Exact like ``merge_state_dicts``: zero-coefficient checkpoints are not read and the
    first non-zero term is copied, so a one-hot merge reproduces its checkpoint bit for
    bit when it is stored in the merger's dtype. Non-floating tensors come from the last
    checkpoint. Constant tensors are merged like the others (finding them would read every
    file). Each merge reads all K files: the fallback when the stack does not fit.
    """

    def __init__(self, sources: Sequence[Any], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if len(sources) == 0:
            raise ValueError("StreamingMerger needs at least one checkpoint")
        if dtype not in (torch.float32, torch.float64):
            # The bound model's parameters are the accumulators: 16 bits would round every partial sum.
            raise ValueError(f"streaming merges accumulate in the model's dtype: use float32 or float64, got {dtype}")
        self._paths = [_path(s) for s in sources]
        self._layout = _read_layout(self._paths[0])
        for i, path in enumerate(self._paths[1:], start=1):
            with safe_open(path, framework="pt") as f:
                check_layout(self._layout, {n: f.get_tensor(n) for n in f.keys()}, f"checkpoint {i}")
        self.device = torch.device(device)
        self.dtype = dtype
        self._floating = [n for n, (_, dt) in self._layout.items() if dt.is_floating_point]
        self._offsets = [_data_offsets(p, {n: self._layout[n] for n in self._floating}) for p in self._paths]
        self._targets: dict[str, Tensor] | None = None

    @property
    def k(self) -> int:
        """Number of checkpoints in the window."""
        return len(self._paths)

    @property
    def num_parameters(self) -> int:
        """Floating scalars merged per checkpoint."""
        return sum(self._layout[n][0].numel() for n in self._floating)

    @property
    def nbytes(self) -> int:
        """Bytes held by the merger itself between merges: none (the weights live in the files)."""
        return 0

    def bind(self, model: nn.Module) -> nn.Module:
        """Make ``model`` the target of every later ``merge``; return it, set to the last checkpoint.

        The model is moved to the merger's device and dtype, gradients are switched off
        (this is for inference) and the checkpoints' tensors are loaded from the last one,
        as a ``StackedMerger`` starts. The checkpoints may hold a subset of the model's keys
        (see :func:`~lcsc_ops.math.merge.bind_targets`); the model's other tensors are left
        as they are. One model is bound at a time: binding another replaces it.
        """
        tensors = bind_targets(model, self._layout, device=self.device, dtype=self.dtype)
        for param in model.parameters():
            param.requires_grad_(False)
        self._targets = {name: t.detach() for name, t in tensors.items()}
        self._copy_last(self._targets, non_floating_only=False)
        return model

    def merge(self, coeffs: Sequence[float]) -> None:
        """Write the merge with ``coeffs`` into the bound model's tensors, one file at a time.

        Raises ``ValueError`` unless there are K finite coefficients summing to 1 (within
        1e-6), ``RuntimeError`` if no model is bound.
        """
        if self._targets is None:
            raise RuntimeError("StreamingMerger.merge needs a bound model: call bind(model) first")
        self._merge_into(self._targets, coeffs)

    def state_dict(self, coeffs: Sequence[float]) -> dict[str, Tensor]:
        """A standalone merged state dict for ``coeffs``, without touching the bound model.

        New CPU tensors in each key's original dtype (one extra model copy), accumulated
        in the merger's dtype, like ``StackedMerger.state_dict``.
        """
        out = {n: torch.empty(self._layout[n][0], dtype=self.dtype, device=self.device) for n in self._floating}
        self._merge_into(out, coeffs)
        self._copy_last(out, non_floating_only=True)
        return {name: out[name].to("cpu", dtype, copy=True) for name, (_, dtype) in self._layout.items()}

    @torch.no_grad()
    def _merge_into(self, targets: dict[str, Tensor], coeffs: Sequence[float]) -> None:
        coeffs = _affine(coeffs, self.k)
        used = [(i, c) for i, c in enumerate(coeffs) if c != 0.0]  # zeros are not read: no 0 * inf = NaN
        chunk = SLICE_ELEMENTS if self.device.type == "cpu" else SLICE_ELEMENTS_DEVICE
        widest = max(self._layout[n][1].itemsize for n in self._floating) if self._floating else 1
        buf = torch.empty(chunk * widest, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        view = memoryview(buf.numpy())
        fds = {i: os.open(self._paths[i], os.O_RDONLY) for i, _ in used}
        try:
            for name in self._floating:
                shape, dtype = self._layout[name]
                dst = targets[name]
                flat = dst.view(-1) if dst.is_contiguous() else None
                out = flat if flat is not None else torch.empty(shape.numel(), dtype=dst.dtype, device=dst.device)
                size = dtype.itemsize
                for a in range(0, shape.numel(), chunk):
                    b = min(shape.numel(), a + chunk)
                    part = out[a:b]
                    for j, (i, c) in enumerate(used):
                        _read_into(fds[i], view[: (b - a) * size], self._offsets[i][name] + a * size)
                        src = buf[: (b - a) * size].view(dtype)
                        if self.device.type != "cpu":
                            src = src.to(self.device, non_blocking=False)
                        if j:
                            part.add_(src, alpha=c)
                        else:
                            # The first term is copied, not added to zeros (0 + -0.0 is +0.0), and
                            # scaled in the target's dtype, not the file's.
                            part.copy_(src)
                            if c != 1.0:
                                part.mul_(c)
                if flat is None:
                    dst.copy_(out.view(shape))
        finally:
            for fd in fds.values():
                os.close(fd)

    @torch.no_grad()
    def _copy_last(self, targets: dict[str, Tensor], *, non_floating_only: bool) -> None:
        with safe_open(self._paths[-1], framework="pt", device=str(self.device)) as f:
            for name, (shape, dtype) in self._layout.items():
                if dtype.is_floating_point and non_floating_only:
                    continue
                if name not in targets:
                    targets[name] = torch.empty(shape, dtype=dtype, device=self.device)
                targets[name].copy_(f.get_tensor(name))


def make_merger(sources: Sequence[Any], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                max_stack_bytes: int | None = None) -> StackedMerger | StreamingMerger:
    """The merge engine for a window of safetensors checkpoints (paths or objects with ``.path``).

    A ``StackedMerger`` when the stack fits ``max_stack_bytes`` (or no limit is given),
    else a ``StreamingMerger`` over the same files. The stack size is read from a file
    header (:func:`stack_nbytes`), so choosing streaming never loads the window. The stack
    is built from one memory-mapped file at a time (:class:`LazyFiles`), so while it is
    built the resident set holds the stack and at most three files' pages (first, last,
    current), not the whole window's.
    """
    if max_stack_bytes is not None:
        if max_stack_bytes <= 0:
            raise ValueError(f"max_stack_bytes must be positive, got {max_stack_bytes}")
        if stack_nbytes(sources, dtype) > max_stack_bytes:
            return StreamingMerger(sources, device=device, dtype=dtype)
    return StackedMerger(LazyFiles([_path(s) for s in sources]), device=device, dtype=dtype)


class LazyFiles(Sequence):
    """Safetensors files as a sequence of state dicts, each loaded (zero-copy, memory-mapped) when
    indexed and unmapped once its tensors are dropped: what ``StackedMerger`` reads one at a time."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i):  # noqa: ANN001 - an int (a slice is not needed)
        return load_file(self._paths[i])
