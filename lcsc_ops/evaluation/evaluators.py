"""Building the evaluators an optimization scores with, from the model spec."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LcscError(f"device {name!r} requested but no CUDA device is visible")
    return name


@dataclass
class Evaluators:
    """The search/final evaluator, an independent second one (None for a user evaluator),
    the reference-statistics file (None for a user evaluator) and the metric's name."""

    main: Callable
    second: Callable | None
    reference_path: Path | None
    metric: str

    def with_sampler(self, settings: dict[str, Any]) -> Callable:
        """The main evaluator with another sampler (same extractor and reference): the
        baselines at the spec's default NFE when ``--nfe`` overrides it."""
        from lcsc_ops.models.diffusion import make_sampler

        other = copy.copy(self.main)
        other.sampler = make_sampler(settings)
        other.identity = {**self.main.identity, "sampler": dict(settings)}
        return other


def build_evaluators(spec: ModelSpec, *, evaluator: str | None, feature_extractor: str | None,
                     inception_weights: str | None, batch_size: int, device: str, cache_dir: Path) -> Evaluators:
    """A user's evaluator (``module:callable``), or FID under the data set's default extractor
    plus FID under a second, independently trained one."""
    from lcsc_ops.evaluation.fid import load_evaluator

    if evaluator:
        return Evaluators(load_evaluator(evaluator), None, None, "score")
    from lcsc_ops.evaluation.features import build_extractor, default_extractor_for, second_extractor_for
    from lcsc_ops.evaluation.fid import FIDScorer, ReferenceCache
    from lcsc_ops.models.diffusion import make_sampler

    sampler = make_sampler(spec.sampler)
    cache = ReferenceCache(cache_dir / "fid", device=device)
    names = [feature_extractor or default_extractor_for(spec.dataset)]
    if second_extractor_for(spec.dataset) != names[0]:
        names.append(second_extractor_for(spec.dataset))
    scorers, first_path = [], None
    for name in names:
        extractor = build_extractor(name, device=device, inception_weights=inception_weights)
        stats, path, _ = cache.get(spec.dataset, name, extractor)
        first_path = first_path or path
        scorer = FIDScorer(sampler, extractor, stats, image_shape=spec.image_shape, batch_size=batch_size,
                           device=device)
        # What the score cache keys this evaluator by.
        scorer.identity = {"fid": name, "reference": stats.metadata, "sampler": dict(spec.sampler),
                           "image_shape": list(spec.image_shape), "batch_size": batch_size}
        scorers.append(scorer)
    return Evaluators(scorers[0], scorers[1] if len(scorers) > 1 else None, first_path, "fid")
