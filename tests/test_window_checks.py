"""A run's checkpoints against its spec, before anything is built for real or scored.

Issue 25, items 2 and 3: a checkpoint with a tensor of another shape (manifest and sha256
all correct) is one ``error:`` line naming the file, the tensor and both shapes; a spec whose
kwargs build a model far larger than its checkpoints is refused with both sizes, in
``optimize``, ``report`` and ``import``, and every build before the refusal is on the meta
device (no memory).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lcsc_ops.checkpoints import checkpoint_filename, sha256_file, write_checkpoint
from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.layouts import check_checkpoints, human_bytes
from lcsc_ops.spec import ModelSpec
from tests.test_bad_input import TRUST_LINEAR, Unchanged, _artifact
from tests.test_trust import LINEAR, _crafted_run, _entry, _one_line_error, _spec_dict, cache  # noqa: F401

runner = CliRunner()
HUGE = {"in_features": 10_000_000, "out_features": 10_000_000}  # 400 TB of fp32 weights: never allocatable


@pytest.fixture
def builds(monkeypatch) -> list[str]:
    """The default device of every ``ModelSpec.build`` call, in order."""
    seen: list[str] = []
    real = ModelSpec.build

    def build(self, *args, **kwargs):
        seen.append(str(torch.get_default_device()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ModelSpec, "build", build)
    return seen


def _optimize(store, run_id: str, window: int = 1):
    return runner.invoke(app, ["optimize", run_id, "--window", str(window), "--n-trials", "1", "--search-samples",
                               "8", "--final-samples", "8", "--final-seeds", "1", "--top-k", "1", "--ema-grid", "2",
                               "--no-register", "--device", "cpu", "--batch-size", "8", "--storage",
                               store["storage"], "--tracking-uri", store["uri"], *TRUST_LINEAR])


def _run_with(store, tmp_path: Path, states: dict[tuple[int, str], dict]) -> str:
    """A crafted run whose manifest lists exactly ``states`` (true sha256 and bytes)."""
    local = tmp_path / "states"
    local.mkdir(exist_ok=True)
    entries = []
    for (step, kind), state in states.items():
        path = local / checkpoint_filename(step, kind)
        write_checkpoint(path, state, step=step, kind=kind, spec=LINEAR)
        entries.append(_entry(step, kind, sha256=sha256_file(path), bytes=path.stat().st_size))
    run_id = _crafted_run(store, tmp_path, entries=entries)
    for step, kind in states:
        name = checkpoint_filename(step, kind)
        _artifact(store, run_id, name).write_bytes((local / name).read_bytes())
    return run_id


def _linear(inputs: int = 2) -> dict:
    return {"weight": torch.zeros(2, inputs), "bias": torch.zeros(2)}


def test_a_checkpoint_with_a_tensor_of_another_shape_is_one_line_naming_it(store, cache, tmp_path, builds):
    bad = checkpoint_filename(20, "raw")
    run_id = _run_with(store, tmp_path, {(10, "raw"): _linear(), (20, "raw"): _linear(3), (20, "ema"): _linear()})
    with Unchanged(store, tmp_path / "states"):
        _one_line_error(_optimize(store, run_id, window=2), f"run {run_id}", bad, "'weight'", "(2, 3)", "(2, 2)")
    assert builds and set(builds) == {"meta"}, builds  # nothing built for real, so nothing scored


def test_checkpoints_that_disagree_in_dtype_name_the_second_file(store, cache, tmp_path):
    half = {k: v.half() for k, v in _linear().items()}
    run_id = _run_with(store, tmp_path, {(10, "raw"): _linear(), (20, "raw"): half})
    line = _one_line_error(_optimize(store, run_id, window=2), checkpoint_filename(20, "raw"), "F16", "F32")
    assert checkpoint_filename(10, "raw") in line


def test_raw_and_ema_checkpoints_of_another_dtype_are_one_line(store, cache, tmp_path):
    """Every checkpoint of a window goes into one stack (raw and EMA), which needs one dtype:
    an EMA kept in another precision is named before the merge would fail with a traceback."""
    half = {k: v.half() for k, v in _linear().items()}
    run_id = _run_with(store, tmp_path, {(10, "raw"): half, (10, "ema"): _linear(), (20, "raw"): half,
                                         (20, "ema"): _linear()})
    _one_line_error(_optimize(store, run_id, window=2), f"run {run_id}", checkpoint_filename(10, "ema"), "F32",
                    "F16", "in step00000010-raw.safetensors")


def test_a_spec_far_larger_than_its_checkpoints_is_refused_before_any_allocation(store, cache, tmp_path, builds):
    run_id = _crafted_run(store, tmp_path, spec=_spec_dict(**HUGE))
    with Unchanged(store):  # the verified downloads land in the cache: whole files
        line = _one_line_error(_optimize(store, run_id), f"run {run_id}", "builds a model of", "largest checkpoint")
    assert human_bytes(4 * 10 ** 14 + 4 * 10 ** 7) in line  # the model's size ...
    assert " B" in line.split("largest checkpoint holds")[1]  # ... and the checkpoint's (a few hundred bytes)
    assert builds == ["meta"]


def test_a_slightly_larger_model_passes_and_the_margin_is_measured_in_the_checkpoints_dtype(tmp_path):
    """A 32-bit model over 16-bit checkpoints is not refused (the files store half the bytes);
    a model 5x its checkpoint is, past the margin and the slack."""
    path = tmp_path / "half.safetensors"
    save_file({"weight": torch.zeros(512, 512, dtype=torch.float16), "bias": torch.zeros(512, dtype=torch.float16)},
              str(path))
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 512, "out_features": 512})
    assert check_checkpoints(spec, [("half", path, path.stat().st_size)], "spec")
    big = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 512 * 5, "out_features": 512})
    with pytest.raises(LcscError, match=r"builds a model of 5\.0 MiB, but its largest checkpoint holds 513\.\d KiB"):
        check_checkpoints(big, [("half", path, path.stat().st_size)], "spec")


def test_import_refuses_a_factory_far_larger_than_its_files(store, tmp_path, builds):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    save_file({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, str(folder / "step1.safetensors"))
    with Unchanged(store, tmp_path):
        result = runner.invoke(app, ["import", str(folder), "--factory", "torch.nn:Linear", "--factory-kwargs",
                                     json.dumps(HUGE), "--step-pattern", r"step(\d+)", "--tracking-uri", store["uri"]])
        _one_line_error(result, "'torch.nn:Linear'", "builds a model of", "largest checkpoint")
    assert builds and set(builds) == {"meta"}, builds  # nothing built for real


def test_report_refuses_a_source_run_whose_spec_is_far_larger(store, cache, tmp_path, builds):
    source = _crafted_run(store, tmp_path, spec=_spec_dict(**HUGE))
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("crafted").experiment_id
    parent = client.create_run(exp, tags={"lcsc.kind": "optimize"}).info.run_id
    row = {"kind": "baseline", "search_mean": 1.0, "final_mean": 1.0, "final_std": 0.0, "final": [1.0],
           "checkpoints": ["raw@10"], "coefficients": [1.0]}
    results = {"source_run_id": source, "metric": "fid", "window_steps": [10], "methods": {"last": row},
               "strongest_baseline": "last", "best_lcsc": "last", "winner": "last", "trials": 1, "strategy": "cmaes",
               "basis": "raw", "search_seeds": [0], "search_samples": 8, "final_seeds": [1], "final_samples": 8}
    client.log_text(parent, json.dumps(results), "results.json")
    client.set_terminated(parent)
    result = runner.invoke(app, ["report", parent, "--tracking-uri", store["uri"], "--device", "cpu",
                                 "--trust-factory", "torch.nn", "--out", str(tmp_path / "out")])
    _one_line_error(result, f"run {source}", "builds a model of", "largest checkpoint")
    assert builds == ["meta"] and not (tmp_path / "out").exists()


def test_a_matching_window_passes_the_checks(store, cache, tmp_path, builds):
    """Not an error: the true checkpoints of a crafted run pass, built on the meta device only."""
    from lcsc_ops.pipeline.checks import check_window
    from lcsc_ops.spec import Trust
    from lcsc_ops.store.fetch import fetch_window

    run_id = _crafted_run(store, tmp_path)
    window = fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=cache, trust=Trust(("torch.nn",)))
    lines: list[str] = []
    check_window(window, lines.append)
    assert lines == [] and builds == ["meta"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_agrees_with_the_elementwise_check(dtype):
    """The sum-first check says what ``isfinite().all()`` says: NaN, +inf, -inf, both infinities
    (their sum is NaN), a sum that overflows though every element is finite, an empty tensor."""
    from lcsc_ops.weightfiles import all_finite

    big = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(10_000, generator=gen).to(dtype), torch.full((64,), big / 2, dtype=dtype),
             torch.full((64,), -big / 2, dtype=dtype), torch.empty(0, dtype=dtype)]
    for value in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(10_000, generator=gen).to(dtype)
        t[int(torch.randint(10_000, (1,), generator=gen))] = value
        cases.append(t)
    both = torch.zeros(8, dtype=dtype)
    both[1], both[5] = float("inf"), float("-inf")
    cases.append(both)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    assert not bool(torch.isfinite(cases[1].sum())) and all_finite(cases[1])  # the overflow case is exercised
