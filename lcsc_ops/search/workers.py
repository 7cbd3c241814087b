"""Several workers on one study: locks, shared results and dead-trial detection, on any Optuna storage.

A lock is a marker study named ``<study>:lock:<what>``: creating a study is atomic in every
Optuna storage (a unique name in a database, one replay order in a journal file), so exactly
one worker creates it. The holder keeps a heartbeat in the marker's attributes; a marker whose
heartbeat is older than the grace period belongs to a dead worker and is taken over.

Trials of a killed worker: on RDB storages Optuna's own heartbeat fails them
(``heartbeat_interval``/``grace_period``, see :mod:`.storage`). The journal file has no
heartbeat, so each worker records one per running trial (user attribute ``lcsc.heartbeat``)
and :func:`fail_stale_trials` fails RUNNING trials whose heartbeat is older than the grace
period. A FAILed trial does not count against ``--n-trials``: another trial replaces it.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

HEARTBEAT_ATTR = "lcsc.heartbeat"
WORKER_TRIAL_ATTR = "lcsc.worker"  # on a trial: the worker that runs it


def worker_id() -> str:
    """This process as a worker: ``<host>-<pid>``."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"
# A killed worker's trial is FAILed after GRACE_PERIOD_S without a heartbeat (env overrides for tests).
HEARTBEAT_INTERVAL_S = float(os.environ.get("LCSC_OPS_HEARTBEAT_S", "5"))
GRACE_PERIOD_S = float(os.environ.get("LCSC_OPS_GRACE_S", "20"))


class Beat:
    """A background thread that calls ``beat()`` every ``interval`` seconds while it runs."""

    def __init__(self, beat: Callable[[], None], interval: float = HEARTBEAT_INTERVAL_S) -> None:
        self._beat, self._interval = beat, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lcsc-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(Exception):  # a missed beat only makes the holder look older
                self._beat()

    def __enter__(self) -> "Beat":
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class StudyLock:
    """A lock shared by every worker of a study (see the module doc)."""

    def __init__(self, storage: optuna.storages.BaseStorage, name: str, grace: float = GRACE_PERIOD_S) -> None:
        self.storage, self.name, self.grace = storage, name, grace
        self._study_id: int | None = None

    def try_acquire(self) -> bool:
        try:
            self._study_id = self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], self.name)
        except optuna.exceptions.DuplicatedStudyError:
            self._break_if_stale()
            return False
        self.beat()
        return True

    def beat(self) -> None:
        self.storage.set_study_user_attr(self._study_id, HEARTBEAT_ATTR, time.time())

    def release(self) -> None:
        if self._study_id is not None:
            with contextlib.suppress(KeyError):
                self.storage.delete_study(self._study_id)
            self._study_id = None

    def _break_if_stale(self) -> None:
        try:
            study_id = self.storage.get_study_id_from_name(self.name)
            beat = self.storage.get_study_user_attrs(study_id).get(HEARTBEAT_ATTR, 0.0)
        except KeyError:
            return  # released meanwhile
        if time.time() - beat > self.grace:
            with contextlib.suppress(KeyError):
                self.storage.delete_study(study_id)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with Beat(self.beat):
            try:
                yield
            finally:
                self.release()


def once(storage: optuna.storages.BaseStorage, study_name: str, what: str, compute: Callable[[], Any], *,
         ready: Callable[[Any], bool] = lambda v: True, poll: float = 1.0,
         on_wait: Callable[[], None] | None = None) -> Any:
    """Study attribute ``lcsc.<what>``: computed by exactly one worker (the one that takes the
    lock), waited for by the others. ``ready(value)`` says whether a stored value is current;
    a holder that dies is replaced after the grace period."""
    key = f"lcsc.{what}"
    study_id = storage.get_study_id_from_name(study_name)
    lock = StudyLock(storage, f"{study_name}:lock:{what}")
    while True:
        value = storage.get_study_user_attrs(study_id).get(key)
        if value is not None and ready(value):
            return value
        if lock.try_acquire():
            with lock.held():
                value = storage.get_study_user_attrs(study_id).get(key)
                if value is None or not ready(value):
                    value = compute()
                    storage.set_study_user_attr(study_id, key, value)
                return value
        if on_wait is not None:
            on_wait()
        time.sleep(poll)


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage,
                      grace: float = GRACE_PERIOD_S) -> list[int]:
    """FAIL the RUNNING trials whose heartbeat (or start, if they never beat) is older than
    ``grace`` seconds; returns their numbers. On an RDB storage with Optuna's heartbeat, Optuna's
    record decides (its grace period): those trials carry no ``lcsc.heartbeat``, and a live trial
    of another worker must not be failed for running longer than ``grace``."""
    if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None:
        return _fail_stale_rdb_trials(study, storage, grace)
    now = time.time()
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if now - (t.user_attrs.get(HEARTBEAT_ATTR) or _started(t, now)) > grace]
    return _fail(study, storage, stale)


def _fail_stale_rdb_trials(study: optuna.Study, storage: optuna.storages.RDBStorage, grace: float) -> list[int]:
    """Optuna's heartbeat FAILs the RUNNING trials whose beat stopped, but skips a trial that never
    beat: its worker died after ``study.ask`` created it (and ran the sampler) and before the
    heartbeat's first record, so before the objective suggested anything. Such a trial, without
    params and started more than ``grace`` seconds ago, is FAILed here, or it would hold its place
    in the budget forever."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = time.time()
    never_beat = [t for t in running if not t.params and now - _started(t, now) > grace]
    failed = set(_fail(study, storage, never_beat, unless=lambda t: bool(t.params)))
    failed |= {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    return [t.number for t in running if t.number in failed]


def _started(trial: optuna.trial.FrozenTrial, now: float) -> float:
    return trial.datetime_start.timestamp() if trial.datetime_start else now


def _fail(study: optuna.Study, storage: optuna.storages.BaseStorage, trials: list[optuna.trial.FrozenTrial],
          unless: Callable[[optuna.trial.FrozenTrial], bool] = lambda t: False) -> list[int]:
    """FAIL ``trials`` (marked ``lcsc.stale``) unless a fresh read of one says ``unless``."""
    failed = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in trials:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        if unless(storage.get_trial(trial_id)):
            continue
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_user_attr(trial_id, "lcsc.stale", True)
            if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                failed.append(t.number)
    return failed


@contextlib.contextmanager
def trial_heartbeat(storage: optuna.storages.BaseStorage, study_name: str, number: int,
                    interval: float = HEARTBEAT_INTERVAL_S) -> Iterator[None]:
    """Record ``lcsc.heartbeat`` on trial ``number`` every ``interval`` seconds while it runs."""
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    with Beat(lambda: storage.set_trial_user_attr(trial_id, HEARTBEAT_ATTR, time.time()), interval):
        yield
