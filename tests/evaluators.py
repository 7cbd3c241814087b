"""User-style evaluators for tests, imported by path ("tests.evaluators:weight_energy")."""
from __future__ import annotations

CALLS: list[tuple[int, int]] = []


def weight_energy(model, num_samples, seed):
    """A deterministic score of the merged weights (lower is better); records each call."""
    CALLS.append((num_samples, seed))
    return float(sum(p.double().pow(2).sum() for p in model.parameters()))
