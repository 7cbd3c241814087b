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

__all__ = ["merge_state_dicts", "StackedMerger"]


@torch.no_grad()
def merge_state_dicts(
    state_dicts: Iterable[Mapping[str, Tensor]],
    coeffs: Sequence[float],
    *,
    accumulate_dtype: torch.dtype = torch.float64,
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
    """
    coeffs = [float(c) for c in coeffs]
    acc: dict[str, Tensor | None] = {}
    layout: dict[str, tuple[torch.Size, torch.dtype]] = {}
    last: Mapping[str, Tensor] = {}
    count = 0
    for i, sd in enumerate(state_dicts):
        if i >= len(coeffs):
            raise ValueError(f"more checkpoints than the {len(coeffs)} coefficients given")
        if i == 0:
            layout = {name: (t.shape, t.dtype) for name, t in sd.items()}
            acc = {name: None for name, (_, dtype) in layout.items() if dtype.is_floating_point}
        else:
            _check_layout(layout, sd, f"checkpoint {i}")
        c = coeffs[i]
        if c != 0.0:
            for name in acc:
                term = sd[name].to(accumulate_dtype)
                # The first non-zero term starts the sum (no `0 + x`, which would turn
                # -0.0 into +0.0); later terms are added in place.
                acc[name] = term * c if acc[name] is None else acc[name].add_(term, alpha=c)
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
            out[name] = last[name].detach().clone()
    return out


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
    ``ref + sum_i a_i (theta_i - ref)``, which equals Eq. 1 because ``sum_i a_i = 1``.
    The result is then within about one 16-bit rounding of the exact merge. Either way
    ``merge`` requires affine coefficients.
    """

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
        computes with the merged weights, with no copy. Raises ``ValueError`` if the
        model's state-dict keys or shapes differ from the checkpoints'.
        """
        model.to(device=self.device, dtype=self.dtype)
        tensors = model.state_dict(keep_vars=True)
        missing = set(self._layout) ^ set(tensors)
        if missing:
            raise ValueError(f"model and checkpoints disagree on keys: {sorted(missing)[:5]}")
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

        One ``torch.mv`` (``torch.addmv`` for 16-bit stacks) with ``out=`` the flat
        buffer: no allocation beyond a K-element coefficient tensor. Raises
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
        if self._ref is not None:
            torch.addmv(self._ref, self._stack.t(), self._coeffs, out=out)
        else:
            torch.mv(self._stack.t(), self._coeffs, out=out)


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
