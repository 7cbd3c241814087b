"""What the size sweep's stages share: the synthetic spec, floors (memory copy, cold file reads,
one write), page-cache eviction, peak RSS, the state handed from stage to stage."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from lcsc_ops.spec import ModelSpec

GIB = 2 ** 30
EXPERIMENT = "lcsc-bench-size"


def peak_rss_gib() -> float:
    """``VmHWM`` of this process (file pages it mapped included), in GiB."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM:"))) * 1024 / GIB


def spec_of(row: dict) -> ModelSpec:
    """The synthetic model's spec: a factory the run names, no data set (scored by a stub)."""
    return ModelSpec(factory="lcsc_ops.models.synthetic:linear_stack",
                     kwargs={"params": row["params"], "dtype": row["dtype"]},
                     sampler={"name": "ddim", "steps": 1}, dataset=None, image_shape=None)


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (written back first), so the next read is cold."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_once(paths: list[Path]) -> float:
    """Seconds to read every file once with plain reads into one reused 16 MiB buffer."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - t0


def cold(paths: list[Path], fn: Callable[[], Any]) -> tuple[float, Any]:
    """``fn()`` timed with ``paths`` out of the page cache."""
    evict(paths)
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def copy_seconds(nbytes: int, device: str = "cpu", reps: int = 3) -> float:
    """Seconds for one memory copy of ``nbytes`` (best of ``reps``), scaled from at most 256 MiB."""
    n = min(nbytes, 256 << 20) // 4  # beyond the caches the rate is the same; a bigger buffer would raise the peak
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best * nbytes / (n * 4)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def write_seconds(folder: Path, tensors: list[torch.Tensor]) -> float:
    """Seconds to write these tensors' bytes once into a file in ``folder`` (then removed)."""
    path = folder / "floor-write.bin"
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for t in tensors:
            f.write(memoryview(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy()))
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(row_dir: Path, **values: Any) -> None:
    state = load_json(row_dir / "state.json")
    state.update(values)
    (row_dir / "state.json").write_text(json.dumps(state, indent=1))
