"""A worker's watchdog: when the worker dies without ending its work (``kill -9``, OOM), clean up.

Started as a small detached process next to each ``optimize`` worker. It waits for the
worker's process to end; if the worker did not finish, it waits one grace period, fails
the study's trials left RUNNING without a heartbeat, and, when no other worker of the
study is alive (each keeps ``lcsc.worker.<id>`` fresh in the study), ends the MLflow
parent run KILLED. A rerun of the same command reopens it and finishes the study.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from lcsc_ops.processes import pid_alive

STORAGE_ENV, URI_ENV = "LCSC_OPS_WATCHDOG_STORAGE", "LCSC_OPS_WATCHDOG_TRACKING_URI"


def start(study: str, storage: str, run_id: str, tracking_uri: str) -> subprocess.Popen | None:
    """Watch this process; None where a watchdog cannot be started (it is a safety net only) or
    ``LCSC_OPS_WATCHDOG=0`` turns it off (the test suite does, for in-process calls)."""
    if os.environ.get("LCSC_OPS_WATCHDOG") == "0":
        return None
    cmd = [sys.executable, "-m", "lcsc_ops.pipeline.watchdog", "--pid", str(os.getpid()), "--study", study,
           "--run-id", run_id]
    env = {**os.environ, STORAGE_ENV: storage, URI_ENV: tracking_uri}  # not on the command line: `ps` shows it
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    except OSError:
        return None


def watch(pid: int, study_name: str, storage: str, run_id: str, tracking_uri: str) -> str:
    """Wait for ``pid`` to end, then clean up after it; returns what was done."""
    while pid_alive(pid):
        time.sleep(1.0)
    from lcsc_ops.search.study import SearchStudy
    from lcsc_ops.search.workers import GRACE_PERIOD_S
    from lcsc_ops.store.runs import OptimizeRun

    run = OptimizeRun.attach(tracking_uri, run_id)
    if run.status() != "RUNNING":
        return "finished"
    time.sleep(GRACE_PERIOD_S)
    study = SearchStudy.open(study_name, storage)
    failed = study.fail_stale()
    if study.live_workers():
        return f"failed {failed}; other workers alive"
    if run.status() == "RUNNING":
        run.end("KILLED")
    return f"failed {failed}; parent run KILLED"


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("--study", "--run-id"):
        ap.add_argument(name, required=True)
    ap.add_argument("--pid", type=int, required=True)
    a = ap.parse_args()
    watch(a.pid, a.study, os.environ[STORAGE_ENV], a.run_id, os.environ[URI_ENV])


if __name__ == "__main__":
    main()
