"""Helpers shared by the performance benchmarks: interleaved timing, trial-like coefficients,
checkpoint windows on disk, and the naive merge the engine is compared with."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file


def best(xs: list[float]) -> float:
    """The fastest of interleaved repetitions: the run least disturbed by the machine's other load."""
    return min(xs)


def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each function, ``reps`` times, alternating the order every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def random_affine(k: int, seed: int = 0) -> list[float]:
    """A trial-like coefficient vector: random, summing to exactly 1 in float64."""
    c = (torch.randn(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1 + 1.0 / k).tolist()
    c[-1] = 1.0 - sum(c[:-1])
    return c


def write_window(folder: Path, channels: int, k: int) -> list[Path]:
    """K checkpoints of a DigitsUNet along a random walk, as safetensors files."""
    from lcsc_ops.models.unet import DigitsUNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = DigitsUNet(channels=channels).state_dict()
    gen, paths = torch.Generator().manual_seed(1), []
    for i in range(k):
        for t in state.values():
            if t.is_floating_point():
                t.add_(1e-3 * torch.randn(t.shape, generator=gen))
        paths.append(folder / f"step{i:04d}.safetensors")
        save_file({n: t.contiguous() for n, t in state.items()}, str(paths[-1]))
    return paths


def naive_merge(paths: list[Path], coeffs: list[float], model: torch.nn.Module, fused: bool = False) -> None:
    """The naive per-trial merge: load every state dict, a Python loop of weighted adds, load it."""
    sds = [load_file(str(p)) for p in paths]
    merged = {n: torch.zeros_like(t) for n, t in sds[0].items() if t.is_floating_point()}
    for c, sd in zip(coeffs, sds):
        for n, acc in merged.items():
            if fused:
                acc.add_(sd[n], alpha=c)
            else:
                acc += c * sd[n]
    merged.update({n: t for n, t in sds[-1].items() if not t.is_floating_point()})
    model.load_state_dict(merged)
