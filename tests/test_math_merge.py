"""Tests for lcsc_ops.math.merge: the reference merge and the stacked search engine."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.math.merge import StackedMerger, merge_state_dicts
from lcsc_ops.math.profiles import one_hot, uniform

K = 4
CONSTANT_KEYS = ("1.weight", "1.bias")  # BatchNorm affine: never touched by "training"
_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
             torch.bfloat16: torch.int16, torch.float16: torch.int16}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def checkpoints() -> list[dict[str, torch.Tensor]]:
    """K checkpoints of a tiny model along a random walk; a -0.0 and an int buffer inside."""
    torch.manual_seed(0)
    base = make_model().state_dict()
    gen = torch.Generator().manual_seed(1)
    out, current = [], {k: v.clone() for k, v in base.items()}
    for i in range(K):
        for name, t in current.items():
            if t.is_floating_point() and name not in CONSTANT_KEYS:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
        sd = {k: v.clone() for k, v in current.items()}
        sd["1.running_var"].abs_()
        sd["1.num_batches_tracked"] = torch.tensor(100 * (i + 1))
        out.append(sd)
    # A signed zero must survive a one-hot merge (0 * 0.5 + -0.0 would be +0.0).
    for i, sd in enumerate(out):
        sd["0.weight"][0, 0] = -0.0 if i == 2 else 0.5
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def to_dtype(sd: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}


# --- merge_state_dicts ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reference_one_hot_is_bit_exact(checkpoints, dtype):
    sds = [to_dtype(sd, dtype) for sd in checkpoints]
    for i in range(K):
        merged = merge_state_dicts(sds, one_hot(K, i))
        expected = dict(sds[i], **{"1.num_batches_tracked": sds[-1]["1.num_batches_tracked"]})
        assert_bitwise_equal(merged, expected)
    assert torch.signbit(merge_state_dicts(sds, one_hot(K, 2))["0.weight"][0, 0])


def test_reference_matches_the_formula_and_streams(checkpoints):
    coeffs = [1.7, -0.4, 0.9, -1.2]
    merged = merge_state_dicts(iter(checkpoints), coeffs)  # a one-shot iterator
    for name, t in merged.items():
        if t.is_floating_point():
            expected = sum(c * sd[name].double() for c, sd in zip(coeffs, checkpoints))
            assert t.dtype == torch.float32
            assert torch.allclose(t.double(), expected, atol=1e-6), name
    # Integer buffers come from the LAST checkpoint, whatever the coefficients.
    assert merged["1.num_batches_tracked"].item() == 100 * K
    assert merged["1.num_batches_tracked"].data_ptr() != checkpoints[-1]["1.num_batches_tracked"].data_ptr()


def test_reference_does_not_modify_its_inputs(checkpoints):
    before = [{k: v.clone() for k, v in sd.items()} for sd in checkpoints]
    merge_state_dicts(checkpoints, [0.5, 0.5, -0.5, 0.5])
    for a, b in zip(checkpoints, before):
        assert_bitwise_equal(a, b)


def test_reference_rejects_mismatches(checkpoints):
    missing = dict(checkpoints[1])
    del missing["3.bias"]
    with pytest.raises(ValueError, match="keys"):
        merge_state_dicts([checkpoints[0], missing], [0.5, 0.5])
    extra = dict(checkpoints[1], extra=torch.zeros(1))
    with pytest.raises(ValueError, match="keys"):
        merge_state_dicts([checkpoints[0], extra], [0.5, 0.5])
    reshaped = dict(checkpoints[1], **{"3.bias": torch.zeros(4)})
    with pytest.raises(ValueError):
        merge_state_dicts([checkpoints[0], reshaped], [0.5, 0.5])
    with pytest.raises(ValueError):
        merge_state_dicts([checkpoints[0], to_dtype(checkpoints[1], torch.float16)], [0.5, 0.5])
    with pytest.raises(ValueError):
        merge_state_dicts(checkpoints, [1.0])
    with pytest.raises(ValueError):
        merge_state_dicts(checkpoints[:2], uniform(4))


# --- StackedMerger -------------------------------------------------------------------


def test_stack_excludes_and_counts_constants(checkpoints):
    merger = StackedMerger(checkpoints)
    assert merger.k == K
    assert merger.num_constant == len(CONSTANT_KEYS)
    assert not set(CONSTANT_KEYS) & set(merger.varying_keys)
    assert "1.num_batches_tracked" not in merger.varying_keys
    p = sum(checkpoints[0][name].numel() for name in merger.varying_keys)
    assert merger.num_parameters == p
    assert p == sum(v.numel() for k, v in checkpoints[0].items()
                    if v.is_floating_point() and k not in CONSTANT_KEYS)
    assert merger.nbytes == K * p * 4


def test_stacked_one_hot_is_bit_exact_fp32(checkpoints):
    merger = StackedMerger(checkpoints)
    model = merger.bind(make_model())
    for i in range(K):
        merger.merge(one_hot(K, i))
        expected = dict(checkpoints[i], **{"1.num_batches_tracked": checkpoints[-1]["1.num_batches_tracked"]})
        bound = {k: v.detach() for k, v in model.state_dict().items()}
        for got in (bound, merger.state_dict(one_hot(K, i))):
            assert all(torch.equal(got[k], expected[k]) for k in expected)
            # Bit for bit, except that the matrix-vector product may turn -0.0 into +0.0
            # (0 * x + -0.0 == +0.0); `+ 0.0` makes both sides' zeros positive.
            assert_bitwise_equal({k: v + 0 for k, v in got.items()}, {k: v + 0 for k, v in expected.items()})


def test_stacked_agrees_with_reference(checkpoints):
    merger = StackedMerger(checkpoints)
    enc = AffineEncoding(tuple(uniform(K)), radius=2.0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        coeffs = enc.decode(((torch.rand(K, generator=gen) * 2 - 1) * 2).tolist())
        ref = merge_state_dicts(checkpoints, coeffs)
        got = merger.state_dict(coeffs)
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name].dtype == ref[name].dtype
            assert torch.allclose(got[name], ref[name], atol=1e-5, rtol=1e-5), name


def test_bound_model_forward_matches_a_loaded_model(checkpoints):
    merger = StackedMerger(checkpoints)
    model = merger.bind(make_model()).eval()
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    outputs = []
    for coeffs in ([2.0, -1.5, 0.25, 0.25], uniform(K), one_hot(K, 1)):
        merger.merge(coeffs)
        fresh = make_model().eval()
        fresh.load_state_dict(merge_state_dicts(checkpoints, coeffs))
        with torch.no_grad():
            got, expected = model(x), fresh(x)
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1])  # the weights really changed


def test_merge_reuses_the_flat_buffer(checkpoints):
    merger = StackedMerger(checkpoints)
    model = merger.bind(make_model())
    weight = model[0].weight
    merger.merge(uniform(K))
    ptrs = (merger._flat.data_ptr(), weight.data_ptr())
    first = weight.detach().clone()
    merger.merge([0.1, 0.2, 0.3, 0.4])
    assert (merger._flat.data_ptr(), weight.data_ptr()) == ptrs
    assert model[0].weight is weight and not torch.equal(weight, first)
    # The parameter lives inside the merger's flat buffer.
    start = merger._flat.data_ptr()
    assert start <= weight.data_ptr() < start + merger._flat.numel() * 4


def test_state_dict_leaves_bound_model_alone(checkpoints):
    merger = StackedMerger(checkpoints)
    model = merger.bind(make_model())
    merger.merge(one_hot(K, 0))
    sd = merger.state_dict(uniform(K))
    assert torch.equal(model[0].weight, checkpoints[0]["0.weight"])
    sd["0.weight"].zero_()  # standalone: no storage shared with the merger
    assert torch.equal(model[0].weight, checkpoints[0]["0.weight"])


def test_stacked_rejects_bad_input(checkpoints):
    merger = StackedMerger(checkpoints)
    with pytest.raises(ValueError):
        merger.merge([0.5, 0.5])
    with pytest.raises(ValueError):
        merger.merge([0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError):
        merger.bind(nn.Sequential(nn.Linear(5, 16)))
    bad = dict(checkpoints[1])
    del bad["0.bias"]
    with pytest.raises(ValueError):
        StackedMerger([checkpoints[0], bad])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_stack_keeps_small_differences(dtype):
    """Nearby checkpoints + large coefficients: a plain 16-bit stack would be ~2% off."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(4096, generator=gen)
    sds = [{"w": base + 1e-3 * torch.randn(4096, generator=gen)} for _ in range(K)]
    coeffs = [6.0, -5.0, 2.5, -2.5]
    exact = merge_state_dicts(sds, coeffs)["w"]
    got = StackedMerger(sds, dtype=dtype).state_dict(coeffs)["w"]
    # Within about one rounding of the result to the 16-bit dtype (unit roundoff u) ...
    u = 2.0 ** (-8 if dtype is torch.bfloat16 else -11)
    assert ((got - exact).abs() <= 1.5 * u * exact.abs() + 1e-4).all()
    # ... whereas merging 16-bit checkpoints with 16-bit coefficients directly is not.
    naive = sum(torch.tensor(c, dtype=dtype) * sd["w"].to(dtype) for c, sd in zip(coeffs, sds))
    assert (naive.float() - exact).abs().max() > 4 * (got - exact).abs().max()
    # A one-hot merge gives each checkpoint back to within one 16-bit rounding of the
    # weight plus one of the deviation (|theta_i - ref| < 1e-2 here).
    merger = StackedMerger(sds, dtype=dtype)
    for i in range(K):
        one, x = merger.state_dict(one_hot(K, i))["w"], sds[i]["w"]
        assert ((one - x).abs() <= 1.5 * u * x.abs() + u * 1e-2).all()


def _nearby(n: int = 4096, k: int = K, seed: int = 7) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    return [{"w": base + 1e-3 * torch.randn(n, generator=gen)} for _ in range(k)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_one_hot_is_the_documented_rounding(dtype):
    """One-hot merges give round(ref + round(theta_i - ref)), ref = round(last), as the docstring says."""
    sds = _nearby()
    merger = StackedMerger(sds, dtype=dtype)
    ref = sds[-1]["w"].to(dtype)
    for i in range(K):
        expected = (ref.float() + (sds[i]["w"] - ref.float()).to(dtype).float()).to(dtype)
        assert torch.equal(bits(merger.state_dict(one_hot(K, i))["w"].to(dtype)), bits(expected)), i


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_16bit_groups_of_rows_agree_with_one_product(monkeypatch, rows):
    """On the CPU a 16-bit stack is multiplied in groups of rows; the groups change no one-hot merge
    and keep general merges within one rounding of the exact merge."""
    sds = _nearby()
    whole = StackedMerger(sds, dtype=torch.bfloat16)
    assert len(whole._groups) == 1
    monkeypatch.setattr(StackedMerger, "CPU_16BIT_ROWS", rows)
    grouped = StackedMerger(sds, dtype=torch.bfloat16)
    assert grouped._groups == [(s, min(s + rows, K)) for s in range(0, K, rows)]
    for i in range(K):
        assert torch.equal(bits(grouped.state_dict(one_hot(K, i))["w"].bfloat16()),
                           bits(whole.state_dict(one_hot(K, i))["w"].bfloat16()))
    coeffs = [6.0, -5.0, 2.5, -2.5]
    exact = merge_state_dicts(sds, coeffs)["w"]
    u = 2.0 ** -8
    got = grouped.state_dict(coeffs)["w"]
    assert ((got - exact).abs() <= 1.5 * u * exact.abs() + 1e-4).all()
    # The bound model sees the same merge as state_dict.
    target = nn.Module()
    target.w = nn.Parameter(torch.zeros(4096))
    grouped.bind(target)
    grouped.merge(coeffs)
    assert torch.equal(target.w.detach().float(), got)


def test_16_bit_tensors_accumulate_in_float32_within_one_rounding():
    """bf16 checkpoints are summed in float32 (half the memory of float64 for a large model): the
    result is the float64 merge rounded to bf16, within one bf16 step, and a one-hot merge is exact."""
    gen = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(64, 64, generator=gen).to(torch.bfloat16), "n": torch.tensor(i)} for i in range(4)]
    coeffs = [0.7, -0.4, 0.5, 0.2]
    got = merge_state_dicts(sds, coeffs)["w"]
    exact = sum(c * sd["w"].double() for c, sd in zip(coeffs, sds))
    assert got.dtype is torch.bfloat16
    ulp = exact.abs().clamp_min(1e-30) * 2.0 ** -7
    assert bool(((got.double() - exact).abs() <= ulp).all())
    assert torch.equal(merge_state_dicts(sds, [0.0, 1.0, 0.0, 0.0])["w"], sds[1]["w"])
