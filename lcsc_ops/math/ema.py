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


class EmaPlan:
    """Which EMA tensor follows which tensor of a state: built once, applied every step.

    The state's tensors are views of the model's weights, which the optimizer updates in
    place, so one plan serves every step until a weight is replaced (see the logger). Every
    floating tensor is updated in one fused call (a per-tensor loop costs ~1 ms/step).
    """

    def __init__(self, ema: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
        self.floats, self.sources, self.copies = [], [], []
        for k, v in state.items():
            e, v = ema[k], v.detach()
            if e.is_floating_point():
                self.floats.append(e)
                self.sources.append(v)
            else:
                self.copies.append((e, v))

    def apply_(self, decay: float) -> None:
        """``ema = decay * ema + (1 - decay) * state`` in place; non-floating tensors are copied."""
        with torch.no_grad():
            for e, v in self.copies:
                e.copy_(v)
            torch._foreach_lerp_(self.floats, self.sources, 1.0 - decay)


def ema_update_(ema: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor], decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * state`` in place; non-floating tensors are copied."""
    EmaPlan(ema, state).apply_(decay)
