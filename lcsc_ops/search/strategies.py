"""Search strategies: Optuna samplers looked up by name in :data:`STRATEGIES`.

Every strategy searches the coordinates of :class:`~lcsc_ops.math.encoding.AffineEncoding`
(fixed names and bounds, so none falls back to sampling them one at a time) and learns
from complete trials only: a pruned trial's score comes from fewer samples, a failed one
has none. ``tests/test_search_strategies.py`` holds every entry to this contract.
``seed_points`` (encoded EMA profiles, the LCSC paper's initialisation) open the first
generation of the strategies that take them.
"""
from __future__ import annotations

from typing import Any, Callable, Container, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from lcsc_ops.errors import LcscError
from lcsc_ops.search.evolution import EvolutionSampler

Points = Sequence[Sequence[float]]


def _cmaes(seed: int, points: Points = (), **kw: Any) -> optuna.samplers.BaseSampler:
    # The box is centred on the strongest baseline, so CMA-ES's default mean (the middle of
    # the bounds) starts there without the deprecated ``x0``.
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, consider_pruned_trials=False,
                                        **kw)


class _WithoutPruned:
    """A study as the sampler should see it: every trial list leaves out the pruned trials;
    everything else is the study's own."""

    def __init__(self, study: optuna.Study) -> None:
        self._inner = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = self._inner._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if t.state != TrialState.PRUNED]


class CompleteTrialsTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE, learning from complete trials only.

    Optuna's TPE has no ``consider_pruned_trials`` switch: it counts pruned trials towards
    its startup phase and models their coordinates as bad ones (and as good ones when there
    are few complete trials, ranked by their last intermediate score). Here it samples
    through a view of the study without them, as CMA-ES (``consider_pruned_trials=False``),
    GP and evolution do. Running trials (other workers) still count, as in Optuna.
    """

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return super().infer_relative_search_space(_WithoutPruned(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return super().sample_relative(_WithoutPruned(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        return super().sample_independent(_WithoutPruned(study), trial, param_name, param_distribution)


STRATEGIES: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "cmaes": _cmaes,
    "cmaes-sep": lambda seed, points=(): _cmaes(seed, use_separable_cma=True),
    "cmaes-margin": lambda seed, points=(): _cmaes(seed, with_margin=True),
    "evolution": lambda seed, points=(): EvolutionSampler(seed=seed, seed_points=points),
    "gp": lambda seed, points=(): optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False),
    "tpe": lambda seed, points=(): CompleteTrialsTPESampler(seed=seed, multivariate=True),
    "random": lambda seed, points=(): optuna.samplers.RandomSampler(seed=seed),
}


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise LcscError(f"unknown search strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")


def make_strategy(name: str, seed: int, seed_points: Points = ()) -> optuna.samplers.BaseSampler:
    """The sampler ``name``, seeded; ``seed_points`` open generation 0 where the strategy takes them."""
    check_strategy(name)
    return STRATEGIES[name](seed, [list(p) for p in seed_points])
