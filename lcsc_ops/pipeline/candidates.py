"""Candidates of an optimization: the baselines, the search's best, their averages and statistics.

The protocol (LCSC paper, Sec. 4): every candidate is scored by the same evaluator on the
same fixed noise; the strongest baseline becomes the centre of the search space; the best
candidates and every baseline are re-evaluated on fresh seeds, paired across methods. The fresh
seeds are split: the strongest baseline and the winner are chosen on the selection seeds, every
reported figure comes from the test seeds, which the choice never saw.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lcsc_ops.checkpoints import CheckpointWindow
from lcsc_ops.errors import LcscError
from lcsc_ops.math.merge import merge_state_dicts
from lcsc_ops.math.profiles import ema_decay_grid, ema_profile, embed, one_hot, quantise, uniform

FINAL_SEED_BASE = 10_000  # final seeds never overlap the search seeds (0, 1, ...)


def fresh_seeds(test: int, selection: int) -> dict[str, list[int]]:
    """The fresh seeds of the final evaluation: ``test`` seeds ``10000 + i`` (the reported figures),
    then ``selection`` more (the choice of the strongest baseline and the winner); disjoint."""
    return {"selection": [FINAL_SEED_BASE + test + i for i in range(selection)],
            "test": [FINAL_SEED_BASE + i for i in range(test)]}


@dataclass
class Candidate:
    """A merge: coefficients over some entries of the window (indices into ``window.entries``)."""

    name: str
    indices: tuple[int, ...]
    coeffs: tuple[float, ...]
    kind: str  # "baseline" or "lcsc"
    search_fid: float | None = None
    note: str = ""
    final: list[float] = field(default_factory=list)  # per test seed
    selection: list[float] = field(default_factory=list)  # per selection seed (the choice only)
    second: list[float] = field(default_factory=list)
    final_default_nfe: list[float] = field(default_factory=list)  # baselines at the spec's NFE and guidance scale
    class_accuracy: list[float] = field(default_factory=list)  # per class, mean over the final seeds (conditional)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(**{**data, "indices": tuple(data["indices"]), "coeffs": tuple(data["coeffs"])})

    def dense(self, size: int) -> list[float]:
        """The coefficients over all ``size`` entries of the window (zeros elsewhere)."""
        return embed(self.coeffs, self.indices, size)

    @property
    def final_mean(self) -> float:
        return statistics.fmean(self.final) if self.final else math.nan

    @property
    def final_std(self) -> float:
        """Standard deviation across the final seeds (NaN if a score is not finite)."""
        return _stdev(self.final) if len(self.final) > 1 else 0.0

    @property
    def selection_mean(self) -> float:
        return statistics.fmean(self.selection) if self.selection else math.nan

    @property
    def second_mean(self) -> float | None:
        return statistics.fmean(self.second) if self.second else None


def baselines(window: CheckpointWindow, ema_grid: int, score: Callable[[Candidate], float]) -> list[Candidate]:
    """Last checkpoint, uniform average, EMA* and training EMA, each with its search score.

    EMA* is the best post-hoc EMA recomputed over the saved raw checkpoints on a grid of
    rates (the paper's EMA* baseline), chosen by the same search protocol as every trial.
    """
    raw = tuple(window.indices("raw")) or tuple(window.indices())
    k = len(raw)
    out = [Candidate("last", raw, tuple(one_hot(k, k - 1)), "baseline"),
           Candidate("uniform", raw, tuple(uniform(k)), "baseline")]
    grid = [Candidate(f"ema@{g:.6g}", raw, tuple(ema_profile(k, g)), "baseline") for g in ema_decay_grid(k, ema_grid)]
    for c in grid:
        c.search_fid = score(c)
    finite = [c for c in grid if math.isfinite(c.search_fid)]
    if finite:
        best = min(finite, key=lambda c: c.search_fid)
        out.append(dataclasses.replace(best, name="ema_star", note=best.name.replace("ema@", "decay ")))
    if window.training_ema is not None:
        out.append(Candidate("training_ema", (window.entries.index(window.training_ema),), (1.0,), "baseline"))
    for c in out:
        if c.search_fid is None:
            c.search_fid = score(c)
    return out


def finite_baselines(cands: Sequence[Candidate], log: Callable[[str], None]) -> list[Candidate]:
    """The baselines whose search score is finite; the others are named and excluded."""
    bad = [c for c in cands if not math.isfinite(c.search_fid)]
    for c in bad:
        log(f"baseline {c.name} scored {c.search_fid} on the search seeds: excluded")
    good = [c for c in cands if math.isfinite(c.search_fid)]
    if not good:
        raise LcscError("every baseline scored NaN or inf: the checkpoints or the evaluator produce "
                        "non-finite values")
    return good


def centre_in_basis(cands: Sequence[Candidate], basis: Sequence[int]) -> Candidate:
    """The strongest baseline (lowest search FID) that the basis can express exactly."""
    allowed = set(basis)
    expressible = [c for c in cands if set(c.indices) <= allowed]
    if not expressible:
        raise LcscError("no baseline can be expressed in this basis")
    return min(expressible, key=lambda c: c.search_fid)


def restrict(c: Candidate, basis: Sequence[int]) -> list[float]:
    pos = {i: j for j, i in enumerate(basis)}
    out = [0.0] * len(basis)
    for i, a in zip(c.indices, c.coeffs):
        out[pos[i]] = a
    return quantise(out)


def average_coefficients(vectors: Sequence[Sequence[float]]) -> list[float]:
    """Mean of several coefficient vectors (still sums to 1): shrinks the winner's curse."""
    n = len(vectors)
    return quantise([sum(col) / n for col in zip(*vectors)])


def choose(base: Sequence[Candidate], cands: Sequence[Candidate]) -> tuple[Candidate, Candidate, Candidate]:
    """The strongest baseline, the best LCSC candidate and the winner (best of all), each by its
    mean on the selection seeds only (a non-finite mean ranks last): the test seeds stay unseen."""
    def key(c: Candidate) -> float:
        return c.selection_mean if math.isfinite(c.selection_mean) else math.inf

    return min(base, key=key), min(cands, key=key), min([*base, *cands], key=key)


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the paired differences a_i - b_i (same seed i)."""
    d = [x - y for x, y in zip(a, b)]
    if not d:
        return math.nan, math.nan
    se = _stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return statistics.fmean(d), se


def _stdev(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if all(math.isfinite(x) for x in xs) else math.nan


def merged_state(window: CheckpointWindow, cand: Candidate) -> dict[str, torch.Tensor]:
    """The candidate's merged weights, recomputed in float64 from the verified files (streamed)."""
    entries = [window.entries[i] for i in cand.indices]
    return merge_state_dicts((e.load() for e in entries), cand.coeffs)
