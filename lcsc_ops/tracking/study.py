"""The Optuna side of a search: strategies, storage, and the study objective.

Strategies are Optuna samplers looked up by name in :data:`STRATEGIES`. The study is kept
in an Optuna storage (a journal file beside the MLflow store by default), so running the same
optimization again resumes it: only the missing trials are run, and the CMA-ES state is
rebuilt from the stored trials.

With ``--prune`` a trial reports its score at growing sample counts (rungs) and
:class:`RungPruner` stops one that is already worse than most complete trials were at the
same count. Pruned trials teach the strategies nothing: CMA-ES learns from complete trials
only (``consider_pruned_trials=False``, Optuna's advice beside a median-type pruner; a
pruned trial's last value is an FID from fewer samples, biased upwards, and CMA-ES would
otherwise rank it as if it were complete), so a generation is filled with extra trials;
:class:`~lcsc_ops.tracking.evolution.EvolutionSampler` draws parents from complete trials
only; random search ignores history.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import optuna
from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file  # the lock Optuna's own append_logs takes
from optuna.storages.journal._storage import JournalOperation

from lcsc_ops.errors import LcscError
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.tracking.evolution import EvolutionSampler


def _cmaes(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    # The search space is centred on the strongest baseline (see AffineEncoding), so CMA-ES's
    # default mean (the middle of the bounds) starts there without the deprecated ``x0``.
    # consider_pruned_trials=False (Optuna's default, said here on purpose): CMA-ES never
    # ranks a pruned trial's FID from fewer samples among full-count ones (see the module doc).
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, consider_pruned_trials=False,
                                        **kw)


STRATEGIES: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "cmaes": _cmaes,
    "cmaes-sep": lambda seed: _cmaes(seed, use_separable_cma=True),
    "cmaes-margin": lambda seed: _cmaes(seed, with_margin=True),
    "evolution": lambda seed: EvolutionSampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def make_strategy(name: str, seed: int) -> optuna.samplers.BaseSampler:
    try:
        return STRATEGIES[name](seed)
    except KeyError:
        raise LcscError(f"unknown search strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})") from None


JOURNAL_FILE = "optuna.journal"
LEGACY_SQLITE_FILE = "optuna.db"


def default_storage(tracking_uri: str) -> str:
    """The study's home beside the MLflow store: ``<dir of mlflow.db>/optuna.journal``
    (``./optuna.journal`` for a remote tracking server).

    An Optuna journal file (``JournalFileBackend``) rather than sqlite: every trial appends
    a few lines instead of committing a transaction per ``suggest_float``, which measured
    13 ms per trial against 38 ms for sqlite in WAL mode (``make bench``, 32 coordinates),
    and it is still safe for several processes and resumable. ``optuna-dashboard`` opens
    it directly. A store that already has the old default ``optuna.db`` beside it, and no
    journal, keeps using that database, so studies started before stay resumable.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        folder = Path(tracking_uri[len("sqlite:///"):]).parent.resolve()
    elif parsed.scheme in ("", "file"):
        folder = Path(parsed.path or tracking_uri).parent.resolve()
    else:
        folder = Path.cwd()
    journal, legacy = folder / JOURNAL_FILE, folder / LEGACY_SQLITE_FILE
    if legacy.is_file() and not journal.exists():
        return f"sqlite:///{legacy}"
    return str(journal)


def study_name(run_id: str, config: dict[str, Any]) -> str:
    """A stable name for (training run, search config): the same command resumes the same study."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"lcsc-{run_id}-{digest}"


def is_journal_path(storage: str) -> bool:
    """A storage given as a plain file path (no URL scheme) is an Optuna journal file."""
    scheme = urlparse(storage).scheme
    return scheme == "" or (len(scheme) == 1 and storage[1:3] in (":\\", ":/"))  # C:\... on Windows


_DURABLE_OPS = {JournalOperation.CREATE_STUDY, JournalOperation.DELETE_STUDY, JournalOperation.SET_STUDY_USER_ATTR,
                JournalOperation.SET_STUDY_SYSTEM_ATTR, JournalOperation.SET_TRIAL_STATE_VALUES,
                JournalOperation.DISCARD_TRIALS}


class TrialDurableJournalFile(JournalFileBackend):
    """Optuna's ``JournalFileBackend``, fsyncing only the writes that a resumed study relies on.

    Optuna fsyncs every append, and a trial appends one log per ``suggest_float``: 32 fsyncs
    for 32 coordinates (11 of the 17 ms a trial spends in Optuna here). This backend fsyncs
    the logs that create or change a study and those that end a trial (its state and value);
    the others are written and flushed to the OS at once, under the same file lock, and
    become durable with the trial's end (fsync covers every earlier write to the file). A
    crash of the process loses nothing; an OS crash or power loss can lose the coordinates of
    the trial that was running, which was not resumable anyway (the WAL/``synchronous=NORMAL``
    trade-off of :func:`make_storage`'s sqlite, one trial later). A torn last line is what
    Optuna's reader already skips.
    """

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        if any(log.get("op_code") in _DURABLE_OPS for log in logs):
            return super().append_logs(logs)
        text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        with get_lock_file(self._lock):
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()


def make_storage(url: str) -> str | optuna.storages.BaseStorage:
    """An Optuna storage for ``url``.

    * a plain file path: an Optuna journal file (``JournalStorage`` on a ``JournalFileBackend``
      that fsyncs at trial ends, see :class:`TrialDurableJournalFile`; the default, see
      :func:`default_storage`); plain Optuna reads it as any journal file;
    * ``sqlite:///...``: opened in WAL mode with ``synchronous=NORMAL``. Each
      ``suggest_float`` is its own commit, so with a default (rollback-journal, fully
      synchronous) sqlite file a 32-coefficient trial spends ~90 ms in fsyncs; WAL mode cuts
      that to a third and still survives a crash of the process (only an OS crash or power
      loss can lose the last commits);
    * any other URL (postgresql://, mysql://, ...) goes to Optuna unchanged.
    """
    if is_journal_path(url):
        path = Path(url).expanduser()
        if path.is_dir():
            raise LcscError(f"Optuna storage {url!r} is a folder; give a journal file path or a database URL")
        if not path.parent.is_dir():
            raise LcscError(f"Optuna storage {url!r}: folder {str(path.parent)!r} does not exist")
        return optuna.storages.JournalStorage(TrialDurableJournalFile(str(path)))
    if not url.startswith("sqlite:///"):
        return url
    path = url[len("sqlite:///"):]

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(url, engine_kwargs={"creator": connect})


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


def open_study(name: str, storage: str, sampler: optuna.samplers.BaseSampler,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create or load the study ``name``; ``pruner`` (default: none) acts on reported rung scores."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(study_name=name, storage=make_storage(storage), sampler=sampler,
                                   pruner=pruner or optuna.pruners.NopPruner(), direction="minimize",
                                   load_if_exists=True)
    except LcscError:
        raise
    except Exception as exc:  # bad URL, unreachable server, locked file
        raise LcscError(f"cannot open Optuna storage {storage!r}: {str(exc).splitlines()[0]}") from None


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
