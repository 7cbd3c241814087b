"""Tests for lcsc_ops.search.evolution: the evolutionary strategy as an Optuna sampler."""
from __future__ import annotations

import optuna
import pytest

from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.math.profiles import ema_profile, uniform
from lcsc_ops.search.evolution import EvolutionSampler, seed_points_from_profiles
from lcsc_ops.search.strategies import STRATEGIES, make_strategy
from lcsc_ops.search.trials import run_trials

optuna.logging.set_verbosity(optuna.logging.WARNING)

DIM, RADIUS = 8, 0.3
TARGET = [0.12, -0.08, 0.2, -0.15, 0.05, 0.1, -0.2, 0.0]  # inside the box, away from the origin


def quadratic(trial: optuna.Trial) -> float:
    z = [trial.suggest_float(f"z{i:02d}", -RADIUS, RADIUS) for i in range(DIM)]
    return sum((a - b) ** 2 for a, b in zip(z, TARGET))


def study_with(sampler, storage=None, name="evo"):
    return optuna.create_study(sampler=sampler, storage=storage, study_name=name, direction="minimize",
                               load_if_exists=True)


def points(study) -> list[list[float]]:
    return [[t.params[f"z{i:02d}"] for i in range(DIM)] for t in study.trials]


def test_registered_as_a_strategy():
    assert isinstance(make_strategy("evolution", 3), EvolutionSampler)
    assert STRATEGIES["evolution"](3).seed == 3


def test_deterministic_given_a_seed_and_seed_dependent():
    runs = []
    for seed in (7, 7, 8):
        study = study_with(EvolutionSampler(seed=seed))
        study.optimize(quadratic, n_trials=30)
        runs.append(points(study))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_respects_bounds_even_with_wide_mutation_and_outside_seed_points():
    sampler = EvolutionSampler(seed=0, init_sigma=5.0, mutation_sigma=5.0, seed_points=[[9.0] * DIM])
    study = study_with(sampler)
    study.optimize(quadratic, n_trials=40)
    flat = [v for p in points(study) for v in p]
    assert all(-RADIUS <= v <= RADIUS for v in flat)
    assert points(study)[0] == [RADIUS] * DIM  # the seed point, clipped
    assert max(abs(v) for v in flat) == RADIUS  # the clip was exercised


def test_first_generation_is_origin_then_jitter():
    study = study_with(EvolutionSampler(seed=1, population_size=10))
    study.optimize(quadratic, n_trials=10)
    p = points(study)
    assert p[0] == [0.0] * DIM  # the origin decodes to the strongest baseline
    assert all(0 < max(abs(v) for v in q) < RADIUS for q in p[1:])


def test_improves_on_a_quadratic_over_60_trials():
    for seed in range(3):
        sampler = EvolutionSampler(seed=seed)
        study = study_with(sampler)
        study.optimize(quadratic, n_trials=60)
        values = [t.value for t in study.trials]
        first = values[: sampler.population_size]
        last = values[-sampler.population_size:]
        assert min(values) < 0.5 * min(first)
        assert sum(last) / len(last) < 0.5 * sum(first) / len(first)


def test_resumes_from_storage_exactly(tmp_path):
    url = f"sqlite:///{tmp_path / 'evo.db'}"
    straight = study_with(EvolutionSampler(seed=5), url, "straight")
    straight.optimize(quadratic, n_trials=40)
    resumed = study_with(EvolutionSampler(seed=5), url, "resumed")
    resumed.optimize(quadratic, n_trials=25)
    # A new sampler object (no in-memory state) on the same storage continues the study.
    again = study_with(EvolutionSampler(seed=5), url, "resumed")
    again.optimize(quadratic, n_trials=15)
    assert len(again.trials) == 40
    assert points(again) == points(straight)


def test_seed_points_open_the_first_generation():
    enc = AffineEncoding(centre=tuple(uniform(4)), radius=0.5)
    profiles = [ema_profile(4, 0.5), ema_profile(4, 0.8)]
    seeds = seed_points_from_profiles(enc, profiles)
    for p, z in zip(profiles, seeds):
        assert enc.decode(z) == pytest.approx(p, abs=1e-9)
    study = optuna.create_study(sampler=EvolutionSampler(seed=0, seed_points=seeds), direction="minimize")
    run_trials(study, enc, lambda c: sum((a - 0.25) ** 2 for a in c), n_trials=4)
    got = [t.user_attrs["coefficients"] for t in study.trials]
    assert got[0] == pytest.approx(profiles[0], abs=1e-9)
    assert got[1] == pytest.approx(profiles[1], abs=1e-9)
    assert got[2] == list(enc.centre)  # then the origin
    assert all(sum(c) == 1.0 for c in got)


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        EvolutionSampler(crossover="two-point")
    with pytest.raises(ValueError):
        EvolutionSampler(sigma_decay=0.0)


def test_optimize_seeds_the_evolution_population_with_ema_profiles(store, tiny_run):
    """`--strategy evolution`: generation 0 opens with post-hoc EMA profiles over the raw checkpoints."""
    from lcsc_ops.math.profiles import ema_decay_grid, ema_profile
    from lcsc_ops.pipeline import optimize as stages
    from tests.conftest import tiny_optimize_config

    job = stages.prepare(tiny_optimize_config(tiny_run, store, strategy="evolution", n_trials=3, register=False,
                                              ema_grid=4, search_samples=32), log=lambda m: None)
    search, _ = stages.open_search(job)
    stages.run_search(job, search)
    search.run.end()
    raw = [j for j, i in enumerate(job.basis) if job.window.entries[i].kind == "raw"]
    grid = ema_decay_grid(len(raw), 4)[::2]
    trials = [t for t in search.study.records() if t.state == "COMPLETE"]
    assert len(stages.profile_points(job, search.encoding)) == len(grid) == 2
    lo, hi = search.encoding.bounds
    for t, g in zip(trials, grid):  # each opening trial is the encoding of one profile, clipped to the box
        dense = [0.0] * len(job.basis)
        for j, c in zip(raw, ema_profile(len(raw), g)):
            dense[j] = c
        want = [min(hi, max(lo, z)) for z in search.encoding.encode(dense)]
        assert [t.params[n] for n in search.encoding.names] == pytest.approx(want, abs=1e-12)
