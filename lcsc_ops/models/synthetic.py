"""A model of any size, for measuring what lcsc-ops costs as the model grows (``make bench-size``).

:func:`linear_stack` builds a plain stack of ``nn.Linear`` layers holding about ``params``
parameters. Its weights mean nothing: it is a spec-nameable factory (trusted as one of the
package's own) whose checkpoints have a real model's layout, size and dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lcsc_ops.errors import LcscError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stack_shape(params: int, layers: int = 16) -> tuple[int, int]:
    """``(layers, width)`` of a stack of ``layers`` square Linear layers (weight + bias) with about
    ``params`` parameters in all; fewer layers when ``params`` is too small for 16 of width >= 8."""
    if isinstance(params, bool) or not isinstance(params, int) or params < 72:
        raise LcscError(f"params must be an integer >= 72, got {params!r}")
    layers = max(1, min(int(layers), params // 72))
    width = max(8, int((math.sqrt(1 + 4 * params / layers) - 1) / 2))  # layers * (w^2 + w) <= params
    return layers, width


def linear_stack(params: int = 10_000_000, layers: int = 16, dtype: str = "float32") -> nn.Module:
    """``nn.Sequential`` of square ``nn.Linear`` layers with about ``params`` parameters in ``dtype``.

    The weights are zeros, not random: drawing 1e9 random numbers would cost seconds every
    time the factory is called, and every use loads a checkpoint over them anyway.
    """
    if dtype not in DTYPES:
        raise LcscError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    layers, width = stack_shape(params, layers)
    with torch.device("meta"):
        model = nn.Sequential(*(nn.Linear(width, width, dtype=DTYPES[dtype]) for _ in range(layers)))
    device = torch.get_default_device()
    if device.type != "meta":  # (check_spec builds under torch.device("meta"): nothing allocated)
        model = model.to_empty(device=device)
        for p in model.parameters():
            p.detach().zero_()
    return model
