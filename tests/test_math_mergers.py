"""The merger contract: one suite that every merge engine passes, on full and on partial checkpoints.

Engines: ``StackedMerger`` in float32, ``StackedMerger`` in bfloat16 (its deviation stack,
compared within bf16 rounding) and ``StreamingMerger``, each built by ``make_merger`` from
checkpoint files as the pipeline writes them. Windows: full checkpoints (every key of the
model) and partial ones (a subset of the keys, as adapter checkpoints; the bound model
supplies the rest).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from lcsc_ops.checkpoints import CheckpointEntry, checkpoint_filename, sha256_file, write_checkpoint
from lcsc_ops.math.merge import StackedMerger, merge_state_dicts
from lcsc_ops.math.profiles import one_hot, quantise
from lcsc_ops.math.streaming import StreamingMerger, make_merger
from lcsc_ops.spec import ModelSpec

K = 4
CONSTANT_KEY = "1.weight"  # equal in every checkpoint (a frozen tensor)
PARTIAL_KEYS = ("0.weight", "0.bias", CONSTANT_KEY, "1.num_batches_tracked")
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.int64: torch.int64}


def make_model() -> nn.Module:
    """The model factory: a fixed seed, so a fresh model always holds the same (untrained) values."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@dataclass(frozen=True)
class Engine:
    name: str
    dtype: torch.dtype
    max_stack_bytes: int | None
    kind: type
    signed_zeros: bool  # a one-hot merge keeps -0.0 (a stack's 0 * x + -0.0 gives +0.0)
    u: float  # unit roundoff of a merge: 0 for the float32 paths, whose one-hot merges are bit-exact

    @property
    def exact(self) -> bool:
        return self.u == 0.0

    def tolerance(self, l1: float, dev: float) -> tuple[float, float]:
        """(rtol, atol) for a merge with coefficients of L1 norm ``l1`` over deviations up to ``dev``.

        bf16 (deviation stack): one rounding of the result, plus the deviation sum and the
        coefficients rounded to bf16. float32: float32 rounding of the terms.
        """
        if self.exact:
            return 1e-5, 1e-6 * l1
        return 2 * self.u, 2 * self.u * l1 * dev + 1e-6


ENGINES = [
    Engine("stacked-fp32", torch.float32, None, StackedMerger, False, 0.0),
    Engine("stacked-bf16", torch.bfloat16, None, StackedMerger, False, 2.0 ** -8),
    Engine("streaming", torch.float32, 1, StreamingMerger, True, 0.0),
]


@dataclass
class Window:
    keys: tuple[str, ...]  # the keys the checkpoint files hold
    entries: list[CheckpointEntry]
    states: list[dict[str, torch.Tensor]]  # what the files hold, in memory

    @property
    def partial(self) -> bool:
        return set(self.keys) != set(make_model().state_dict())

    @property
    def dev(self) -> float:
        """The largest deviation of a floating tensor from the last checkpoint."""
        last = self.states[-1]
        return max((sd[k] - last[k]).abs().max().item() for sd in self.states for k in self.keys
                   if last[k].is_floating_point())


def _write_window(folder: Path, partial: bool) -> Window:
    """K checkpoints along a random walk from weights unlike the factory's; a -0.0, an int buffer, a constant."""
    gen = torch.Generator().manual_seed(1)
    current = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
               for k, v in make_model().state_dict().items()}
    current["1.running_var"] = 1.0 + 0.1 * torch.rand(8, generator=gen)  # stays positive under the merges
    keys = PARTIAL_KEYS if partial else tuple(current)
    spec = ModelSpec(factory=f"{__name__}:make_model")
    entries, states = [], []
    for i in range(K):
        for name, t in current.items():
            if t.is_floating_point() and name != CONSTANT_KEY:
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
        sd = {k: current[k].clone() for k in keys}
        sd["1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
        sd["0.weight"][0, 0] = -0.0 if i == 1 else 0.25
        step = 100 * (i + 1)
        path = folder / checkpoint_filename(step, "raw")
        write_checkpoint(path, sd, step=step, kind="raw", spec=spec)
        entries.append(CheckpointEntry(step=step, kind="raw", file=path.name, sha256=sha256_file(path),
                                       bytes=path.stat().st_size, path=path))
        states.append(sd)
    return Window(keys, entries, states)


@pytest.fixture(params=ENGINES, ids=lambda e: e.name)
def engine(request) -> Engine:
    return request.param


@pytest.fixture(params=[False, True], ids=["full", "partial"])
def window(request, tmp_path) -> Window:
    return _write_window(tmp_path, partial=request.param)


@pytest.fixture
def merger(engine, window):
    merger = make_merger(window.entries, dtype=engine.dtype, max_stack_bytes=engine.max_stack_bytes)
    assert type(merger) is engine.kind and merger.k == K
    return merger


def random_affine(seed: int, scale: float = 1.0) -> list[float]:
    c = scale * torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c[-1] = 1.0 - c[:-1].sum()
    return quantise(c.tolist())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


def bound_state(model: nn.Module, keys) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in keys}


def expected_one_hot(window: Window, i: int) -> dict[str, torch.Tensor]:
    """Checkpoint i, with the non-floating tensors of the LAST checkpoint."""
    return {k: (v if v.is_floating_point() else window.states[-1][k]) for k, v in window.states[i].items()}


def assert_reproduces(engine: Engine, window: Window, got: dict, want: dict) -> None:
    for name, w in want.items():
        g = got[name]
        if not w.is_floating_point():
            assert torch.equal(g, w), name
        elif engine.exact:
            g = g.to(w.dtype)
            if not engine.signed_zeros:  # `+ 0.0` turns both sides' -0.0 into +0.0
                g, w = g + 0.0, w + 0.0
            assert torch.equal(bits(g), bits(w)), name
        else:
            # Within one bf16 rounding of the weight plus one of its deviation from the last checkpoint.
            u = 2.0 ** -8
            dev = max((sd[name] - window.states[-1][name]).abs().max().item() for sd in window.states)
            assert ((g.float() - w).abs() <= 1.5 * u * w.abs() + u * dev + 1e-12).all(), name


def assert_close(engine: Engine, got: dict, want: dict, *, l1: float, dev: float) -> None:
    assert got.keys() == want.keys()
    rtol, atol = engine.tolerance(l1, dev)
    for name in want:
        if want[name].is_floating_point():
            g, w = got[name].double(), want[name].double()
            assert ((g - w).abs() <= rtol * w.abs() + atol).all(), (name, (g - w).abs().max().item())
        else:
            assert torch.equal(got[name], want[name]), name


def l1(coeffs) -> float:
    return sum(abs(c) for c in coeffs)


# --- the contract -------------------------------------------------------------------------------


def test_bind_starts_at_the_last_checkpoint(engine, window, merger):
    model = merger.bind(make_model())
    assert not any(p.requires_grad for p in model.parameters())
    assert_reproduces(engine, window, bound_state(model, window.keys), expected_one_hot(window, K - 1))


def test_one_hot_reproduces_each_checkpoint(engine, window, merger):
    model = merger.bind(make_model())
    for i in range(K):
        merger.merge(one_hot(K, i))
        assert_reproduces(engine, window, bound_state(model, window.keys), expected_one_hot(window, i))
        assert_reproduces(engine, window, merger.state_dict(one_hot(K, i)), expected_one_hot(window, i))
    if engine.signed_zeros:
        assert torch.signbit(merger.state_dict(one_hot(K, 1))["0.weight"][0, 0])


@pytest.mark.parametrize("a", [0.3, 1.7, -0.5])
def test_merge_is_linear_in_the_coefficients(engine, window, merger, a):
    x, y = random_affine(0), random_affine(1)
    mixed = [a * xi + (1 - a) * yi for xi, yi in zip(x, y)]
    got = merger.state_dict(mixed)
    mx, my = merger.state_dict(x), merger.state_dict(y)
    want = {k: (a * mx[k].double() + (1 - a) * my[k].double() if v.is_floating_point() else v)
            for k, v in mx.items()}
    # Three merges' roundings: the mixed one, and the two combined with weights a and 1 - a.
    assert_close(engine, got, want, l1=l1(mixed) + abs(a) * l1(x) + abs(1 - a) * l1(y), dev=window.dev)


def test_merge_agrees_with_the_reference(engine, window, merger):
    for seed in range(3):
        coeffs = random_affine(seed, scale=2.0)
        assert_close(engine, merger.state_dict(coeffs), merge_state_dicts(window.states, coeffs),
                     l1=l1(coeffs), dev=window.dev)


def test_coefficients_must_be_affine(merger):
    model = merger.bind(make_model())
    merger.merge(random_affine(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    off = [0.26] * K  # sums to 1.04
    for bad in (off, [0.25] * (K - 1), [float("nan")] + [0.5] * (K - 1), [float("inf"), -float("inf"), 0.5, 0.5]):
        with pytest.raises(ValueError):
            merger.merge(bad)
        with pytest.raises(ValueError):
            merger.state_dict(bad)
    # A refused merge leaves the bound model as it was.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # A sum within 1e-6 of 1 is accepted (the documented tolerance).
    merger.merge([c + 1e-7 / K for c in random_affine(3)])


def test_keys_outside_the_checkpoints_keep_the_models_values(engine, window, merger):
    model = merger.bind(make_model())
    fresh = make_model().to(engine.dtype).state_dict()
    others = set(fresh) - set(window.keys)
    assert bool(others) == window.partial
    for coeffs in (random_affine(4), one_hot(K, 0)):
        merger.merge(coeffs)
        state = model.state_dict()
        assert state.keys() == fresh.keys()
        for name in others:
            assert torch.equal(state[name], fresh[name]), name


def test_checkpoint_keys_missing_from_the_model_are_refused(window, merger):
    smaller = nn.Sequential(nn.Linear(5, 8))  # lacks the BatchNorm keys every window holds
    with pytest.raises(ValueError, match="not in the model"):
        merger.bind(smaller)
    wrong_shape = nn.Sequential(nn.Linear(5, 9), nn.BatchNorm1d(9), nn.ReLU(), nn.Linear(9, 3))
    with pytest.raises(ValueError, match="shape"):
        merger.bind(wrong_shape)


def test_merge_then_state_dict_agree(engine, window, merger):
    model = merger.bind(make_model())
    for seed in range(3):
        coeffs = random_affine(10 + seed, scale=2.0)
        merger.merge(coeffs)
        bound = bound_state(model, window.keys)
        standalone = merger.state_dict(coeffs)
        assert standalone.keys() == set(window.keys)
        for name, t in standalone.items():
            # Each key in its own dtype, on the CPU; the same values as the bound model, which
            # holds them in the merger's dtype (a bf16 merger's model rounds its constants too).
            assert t.dtype == window.states[0][name].dtype and t.device.type == "cpu"
            assert torch.equal(bound[name], t.to(bound[name].dtype)), name
        # state_dict leaves the bound model alone, and shares no storage with it.
        standalone["0.weight"].zero_()
        assert torch.equal(bound_state(model, window.keys)["0.weight"], bound["0.weight"])
    # The bound model computes with the merged weights.
    reference = make_model()
    reference.load_state_dict(merger.state_dict(coeffs), strict=False)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.eval()(x.to(engine.dtype)).double()
        want = reference.to(engine.dtype).eval()(x.to(engine.dtype)).double()
    rtol = 1e-6 if engine.exact else 2 * engine.u
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
