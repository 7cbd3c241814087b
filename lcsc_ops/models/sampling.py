"""What every sampler shares: calling the denoiser, and noise drawn during sampling."""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def denoiser_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``model(x, t)`` as a tensor: a diffusers model's output object is unwrapped to its ``.sample``."""
    out = model(x, t)
    return out.sample if hasattr(out, "sample") else out


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
