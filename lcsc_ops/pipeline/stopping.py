"""An ``optimize`` worker stopped by SIGINT or SIGTERM: what it ends, and the one line that says so.

Before the search nothing needs ending (the verified checkpoints stay in the cache; a study
lock is released on the way out). From the search on, the trial in flight has ended FAILED
(it does not count: a rerun runs another in its place), and the parent run ends KILLED once
no other worker of the study is alive; a rerun of the same command reopens it and finishes.
"""
from __future__ import annotations

from typing import Any, Callable

from lcsc_ops.interrupts import Interrupted, interrupted

RESUME = "the same command resumes"


def before_search(exc: BaseException, stage: str) -> Interrupted:
    """Stopped while fetching the checkpoints or scoring the baselines."""
    return interrupted(exc, f"while {stage}: no trial had started, nothing to end; {RESUME}")


def after_search_began(exc: BaseException, search: Any, n_trials: int, stage: str,
                       others_done: Callable[[], None] | None = None) -> Interrupted:
    """Stopped in the search or the final evaluation: end the parent run KILLED unless another
    worker of the study still runs (``others_done`` first waits for this command's own)."""
    if others_done is not None:
        others_done()
    study, run = search.study, search.run
    ended = study.interrupted_trials
    trials = (f"trial {', '.join(map(str, ended))} ended FAILED (not counted)" if ended
              else "no trial was in flight")
    if study.other_live_workers():
        parent = f"parent run {run.run_id} left to the other workers"
    else:
        run.end("KILLED")
        parent = f"parent run {run.run_id} KILLED"
    return interrupted(exc, f"during {stage}: {trials}; {study.n_searched} of {n_trials} trials kept in study "
                            f"{study.name}; {parent}; {RESUME}")
