"""Machine load while a benchmark runs: sampled into its saved state, so a resumed run keeps it."""
from __future__ import annotations

import math
import os
import statistics
import threading
import time
from typing import Any


def mean_load(state: dict[str, Any]) -> float:
    """Mean 1-minute load average sampled while stages ran (inf when none was sampled)."""
    samples = state.get("load_samples") or []
    return statistics.fmean(samples) if samples else math.inf


def sample_load(state: dict[str, Any], every_s: float = 30.0) -> None:
    """Append the 1-minute load average to ``state["load_samples"]`` every ``every_s``, in a daemon thread."""

    samples = state.setdefault("load_samples", [])  # the key is added here, not while the state is being saved

    def loop() -> None:
        while True:
            samples.append(os.getloadavg()[0])
            time.sleep(every_s)

    threading.Thread(target=loop, daemon=True).start()
