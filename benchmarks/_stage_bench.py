"""Shared machinery of the issue-14 stages (`make bench-cm`, `bench-nfe`, `bench-strategies`).

Each stage keeps its own work folder (benchmarks/work/<name>, or work/quick-<name> with
``--quick``): an MLflow store, an Optuna journal, a checkpoint/score cache and a state.json
that saves every finished step, so a rerun resumes (``--fresh`` starts over). The DDPM run
they share is bench-quality's (benchmarks/work/full, or work/quick), trained there with
bench-quality's own stage when missing, then imported into the stage's store: the stages
run in any order and never write into bench-quality's store. Figures are merged into
benchmarks/results/quality.json under the stage's own key; each stage replaces its own
section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from _load import mean_load, sample_load

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # two torch processes share the cores: do not spin
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
RESULTS = HERE / "results" / "quality.json"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Which of the recipe's step counts / search seeds to run (--tries, --seeds): a subset keeps the saved steps.
SUBSET_KEYS = ("tries", "seeds")


def _identity(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in recipe.items() if k not in SUBSET_KEYS}


class StageBench:
    """A stage's work folder, its saved steps and the library calls every stage makes."""

    def __init__(self, name: str, mode: str, recipe: dict[str, Any], fresh: bool) -> None:
        self.name, self.mode, self.r = name, mode, recipe
        self.work = HERE / "work" / (name if mode == "full" else f"quick-{name}")
        if fresh and self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "reports").mkdir(parents=True, exist_ok=True)
        self.state_path = self.work / "state.json"
        self.state: dict[str, Any] = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        recipe_json = json.loads(json.dumps(recipe))
        if self.state and _identity(self.state.get("recipe", {})) != _identity(recipe_json):
            raise SystemExit(f"error: {self.work} holds steps of another recipe; rerun with --fresh to discard them")
        self.state["recipe"] = recipe_json
        self.enter()
        self.uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self.storage = str(self.work / "optuna.journal")
        self.t0 = time.perf_counter() - self.state.get("elapsed_s", 0.0)
        self._sampling = False

    def enter(self) -> None:
        """This stage's folder as the working directory (MLflow puts a sqlite store's artifacts
        under ./mlruns) and its cache as the library's."""
        os.environ["LCSC_OPS_CACHE"] = str(self.work / "cache")
        os.chdir(self.work)

    # --- bookkeeping ---------------------------------------------------------------------
    def save(self) -> None:
        self.state["elapsed_s"] = self.elapsed()
        self.state_path.write_text(json.dumps(self.state, indent=1))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def load_mean(self) -> float | None:
        """Mean 1-minute load average over this stage's passes; None when none was sampled (older runs)."""
        m = mean_load(self.state)
        return None if math.isinf(m) else m

    def working(self) -> None:
        """Sample the load from the first step this pass runs (a pass that only summarises adds none)."""
        if not self._sampling:
            self._sampling = True
            sample_load(self.state)

    def stage(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.state:
            self.working()
            t = time.perf_counter()
            self.state[key] = fn()
            log(f"{self.name}: {key} done in {time.perf_counter() - t:.0f} s (total {self.elapsed():.0f} s)")
            self.save()
        return self.state[key]

    def parallel(self, tasks: dict[str, tuple], fn: Callable[..., Any], workers: int) -> dict[str, Any]:
        """``fn(*args)`` for each task not saved yet, in ``workers`` processes of one thread each
        (``workers`` 1: here, with every thread); each result is saved as it comes in."""
        todo = {k: a for k, a in tasks.items() if k not in self.state}
        if workers <= 1 or len(todo) <= 1:
            for k, a in todo.items():
                self.stage(k, lambda a=a: fn(*a))
        elif todo:
            import multiprocessing

            self.working()
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_one_thread) as pool:
                futures = {pool.submit(fn, *a): k for k, a in todo.items()}
                for f in as_completed(futures):
                    self.state[futures[f]] = f.result()
                    log(f"{self.name}: {futures[f]} done (total {self.elapsed():.0f} s)")
                    self.save()
        return {k: self.state[k] for k in tasks}

    # --- library calls -------------------------------------------------------------------
    def config(self, run_id: str, **kw: Any):
        from lcsc_ops.pipeline.config import OptimizeConfig

        return OptimizeConfig(run_id=run_id, device="cpu", storage=self.storage, tracking_uri=self.uri,
                              register=False, **kw)

    def ddpm_run(self, window: int, sampler: dict[str, Any] | None = None, label: str = "ddpm") -> dict[str, Any]:
        """bench-quality's DDPM run (trained there if missing), its last ``window`` checkpoint steps
        (raw + EMA) imported into this store; ``sampler`` replaces the spec's sampler settings."""
        return self.stage(f"import:{label}", lambda: import_ddpm(self, window, sampler, label))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two stages started at once train bench-quality's run once
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def quality_training(mode: str) -> dict[str, Any]:
    """bench-quality's trained DDPM run: read from its state.json, or trained there by its own
    stage (its work folder, its recipe) if that has not run."""
    import bench_quality

    work = HERE / "work" / mode
    with _locked(HERE / "work" / f"{mode}.train.lock"):
        state = json.loads((work / "state.json").read_text()) if (work / "state.json").exists() else {}
        if "train" not in state:
            cwd, cache = os.getcwd(), os.environ.get("LCSC_OPS_CACHE")
            try:
                bench = bench_quality.Bench(mode, fresh=False)
                bench.stage("train", bench.train)
                state = bench.state
            finally:
                os.chdir(cwd)
                if cache is not None:
                    os.environ["LCSC_OPS_CACHE"] = cache
    train, recipe = state["train"], state.get("recipe", {})
    return {"run_id": train["run_id"], "seconds": train["seconds"], "config": train["config"],
            "uri": f"sqlite:///{work / 'mlflow.db'}", "extra_ema": str(work / "extra_ema"),
            "extra_decays": list(recipe.get("extra_decays", []))}


def import_ddpm(bench: StageBench, window: int, sampler: dict[str, Any] | None, label: str) -> dict[str, Any]:
    import dataclasses

    from lcsc_ops.importers.files import import_checkpoints
    from lcsc_ops.models.diffusion import make_sampler
    from lcsc_ops.spec import Trust
    from lcsc_ops.store.fetch import fetch_window

    src = quality_training(bench.mode)
    win = fetch_window(src["run_id"], window=window, tracking_uri=src["uri"], cache_dir=bench.work / "cache",
                       trust=Trust())
    spec = dataclasses.replace(win.spec, origin=None)  # vouched for by fetch_window
    if sampler is not None:
        if sampler.get("name") == spec.sampler.get("name"):
            sampler = {**spec.sampler, **sampler}
        made = make_sampler(sampler)  # every setting, defaults included, recorded where the sampler can say them
        spec = dataclasses.replace(spec, sampler=made.settings() if hasattr(made, "settings") else dict(sampler))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("raw", "ema"):
            (Path(tmp) / kind).mkdir()
            for e in win.entries:
                if e.kind == kind:
                    shutil.copyfile(e.path, Path(tmp) / kind / e.path.name)  # the importer refuses links out
        run_id = import_checkpoints(Path(tmp) / "raw", spec=spec, kind="raw", ema_folder=Path(tmp) / "ema",
                                    experiment=f"bench-{bench.name}", run_name=f"{label}-last{window}",
                                    tracking_uri=bench.uri)
    return {"run_id": run_id, "source_run_id": src["run_id"], "sampler": dict(spec.sampler),
            "steps": list(win.steps), "train_seconds": src["seconds"], "train": src["config"],
            "extra_ema": src["extra_ema"], "extra_decays": src["extra_decays"]}


def optimize(bench_work: Path, name: str, cfg: Any, log_prefix: str = "") -> dict[str, Any]:
    """One `lcsc-ops optimize` through the library, its report saved as reports/<name>.json."""
    from lcsc_ops.pipeline.optimize import run_optimize

    t = time.perf_counter()
    report = run_optimize(cfg, log=lambda m: log(f"  {log_prefix or name}: {m}"))
    report["wall_seconds"] = time.perf_counter() - t
    (bench_work / "reports" / f"{name}.json").write_text(json.dumps(report, indent=1))
    return report


def load_text(res: dict[str, Any]) -> str:
    """How loaded the machine was, for a section's wall-time sentence."""
    m = res.get("load_mean")
    return f"mean load average {m:.2f} on 2 cores while it ran" if m is not None else "load not recorded"


def spread(values: list[float]) -> dict[str, Any]:
    return {"values": values, "median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values)}


def fmt(x: Any, d: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def update_results(updates: dict[str, Any], merge_keys: tuple[str, ...] = ()) -> None:
    """Write ``updates`` into benchmarks/results/quality.json, leaving every other key as it is.
    Under ``merge_keys`` (e.g. ``strategies``, shared with bench-quality) each entry's fields are
    updated one by one instead of the whole entry being replaced."""
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for k, v in updates.items():
        if k in merge_keys and isinstance(v, dict) and isinstance(data.get(k), dict):
            for sub, val in v.items():
                old = data[k].get(sub)
                data[k][sub] = {**old, **val} if isinstance(old, dict) and isinstance(val, dict) else val
        else:
            data[k] = v
    RESULTS.parent.mkdir(exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS)


def write_section(heading: str, section: str) -> None:
    from _results_md import replace_section

    replace_section(HERE / "RESULTS.md", heading, section)


def main_args(doc: str) -> Any:
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny recipe, a few minutes (plumbing check); "
                                                         "writes under work/quick-<name>, no results files")
    ap.add_argument("--fresh", action="store_true", help="discard saved steps and start over")
    return ap
