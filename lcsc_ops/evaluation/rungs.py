"""FID at growing sample counts (rungs) from one fixed noise, for stopping hopeless trials early.

Rung n is the mean over seeds of the FID of the first n samples of each seed's fixed noise
(common random numbers); FID is biased by the count, so only equal counts are compared.
Samples are drawn once and fed to the metric as they come, so all rungs together cost
about one full score, and a trial stopped at rung n has drawn only n samples per seed.
The last rung is the search objective: bit for bit when the rung counts are multiples of
``batch_size`` (the same batches), else up to the order of the float64 feature sums.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.fid import FIDScorer, make_noise, sample_batch

_FAKE_STATES = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


def rung_counts(num_samples: int, fractions: Sequence[float]) -> list[int]:
    """The sample count of each rung: every fraction of ``num_samples`` (rounded, at least 2),
    deduplicated and increasing, always ending with ``num_samples`` itself (the full score)."""
    if num_samples < 2:
        raise LcscError(f"rungs need at least 2 samples, got {num_samples}")
    for f in fractions:
        if not 0.0 < f < 1.0:
            raise LcscError(f"rung fractions must lie strictly between 0 and 1, got {f!r}")
    counts = {max(2, round(f * num_samples)) for f in fractions} | {num_samples}
    return sorted(c for c in counts if c <= num_samples)


def _pieces(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) cut at the multiples of ``batch_size``: the unpruned batches, split at rungs."""
    a = start
    while a < stop:
        b = min(stop, (a // batch_size + 1) * batch_size)
        yield a, b
        a = b


def fid_rungs(scorer: FIDScorer, model: nn.Module, counts: Sequence[int], seeds: Sequence[int]) -> Iterator[float]:
    """Yield, for each count n in ``counts`` (increasing), the mean over ``seeds`` of the FID of
    the first n samples of each seed's fixed noise.

    Lazy: a consumer that stops iterating (a pruned trial) stops the sampling. A seed whose
    samples turn non-finite scores ``inf`` from then on, as :meth:`FIDScorer.score_images` does.
    The model runs in eval mode (its previous mode is restored when the iterator ends).
    """
    counts = [int(c) for c in counts]
    if not counts or counts[0] < 2 or any(b <= a for a, b in zip(counts, counts[1:])):
        raise LcscError(f"rung counts must be increasing and >= 2, got {counts}")
    seeds = list(seeds)
    metric, device = scorer.metric, scorer.device
    noise = {s: make_noise(counts[-1], scorer.image_shape, s) for s in seeds}
    guidance = {s: scorer.guidance(counts[-1], s) for s in seeds}  # a conditional model's labels, else None
    states: dict[int, dict[str, torch.Tensor] | None] = {s: None for s in seeds}
    finite = {s: True for s in seeds}
    was_training = model.training
    model.eval()
    try:
        done = 0
        for n in counts:
            per_seed = []
            for s in seeds:
                if len(seeds) > 1 or done == 0:
                    _load(metric, states[s])
                for a, b in _pieces(done, n, scorer.batch_size):
                    if not finite[s]:
                        break
                    with torch.inference_mode():
                        cond = guidance[s]
                        images = sample_batch(scorer.sampler, model, noise[s][a:b].to(device),
                                              None if cond is None else cond[a:b])
                    finite[s] = bool(torch.isfinite(images).all())
                    if finite[s]:
                        with torch.no_grad():
                            metric.update(images.to(device), real=False)
                per_seed.append(_compute(metric) if finite[s] else math.inf)
                if len(seeds) > 1:
                    states[s] = {k: getattr(metric, k).clone() for k in _FAKE_STATES}
            done = n
            yield statistics.fmean(per_seed)
    finally:
        model.train(was_training)
        metric.reset()  # the fake side only (reset_real_features=False)


def _load(metric: Any, state: dict[str, torch.Tensor] | None) -> None:
    """Reset the fake side, then put back a seed's sums (None: start that seed afresh)."""
    metric.reset()
    for k, v in (state or {}).items():
        setattr(metric, k, v)


def _compute(metric: Any) -> float:
    value = float(metric.compute())
    return math.inf if math.isnan(value) else value
