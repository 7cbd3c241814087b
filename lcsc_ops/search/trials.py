"""Running trials: the objective, the start trial, the rung pruner (``--prune``).

With ``--prune`` a trial reports its score at growing sample counts (rungs) and
:class:`RungPruner` stops one that is already worse than most complete trials were at the
same count. Pruned trials teach the strategies nothing (see :mod:`.strategies`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import optuna

from lcsc_ops.math.encoding import AffineEncoding


class RungPruner(optuna.pruners.BasePruner):
    """Prune a trial whose score at the sample count it just reached is worse than the
    ``percentile``-th percentile of the complete trials' scores at that same count.

    Optuna's ``MedianPruner``/``PercentilePruner`` compare the best value a trial reported
    at ANY step with the others' values at the current step; FID falls as the sample count
    grows (it is biased by the count), so here a score at n samples only ever meets scores
    at n samples. Nothing is pruned until ``n_startup_trials`` complete trials have a score
    at that count (trials run without ``--prune`` have none, so a resumed study re-warms),
    and a non-finite score (non-finite samples) is pruned at once. The study minimises.
    """

    def __init__(self, percentile: float = 50.0, n_startup_trials: int = 10) -> None:
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"percentile must lie in (0, 100), got {percentile!r}")
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be >= 1, got {n_startup_trials!r}")
        self.percentile, self.n_startup_trials = float(percentile), int(n_startup_trials)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        peers = sorted(t.intermediate_values[step] for t in completed(study) if step in t.intermediate_values)
        if len(peers) < self.n_startup_trials:
            return False
        # The nearest rank at or above the percentile: no interpolation, which an inf among the
        # peers would turn into NaN.
        bar = peers[math.ceil(self.percentile / 100.0 * (len(peers) - 1))]
        return value > bar


START_ATTR = "lcsc.start"


def add_start_trial(study: optuna.Study, encoding: AffineEncoding, value: float, name: str) -> bool:
    """Put the centre of the search box (the strongest baseline, already scored) into an empty
    study as a complete trial, without evaluating it again; returns whether it was added.

    Optuna's CMA-ES only knows the search space once a trial has completed, so without this
    its first trial is drawn uniformly from the whole box by the independent sampler; with
    it, the first CMA-ES generation is already drawn around the centre, the top-k candidates
    can never be worse than the starting point, and the MLflow child runs begin with the
    point the search started from. The trial carries the user attribute ``lcsc.start``
    (the baseline's name) and does not count against ``n_trials`` (see :func:`run_trials`).
    """
    if study.get_trials(deepcopy=False):
        return False
    lo, hi = encoding.bounds
    z = [0.0] * encoding.dim
    study.add_trial(optuna.trial.create_trial(
        params=dict(zip(encoding.names, z)),
        distributions={n: optuna.distributions.FloatDistribution(lo, hi) for n in encoding.names},
        value=float(value), user_attrs={"coefficients": encoding.decode(z), START_ATTR: name}))
    return True


def is_start(trial: optuna.trial.FrozenTrial) -> bool:
    return START_ATTR in trial.user_attrs


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def searched(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials the search ran (the start trial, scored before the search, left out)."""
    return [t for t in completed(study) if not is_start(t)]


def pruned(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))


class Rungs:
    """A rung scorer for :func:`run_trials`: ``steps`` (increasing sample counts, the last
    one the full score) and ``scores(coefficients)``, a lazy iterator of the score at each
    step; a trial that is pruned stops iterating, so the samples beyond are never drawn."""

    def __init__(self, steps: Sequence[int], scores: Callable[[list[float]], Iterator[float]]) -> None:
        self.steps, self.scores = [int(s) for s in steps], scores


def run_trials(study: optuna.Study, encoding: AffineEncoding, score: Callable[[list[float]], float],
               n_trials: int, callbacks: Sequence[Callable] = (), *, rungs: Rungs | None = None) -> int:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) ones, not
    counting a start trial (:func:`add_start_trial`); returns how many finished now.

    Each trial suggests the encoding's coordinates (fixed names and bounds, so CMA-ES never
    falls back to random sampling), decodes them to coefficients that sum to exactly 1,
    stores those as the trial's ``coefficients`` attribute and returns ``score(coefficients)``.
    With ``rungs``, it instead reports each rung's score (``trial.report(value, step=count)``),
    asks the study's pruner after every rung but the last, and returns the last rung's score,
    which is the full score. Pruned trials count towards ``n_trials``: the budget is trials
    started, and pruning makes some of them cheaper.
    """
    lo, hi = encoding.bounds

    def objective(trial: optuna.Trial) -> float:
        z = [trial.suggest_float(n, lo, hi) for n in encoding.names]
        coeffs = encoding.decode(z)
        trial.set_user_attr("coefficients", coeffs)
        if rungs is None:
            return score(coeffs)
        value = math.nan
        with contextlib.closing(rungs.scores(coeffs)) as values:  # a pruned trial's sampler state is released now
            for step, value in zip(rungs.steps, values):
                trial.report(value, step)
                if step != rungs.steps[-1] and trial.should_prune():
                    raise optuna.TrialPruned(f"score {value:.4g} at {step} samples")
        return value

    # The start trial (add_start_trial) was scored before the search: it is not in the budget.
    done = len(searched(study)) + len(pruned(study))
    remaining = max(0, n_trials - done)
    if not remaining:
        return 0
    study.optimize(objective, n_trials=remaining, callbacks=list(callbacks), gc_after_trial=False)
    # study.stop() (from a callback or the objective) can end the loop early: count what finished.
    return len(searched(study)) + len(pruned(study)) - done
