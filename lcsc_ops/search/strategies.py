"""Search strategies: Optuna samplers looked up by name in :data:`STRATEGIES`.

Every strategy sees the same search space (the coordinates of
:class:`~lcsc_ops.math.encoding.AffineEncoding`: fixed names and bounds, so CMA-ES never
falls back to random sampling) and learns from complete trials only, since a pruned
trial's FID comes from fewer samples. ``seed_points`` (encoded EMA profiles, the LCSC
paper's initialisation) open the first generation of the strategies that take them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import optuna

from lcsc_ops.errors import LcscError
from lcsc_ops.search.evolution import EvolutionSampler

Points = Sequence[Sequence[float]]


def _cmaes(seed: int, points: Points = (), **kw: Any) -> optuna.samplers.BaseSampler:
    # The box is centred on the strongest baseline, so CMA-ES's default mean (the middle of
    # the bounds) starts there without the deprecated ``x0``.
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, consider_pruned_trials=False,
                                        **kw)


STRATEGIES: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "cmaes": _cmaes,
    "cmaes-sep": lambda seed, points=(): _cmaes(seed, use_separable_cma=True),
    "cmaes-margin": lambda seed, points=(): _cmaes(seed, with_margin=True),
    "evolution": lambda seed, points=(): EvolutionSampler(seed=seed, seed_points=points),
    "gp": lambda seed, points=(): optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False),
    "tpe": lambda seed, points=(): optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                              warn_independent_sampling=False),
    "random": lambda seed, points=(): optuna.samplers.RandomSampler(seed=seed),
}


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise LcscError(f"unknown search strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")


def make_strategy(name: str, seed: int, seed_points: Points = ()) -> optuna.samplers.BaseSampler:
    """The sampler ``name``, seeded; ``seed_points`` open generation 0 where the strategy takes them."""
    check_strategy(name)
    return STRATEGIES[name](seed, [list(p) for p in seed_points])
