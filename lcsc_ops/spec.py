"""The model spec: everything needed to rebuild and sample a model from bare weights.

A training run records one spec (as ``lcsc/spec.json`` and in every checkpoint's
safetensors metadata), so ``lcsc-ops optimize <run-id>`` needs nothing but the run id.
The factory is named by import path, so users plug in their own architectures.

A spec read from a run is untrusted input (whoever can write to the tracking store wrote
it): calling its factory runs code. Such a spec carries its ``origin`` and is built only
once :class:`Trust` allows its factory (the package's own model factories, diffusers model
classes, the module prefixes the user lists, or everything with trust-remote-code). A spec
the user gives on the command line has no origin and is trusted by definition.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from lcsc_ops.errors import LcscError

SPEC_VERSION = 1
TRUST_ENV = "LCSC_OPS_TRUST_FACTORY"
# Built-in trust: the package's model factories (any callable of these modules) and diffusers
# model classes (``diffusers:UNet2DModel``; only nn.Module classes named without dots, so not
# e.g. ``diffusers:DiffusionPipeline.from_pretrained``, which can fetch and run remote code).
TRUSTED_FACTORY_MODULES = ("lcsc_ops.models",)
TRUSTED_MODEL_CLASS_MODULES = ("diffusers",)
# Data-set loaders named by import path (``dataset="my_pkg.data:load_images"``) are code too: the
# same trust rule applies. Registered names (``"digits"``) import nothing and are always fine.
TRUSTED_DATASET_MODULES = ("lcsc_ops.evaluation.data",)
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_NAME}(?:\.{_NAME})*")


def brief_repr(value: Any, limit: int = 200) -> str:
    """``repr`` cut to one short line (for values read from a run, which may be anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def split_import_path(path: str) -> tuple[str, str]:
    """``(module, attr)`` of ``"package.module:attr"`` (or ``"package.module.attr"``), without importing."""
    if not isinstance(path, str):
        raise LcscError(f"not an import path (expected 'module:callable'): {brief_repr(path)}")
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise LcscError(f"not an import path (expected 'module:callable'): {brief_repr(path)}")
    return module_name, attr


def import_object(path: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute."""
    module_name, attr = split_import_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise LcscError(f"cannot import module {module_name!r} for {path!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LcscError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def source_sha256(obj: Any) -> str:
    """SHA-256 of the source of the module defining ``obj`` ("" when it has none, e.g. a builtin):
    part of the cache key of a user's evaluator or data-set loader, so editing it is a new key."""
    import hashlib
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(inspect.getmodule(obj)).encode()).hexdigest()  # type: ignore[arg-type]
    except (TypeError, OSError):
        return ""


# How evaluation draws class labels for a conditional model (see ``lcsc_ops.evaluation.conditional``).
LABEL_DRAWS = ("balanced",)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Conditioning:
    """A class-conditional model: its labels and how it is sampled with classifier-free guidance.

    ``num_classes``: labels 0..K-1. ``null_label``: the label meaning "no class" (the model
    was trained with labels dropped to it); None when it has none, and then ``guidance`` must
    be 1. ``guidance``: the default scale w of ``eps = eps(x, null) + w (eps(x, y) - eps(x, null))``
    (Ho & Salimans 2022; 0: unconditional, 1: conditional); ``optimize --guidance`` overrides it.
    ``labels``: how evaluation draws labels: ``"balanced"``, every class equally often, in an
    order derived from the seed, so every candidate sees the same labels. ``label_keyword``: how
    the model takes them: None for ``model(x_t, t, y)`` (the package's U-Net, users' models), a
    name for ``model(x_t, t, <name>=y)`` (``"class_labels"`` for diffusers' ``UNet2DModel``).
    Bad values raise LcscError naming the field.
    """

    num_classes: int
    null_label: int | None = None
    guidance: float = 1.0
    labels: str = "balanced"
    label_keyword: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> LcscError:
            return LcscError(f"model spec: conditioning.{name} must be {what}, got {brief_repr(getattr(self, name))}")

        if not (_is_int(self.num_classes) and self.num_classes >= 1):
            raise bad("num_classes", "an integer >= 1")
        if self.null_label is not None and not (_is_int(self.null_label) and self.null_label >= self.num_classes):
            raise bad("null_label", f"null or an integer >= num_classes ({self.num_classes}): not one of the classes")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) \
                or not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise bad("guidance", "a finite number >= 0")
        object.__setattr__(self, "guidance", float(self.guidance))
        if self.guidance != 1.0 and self.null_label is None:
            raise LcscError(f"model spec: conditioning.guidance {self.guidance:g} needs a null_label (the label the "
                            "model was trained to read as 'no class'); without one only guidance 1 samples")
        if self.labels not in LABEL_DRAWS:
            raise bad("labels", " or ".join(repr(d) for d in LABEL_DRAWS))
        if self.label_keyword is not None and not (isinstance(self.label_keyword, str)
                                                   and re.fullmatch(_NAME, self.label_keyword)):
            raise bad("label_keyword", "null (model(x_t, t, y)) or an argument name such as 'class_labels'")

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "null_label": self.null_label, "guidance": self.guidance,
                "labels": self.labels, "label_keyword": self.label_keyword}

    @classmethod
    def from_dict(cls, data: Any) -> "Conditioning":
        """The conditioning in ``data`` (as :meth:`to_dict` writes it; untrusted), every field checked."""
        if not isinstance(data, Mapping):
            raise LcscError(f"model spec: conditioning must be a JSON object or null, got {brief_repr(data)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise LcscError(f"model spec: conditioning has unknown field {unknown[0]!r} "
                            f"(known: {', '.join(sorted(fields))})")
        if "num_classes" not in data:
            raise LcscError("model spec: conditioning lacks 'num_classes'")
        return cls(**data)


def is_import_path(name: str) -> bool:
    """Whether a spec's ``dataset`` is an import path ``"module:callable"`` (code) rather than a
    registered name (``"digits"``)."""
    return ":" in name


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model from weights and how to sample it.

    ``factory`` is an import path (``"my_pkg.nets:build_unet"``) to a callable that takes
    ``**kwargs`` and returns the ``nn.Module`` whose state dict the checkpoints hold; the
    module must be importable wherever the run is optimized (install your package there).
    ``sampler`` names a sampler in :data:`lcsc_ops.models.diffusion.SAMPLERS` plus its
    settings. For the built-in FID the module is called as ``model(x_t, t)`` with integer
    timesteps and returns the noise estimate (epsilon prediction), ``dataset`` names the
    reference images (a registered name such as ``"digits"``, or an import path
    ``"my_pkg.data:load_images"`` to a callable returning a float tensor (N, C, H, W) in
    [-1, 1]) and ``image_shape`` is (C, H, W) of one sample.

    A model that is not an image model, or one scored only by a custom evaluator
    (``lcsc-ops optimize --evaluator my_pkg.eval:score``), passes ``dataset=None`` and
    ``image_shape=None`` (or its sample shape, e.g. ``(D,)``); the defaults are the digits
    test bed's. :class:`~lcsc_ops.store.logger.CheckpointLogger` checks the spec when it starts.

    ``conditioning`` (a :class:`Conditioning`, or a dict of its fields) makes the model
    class-conditional: it is then called with labels and sampled with classifier-free
    guidance. None (the default) is an unconditional model, and its spec is written as before.
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    sampler: Mapping[str, Any] = field(default_factory=lambda: {"name": "ddim", "steps": 10})
    dataset: str | None = "digits"
    image_shape: tuple[int, ...] | None = (1, 8, 8)
    conditioning: Conditioning | None = None
    # Where the spec was read from (``"run <id>"``) when it is untrusted input; None for a spec
    # the user gave (or one :meth:`Trust.vouch` allowed). Not part of the spec's value.
    origin: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "sampler", dict(self.sampler))
        if self.image_shape is not None:
            object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if "name" not in self.sampler:
            raise LcscError("model spec: sampler settings need a 'name'")
        if self.conditioning is not None and not isinstance(self.conditioning, Conditioning):
            object.__setattr__(self, "conditioning", Conditioning.from_dict(self.conditioning))

    def build(self, trust: "Trust | None" = None) -> torch.nn.Module:
        """Instantiate the (untrained) model from the factory.

        A spec read from a run (``origin`` set) is built only if ``trust`` (default: the
        built-in trust plus ``LCSC_OPS_TRUST_FACTORY``) allows its factory; the check comes
        before the factory's module is imported."""
        if self.origin is not None:
            (trust or Trust()).check(self.factory, origin=self.origin)
        factory = import_object(self.factory)
        model = factory(**self.kwargs)
        if not isinstance(model, torch.nn.Module):
            raise LcscError(f"factory {self.factory!r} returned {type(model).__name__}, not an nn.Module")
        return model

    def with_sampler(self, **overrides: Any) -> "ModelSpec":
        """A copy with some sampler settings replaced (e.g. ``steps``)."""
        return dataclasses.replace(self, sampler={**self.sampler, **overrides})

    def with_guidance(self, scale: float) -> "ModelSpec":
        """A copy sampled at guidance scale ``scale`` (``optimize --guidance``); LcscError if unconditional."""
        if self.conditioning is None:
            raise LcscError("guidance applies to class-conditional models: this model spec has no conditioning")
        return dataclasses.replace(self, conditioning=dataclasses.replace(self.conditioning, guidance=scale))

    def to_dict(self) -> dict[str, Any]:
        data = {"version": SPEC_VERSION, "factory": self.factory, "kwargs": dict(self.kwargs),
                "sampler": dict(self.sampler), "dataset": self.dataset,
                "image_shape": None if self.image_shape is None else list(self.image_shape)}
        if self.conditioning is not None:  # absent for unconditional models: their specs stay as they were
            data["conditioning"] = self.conditioning.to_dict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str | None = None) -> "ModelSpec":
        """The spec in ``data`` (as :meth:`to_dict` writes it, now or in earlier versions), every
        field's type checked, since ``data`` may come from a run; ``origin`` (e.g. ``"run <id>"``)
        marks it untrusted. ``dataset`` and ``image_shape`` may be null (no data set / no shape), and
        ``conditioning`` null or absent (an unconditional model)."""
        if not isinstance(data, Mapping):
            raise LcscError(f"model spec must be a JSON object, got {type(data).__name__}")
        if "factory" not in data:
            raise LcscError("model spec lacks 'factory'")
        factory = data["factory"]
        if not _is_import_path_text(factory):
            raise LcscError(f"model spec: factory must be an import path 'module:callable', got {brief_repr(factory)}")
        kwargs = data.get("kwargs", {})
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
            raise LcscError(f"model spec: kwargs must be a JSON object, got {brief_repr(kwargs)}")
        sampler = data.get("sampler", {"name": "ddim", "steps": 10})
        if not isinstance(sampler, Mapping) or not isinstance(sampler.get("name"), str):
            raise LcscError(f"model spec: sampler must be a JSON object with a 'name', got {brief_repr(sampler)}")
        dataset = data.get("dataset", "digits")
        if dataset is not None and not (isinstance(dataset, str) and dataset
                                        and (not is_import_path(dataset) or _is_import_path_text(dataset))):
            raise LcscError(f"model spec: dataset must be null, a registered name or an import path "
                            f"'module:callable', got {brief_repr(dataset)}")
        shape = data.get("image_shape", (1, 8, 8))
        if shape is not None and not (isinstance(shape, (list, tuple)) and shape and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise LcscError(f"model spec: image_shape must be positive integers (or null), got {brief_repr(shape)}")
        conditioning = data.get("conditioning")
        return cls(factory=factory, kwargs=kwargs, sampler=sampler, dataset=dataset,
                   image_shape=None if shape is None else tuple(shape),
                   conditioning=None if conditioning is None else Conditioning.from_dict(conditioning), origin=origin)

    @classmethod
    def from_json(cls, text: str, origin: str | None = None) -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LcscError(f"model spec is not valid JSON: {exc}") from None
        return cls.from_dict(data, origin=origin)


def _is_import_path_text(text: Any) -> bool:
    """``text`` looks like ``"pkg.module:callable"`` (or ``"pkg.module.callable"``): nothing imported."""
    return (isinstance(text, str) and re.fullmatch(rf"{_DOTTED.pattern}(?::{_DOTTED.pattern})?", text) is not None
            and (":" in text or "." in text))


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def parse_module_prefixes(text: str, what: str = "module prefixes") -> tuple[str, ...]:
    """``"a, b.c"`` -> ``("a", "b.c")``: comma-separated module prefixes (``--trust-factory``,
    ``LCSC_OPS_TRUST_FACTORY``), each a dotted module name."""
    prefixes = tuple(p.strip() for p in text.split(",") if p.strip())
    check_module_prefixes(prefixes, what)
    return prefixes


def check_module_prefixes(prefixes: tuple[str, ...], what: str = "module prefixes") -> None:
    for p in prefixes:
        if not (isinstance(p, str) and _DOTTED.fullmatch(p)):
            raise LcscError(f"{what + ': ' if what else ''}{brief_repr(p)} is not a module name like 'my_pkg' or "
                            "'my_pkg.nets'")


def env_trusted_prefixes() -> tuple[str, ...]:
    """The module prefixes listed in ``LCSC_OPS_TRUST_FACTORY`` (comma-separated)."""
    return parse_module_prefixes(os.environ.get(TRUST_ENV, ""), TRUST_ENV)


def check_factory_trusted(factory: str, trust_factory: tuple[str, ...] = (), trust_remote_code: bool = False, *,
                          origin: str = "the run", options: bool = True, what: str = "model factory") -> None:
    """LcscError unless a spec from ``origin`` may call ``factory``: with ``trust_remote_code``,
    or when the factory's module lies under a prefix of ``trust_factory`` or
    ``LCSC_OPS_TRUST_FACTORY``, or under the built-in ones (the package's model modules; for
    diffusers, only nn.Module classes). Untrusted modules are never imported; ``options`` says
    whether the refusal may point at --trust-factory / --trust-remote-code. ``what="data set
    loader"`` checks a spec's ``dataset`` import path by the same rule (built-in: the package's
    data module only)."""
    if trust_remote_code:
        return
    module, attr = split_import_path(factory)
    if not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attr):
        raise LcscError(f"{origin} names {what} {brief_repr(factory)}, which is not an import path "
                        "'module:callable'")
    model = what == "model factory"
    if _matches(module, tuple(trust_factory) + env_trusted_prefixes()
                + (TRUSTED_FACTORY_MODULES if model else TRUSTED_DATASET_MODULES)):
        return
    if model and _matches(module, TRUSTED_MODEL_CLASS_MODULES) and "." not in attr:
        obj = import_object(f"{module}:{attr}")  # a trusted library: importing it is safe
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return
    how = (f"pass --trust-factory {module} (or --trust-remote-code), or set {TRUST_ENV}={module}," if options
           else f"set {TRUST_ENV}={module}")
    why = ("which is not a diffusers model class" if model and _matches(module, TRUSTED_MODEL_CLASS_MODULES)
           else f"from an untrusted module {brief_repr(module)}")
    raise LcscError(f"{origin} names {what} {brief_repr(factory)} {why}; {how} if you trust the run's authors")


@dataclass(frozen=True)
class Trust:
    """Which model factories a spec read from a run may name (like Hugging Face's
    ``trust_remote_code``): module prefixes (``factory``, plus ``LCSC_OPS_TRUST_FACTORY`` and
    the built-in ones) or everything (``remote_code``). ``options``: whether a refusal may
    point at the --trust-factory / --trust-remote-code options (False where there are none)."""

    factory: tuple[str, ...] = ()
    remote_code: bool = False
    options: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "factory", tuple(self.factory))
        check_module_prefixes(self.factory, "--trust-factory")

    def check(self, factory: str, *, origin: str = "the run") -> None:
        """LcscError (one line, naming ``origin`` and the factory) unless ``factory`` is trusted."""
        check_factory_trusted(factory, self.factory, self.remote_code, origin=origin, options=self.options)

    def check_dataset(self, dataset: str | None, *, origin: str = "the run") -> None:
        """LcscError unless a spec from ``origin`` may load ``dataset``: a registered name (or none)
        always may; an import path ``"module:callable"`` is code, trusted like a factory."""
        if dataset is not None and is_import_path(dataset):
            check_factory_trusted(dataset, self.factory, self.remote_code, origin=origin, options=self.options,
                                  what="data set loader")

    def vouch(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` checked (its factory and its data-set loader) and marked trusted (no origin), so
        it builds and loads its data set without a check later."""
        if spec.origin is None:
            return spec
        self.check(spec.factory, origin=spec.origin)
        self.check_dataset(spec.dataset, origin=spec.origin)
        return dataclasses.replace(spec, origin=None)


# The model-spec options' defaults (lcsc-ops import, and optimize of a run that records no spec).
SPEC_DEFAULTS = {"sampler_steps": 10, "dataset": "digits", "image_shape": (1, 8, 8)}


def spec_from_options(factory: str, kwargs: Mapping[str, Any] | None = None, *, sampler_steps: int | None = None,
                      dataset: str | None = None, image_shape: tuple[int, ...] | None = None,
                      conditioning: Mapping[str, Any] | None = None) -> ModelSpec:
    """The model spec the command line describes (``--factory``, ``--factory-kwargs``, ``--sampler-steps``,
    ``--dataset``, ``--image-shape``, ``--conditioning``): DDIM, the digits and (1, 8, 8) unless
    told otherwise. The user's own words: trusted (no origin)."""
    steps = SPEC_DEFAULTS["sampler_steps"] if sampler_steps is None else sampler_steps
    return ModelSpec(factory=factory, kwargs=dict(kwargs or {}), sampler={"name": "ddim", "steps": steps},
                     dataset=SPEC_DEFAULTS["dataset"] if dataset is None else dataset,
                     image_shape=tuple(image_shape or SPEC_DEFAULTS["image_shape"]),
                     conditioning=dict(conditioning) if conditioning else None)
