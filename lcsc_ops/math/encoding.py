"""The search coordinates: an affine encoding of merge coefficients.

A search (CMA-ES, random, ...) proposes a point ``z`` in a fixed box; ``decode`` turns
it into coefficients ``a`` with ``sum(a) == 1`` exactly. The affine constraint is what
keeps a merge of checkpoints at the scale of the weights: every checkpoint lies near the
same point of weight space, and ``sum_i a_i * theta_i = theta_ref + sum_i a_i *
(theta_i - theta_ref)`` only stays near it when the coefficients sum to 1 (a sum of 1.1
would scale every weight, normalisation statistics included, by 10%).

Coordinates can be shared by blocks of checkpoints (a group moves together), which
cuts the search dimension from K to the number of groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from lcsc_ops.math.profiles import quantise

__all__ = ["AffineEncoding", "partition_by_kind"]

Blocks = tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class AffineEncoding:
    """Maps search coordinates ``z`` (one per block) to affine merge coefficients.

    ``decode(z)`` spreads each block's coordinate evenly over its members, projects the
    deviation onto the sum-zero hyperplane and adds it to ``centre``:
    ``a = centre + (I - 11^T/K) E z``, where ``E[j, g] = 1/|g|`` for ``j`` in group ``g``.
    The names and bounds of the coordinates depend only on the number of blocks and the
    radius, never on the centre, so an Optuna search space is identical across trials
    (a changing space makes CMA-ES fall back to random sampling). One direction of ``z``
    (``z_g`` proportional to ``|g|``) decodes to the centre: the search box has ``dim``
    coordinates but ``dim - 1`` effective degrees of freedom.
    """

    centre: tuple[float, ...]
    radius: float = 0.3
    blocks: Blocks | None = None

    def __post_init__(self) -> None:
        centre = tuple(float(c) for c in self.centre)
        if not centre:
            raise ValueError("the centre needs at least one coefficient")
        total = math.fsum(centre)
        if not all(math.isfinite(c) for c in centre) or abs(total - 1.0) > 1e-9:
            raise ValueError(f"the centre must be finite and sum to 1, it sums to {total!r}")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"the radius must be positive and finite, got {self.radius!r}")
        # Frozen dataclass: normalise fields through object.__setattr__.
        object.__setattr__(self, "centre", tuple(quantise(centre)))
        object.__setattr__(self, "radius", float(self.radius))
        if self.blocks is not None:
            blocks = tuple(tuple(int(i) for i in group) for group in self.blocks)
            _check_partition(blocks, len(centre))
            object.__setattr__(self, "blocks", blocks)

    # --- block helpers ---------------------------------------------------------------

    @staticmethod
    def contiguous_blocks(k: int, b: int) -> Blocks:
        """Partition ``range(k)`` into ``b`` contiguous groups whose sizes differ by <= 1.

        The first ``k % b`` groups get the extra member (the ``numpy.array_split`` rule).
        Neighbouring checkpoints are the most alike, so they are the natural ones to tie.
        """
        if k < 1 or not 1 <= b <= k:
            raise ValueError(f"cannot split {k} checkpoints into {b} non-empty groups")
        return _split(list(range(k)), b)

    # --- search space ----------------------------------------------------------------

    @property
    def k(self) -> int:
        """Number of checkpoints (length of a decoded coefficient vector)."""
        return len(self.centre)

    @property
    def groups(self) -> Blocks:
        """The blocks actually used: ``blocks``, or one singleton per coefficient."""
        if self.blocks is None:
            return tuple((i,) for i in range(self.k))
        return self.blocks

    @property
    def dim(self) -> int:
        """Number of search coordinates (one per group)."""
        return len(self.groups)

    @property
    def names(self) -> list[str]:
        """Coordinate names ``z00, z01, ...`` (three digits from 100 coordinates on)."""
        width = max(2, len(str(self.dim)))
        return [f"z{g:0{width}d}" for g in range(self.dim)]

    @property
    def bounds(self) -> tuple[float, float]:
        """The search box for every coordinate, ``(-radius, radius)``."""
        return (-self.radius, self.radius)

    # --- maps ------------------------------------------------------------------------

    def decode(self, z: Sequence[float]) -> list[float]:
        """Coefficients for search point ``z``: centre + sum-zero projection of the spread ``z``.

        Each member of group ``g`` gets ``z_g / |g|`` (so ``z_g`` is the total weight the
        group gains), the mean deviation is subtracted (projection onto ``sum = 0``) and
        the result added to the centre and quantised. ``decode(zeros) == centre`` exactly,
        and ``sum(decode(z)) == 1.0`` exactly for every ``z``.
        """
        z = [float(v) for v in z]
        if len(z) != self.dim:
            raise ValueError(f"expected {self.dim} coordinates, got {len(z)}")
        if not all(math.isfinite(v) for v in z):
            raise ValueError("search coordinates must be finite")
        dev = [0.0] * self.k
        for zg, group in zip(z, self.groups):
            for j in group:
                dev[j] = zg / len(group)
        mean = math.fsum(dev) / self.k
        # The centre is already on the grid and quantise is idempotent there, so z = 0
        # (or any z that spreads to a constant) comes back as the centre bit for bit.
        return quantise([c + d - mean for c, d in zip(self.centre, dev)])

    def encode(self, coeffs: Sequence[float]) -> list[float]:
        """Search point whose decoding is closest (least squares) to ``coeffs``.

        Solves ``min ||A z - (coeffs - centre)||`` with ``A = (I - 11^T/K) E`` by the
        pseudo-inverse, which also picks the minimum-norm ``z`` along the direction that
        decodes to the centre. Exact (up to float64 rounding) when ``coeffs - centre`` lies
        in the span of the blocks; used to enqueue known points (EMA, uniform, last) as
        trials. The result may lie outside ``bounds``.
        """
        c = [float(v) for v in coeffs]
        if len(c) != self.k:
            raise ValueError(f"expected {self.k} coefficients, got {len(c)}")
        total = math.fsum(c)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"coefficients must sum to 1 to be encoded, they sum to {total!r}")
        target = torch.tensor(c, dtype=torch.float64) - torch.tensor(self.centre, dtype=torch.float64)
        z = torch.linalg.pinv(self._matrix()) @ target
        return [float(v) for v in z]

    def _matrix(self) -> torch.Tensor:
        """The linear part ``A = (I - 11^T/K) E`` of ``decode``, shape (K, dim), float64."""
        expand = torch.zeros(self.k, self.dim, dtype=torch.float64)
        for g, group in enumerate(self.groups):
            expand[list(group), g] = 1.0 / len(group)
        return expand - expand.mean(dim=0, keepdim=True)


def partition_by_kind(kinds: Sequence[str], b_per_kind: int | Mapping[str, int]) -> Blocks:
    """Blocks for a mixed basis: group checkpoints only with others of the same kind.

    ``kinds[i]`` labels checkpoint ``i`` (e.g. ``"raw"`` or ``"ema"``). The positions of
    each kind, in order, are split into contiguous near-equal groups, ``b_per_kind``
    of them (one number for all kinds, or a mapping kind -> number; capped at the number
    of checkpoints of that kind). Kinds are emitted in order of first appearance, so the
    coordinate layout is stable for a given basis.
    """
    order: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        order.setdefault(kind, []).append(i)
    if not order:
        raise ValueError("cannot partition an empty basis")
    blocks: list[tuple[int, ...]] = []
    for kind, members in order.items():
        if isinstance(b_per_kind, Mapping):
            if kind not in b_per_kind:
                raise ValueError(f"no block count given for checkpoint kind {kind!r}")
            b = b_per_kind[kind]
        else:
            b = b_per_kind
        if b < 1:
            raise ValueError(f"block count for kind {kind!r} must be >= 1, got {b}")
        blocks.extend(_split(members, min(b, len(members))))
    return tuple(blocks)


def _split(members: list[int], b: int) -> Blocks:
    size, extra = divmod(len(members), b)
    out, start = [], 0
    for g in range(b):
        stop = start + size + (1 if g < extra else 0)
        out.append(tuple(members[start:stop]))
        start = stop
    return tuple(out)


def _check_partition(blocks: Blocks, k: int) -> None:
    flat = [i for group in blocks for i in group]
    if any(len(group) == 0 for group in blocks):
        raise ValueError("blocks must not be empty")
    if sorted(flat) != list(range(k)):
        raise ValueError(f"blocks must partition range({k}) (each index exactly once)")
