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

__all__ = ["merge_state_dicts", "StackedMerger", "load_checkpoint_state"]


@torch.no_grad()
def merge_state_dicts(
    state_dicts: Iterable[Mapping[str, Tensor]],
    coeffs: Sequence[float],
    *,
    accumulate_dtype: torch.dtype = torch.float64,
    stats: dict | None = None,
) -> dict[str, Tensor]:
    """Reference merge ``sum_i coeffs[i] * state_dicts[i]`` (Eq. 1 of the LCSC paper).

    Streams over ``state_dicts`` (an iterator that loads one checkpoint at a time is
    fine: only the running sum and the current state dict are held). Floating tensors
    are accumulated in ``accumulate_dtype`` and cast back to their own dtype; other
    tensors (integer buffers such as step counters) cannot be averaged and are taken
    from the LAST checkpoint of the iterable, the one a user would otherwise deploy.
    Checkpoints with a zero coefficient are checked but not added, so a one-hot vector
    reproduces its checkpoint bit for bit (signed zeros included, and without the NaN
    that ``0 * inf`` would give). The coefficients need not sum to 1 here. Raises
    ``ValueError`` on mismatched keys, shapes or dtypes, or a wrong number of
    checkpoints.

    When the coefficients sum to 1, a floating tensor bitwise identical in every
    checkpoint (a frozen backbone, a LoRA base) is its own merge by Eq. 1, so it is not
    accumulated but taken from the last checkpoint: exact, and no float64 copy of it is
    held. It is detected while streaming; a tensor found to differ late is caught up by
    replaying the same additions, so every other tensor comes out bit for bit as before.
    Pass a dict as ``stats`` to receive ``num_constant`` (tensors skipped this way) and
    ``varying_keys`` (the floating tensors actually merged).
    """
    coeffs = [float(c) for c in coeffs]
    affine = all(math.isfinite(c) for c in coeffs) and abs(math.fsum(coeffs) - 1.0) <= 1e-12
    acc: dict[str, Tensor | None] = {}
    constant: dict[str, Tensor] = {}  # identical in every checkpoint so far (affine coefficients only)
    added: list[float] = []  # the non-zero coefficients applied so far, to replay for a late-varying tensor
    layout: dict[str, tuple[torch.Size, torch.dtype]] = {}
    last: Mapping[str, Tensor] = {}
    count = 0
    for i, sd in enumerate(state_dicts):
        if i >= len(coeffs):
            raise ValueError(f"more checkpoints than the {len(coeffs)} coefficients given")
        if i == 0:
            layout = {name: (t.shape, t.dtype) for name, t in sd.items()}
            floating = [name for name, (_, dtype) in layout.items() if dtype.is_floating_point]
            if affine:
                constant = {name: sd[name] for name in floating}
            else:
                acc = {name: None for name in floating}
        else:
            _check_layout(layout, sd, f"checkpoint {i}")
            for name in [n for n, t in constant.items() if not _same_bits(t, sd[n])]:
                acc[name] = _replay(constant.pop(name), added, accumulate_dtype)
        c = coeffs[i]
        if c != 0.0:
            for name in acc:
                term = sd[name].to(accumulate_dtype)
                # The first non-zero term starts the sum (no `0 + x`, which would turn
                # -0.0 into +0.0); later terms are added in place.
                acc[name] = term * c if acc[name] is None else acc[name].add_(term, alpha=c)
            added.append(c)
        last = sd
        count += 1
    if count != len(coeffs):
        raise ValueError(f"{len(coeffs)} coefficients for {count} checkpoints")
    out: dict[str, Tensor] = {}
    for name, (shape, dtype) in layout.items():
        if name in acc:
            total = acc[name]
            out[name] = (torch.zeros(shape, dtype=dtype) if total is None else total.to(dtype))
        else:
            out[name] = last[name].detach().clone()  # non-floating, or identical in every checkpoint
    if stats is not None:
        stats["num_constant"] = len(constant)
        stats["varying_keys"] = tuple(name for name in layout if name in acc)
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

    Floating tensors identical in every checkpoint ("constant", ``num_constant`` of
    them) are kept aside and copied into a bound model once; the others ("varying") are
    flattened into the stack on ``device`` in ``dtype``. Non-floating tensors come from
    the last checkpoint, as in ``merge_state_dicts``.

    In float32/float64 each stack row is a checkpoint and ``merge`` computes Eq. 1
    directly: a one-hot merge of checkpoints stored in that dtype is bit-exact, except
    that a -0.0 may come back as +0.0 (``0 * x + -0.0``). In 16-bit dtypes a checkpoint
    rounded to bf16 (8 significant bits) would lose the small differences between
    neighbouring checkpoints that the search exploits, and coefficients like 6 and -5
    would amplify that rounding; so the stack holds deviations ``theta_i - ref`` from a
    reference (the last checkpoint rounded to the dtype) and ``merge`` computes
    ``ref + sum_i a_i (theta_i - ref)``, which equals Eq. 1 because ``sum_i a_i = 1``:
    the deviation sum is rounded to the dtype (once per group of rows, see below), then
    added to ``ref`` and rounded once more. Deviations are small next to the weights, so
    the result is within about one 16-bit rounding of the exact merge, one-hot merges
    included (they give ``round(ref + round(theta_i - ref))``, not ``theta_i``). Either
    way ``merge`` requires affine coefficients.

    On the CPU, torch's 16-bit matrix-vector product is compute-bound and slows down
    sharply past 32 rows (measured with torch 2.13 on a shared 2-core Xeon with
    AVX512-BF16: a bf16 stack of 7.3M parameters read at 12-14 GB/s for K <= 32, 6 GB/s
    at K = 33..48 and 3-4 GB/s at K = 64, where float32 read at 15-30 GB/s depending on
    the machine's other load; benchmarks/RESULTS.md has the current figures), so there
    the deviation sum is computed over groups of at most ``CPU_16BIT_ROWS`` rows and the
    groups are added. On such a CPU a bf16 stack saves memory more than time. float16
    was slower than float32 there (K = 32); bfloat16 is the 16-bit dtype to use on a CPU.
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
        first, last = state_dicts[0], state_dicts[-1]
        self._layout = {name: (t.shape, t.dtype) for name, t in first.items()}
        for i, sd in enumerate(state_dicts[1:], start=1):
            _check_layout(self._layout, sd, f"checkpoint {i}")
        self.device = torch.device(device)
        self.dtype = dtype
        self._k = len(state_dicts)

        # name -> (offset, numel) in the flat buffer, for the varying floating tensors.
        self._slices: dict[str, tuple[int, int]] = {}
        self._constants: dict[str, Tensor] = {}
        offset = 0
        for name, (shape, tdtype) in self._layout.items():
            if not tdtype.is_floating_point:
                self._constants[name] = last[name].detach().to(self.device, copy=True)
            elif all(torch.equal(first[name], sd[name]) for sd in state_dicts[1:]):
                self._constants[name] = first[name].detach().to(self.device, copy=True)
            else:
                self._slices[name] = (offset, shape.numel())
                offset += shape.numel()
        self.num_constant = sum(
            1 for name in self._constants if self._layout[name][1].is_floating_point
        )

        p = offset
        self._stack = torch.empty(self._k, p, dtype=dtype, device=self.device)
        self._ref: Tensor | None = None
        if dtype.itemsize < 4:
            self._ref = torch.empty(p, dtype=dtype, device=self.device)
            for name, (start, n) in self._slices.items():
                self._ref[start:start + n].copy_(last[name].reshape(-1))
        for i, sd in enumerate(state_dicts):
            for name, (start, n) in self._slices.items():
                row = sd[name].detach().reshape(-1).to(self.device)
                if self._ref is not None:
                    # Deviation in float32 from the ROUNDED reference, so that
                    # ref + 1 * (theta_i - ref) is as close to theta_i as 16 bits allow.
                    row = row.float() - self._ref[start:start + n].float()
                self._stack[i, start:start + n].copy_(row)
        # The flat buffer a bound model's varying tensors are views of, and the coefficient
        # buffer; both are reused by every merge. It starts as the last checkpoint.
        self._flat = torch.empty(p, dtype=dtype, device=self.device)
        self._coeffs = torch.empty(self._k, dtype=dtype, device=self.device)
        # 16-bit: the deviation sum's buffers (one more for a second group of rows), and the groups.
        rows = self.CPU_16BIT_ROWS if self.device.type == "cpu" else self._k
        self._groups = [(s, min(s + rows, self._k)) for s in range(0, self._k, rows)]
        self._dev = self._part = None
        if self._ref is not None:
            self._dev = torch.empty(p, dtype=dtype, device=self.device)
            if len(self._groups) > 1:
                self._part = torch.empty(p, dtype=dtype, device=self.device)
        self._merge_into(self._flat, [0.0] * (self._k - 1) + [1.0])

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

        The model is first moved to the merger's device and floating dtype; then each
        varying parameter or buffer has its ``.data`` replaced by a view of the flat
        buffer (parameters stay ``nn.Parameter``; gradients are switched off, as this is
        for inference), and constants are copied in once. After ``merge(c)`` the model
        computes with the merged weights, with no copy.

        The checkpoints may hold only some of the model's keys (adapter checkpoints over a
        fixed base the model factory loads): the model's other tensors are left as they
        are. Raises ``ValueError`` if a checkpoint key is not in the model or a shape
        differs.
        """
        model.to(device=self.device, dtype=self.dtype)
        tensors = model.state_dict(keep_vars=True)
        unexpected = set(self._layout) - set(tensors)
        if unexpected:
            raise ValueError(f"checkpoint keys not in the model: {sorted(unexpected)[:5]}")
        tensors = {name: t for name, t in tensors.items() if name in self._layout}
        for name, t in tensors.items():
            if t.shape != self._layout[name][0]:
                raise ValueError(f"shape mismatch for {name!r}: model {tuple(t.shape)}, "
                                 f"checkpoints {tuple(self._layout[name][0])}")
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
        # ref + sum_i a_i (theta_i - ref). Not one addmv: in 16 bits on the CPU it took 1.8x
        # as long as mv followed by an add (torch 2.13), and it cannot be split into groups.
        for n, (start, end) in enumerate(self._groups):
            dst = self._dev if n == 0 else self._part
            torch.mv(self._stack[start:end].t(), self._coeffs[start:end], out=dst)
            if n:
                self._dev.add_(dst)
        torch.add(self._ref, self._dev, out=out)


def load_checkpoint_state(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """``model.load_state_dict(state)`` where ``state`` may hold a subset of the model's keys.

    The same rule as :meth:`StackedMerger.bind`: every key of ``state`` must be the
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


def _check_layout(
    layout: Mapping[str, tuple[torch.Size, torch.dtype]], sd: Mapping[str, Tensor], what: str
) -> None:
    """Raise a one-line ValueError unless ``sd`` has exactly ``layout``'s keys, shapes, dtypes."""
    if set(sd) != set(layout):
        diff = sorted(set(sd) ^ set(layout))
        raise ValueError(f"{what} has different keys from the first checkpoint: {diff[:5]}")
    for name, (shape, dtype) in layout.items():
        t = sd[name]
        if t.shape != shape or t.dtype != dtype:
            raise ValueError(f"{what}: {name!r} is {t.dtype} {tuple(t.shape)}, "
                             f"expected {dtype} {tuple(shape)}")
