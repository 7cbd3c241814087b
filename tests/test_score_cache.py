"""The score cache: a second optimization of the same run reuses every baseline score, bit for bit."""
from __future__ import annotations

import math
import sqlite3
from types import SimpleNamespace

import pytest
import torch

from lcsc_ops.evaluation.score_cache import ScoreCache, score_key
from lcsc_ops.models.unet import DigitsUNet
from tests.conftest import tiny_optimize_config


def test_cache_round_trip_and_a_broken_file_turns_it_off(tmp_path):
    cache = ScoreCache(tmp_path / "scores.sqlite")
    k = score_key(files=["a"], coefficients=[0.5, 0.5], seed=1)
    assert cache.get(k) is None and cache.misses == 1
    cache.put(k, 1.2345678901234567)
    assert cache.get(k) == 1.2345678901234567 and cache.hits == 1
    cache.put(score_key(x=1), float("inf"))
    assert cache.get(score_key(x=1)) == float("inf")
    assert score_key(coefficients=[0.1 + 0.2]) != score_key(coefficients=[0.3])  # exact floats
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database" * 100)
    broken = ScoreCache(bad)
    assert not broken.enabled and broken.get(k) is None
    broken.put(k, 1.0)  # no error: no cache rather than no optimization


def test_second_optimization_reuses_baselines_bit_for_bit(store, tiny_run, tmp_path):
    from lcsc_ops.pipeline.optimize import run_optimize

    common = dict(n_trials=3, register=False, search_samples=32, final_samples=32)
    first = run_optimize(tiny_optimize_config(tiny_run, store, strategy="random", seed=11, **common))
    second = run_optimize(tiny_optimize_config(tiny_run, store, strategy="cmaes", seed=12, **common))
    for name in ("last", "uniform", "ema_star", "training_ema"):
        a, b = first["methods"][name], second["methods"][name]
        assert a["search_mean"] == b["search_mean"] and a["final"] == b["final"]
    assert second["score_cache"]["reused"] > 0
    # A run without the cache computes everything and gets the same floats.
    fresh = run_optimize(tiny_optimize_config(tiny_run, store, strategy="cmaes", seed=13, score_cache=False, **common))
    assert "score_cache" not in fresh
    for name in ("last", "uniform", "ema_star", "training_ema"):
        assert fresh["methods"][name]["final"] == first["methods"][name]["final"]
    rows = sqlite3.connect(store["cache"] / "scores.sqlite").execute("select count(*) from scores").fetchone()[0]
    assert rows > 0


# --- the key names the scoring code: a code change misses, a hit is a recomputation's float ----------


class _CountingFID:
    """A built-in FID scorer (it has an ``identity``, so the Scorer caches it) that counts its evaluations."""

    def __init__(self, fid) -> None:
        self.fid, self.calls, self.identity = fid, 0, {"fid": "digits-cnn", "test": "score-cache"}

    def __call__(self, model, num_samples, seed):
        self.calls += 1
        return self.fid(model, num_samples, seed)


@pytest.fixture(scope="module")
def fid_window(tmp_path_factory):
    """Three tiny U-Net checkpoints (as the Scorer sees a window) and a counting FID evaluator."""
    from safetensors.torch import save_file

    from lcsc_ops.checkpoints import sha256_file
    from lcsc_ops.evaluation.data import load_dataset
    from lcsc_ops.evaluation.features import build_extractor
    from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats
    from lcsc_ops.models.diffusion import DDIMSampler

    folder = tmp_path_factory.mktemp("fid-window")
    torch.manual_seed(0)
    state, gen, entries = DigitsUNet(channels=8).state_dict(), torch.Generator().manual_seed(1), []
    for i in range(3):
        for t in state.values():
            if t.is_floating_point():
                t.add_(0.02 * torch.randn(t.shape, generator=gen))
        path = folder / f"ckpt{i}.safetensors"
        save_file({k: v.clone() for k, v in state.items()}, str(path))
        entries.append(SimpleNamespace(path=path, sha256=sha256_file(path)))
    extractor = build_extractor("digits-cnn")
    reference = compute_reference_stats(load_dataset("digits")[:256], extractor)
    fid = FIDScorer(DDIMSampler(steps=2), extractor, reference, image_shape=(1, 8, 8), batch_size=16)
    return SimpleNamespace(entries=entries), fid


def _score(window, evaluator, cache):
    from lcsc_ops.pipeline.scoring import Scorer

    scorer = Scorer(window, lambda: DigitsUNet(channels=8), "cpu", cache=cache, model_identity="tiny")
    return scorer.per_seed([0.5, -0.25, 0.75], evaluator, 16, [3])[0]


def test_a_hit_is_the_recomputed_float_and_a_code_change_misses(fid_window, tmp_path, monkeypatch):
    import lcsc_ops

    window, fid = fid_window
    evaluator = _CountingFID(fid)
    cache = ScoreCache(tmp_path / "scores.sqlite")
    computed = _score(window, evaluator, cache)
    assert (evaluator.calls, cache.misses, cache.hits) == (1, 1, 0)
    hit = _score(window, evaluator, cache)
    assert (evaluator.calls, cache.hits) == (1, 1)  # not evaluated again
    recomputed = _score(window, evaluator, None)  # the cache off: a real evaluation
    assert evaluator.calls == 2
    assert math.isfinite(recomputed) and hit == computed == recomputed  # the same float, bit for bit
    # Another package version (or scoring code, both in code_identity()) is another key: a miss.
    monkeypatch.setattr(lcsc_ops, "__version__", lcsc_ops.__version__ + "+changed")
    assert _score(window, evaluator, cache) == recomputed
    assert (evaluator.calls, cache.misses, cache.hits) == (3, 2, 1)


def test_code_identity_follows_the_source(tmp_path, monkeypatch):
    from lcsc_ops.evaluation import score_cache

    pkg = tmp_path / "scoring_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fid.py").write_text("SCALE = 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = score_cache.code_identity(["scoring_probe"])
    assert score_cache.code_identity(["scoring_probe"]) == before  # stable
    (pkg / "fid.py").write_text("SCALE = 2.0\n")
    assert score_cache.code_identity(["scoring_probe"])["code"] != before["code"]
    assert set(score_cache.code_identity()) == {"lcsc_ops", "code"}
    # The scoring code the default identity hashes includes the models (samplers) and FID.
    assert {"lcsc_ops.models", "lcsc_ops.evaluation.fid"} <= set(score_cache.SCORING_CODE)
