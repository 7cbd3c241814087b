"""Running trials: the objective, the start trial, the rung pruner (``--prune``).

With ``--prune`` a trial reports its score at growing sample counts (rungs) and
:class:`RungPruner` stops one that is already worse than most complete trials were at the
same count. Pruned trials teach the strategies nothing (see :mod:`.strategies`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Iterator, Sequence

import optuna
from optuna.trial import TrialState

from lcsc_ops.interrupts import hold, release
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.search.workers import WORKER_TRIAL_ATTR, worker_id


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


NONFINITE_ATTR = "lcsc.nonfinite"
SURPLUS_ATTR = "lcsc.surplus"
INTERRUPTED_ATTR = "lcsc.interrupted"


class _OwnFailures(logging.Filter):
    """Optuna logs every FAILed trial with all its parameters and a traceback. A surplus trial and
    one stopped by SIGINT/SIGTERM are ours to say, once and in one line: their records go."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split(maxsplit=2)
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (SurplusTrial, KeyboardInterrupt)) and len(words) > 1:
            self.numbers.add(words[1])
            return False
        return not (len(words) > 2 and words[1] in self.numbers and words[2].startswith("failed with value"))


class NonFiniteScore(Exception):
    """A candidate scored NaN or inf: its trial FAILs and does not use up the budget."""


class SurplusTrial(Exception):
    """Another worker already claimed the last trial of the budget: this one FAILs unscored."""


optuna.logging.get_logger("optuna.study._optimize").addFilter(_OwnFailures())


def run_trials(study: optuna.Study, encoding: AffineEncoding, score: Callable[[list[float]], float],
               n_trials: int, callbacks: Sequence[Callable] = (), *, rungs: Rungs | None = None,
               storage: optuna.storages.BaseStorage | None = None,
               should_stop: Callable[[optuna.trial.FrozenTrial], bool] | None = None,
               on_wait: Callable[[int], None] | None = None) -> int:
    """Run trials until the study holds ``n_trials`` finished (complete or pruned) ones, not
    counting a start trial (:func:`add_start_trial`); returns how many this process finished.

    Each trial suggests the encoding's coordinates (fixed names and bounds), decodes them to
    coefficients that sum to exactly 1 (stored as the trial's ``coefficients``) and returns
    ``score(coefficients)``; with ``rungs`` it reports each rung's score and asks the pruner.
    Any number of processes may run this on one study: a trial claims its place in the
    budget before it is scored (a surplus one, asked in the same instant as another worker's
    last, FAILs at once), a trial scoring NaN or inf
    FAILs and is replaced (up to ``n_trials`` in a row), and a trial left RUNNING by a dead
    worker is FAILed after the grace period (``storage``: see :mod:`.workers`) and replaced.
    ``should_stop(trial)`` ends the search after a trial (of any worker). A worker that finds
    the budget claimed by running trials waits for them, calling ``on_wait(n_running)``.
    """
    runner = TrialRunner(study, encoding, score, n_trials, rungs, storage)
    runner.should_stop, runner.on_wait = should_stop, on_wait
    return runner.run(callbacks)


class TrialRunner:
    """The state of :func:`run_trials` in one process: its own trials, and whether it stopped."""

    def __init__(self, study: optuna.Study, encoding: AffineEncoding, score: Callable[[list[float]], float],
                 n_trials: int, rungs: Rungs | None, storage: optuna.storages.BaseStorage | None) -> None:
        self.study, self.encoding, self.score, self.n_trials = study, encoding, score, n_trials
        self.rungs, self.storage = rungs, storage
        self.mine: list[int] = []
        self.stopped = False
        self.should_stop: Callable[[optuna.trial.FrozenTrial], bool] | None = None
        self.on_wait: Callable[[int], None] | None = None  # called with the number of running trials

    def run(self, callbacks: Sequence[Callable]) -> int:
        from lcsc_ops.search.workers import fail_stale_trials

        failures, waited = 0, 0.0
        # A signal from the objective's end to here waits (interrupts.hold): inside Optuna's tell it
        # would break Optuna's own clean-up (an UnboundLocalError, the trial left RUNNING).
        callbacks = [*callbacks, self._watch_stop, lambda study, trial: release()]
        while not self.stopped and not self._stop_now():
            if self.storage is not None:
                fail_stale_trials(self.study, self.storage)
            # Other workers' running trials hold their places: claim only what is left, else wait.
            others = running(self.study)
            if self.n_trials - len(budgeted(self.study)) - len(others) <= 0:
                if not others:
                    break
                waited = self._wait(len(others), waited)
                continue
            waited = 0.0
            start = len(self.mine)
            # One trial per call: the budget is asked again before each (no run of surplus trials).
            try:
                self.study.optimize(self._objective, n_trials=1, callbacks=callbacks, gc_after_trial=False,
                                    catch=(NonFiniteScore, SurplusTrial))
            except BaseException:
                release(raise_pending=False)  # the objective's hold, when Optuna re-raised its exception
                raise
            bad = sum(NONFINITE_ATTR in t.user_attrs for t in self._own(start))
            failures = failures + bad if bad == len(self.mine) - start else bad
            if failures >= self.n_trials:
                raise NonFiniteScore(f"the last {failures} trials all scored NaN or inf")
        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in self._own(0))

    def _wait(self, n: int, waited: float) -> float:
        """The budget is claimed: wait (0.5 s, doubling to 8 s) for the running trials to finish,
        or to fail and reopen a place; returns the next wait."""
        if self.on_wait is not None:
            self.on_wait(n)
        delay = min(8.0, max(0.5, 2 * waited))
        time.sleep(delay)
        return delay

    def _stop_now(self) -> bool:
        """``should_stop`` met by a trial any worker finished (one worker's early stop ends them all)."""
        return self.should_stop is not None and any(self.should_stop(t) for t in searched(self.study))

    def _own(self, start: int) -> list[optuna.trial.FrozenTrial]:
        numbers = set(self.mine[start:])
        return [t for t in self.study.get_trials(deepcopy=False) if t.number in numbers]

    def _watch_stop(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.should_stop is not None and self.should_stop(trial):
            self.stopped = True
            study.stop()

    def _objective(self, trial: optuna.Trial) -> float:
        try:
            return self._score_trial(trial)
        finally:
            hold()  # released by the last callback, once Optuna has told the trial's end

    def _score_trial(self, trial: optuna.Trial) -> float:
        self.mine.append(trial.number)
        trial.set_user_attr(WORKER_TRIAL_ATTR, worker_id())
        lo, hi = self.encoding.bounds
        z = [trial.suggest_float(n, lo, hi) for n in self.encoding.names]
        coeffs = self.encoding.decode(z)
        trial.set_user_attr("coefficients", coeffs)
        if not self._claimed(trial.number):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SurplusTrial(f"trial {trial.number} is beyond the budget of {self.n_trials}")
        try:
            with self._heartbeat(trial.number):
                value = self.score(coeffs) if self.rungs is None else _rung_scores(trial, coeffs, self.rungs)
        except KeyboardInterrupt:  # SIGINT/SIGTERM: Optuna FAILs the trial; it does not count
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise
        if not math.isfinite(value):
            trial.set_user_attr(NONFINITE_ATTR, repr(value))
            raise NonFiniteScore(f"trial {trial.number} scored {value}")
        return value

    def _claimed(self, number: int) -> bool:
        """Whether trial ``number`` is among the first ``n_trials`` trials that count (finished or running).
        One snapshot of the trials: a trial finishing between two reads would be counted in neither."""
        counting = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        ahead = [t for t in self.study.get_trials(deepcopy=False, states=counting)
                 if t.number < number and not is_start(t)]
        return len(ahead) < self.n_trials

    def _heartbeat(self, number: int) -> contextlib.AbstractContextManager:
        from lcsc_ops.search.workers import trial_heartbeat

        if self.storage is None or isinstance(self.storage, optuna.storages.RDBStorage):
            return contextlib.nullcontext()  # RDB storages keep Optuna's own heartbeat
        return trial_heartbeat(self.storage, self.study.study_name, number)


def budgeted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that use up the budget: searched (complete, not the start trial) and pruned."""
    return searched(study) + pruned(study)


def running(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not is_start(t)]


def _rung_scores(trial: optuna.Trial, coeffs: list[float], rungs: Rungs) -> float:
    value = math.nan
    with contextlib.closing(rungs.scores(coeffs)) as values:  # a pruned trial's sampler state is released now
        for step, value in zip(rungs.steps, values):
            trial.report(value, step)
            if step != rungs.steps[-1] and trial.should_prune():
                raise optuna.TrialPruned(f"score {value:.4g} at {step} samples")
    return value
