"""``--workers N``: N local processes on one study; this process is worker 0.

Each worker is a whole ``run_optimize`` on the same config (so any number may also join from
other hosts): they share the study, the baselines, the parent run and the final result
through the Optuna storage (see :mod:`lcsc_ops.search.workers`). Devices are dealt out
round-robin from ``--devices``; the CPU threads are split between the local workers.
"""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any, Callable

from lcsc_ops.errors import LcscError
from lcsc_ops.interrupts import forward_to, stop_forwarding
from lcsc_ops.pipeline.config import OptimizeConfig


def device_of(cfg: OptimizeConfig, worker: int) -> str:
    devices = [d.strip() for d in (cfg.devices or cfg.device).split(",") if d.strip()]
    return devices[worker % len(devices)]


def threads_per_worker(n: int) -> int:
    return max(1, (os.cpu_count() or 1) // n)


def _worker(cfg: OptimizeConfig, worker: int, cache_dir: Path | None, watchdog: bool,
            stop_below: float | None = None) -> None:
    import torch

    from lcsc_ops.interrupts import handled
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.quiet import configure

    # Its own process group: a Ctrl-C on the terminal reaches worker 0 only, which passes every
    # signal on (lcsc_ops.interrupts.forward_to), so each worker gets one and a second one means "now".
    os.setpgrp()
    configure()
    torch.set_num_threads(threads_per_worker(cfg.workers))
    solo = dataclasses.replace(cfg, workers=1, devices=None, device=device_of(cfg, worker))
    say = (lambda msg: None) if cfg.quiet else (lambda msg: print(f"[worker {worker}] {msg}", file=sys.stderr,
                                                                  flush=True))
    try:
        with handled():
            run_optimize(solo, log=say, cache_dir=cache_dir, watchdog=watchdog, stop_below=stop_below)
    except LcscError as exc:
        print(f"[worker {worker}] error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        code = getattr(exc, "exit_code", 130)
        if getattr(exc, "done", ""):
            print(f"[worker {worker}] interrupted ({getattr(exc, 'name', 'SIGINT')}) {exc.done}", file=sys.stderr,
                  flush=True)
        gc.freeze()  # everything is ended: no final collection at exit (seconds, with mlflow and torch loaded)
        sys.exit(code)


def run_workers(cfg: OptimizeConfig, run: Callable[..., dict[str, Any]], *, log: Callable[[str], None],
                cache_dir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Start workers 1..N-1 as processes, run worker 0 here with ``run``, wait for the others."""
    import torch

    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    others = [ctx.Process(target=_worker, args=(cfg, i, cache_dir, kwargs.get("watchdog", False),
                                                kwargs.get("stop_below")), name=f"lcsc-worker-{i}")
              for i in range(1, cfg.workers)]
    for p in others:
        p.start()
        forward_to(p.pid)

    def others_done() -> None:  # interrupted: they stop too (each got the signal); wait for them
        for p in others:
            p.join(timeout=8)

    try:
        torch.set_num_threads(threads_per_worker(cfg.workers))
        solo = dataclasses.replace(cfg, workers=1, devices=None, device=device_of(cfg, 0))
        report = run(solo, log=lambda msg: log(f"[worker 0] {msg}"), cache_dir=cache_dir, others_done=others_done,
                     **kwargs)
    finally:
        for p in others:
            p.join()
            stop_forwarding(p.pid)
    failed = [p.name for p in others if p.exitcode != 0]
    if failed:
        log(f"workers that failed: {', '.join(failed)} (the study holds their finished trials)")
    return report
