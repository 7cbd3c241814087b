"""`make bench-slots`: do the logger's shared-memory slots still pay for themselves? (issue 25, item 8)

A pair (raw + EMA) of at most 8 MiB is handed to the uploader process through a slot in
/dev/shm (one fused copy); a larger pair is snapshotted in the training process and written
to a spool file by a thread. This runs one loop that keeps its own EMA (``ema=``) in three
arms, side by side in one process, taking turns in blocks (bench_scale's method): no logger,
the logger as shipped (slots), and the logger with slots switched off, so every pair takes the
large-pair path. Models: the fast 2-D model (on one thread, its fastest setting) and the digits
U-Net. Figures: benchmarks/results/slots.json and a section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import bench_scale
from bench_scale import ARMS, _digits_task, _fast_task, _Loop, _row, log  # also puts the repo on sys.path
from _results_md import replace_section

RESULTS = bench_scale.HERE / "results" / "slots.json"
SECTION = "## Shared-memory slots: kept or not (make bench-slots)"
NO_SLOTS = "own_ema_logged_no_slots"
ARMS_HERE = ("plain_ema", "own_ema_logged", NO_SLOTS)


class _NoSlotsLoop(_Loop):
    """The logged arm with ``Slots.fits`` false: every pair is snapshotted and spooled by a thread."""

    def run(self, steps: int) -> None:
        from lcsc_ops.store import logger

        with mock.patch.object(logger.Slots, "fits", staticmethod(lambda raw, ema: False)):
            super().run(steps)


def _loop(arm: str, task: dict[str, Any], uri: str) -> _Loop:
    return _NoSlotsLoop(arm, task, uri) if arm == NO_SLOTS else _Loop(arm, task, uri)


def measure(quick: bool) -> dict[str, Any]:
    import mlflow

    from lcsc_ops import ModelSpec

    ARMS[NO_SLOTS] = (True, True)
    work = Path(tempfile.mkdtemp(prefix="lcsc-slots-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment("slots").experiment_id
    fast = {**_fast_task(), "spec": ModelSpec(factory="bench_scale:fast_model"), "experiment_id": experiment_id}
    digits = {**_digits_task(), "spec": ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": 32}),
              "experiment_id": experiment_id}
    rows = {"fast_1thread": (fast, 1000 if quick else 4000, 200, 1 if quick else 5, 1),
            "digits": (digits, 100 if quick else 600, 50 if quick else 100, 1 if quick else 3, None)}
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                           "load_before": os.getloadavg()[0], "quick": quick, "rows": {}}
    for name, (task, steps, block, reps, threads) in rows.items():
        row = _row(task, steps, block, reps, ARMS_HERE, uri, threads, make_loop=_loop)
        sps = {arm: row[f"steps_per_s_{arm}"] for arm in ARMS_HERE}
        row["cost_slots"] = sps["plain_ema"] / sps["own_ema_logged"] - 1.0
        row["cost_no_slots"] = sps["plain_ema"] / sps[NO_SLOTS] - 1.0
        out["rows"][name] = row
        log(f"{name}: " + ", ".join(f"{a} {v:.0f}" for a, v in sps.items()) + f" steps/s; logging costs "
            f"{row['cost_slots']:+.1%} with slots, {row['cost_no_slots']:+.1%} without")
    out["load_after"] = os.getloadavg()[0]
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [SECTION, "",
             f"{res['date']}, {res['machine']}, load average {res['load_before']:.2f} before, {res['load_after']:.2f} "
             "after. One loop keeping its own EMA (`ema=`), a checkpoint pair every 50 steps, three arms side by side "
             "taking turns in blocks (bench-scale's method), medians of the repetitions; cost = steps/s lost against "
             "the same loop unlogged.", "",
             "| model | unlogged steps/s | logged, slots (as shipped) | logged, slots off (snapshot + spool thread) |",
             "|---|---|---|---|"]
    for name, row in res["rows"].items():
        lines.append(f"| {name} ({row['steps']} steps × {len(row['runs']['plain_ema'])} reps) | "
                     f"{row['steps_per_s_plain_ema']:.0f} | {row['steps_per_s_own_ema_logged']:.0f} "
                     f"({row['cost_slots']:+.1%}) | {row[f'steps_per_s_{NO_SLOTS}']:.0f} ({row['cost_no_slots']:+.1%}) |")
    lines.append("")
    won_all = {}
    for name, row in res["rows"].items():  # the arms of one repetition ran side by side: compare them pairwise
        pairs = list(zip(row["runs"]["own_ema_logged"], row["runs"][NO_SLOTS]))
        wins = sum(a > b for a, b in pairs)
        won_all[name] = wins == len(pairs)
        gains = ", ".join(f"{a / b - 1:+.1%}" for a, b in pairs)
        lines.append(f"- {name}: the slots arm was faster than the slots-off arm in {wins} of {len(pairs)} "
                     f"repetitions ({gains}).")
    if "fast_1thread" in won_all:
        lines += ["", ("Kept: on the fast loop the slots arm won every repetition." if won_all["fast_1thread"] else
                       "Not shown: the slots arm did not win every repetition on the fast loop; the slots are a "
                       "candidate for removal.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short repetition: a plumbing check, writes no results")
    ap.add_argument("--report", action="store_true", help="rewrite the RESULTS.md section from slots.json, no run")
    args = ap.parse_args()
    if args.report:
        replace_section(bench_scale.HERE / "RESULTS.md", SECTION, markdown(json.loads(RESULTS.read_text())))
        return
    res = measure(args.quick)
    if args.quick:
        print(markdown(res))
        return
    RESULTS.write_text(json.dumps(res, indent=1) + "\n")
    replace_section(bench_scale.HERE / "RESULTS.md", SECTION, markdown(res))
    log(f"wrote {RESULTS} and the RESULTS.md section")


if __name__ == "__main__":
    main()
