"""A small U-Net denoiser for 8x8 images (the digits test bed).

Two resolutions (8x8 at ``channels``, 4x4 at ``2*channels``), GroupNorm, residual
blocks conditioned on a sinusoidal embedding of the integer timestep; ~0.3M parameters
at the default width (32). With ``num_classes`` K > 0 it is class-conditional: a learned
embedding of the label (K classes plus the null label K, for classifier-free guidance) is
added to the time embedding.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from lcsc_ops.errors import LcscError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer / DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class DigitsUNet(nn.Module):
    """Epsilon-predicting U-Net: ``forward(x_t, t) -> eps`` for (N, C, 8, 8) inputs; with
    ``num_classes`` K, ``forward(x_t, t, y)`` with labels y in 0..K (K: no class, also when y is None)."""

    def __init__(self, in_channels: int = 1, channels: int = 32, groups: int = 8, num_classes: int = 0) -> None:
        super().__init__()
        c1, c2, temb = channels, 2 * channels, 4 * channels
        self.channels, self.num_classes = channels, num_classes
        self.time_mlp = nn.Sequential(nn.Linear(channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        # No module at all when unconditional: the state dict stays what it always was.
        self.label_emb = nn.Embedding(num_classes + 1, temb) if num_classes > 0 else None
        self.inp = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, temb, groups)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down2 = ResBlock(c2, c2, temb, groups)
        self.mid = ResBlock(c2, c2, temb, groups)
        self.upsample = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.up1 = ResBlock(2 * c1, c1, temb, groups)
        self.out_norm = nn.GroupNorm(min(groups, c1), c1)
        self.out = nn.Conv2d(c1, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.channels))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise LcscError("this DigitsUNet is unconditional (num_classes=0): it takes no class labels")
        h1 = self.down1(self.inp(x), emb)
        h2 = self.down2(self.downsample(h1), emb)
        h2 = self.mid(h2, emb)
        h = self.up1(torch.cat([self.upsample(h2), h1], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def digits_unet(**kwargs) -> DigitsUNet:
    """Default factory recorded in the model spec (``lcsc_ops.models.unet:digits_unet``)."""
    return DigitsUNet(**kwargs)
