"""Tests for lcsc_ops.math.encoding: exact affine decoding, fixed search space, inverse."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lcsc_ops.math.encoding import AffineEncoding, partition_by_kind
from lcsc_ops.math.profiles import ema_profile, one_hot, uniform


def exact_sum_orders(c: list[float]) -> list[float]:
    return [
        sum(c),
        sum(reversed(c)),
        math.fsum(c),
        sum(sorted(c)),
        torch.tensor(c, dtype=torch.float64).sum().item(),
        torch.tensor(c, dtype=torch.float64).flip(0).sum().item(),
    ]


def random_centre(k: int, gen: torch.Generator) -> tuple[float, ...]:
    x = torch.randn(k, dtype=torch.float64, generator=gen) * 0.5
    return tuple((x - x.mean() + 1.0 / k).tolist())


def test_decode_sums_to_exactly_one_for_many_random_points():
    gen = torch.Generator().manual_seed(0)
    radii = [0.01, 0.1, 0.3, 1.0, 5.0]
    n = 0
    for k in (2, 5, 17, 64):
        for blocked in (False, True):
            for r in radii:
                blocks = AffineEncoding.contiguous_blocks(k, max(1, k // 3)) if blocked else None
                enc = AffineEncoding(random_centre(k, gen), radius=r, blocks=blocks)
                zs = (torch.rand(50, enc.dim, dtype=torch.float64, generator=gen) * 2 - 1) * r
                for z in zs.tolist():
                    c = enc.decode(z)
                    assert len(c) == k
                    assert exact_sum_orders(c) == [1.0] * 6
                    n += 1
    assert n == 2000


@pytest.mark.parametrize("blocks", [None, ((0, 1), (2,), (3, 4, 5))])
def test_centre_decodes_to_the_centre_exactly(blocks):
    centre = tuple(ema_profile(6, 0.8))
    enc = AffineEncoding(centre, blocks=blocks)
    assert enc.centre == centre  # already quantised, stored unchanged
    assert enc.decode([0.0] * enc.dim) == list(centre)
    # The one null direction (z_g proportional to |g|) also decodes to the centre.
    assert enc.decode([0.1 * len(g) for g in enc.groups]) == list(centre)


def test_decode_projects_onto_the_sum_zero_hyperplane():
    enc = AffineEncoding(tuple(uniform(4)), radius=1.0)
    z = [0.4, -0.2, 0.0, 0.2]
    mean = sum(z) / 4
    expected = [0.25 + v - mean for v in z]
    assert enc.decode(z) == pytest.approx(expected, abs=1e-11)
    # A group coordinate is spread evenly over its members.
    enc2 = AffineEncoding(tuple(uniform(4)), radius=1.0, blocks=((0, 1), (2, 3)))
    c = enc2.decode([0.2, 0.0])
    assert c == pytest.approx([0.3, 0.3, 0.2, 0.2], abs=1e-11)


def test_centre_is_quantised_and_validated():
    enc = AffineEncoding((1 / 3, 1 / 3, 1 / 3))
    assert enc.centre == tuple(uniform(3))
    assert sum(enc.centre) == 1.0
    with pytest.raises(ValueError):
        AffineEncoding((0.5, 0.5 + 1e-8))
    with pytest.raises(ValueError):
        AffineEncoding((0.5, 0.5), radius=0.0)
    with pytest.raises(ValueError):
        AffineEncoding((0.5, 0.5), radius=float("inf"))
    with pytest.raises(ValueError):
        AffineEncoding((0.5, 0.5), blocks=((0,), (0, 1)))
    with pytest.raises(ValueError):
        AffineEncoding((0.5, 0.5), blocks=((0,),))
    with pytest.raises(ValueError):
        AffineEncoding((0.5, 0.5), blocks=((0,), (), (1,)))


def test_encoding_is_frozen_and_hashable():
    enc = AffineEncoding(tuple(uniform(4)), blocks=[[0, 1], [2, 3]])
    assert enc.blocks == ((0, 1), (2, 3))
    assert hash(enc) == hash(AffineEncoding(tuple(uniform(4)), blocks=((0, 1), (2, 3))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        enc.radius = 1.0


def test_names_and_bounds_do_not_depend_on_the_centre():
    a = AffineEncoding(tuple(uniform(8)), radius=0.5)
    b = AffineEncoding(tuple(one_hot(8, 3)), radius=0.5)
    assert a.names == b.names == [f"z0{i}" for i in range(8)]
    assert a.bounds == b.bounds == (-0.5, 0.5)
    assert a.dim == 8
    blocked = AffineEncoding(tuple(uniform(8)), blocks=AffineEncoding.contiguous_blocks(8, 3))
    assert blocked.dim == 3 and blocked.names == ["z00", "z01", "z02"]


def test_names_switch_to_three_digits_at_100():
    assert AffineEncoding(tuple(uniform(99))).names[-1] == "z98"
    names = AffineEncoding(tuple(one_hot(100, 0))).names
    assert names[0] == "z000" and names[-1] == "z099" and len(set(names)) == 100


def test_contiguous_blocks():
    assert AffineEncoding.contiguous_blocks(7, 3) == ((0, 1, 2), (3, 4), (5, 6))
    assert AffineEncoding.contiguous_blocks(4, 4) == ((0,), (1,), (2,), (3,))
    blocks = AffineEncoding.contiguous_blocks(64, 5)
    sizes = [len(g) for g in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert [i for g in blocks for i in g] == list(range(64))
    with pytest.raises(ValueError):
        AffineEncoding.contiguous_blocks(3, 4)
    with pytest.raises(ValueError):
        AffineEncoding.contiguous_blocks(3, 0)


def test_partition_by_kind_never_mixes_kinds():
    kinds = ["raw", "ema"] * 6  # interleaved basis
    blocks = partition_by_kind(kinds, 2)
    assert blocks == ((0, 2, 4), (6, 8, 10), (1, 3, 5), (7, 9, 11))
    for group in blocks:
        assert len({kinds[i] for i in group}) == 1
    assert len(partition_by_kind(kinds, {"raw": 3, "ema": 1})) == 4
    assert len(partition_by_kind(["raw", "raw", "ema"], 5)) == 3  # capped per kind
    enc = AffineEncoding(tuple(uniform(12)), blocks=blocks)
    assert enc.dim == 4
    with pytest.raises(ValueError):
        partition_by_kind(kinds, {"raw": 2})
    with pytest.raises(ValueError):
        partition_by_kind(kinds, 0)


@pytest.mark.parametrize("blocks", [None, ((0, 1), (2, 3, 4), (5,))])
def test_encode_inverts_decode_on_the_span(blocks):
    gen = torch.Generator().manual_seed(3)
    enc = AffineEncoding(random_centre(6, gen), radius=0.3, blocks=blocks)
    assert enc.encode(list(enc.centre)) == pytest.approx([0.0] * enc.dim, abs=1e-9)
    for _ in range(20):
        z = ((torch.rand(enc.dim, generator=gen, dtype=torch.float64) * 2 - 1) * 0.3).tolist()
        c = enc.decode(z)
        assert enc.decode(enc.encode(c)) == pytest.approx(c, abs=1e-10)


def test_encode_is_least_squares_off_the_span():
    enc = AffineEncoding(tuple(uniform(4)), blocks=((0, 1), (2, 3)))
    target = one_hot(4, 3)  # not reachable: blocks tie 2 and 3 together
    got = enc.decode(enc.encode(target))
    assert got == pytest.approx([0.0, 0.0, 0.5, 0.5], abs=1e-10)
    with pytest.raises(ValueError):
        enc.encode([0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError):
        enc.encode([1.0])


def test_decode_rejects_wrong_length_and_nan():
    enc = AffineEncoding(tuple(uniform(4)))
    with pytest.raises(ValueError):
        enc.decode([0.0] * 3)
    with pytest.raises(ValueError):
        enc.decode([0.0, 0.0, float("nan"), 0.0])
