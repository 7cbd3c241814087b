"""One stage of one row of the size sweep, in a fresh process (run by bench_size.py).

    python benchmarks/_size_stages.py STAGE ROW_DIR

ROW_DIR/row.json says the row (params, steps, dtype, precision, device); ROW_DIR/state.json
carries what one stage hands the next (run ids, the fetched entries, the version). Prints one
JSON line: the stage's seconds, the floor it is held against (measured here, in this process,
on the same files or buffers), the process's peak RSS (``VmHWM``) and the stage's details.
Stages: log, import, fetch, merge, register, load (``lcsc_ops`` + MLflow), and ``files``
(checkpoints written with safetensors only: the GPU sweep, which has no MLflow).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _size_common import (EXPERIMENT, GIB, cold, copy_seconds, read_once, save_state, spec_of,
                          load_json, peak_rss_gib, write_seconds, _sync)  # noqa: E402


def _uri(row_dir: Path) -> str:
    return f"sqlite:///{row_dir / 'mlflow.db'}"


def _client(row_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=_uri(row_dir))


def _experiment(row_dir: Path) -> str:
    client = _client(row_dir)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(EXPERIMENT, artifact_location=(row_dir / "artifacts").as_uri())


def _artifact_dir(row_dir: Path, run_id: str) -> Path:
    return Path(unquote(urlparse(_client(row_dir).get_run(run_id).info.artifact_uri).path))


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _perturb(model: torch.nn.Module, step: int) -> None:
    """One "training step": every tensor moves by its own small random amount (one pass)."""
    gen = torch.Generator().manual_seed(step)
    deltas = (torch.rand(len(list(model.parameters())), generator=gen) - 0.5) * 1e-2
    with torch.no_grad():
        for p, d in zip(model.parameters(), deltas.tolist()):
            p.add_(d)


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def stage_log(row: dict, state: dict, row_dir: Path) -> dict:
    """CheckpointLogger over ``steps`` steps, a checkpoint pair (raw + EMA) at each."""
    from lcsc_ops import CheckpointLogger

    uri, spec = _uri(row_dir), spec_of(row)
    run_id = _client(row_dir).create_run(_experiment(row_dir), run_name="logged").info.run_id
    model = spec.build()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(0.01 * (i + 1))
    nbytes = _model_bytes(model)
    logger = CheckpointLogger(spec, every=1, start_step=1, run_id=run_id, tracking_uri=uri)
    inside = []
    t_all = time.perf_counter()
    for step in range(1, row["steps"] + 1):
        _perturb(model, step)
        t0 = time.perf_counter()
        logger.step(model, step)
        inside.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    logger.close()
    close = time.perf_counter() - t0
    total = time.perf_counter() - t_all
    _client(row_dir).set_terminated(run_id)
    save_state(row_dir, logged_run=run_id)
    floor = 2 * copy_seconds(nbytes)  # the snapshot of the pair: one memory copy of each model
    return {"stage": "log", "seconds": sum(inside) / len(inside), "floor_seconds": floor,
            "loop_seconds_per_checkpoint": sum(inside) / len(inside), "loop_seconds_max": max(inside),
            "wait_at_close_seconds": close, "total_seconds": total, "pairs": row["steps"],
            "bytes_logged": 2 * nbytes * row["steps"],
            "note": "loop time inside CheckpointLogger.step per checkpoint pair (EMA update + snapshot + "
                    "waiting for the previous pair's write), floor: one memory copy of the pair"}


def stage_import(row: dict, state: dict, row_dir: Path) -> dict:
    """``lcsc-ops import`` of the logged run's files (raw and EMA folders of hard links to them)."""
    from lcsc_ops.importers.files import import_checkpoints

    logged = _artifact_dir(row_dir, state["logged_run"])
    files = _files(logged / "checkpoints")[-2:]  # the last step's pair: the rate, without a second window on disk
    src = row_dir / "src"
    for kind in ("raw", "ema"):
        (src / kind).mkdir(parents=True, exist_ok=True)
    for f in files:
        os.link(f, src / ("ema" if f.stem.endswith("-ema") else "raw") / f.name)
    floor, _ = cold(files, lambda: read_once(files))
    seconds, run_id = cold(files, lambda: import_checkpoints(
        src / "raw", ema_folder=src / "ema", spec=spec_of(row), experiment=EXPERIMENT, tracking_uri=_uri(row_dir)))
    shutil.rmtree(src)
    shutil.rmtree(_artifact_dir(row_dir, run_id))
    return {"stage": "import", "seconds": seconds, "floor_seconds": floor, "files": len(files),
            "bytes": sum(f.stat().st_size for f in files),
            "note": "import_checkpoints (the function behind `lcsc-ops import`) of one step's pair (raw + EMA), "
                    "floor: reading those files once, cold"}


def _fetch_window():
    try:  # the reader registry (issue 23), when it is there
        from lcsc_ops.store.sources import fetch_window
    except ImportError:
        from lcsc_ops.store.fetch import fetch_window
    return fetch_window


def stage_fetch(row: dict, state: dict, row_dir: Path) -> dict:
    """fetch_window (download into the cache + sha256 check) of the imported run, cold."""
    from lcsc_ops.spec import Trust

    run_id = state["logged_run"]
    files = _files(_artifact_dir(row_dir, run_id) / "checkpoints")
    floor, _ = cold(files, lambda: read_once(files))
    fetch = _fetch_window()
    seconds, window = cold(files, lambda: fetch(run_id, window=row["steps"], tracking_uri=_uri(row_dir),
                                                cache_dir=row_dir / "cache", trust=Trust()))
    entries = [{"step": e.step, "kind": e.kind, "file": e.file, "sha256": e.sha256, "bytes": e.bytes,
                "path": str(e.path)} for e in window.entries]
    save_state(row_dir, entries=entries, steps=list(window.steps))
    return {"stage": "fetch", "seconds": seconds, "floor_seconds": floor, "files": len(entries),
            "bytes": sum(e["bytes"] for e in entries),
            "note": "fetch_window of the logged run with its files out of the page cache, floor: reading them once, cold"}


def _window(row: dict, state: dict):
    from lcsc_ops.checkpoints import CheckpointEntry, CheckpointWindow

    entries = tuple(CheckpointEntry(step=e["step"], kind=e["kind"], file=e["file"], sha256=e["sha256"],
                                    bytes=e["bytes"], path=Path(e["path"])) for e in state["entries"])
    return CheckpointWindow(run_id=state.get("logged_run", "files"), spec=spec_of(row), entries=entries,
                            training_ema=None, steps=tuple(state["steps"]))


def _stub(model: torch.nn.Module, num_samples: int, seed: int) -> float:
    """A stub evaluator that costs nothing: the merge is measured, not sampling."""
    return 0.0


def stage_merge(row: dict, state: dict, row_dir: Path) -> dict:
    """Scorer (the merger chosen from free memory, as optimize does) and one trial's merge."""
    from _perf_common import random_affine
    from lcsc_ops.pipeline.scoring import Scorer

    from lcsc_ops.evaluation.precision import PRECISIONS
    from lcsc_ops.math.streaming import stack_nbytes

    window, device = _window(row, state), row.get("device", "cpu")
    k = len(window.entries)
    # The stacked floor's copy is timed before the stack exists, so its buffers do not add to the peak.
    per_row = stack_nbytes(window.entries[:1], PRECISIONS[row["precision"]].stack_dtype)
    copy_floor = copy_seconds((k + 1) * per_row // 2, device)  # K rows read + one written, as read+write bytes
    t0 = time.perf_counter()
    scorer = Scorer(window, spec_of(row).build, device, max_stack_memory=row.get("max_stack_memory"),
                    precision=row["precision"], cache=None)
    build = time.perf_counter() - t0
    merger = scorer.merger

    def trial(seed: int) -> float:
        t = time.perf_counter()
        scorer.per_seed(random_affine(k, seed), _stub, 1, [0])
        _sync(device)
        return time.perf_counter() - t

    trial(0)  # warm-up
    paths = [e.path for e in window.entries]
    floor = copy_floor if scorer.mode == "stacked" else read_once(paths)
    times = [trial(s) for s in (1, 2)]
    gpu_peak = torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None
    return {"stage": "merge", "seconds": min(times), "floor_seconds": floor, "seconds_all": times,
            "device_peak_gib": gpu_peak,
            "build_seconds": build, "mode": scorer.mode, "merge_dtype": str(merger.dtype).replace("torch.", ""),
            "stack_gib": merger.nbytes / GIB, "choice": getattr(scorer, "choice", ""),
            "note": "one trial = merge into the bound model (its tensors are views of the merge, so no "
                    "load_state_dict copy) + a stub evaluator that costs nothing"}


def stage_register(row: dict, state: dict, row_dir: Path) -> dict:
    """The final merge (float64, from the files) into a model, then register_model (log_model + pyfunc)."""
    from lcsc_ops.math.merge import load_checkpoint_state, merge_state_dicts
    from lcsc_ops.store.registry import register_model

    window, spec = _window(row, state), spec_of(row)
    k = len(window.entries)
    t0 = time.perf_counter()
    model = load_checkpoint_state(spec.build(), merge_state_dicts((e.load() for e in window.entries), [1 / k] * k))
    final_merge = time.perf_counter() - t0
    floor = write_seconds(row_dir, list(model.state_dict().values()))
    run_id = _client(row_dir).create_run(_experiment(row_dir), run_name="optimize").info.run_id
    name = f"size-{row['params']}"
    imports = _import_mlflow_pytorch()
    t0 = time.perf_counter()
    version = register_model(model, name=name, spec=spec.to_dict(), tags={"lcsc.bench": "size"}, run_id=run_id,
                             tracking_uri=_uri(row_dir))
    seconds = time.perf_counter() - t0
    # The same again in this process, and the floor again: a first registration apart from this machine's write noise.
    t0 = time.perf_counter()
    register_model(model, name=name, spec=spec.to_dict(), tags={"lcsc.bench": "size-second"}, run_id=run_id,
                   tracking_uri=_uri(row_dir))
    second = time.perf_counter() - t0
    floor_after = write_seconds(row_dir, list(model.state_dict().values()))
    _client(row_dir).set_terminated(run_id)
    sums = {n: float(t.double().sum()) for n, t in list(model.state_dict().items())[:2]}
    save_state(row_dir, model_name=name, version=version, sums=sums)
    return {"stage": "register", "seconds": seconds, "floor_seconds": floor, "final_merge_seconds": final_merge,
            "import_seconds": imports, "second_registration_seconds": second, "floor_after_seconds": floor_after,
            "bytes": _model_bytes(model),
            "note": "register_model (the model saved with its pyfunc flavor into the store, then registered), "
                    "floor: writing the model's bytes once; the final float64 merge is timed apart "
                    "(final_merge_seconds), and so is importing mlflow.pytorch (import_seconds, once per process: "
                    "it imports Lightning when installed); then a second registration of the same model in the same "
                    "process and the floor once more (second_registration_seconds, floor_after_seconds)"}


def _import_mlflow_pytorch() -> float:
    """Seconds to import mlflow.pytorch (and Lightning, which it imports when installed): once per process."""
    t0 = time.perf_counter()
    import mlflow.pytorch  # noqa: F401

    return time.perf_counter() - t0


def stage_load(row: dict, state: dict, row_dir: Path) -> dict:
    """``lcsc_ops.load`` of the registered version, cold; its weights checked against the registered ones."""
    import lcsc_ops
    import mlflow
    from mlflow.artifacts import download_artifacts

    uri, model_uri = _uri(row_dir), f"models:/{state['model_name']}/{state['version']}"
    # MLflow resolves models:/ against the process's registry URI, whatever tracking_uri= says.
    mlflow.set_tracking_uri(uri)
    local = Path(download_artifacts(artifact_uri=model_uri, tracking_uri=uri, registry_uri=uri))
    files = [p for p in local.rglob("*") if p.is_file()]
    floor, _ = cold(files, lambda: read_once(files))
    imports = _import_mlflow_pytorch()
    seconds, gen = cold(files, lambda: lcsc_ops.load(model_uri, tracking_uri=uri))
    got = {n: float(t.double().sum()) for n, t in list(gen.model.state_dict().items())[:2]}
    if got != state["sums"]:
        raise SystemExit(f"the loaded version differs from the registered model: {got} vs {state['sums']}")
    return {"stage": "load", "seconds": seconds, "floor_seconds": floor, "bytes": sum(f.stat().st_size for f in files),
            "import_seconds": imports,
            "note": "lcsc_ops.load(models:/name/version) with the files out of the page cache, floor: reading "
                    "them once, cold; the loaded weights are checked against the registered model's; importing "
                    "mlflow.pytorch is timed apart (import_seconds)"}


def stage_files(row: dict, state: dict, row_dir: Path) -> dict:
    """The window as plain safetensors files (no MLflow: the GPU sweep), perturbations of one model."""
    from safetensors.torch import save_file

    folder = row_dir / "files"
    folder.mkdir(exist_ok=True)
    model = spec_of(row).build()
    entries, t0 = [], time.perf_counter()
    for step in range(1, row["steps"] + 1):
        _perturb(model, step)
        for kind in ("raw", "ema"):
            path = folder / f"step{step:08d}-{kind}.safetensors"
            save_file({n: t.contiguous() for n, t in model.state_dict().items()}, str(path))
            entries.append({"step": step, "kind": kind, "file": path.name, "sha256": "", "bytes": path.stat().st_size,
                            "path": str(path)})
    entries.sort(key=lambda e: (e["kind"] != "raw", e["step"]))
    save_state(row_dir, entries=entries, steps=list(range(1, row["steps"] + 1)))
    return {"stage": "files", "seconds": time.perf_counter() - t0, "floor_seconds": math.nan, "files": len(entries)}


STAGES = {"log": stage_log, "import": stage_import, "fetch": stage_fetch, "merge": stage_merge,
          "register": stage_register, "load": stage_load, "files": stage_files}


def main() -> None:
    stage, row_dir = sys.argv[1], Path(sys.argv[2]).resolve()
    row, state = load_json(row_dir / "row.json"), load_json(row_dir / "state.json")
    torch.set_num_threads(row.get("threads", torch.get_num_threads()))
    # The previous stage's writes (a fetch writes the whole window into the cache) reach this disk at about
    # 200 MB/s: written back first, so a stage does not pay for the one before it (in a real optimize, minutes
    # of search lie between them). The floor is measured after this too.
    t0 = time.perf_counter()
    os.sync()
    synced = time.perf_counter() - t0
    if os.environ.get("LCSC_SIZE_PROFILE") == stage:  # row_dir/../profile-<stage>-<params>.prof (python -m pstats)
        import cProfile

        profile = cProfile.Profile()
        out = profile.runcall(STAGES[stage], row, state, row_dir)
        profile.dump_stats(row_dir.parent / f"profile-{stage}-{row['params']}.prof")
    else:
        out = STAGES[stage](row, state, row_dir)
    out["sync_seconds_before"] = synced
    out["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
