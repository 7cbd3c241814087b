"""Streaming merge: Eq. 1 of the LCSC paper computed file by file from memory-mapped safetensors.

``StackedMerger`` holds the whole window as a ``(K, P)`` stack: the fastest merge, but K
model copies of memory. When that does not fit, ``StreamingMerger`` computes the same
``theta = sum_i a_i * theta_i`` straight from the checkpoint files, accumulating into
the bound model's own parameters, so its peak is about two model copies whatever K is.
``make_merger`` picks one of the two from a byte budget.

This is the one math module that reads files: not loading the window is its purpose. It
imports torch and safetensors only, so it runs on a bare GPU box.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from lcsc_ops.math.merge import Layout, StackedMerger, bind_targets, check_layout

__all__ = ["LazyFiles", "StreamingMerger", "make_merger", "stack_nbytes"]


def _path(source: Any) -> str:
    """A checkpoint source: a path, or an object with a ``path`` (e.g. a ``CheckpointEntry``)."""
    return os.fspath(getattr(source, "path", source))


def _read_layout(path: str) -> Layout:
    # get_tensor on a CPU safe_open returns a view of the memory map: shape and dtype come
    # from the header without reading (or paging in) any weights.
    with safe_open(path, framework="pt") as f:
        return {name: (t.shape, t.dtype) for name in f.keys() for t in (f.get_tensor(name),)}


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
    """Merges a window of K safetensors checkpoints file by file into one bound model.

    Same interface as ``StackedMerger`` (``k``, ``bind``, ``merge``, ``state_dict``), but
    holds only the K file paths. ``merge(a)`` opens one file at a time with ``safe_open``
    (memory-mapped) and accumulates ``a_i * theta_i`` tensor by tensor into the bound
    model's parameters, which are the accumulators (float32 or float64). Files are the
    outer loop because a ``safe_open`` handle keeps the pages it touched mapped until it
    closes: one open file at a time keeps the peak at the model plus one mapped file.

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
        started = False
        for path, c in zip(self._paths, coeffs):
            if c == 0.0:
                continue  # not read at all: no 0 * inf = NaN, and a one-hot merge is a copy
            with safe_open(path, framework="pt", device=str(self.device)) as f:
                for name in self._floating:
                    src, dst = f.get_tensor(name), targets[name]
                    if started:
                        dst.add_(src, alpha=c)
                    else:
                        # The first term is copied, not added to zeros (0 + -0.0 is +0.0), and
                        # scaled in the target's dtype, not the file's.
                        dst.copy_(src)
                        if c != 1.0:
                            dst.mul_(c)
                    del src
            started = True

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
