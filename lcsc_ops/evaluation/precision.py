"""How evaluations compute (``--search-precision``): stack dtype, autocast, TF32."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Precision:
    """``stack_dtype``: the merge stack's dtype; ``autocast``: the dtype sampling and features
    run in under ``torch.autocast``; ``tf32``: TF32 matmuls and convolutions on CUDA."""

    stack_dtype: torch.dtype
    autocast: torch.dtype | None = None
    tf32: bool = False


PRECISIONS = {"fp32": Precision(torch.float32), "tf32": Precision(torch.float32, tf32=True),
              "bf16": Precision(torch.bfloat16, autocast=torch.bfloat16)}


@contextlib.contextmanager
def precision_context(name: str, device: str | torch.device) -> Iterator[None]:
    """Run the enclosed evaluations at precision ``name``, restoring torch's TF32 flags after.

    ``fp32`` switches TF32 off for the duration (PyTorch allows it for cuDNN convolutions by
    default), so a full-precision evaluation is full precision on CUDA too.
    """
    p = PRECISIONS[name]
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = p.tf32
    try:
        with torch.autocast(torch.device(device).type, dtype=p.autocast or torch.bfloat16,
                            enabled=p.autocast is not None):
            yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
