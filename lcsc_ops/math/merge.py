"""Merging checkpoints: ``theta = sum_i a_i * theta_i`` (Eq. 1 of the LCSC paper).

Two implementations of the same map:

* ``merge_state_dicts``: the reference. Streams over state dicts, accumulates in
  float64, returns a fresh state dict. Use it for the final, registered merge.
* ``StackedMerger``: the search engine. Stacks the window once on the evaluation
  device and merges with one matrix-vector product into a flat buffer that a bound
  model's parameters are views of, so a trial allocates nothing and copies no state
  dict.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["merge_state_dicts", "StackedMerger", "load_checkpoint_state", "check_layout", "bind_targets", "Layout"]

Layout = dict[str, tuple[torch.Size, torch.dtype]]
"""State-dict key -> (shape, dtype): what every checkpoint of a window must agree on."""


@torch.no_grad()
def merge_state_dicts(
    state_dicts: Iterable[Mapping[str, Tensor]],
    coeffs: Sequence[float],
    *,
    accumulate_dtype: torch.dtype = torch.float64,
    stats: dict | None = None,
) -> dict[str, Tensor]:
    """Reference merge ``sum_i coeffs[i] * state_dicts[i]`` (Eq. 1 of the LCSC paper).

    Streams over ``state_dicts`` (one checkpoint held at a time, an iterator is fine),
    accumulating floating tensors in ``accumulate_dtype`` (16-bit tensors in float32 at most:
    their result is rounded to 16 bits, and a 1e9-parameter bf16 model's float64 sums would
    take 8 GB) and casting back to their own
    dtype. Non-floating tensors (step counters) cannot be averaged: they come from the
    LAST checkpoint. Zero coefficients add nothing, so a one-hot vector reproduces its
    checkpoint bit for bit (signed zeros included, no ``0 * inf`` NaN). The coefficients
    need not sum to 1. Raises ``ValueError`` on mismatched keys, shapes or dtypes, or a
    wrong number of checkpoints.

    With coefficients summing to 1, a floating tensor bitwise identical in every
    checkpoint (a frozen backbone) is its own merge, so it is taken from the last
    checkpoint rather than accumulated; one found to differ late is caught up by replaying
    the same additions, so the result is unchanged. ``stats`` (a dict) receives
    ``num_constant`` (tensors skipped this way) and ``varying_keys`` (those merged).
    """
    coeffs = [float(c) for c in coeffs]
    running = _RunningMerge(coeffs, accumulate_dtype)
    for i, sd in enumerate(state_dicts):
        if i >= len(coeffs):
            raise ValueError(f"more checkpoints than the {len(coeffs)} coefficients given")
        running.add(sd)
    if running.count != len(coeffs):
        raise ValueError(f"{len(coeffs)} coefficients for {running.count} checkpoints")
    return running.result(stats)


class _RunningMerge:
    """What ``merge_state_dicts`` holds between two checkpoints: the running sums and the constants so far."""

    def __init__(self, coeffs: list[float], accumulate_dtype: torch.dtype) -> None:
        self.coeffs = coeffs
        self.accumulate_dtype = accumulate_dtype
        self.affine = all(math.isfinite(c) for c in coeffs) and abs(math.fsum(coeffs) - 1.0) <= 1e-12
        self.acc: dict[str, Tensor | None] = {}  # floating tensors being summed (None: no term yet)
        self.constant: dict[str, Tensor] = {}  # identical in every checkpoint so far (affine coefficients only)
        self.added: list[float] = []  # the non-zero coefficients applied so far, to replay for a late-varying tensor
        self.layout: Layout = {}
        self.last: Mapping[str, Tensor] = {}
        self.count = 0

    def add(self, sd: Mapping[str, Tensor]) -> None:
        """Take in the next checkpoint: check it, release constants it changes, add its term."""
        if self.count == 0:
            self._start(sd)
        else:
            check_layout(self.layout, sd, f"checkpoint {self.count}")
            for name in [n for n, t in self.constant.items() if not _same_bits(t, sd[n])]:
                self.acc[name] = _replay(self.constant.pop(name), self.added, self._acc_dtype(name))
        c = self.coeffs[self.count]
        if c != 0.0:
            for name, total in self.acc.items():
                term = sd[name].to(self._acc_dtype(name))
                # The first non-zero term starts the sum (no `0 + x`, which would turn
                # -0.0 into +0.0); later terms are added in place.
                self.acc[name] = term * c if total is None else total.add_(term, alpha=c)
            self.added.append(c)
        self.last = sd
        self.count += 1

    def _acc_dtype(self, name: str) -> torch.dtype:
        """``accumulate_dtype``, or float32 if that is wider than a 16-bit tensor needs."""
        if self.layout[name][1].itemsize < 4 and self.accumulate_dtype.itemsize > 4:
            return torch.float32
        return self.accumulate_dtype

    def _start(self, sd: Mapping[str, Tensor]) -> None:
        self.layout = {name: (t.shape, t.dtype) for name, t in sd.items()}
        floating = [name for name, (_, dtype) in self.layout.items() if dtype.is_floating_point]
        if self.affine:
            self.constant = {name: sd[name] for name in floating}
        else:
            self.acc = {name: None for name in floating}

    def result(self, stats: dict | None) -> dict[str, Tensor]:
        """The merged state dict, in each key's dtype; fills ``stats`` if given."""
        out: dict[str, Tensor] = {}
        if stats is not None:
            stats["num_constant"] = len(self.constant)
            stats["varying_keys"] = tuple(name for name in self.layout if name in self.acc)
        for name, (shape, dtype) in self.layout.items():
            if name in self.acc:
                total = self.acc.pop(name)  # each sum released once cast: at most one more tensor at a time
                out[name] = (torch.zeros(shape, dtype=dtype) if total is None else total.to(dtype))
                del total
            else:
                out[name] = self.last[name].detach().clone()  # non-floating, or identical in every checkpoint
        return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (unlike ``torch.equal``, -0.0 differs from +0.0, so a one-hot merge stays exact)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = _BITS[a.element_size()]
    return torch.equal(a.view(view), b.view(view))


def _replay(t: Tensor, added: Sequence[float], accumulate_dtype: torch.dtype) -> Tensor | None:
    """The running sum of ``merge_state_dicts`` for a tensor equal to ``t`` in every checkpoint so far."""
    total, term = None, t.to(accumulate_dtype)
    for c in added:
        total = term * c if total is None else total.add_(term, alpha=c)
    return total


class StackedMerger:
    """Holds a window of K checkpoints as one ``(K, P)`` matrix and merges by ``torch.mv``.

    Floating tensors identical in every checkpoint (``num_constant`` of them) are kept
    aside and copied into a bound model once; the others are flattened into the stack on
    ``device`` in ``dtype``. Non-floating tensors come from the last checkpoint, as in
    ``merge_state_dicts``. ``merge`` requires affine coefficients.

    float32/float64: each row is a checkpoint and ``merge`` computes Eq. 1 directly; a
    one-hot merge of checkpoints stored in that dtype is bit-exact, except that -0.0 may
    come back as +0.0 (``0 * x + -0.0``).

    16-bit dtypes: rounding each checkpoint to 16 bits would lose the small differences
    between neighbours that the search exploits (and large coefficients would amplify the
    rounding), so rows hold deviations ``theta_i - ref`` from ``ref``, the last checkpoint
    rounded to the dtype, and ``merge`` computes ``ref + sum_i a_i (theta_i - ref)``, equal
    to Eq. 1 when ``sum_i a_i = 1``. The result is within about one 16-bit rounding of the
    exact merge; a one-hot merge gives ``round(ref + round(theta_i - ref))``. On the CPU
    torch's 16-bit matrix-vector product slows down sharply past ``CPU_16BIT_ROWS`` rows,
    so the deviation sum is taken over groups of that many rows, then added up
    (benchmarks/RESULTS.md has the figures). bfloat16 is the 16-bit dtype for a CPU.
    """

    CPU_16BIT_ROWS = 32  # rows per 16-bit matrix-vector product on the CPU (see above)

    @torch.no_grad()
    def __init__(
        self,
        state_dicts: Sequence[Mapping[str, Tensor]],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(state_dicts) == 0:
            raise ValueError("StackedMerger needs at least one checkpoint")
        if not dtype.is_floating_point:
            raise ValueError(f"the stack dtype must be floating, got {dtype}")
        self._layout: Layout = {name: (t.shape, t.dtype) for name, t in state_dicts[0].items()}
        # Checkpoints are taken by index, one at a time: a lazy sequence (files loaded on access, see
        # ``make_merger``) then maps one file at a time beside the stack, not the whole window.
        for i in range(1, len(state_dicts)):
            check_layout(self._layout, state_dicts[i], f"checkpoint {i}")
        self.device = torch.device(device)
        self.dtype = dtype
        self._k = len(state_dicts)
        self._split_constants(state_dicts)
        self._fill_stack(state_dicts)
        self._allocate_buffers()
        # The flat buffer starts as the last checkpoint.
        self._merge_into(self._flat, [0.0] * (self._k - 1) + [1.0])

    def _split_constants(self, state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
        """Set ``_constants`` (non-floating, or equal in every checkpoint) and ``_slices`` (the rest)."""
        first, last = state_dicts[0], state_dicts[-1]
        same = {name for name, (_, tdtype) in self._layout.items() if tdtype.is_floating_point}
        for i in range(1, self._k):  # checkpoint by checkpoint, dropping the tensors found to differ
            if not same:
                break
            sd = state_dicts[i]
            same = {name for name in same if torch.equal(first[name], sd[name])}
        # name -> (offset, numel) in the flat buffer, for the varying floating tensors.
        self._slices: dict[str, tuple[int, int]] = {}
        self._constants: dict[str, Tensor] = {}
        offset = 0
        for name, (shape, tdtype) in self._layout.items():
            if not tdtype.is_floating_point:
                self._constants[name] = last[name].detach().to(self.device, copy=True)
            elif name in same:
                self._constants[name] = first[name].detach().to(self.device, copy=True)
            else:
                self._slices[name] = (offset, shape.numel())
                offset += shape.numel()
        self._p = offset
        self.num_constant = sum(
            1 for name in self._constants if self._layout[name][1].is_floating_point
        )

    def _fill_stack(self, state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
        """Build the ``(K, P)`` stack: checkpoints, or (16-bit) deviations from the reference ``_ref``."""
        self._stack = torch.empty(self._k, self._p, dtype=self.dtype, device=self.device)
        self._ref: Tensor | None = None
        if self.dtype.itemsize < 4:
            self._ref = torch.empty(self._p, dtype=self.dtype, device=self.device)
            last = state_dicts[-1]
            for name, (start, n) in self._slices.items():
                self._ref[start:start + n].copy_(last[name].reshape(-1))
        for i in range(self._k):
            sd = state_dicts[i]
            for name, (start, n) in self._slices.items():
                row = sd[name].detach().reshape(-1).to(self.device)
                if self._ref is not None:
                    # Deviation in float32 from the ROUNDED reference, so that
                    # ref + 1 * (theta_i - ref) is as close to theta_i as 16 bits allow.
                    row = row.float() - self._ref[start:start + n].float()
                self._stack[i, start:start + n].copy_(row)

    def _allocate_buffers(self) -> None:
        """The buffers every merge reuses: the flat buffer, the coefficients, the 16-bit partial sums."""
        p, dtype, device = self._p, self.dtype, self.device
        # The flat buffer a bound model's varying tensors are views of.
        self._flat = torch.empty(p, dtype=dtype, device=device)
        self._coeffs = torch.empty(self._k, dtype=dtype, device=device)
        # 16-bit: the deviation sum's buffers (one more for a second group of rows), and the groups.
        rows = self.CPU_16BIT_ROWS if device.type == "cpu" else self._k
        self._groups = [(s, min(s + rows, self._k)) for s in range(0, self._k, rows)]
        self._dev = self._part = None
        if self._ref is not None:
            self._dev = torch.empty(p, dtype=dtype, device=device)
            if len(self._groups) > 1:
                self._part = torch.empty(p, dtype=dtype, device=device)

    @property
    def k(self) -> int:
        """Number of checkpoints in the window."""
        return self._k

    @property
    def num_parameters(self) -> int:
        """P, the number of varying scalars (the width of the stack)."""
        return self._stack.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the ``(K, P)`` stack on the device."""
        return self._stack.numel() * self._stack.element_size()

    @property
    def varying_keys(self) -> tuple[str, ...]:
        """State-dict keys that are stacked (they differ somewhere in the window)."""
        return tuple(self._slices)

    def bind(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s varying tensors views into the merger's flat buffer; return it.

        The model is moved to the merger's device and floating dtype; each varying
        parameter or buffer gets a view of the flat buffer as its ``.data`` (parameters stay
        ``nn.Parameter``, gradients are switched off: this is for inference) and constants
        are copied in once, so after ``merge(c)`` the model computes with the merged
        weights, with no copy. The checkpoints may hold a subset of the model's keys (see
        :func:`bind_targets`); the model's other tensors are left as they are.
        """
        tensors = bind_targets(model, self._layout, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for name, t in tensors.items():
                if name in self._slices:
                    start, n = self._slices[name]
                    t.data = self._flat[start:start + n].view(t.shape)
                else:
                    t.copy_(self._constants[name])
        for param in model.parameters():
            param.requires_grad_(False)
        return model

    def merge(self, coeffs: Sequence[float]) -> None:
        """Write the merge with ``coeffs`` into the flat buffer (and so into bound models).

        One ``torch.mv`` with ``out=`` the flat buffer (16-bit stacks: one per group of
        rows into a reused buffer, then one ``torch.add`` of the reference into the flat
        buffer): no allocation beyond a K-element coefficient tensor. Raises
        ``ValueError`` unless there are K finite coefficients summing to 1 (within 1e-6).
        """
        self._merge_into(self._flat, coeffs)

    def state_dict(self, coeffs: Sequence[float]) -> dict[str, Tensor]:
        """A standalone merged state dict for ``coeffs``, without touching bound models.

        Tensors are new (no storage shared with the merger), on the CPU, in each key's
        original dtype, like the output of ``merge_state_dicts``; precision is that of
        the stack dtype.
        """
        flat = torch.empty_like(self._flat)
        self._merge_into(flat, coeffs)
        out: dict[str, Tensor] = {}
        for name, (shape, dtype) in self._layout.items():
            if name in self._slices:
                start, n = self._slices[name]
                src = flat[start:start + n].view(shape)
            else:
                src = self._constants[name]
            out[name] = src.to("cpu", dtype, copy=True)
        return out

    def _merge_into(self, out: Tensor, coeffs: Sequence[float]) -> None:
        coeffs = [float(c) for c in coeffs]
        if len(coeffs) != self._k:
            raise ValueError(f"expected {self._k} coefficients, got {len(coeffs)}")
        total = math.fsum(coeffs)
        if not all(math.isfinite(c) for c in coeffs) or abs(total - 1.0) > 1e-6:
            raise ValueError(f"merge coefficients must be finite and sum to 1, sum is {total!r}")
        # float64 -> stack dtype on the host, then one small copy to the device.
        self._coeffs.copy_(torch.tensor(coeffs, dtype=torch.float64).to(self.dtype))
        if self._ref is None:
            torch.mv(self._stack.t(), self._coeffs, out=out)
            return
        # ref + sum_i a_i (theta_i - ref). Not one addmv: slower than mv plus an add in 16 bits
        # on the CPU (benchmarks/RESULTS.md), and it cannot be split into groups.
        for n, (start, end) in enumerate(self._groups):
            dst = self._dev if n == 0 else self._part
            torch.mv(self._stack[start:end].t(), self._coeffs[start:end], out=dst)
            if n:
                self._dev.add_(dst)
        torch.add(self._ref, self._dev, out=out)


def load_checkpoint_state(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(state)`` where ``state`` may hold a subset of the model's keys.

    The same rule as :func:`bind_targets`: every key of ``state`` must be the
    model's (``ValueError`` otherwise, before anything is loaded); the model's other
    tensors keep what its factory gave them (the fixed base under adapter checkpoints).
    """
    own = set(model.state_dict())
    unexpected = sorted(set(state) - own)
    if unexpected:
        raise ValueError(f"checkpoint keys not in the model: {unexpected[:5]}")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != own - set(state):
        raise ValueError(f"loading the merged state left keys {sorted(result.missing_keys)[:5]} missing and "
                         f"{sorted(result.unexpected_keys)[:5]} unexpected")
    return model


def check_layout(layout: Layout, sd: Mapping[str, Tensor], what: str) -> None:
    """Raise a one-line ValueError unless ``sd`` has exactly ``layout``'s keys, shapes, dtypes."""
    if set(sd) != set(layout):
        diff = sorted(set(sd) ^ set(layout))
        raise ValueError(f"{what} has different keys from the first checkpoint: {diff[:5]}")
    for name, (shape, dtype) in layout.items():
        t = sd[name]
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{what}: {name!r} is {t.dtype} {tuple(t.shape)}, "
                             f"expected {dtype} {tuple(shape)}")


def bind_targets(model: nn.Module, layout: Layout, *, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """Move ``model`` to ``device`` and ``dtype`` and return its tensors named in ``layout``.

    The merge engines' shared rule for binding: the checkpoints may hold only some of the
    model's keys (adapter checkpoints over a fixed base that the model factory loads), and
    the model's other tensors are not returned, so they keep their values. Returns the
    ``state_dict(keep_vars=True)`` entries (parameters themselves). Raises ``ValueError``
    if a checkpoint key is not in the model or a shape differs.
    """
    model.to(device=device, dtype=dtype)
    tensors = model.state_dict(keep_vars=True)
    unexpected = set(layout) - set(tensors)
    if unexpected:
        raise ValueError(f"checkpoint keys not in the model: {sorted(unexpected)[:5]}")
    tensors = {name: t for name, t in tensors.items() if name in layout}
    for name, t in tensors.items():
        if t.shape != layout[name][0]:
            raise ValueError(f"shape mismatch for {name!r}: model {tuple(t.shape)}, "
                             f"checkpoints {tuple(layout[name][0])}")
    return tensors
