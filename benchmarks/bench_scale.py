"""`make bench-scale`: many workers on one study, a kill -9 and its resume, checkpoint-logging overhead.

Everything runs through the `lcsc-ops` command line in real processes, as a user runs it:
- workers: trials/min of the demo's search configuration with 1 worker × 1 thread and with
  `--workers 2` (1 thread each) on the 2 cores, measured over the search phase (first trial
  start to last trial end), and the best search FID each reached at the same budget;
- two_workers: two `lcsc-ops optimize` processes started together on one study, on the
  journal file and on a real PostgreSQL (binaries permitting): trials, parent runs,
  registered versions, baseline scorings;
- kill_resume: `kill -9` of an optimize mid-search, then the same command again;
- logging: training steps/s with and without `CheckpointLogger` (a fast 2-D model and the
  digits U-Net), against a local sqlite store and an `mlflow server` on loopback.
Figures go to benchmarks/results/scale.json and a section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FULL = dict(train_steps=2100, window=40, blocks=8, search_seeds=2, search_samples=1000, worker_trials=24,
            small_trials=8, kill_trials=12, fast_steps=4000, fast_block=200, digits_steps=600, digits_block=100,
            reps=3, fast_reps=5)
QUICK = dict(train_steps=300, window=8, blocks=2, search_seeds=1, search_samples=200, worker_trials=6,
             small_trials=4, kill_trials=6, fast_steps=1000, fast_block=200, digits_steps=100,
             digits_block=50, reps=1, fast_reps=1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lcsc_ops.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise RuntimeError(f"lcsc-ops {' '.join(args[:2])} failed: {result.stderr[-2000:]}")
    return result


class Bench:
    def __init__(self, r: dict[str, Any], work: Path) -> None:
        self.r, self.work = r, work
        self.uri = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["LCSC_OPS_CACHE"] = str(work / "cache")
        os.chdir(work)

    def train(self) -> str:
        out = cli("train", "--steps", str(self.r["train_steps"]), "--experiment", "scale", "--model-name",
                  "scale-ddpm", "--tracking-uri", self.uri)
        return out.stdout.strip().splitlines()[-1]

    def search_args(self, run: str, storage: str, trials: int, seed: int, model: str, samples: int | None = None
                    ) -> list[str]:
        r = self.r
        return ["optimize", run, "--window", str(r["window"]), "--blocks", str(r["blocks"]), "--search-seeds",
                str(r["search_seeds"]), "--search-samples", str(samples or r["search_samples"]), "--final-seeds", "2",
                "--final-samples", "500", "--n-trials", str(trials), "--seed", str(seed), "--strategy", "cmaes",
                "--storage", storage, "--model-name", model, "--tracking-uri", self.uri, "--json"]


def study_of(report: dict[str, Any]):
    import optuna

    from lcsc_ops.search.storage import make_storage

    return optuna.load_study(study_name=report["study"], storage=make_storage(report["storage"]))


def searched(study) -> list:
    from lcsc_ops.search.trials import searched as done

    return done(study)


def trials_per_min(study) -> float:
    trials = searched(study)
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return 60.0 * len(trials) / span.total_seconds()


def workers_section(b: Bench, run: str) -> dict[str, Any]:
    """1 worker × 1 thread against --workers 2 (1 thread each), same search config and budget."""
    out = {}
    for n in (1, 2):
        storage = str(b.work / f"workers-{n}.journal")
        t0 = time.perf_counter()
        # --no-score-cache: the second study would otherwise get the first's scores for free
        res = cli(*b.search_args(run, storage, b.r["worker_trials"], 0, f"scale-w{n}"), "--workers", str(n),
                  "--no-score-cache", env={"OMP_NUM_THREADS": "1"} if n == 1 else {})
        report = json.loads(res.stdout)
        study = study_of(report)
        out[str(n)] = {"trials_per_min": trials_per_min(study), "trials": len(searched(study)),
                       "best_search": min(t.value for t in searched(study)), "wall_seconds": time.perf_counter() - t0,
                       "winner_final_mean": report["methods"][report["winner"]]["final_mean"],
                       "best_lcsc_final_mean": report["methods"][report["best_lcsc"]]["final_mean"]}
        log(f"workers {n}: {out[str(n)]['trials_per_min']:.1f} trials/min, best search {out[str(n)]['best_search']:.3f}")
    out["ratio"] = out["2"]["trials_per_min"] / out["1"]["trials_per_min"]
    return out


def two_workers(b: Bench, run: str, storage: str, model: str) -> dict[str, Any]:
    """Two optimize processes started together on one study (as two hosts would)."""
    import mlflow

    args = b.search_args(run, storage, b.r["small_trials"], 5, model, samples=200)
    procs = [subprocess.Popen([sys.executable, "-m", "lcsc_ops.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {[o[1][-1500:] for o in outs]}")
    report = json.loads(outs[0][0])
    study = study_of(report)
    client = mlflow.tracking.MlflowClient(b.uri)
    exp = client.get_run(report["parent_run_id"]).info.experiment_id
    # The journal and the PostgreSQL rows share a study name (same run and settings): count this storage's.
    parents = [r for r in client.search_runs([exp], f"tags.`optuna.study` = '{report['study']}' and "
                                                    "tags.`lcsc.kind` = 'optimize'")
               if r.data.tags.get("optuna.storage") == report["storage"]]
    versions = client.search_model_versions(f"name = '{model}'")
    return {"trials_requested": b.r["small_trials"], "trials_total": len(searched(study)),
            "duplicate_versions": len(versions) - 1, "parent_runs": len(parents),
            "baseline_scorings": sum(o[1].count("scoring the baselines") for o in outs),
            "running_left": sum(t.state.name == "RUNNING" for t in study.trials)}


def kill_resume(b: Bench, run: str) -> dict[str, Any]:
    import optuna

    from lcsc_ops.search.storage import make_storage

    storage = str(b.work / "kill.journal")
    env = {**os.environ, "LCSC_OPS_GRACE_S": "3", "LCSC_OPS_HEARTBEAT_S": "1"}
    args = b.search_args(run, storage, b.r["kill_trials"], 9, "scale-killed", samples=200)
    proc = subprocess.Popen([sys.executable, "-m", "lcsc_ops.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    study, before = None, {}
    while proc.poll() is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(make_storage(storage)) if ":lock:" not in s.study_name]
        study = optuna.load_study(study_name=names[0], storage=make_storage(storage)) if names else None
        if study is not None and len(searched(study)) >= 3 and any(t.state.name == "RUNNING" for t in study.trials):
            before = {t.number: t.params for t in searched(study)}
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run([sys.executable, "-m", "lcsc_ops.cli", *args], env=env, capture_output=True, text=True)
    if rerun.returncode:
        raise RuntimeError(rerun.stderr[-2000:])
    study = study_of(json.loads(rerun.stdout))
    after = {t.number: t.params for t in searched(study)}
    return {"killed_after_trials": len(before), "trials_requested": b.r["kill_trials"],
            "running_left": sum(t.state.name == "RUNNING" for t in study.trials),
            "trials_lost": sum(after.get(n) != p for n, p in before.items()),
            "trials_repeated": max(0, len(after) - b.r["kill_trials"]),
            "failed_replaced": sum(t.state.name == "FAIL" for t in study.trials)}


def fast_model():
    """A user's small 2-D model (a factory the logger's spec names)."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(),
                               torch.nn.Linear(64, 2))


class _Loop:
    """One arm of a row: a plain Adam loop on its own model, keeping its own EMA or not (a copy
    of the model, one fused lerp per step, as ema-pytorch does), with a CheckpointLogger or not
    (then handed that EMA, ``ema=``, if the loop keeps one). ``run`` times a block of steps and,
    with a logger, any wait for that block's uploads still in flight at its end."""

    def __init__(self, arm: str, task: dict[str, Any], uri: str) -> None:
        import copy

        import torch
        from mlflow.tracking import MlflowClient

        from lcsc_ops import CheckpointLogger

        with_logger, own_ema = ARMS[arm]
        torch.manual_seed(0)
        self.task, self.model = task, task["model"]()
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if own_ema else None
        self.ema_params = list(self.ema.parameters()) if own_ema else []
        self.params = list(self.model.parameters())
        self.opt = torch.optim.Adam(self.params, lr=1e-3)
        self.step, self.seconds, self.logger = 0, 0.0, None
        if with_logger:
            self.client = MlflowClient(uri)
            self.run_id = self.client.create_run(task["experiment_id"]).info.run_id
            self.logger = CheckpointLogger(task["spec"], every=50, tracking_uri=uri, run_id=self.run_id, ema=self.ema)

    def run(self, steps: int) -> None:
        import torch

        model, opt, batch, loss_fn, logger = self.model, self.opt, self.task["batch"], self.task["loss"], self.logger
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step += 1
            loss = loss_fn(model, batch())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if self.ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema_params, self.params, 0.001)
            if logger is not None:
                logger.step(model, self.step)
        if logger is not None:
            logger.wait()
        self.seconds += time.perf_counter() - t0

    def close(self) -> float:
        """Steps/s over every block, the logger's close included."""
        if self.logger is not None:
            t0 = time.perf_counter()
            self.logger.close()
            self.seconds += time.perf_counter() - t0
            self.logger._sender.proc.wait()  # its exit is not timed, nor left to slow the next arms
            self.client.set_terminated(self.run_id)
        return self.step / self.seconds


def _fast_task() -> dict[str, Any]:
    import torch

    return {"model": fast_model, "batch": lambda: torch.randn(256, 2),
            "loss": lambda m, x: ((m(x) - x.flip(1)) ** 2).mean()}


def _digits_task() -> dict[str, Any]:
    import functools

    import torch

    from lcsc_ops.evaluation.data import load_dataset
    from lcsc_ops.models.diffusion import make_sampler
    from lcsc_ops.models.unet import digits_unet

    images, gen = load_dataset("digits"), torch.Generator().manual_seed(0)
    sampler = make_sampler({"name": "ddim", "steps": 10, "timesteps": 1000})
    return {"model": functools.partial(digits_unet, channels=32), "loss": sampler.training_loss,
            "batch": lambda: images[torch.randint(len(images), (128,), generator=gen)]}


# The arms a row's loop runs in (logger?, the loop keeps its own EMA?) and the overheads it reports
# (slower arm, baseline arm): the logger's own EMA against a loop without one, or with one; the
# loop's own EMA handed to the logger (ema=) against the same loop without a logger.
ARMS = {"plain": (False, False), "logged": (True, False), "plain_ema": (False, True), "own_ema_logged": (True, True)}
OVERHEADS = {"overhead": ("logged", "plain"), "overhead_vs_loop_ema": ("logged", "plain_ema"),
             "overhead_own_ema": ("own_ema_logged", "plain_ema")}


def _blocks(steps: int, block: int) -> list[int]:
    """Block sizes summing to ``steps`` whose ends fall 25 steps after a checkpoint (every 50), not
    on one: a block's last upload runs during its own steps, as in training, not in the wait."""
    sizes = [block + 25] + [block] * (steps // block - 2)
    return sizes + [steps - sum(sizes)]


def _row(task: dict[str, Any], steps: int, block: int, reps: int, arms: tuple[str, ...], uri: str,
         threads: int | None = None, make_loop: Any = None) -> dict[str, Any]:
    """Steps/s of each arm: the arms live side by side in this process and take turns in blocks of
    ``block`` steps (their order turned each block), so a slow spell of the machine falls on all of
    them; ``reps`` times over, with new models and loggers; medians compared. ``make_loop(arm, task, uri)``
    makes an arm's loop (default :class:`_Loop`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    runs: dict[str, list[float]] = {arm: [] for arm in arms}
    try:
        for rep in range(reps):
            loops = {arm: (make_loop or _Loop)(arm, task, uri) for arm in arms}
            for k, size in enumerate(_blocks(steps, block)):
                turn = (rep + k) % len(arms)
                for arm in arms[turn:] + arms[:turn]:
                    loops[arm].run(size)
            for arm, loop in loops.items():
                runs[arm].append(loop.close())
    finally:
        torch.set_num_threads(before)
    med = {arm: statistics.median(r) for arm, r in runs.items()}
    out: dict[str, Any] = {"steps": steps, "block": block, "threads": threads or before, "checkpoint_pairs": steps // 50,
                           "runs": runs, **{f"steps_per_s_{arm}": v for arm, v in med.items()}}
    for key, (slower, baseline) in OVERHEADS.items():
        if slower in med and baseline in med:
            out[key] = med[baseline] / med[slower] - 1.0
    return out


LOGGING_COST = ("fast model: on one thread (its fastest setting), the larger of the logger's EMA against a loop "
                "keeping its own and the loop's own EMA handed over (ema=) against the same loop unlogged, so the "
                "EMA, which every diffusion loop keeps, is in both arms; digits: the logger's EMA against a loop "
                "without any. The fast model's cost including a whole EMA it did not keep before is "
                "fast_1thread.overhead.")


def _logging_cost(row: dict[str, Any]) -> float:
    """What checkpoint logging costs a loop that keeps an EMA, either way it can (see ``LOGGING_COST``)."""
    return max(row["overhead_vs_loop_ema"], row["overhead_own_ema"])


def logging_overhead(b: Bench, uri: str, name: str) -> dict[str, Any]:
    """Steps/s without and with CheckpointLogger (a checkpoint pair every 50 steps), the arms
    interleaved in blocks. ``fast_1thread``: the fast model on one thread, its fastest setting
    (the second core left to the uploader and a server), in every arm; ``fast``/``fast_own_ema``:
    on 2 threads (OMP_WAIT_POLICY=PASSIVE, as this benchmark runs); ``digits``: the digits U-Net."""
    import mlflow

    from lcsc_ops import ModelSpec

    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.set_experiment(f"logging-{name}").experiment_id
    fast = {**_fast_task(), "spec": ModelSpec(factory="bench_scale:fast_model"), "experiment_id": experiment_id}
    digits = {**_digits_task(), "spec": ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": 32}),
              "experiment_id": experiment_id}
    r = b.r
    rows = {"fast_1thread": (fast, r["fast_steps"], r["fast_block"], r["fast_reps"], tuple(ARMS), 1),
            "fast": (fast, r["fast_steps"], r["fast_block"], r["reps"], ("plain", "logged"), None),
            "fast_own_ema": (fast, r["fast_steps"], r["fast_block"], r["reps"], ("plain_ema", "own_ema_logged"), None),
            "digits": (digits, r["digits_steps"], r["digits_block"], r["reps"], ("plain", "logged"), None)}
    out = {}
    for model, (task, steps, block, reps, arms, threads) in rows.items():
        out[model] = _row(task, steps, block, reps, arms, uri, threads)
        log(f"logging {name} {model}: " + ", ".join(f"{arm} {out[model]['steps_per_s_' + arm]:.0f}" for arm in arms)
            + " steps/s; " + ", ".join(f"{k} {out[model][k]:+.1%}" for k in OVERHEADS if k in out[model]))
    return out


@contextlib.contextmanager
def services(work: Path) -> Iterator[tuple[Any, Any]]:
    """A PostgreSQL server (None where unavailable) and an mlflow server on loopback."""
    from tests.services import Unavailable, mlflow_server, postgres_server

    with contextlib.ExitStack() as stack:
        try:
            pg = stack.enter_context(postgres_server(work))
        except Unavailable as exc:
            log(f"PostgreSQL rows skipped: {exc}")
            pg = None
        server = stack.enter_context(mlflow_server(work / "server", f"sqlite:///{work / 'server' / 'mlflow.db'}"))
        yield pg, server


SECTIONS = ("workers", "two_workers", "kill_resume", "logging")


def _settle(idle: float = 0.9, timeout: float = 120.0) -> float:
    """Wait until the machine is idle (``idle`` of its CPU time over a second, from /proc/stat)
    or ``timeout`` has passed: a server started a moment ago is still importing and migrating."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        i0, a0 = ticks()
        time.sleep(1.0)
        i1, a1 = ticks()
        if (i1 - i0) >= idle * max(1, a1 - a0):
            break
    waited = time.monotonic() - t0
    log(f"machine idle after {waited:.0f} s")
    return waited


def run(r: dict[str, Any], work: Path, only: tuple[str, ...] = SECTIONS, run_id: str | None = None,
        res: dict[str, Any] | None = None) -> dict[str, Any]:
    """The benchmark's sections (``only``), into ``res`` (a previous result to update, or a new one)."""
    b = Bench(r, work)
    t0 = time.perf_counter()
    run_id = run_id or b.train()
    log(f"training run {run_id}")
    res = res or {}
    res["recipe"] = r
    if "sections_seconds" not in res and "wall_seconds" in res:  # a result written before passes were kept
        res["sections_seconds"] = {"first pass, every section": res["wall_seconds"]}
    res.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               load_before=os.getloadavg()[0], run_id=run_id, work=str(work))
    if "workers" in only:
        res["workers"] = workers_section(b, run_id)
    if "two_workers" in only:
        res["two_workers"] = {"journal": two_workers(b, run_id, str(work / "two.journal"), "scale-two-journal")}
    (work / "server").mkdir(exist_ok=True)
    local = None
    if "logging" in only:  # before the servers start: their start-up work would fall on these rows
        _settle()
        local = logging_overhead(b, b.uri, "local")
    with services(work) as (pg, server):
        if "two_workers" in only and pg is not None:
            res["two_workers"]["postgresql"] = two_workers(b, run_id, pg.url, "scale-two-pg")
            log(f"two workers: {res['two_workers']}")
        if "kill_resume" in only:
            res["kill_resume"] = kill_resume(b, run_id)
            log(f"kill/resume: {res['kill_resume']}")
        if "logging" in only:
            _settle()  # the server's start-up work done
            remote = logging_overhead(b, server, "server")
            one = {k: (local["fast_1thread"][k], remote["fast_1thread"][k]) for k in OVERHEADS}
            res["logging"] = {"local": local, "server": remote,
                              "fast_model_overhead": _logging_cost(local["fast_1thread"]),
                              "digits_overhead": local["digits"]["overhead"],
                              "server_overhead": max(_logging_cost(remote["fast_1thread"]),
                                                     remote["digits"]["overhead"]),
                              "fast_1thread": {k: {"local": lo, "server": se} for k, (lo, se) in one.items()},
                              "fast_2threads": {k: {"local": local[m][k], "server": remote[m][k]}
                                                for m, k in (("fast", "overhead"), ("fast_own_ema", "overhead_own_ema"))},
                              "definition": LOGGING_COST}
    res.setdefault("sections_seconds", {})[",".join(only)] = time.perf_counter() - t0
    res["wall_seconds"] = sum(res["sections_seconds"].values())
    return res


def markdown(res: dict[str, Any]) -> str:
    """The RESULTS.md section; rows only for the sections ``res`` holds (a --quick --only pass has one)."""
    rows = ["## Scale-out (make bench-scale)", "",
            f"Machine: {res['machine']}; load average {res['load_before']:.2f} at the start of the last pass; "
            f"{res['wall_seconds'] / 60:.1f} min in all (passes: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in res["sections_seconds"].items()) + ").", "",
            "| measure | figure |", "|---|---|"]
    if w := res.get("workers"):
        rows += [f"| search trials/min, 1 worker × 1 thread | {w['1']['trials_per_min']:.1f} |",
                 f"| search trials/min, `--workers 2` × 1 thread | {w['2']['trials_per_min']:.1f} (ratio "
                 f"{w['ratio']:.2f}) |",
                 f"| best search FID at {w['1']['trials']} trials, 1 / 2 workers (CMA-ES) | "
                 f"{w['1']['best_search']:.3f} / {w['2']['best_search']:.3f} |",
                 f"| final FID of the best LCSC candidate, 1 / 2 workers | {w['1']['best_lcsc_final_mean']:.3f} / "
                 f"{w['2']['best_lcsc_final_mean']:.3f} |"]
    for name, tw in res.get("two_workers", {}).items():
        rows.append(f"| two processes on one study, {name} | {tw['trials_total']} of {tw['trials_requested']} trials, "
                    f"{tw['parent_runs']} parent run, {tw['duplicate_versions']} duplicate versions, "
                    f"{tw['baseline_scorings']} baseline scoring |")
    if kr := res.get("kill_resume"):
        rows += [f"| kill -9 after {kr['killed_after_trials']} trials, rerun | {kr['running_left']} RUNNING left, "
                 f"{kr['trials_lost']} lost, {kr['trials_repeated']} repeated |"]
    lg, r = res.get("logging", {}), res["recipe"]
    labels = {"fast": "fast model (2 threads), the logger's EMA, against a loop without an EMA",
              "fast_own_ema": "fast model (2 threads) whose loop keeps its EMA (`ema=`)",
              "digits": "digits model, the logger's EMA, against a loop without an EMA"}
    one = {"overhead": "the logger's EMA, against a loop without an EMA",
           "overhead_vs_loop_ema": "the logger's EMA, against a loop keeping its own",
           "overhead_own_ema": "the loop's own EMA handed to the logger (`ema=`)"}
    for where in ("local", "server"):
        for model, x in lg.get(where, {}).items():
            for key, (slower, baseline) in OVERHEADS.items():
                if key not in x:
                    continue
                label = f"fast model (1 thread), {one[key]}" if model == "fast_1thread" else labels[model]
                rows.append(f"| training with CheckpointLogger, {label}, {where} store | "
                            f"{x['steps_per_s_' + baseline]:.0f} → {x['steps_per_s_' + slower]:.0f} steps/s "
                            f"({x[key]:+.1%}, a checkpoint pair every 50 steps) |")
    if "definition" in lg:
        rows += [f"| logging cost: `logging.fast_model_overhead` (local store) / `logging.server_overhead` | "
                 f"{lg['fast_model_overhead']:+.1%} / {lg['server_overhead']:+.1%} |", "",
                 f"Logging cost, as computed: {lg['definition']}", "",
                 "Logging rows: a row's arms live side by side in one process and take turns in blocks of "
                 f"{r['fast_block']} steps ({r['digits_block']} for digits), their order turned each block, "
                 f"{r['fast_steps']:,} steps an arm ({r['digits_steps']} for digits), the logger's close included; "
                 f"{r['fast_reps']} repetitions of the one-thread row, {r['reps']} of the others, with new models "
                 "and loggers; medians compared. Each set waited for an idle machine; the local rows ran before "
                 "the servers started."]
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check, writes no results")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}; the "
                    "others are kept from benchmarks/results/scale.json")
    ap.add_argument("--work", type=Path, help="reuse this work folder (its mlflow.db and trained run)")
    ap.add_argument("--run-id", help="with --work: the trained run to reuse")
    args = ap.parse_args()
    out = HERE / "results" / "scale.json"
    previous = json.loads(out.read_text()) if out.is_file() and not args.quick else None
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="lcsc-scale-", dir=HERE / "work" if (HERE / "work").is_dir() else None))
    only = tuple(x for x in args.only.split(",") if x)
    res = run(QUICK if args.quick else FULL, work, only, args.run_id, previous)
    section = markdown(res)
    print(section)
    if not args.quick:
        from _results_md import replace_section

        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        replace_section(HERE / "RESULTS.md", "## Scale-out (make bench-scale)", section)


if __name__ == "__main__":
    main()
