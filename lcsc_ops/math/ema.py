"""The training EMA: the update and its warm-up schedule (pure torch)."""
from __future__ import annotations

from typing import Mapping

import torch


def ema_decay_at(decay: float, update: int, warmup: bool = True) -> float:
    """The decay used by the ``update``-th EMA update (1, 2, ...; the EMA starts as a copy).

    With ``warmup`` it is ``min(decay, (1 + update) / (10 + update))``, the warm-up of
    diffusers' ``EMAModel`` (and timm's): early updates forget the first, untrained weights
    fast, so a short run's EMA is not dragged towards its initialisation (with a plain
    0.999 EMA, weights from the first steps still hold ~5% after 3,000 steps).
    """
    return min(decay, (1.0 + update) / (10.0 + update)) if warmup else decay


@torch.no_grad()
def ema_update_(ema: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * state`` in place; non-floating tensors are copied.

    Every floating tensor in one fused call (a per-tensor loop costs ~1 ms/step).
    """
    floats, sources = [], []
    for k, v in state.items():
        e = ema[k]
        if e.is_floating_point():
            floats.append(e)
            sources.append(v.detach())
        else:
            e.copy_(v)
    torch._foreach_lerp_(floats, sources, 1.0 - decay)
