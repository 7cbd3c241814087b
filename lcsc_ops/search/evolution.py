"""An evolutionary search strategy (the kind the LCSC paper uses) as an Optuna sampler.

The paper starts its evolutionary search from EMA-like profiles but published no code, so
the defaults here are ours. Generation 0 (the first ``population_size`` trials) is the seed
points, then the middle of the box (the strongest baseline), then Gaussian jitter around it.
Every later trial is a child of two of the ``n_parents`` best complete trials so far
(selection over all generations, so the best point is never lost): a blend or uniform
crossover, a Gaussian mutation that narrows each generation, and a clip to the bounds. The
decoder (``AffineEncoding.decode``) makes every child an affine merge.

Each trial draws from a stream seeded by ``(seed, trial.number)`` and finds its parents in
the study, so a run repeats for a seed and a fresh sampler on the same storage resumes a
stopped study exactly. Pruned and failed trials are never parents, but they do use up their
trial numbers (and so their places in a generation).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import FrozenTrial, TrialState

__all__ = ["EvolutionSampler", "seed_points_from_profiles"]

SeedPoint = Mapping[str, float] | Sequence[float]


class EvolutionSampler(optuna.samplers.BaseSampler):
    """Generational evolutionary search over float coordinates with fixed bounds.

    ``population_size`` trials make a generation. ``seed_points`` (mappings name -> value, or
    sequences in the order the objective suggests the coordinates) are trials ``0, 1, ...``:
    a trial already in the study at that number (e.g. the start trial) keeps its slot, and
    that seed point is not used. Scales are in half-widths of each coordinate's bounds, so
    the defaults fit any radius: ``init_sigma`` for the jitter of generation 0,
    ``mutation_sigma`` shrinking by ``sigma_decay`` per generation down to ``min_sigma``,
    ``blend_alpha`` for how far a blend child may reach beyond its parents. Non-float
    parameters fall back to random sampling.
    """

    def __init__(self, *, seed: int = 0, population_size: int = 12, n_parents: int = 4,
                 crossover: str = "blend", blend_alpha: float = 0.25, init_sigma: float = 0.2,
                 mutation_sigma: float = 0.15, sigma_decay: float = 0.85, min_sigma: float = 0.03,
                 seed_points: Sequence[SeedPoint] = (), include_origin: bool = True) -> None:
        if crossover not in ("blend", "uniform"):
            raise ValueError(f"crossover must be 'blend' or 'uniform', got {crossover!r}")
        if population_size < 2 or n_parents < 1:
            raise ValueError("population_size must be >= 2 and n_parents >= 1")
        for name, value in (("init_sigma", init_sigma), ("mutation_sigma", mutation_sigma),
                            ("min_sigma", min_sigma), ("blend_alpha", blend_alpha)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not 0 < sigma_decay <= 1:
            raise ValueError(f"sigma_decay must lie in (0, 1], got {sigma_decay!r}")
        self.seed = int(seed)
        self.population_size = int(population_size)
        self.n_parents = int(n_parents)
        self.crossover = crossover
        self.blend_alpha = float(blend_alpha)
        self.init_sigma = float(init_sigma)
        self.mutation_sigma = float(mutation_sigma)
        self.sigma_decay = float(sigma_decay)
        self.min_sigma = float(min_sigma)
        self.seed_points = [p if isinstance(p, Mapping) else [float(v) for v in p] for p in seed_points]
        self.include_origin = include_origin
        self._space = IntersectionSearchSpace()
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    # --- BaseSampler -------------------------------------------------------------------

    def reseed_rng(self) -> None:
        # Streams are derived from (seed, trial number), so there is nothing to reseed;
        # only the fallback for non-float parameters keeps its own generator.
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = self._space.calculate(study)
        return {n: d for n, d in sorted(space.items()) if _usable(d)}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        names = sorted(search_space)
        lo = np.array([search_space[n].low for n in names])
        hi = np.array([search_space[n].high for n in names])
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        rng = self._rng(trial.number)
        parents = self._parents(study, trial.number, names)
        if trial.number < self.population_size or len(parents) < 1:
            x = self._initial(trial.number, names, mid, half, rng)
        else:
            x = self._child(parents, self._generation(trial.number), mid, half, rng)
        x = np.clip(x, lo, hi)
        return {n: float(v) for n, v in zip(names, x)}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        # Only before the first trial completes (the relative space is then unknown) or
        # for parameters outside the shared float space: one coordinate at a time.
        if not _usable(param_distribution):
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        lo, hi = param_distribution.low, param_distribution.high
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        point = self._seed_point(trial.number)
        if point is not None:
            value = point.get(param_name) if isinstance(point, Mapping) else _at(point, len(trial.params))
            if value is not None:
                return float(min(hi, max(lo, value)))
        if trial.number == len(self.seed_points) and self.include_origin:
            return float(mid)
        key = sum(ord(c) * 31 ** i for i, c in enumerate(param_name)) % (2 ** 32)
        rng = np.random.default_rng([self.seed, trial.number, key])
        return float(np.clip(mid + rng.normal(0.0, self.init_sigma) * half, lo, hi))

    # --- the algorithm -----------------------------------------------------------------

    def _rng(self, number: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, number])

    def _generation(self, number: int) -> int:
        return number // self.population_size

    def _seed_point(self, number: int) -> SeedPoint | None:
        return self.seed_points[number] if number < len(self.seed_points) else None

    def _initial(self, number: int, names: list[str], mid: np.ndarray, half: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Generation 0: seed points, then the origin (the strongest baseline), then jitter around it."""
        point = self._seed_point(number)
        if point is not None:
            if isinstance(point, Mapping):
                return np.array([float(point.get(n, m)) for n, m in zip(names, mid)])
            vec = np.asarray(point, dtype=float)
            if vec.shape != mid.shape:
                raise ValueError(f"seed point {number} has {vec.size} coordinates, the space has {mid.size}")
            return vec
        if number == len(self.seed_points) and self.include_origin:
            return mid.copy()
        return mid + rng.normal(0.0, self.init_sigma, size=mid.shape) * half

    def _parents(self, study: optuna.Study, number: int, names: list[str]) -> list[np.ndarray]:
        """The ``n_parents`` best complete trials numbered before ``number`` (ties by trial number)."""
        done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.number < number and t.value is not None and math.isfinite(t.value)
                and all(n in t.params for n in names)]
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        done.sort(key=lambda t: (sign * t.value, t.number))
        return [np.array([t.params[n] for n in names], dtype=float) for t in done[: self.n_parents]]

    def _child(self, parents: list[np.ndarray], generation: int, mid: np.ndarray, half: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
        """Crossover of two parents from the top ranks, then a Gaussian mutation."""
        i, j = rng.choice(len(parents), size=2, replace=len(parents) < 2)
        a, b = parents[i], parents[j]
        if self.crossover == "blend":
            u = rng.uniform(-self.blend_alpha, 1.0 + self.blend_alpha, size=a.shape)
            x = a + u * (b - a)
        else:
            x = np.where(rng.random(size=a.shape) < 0.5, a, b)
        sigma = max(self.min_sigma, self.mutation_sigma * self.sigma_decay ** max(0, generation - 1))
        return x + rng.normal(0.0, sigma, size=x.shape) * half


def seed_points_from_profiles(encoding: Any, profiles: Sequence[Sequence[float]]) -> list[list[float]]:
    """Search points for coefficient profiles (e.g. EMA at several rates), clipped to the box.

    ``encoding`` is an :class:`~lcsc_ops.math.encoding.AffineEncoding`; a profile it cannot
    express exactly is replaced by its least-squares nearest point.
    """
    lo, hi = encoding.bounds
    return [[min(hi, max(lo, v)) for v in encoding.encode(p)] for p in profiles]


def _usable(d: BaseDistribution) -> bool:
    return isinstance(d, FloatDistribution) and not d.log and d.step is None


def _at(vec: Sequence[float], i: int) -> float | None:
    return float(vec[i]) if i < len(vec) else None
