"""The model spec: everything needed to rebuild and sample a model from bare weights.

A training run records one spec (as ``lcsc/spec.json`` and in every checkpoint's
safetensors metadata), so ``lcsc-ops optimize <run-id>`` needs nothing but the run id.
The factory is named by import path, so users plug in their own architectures.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from lcsc_ops.errors import LcscError

SPEC_VERSION = 1


def import_object(path: str) -> Any:
    """Import ``"package.module:attr"`` (or ``"package.module.attr"``) and return the attribute."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise LcscError(f"not an import path (expected 'module:callable'): {path!r}")
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


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model from weights and how to sample it.

    ``factory`` is an import path (``"my_pkg.nets:build_unet"``) to a callable that takes
    ``**kwargs`` and returns the ``nn.Module`` whose state dict the checkpoints hold. The
    module is called as ``model(x_t, t)`` with integer timesteps and returns the noise
    estimate (epsilon prediction). ``sampler`` names a sampler in
    :data:`lcsc_ops.models.diffusion.SAMPLERS` plus its settings; ``dataset`` names the
    reference data set used for FID; ``image_shape`` is (C, H, W) of one sample.
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    sampler: Mapping[str, Any] = field(default_factory=lambda: {"name": "ddim", "steps": 10})
    dataset: str = "digits"
    image_shape: tuple[int, ...] = (1, 8, 8)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        object.__setattr__(self, "sampler", dict(self.sampler))
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        if "name" not in self.sampler:
            raise LcscError("model spec: sampler settings need a 'name'")

    def build(self) -> torch.nn.Module:
        """Instantiate the (untrained) model from the factory."""
        factory = import_object(self.factory)
        model = factory(**self.kwargs)
        if not isinstance(model, torch.nn.Module):
            raise LcscError(f"factory {self.factory!r} returned {type(model).__name__}, not an nn.Module")
        return model

    def with_sampler(self, **overrides: Any) -> "ModelSpec":
        """A copy with some sampler settings replaced (e.g. ``steps``)."""
        return dataclasses.replace(self, sampler={**self.sampler, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_VERSION, "factory": self.factory, "kwargs": dict(self.kwargs),
                "sampler": dict(self.sampler), "dataset": self.dataset,
                "image_shape": list(self.image_shape)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        try:
            return cls(factory=data["factory"], kwargs=data.get("kwargs", {}),
                       sampler=data.get("sampler", {"name": "ddim", "steps": 10}),
                       dataset=data.get("dataset", "digits"),
                       image_shape=tuple(data.get("image_shape", (1, 8, 8))))
        except KeyError as exc:
            raise LcscError(f"model spec lacks {exc.args[0]!r}") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise LcscError(f"model spec is not valid JSON: {exc}") from None
