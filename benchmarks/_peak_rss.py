"""Peak resident memory of one merge, measured in a fresh process (run by bench_perf.py).

    python benchmarks/_peak_rss.py MODE CHANNELS CKPT_DIR

MODE is ``baseline`` (the same imports, no model), ``stacked`` (a StackedMerger over every
``*.safetensors`` in CKPT_DIR, built by ``make_merger`` as the Scorer does, a bound model,
one merge) or ``streaming`` (a StreamingMerger over the same files, a bound model, one
merge). Prints one JSON line: the process's peak RSS (``VmHWM``, file-backed mapped pages included) and the
merge's wall time. ``VmHWM`` belongs to the address space exec created, whereas ``ru_maxrss``
survives exec and would report the parent's peak at fork.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from lcsc_ops.math.streaming import StreamingMerger, make_merger
from lcsc_ops.models.unet import DigitsUNet


def main() -> None:
    mode, channels, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    paths = sorted(folder.glob("*.safetensors"))
    k = len(paths)
    coeffs = [1.0 / k] * k
    seconds = 0.0
    if mode != "baseline":
        if mode == "stacked":
            merger = make_merger(paths)
        elif mode == "streaming":
            merger = StreamingMerger(paths)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        merger.bind(DigitsUNet(channels=channels))
        t0 = time.perf_counter()
        merger.merge(coeffs)
        seconds = time.perf_counter() - t0
    status = Path("/proc/self/status").read_text().splitlines()
    peak_kib = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
    print(json.dumps({"mode": mode, "k": k, "peak_rss_bytes": peak_kib * 1024, "merge_seconds": seconds,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
