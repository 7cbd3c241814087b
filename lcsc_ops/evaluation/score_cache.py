"""Scores already computed, kept on disk so that no evaluation is ever run twice.

A score is keyed by everything that decides it: checkpoint files (sha256), coefficients,
merge mode and dtype, model spec, evaluator, sample count, seed, precision, runtime (torch,
device, threads) and the scoring code itself (:func:`code_identity`), so a hit is the
float a recomputation would give and a code change never returns an old score. Repeated
optimizations of one run score the same baselines on the same seeds and reuse them.
One sqlite file (WAL, shared by concurrent processes); a corrupt or unwritable file turns
the cache off rather than failing an optimization.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable

import torch


def score_key(**parts: Any) -> str:
    """SHA-256 of the JSON of ``parts`` (sorted keys; floats by ``repr``, so exact)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


# The modules whose code decides a score: merging, models and samplers, features and FID.
SCORING_CODE = ("lcsc_ops.math.merge", "lcsc_ops.math.streaming", "lcsc_ops.models", "lcsc_ops.evaluation.fid",
                "lcsc_ops.evaluation.features", "lcsc_ops.evaluation.data", "lcsc_ops.evaluation.precision",
                "lcsc_ops.pipeline.scoring")


def code_identity(modules: Iterable[str] = SCORING_CODE) -> dict[str, str]:
    """The package version and a SHA-256 over the source files of ``modules`` (packages: every .py in them)."""
    import importlib.util

    import lcsc_ops

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin)
        files = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"lcsc_ops": lcsc_ops.__version__, "code": h.hexdigest()}


def runtime_identity(device: str | torch.device) -> dict[str, Any]:
    """What about this process can change a score's last bits."""
    dev = torch.device(device)
    ident: dict[str, Any] = {"torch": torch.__version__, "device": dev.type, "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        ident["gpu"] = torch.cuda.get_device_name(dev)
    return ident


class ScoreCache:
    """``get(key) -> float | None`` and ``put(key, value)`` over a sqlite file; counts hits and misses."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.hits = self.misses = 0
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL)")
            db.commit()
            self._db = db
        except (sqlite3.Error, OSError):
            self._db = None  # no cache rather than no optimization

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def get(self, key: str) -> float | None:
        if self._db is None:
            return None
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error:
                row = None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(row[0])

    def put(self, key: str, value: float) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Iterable[tuple[str, float]]) -> None:
        """Store several scores in one transaction (one commit per evaluation call, not per seed)."""
        rows = [(k, float(v)) for k, v in items]
        if self._db is None or not rows:
            return
        with self._lock:
            try:
                self._db.executemany("INSERT OR REPLACE INTO scores (key, value) VALUES (?, ?)", rows)
                self._db.commit()
            except sqlite3.Error:
                pass  # a score not cached is only recomputed later

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
