"""Tests for lcsc_ops.math.profiles: exact sums, EMA profiles, decay grid, embedding."""
from __future__ import annotations

import math

import pytest
import torch

from lcsc_ops.math.profiles import (
    GRID,
    ema_decay_grid,
    ema_profile,
    embed,
    one_hot,
    quantise,
    uniform,
)


def assert_exactly_affine(c: list[float]) -> None:
    """The sum is 1.0 exactly in every summation order we can think of."""
    assert sum(c) == 1.0
    assert sum(reversed(c)) == 1.0
    assert math.fsum(c) == 1.0
    assert sum(sorted(c)) == 1.0
    assert sum(sorted(c, key=abs, reverse=True)) == 1.0
    assert torch.tensor(c, dtype=torch.float64).sum().item() == 1.0
    assert torch.tensor(c, dtype=torch.float64).flip(0).cumsum(0)[-1].item() == 1.0


def random_affine(k: int, scale: float, gen: torch.Generator) -> list[float]:
    x = torch.randn(k, dtype=torch.float64, generator=gen) * scale
    return (x - x.mean() + 1.0 / k).tolist()


def test_quantise_sums_to_exactly_one_in_any_order():
    gen = torch.Generator().manual_seed(0)
    for trial in range(500):
        k = [2, 3, 5, 17, 64, 200][trial % 6]
        # Up to |a_i| ~ 300 and a sum of |a_i| up to ~5000 (the limit is 2^13).
        scale = [1e-3, 0.1, 1.0, 10.0, 30.0, 100.0][(trial // 6) % 6]
        scale = min(scale, 30.0) if k > 64 else scale
        raw = random_affine(k, scale, gen)
        # Naive float sums of the raw vector are usually NOT exactly 1 ...
        q = quantise(raw)
        # ... but the quantised one is, and it stays close to the input.
        assert_exactly_affine(q)
        assert all(abs(a - b) <= k * GRID + 1e-12 * scale for a, b in zip(q, raw))
        assert all((v / GRID).is_integer() for v in q)


def test_quantise_is_idempotent_and_keeps_grid_vectors():
    gen = torch.Generator().manual_seed(1)
    q = quantise(random_affine(9, 2.0, gen))
    assert quantise(q) == q
    assert quantise([0.0, 0.0, 1.0, 0.0]) == [0.0, 0.0, 1.0, 0.0]
    assert quantise([0.25] * 4) == [0.25] * 4
    assert quantise([-2.0, 3.0]) == [-2.0, 3.0]


@pytest.mark.parametrize(
    "bad",
    [[float("nan"), 1.0], [float("inf"), -float("inf")], [2048.0, -2047.0], [0.5, 0.6], []],
)
def test_quantise_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        quantise(bad)


def test_quantise_rejects_an_l1_norm_that_breaks_exactness():
    # Each |a_i| < 2^11, but partial sums could reach 2^13, where 2^-40 steps stop being exact.
    with pytest.raises(ValueError, match="2\\*\\*13"):
        quantise([2000.0] * 3 + [-2000.0] * 2 + [-1999.0])


def test_quantise_accepts_large_but_allowed_coefficients():
    q = quantise([2047.5, -2046.5])
    assert q == [2047.5, -2046.5]
    assert_exactly_affine(q)


def test_one_hot():
    assert one_hot(4, 2) == [0.0, 0.0, 1.0, 0.0]
    assert one_hot(4, -1) == [0.0, 0.0, 0.0, 1.0]
    assert one_hot(1, 0) == [1.0]
    for bad in (4, -5):
        with pytest.raises(ValueError):
            one_hot(4, bad)
    with pytest.raises(ValueError):
        one_hot(0, 0)


def test_uniform():
    assert uniform(8) == [0.125] * 8  # power of two: exact and unchanged
    u = uniform(3)
    assert_exactly_affine(u)
    assert all(abs(v - 1 / 3) < 1e-11 for v in u)


@pytest.mark.parametrize("k", [1, 2, 5, 17, 64])
def test_ema_profile_limits(k):
    assert ema_profile(k, 0.0) == one_hot(k, k - 1)
    assert ema_profile(k, 1.0) == one_hot(k, 0)
    for g in (0.1, 0.5, 0.9, 0.999):
        assert_exactly_affine(ema_profile(k, g))


def test_ema_profile_is_geometric_and_matches_the_recursion():
    k, g = 7, 0.7
    a = ema_profile(k, g)
    assert a[0] == pytest.approx(g ** (k - 1), abs=1e-11)
    for i in range(2, k):
        assert a[i - 1] / a[i] == pytest.approx(g, rel=1e-9)
    # Run e_0 = theta_0, e_i = g e_{i-1} + (1-g) theta_i on the basis vectors theta_i = e_i.
    basis = torch.eye(k, dtype=torch.float64)
    e = basis[0].clone()
    for i in range(1, k):
        e = g * e + (1 - g) * basis[i]
    assert torch.allclose(torch.tensor(a, dtype=torch.float64), e, atol=1e-11)
    with pytest.raises(ValueError):
        ema_profile(k, 1.5)


@pytest.mark.parametrize("k,n", [(8, 12), (32, 5), (1, 3), (64, 12)])
def test_ema_decay_grid(k, n):
    grid = ema_decay_grid(k, n)
    assert len(grid) == n
    assert grid[0] == 0.0
    assert all(a < b for a, b in zip(grid, grid[1:]))
    lengths = [1 / (1 - g) for g in grid]
    assert lengths[-1] == pytest.approx(2 * k)
    ratios = [b / a for a, b in zip(lengths, lengths[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric spacing
    assert ema_decay_grid(k, 1) == [0.0]


def test_embed():
    out = embed([0.25, 0.75], [3, 1], 5)
    assert out == [0.0, 0.75, 0.0, 0.25, 0.0]
    third = embed(uniform(3), [0, 2, 4], 6)
    assert_exactly_affine(third)
    assert third[1] == third[3] == third[5] == 0.0
    with pytest.raises(ValueError):
        embed([0.5, 0.5], [1, 1], 3)
    with pytest.raises(ValueError):
        embed([0.5, 0.5], [1, 3], 3)
    with pytest.raises(ValueError):
        embed([1.0], [0, 1], 3)
