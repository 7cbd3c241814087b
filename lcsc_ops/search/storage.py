"""Where a study lives: an Optuna journal file beside the MLflow store by default, or any Optuna URL."""
from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
from optuna.storages.journal import JournalFileBackend

from lcsc_ops.errors import LcscError
from lcsc_ops.redact import mask_credentials

JOURNAL_FILE = "optuna.journal"
LEGACY_SQLITE_FILE = "optuna.db"


def default_storage(tracking_uri: str) -> str:
    """``optuna.journal`` beside the MLflow store (``./optuna.journal`` for a remote server).

    A journal file appends a few lines per trial instead of committing a transaction per
    ``suggest_float``; several processes may share it and ``optuna-dashboard`` opens it.
    A store that has the former default ``optuna.db`` beside it (and no journal) keeps it.
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


def check_storage(url: str) -> None:
    """Refuse a journal path that cannot be a file, before any work is done."""
    if not is_journal_path(url):
        return
    path = Path(url).expanduser()
    if path.is_dir():
        raise LcscError(f"Optuna storage {url!r} is a folder; give a journal file path or a database URL")
    if not path.parent.is_dir():
        raise LcscError(f"Optuna storage {url!r}: folder {str(path.parent)!r} does not exist")


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: a plain path is a journal file (Optuna's own
    ``JournalFileBackend``); a database URL is an ``RDBStorage`` with Optuna's heartbeat, so a
    killed worker's trial is FAILed after the grace period; ``sqlite:///`` opens in WAL mode
    (a commit per ``suggest_float`` otherwise costs an fsync each)."""
    from lcsc_ops.search.workers import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S

    check_storage(url)
    if is_journal_path(url):
        return optuna.storages.JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
    kwargs: dict[str, Any] = {"heartbeat_interval": max(1, round(HEARTBEAT_INTERVAL_S)),
                              "grace_period": max(2, round(GRACE_PERIOD_S))}
    if url.startswith("sqlite:///"):
        # A partial of a module-level function, so the storage pickles (Optuna's contract).
        kwargs["engine_kwargs"] = {"creator": functools.partial(_wal_connect, url[10:])}
    return _create_tables_once(url, kwargs)


def _create_tables_once(url: str, kwargs: dict[str, Any], attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDBStorage(url): several workers creating Optuna's tables in an empty database at once
    collide (PostgreSQL: UniqueViolation on pg_type); the loser retries and finds them made."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _wal_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def storage_error(storage: str, exc: BaseException) -> LcscError:
    """One line naming the storage (password masked) and the first line of the cause."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return LcscError(f"cannot open Optuna storage {mask_credentials(storage)!r}: {mask_credentials(first)}")
