"""Building the evaluators an optimization scores with, from the model spec; checking a spec.

A user's evaluator (``--evaluator module:callable``, called as ``(model, num_samples, seed)
-> float``, lower is better) is wrapped in :class:`UserEvaluator`, which gives the score cache
its identity: the import path, a version the user bumps (``__lcsc_version__`` on the callable,
or ``--evaluator-version``) and a hash of the module's source.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, Trust, brief_repr, source_sha256

NO_SECOND_CUSTOM = ("no second metric: the custom evaluator has none (add one with --second-evaluator "
                    "module:callable)")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LcscError(f"device {name!r} requested but no CUDA device is visible")
    return name


def default_metric_name(evaluator: str | None) -> str:
    """The metric's name when ``--metric-name`` is not given: ``fid`` for the built-in FID, ``score`` otherwise."""
    return "score" if evaluator else "fid"


class UserEvaluator:
    """A user's ``module:callable(model, num_samples, seed) -> float`` and its score-cache identity:
    the import path, the version (``version`` if given, else the callable's ``__lcsc_version__``)
    and the SHA-256 of the defining module's source."""

    def __init__(self, path: str, version: str | None = None) -> None:
        from lcsc_ops.evaluation.fid import load_evaluator

        self.path, self.fn = path, load_evaluator(path)
        own = getattr(self.fn, "__lcsc_version__", None)
        self.version = str(version) if version is not None else (None if own is None else str(own))
        self.identity = {"evaluator": path, "version": self.version, "source": source_sha256(self.fn)}

    def __call__(self, model: torch.nn.Module, num_samples: int, seed: int) -> float:
        return self.fn(model, num_samples, seed)


@dataclass
class Evaluators:
    """The search/final evaluator, a second one scored on the final seeds (None if there is none:
    ``no_second`` says why), the reference-statistics file (None for a user evaluator) and the
    metric's name (``fid``, ``score`` or ``--metric-name``). For a conditional model, ``classes``
    gives the per-class accuracy of a classifier on the main evaluator's samples (None if there
    is no classifier for its data set: ``no_classes`` says why)."""

    main: Callable
    second: Callable | None
    reference_path: Path | None
    metric: str
    second_name: str | None = None
    no_second: str | None = None
    classes: Callable | None = None
    no_classes: str | None = None

    def with_sampler(self, settings: dict[str, Any], guidance: float | None = None) -> Callable:
        """The main evaluator with another sampler (same extractor and reference) and, for a
        conditional model, another ``guidance`` scale: the baselines at the spec's default NFE and
        scale when ``--nfe`` or ``--guidance`` overrides them."""
        from lcsc_ops.models.diffusion import make_sampler

        other = copy.copy(self.main)
        other.sampler = make_sampler(settings)
        other.identity = {**self.main.identity, "sampler": dict(settings)}
        if guidance is not None and getattr(self.main, "conditioning", None) is not None:
            other.guidance_scale = float(guidance)
            other.identity["conditioning"] = {**self.main.identity["conditioning"], "guidance": float(guidance)}
        return other


def build_evaluators(spec: ModelSpec, *, evaluator: str | None, feature_extractor: str | None,
                     inception_weights: str | None, batch_size: int, device: str, cache_dir: Path,
                     metric_name: str | None = None, second_evaluator: str | None = None,
                     evaluator_version: str | None = None) -> Evaluators:
    """A user's evaluator (``module:callable``), or FID under the data set's default extractor
    plus FID under a second, independently trained one. ``second_evaluator`` (a user's
    ``module:callable``) replaces the second metric."""
    if spec.origin is not None:  # a run's data-set loader is code: the built-in trust at least
        Trust(options=False).check_dataset(spec.dataset, origin=spec.origin)
    metric = metric_name or default_metric_name(evaluator)
    second = UserEvaluator(second_evaluator, evaluator_version) if second_evaluator else None
    if evaluator:
        return Evaluators(UserEvaluator(evaluator, evaluator_version), second, None, metric,
                          second_name=second_evaluator, no_second=None if second else NO_SECOND_CUSTOM)
    scorers, names, path = _fid_scorers(spec, feature_extractor, inception_weights, batch_size, device, cache_dir,
                                        both=second is None)
    if second is not None:
        found = Evaluators(scorers[0], second, path, metric, second_name=second_evaluator)
    elif len(scorers) > 1:
        found = Evaluators(scorers[0], scorers[1], path, metric, second_name=f"fid ({names[1]} features)")
    else:
        found = Evaluators(scorers[0], None, path, metric, no_second=(
            f"no second metric: data set {spec.dataset!r} has one feature extractor ({names[0]}); add one with "
            "--second-evaluator module:callable"))
    if spec.conditioning is not None:
        found.classes, found.no_classes = _class_accuracy(spec, scorers[0], device)
    return found


def _class_accuracy(spec: ModelSpec, scorer: Any, device: str) -> tuple[Any, str | None]:
    """The per-class accuracy evaluator of a conditional model (on the main scorer's samples), or
    None and why not: only data sets with a classifier of their classes have one."""
    from lcsc_ops.evaluation.conditional import ClassAccuracy, check_classifier
    from lcsc_ops.evaluation.features import build_extractor, classifier_for

    name = classifier_for(spec.dataset)
    if name is None:
        return None, f"no class accuracy: data set {spec.dataset!r} has no classifier of its classes"
    classifier = build_extractor(name, device=device)
    try:
        check_classifier(classifier, spec.conditioning.num_classes, spec.image_shape, device)
    except LcscError as exc:
        return None, f"no class accuracy ({name}): {exc}"
    return ClassAccuracy(getattr(scorer, "inner", scorer), classifier, spec.conditioning.num_classes), None


def _fid_scorers(spec: ModelSpec, feature_extractor: str | None, inception_weights: str | None, batch_size: int,
                 device: str, cache_dir: Path, *, both: bool) -> tuple[list[Any], list[str], Path]:
    """FID scorers under the default (or given) extractor and, with ``both``, the second one."""
    from lcsc_ops.evaluation.features import build_extractor, default_extractor_for, second_extractor_for
    from lcsc_ops.evaluation.fid import FIDScorer, ReferenceCache
    from lcsc_ops.models.diffusion import make_sampler

    _check_fid_spec(spec)
    sampler = make_sampler(spec.sampler)
    cache = ReferenceCache(cache_dir / "fid", device=device)
    names = [feature_extractor or default_extractor_for(spec.dataset)]
    if both and second_extractor_for(spec.dataset) != names[0]:
        names.append(second_extractor_for(spec.dataset))
    scorers, first_path = [], None
    for name in names:
        extractor = build_extractor(name, device=device, inception_weights=inception_weights)
        stats, path, _ = cache.get(spec.dataset, name, extractor)
        first_path = first_path or path
        scorer = FIDScorer(sampler, extractor, stats, image_shape=spec.image_shape, batch_size=batch_size,
                           device=device, conditioning=spec.conditioning)
        # What the score cache keys this evaluator by.
        scorer.identity = {"fid": name, "reference": stats.metadata, "sampler": dict(spec.sampler),
                           "image_shape": list(spec.image_shape), "batch_size": batch_size}
        if spec.conditioning is not None:  # absent when unconditional: cached scores stay valid
            scorer.identity["conditioning"] = spec.conditioning.to_dict()
        scorers.append(scorer)
    return scorers, names, first_path


def _check_fid_spec(spec: ModelSpec) -> None:
    if spec.dataset is None or spec.image_shape is None:
        missing = "dataset" if spec.dataset is None else "image_shape"
        raise LcscError(f"model spec has no {missing}: the built-in FID needs a data set and an image shape "
                        "(C, H, W); score this model with --evaluator module:callable")
    if len(spec.image_shape) != 3:
        raise LcscError(f"model spec: image_shape {list(spec.image_shape)} is not (C, H, W): the built-in FID "
                        "scores images; score this model with --evaluator module:callable")


def check_spec(spec: ModelSpec) -> None:
    """LcscError (one line naming the field) unless ``spec`` can be optimized: its factory imports
    and builds an ``nn.Module``; its sampler is known, with settings it takes; its ``dataset``,
    when given, is registered or an importable ``module:callable``, and comes with an
    ``image_shape`` (C, H, W). A spec the user gives is trusted: its factory is called (on the
    meta device when it allows, so no weights are allocated). Nothing is loaded or sampled."""
    from lcsc_ops.evaluation.data import resolve_dataset
    from lcsc_ops.models.diffusion import make_sampler

    _check_builds(spec)
    try:
        make_sampler(spec.sampler)
    except LcscError as exc:
        raise LcscError(f"model spec: sampler: {exc}") from None
    if spec.dataset is not None:
        resolve_dataset(spec.dataset, "model spec: dataset")
        if spec.image_shape is None or len(spec.image_shape) != 3:
            raise LcscError(f"model spec: image_shape must be (C, H, W) with a dataset (the built-in FID scores "
                            f"images), got {spec.image_shape}; a model scored only by a custom evaluator passes "
                            "dataset=None")


def _check_builds(spec: ModelSpec) -> None:
    try:
        try:
            with torch.device("meta"):
                spec.build()
        except LcscError:
            raise
        except Exception:  # noqa: BLE001 - a factory that needs real tensors (e.g. it loads weights)
            spec.build()
    except LcscError as exc:
        raise LcscError(f"model spec: factory: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's factory may raise anything
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise LcscError(f"model spec: factory {spec.factory!r} failed with kwargs {brief_repr(spec.kwargs)}: "
                        f"{type(exc).__name__}: {first}") from None
