"""As the model grows (issue 24): every stage of one optimization from 1e7 to 1e9 parameters.

``make bench-size`` writes ``benchmarks/results/size.json``, ``benchmarks/results/size.png`` and
the "Model size" section of ``benchmarks/RESULTS.md``. Per row, a synthetic model
(``lcsc_ops.models.synthetic:linear_stack``, named by the run's spec) is logged through
``CheckpointLogger`` (a raw + EMA pair per step), imported again through ``import``, fetched and
verified, merged by the merger ``optimize`` chooses from free memory (one trial, a stub
evaluator that costs nothing), registered and loaded back. Each stage runs in a fresh process
(``_size_stages.py``) after ``sync`` (the previous stage's writes written back first), so its peak RSS is its own, beside the floor it is held against,
measured in that process: a memory copy, reading the files once (out of the page cache), or
writing them once. ``uptime`` before and after each row goes with it: the machine is shared.

Rows are kept in ``benchmarks/work/size/rows/`` as they finish (small JSON files: a rerun resumes,
``--fresh`` starts over, ``--sizes 1e7 --fresh`` reruns one row); each row's checkpoint files,
runs and caches are removed when it ends. ``--device cuda --no-store`` is the
GPU sweep of ``gpu_check.sh``: files written with safetensors and the merge stage only (no
MLflow there), up to the largest size that fits ``--budget`` seconds; -> size_gpu.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from _results_md import replace_section  # noqa: E402

GIB = 2 ** 30
HEADING = "## Model size (make bench-size)"
# params, checkpoint steps (each a raw + EMA pair), weights' dtype, search precision (issue 24, item 3).
# The first row (1e4 parameters) is each stage's fixed cost: what it costs whatever the size (MLflow's client and
# calls, process start-up work); reported beside the others, not held to the Acceptance.
FIXED = 10 ** 4
ROWS = [(FIXED, 16, "float32", "fp32"), (10 ** 7, 16, "float32", "fp32"), (10 ** 8, 16, "float32", "fp32"),
        (3 * 10 ** 8, 8, "float32", "fp32"), (10 ** 9, 4, "bfloat16", "bf16")]
STORE_STAGES = ("log", "import", "fetch", "merge", "register", "load")
CHECKED = {"fetch": 3, "merge": 2, "register": 3, "load": 3}  # seconds <= factor x floor (Acceptance)
MAX_DISK_GIB = 60
MAX_RSS_GIB = 20


def machine_now(work: Path) -> dict:
    """Load averages, free memory and free disk now."""
    mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return {"time": dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S"),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "mem_available_gib": round(mem["MemAvailable"] / 2**20, 2),
            "disk_free_gib": round(shutil.disk_usage(work).free / GIB, 1)}


def model_bytes(params: int, dtype: str) -> int:
    from lcsc_ops.models.synthetic import stack_shape

    layers, width = stack_shape(params)
    return layers * (width * width + width) * (2 if dtype in ("bfloat16", "float16") else 4)


def run_stage(stage: str, row_dir: Path, timeout: float) -> dict:
    """One stage in a fresh process; its JSON line (SystemExit with stderr's tail if it fails)."""
    proc = subprocess.run([sys.executable, str(HERE / "_size_stages.py"), stage, str(row_dir)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} of {row_dir.name} failed:\n" + proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {stage:9s} {out['seconds']:9.3f} s  floor {out['floor_seconds']:8.3f} s  "
          f"peak {out['peak_rss_gib']:6.2f} GiB", flush=True)
    return out


def no_room(params: int, steps: int, dtype: str, work: Path) -> str | None:
    """Why a row cannot run now (None if it can): its files would pass MAX_DISK_GIB or the free disk
    (the window once, a pair more while importing), or 4 model copies would not fit the free memory."""
    model = model_bytes(params, dtype) / GIB
    need = 2 * steps * model + 2 * model + 1
    now = machine_now(work)
    if need > min(MAX_DISK_GIB, now["disk_free_gib"] - 5):
        return f"needs {need:.0f} GiB of disk, {now['disk_free_gib']} GiB free"
    if 4 * model > now["mem_available_gib"]:
        return f"4 model copies would not fit the {now['mem_available_gib']} GiB free"
    return None


def run_row(spec: tuple, work: Path, args: argparse.Namespace) -> dict:
    params, steps, dtype, precision = spec
    row_dir = work / f"p{params}"
    shutil.rmtree(row_dir, ignore_errors=True)
    row_dir.mkdir(parents=True)
    row = {"params": params, "steps": steps, "dtype": dtype, "precision": precision, "device": args.device}
    (row_dir / "row.json").write_text(json.dumps(row))
    before = machine_now(work)
    print(f"row {params:.0e}: {2 * steps} checkpoints in {dtype}; {before['uptime']}", flush=True)
    stages = {}
    try:
        for stage in (STORE_STAGES if args.store else ("files", "merge")):
            stages[stage] = run_stage(stage, row_dir, args.stage_timeout)
    finally:
        shutil.rmtree(row_dir, ignore_errors=True)
    after = machine_now(work)
    print(f"  after: {after['uptime']}", flush=True)
    return summarize(row, stages, before, after)


def summarize(row: dict, stages: dict, before: dict, after: dict) -> dict:
    """One row of size.json: the Acceptance's keys first, every stage's details under ``details``."""
    merge = stages["merge"]
    nbytes = model_bytes(row["params"], row["dtype"])
    return {"params": row["params"], "window_checkpoints": 2 * row["steps"], "window_steps": row["steps"],
            "dtype": row["dtype"], "search_precision": row["precision"], "device": row["device"],
            "mode": merge["mode"], "merge_dtype": merge["merge_dtype"], "merge_choice": merge.get("choice", ""),
            "model_gib": nbytes / GIB, "window_gib": 2 * row["steps"] * nbytes / GIB,
            "peak_rss_gib": max(s["peak_rss_gib"] for s in stages.values()),
            "stages": {name: {"seconds": s["seconds"], "floor_seconds": s["floor_seconds"],
                              "ratio": s["seconds"] / s["floor_seconds"] if s["floor_seconds"] else math.nan,
                              "peak_rss_gib": s["peak_rss_gib"]} for name, s in stages.items()},
            "details": stages, "machine_before": before, "machine_after": after}


def checks(rows: list[dict]) -> dict:
    """The Acceptance lines, each with its figures and whether it holds (the fixed-cost row is not held to them);
    ``*_above_fixed``: the same ratio for the seconds above that stage's fixed cost, for reading, not Acceptance."""
    fixed = next((r for r in rows if r["params"] == FIXED), None)
    rows = [r for r in rows if r["params"] != FIXED]
    out: dict = {"peak_rss_le_20_gib": {str(r["params"]): round(r["peak_rss_gib"], 2) for r in rows}}
    out["peak_rss_le_20_gib"]["ok"] = all(r["peak_rss_gib"] <= MAX_RSS_GIB for r in rows)
    for stage, factor in CHECKED.items():
        ratios = {str(r["params"]): round(r["stages"][stage]["ratio"], 2) for r in rows if stage in r["stages"]}
        out[f"{stage}_le_{factor}x_floor"] = {**ratios, "ok": all(v <= factor for v in ratios.values())}
        if fixed is not None and stage in fixed["stages"]:
            above = {str(r["params"]): round((r["stages"][stage]["seconds"] - fixed["stages"][stage]["seconds"])
                                             / r["stages"][stage]["floor_seconds"], 2)
                     for r in rows if stage in r["stages"]}
            out[f"{stage}_above_fixed_le_{factor}x_floor"] = {
                "fixed_seconds": round(fixed["stages"][stage]["seconds"], 3), **above,
                "ok": all(v <= factor for k, v in above.items())}
    by = {r["params"]: r for r in rows}
    if 10 ** 8 in by and 10 ** 9 in by:
        per = {}
        for stage in by[10 ** 9]["stages"]:
            a, b = (by[p]["stages"][stage]["seconds"] / by[p]["model_gib"] for p in (10 ** 8, 10 ** 9))
            per[stage] = round(b / a, 2)
        out["seconds_per_gib_1e9_over_1e8_le_2"] = {**per, "ok": all(v <= 2 for v in per.values())}
    return out


def projection(rows: list[dict]) -> dict | None:
    """What a window of 16 steps (32 checkpoints) at 1e9 would need, from the 1e9 row's measured rates."""
    big = next((r for r in rows if r["params"] == 10 ** 9), None)
    if big is None:
        return None
    scale = 16 / big["window_steps"]  # the window-sized stages grow with the window, the others do not
    s = {k: v["seconds"] for k, v in big["stages"].items()}
    d = big["details"]
    minutes = {"log": scale * (d["log"]["total_seconds"]) / 60, "import": 16 * s["import"] / 60,  # import: one pair
               "fetch": scale * s["fetch"] / 60, "merge_per_trial": scale * s["merge"] / 60,
               "register": (s["register"] + d["register"]["final_merge_seconds"] * scale) / 60, "load": s["load"] / 60}
    window = 32 * big["model_gib"]
    return {"window_checkpoints": 32, "window_gib": window, "disk_gib": {"artifact_store": window, "cache": window,
            "import_or_log_spool": big["model_gib"] * 2, "total": 2 * window + 2 * big["model_gib"]},
            "memory_gib": {"stacked_bf16_stack": window, "streaming_peak_measured": big["peak_rss_gib"]},
            "minutes": {k: round(v, 2) for k, v in minutes.items()},
            "note": "disk: a local store holds the window once and the cache once; memory: a stack would hold the "
                    "whole window, so streaming (the merge reads every file per trial); minutes scale the 1e9 "
                    "row's measured stage times by 16/4 for the window-sized stages"}


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: the JSON is the result
        print("matplotlib is not installed: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    stages = [s for s in ("log", "import", "fetch", "merge", "register", "load", "files") if s in rows[0]["stages"]]
    for stage in stages:
        xs = [r["params"] for r in rows if stage in r["stages"]]
        line, = ax.plot(xs, [r["stages"][stage]["seconds"] for r in rows if stage in r["stages"]], "o-", label=stage)
        if stage in CHECKED:
            ax.plot(xs, [r["stages"][stage]["floor_seconds"] for r in rows], ":", color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("seconds (dotted: the stage's floor)")
    ax.set_title("lcsc-ops stages vs model size (log: per checkpoint pair; merge: per trial)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "gpu": gpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                       * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}


def _fmt(s: dict) -> str:
    return f"{s['seconds']:.3g} ({s['floor_seconds']:.2g}, {s['ratio']:.1f}x)" if s["floor_seconds"] else \
        f"{s['seconds']:.3g}"


def results_md(result: dict) -> str:
    rows = result["sizes"]
    stages = [s for s in ("log", "import", "fetch", "merge", "register", "load") if s in rows[0]["stages"]]
    lines = [HEADING, "",
             f"`make bench-size`, {result['date']}, {result['machine']['cores']} CPU cores shared with other "
             f"sessions, {result['machine']['mem_total_gib']} GiB, torch {result['machine']['torch']}; "
             f"{result['sweep_minutes']:.1f} min for the rows ({', '.join(map(str, result['row_minutes']))}). "
             f"Synthetic model `lcsc_ops.models.synthetic:linear_stack` "
             "(16 square Linear layers); each step logs a raw + EMA pair through `CheckpointLogger`, the window is "
             "imported again through `import`, fetched, merged (one trial, a stub evaluator that costs nothing), "
             "registered and loaded back. Each stage in its own process, after `sync` (the previous stage's writes on disk). Cells: seconds (floor, ratio); "
             "log: loop seconds inside `step()` per pair vs a memory copy of the pair; merge: one trial vs the "
             "bytes it must move at the copy bandwidth (stacked) or the file read bandwidth (streaming); fetch "
             "and load vs reading the files once, cold; register vs writing the model once.", "",
             "| params | ckpts | dtype | mode | model GiB | peak RSS GiB | " + " | ".join(stages)
             + " | load avg before → after | started (UTC) |",
             "|---" * (8 + len(stages)) + "|"]
    for r in rows:
        cells = " | ".join(_fmt(r["stages"][s]) for s in stages)
        lines.append(f"| {r['params']:.0e} | {r['window_checkpoints']} | {r['dtype']} | {r['mode']} "
                     f"({r['merge_dtype']}) | {r['model_gib']:.2f} | {r['peak_rss_gib']:.2f} | {cells} | "
                     f"{r['machine_before']['loadavg'][0]} → {r['machine_after']['loadavg'][0]} | "
                     f"{r['machine_before']['time']} |")
    lines += ["", "Acceptance, as measured:", ""]
    for name, figures in result["checks"].items():
        shown = ", ".join(f"{k} {v}" for k, v in figures.items() if k != "ok")
        if "_above_fixed_" in name:  # for reading: not an Acceptance line
            lines.append(f"  - the same above the stage's fixed cost (the 1e4 row): {'within' if figures['ok'] else 'not within'} ({shown})")
        else:
            lines.append(f"- {name}: {'met' if figures['ok'] else '**not met**'} ({shown})")
    p = result.get("projection_16_steps_1e9")
    if p:
        lines += ["", f"A window of 16 steps at 1e9 (32 bf16 checkpoints, {p['window_gib']:.0f} GiB): disk "
                  f"{p['disk_gib']['total']:.0f} GiB with a local store (store + cache + a spooled pair); memory: "
                  f"a stack would need {p['memory_gib']['stacked_bf16_stack']:.0f} GiB, so it streams, peak "
                  f"{p['memory_gib']['streaming_peak_measured']:.1f} GiB as measured at 4 steps; minutes: "
                  + ", ".join(f"{k} {v}" for k, v in p["minutes"].items()) + "."]
    lines += ["", *NOTES, "", "Figures: `benchmarks/results/size.json`, plot `benchmarks/results/size.png`."]
    return "\n".join(lines) + "\n"


NOTES = [
    "The 1e4 row is each stage's fixed cost (what it costs at no size: MLflow's client and calls); the checks "
    "also give each ratio above it, for reading (the Acceptance holds the raw ratio).",
    "",
    "What the sweeps on this machine showed, and what changed (before -> after):",
    "",
    "- **merge (streaming)** read each file through a memory map, file after file, adding it into the float32 "
    "model: at 1e9 (8 bf16 files, 15 GiB) 60.5 s against a 8.5 s read, 7.1x, the mapped window resident beside "
    "the model. It now reads one 1 Mi-element slice of one tensor from every file with plain `pread` into a "
    "small reused buffer and adds them while the slice is in cache: 2.9 s against a 5.4 s read (the read floor "
    "goes through the page cache with one 16 MiB buffer; the merge reads 2 MiB at a time, in cache), and seconds "
    "per GiB at 1e9 over 1e8 went from 4.0 to 0.45.",
    "- **register** spent about 3 s per process before writing a byte: MLflow checks the model's pip "
    "requirements against the environment by mapping every installed file to its distribution (2.5 s), and "
    "finding the model's own distribution read `dist.files`, which stats every file torch lists (0.9 s). "
    "Our requirements are the installed versions by construction, so MLflow's check is skipped while we "
    "log the model, and the distribution is found from its RECORD lines: fixed cost 3.3 s -> 0.33 s (the 1e4 row).",
    "- **register** then wrote the model twice and checksummed it: MLflow's `Model.log` saves into a temporary "
    "folder (staged in /dev/shm) and copies it into the store, and `torch.save` computed a CRC-32 of every "
    "record, which `torch.load` never checks (tests/test_registry.py). A store on this disk now gets the files "
    "saved in place through MLflow's LoggedModel API (what `Model.log` does, less the copy; other stores keep "
    "the staged upload), written without CRC-32s: 1e8 1.65 s -> 0.97-1.09 s, 1e9 6.65 s -> 1.45-2.8 s (the three "
    "runs below); fixed cost 0.22 -> 0.17-0.21 s.",
    "- **import** checked every tensor for NaN/inf with `isfinite().all()`, about 1 GB/s here: a fifth of the "
    "import at 1e9. The check now sums first (a finite sum proves every element finite; only an overflowed sum "
    "is checked element by element): 1e9 import 27.6-35.1 s -> 18.6-19.3 s, seconds per GiB 1e9 over 1e8 1.97-2.48 -> 1.49-1.58. "
    "It still re-reads, checks, rewrites, hashes and copies every file (5-8x its read floor).",
    "- **fetch** copied each file out of the local store through MLflow, then read the copy again for its "
    "sha256 (1e7: 21.1 s against a 1.0 s cold read). A local file store's file is read once, hashed as it is "
    "copied into the cache, on up to 4 threads. This disk writes at about 200 MB/s and reads cold at about "
    "830 MB/s (dd), so a copy can cost more than its read floor once the page cache stops absorbing the writes.",
    "- **merge (stacked)** mapped the whole window beside the stack while building it: peak 2.72 GiB for a "
    "1.19 GiB stack. The stack is now built one mapped file at a time.",
    "- The final merge of a bf16 window sums in float32 (it summed in float64: 8 GB of sums at 1e9).",
    "- **register and load** import `mlflow.pytorch`, which imports Lightning when it is installed (it is here, "
    "for the foreign-run tests): seconds once per process, timed apart (`import_seconds` in size.json).",
    "- **merger choice**: without `--max-stack-memory`, `optimize` stacks when the stack takes at most half "
    "the free memory (MemAvailable, or CUDA's free memory), else streams, and logs which (`merge_choice`).",
    "",
    "What is still not met, and why:",
    "",
    "Three runs of the sweep this session (2026-12-08, idle machine, load 0.6-1.7; 02:06, 02:33, 02:51 UTC; "
    "the first before the NaN/inf check changed, which touches import only), ratio to the floor at 1e7 / 1e8 / "
    "3e8 / 1e9:",
    "",
    "| stage (line) | run 1 | run 2 | run 3 (the table above) |",
    "|---|---|---|---|",
    "| register (3x) | 5.1 / 4.0 / 3.5 / 3.3 | 7.1 / 13.7 / 6.1 / 4.0 | 6.0 / 10.4 / 4.9 / 2.0 |",
    "| load (3x) | 2.4 / 1.6 / 0.5 / 1.6 | 3.3 / 1.4 / 2.2 / 1.4 | 3.1 / 1.9 / 1.3 / 0.7 |",
    "| fetch (3x) | 3.1 / 1.6 / 1.0 / 1.0 | 2.7 / 1.9 / 1.3 / 1.4 | 2.2 / 1.8 / 1.2 / 1.4 |",
    "",
    "- **register** is not within 3x of one write. At 1e7 MLflow's fixed cost alone (the 1e4 row: 0.17-0.21 s "
    "for the first registration in a process; GitPython's probe for the source tags 0.09 s of it, then SQLite "
    "commits) is 5-6x the 0.03 s floor: no registration through MLflow meets the line there. From 1e8 the "
    "model is written once, by `torch.save`, which measured the same as the floor in the same process "
    "(0.08 s vs 0.08 s at 1e8, four times each, in a diagnostic run), yet the registration's write varies "
    "3-10x from run to run: at 1e9 the first registration took 1.45 s and a second one of the same model "
    "right after 4.0 s (`second_registration_seconds` in size.json). This VM's balloon device reports free "
    "pages to the host (virtio-balloon free page reporting), so a write into memory another process just "
    "freed pays a host fault per page (a fresh process's first 0.37 GiB plain write: 0.65 s, the next 0.085 s), "
    "and dirty pages beyond about 2 GiB are written back to a 200 MB/s disk while the writer waits. Not fixed "
    "further.",
    "- **load and fetch at 1e7** sit at the line (2.4-3.3x and 2.2-3.1x over the three runs; within 2.6x above "
    "their fixed cost). Well within from 1e8.",
    "",
    "The GPU sweep (`benchmarks/gpu_check.sh --size`: files and the merge stage, no MLflow on the GPU image, "
    "rows up to the largest that fits 5 minutes -> `benchmarks/results/size_gpu.json`) was not run: no GPU was "
    "lent; its path was run on the CPU (`bench_size.py --no-store`).",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="*", help="only these rows' params (e.g. 1e7 1e8); rows "
                                                                  "measured before are still reported")
    parser.add_argument("--fresh", action="store_true", help="rerun the (chosen) rows already measured")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-store", dest="store", action="store_false", help="files + merge only (no MLflow)")
    parser.add_argument("--budget", type=float, help="seconds: stop before a row predicted to pass it (GPU sweep)")
    parser.add_argument("--stage-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, help="JSON path (default: results/size.json, size_gpu.json on a GPU)")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "size")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    out = args.out or HERE / "results" / ("size_gpu.json" if gpu else "size.json")
    rows_dir = args.work / "rows" / ("gpu" if gpu else "cpu")
    rows_dir.mkdir(parents=True, exist_ok=True)
    plan = list(ROWS)
    t0, rows, last = time.perf_counter(), [], None
    for spec in plan:
        done = rows_dir / f"p{spec[0]}.json"
        chosen = not args.sizes or any(math.isclose(spec[0], s) for s in args.sizes)
        if done.exists() and not (args.fresh and chosen):
            rows.append(json.loads(done.read_text()))  # measured before: kept (size.json holds every row)
            continue
        if not chosen:
            continue
        if args.budget is not None and last is not None:
            predicted = last[1] * spec[0] * spec[1] / (last[0][0] * last[0][1])
            if time.perf_counter() - t0 + predicted > args.budget:
                print(f"row {spec[0]:.0e} skipped: predicted {predicted:.0f} s past the {args.budget:.0f} s budget")
                break
        why = no_room(*spec[:3], args.work)
        if why:
            print(f"row {spec[0]:.0e} not run: {why}")
            break
        t_row = time.perf_counter()
        row = run_row(spec, args.work, args)
        last = (spec, time.perf_counter() - t_row)
        done.write_text(json.dumps(row, indent=1))
        rows.append(row)
        finish(rows, out, args, (time.perf_counter() - t0) / 60, gpu)  # kept as each row ends
    return finish(rows, out, args, (time.perf_counter() - t0) / 60, gpu, measured=last is not None)


def row_minutes(row: dict) -> float:
    """Wall minutes of one row, from the clock times taken before and after it."""
    a, b = (dt.datetime.strptime(row[k]["time"], "%H:%M:%S") for k in ("machine_before", "machine_after"))
    return ((b - a).total_seconds() % 86400) / 60


def finish(rows: list[dict], out: Path, args: argparse.Namespace, minutes: float, gpu: bool,
           measured: bool = True) -> dict:
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "device": args.device, "total_minutes": minutes,
              "sweep_minutes": sum(row_minutes(r) for r in rows), "row_minutes": [round(row_minutes(r), 1) for r in rows],
              "sizes": rows, "checks": checks(rows),
              "projection_16_steps_1e9": projection(rows) if args.store else None}
    if not measured and out.exists():  # a re-render of rows measured before: keep when and how long they took
        before = json.loads(out.read_text())
        result["date"], result["total_minutes"] = before["date"], before["total_minutes"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if rows:
        plot(rows, out.with_suffix(".png"))
    if not gpu and rows and out.parent == HERE / "results":
        replace_section(HERE / "RESULTS.md", HEADING, results_md(result))
    print(json.dumps(result["checks"], indent=1))
    return result


if __name__ == "__main__":
    main()
