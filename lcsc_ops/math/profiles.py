"""Coefficient profiles over a window of K saved checkpoints.

A profile is a list of K Python floats ``a`` with ``sum(a) == 1`` (Eq. 1 of the LCSC
paper: ``theta = sum_i a_i * theta_i``). Index 0 is the OLDEST checkpoint of the
window, index K-1 the newest. Every function here returns a *quantised* profile, whose
sum is exactly 1.0 in float64 whatever the order of summation (see ``quantise``), so
that two code paths (a Python ``sum``, a torch reduction, a merge kernel) never
disagree about whether a candidate is affine.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = [
    "GRID",
    "quantise",
    "one_hot",
    "uniform",
    "ema_profile",
    "ema_decay_grid",
    "embed",
]

GRID = 2.0 ** -40
"""Every quantised coefficient is an integer multiple of this."""

# A single coefficient must stay below this magnitude (the paper saw values above 6,
# so 2048 leaves a wide margin while keeping the exactness argument below valid).
_MAX_COEFF = 2.0 ** 11
# Integer multiples of 2^-40 are exact in float64 (53-bit significand) as long as their
# magnitude is below 2^(53-40) = 2^13.
_MAX_ABS_SUM = 2.0 ** 13
_SUM_TOL = 1e-6


def quantise(coeffs: Sequence[float]) -> list[float]:
    """Round a coefficient vector onto the 2^-40 grid so that it sums to exactly 1.

    Every coefficient but the last is rounded to the nearest multiple of ``GRID``; the
    last becomes ``1 - sum(others)``. All values are then multiples of 2^-40, and every
    partial sum (in any order, including the pairwise trees torch uses) is bounded by
    the L1 norm, which we require to stay below 2^13: a multiple of 2^-40 below 2^13 in
    magnitude needs at most 53 significant bits, so each addition is exact and the total
    is exactly 1.0. Vectors already on the grid (one-hot, uniform over a power of two)
    come back unchanged. Raises ``ValueError`` if a coefficient is non-finite or has
    magnitude >= 2^11, or if the input does not sum to 1 within 1e-6.
    """
    values = [float(x) for x in coeffs]
    if not values:
        raise ValueError("cannot quantise an empty coefficient vector")
    for x in values:
        if not math.isfinite(x) or abs(x) >= _MAX_COEFF:
            raise ValueError(f"coefficient {x!r} is not finite or has magnitude >= 2**11")
    total = math.fsum(values)
    if abs(total - 1.0) > _SUM_TOL:
        raise ValueError(f"coefficients sum to {total!r}, not 1 (tolerance {_SUM_TOL})")
    # x / GRID and k * GRID only change the exponent, so both are exact; round() picks
    # the nearest grid point. `+ 0.0` turns a rounded -0.0 into +0.0.
    head = [round(x / GRID) * GRID + 0.0 for x in values[:-1]]
    # fsum returns the correctly rounded sum, which is exact here (multiple of 2^-40
    # below 2^13), and 1 - exact is exact for the same reason.
    last = 1.0 - math.fsum(head)
    out = head + [last]
    if math.fsum(abs(x) for x in out) >= _MAX_ABS_SUM:
        raise ValueError("sum of |coefficients| must stay below 2**13 for an exact sum")
    return out


def one_hot(k: int, i: int) -> list[float]:
    """Profile that selects checkpoint ``i`` of ``k`` (negative ``i`` counts from the end).

    ``one_hot(k, -1)`` is the "last checkpoint" baseline.
    """
    _check_k(k)
    if not -k <= i < k:
        raise ValueError(f"index {i} out of range for a window of {k} checkpoints")
    out = [0.0] * k
    out[i % k] = 1.0
    return out


def uniform(k: int) -> list[float]:
    """Uniform average of the ``k`` checkpoints (a Model Soup), quantised."""
    _check_k(k)
    return quantise([1.0 / k] * k)


def ema_profile(k: int, decay: float) -> list[float]:
    """Post-hoc EMA with decay ``g`` recomputed over the ``k`` saved checkpoints, in order.

    The recursion ``e_0 = theta_0``, ``e_i = g * e_{i-1} + (1 - g) * theta_i`` unrolls to
    ``a_0 = g^(K-1)`` and ``a_i = (1 - g) * g^(K-1-i)`` for ``i >= 1`` (the EMA point of
    the LCSC search space, ``a_i ∝ g^(K-1-i)``, with the leftover mass on the oldest
    checkpoint, which seeds the average). ``decay = 0`` is the last checkpoint and
    ``decay = 1`` the first. Note this is an EMA over checkpoints, so its time constant
    is in checkpoint intervals, not training steps.
    """
    _check_k(k)
    g = float(decay)
    if not 0.0 <= g <= 1.0:
        raise ValueError(f"EMA decay must lie in [0, 1], got {decay!r}")
    coeffs = [g ** (k - 1)] + [(1.0 - g) * g ** (k - 1 - i) for i in range(1, k)]
    return quantise(coeffs)


def ema_decay_grid(k: int, n: int = 12) -> list[float]:
    """Decays for the EMA* baseline (a 1-D grid search over the EMA rate), increasing.

    The effective window of an EMA, ``L = 1 / (1 - g)`` checkpoints, goes geometrically
    from 1 to ``2k``: ``L_j = (2k)^(j / (n-1))``, ``g_j = 1 - 1 / L_j``. The first decay
    is therefore exactly 0.0 (the last checkpoint alone); the last, ``1 - 1/(2k)``,
    spreads its weight over the whole window (about 60% of it lands on the oldest
    checkpoint, see ``ema_profile``). A geometric grid spends as many points on short
    windows, where the profile changes fastest, as on long ones.
    """
    _check_k(k)
    if n < 1:
        raise ValueError(f"the decay grid needs at least one point, got n={n}")
    if n == 1:
        return [0.0]
    top = 2.0 * k
    return [1.0 - top ** (-j / (n - 1)) for j in range(n)]


def embed(coeffs: Sequence[float], indices: Sequence[int], size: int) -> list[float]:
    """Place a profile over a subset of basis positions into a length-``size`` vector.

    ``coeffs[j]`` goes to position ``indices[j]``; every other position gets 0. Used to
    express, say, an EMA over the raw checkpoints of a basis that also holds EMA
    snapshots. The result is quantised, so it sums to exactly 1.
    """
    _check_k(size)
    if len(coeffs) != len(indices):
        raise ValueError(f"{len(coeffs)} coefficients for {len(indices)} indices")
    if len(set(indices)) != len(indices):
        raise ValueError("embed indices must be distinct")
    out = [0.0] * size
    for c, i in zip(coeffs, indices):
        if not 0 <= i < size:
            raise ValueError(f"index {i} out of range for a basis of {size}")
        out[i] = float(c)
    return quantise(out)


def _check_k(k: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"a window needs at least one checkpoint, got k={k!r}")
