"""Plain records the edges hand each other (no tracking or search library in here)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrialRecord:
    """One finished search trial, as the store logs it: coefficients, score and bookkeeping."""

    number: int
    state: str  # "COMPLETE", "PRUNED", "FAIL", "RUNNING"
    value: float | None
    coefficients: tuple[float, ...] = ()
    params: dict[str, float] = field(default_factory=dict)  # the search coordinates z00…
    duration_s: float | None = None
    rungs: dict[int, float] = field(default_factory=dict)  # score by sample count (--prune)
    start: str | None = None  # the baseline name, for the start trial
    worker: str | None = None  # "<host>-<pid>" of the worker that ran it

    @property
    def pruned(self) -> bool:
        return self.state == "PRUNED"
