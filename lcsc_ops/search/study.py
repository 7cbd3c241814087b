"""The study an optimization searches in, behind a small interface of plain data.

:class:`SearchStudy` is the only object the optimize pipeline holds of Optuna: it opens or
joins the study, shares stages between workers (:meth:`SearchStudy.once`), runs trials, and
reports them as :class:`~lcsc_ops.records.TrialRecord`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import optuna
from optuna.trial import TrialState

from lcsc_ops.errors import LcscError
from lcsc_ops.interrupts import deferred
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.quiet import verbose
from lcsc_ops.records import TrialRecord
from lcsc_ops.search.storage import check_storage, is_journal_path, make_storage, storage_error
from lcsc_ops.search.strategies import make_strategy
from lcsc_ops.search.trials import (INTERRUPTED_ATTR, START_ATTR, NonFiniteScore, RungPruner, Rungs, add_start_trial,
                                    completed, pruned, run_trials, searched)
from lcsc_ops.search.workers import GRACE_PERIOD_S, WORKER_TRIAL_ATTR, Beat, fail_stale_trials, once, worker_id

WORKER_ATTR = "lcsc.worker."


def record(trial: optuna.trial.FrozenTrial) -> TrialRecord:
    duration = trial.duration.total_seconds() if trial.duration else None
    return TrialRecord(number=trial.number, state=trial.state.name, value=trial.value,
                       coefficients=tuple(trial.user_attrs.get("coefficients", ())), params=dict(trial.params),
                       duration_s=duration, rungs=dict(trial.intermediate_values),
                       start=trial.user_attrs.get(START_ATTR), worker=trial.user_attrs.get(WORKER_TRIAL_ATTR))


class SearchStudy:
    """One Optuna study: open or resume it, seed its strategy, run trials, read results."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
        self._study, self._storage = study, storage
        self.interrupted_trials: list[int] = []  # this worker's trials a signal ended FAILED
        self._created: set[int] = set()  # ids of the trials this process created
        self._record_created()

    @classmethod
    def open(cls, name: str, storage: str, *, prune: bool = False) -> "SearchStudy":
        """Create or load study ``name`` in ``storage`` (minimising; the rung pruner with ``prune``).
        Several workers may open the same study at once."""
        optuna.logging.set_verbosity(optuna.logging.WARNING if verbose() else optuna.logging.ERROR)
        try:
            backend = make_storage(storage)
            study = optuna.create_study(study_name=name, storage=backend,
                                        pruner=RungPruner() if prune else optuna.pruners.NopPruner(),
                                        direction="minimize", load_if_exists=True)
        except LcscError:
            raise
        except Exception as exc:  # bad URL, unreachable server, locked file
            raise storage_error(storage, exc) from None
        return cls(study, backend)

    @staticmethod
    def check_storage(storage: str) -> None:
        """Connect to a database ``storage`` once (creating Optuna's tables in an empty one); LcscError if
        it refuses. A journal path is only checked (nothing is written before the study opens)."""
        check_storage(storage)
        if is_journal_path(storage):
            return
        try:
            make_storage(storage)
        except LcscError:
            raise
        except Exception as exc:
            raise storage_error(storage, exc) from None

    def once(self, what: str, compute: Callable[[], Any], *, ready: Callable[[Any], bool] = lambda v: True,
             on_wait: Callable[[], None] | None = None) -> Any:
        """Study attribute ``lcsc.<what>``, computed by one worker and shared with the others
        (see :func:`~lcsc_ops.search.workers.once`)."""
        return once(self._storage, self.name, what, compute, ready=ready, on_wait=on_wait)

    @property
    def name(self) -> str:
        return self._study.study_name

    def attr(self, key: str) -> Any:
        return self._study.user_attrs.get(key)

    def set_attr(self, key: str, value: Any) -> None:
        self._study.set_user_attr(key, value)

    def use_strategy(self, name: str, seed: int, seed_points: Sequence[Sequence[float]] = ()) -> None:
        self._study.sampler = make_strategy(name, seed, seed_points)

    def add_start(self, encoding: AffineEncoding, value: float, name: str) -> bool:
        return add_start_trial(self._study, encoding, value, name)

    def run(self, encoding: AffineEncoding, score: Callable[[list[float]], float], n_trials: int,
            on_trial: Callable[[TrialRecord], None] | None = None, rungs: Rungs | None = None,
            stop_below: float | None = None, on_wait: Callable[[int], None] | None = None) -> int:
        """Run trials until ``n_trials`` searched ones are finished (by this and any other worker),
        or one (of any worker) scores below ``stop_below``; returns how many this process finished.
        ``on_wait(n)``: the budget is claimed, this worker waits for ``n`` running trials.
        On SIGINT/SIGTERM this worker's trials in flight end FAILED (:attr:`interrupted_trials`)."""
        callbacks = [lambda study, trial: on_trial(record(trial))] if on_trial is not None else []
        stop = None if stop_below is None else (lambda t: t.value is not None and t.value < stop_below)
        try:
            return run_trials(self._study, encoding, score, n_trials, callbacks, rungs=rungs, storage=self._storage,
                              should_stop=stop, on_wait=on_wait)
        except NonFiniteScore as exc:
            raise LcscError(f"search stopped: {exc}; check the checkpoints and the evaluator") from None
        except KeyboardInterrupt:
            self.interrupted_trials = self._end_own_trials()
            raise

    def _end_own_trials(self) -> list[int]:
        """FAIL the trials this process created that are still RUNNING (a signal between Optuna's ask
        and tell); returns them and the trial the signal stopped (Optuna FAILed it), by number."""
        ended = []
        for t in self._study.get_trials(deepcopy=False):
            if t._trial_id not in self._created:
                continue
            if t.state == TrialState.RUNNING:
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    self._storage.set_trial_user_attr(t._trial_id, INTERRUPTED_ATTR, True)
                    self._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                ended.append(t.number)
            elif t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR):
                ended.append(t.number)
        return ended

    def _record_created(self) -> None:
        """Note every trial this process creates, a signal held off until its id is noted: one inside
        Optuna's ask (the trial stored, not yet returned) would leave a trial nobody knows RUNNING."""
        create = self._storage.create_new_trial

        def create_new_trial(study_id: int, template_trial: Any = None) -> int:
            with deferred():
                trial_id = create(study_id, template_trial)
                self._created.add(trial_id)
            return trial_id
        self._storage.create_new_trial = create_new_trial  # this instance (an RDB cache calls it through it)

    @contextlib.contextmanager
    def worker_heartbeat(self) -> Iterator[None]:
        """Keep study attribute ``lcsc.worker.<host>-<pid>`` fresh while this worker runs; cleared
        when it stops (finished, failed or interrupted), so the others know it is gone at once."""
        key = f"{WORKER_ATTR}{worker_id()}"
        try:
            with Beat(lambda: self._study.set_user_attr(key, time.time())):
                yield
        finally:
            with contextlib.suppress(Exception):  # a store gone away: the beat just grows old
                self._study.set_user_attr(key, 0.0)

    def other_live_workers(self) -> list[str]:
        """Live workers other than this process."""
        me = worker_id()
        return [w for w in self.live_workers() if w != me]

    def live_workers(self) -> list[str]:
        """Workers whose heartbeat is younger than the grace period."""
        now = time.time()
        return [k[len(WORKER_ATTR):] for k, v in self._study.user_attrs.items()
                if k.startswith(WORKER_ATTR) and isinstance(v, (int, float)) and now - v < GRACE_PERIOD_S]

    def fail_stale(self) -> list[int]:
        """FAIL trials left RUNNING by dead workers (see :func:`~lcsc_ops.search.workers.fail_stale_trials`)."""
        return fail_stale_trials(self._study, self._storage)

    def orphans(self) -> list[TrialRecord]:
        """Finished trials whose worker is gone (or unknown: the start trial), so no live worker will
        log their child runs."""
        alive = set(self.other_live_workers())
        return [t for t in self.records() if (t.value is not None or t.pruned) and t.worker not in alive]

    def records(self) -> list[TrialRecord]:
        """Every trial, by number."""
        return [record(t) for t in self._study.get_trials(deepcopy=False)]

    def top(self, k: int) -> list[TrialRecord]:
        """The ``k`` best complete trials (the start trial included), best first."""
        return [record(t) for t in sorted(completed(self._study), key=lambda t: t.value)[:k]]

    @property
    def n_searched(self) -> int:
        return len(searched(self._study))

    @property
    def n_pruned(self) -> int:
        return len(pruned(self._study))
