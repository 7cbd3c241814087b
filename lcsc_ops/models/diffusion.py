"""DDPM training objective and DDIM sampling (epsilon prediction, cosine schedule).

:func:`make_sampler` builds a sampler from the ``sampler`` settings of a
:class:`lcsc_ops.spec.ModelSpec`, by name in :data:`SAMPLERS` (``"ddim"`` here,
``"consistency"``, ``"diffusers"``). A sampler turns a starting noise into images
deterministically, so candidates sampled from the same noise compare fairly (common
random numbers). Every sampler takes an optional :class:`~lcsc_ops.models.sampling.Guidance`
(the class labels of a conditional model, and the classifier-free guidance scale), in
``sample`` and, for training with labels, in ``training_loss``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.models.consistency import ConsistencySampler
from lcsc_ops.models.diffusers_unet import DiffusersSampler  # imports diffusers only when one is made
from lcsc_ops.models.dpm_solver import DPMSolverSampler  # it imports this module lazily (no cycle)
from lcsc_ops.models.sampling import Guidance, denoiser_output


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Cumulative signal level ``alpha_bar_t`` for t = 0..T-1 (Nichol & Dhariwal, Eq. 17)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0)


class DDIMSampler:
    """Deterministic DDIM (eta = 0) over ``steps`` evenly spaced timesteps of a T-step DDPM."""

    def __init__(self, steps: int = 10, timesteps: int = 1000, clip: bool = True) -> None:
        if not 1 <= int(steps) <= int(timesteps):
            raise LcscError(f"DDIM steps must be in 1..{timesteps}, got {steps}")
        self.steps, self.timesteps, self.clip = int(steps), int(timesteps), clip
        self.alpha_bar = cosine_alpha_bar(self.timesteps).float()

    @property
    def nfe(self) -> int:
        return self.steps

    def training_loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None, *,
                      step: int = 0, total_steps: int = 1, guidance: Guidance | None = None) -> torch.Tensor:
        """The simple DDPM loss: MSE between true and predicted noise at a random timestep.

        ``step`` / ``total_steps`` (the training progress, for samplers with a curriculum) are ignored;
        ``guidance`` gives a conditional model its (already dropped-out) labels.
        """
        n = x0.shape[0]
        t = torch.randint(0, self.timesteps, (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        ab = self.alpha_bar.to(x0.device)[t].view(n, *([1] * (x0.dim() - 1)))
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        return torch.mean((denoiser_output(model, x_t, t, guidance) - noise) ** 2)

    @torch.inference_mode()
    def sample(self, model: nn.Module, noise: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
        """Run DDIM from ``noise`` (x_T) to images in [-1, 1] (Song et al., Eq. 12, eta = 0), guided by
        ``guidance`` for a conditional model."""
        ab = self.alpha_bar.to(noise.device)
        ts = torch.linspace(self.timesteps - 1, 0, self.steps).round().long().tolist()
        x = noise
        x0 = x
        for i, t in enumerate(ts):
            a_t = ab[t]
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            eps = denoiser_output(model, x, tt, guidance)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            if self.clip:
                x0 = x0.clamp(-1, 1)
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            if i + 1 < len(ts):
                a_prev = ab[ts[i + 1]]
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x0


SAMPLERS: dict[str, Callable[..., Any]] = {"ddim": DDIMSampler, "consistency": ConsistencySampler,
                                           "diffusers": DiffusersSampler, "dpmpp-2m": DPMSolverSampler}


def _check_settings(name: str, cls: Callable[..., Any], settings: Mapping[str, Any]) -> None:
    """Refuse a setting the sampler does not take, rather than sample as if it were not there.

    Settings are the constructor's ordinary parameters; keyword-only ones (a ``teacher``)
    are run-time objects, never settings. A sampler taking ``**kwargs`` checks its own.
    """
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no signature to check against
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    known = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    for key in settings:
        if key not in known:
            raise LcscError(f"unknown setting {key!r} for sampler {name!r} (known: {', '.join(known)})")


def make_sampler(settings: Mapping[str, Any], **runtime: Any) -> Any:
    """Build the sampler named by ``settings['name']`` with the remaining settings.

    ``runtime`` passes objects that are not settings (a distillation ``teacher``) to the
    constructor. A setting the sampler does not take is an error, not silently ignored.
    """
    settings = dict(settings)
    name = settings.pop("name", "ddim")
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise LcscError(f"unknown sampler {name!r} (known: {', '.join(sorted(SAMPLERS))})") from None
    _check_settings(name, cls, settings)
    try:
        return cls(**{**settings, **runtime})
    except TypeError as exc:  # e.g. a missing setting
        raise LcscError(f"sampler {name!r}: {exc}") from None
