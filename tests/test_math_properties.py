"""Property-based tests (hypothesis) of the merge and of the coefficient encoding.

Tensors come from a drawn seed (cheap), while hypothesis draws what the properties range
over: window sizes, shapes, dtypes, coefficients, permutations, blocks. Example counts are
modest and the runs derandomised, so the file is fast and repeatable.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.math.merge import StackedMerger, merge_state_dicts
from lcsc_ops.math.profiles import GRID, quantise

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None)
FLOATING = (torch.float16, torch.bfloat16, torch.float32)
EPS = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}

coefficient = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False)


@st.composite
def windows(draw, dtypes=(torch.float32, torch.float64), min_k: int = 1, max_k: int = 6):
    """K state dicts with the same layout (floating tensors only; one equal in every checkpoint)."""
    k = draw(st.integers(min_k, max_k))
    shapes = draw(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    base = {f"t{j}": torch.randn(shape, generator=gen) for j, shape in enumerate(shapes)}
    constant = torch.randn(3, generator=gen).to(dtype)
    sds = [{**{name: (t + 0.1 * torch.randn(t.shape, generator=gen)).to(dtype) for name, t in base.items()},
            "constant": constant.clone()} for _ in range(k)]
    return sds


@st.composite
def affine(draw, k: int, low: float = -3.0, high: float = 3.0) -> list[float]:
    """K finite coefficients summing to 1 (the last one takes the rest), on the 2^-40 grid."""
    head = draw(st.lists(st.floats(low, high, allow_nan=False, allow_infinity=False), min_size=k - 1, max_size=k - 1))
    return quantise(head + [1.0 - math.fsum(head)])


def scale(sds, *coeff_vectors) -> float:
    """A bound on the magnitude of any merge below: sum of |coefficients| times the largest weight."""
    biggest = max(t.abs().max().item() for sd in sds for t in sd.values())
    return max(sum(abs(c) for c in cs) for cs in coeff_vectors) * biggest + 1.0


# --- the merge ----------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), sds=windows())
def test_reference_merge_is_linear(data, sds):
    k = len(sds)
    x = data.draw(st.lists(coefficient, min_size=k, max_size=k), label="x")
    y = data.draw(st.lists(coefficient, min_size=k, max_size=k), label="y")
    a, b = data.draw(coefficient, label="a"), data.draw(coefficient, label="b")
    mixed = [a * xi + b * yi for xi, yi in zip(x, y)]
    got = merge_state_dicts(sds, mixed)
    mx, my = merge_state_dicts(sds, x), merge_state_dicts(sds, y)
    dtype = sds[0]["t0"].dtype
    tol = 8 * EPS[dtype] * scale(sds, mixed, [abs(a) * abs(xi) + abs(b) * abs(yi) for xi, yi in zip(x, y)])
    for name in got:
        want = a * mx[name].double() + b * my[name].double()
        assert (got[name].double() - want).abs().max().item() <= tol, name


@SETTINGS
@given(data=st.data(), sds=windows(dtypes=(torch.float32,), min_k=2))
def test_permuting_checkpoints_with_their_coefficients_gives_the_same_merge(data, sds):
    k = len(sds)
    coeffs = data.draw(affine(k), label="coeffs")
    order = data.draw(st.permutations(range(k)), label="order")
    permuted = ([sds[i] for i in order], [coeffs[i] for i in order])
    # The reference accumulates in float64: the same float32 result up to one rounding.
    tol = 4 * EPS[torch.float32] * scale(sds, coeffs)
    ref, ref_p = merge_state_dicts(sds, coeffs), merge_state_dicts(*permuted)
    stacked, stacked_p = StackedMerger(sds).state_dict(coeffs), StackedMerger(permuted[0]).state_dict(permuted[1])
    for name in ref:
        assert torch.allclose(ref[name], ref_p[name], rtol=0, atol=tol), name
        # The stack sums K float32 products in its own order: K roundings.
        assert torch.allclose(stacked[name], stacked_p[name], rtol=0, atol=2 * k * tol), name
    assert torch.equal(ref["constant"], sds[-1]["constant"])  # a constant is its own affine merge


@SETTINGS
@given(data=st.data(), k=st.integers(1, 5), stack_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_merges_keep_each_tensors_dtype(data, k, stack_dtype):
    dtypes = data.draw(st.lists(st.sampled_from(FLOATING), min_size=1, max_size=4), label="dtypes")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    sds = [{**{f"t{j}": torch.randn(3, 2, generator=gen).to(dt) for j, dt in enumerate(dtypes)},
            "steps": torch.tensor(i)} for i in range(k)]
    coeffs = data.draw(affine(k, -2.0, 2.0), label="coeffs")
    for merged in (merge_state_dicts(sds, coeffs), StackedMerger(sds, dtype=stack_dtype).state_dict(coeffs)):
        assert merged.keys() == sds[0].keys()
        for name, t in merged.items():
            assert t.dtype == sds[0][name].dtype and t.shape == sds[0][name].shape, name
        assert merged["steps"].item() == k - 1  # non-floating: the last checkpoint's


# --- the coefficients ---------------------------------------------------------------------------


def _sums(coeffs: list[float]) -> set[float]:
    """The float64 sum of ``coeffs`` in several orders and by several code paths."""
    return {sum(coeffs), sum(reversed(coeffs)), math.fsum(coeffs), sum(sorted(coeffs)),
            torch.tensor(coeffs, dtype=torch.float64).sum().item(),
            torch.tensor(coeffs, dtype=torch.float64).flip(0).cumsum(0)[-1].item()}


@SETTINGS
@given(data=st.data(), k=st.integers(1, 40))
def test_quantised_coefficients_sum_to_exactly_one(data, k):
    head = data.draw(st.lists(st.floats(-50.0, 50.0, allow_nan=False, allow_infinity=False),
                              min_size=k - 1, max_size=k - 1), label="head")
    raw = head + [1.0 - math.fsum(head)]
    q = quantise(raw)
    order = data.draw(st.permutations(range(k)), label="order")
    assert _sums(q) == {1.0} and _sums([q[i] for i in order]) == {1.0}
    assert all((c / GRID).is_integer() for c in q)
    assert all(abs(c - r) <= GRID / 2 for c, r in zip(q[:-1], raw[:-1]))
    assert quantise(q) == q  # idempotent on the grid


@st.composite
def encodings(draw) -> AffineEncoding:
    k = draw(st.integers(1, 12))
    centre = draw(affine(k, -1.0, 1.0))
    radius = draw(st.floats(0.01, 3.0))
    blocks = None
    if draw(st.booleans()):
        blocks = AffineEncoding.contiguous_blocks(k, draw(st.integers(1, k)))
    return AffineEncoding(tuple(centre), radius=radius, blocks=blocks)


@SETTINGS
@given(data=st.data(), enc=encodings())
def test_decoded_coefficients_sum_to_exactly_one(data, enc):
    low, high = enc.bounds
    z = data.draw(st.lists(st.floats(2 * low, 2 * high), min_size=enc.dim, max_size=enc.dim), label="z")
    coeffs = enc.decode(z)
    assert len(coeffs) == enc.k and _sums(coeffs) == {1.0}
    assert enc.decode([0.0] * enc.dim) == list(enc.centre)


@st.composite
def encodable(draw, enc: AffineEncoding) -> list[float]:
    """A point of the encodable set: on the 2^-40 grid, minus the centre in the span of the blocks.

    ``x_j = centre_j + w_g`` for ``j`` in group ``g``, with ``w_g`` multiples of the grid and
    ``sum_g |g| w_g = 0`` exactly: each move adds ``t |h|`` grid steps to one group and
    takes ``t |g|`` from another.
    """
    groups = enc.groups
    steps = [0] * len(groups)
    if len(groups) > 1:
        for _ in range(draw(st.integers(1, 4))):
            g, h = draw(st.lists(st.integers(0, len(groups) - 1), min_size=2, max_size=2, unique=True))
            t = draw(st.integers(-(2**37), 2**37))
            steps[g] += t * len(groups[h])
            steps[h] -= t * len(groups[g])
    x = list(enc.centre)
    for n, group in zip(steps, groups):
        for j in group:
            x[j] += n * GRID
    return x


@SETTINGS
@given(data=st.data(), enc=encodings())
def test_decode_inverts_encode_on_the_encodable_set(data, enc):
    x = data.draw(encodable(enc), label="x")
    assert quantise(x) == x
    assert enc.decode(enc.encode(x)) == x


@SETTINGS
@given(data=st.data(), enc=encodings())
def test_decode_nearly_inverts_encode_on_decoded_points(data, enc):
    """A decoded point is quantised, so it may lie off the span by grid steps: encode projects it back."""
    low, high = enc.bounds
    z = data.draw(st.lists(st.floats(2 * low, 2 * high), min_size=enc.dim, max_size=enc.dim), label="z")
    x = enc.decode(z)
    again = enc.decode(enc.encode(x))
    assert _sums(again) == {1.0}
    assert all(abs(a - b) <= enc.k ** 2 * GRID for a, b in zip(again, x))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_encode_refuses_non_affine_coefficients(k):
    enc = AffineEncoding(tuple([1.0 / k] * (k - 1) + [1.0 - (k - 1) / k]))
    with pytest.raises(ValueError):
        enc.encode([1.0 / k + 1e-3] * k)
