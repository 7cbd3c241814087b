"""The score cache: a second optimization of the same run reuses every baseline score, bit for bit."""
from __future__ import annotations

import sqlite3

from lcsc_ops.evaluation.score_cache import ScoreCache, score_key
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
