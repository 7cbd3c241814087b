"""What every sampler shares: calling the denoiser (with class labels and classifier-free
guidance for a conditional model), and noise drawn during sampling."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import Conditioning


@dataclass(frozen=True)
class Guidance:
    """Class labels for a batch, and how to sample with them.

    ``labels`` (N,) long; ``scale`` the guidance scale w (1: the conditional prediction alone,
    0: the unconditional one alone); ``null_label`` the label meaning "no class" (needed for
    w != 1); ``keyword`` None for ``model(x, t, y)``, else ``model(x, t, <keyword>=y)``.
    ``guidance[a:b]`` is the guidance of rows a..b-1 of the batch.
    """

    labels: torch.Tensor
    scale: float = 1.0
    null_label: int | None = None
    keyword: str | None = None

    def __getitem__(self, rows: slice) -> "Guidance":
        return dataclasses.replace(self, labels=self.labels[rows])


def guidance_for(conditioning: Conditioning, labels: torch.Tensor, scale: float | None = None) -> Guidance:
    """The :class:`Guidance` of a spec's conditioning for ``labels``, at ``scale`` (default: the spec's)."""
    return Guidance(labels.long(), conditioning.guidance if scale is None else float(scale), conditioning.null_label,
                    conditioning.label_keyword)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ``uncond + w (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def _call(model: nn.Module, x: torch.Tensor, t: Any, labels: torch.Tensor | None, keyword: str | None) -> torch.Tensor:
    if labels is None:
        out = model(x, t)
    elif keyword is None:
        out = model(x, t, labels)
    else:
        out = model(x, t, **{keyword: labels})
    return out.sample if hasattr(out, "sample") else out


def denoiser_output(model: nn.Module, x: torch.Tensor, t: Any, guidance: Guidance | None = None) -> torch.Tensor:
    """``model(x, t)`` as a tensor (a diffusers model's output object is unwrapped to its ``.sample``).

    With ``guidance``, the model gets the labels: at scale 1 only the conditional prediction is
    made, at 0 only the unconditional one (the null label); otherwise both in ONE forward pass
    over the batch twice (labels, then null labels), combined by :func:`cfg_combine`.
    """
    if guidance is None:
        return _call(model, x, t, None, None)
    labels = guidance.labels.to(x.device)
    if labels.shape != (x.shape[0],):
        raise LcscError(f"guidance: {tuple(labels.shape)} labels for a batch of {x.shape[0]}")
    if guidance.scale == 1.0:
        return _call(model, x, t, labels, guidance.keyword)
    if guidance.null_label is None:
        raise LcscError(f"guidance scale {guidance.scale:g} needs a null label (the model's 'no class' label)")
    null = torch.full_like(labels, guidance.null_label)
    if guidance.scale == 0.0:
        return _call(model, x, t, null, guidance.keyword)
    both_t = torch.cat([t, t]) if torch.is_tensor(t) and t.dim() > 0 else t  # a scalar t is broadcast by the model
    both = _call(model, torch.cat([x, x]), both_t, torch.cat([labels, null]), guidance.keyword)
    cond, uncond = both.chunk(2)
    return cfg_combine(cond, uncond, guidance.scale)


def noise_generator(noise: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by the content of ``noise`` (at most 4,096 strided values hashed).

    A sampler receives only the starting noise; drawing any further noise from this
    generator keeps sampling a deterministic function of it (the common random numbers of
    the search), the same on every device, while different batches get independent draws.
    """
    flat = noise.detach().flatten()
    stride = max(1, flat.numel() // 4096)
    digest = hashlib.sha256(flat[::stride][:4096].float().cpu().numpy().tobytes()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
