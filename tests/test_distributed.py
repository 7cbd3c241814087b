"""Evaluation sharded over processes: the sharded FID against one process's FIDScorer (2 spawned
gloo processes), and ``optimize`` under ``accelerate launch`` against one process (same seeds).

Measured on this machine (2 CPU cores): the unit test's FIDs came out equal (torchmetrics
returns a float32, which hides the float64 sums' other order); ``optimize`` with batches of
24 over 2 processes differed from one process by at most 3.3e-6 relative (other batch
boundaries in sampling and features). The tests allow 1e-4 relative (the README's tolerance).
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REL = 1e-4  # sharded vs one process, relative
LAUNCH = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]


# --- the sharded FID against FIDScorer, in 2 spawned processes (torch.distributed, gloo) -------------

def _setup(batch_size: int = 16):
    """Identical on every rank: two FID scorers (digits-cnn, digits-mlp) over 400 real digits, two
    tiny U-Nets to merge (different seeds)."""
    from lcsc_ops.evaluation.data import load_dataset
    from lcsc_ops.evaluation.features import build_extractor
    from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats
    from lcsc_ops.models.diffusion import DDIMSampler
    from lcsc_ops.models.unet import DigitsUNet

    images = load_dataset("digits")[:400]
    scorers = {}
    for name, extractor_name in (("main", "digits-cnn"), ("second", "digits-mlp")):
        extractor = build_extractor(extractor_name)
        scorer = FIDScorer(DDIMSampler(steps=2), extractor, compute_reference_stats(images, extractor),
                           image_shape=(1, 8, 8), batch_size=batch_size)
        scorer.identity = {"fid": extractor_name, "sampler": {"name": "ddim", "steps": 2}}
        scorers[name] = scorer
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(DigitsUNet(channels=8).eval())
    return scorers, models


def _merged(models, coeffs):
    import copy

    out = copy.deepcopy(models[0])
    states = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(c * s[k] for c, s in zip(coeffs, states)) for k in states[0]})
    return out


def _follower_model(models, coeffs, precision):
    """A follower merges what rank 0 sends; two coefficient vectors act up on purpose."""
    if coeffs[0] == -1.0:
        raise RuntimeError("out of memory (on purpose)")
    model = _merged(models, coeffs)
    if coeffs[0] == 0.5:  # this rank's images only turn non-finite
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    return model


def _unit_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from lcsc_ops.errors import LcscError
    from lcsc_ops.evaluation.sharding import ShardedFID, ShardGroup, ShardWorker, follow, stop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=90))
    try:
        group = ShardGroup.create(timeout=timedelta(seconds=90))
        scorers, models = _setup()
        if rank:
            follow(group, ShardWorker(group, scorers, lambda c, p: _follower_model(models, c, p)))
            return
        worker, current = ShardWorker(group, scorers), {"coeffs": [0.7, 0.3]}
        main, second = (ShardedFID(scorers[k], k, worker, lambda: current["coeffs"], lambda: "fp32")
                        for k in ("main", "second"))
        model = _merged(models, current["coeffs"])
        result = {"sharded": main(model, 50, 3)}
        images = main.sample(model, 50, 3)
        result["pair"] = [main.score_images(images), second.score_images(images)]
        result["identity"] = main.identity
        for name, coeffs in (("nonfinite", [0.5, 0.5]), ("error", [-1.0, 2.0])):
            current["coeffs"] = coeffs
            try:
                result[name] = main(_merged(models, coeffs), 50, 3)
            except LcscError as exc:
                result[name] = f"LcscError: {exc}"
        current["coeffs"] = [0.7, 0.3]
        result["after_error"] = main(model, 50, 3)  # the group still works after a follower's failure
        stop(group)
        # One process, the same model and seed (torchmetrics' own sync is off: no follower is listening).
        result["plain"] = [scorers["main"](model, 50, 3), scorers["second"](model, 50, 3)]
        Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _spawn(fn, args, timeout: float = 150.0) -> None:
    """Run ``fn(rank, *args)`` in 2 spawned processes; fail (and kill them) after ``timeout`` s."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            assert time.monotonic() < deadline, "the processes did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


def test_sharded_fid_equals_one_process_fid(tmp_path):
    out = tmp_path / "result.json"
    _spawn(_unit_worker, (str(tmp_path / "init"), str(out)))
    r = json.loads(out.read_text())
    plain_main, plain_second = r["plain"]
    assert 0 < plain_main < math.inf and 0 < plain_second < math.inf
    assert r["sharded"] == pytest.approx(plain_main, rel=REL)
    assert r["after_error"] == r["sharded"]  # same command, same ranks: the same float
    assert r["pair"] == pytest.approx([plain_main, plain_second], rel=REL)  # one sample, two FIDs
    print(f"sharded vs one process, relative: {abs(r['sharded'] - plain_main) / plain_main:.2e} (main), "
          f"{abs(r['pair'][1] - plain_second) / plain_second:.2e} (second)")
    assert r["identity"]["processes"] == 2 and r["identity"]["fid"] == "digits-cnn"
    assert r["nonfinite"] == math.inf  # only the follower's images were non-finite
    assert r["error"].startswith("LcscError: sharded FID evaluation failed on process 1: RuntimeError: out of memory")


def test_shard_rows_cover_every_sample_once():
    from lcsc_ops.evaluation.sharding import shard_rows

    for n in (2, 3, 50, 64, 1001):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            blocks = [shard_rows(n, r, world) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
            assert all(stop > start for start, stop in blocks)


# --- optimize under accelerate launch (2 CPU processes) against one process ------------------------

SETTINGS = dict(window=4, n_trials=4, search_samples=64, final_samples=64, final_seeds=2, top_k=2, ema_grid=3,
                batch_size=24, nfe=1)  # batches of 24: the 2 processes' batch boundaries differ from one's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], cwd: Path, timeout: float = 240.0) -> tuple[int, str, str]:
    """``accelerate launch <LAUNCH> -m lcsc_ops.cli <args>`` on 2 CPU processes (the README's command,
    plus a free port); every process it started is killed when it returns."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), *LAUNCH, "--main_process_port", str(_free_port()), "-m", "lcsc_ops.cli", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's workers too, if any is left
        except ProcessLookupError:
            pass
        proc.wait()
    return proc.returncode, out, err


def _cli_args(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _relative(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def test_optimize_under_accelerate_launch_equals_one_process(tiny_run, store, tmp_path):
    from lcsc_ops.pipeline.optimize import run_optimize
    from tests.conftest import tiny_optimize_config

    # The same study settings and seeds; separate studies (storages); no score cache, no registration.
    one = run_optimize(tiny_optimize_config(tiny_run, store, storage=str(tmp_path / "one.journal"),
                                            score_cache=False, register=False, **SETTINGS), log=lambda s: None)
    rc, out, err = _launch(["optimize", tiny_run, "--tracking-uri", store["uri"], "--storage",
                            str(tmp_path / "two.journal"), "--no-score-cache", "--no-register", "--json",
                            *_cli_args(SETTINGS)], cwd=store["root"])
    assert rc == 0, err[-3000:]
    assert "FID evaluations sharded over 2 processes" in err
    two = json.loads(out[out.index("{"):])  # only rank 0 prints
    assert out.count('"source_run_id"') == 1
    assert two["trials"] == one["trials"] == SETTINGS["n_trials"]
    assert two["methods"].keys() == one["methods"].keys()
    worst = 0.0
    for name, m in one["methods"].items():
        t = two["methods"][name]
        assert t["search_mean"] == pytest.approx(m["search_mean"], rel=REL), name
        assert t["final"] == pytest.approx(m["final"], rel=REL), name  # FID @ NFE 1, 2 fresh seeds
        assert t["second_metric_mean"] == pytest.approx(m["second_metric_mean"], rel=REL), name
        if m["final_default_nfe_mean"] is None:  # an LCSC candidate: scored at --nfe only
            assert t["final_default_nfe_mean"] is None, name
        else:
            assert t["final_default_nfe_mean"] == pytest.approx(m["final_default_nfe_mean"], rel=REL), name
        assert t["coefficients"] == pytest.approx(m["coefficients"], rel=1e-6, abs=1e-9), name  # same search path
        worst = max([worst, _relative(t["search_mean"], m["search_mean"]),
                     *(_relative(a, b) for a, b in zip(t["final"], m["final"]))])
    assert sum(m["final_default_nfe_mean"] is not None for m in two["methods"].values()) >= 4  # --nfe: baselines
    print(f"accelerate launch (2 processes) vs one process: largest relative FID difference {worst:.2e}")


def test_bad_option_under_accelerate_launch_is_one_error_line(tmp_path):
    rc, out, err = _launch(["optimize", "some-run", "--n-trials", "0"], cwd=tmp_path, timeout=120)
    assert rc != 0
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: --n-trials must be >= 1, got 0"], err[-3000:]  # rank 0 only
    assert "Traceback" not in err.split("error:")[0]


def test_each_process_takes_its_own_device_and_workers_are_refused(store):
    from types import SimpleNamespace

    from lcsc_ops.errors import LcscError
    from lcsc_ops.pipeline.distributed import _on_device, run_distributed
    from tests.conftest import tiny_optimize_config

    cfg = tiny_optimize_config("r" * 32, store, device="auto")
    state = SimpleNamespace(device=torch.device("cuda", 1), num_processes=2)
    assert _on_device(cfg, state).device == "cuda:1"
    assert _on_device(tiny_optimize_config("r" * 32, store, device="cpu"), state).device == "cpu"
    with pytest.raises(LcscError, match="each process takes its own GPU"):
        _on_device(tiny_optimize_config("r" * 32, store, device="cuda:0"), state)
    with pytest.raises(LcscError, match="--workers does not combine with accelerate launch"):
        run_distributed(tiny_optimize_config("r" * 32, store, workers=2))
