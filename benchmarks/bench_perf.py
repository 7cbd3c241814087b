"""Per-trial cost benchmarks (issue 5): ``make bench`` writes ``benchmarks/results/perf.json``
and the "Performance" section of ``benchmarks/RESULTS.md``.

Every figure is a ratio of two things measured side by side in this one run, interleaved
(A B, B A, A B, ...) so that drift and the machine's other load hit both sides alike:

* ``merge_speedup_vs_naive``: per-trial merge of K = 32 checkpoints, the naive way (load
  the K state dicts from their safetensors files, a Python loop of weighted adds,
  ``load_state_dict``) over the engine (``StackedMerger.merge`` into a bound model) with
  the float32 stack ``lcsc-ops optimize`` builds by default. The bf16 stack of
  ``--search-precision bf16`` is measured beside it, against the same naive loop, and
  reported in the details (``merge.large_bf16``, ``merge.digits_bf16``).
* ``merge_fraction_of_memcpy``: the engine's memory throughput over a plain copy of the
  stack's bytes (both count bytes read + bytes written); per dtype in the details.
* ``trial_overhead_fraction``: share of a trial's wall time that is not sampling or
  features, over real trials: ``SearchStudy.run`` (Optuna CMA-ES, journal file) + ``TrialRunLogger``
  (MLflow child runs, sqlite) + ``Scorer`` + ``FIDScorer`` on the digits DDPM.
* ``fid_speedup_vs_recompute``: FID of one trial's samples against cached reference
  statistics, over recomputing both sides with torchmetrics (same samples, same value).
* ``streaming_peak_model_copies``: peak RSS of a streaming merge in a fresh process, above
  the peak of the same process without model or merge, in model copies.
* ``train_logging_slowdown_fraction``: step time with ``CheckpointLogger`` (every 50 steps)
  over step time without: two trainings from one seed, advanced in alternating 50-step blocks.

Microbenchmarks keep the fastest of their interleaved repetitions (the least disturbed).

``--quick`` runs tiny sizes in seconds (a smoke test; writes nothing unless ``--out``).
``--only SECTION`` (repeatable: merge, memory, trials, training) runs only those sections and
updates their entries in perf.json and their lines in RESULTS.md, leaving the rest as it is.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting turn every small op into a scheduler time slice when
# other processes share the cores: measured on the shared 2-core box, a digits training step
# took 1.8 s with the default (active) policy, 0.10 s passive and 0.08 s on one thread. Passive
# waiting keeps torch's thread count and measures the code, not the neighbours; must be set
# before torch loads OpenMP. Override by setting it in the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _perf_common import best, interleaved, naive_merge, random_affine, write_window  # noqa: E402
from _perf_report import TARGETS, update_results_md, write_results_md  # noqa: E402
from _perf_trials import bench_trials_and_fid  # noqa: E402

FULL = dict(k=32, merge_channels=160, merge_reps=10, naive_reps=5, small_reps=10, trial_channels=32, samples=1000,
            warmup_trials=2, trials=8, fid_reps=5, train_blocks=6, batch=128)
QUICK = dict(k=4, merge_channels=16, merge_reps=3, naive_reps=2, small_reps=3, trial_channels=8, samples=64,
             warmup_trials=1, trials=2, fid_reps=2, train_blocks=2, batch=32)


# -- 1. merge ------------------------------------------------------------------------------
# The stacks a user gets: float32 by default, bf16 with `lcsc-ops optimize --search-precision bf16`.
MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _stacks(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The (K, P) stacks the engine multiplies, built from the window's files as ``StackedMerger`` builds
    them: float32 checkpoints, and bf16 deviations from the last checkpoint rounded to bf16."""
    from safetensors.torch import load_file

    fp32 = torch.stack([torch.cat([t.reshape(-1).float() for t in load_file(str(p)).values() if t.is_floating_point()])
                        for p in paths])
    ref = fp32[-1].to(torch.bfloat16).float()
    bf16 = torch.empty(fp32.shape, dtype=torch.bfloat16)
    for i, row in enumerate(fp32):
        bf16[i] = row - ref
    return {"fp32": fp32, "bf16": bf16}


def _kernel_probe(paths: list[Path], coeffs: list[float], reps: int) -> dict:
    """torch's matrix-vector product alone, on the stacks of the window just measured: on one thread vs
    all of them, and bf16 with twice the rows as one product vs groups of ``CPU_16BIT_ROWS`` rows (what
    the engine does)."""
    from lcsc_ops.math.merge import StackedMerger

    threads, out = torch.get_num_threads(), {"threads": torch.get_num_threads()}
    stacks = _stacks(paths)

    def on(n: int, fn: Any) -> Any:
        def run() -> None:
            torch.set_num_threads(n)
            fn()
        return run

    try:
        for name, stack in stacks.items():
            c = torch.tensor(coeffs, dtype=torch.float64).to(stack.dtype)
            y = torch.empty(stack.shape[1], dtype=stack.dtype)
            fns = {n: on(n, lambda: torch.mv(stack.t(), c, out=y)) for n in sorted({1, threads})}
            times = interleaved(fns, reps)
            for n, t in times.items():
                out[f"{name}_mv_gb_s_{n}_threads"] = stack.numel() * stack.element_size() / best(t) / 1e9
        c = torch.tensor(coeffs, dtype=torch.float64).to(torch.bfloat16)
        rows, stack, c = StackedMerger.CPU_16BIT_ROWS, torch.cat([stacks.pop("bf16")] * 2), torch.cat([c, c])
        del stacks
        y, part = torch.empty(stack.shape[1], dtype=stack.dtype), torch.empty(stack.shape[1], dtype=stack.dtype)

        def grouped() -> None:
            torch.mv(stack[:rows].t(), c[:rows], out=y)
            for s in range(rows, stack.shape[0], rows):
                torch.mv(stack[s:s + rows].t(), c[s:s + rows], out=part)
                y.add_(part)

        times = interleaved({"single": on(threads, lambda: torch.mv(stack.t(), c, out=y)),
                             "grouped": on(threads, grouped)}, reps)
    finally:
        torch.set_num_threads(threads)
    out.update({"bf16_2k_rows": stack.shape[0], "bf16_2k_single_mv_ms": 1e3 * best(times["single"]),
                "bf16_2k_grouped_ms": 1e3 * best(times["grouped"]),
                "bf16_2k_single_mv_gb_s": stack.numel() * 2 / best(times["single"]) / 1e9})
    print(f"kernel: bf16 mv {out['bf16_mv_gb_s_1_threads']:.1f} GB/s on 1 thread, "
          f"{out[f'bf16_mv_gb_s_{threads}_threads']:.1f} on {threads}; float32 {out['fp32_mv_gb_s_1_threads']:.1f} and "
          f"{out[f'fp32_mv_gb_s_{threads}_threads']:.1f}; bf16 at {stack.shape[0]} rows: one mv "
          f"{out['bf16_2k_single_mv_ms']:.1f} ms, groups of {rows} {out['bf16_2k_grouped_ms']:.1f} ms", flush=True)
    return out


def _vs_memcpy(engine: Any, nbytes: int, reps: int) -> tuple[float, float]:
    """Best seconds of the engine and of a plain copy of ``nbytes``, alternated in the same run."""
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    times = interleaved({"engine": engine, "memcpy": lambda: dst.copy_(src)}, reps)
    return best(times["engine"]), best(times["memcpy"])


def _merge_rows(folder: Path, channels: int, reps: int, cfg: dict, probe: bool = False) -> dict[str, dict]:
    """Engine (each stack dtype) vs naive, interleaved in one group, then each engine vs a copy of its stack's bytes."""
    from lcsc_ops.math.streaming import make_merger
    from lcsc_ops.models.unet import DigitsUNet

    paths = write_window(folder, channels, cfg["k"])
    coeffs = random_affine(cfg["k"])
    engines = {}
    for name, dtype in MERGE_DTYPES.items():
        engines[name] = make_merger(paths, dtype=dtype)  # as the Scorer builds it (no memory limit: stacked)
        engines[name].bind(DigitsUNet(channels=channels))
    target = DigitsUNet(channels=channels)
    fns = {f"engine_{n}": (lambda m=m: m.merge(coeffs)) for n, m in engines.items()}
    times = interleaved({**fns, "naive": lambda: naive_merge(paths, coeffs, target),
                         "naive_fused": lambda: naive_merge(paths, coeffs, target, fused=True)}, reps)
    naive, fused = best(times["naive"]), best(times["naive_fused"])
    rows = {}
    for name, merger in engines.items():
        params, engine = merger.num_parameters, best(times[f"engine_{name}"])
        row = {"dtype": name, "channels": channels, "params": params, "k": cfg["k"], "stack_bytes": merger.nbytes,
               "engine_ms": 1e3 * engine, "naive_ms": 1e3 * naive, "naive_fused_ms": 1e3 * fused,
               "speedup_vs_naive": naive / engine, "speedup_vs_naive_fused": fused / engine}
        engine_s, memcpy_s = _vs_memcpy(fns[f"engine_{name}"], merger.nbytes, cfg["merge_reps"])
        written = params * merger.dtype.itemsize
        row["engine_gb_s"] = (merger.nbytes + written) / engine_s / 1e9  # stack read + merge written
        row["memcpy_gb_s"] = 2 * merger.nbytes / memcpy_s / 1e9          # read + written
        row["fraction_of_memcpy"] = row["engine_gb_s"] / row["memcpy_gb_s"]
        rows[name] = row
        print(f"merge [{params / 1e6:.2f}M params x K={cfg['k']}, {name} stack {merger.nbytes / 1e6:.0f} MB]: engine "
              f"{row['engine_ms']:.2f} ms, naive {row['naive_ms']:.1f} ms ({row['speedup_vs_naive']:.1f}x), naive "
              f"fused {row['naive_fused_ms']:.1f} ms ({row['speedup_vs_naive_fused']:.1f}x); engine "
              f"{row['engine_gb_s']:.1f} GB/s vs memcpy {row['memcpy_gb_s']:.1f} GB/s "
              f"({row['fraction_of_memcpy']:.2f})", flush=True)
    if probe:
        del engines, fns, merger  # free the engines' stacks before the probe builds its own
        rows["kernel"] = _kernel_probe(paths, coeffs, cfg["merge_reps"])
    return rows


def bench_merge(work: Path, cfg: dict) -> dict:
    """A model big enough for memory traffic to dominate, then the digits model the trials use."""
    large = _merge_rows(work / "merge-large", cfg["merge_channels"], cfg["naive_reps"], cfg, probe=True)
    digits = _merge_rows(work / "merge-digits", cfg["trial_channels"], cfg["small_reps"], cfg)
    return {"large": large["fp32"], "digits": digits["fp32"], "large_bf16": large["bf16"],
            "digits_bf16": digits["bf16"], "kernel": large["kernel"], "window_dir": str(work / "merge-large")}


# -- 2. peak memory ------------------------------------------------------------------------
def bench_memory(window_dir: str | None, cfg: dict, work: Path) -> dict:
    if window_dir is None:  # run without the merge section: write the same window
        window_dir = str(write_window(work / "merge-large", cfg["merge_channels"], cfg["k"])[0].parent)

    def probe(mode: str) -> dict:
        cmd = [sys.executable, str(HERE / "_peak_rss.py"), mode, str(cfg["merge_channels"]), window_dir]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])

    from lcsc_ops.models.unet import DigitsUNet

    model_bytes = sum(t.numel() * t.element_size() for t in DigitsUNet(channels=cfg["merge_channels"]).state_dict().values())
    runs = {m: [probe(m) for _ in range(2)] for m in ("baseline", "streaming")}
    runs["stacked"] = [probe("stacked")]
    base = statistics.fmean(r["peak_rss_bytes"] for r in runs["baseline"])
    peak = {m: max(r["peak_rss_bytes"] for r in rs) for m, rs in runs.items()}
    out = {"model_bytes": model_bytes, "k": cfg["k"], "baseline_peak_bytes": base,
           "streaming_peak_bytes": peak["streaming"], "stacked_peak_bytes": peak["stacked"],
           "streaming_copies": (peak["streaming"] - base) / model_bytes,
           "stacked_copies": (peak["stacked"] - base) / model_bytes,
           "streaming_merge_ms": 1e3 * min(r["merge_seconds"] for r in runs["streaming"]),
           "stacked_merge_ms_first": 1e3 * runs["stacked"][0]["merge_seconds"]}
    print(f"memory [model {model_bytes / 2**20:.1f} MiB, K={cfg['k']}, K x model {cfg['k'] * model_bytes / 2**20:.0f} MiB]: "
          f"stacked +{(peak['stacked'] - base) / 2**20:.0f} MiB ({out['stacked_copies']:.1f} copies), "
          f"streaming +{(peak['streaming'] - base) / 2**20:.0f} MiB ({out['streaming_copies']:.2f} copies), "
          f"baseline {base / 2**20:.0f} MiB", flush=True)
    return out


# -- 5. training ---------------------------------------------------------------------------
class _Run:
    """One digits DDPM training (plain loop, fixed seed) that advances block by block."""

    def __init__(self, cfg: dict, logger: Any = None) -> None:
        from lcsc_ops.evaluation.data import load_dataset
        from lcsc_ops.models.diffusion import DDIMSampler
        from lcsc_ops.models.unet import DigitsUNet

        torch.manual_seed(0)
        self.images, self.model = load_dataset("digits"), DigitsUNet(channels=cfg["trial_channels"]).train()
        self.sampler, self.batch, self.logger = DDIMSampler(steps=10), cfg["batch"], logger
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=2e-3)
        self.gen = torch.Generator().manual_seed(0)
        self.step, self.in_logger = 0, 0.0

    def block(self, steps: int) -> float:
        """Wall seconds of the next ``steps`` optimizer steps; with a logger, its upload is waited for at the end."""
        t0 = time.perf_counter()
        for _ in range(steps):
            x0 = self.images[torch.randint(0, len(self.images), (self.batch,), generator=self.gen)]
            loss = self.sampler.training_loss(self.model, x0, generator=self.gen)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.logger is not None:
                t1 = time.perf_counter()
                self.logger.step(self.model, self.step)
                self.in_logger += time.perf_counter() - t1
        if self.logger is not None:
            self.logger.wait()  # the whole upload is charged to this block: an upper bound
        return time.perf_counter() - t0


def bench_training(work: Path, cfg: dict) -> dict:
    """Two trainings from the same seed, one with a CheckpointLogger (every 50 steps), advanced in
    alternating 50-step blocks (A B, B A, ...) so that the machine's other load hits both alike."""
    from mlflow.tracking import MlflowClient

    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.store.logger import CheckpointLogger

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("bench-training", artifact_location=(work / "artifacts").as_uri())
    spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": cfg["trial_channels"]})
    logger = CheckpointLogger(spec, every=50, ema_decay=0.999, run_id=client.create_run(exp).info.run_id,
                              tracking_uri=uri)
    runs = {"off": _Run(cfg), "on": _Run(cfg, logger)}
    times: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(cfg["train_blocks"] + 1):  # the first round warms up, untimed
        for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
            seconds = runs[mode].block(50)
            if r:
                times[mode].append(seconds)
    logger.close()
    steps = 50 * cfg["train_blocks"]
    off, on = sum(times["off"]) / steps, sum(times["on"]) / steps
    in_logger = runs["on"].in_logger / runs["on"].step
    out = {"blocks": cfg["train_blocks"], "block_steps": 50, "timed_steps": steps, "batch": cfg["batch"],
           "every": 50, "checkpoint_files": len(logger.entries), "step_ms_off": 1e3 * off, "step_ms_on": 1e3 * on,
           "block_slowdowns": [a / b - 1.0 for a, b in zip(times["on"], times["off"])], "slowdown": on / off - 1.0,
           "logger_step_ms": 1e3 * in_logger, "logger_step_fraction": in_logger / off}
    print(f"training [{cfg['train_blocks']} x 50 timed steps each, alternated, checkpoints every 50]: {1e3 * off:.1f} "
          f"ms/step without, {1e3 * on:.1f} with ({out['slowdown']:+.1%}; blocks "
          f"{', '.join(f'{p:+.0%}' for p in out['block_slowdowns'])}); inside CheckpointLogger.step "
          f"{out['logger_step_ms']:.2f} ms/step ({out['logger_step_fraction']:.1%})", flush=True)
    return out


def machine() -> dict:
    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch": torch.__version__, "python": platform.python_version(), "load_average_start": os.getloadavg()}


# section -> (its keys in "details", its headline figures and where they come from)
SECTIONS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "merge": (("merge",), {"merge_speedup_vs_naive": ("merge", "large", "speedup_vs_naive"),
                           "merge_fraction_of_memcpy": ("merge", "large", "fraction_of_memcpy")}),
    "memory": (("memory",), {"streaming_peak_model_copies": ("memory", "streaming_copies")}),
    "trials": (("trial", "fid"), {"trial_overhead_fraction": ("trial", "overhead_fraction"),
                                  "fid_speedup_vs_recompute": ("fid", "speedup")}),
    "training": (("training",), {"train_logging_slowdown_fraction": ("training", "slowdown")}),
}


def _figure(details: dict, path: tuple[str, ...]) -> float:
    value: Any = details
    for key in path:
        value = value[key]
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (writes nothing by default)")
    parser.add_argument("--only", action="append", choices=tuple(SECTIONS), metavar="SECTION",
                        help=f"run only this section ({', '.join(SECTIONS)}; repeatable) and update only its entries "
                             "in perf.json and its lines in RESULTS.md")
    parser.add_argument("--out", type=Path, help="perf.json path (default: benchmarks/results/perf.json)")
    parser.add_argument("--results-md", type=Path, help="RESULTS.md path (default: benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out = args.out or (None if args.quick else HERE / "results" / "perf.json")
    md = args.results_md or (None if args.quick else HERE / "RESULTS.md")
    only = [name for name in SECTIONS if name in (args.only or SECTIONS)]
    partial = len(only) < len(SECTIONS)
    info = machine()
    started = time.perf_counter()
    (HERE / "work").mkdir(exist_ok=True)
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=HERE / "work", prefix="perf-") as tmp:
        work = Path(tmp)
        if "merge" in only:
            details["merge"] = bench_merge(work, cfg)
        window_dir = details.get("merge", {}).pop("window_dir", None)
        if "memory" in only:
            details["memory"] = bench_memory(window_dir, cfg, work)
        if "trials" in only:
            details["trial"], details["fid"] = bench_trials_and_fid(work, cfg)
        if "training" in only:
            details["training"] = bench_training(work, cfg)
    info["load_average_end"] = os.getloadavg()
    figures = {key: _figure(details, path) for name in only for key, path in SECTIONS[name][1].items()}
    command = ("make bench" if not args.quick else "python benchmarks/bench_perf.py --quick") if not partial else \
        "python benchmarks/bench_perf.py" + (" --quick" if args.quick else "") + "".join(f" --only {n}" for n in only)
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    seconds = time.perf_counter() - started
    if partial:
        # Only these sections' entries change; the file keeps the rest (and says which run made what).
        result = json.loads(out.read_text()) if out is not None and out.is_file() else {"details": {}}
        result.update(figures)
        result["details"].update(details)
        for name in only:
            result.setdefault("section_runs", {})[name] = {"date": date, "command": command, "seconds": seconds,
                                                           "machine": info, "quick": args.quick}
    else:
        result = {**figures, "targets": {key: f"{op} {value}" for key, (op, value) in TARGETS.items()},
                  "details": details, "machine": info, "date": date, "command": command, "seconds": seconds,
                  "quick": args.quick}
    print("\n" + "\n".join(f"{key:34s} {figures[key]:10.3f}   target {op} {value}"
                            for key, (op, value) in TARGETS.items() if key in figures))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if md is not None:
        if not partial:
            write_results_md(md, result)
        elif all(key in result for key in TARGETS):
            update_results_md(md, result, only)
        else:
            print(f"not writing {md}: {out} lacks the other sections' figures (run without --only first)")
            md = None
        if md is not None:
            print(f"wrote {md}")
    return result


if __name__ == "__main__":
    main()
