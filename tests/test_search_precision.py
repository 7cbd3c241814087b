"""``--search-precision``: reduced-precision search evaluations, full-precision final evaluation and model."""
from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from lcsc_ops.math.merge import StackedMerger, merge_state_dicts
from lcsc_ops.math.streaming import StreamingMerger
from lcsc_ops.evaluation.precision import precision_context
from lcsc_ops.pipeline.config import OptimizeConfig
from lcsc_ops.pipeline.scoring import Scorer
from tests.conftest import tiny_optimize_config

K = 4
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.int64: torch.int64}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def window(tmp_path) -> SimpleNamespace:
    """K checkpoints of a tiny MLP along a random walk, as the Scorer sees a window."""
    torch.manual_seed(0)
    current, gen, entries = make_model().state_dict(), torch.Generator().manual_seed(1), []
    for i in range(K):
        for t in current.values():
            t.add_(0.05 * torch.randn(t.shape, generator=gen))
        path = tmp_path / f"ckpt{i}.safetensors"
        save_file({k: v.clone() for k, v in current.items()}, str(path))
        entries.append(SimpleNamespace(path=path))
    return SimpleNamespace(entries=entries)


def _probe(record: list):
    """An evaluator that records the precision it runs under and scores the merged model on a fixed input."""
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))

    def evaluator(model, num_samples, seed):
        record.append({"autocast": torch.is_autocast_enabled("cpu"), "tf32": torch.backends.cuda.matmul.allow_tf32,
                       "cudnn_tf32": torch.backends.cudnn.allow_tf32, "weights": next(model.parameters()).dtype})
        return model(x).float().sum().item()
    return evaluator


COEFFS = [0.4, -0.3, 0.5, 0.4]


def test_bf16_search_then_full_precision_final(window):
    seen: list = []
    scorer = Scorer(window, make_model, "cpu", precision="bf16")
    assert isinstance(scorer.merger, StackedMerger) and scorer.merger.dtype is torch.bfloat16
    search = scorer.per_seed(COEFFS, _probe(seen), 8, [0])[0]
    assert seen[-1] == {"autocast": True, "tf32": False, "cudnn_tf32": False, "weights": torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")  # only inside the evaluation
    scorer.full_precision()
    assert scorer.precision == "fp32" and scorer.merger.dtype is torch.float32
    final = scorer.per_seed(COEFFS, _probe(seen), 8, [0])[0]
    assert seen[-1] == {"autocast": False, "tf32": False, "cudnn_tf32": False, "weights": torch.float32}
    # The float32 engine scores the float32 merge; bf16 is close to it, but not the same.
    exact = Scorer(window, make_model, "cpu").per_seed(COEFFS, _probe([]), 8, [0])[0]
    assert final == exact
    assert search != exact and search == pytest.approx(exact, rel=0.05, abs=0.05)


def test_tf32_only_sets_the_flags_and_restores_them(window):
    seen: list = []
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    scorer = Scorer(window, make_model, "cpu", precision="tf32")
    assert scorer.merger.dtype is torch.float32
    merger = scorer.merger
    a = scorer.per_seed(COEFFS, _probe(seen), 8, [0])[0]
    assert seen[-1] == {"autocast": False, "tf32": True, "cudnn_tf32": True, "weights": torch.float32}
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved
    scorer.full_precision()
    assert scorer.merger is merger  # a float32 stack is kept, not rebuilt
    b = scorer.per_seed(COEFFS, _probe(seen), 8, [0])[0]
    assert seen[-1]["tf32"] is False and seen[-1]["cudnn_tf32"] is False
    assert a == b  # TF32 is a no-op on the CPU


def test_bf16_beyond_the_memory_limit_streams_in_float32_under_autocast(window):
    seen: list = []
    scorer = Scorer(window, make_model, "cpu", max_stack_memory=1e-9, precision="bf16")
    assert isinstance(scorer.merger, StreamingMerger) and scorer.merger.dtype is torch.float32
    scorer.per_seed(COEFFS, _probe(seen), 8, [0])
    assert seen[-1]["autocast"] and seen[-1]["weights"] is torch.float32


def test_lazily_runs_each_step_in_the_context_and_closes_early(window):
    scorer = Scorer(window, make_model, "cpu", precision="bf16")
    state = {"closed": False}

    def rungs():
        try:
            for _ in range(3):
                yield float(torch.is_autocast_enabled("cpu"))
        finally:
            state["closed"] = True

    it = scorer.lazily(rungs())
    assert next(it) == 1.0 and not torch.is_autocast_enabled("cpu")
    it.close()  # a pruned trial stops after its first rung
    assert state["closed"]
    assert list(scorer.lazily(iter([1.0, 2.0]))) == [1.0, 2.0]


def test_precision_context_restores_flags_on_error():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with pytest.raises(RuntimeError):
        with precision_context("tf32", "cpu"):
            raise RuntimeError("boom")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == saved


def test_bf16_fid_is_not_rounded_to_bf16():
    """torchmetrics casts the distance to the features' dtype; the scorer keeps it float."""
    from lcsc_ops.evaluation.features import build_extractor
    from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats

    torch.manual_seed(0)
    extractor = build_extractor("digits-cnn")
    stats = compute_reference_stats(torch.rand(64, 1, 8, 8) * 2 - 1, extractor)
    scorer = FIDScorer(None, extractor, stats, image_shape=(1, 8, 8))
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    with precision_context("bf16", "cpu"):
        value = scorer.score_images(images)
    full = scorer.score_images(images)
    assert value != full and value == pytest.approx(full, rel=0.05)
    assert float(torch.tensor(value).bfloat16()) != value


def test_study_key_and_validation():
    base = OptimizeConfig(run_id="r")
    assert "search_precision" not in base.study_key()  # studies made before the option still resume
    assert OptimizeConfig(run_id="r", search_precision="bf16").study_key()["search_precision"] == "bf16"
    from lcsc_ops.errors import LcscError

    with pytest.raises(LcscError, match="search precision"):
        OptimizeConfig(run_id="r", search_precision="fp16").validate()


def test_cli_rejects_an_unknown_precision(store):
    from lcsc_ops.cli import app

    args = ["optimize", "0" * 32, "--search-precision", "fp64", "--tracking-uri", store["uri"]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "search precision" in result.output


# --- end to end on the tiny run ------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(store, tiny_run) -> dict:
    """The same tiny optimization (a study of its own: seed 21) at each search precision.

    The score cache is off: each run evaluates every figure itself, so the final figures
    compared across runs are recomputations, not one evaluation read back from the cache.
    """
    from lcsc_ops.pipeline.optimize import run_optimize

    out = {}
    for precision in ("fp32", "bf16", "tf32"):
        cfg = tiny_optimize_config(tiny_run, store, seed=21, n_trials=3, search_precision=precision,
                                   model_name=f"tiny-precision-{precision}", score_cache=False)
        out[precision] = run_optimize(cfg, log=lambda m: None)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


@pytest.mark.parametrize("precision", ["fp32", "bf16", "tf32"])
def test_registered_weights_are_the_float64_merge_bit_for_bit(store, tiny_run, runs, precision):
    from lcsc_ops.store.fetch import fetch_window

    report = runs[precision]
    name, version = report["registered_model"]["name"], report["registered_model"]["version"]
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    tags = mlflow.tracking.MlflowClient(store["uri"]).get_model_version(name, version).tags
    coeffs, files = json.loads(tags["lcsc.coefficients"]), json.loads(tags["lcsc.checkpoints"])
    window = fetch_window(tiny_run, window=None, tracking_uri=store["uri"], cache_dir=store["cache"])
    by_file = {e.file: e for e in window.entries}
    expected = merge_state_dicts([by_file[f].load() for f in files], coeffs)
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(_bits(got[k]), _bits(expected[k])), k
    params = mlflow.tracking.MlflowClient(store["uri"]).get_run(report["parent_run_id"]).data.params
    assert params["search_precision"] == precision


def test_final_evaluation_does_not_depend_on_the_search_precision(runs):
    fp32, bf16, tf32 = runs["fp32"], runs["bf16"], runs["tf32"]
    assert len({r["study"] for r in runs.values()}) == 3  # the precision is part of the study key
    assert not any("score_cache" in r for r in runs.values())  # every figure computed, none read back
    assert len({r["parent_run_id"] for r in runs.values()}) == 3
    # The baselines with the same coefficients in every run (EMA*'s decay is chosen by search FID).
    same = [n for n, r in fp32["methods"].items() if r["kind"] == "baseline"
            and bf16["methods"][n]["coefficients"] == r["coefficients"] == tf32["methods"][n]["coefficients"]]
    assert {"last", "uniform", "training_ema"} <= set(same)
    for name in same:
        row = fp32["methods"][name]
        # Final figures: the same full-precision evaluation, recomputed in each run, bit for bit.
        assert bf16["methods"][name]["final"] == row["final"] == tf32["methods"][name]["final"], name
        # Search figures: bf16 is close to fp32 but really reduced precision; TF32 is a no-op on the CPU.
        assert tf32["methods"][name]["search_mean"] == row["search_mean"]
        assert bf16["methods"][name]["search_mean"] == pytest.approx(row["search_mean"], rel=0.1), name
    assert any(bf16["methods"][n]["search_mean"] != fp32["methods"][n]["search_mean"] for n in same)
