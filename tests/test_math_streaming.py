"""Tests for lcsc_ops.math.streaming: the streaming merge and the engine chooser."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lcsc_ops.math.merge import StackedMerger, merge_state_dicts
from lcsc_ops.math.profiles import one_hot, uniform
from lcsc_ops.math.streaming import StreamingMerger, make_merger, stack_nbytes

K = 5


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture
def files(tmp_path) -> list:
    """K checkpoints of a tiny model along a random walk, saved as safetensors; an int buffer and a -0.0 inside."""
    torch.manual_seed(0)
    current = make_model().state_dict()
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(K):
        for t in current.values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
        sd = {k: v.clone() for k, v in current.items()}
        sd["1.running_var"].abs_()
        sd["1.num_batches_tracked"] = torch.tensor(10 * (i + 1))
        sd["0.weight"][0, 0] = -0.0 if i == 1 else 0.25
        paths.append(tmp_path / f"ckpt{i}.safetensors")
        save_file(sd, str(paths[-1]))
    return paths


def load(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def random_affine(seed: int) -> list[float]:
    c = torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    c[-1] = 1.0 - c[:-1].sum()
    return c.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_equals_stacked(files, seed):
    coeffs = random_affine(seed)
    stacked = StackedMerger([load(p) for p in files])
    streaming = StreamingMerger(files)
    a, b = stacked.bind(make_model()).eval(), streaming.bind(make_model()).eval()
    stacked.merge(coeffs)
    streaming.merge(coeffs)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.allclose(sa[name], sb[name], atol=1e-5, rtol=1e-5), name
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5, rtol=1e-5)
    # The standalone state dict matches the float64 reference and leaves the bound model alone.
    before = {k: v.clone() for k, v in sb.items()}
    sd = streaming.state_dict(uniform(K))
    ref = merge_state_dicts([load(p) for p in files], uniform(K))
    for name in ref:
        assert sd[name].dtype == ref[name].dtype
        assert torch.allclose(sd[name], ref[name], atol=1e-6), name
    assert all(torch.equal(b.state_dict()[k], v) for k, v in before.items())


def test_one_hot_reproduces_each_checkpoint_exactly(files):
    streaming = StreamingMerger(files)
    model = streaming.bind(make_model())
    for i in range(K):
        streaming.merge(one_hot(K, i))
        expected = dict(load(files[i]), **{"1.num_batches_tracked": torch.tensor(10 * K)})
        got = model.state_dict()
        for name, t in expected.items():
            assert torch.equal(got[name], t), (i, name)
        assert torch.signbit(got["0.weight"][0, 0]) == (i == 1)  # -0.0 survives


def test_a_merge_in_slices_of_a_few_elements_is_the_float64_merge_and_one_hot_is_exact(files, monkeypatch):
    """Tensors larger than a slice are read and merged slice by slice (7 elements here, so slices
    end inside rows and tensors); a bf16 window is accumulated in float32."""
    import lcsc_ops.math.streaming as streaming_module

    monkeypatch.setattr(streaming_module, "SLICE_ELEMENTS", 7)
    bf16 = []
    for p in files:
        bf16.append(p.with_suffix(".bf16.safetensors"))
        save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in load(p).items()}, str(bf16[-1]))
    for paths in (files, bf16):
        streaming = StreamingMerger(paths)
        model = streaming.bind(make_model())
        coeffs = random_affine(5)
        streaming.merge(coeffs)
        ref = merge_state_dicts([{k: v.float() if v.is_floating_point() else v for k, v in load(p).items()}
                                 for p in paths], coeffs)
        for name, t in ref.items():
            assert torch.allclose(model.state_dict()[name], t, atol=1e-5, rtol=1e-5), name
        streaming.merge(one_hot(K, 2))
        for name, t in load(paths[2]).items():
            if t.is_floating_point():
                assert torch.equal(model.state_dict()[name], t.float()), name


def test_bind_starts_at_the_last_checkpoint_and_merge_reuses_storage(files):
    streaming = StreamingMerger(files)
    model = streaming.bind(make_model())
    assert torch.equal(model[0].weight, load(files[-1])["0.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    ptr = model[0].weight.data_ptr()
    streaming.merge(random_affine(4))
    assert model[0].weight.data_ptr() == ptr and not torch.equal(model[0].weight, load(files[-1])["0.weight"])


def test_streaming_rejects_bad_input(files, tmp_path):
    streaming = StreamingMerger(files)
    with pytest.raises(RuntimeError, match="bind"):
        streaming.merge(uniform(K))
    streaming.bind(make_model())
    with pytest.raises(ValueError):
        streaming.merge([0.5, 0.5])
    with pytest.raises(ValueError):
        streaming.merge([0.5] * K)
    with pytest.raises(ValueError):
        streaming.bind(nn.Sequential(nn.Linear(6, 32)))
    with pytest.raises(ValueError):
        StreamingMerger(files, dtype=torch.bfloat16)
    bad = load(files[1])
    del bad["0.bias"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="checkpoint 1"):
        StreamingMerger([files[0], tmp_path / "bad.safetensors"])


class Entry:  # what a CheckpointWindow holds: an object with a .path
    def __init__(self, path) -> None:
        self.path = path


def test_chooser_picks_each_mode(files):
    model_bytes = sum(t.numel() * 4 for t in load(files[0]).values() if t.is_floating_point())
    assert stack_nbytes(files) == K * model_bytes
    assert isinstance(make_merger(files), StackedMerger)  # no limit
    assert isinstance(make_merger(files, max_stack_bytes=K * model_bytes), StackedMerger)
    chosen = make_merger([Entry(p) for p in files], max_stack_bytes=K * model_bytes - 1)
    assert isinstance(chosen, StreamingMerger) and chosen.k == K
    with pytest.raises(ValueError):
        make_merger(files, max_stack_bytes=0)


def test_scorer_streams_above_its_memory_limit(files):
    from types import SimpleNamespace

    from lcsc_ops.pipeline.scoring import Scorer

    window = SimpleNamespace(entries=[Entry(p) for p in files])
    coeffs = random_affine(5)
    outputs = {}
    for limit, mode in ((None, "stacked"), (1.0, "stacked"), (1e-9, "streaming")):
        scorer = Scorer(window, make_model, "cpu", max_stack_memory=limit)
        assert scorer.mode == mode
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
        outputs[limit] = scorer.per_seed(coeffs, lambda model, n, s: model(x).sum().item(), 3, [0])[0]
    assert outputs[None] == pytest.approx(outputs[1e-9], rel=1e-5, abs=1e-5)


def test_scorer_streams_partial_checkpoints(files, tmp_path):
    """``--partial`` windows (a subset of the model's keys) stream as they stack: the model supplies the rest."""
    from types import SimpleNamespace

    from lcsc_ops.pipeline.scoring import Scorer

    keys = ("0.weight", "0.bias", "3.weight")
    entries = []
    for i, path in enumerate(files):
        entries.append(Entry(tmp_path / f"partial{i}.safetensors"))
        save_file({k: v for k, v in load(path).items() if k in keys}, str(entries[-1].path))
    window = SimpleNamespace(entries=entries)
    coeffs = random_affine(6)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    def factory() -> nn.Module:  # the fixed base the partial checkpoints leave out
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            return make_model()

    scores = {}
    for limit, mode in ((None, "stacked"), (1e-9, "streaming")):
        scorer = Scorer(window, factory, "cpu", max_stack_memory=limit)
        assert scorer.mode == mode
        scores[mode] = scorer.per_seed(coeffs, lambda model, n, s: model.eval()(x).sum().item(), 3, [0])[0]
    assert scores["streaming"] == pytest.approx(scores["stacked"], rel=1e-5, abs=1e-5)


def test_cli_rejects_a_non_positive_limit(store):
    from typer.testing import CliRunner

    from lcsc_ops.cli import app

    result = CliRunner().invoke(app, ["optimize", "0" * 32, "--max-stack-memory", "0", "--tracking-uri", store["uri"]])
    assert result.exit_code == 1 and "max-stack-memory" in result.output


def test_optimize_streams_above_the_limit(store, tiny_run):
    import math

    from lcsc_ops.pipeline.optimize import run_optimize
    from tests.conftest import tiny_optimize_config

    # seed 11: a study of its own (max_stack_memory is not part of the study key).
    cfg = tiny_optimize_config(tiny_run, store, window=3, n_trials=2, seed=11, register=False, max_stack_memory=1e-9)
    lines: list[str] = []
    report = run_optimize(cfg, log=lines.append)
    assert any("streaming" in line for line in lines)
    assert all(math.isfinite(row["final_mean"]) for row in report["methods"].values())


def test_stack_is_built_one_file_at_a_time(files, monkeypatch):
    """make_merger builds the stack from at most three mapped files at once (first, last, current),
    not the whole window, and merges as a stack of fully loaded state dicts does."""
    import gc
    import weakref

    from lcsc_ops.math import streaming

    live: weakref.WeakSet = weakref.WeakSet()
    most = [0]

    class Loaded(dict):
        __hash__ = object.__hash__  # identity: a WeakSet member

    def tracked_load(path):
        gc.collect()
        sd = Loaded(load(path))
        live.add(sd)
        most[0] = max(most[0], len(live))
        return sd

    monkeypatch.setattr(streaming, "load_file", tracked_load)
    merger = make_merger(files)
    assert isinstance(merger, StackedMerger) and most[0] <= 3
    expected = StackedMerger([load(p) for p in files]).state_dict(random_affine(7))
    got = merger.state_dict(random_affine(7))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
