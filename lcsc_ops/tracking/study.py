"""The Optuna side of a search: strategies, storage, and the study objective.

Strategies are Optuna samplers looked up by name in :data:`STRATEGIES`. The study is kept
in a database (a sqlite file beside the MLflow store by default), so running the same
optimization again resumes it: only the missing trials are run, and the CMA-ES state is
rebuilt from the stored trials.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import optuna

from lcsc_ops.errors import LcscError
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.tracking.evolution import EvolutionSampler


def _cmaes(seed: int, **kw: Any) -> optuna.samplers.BaseSampler:
    # The search space is centred on the strongest baseline (see AffineEncoding), so CMA-ES's
    # default mean (the middle of the bounds) starts there without the deprecated ``x0``.
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **kw)


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


def default_storage(tracking_uri: str) -> str:
    """A sqlite file next to the MLflow store: ``<dir of mlflow.db>/optuna.db``, else ``./optuna.db``."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        db = Path(tracking_uri[len("sqlite:///"):])
        return f"sqlite:///{db.parent.resolve() / 'optuna.db'}"
    if parsed.scheme in ("", "file"):
        root = Path(parsed.path or tracking_uri)
        return f"sqlite:///{root.parent.resolve() / 'optuna.db'}"
    return f"sqlite:///{Path('optuna.db').resolve()}"


def study_name(run_id: str, config: dict[str, Any]) -> str:
    """A stable name for (training run, search config): the same command resumes the same study."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"lcsc-{run_id}-{digest}"


def make_storage(url: str) -> str | optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; a sqlite file is opened in WAL mode with ``synchronous=NORMAL``.

    Each ``suggest_float`` is its own commit, so with a default (rollback-journal, fully
    synchronous) sqlite file a 32-coefficient trial spends ~90 ms in fsyncs; WAL mode
    cuts that to a third and still survives a crash of the process (only an OS crash or
    power loss can lose the last commits). Other URLs go to Optuna unchanged.
    """
    if not url.startswith("sqlite:///"):
        return url
    path = url[len("sqlite:///"):]

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(url, engine_kwargs={"creator": connect})


def open_study(name: str, storage: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(study_name=name, storage=make_storage(storage), sampler=sampler,
                                   direction="minimize", load_if_exists=True)
    except Exception as exc:  # bad URL, unreachable server, locked file
        raise LcscError(f"cannot open Optuna storage {storage!r}: {str(exc).splitlines()[0]}") from None


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def run_trials(study: optuna.Study, encoding: AffineEncoding, score: Callable[[list[float]], float],
               n_trials: int, callbacks: Sequence[Callable] = ()) -> int:
    """Run trials until the study holds ``n_trials`` complete ones; returns how many ran now.

    Each trial suggests the encoding's coordinates (fixed names and bounds, so CMA-ES never
    falls back to random sampling), decodes them to coefficients that sum to exactly 1,
    stores those as the trial's ``coefficients`` attribute and returns ``score(coefficients)``.
    """
    lo, hi = encoding.bounds

    def objective(trial: optuna.Trial) -> float:
        z = [trial.suggest_float(n, lo, hi) for n in encoding.names]
        coeffs = encoding.decode(z)
        trial.set_user_attr("coefficients", coeffs)
        return score(coeffs)

    remaining = max(0, n_trials - len(completed(study)))
    if remaining:
        study.optimize(objective, n_trials=remaining, callbacks=list(callbacks), gc_after_trial=False)
    return remaining
