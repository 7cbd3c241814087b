"""``lcsc-ops runs`` and ``lcsc-ops checkpoints``: what the tracking store holds, as tables and JSON."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.store.fetch import read_manifest
from tests.conftest import TINY_TRAIN, tiny_optimize_config

runner = CliRunner()


@pytest.fixture(scope="module")
def optimized(store, tiny_run):
    from lcsc_ops.pipeline.optimize import run_optimize

    cfg = tiny_optimize_config(tiny_run, store, model_name="tiny-listing", seed=61, n_trials=1, window=2, top_k=1,
                               final_samples=32, search_samples=32)
    return run_optimize(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def partial_run(store):
    """A run with one logged checkpoint step (files and manifest fragment) and no complete manifest yet."""
    from lcsc_ops.checkpoints import checkpoint_filename, sha256_file, write_checkpoint
    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.store.logger import CheckpointUploader

    spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"in_channels": 1, "channels": 8},
                     sampler={"name": "ddim", "steps": 3}, dataset="digits", image_shape=(1, 8, 8))
    uploader = CheckpointUploader.create_run(spec, experiment="listing-partial", run_name="still-training",
                                             tags={"lcsc.kind": "training"}, tracking_uri=store["uri"])
    folder = store["root"] / "partial-step"
    folder.mkdir(exist_ok=True)
    path = folder / checkpoint_filename(70, "raw")
    write_checkpoint(path, {"w": torch.ones(3)}, step=70, kind="raw", spec=spec)
    entry = {"step": 70, "kind": "raw", "file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
    uploader.add_step(folder, [entry])
    return uploader.run_id, entry


def _runs(store, *args):
    result = runner.invoke(app, ["runs", *args, "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    return result


def test_runs_json_lists_training_runs_with_checkpoints_and_spec(store, tiny_run, optimized, partial_run):
    found = json.loads(_runs(store, "--json").stdout)
    row = next(r for r in found["training"] if r["run_id"] == tiny_run)
    entries = read_manifest(tiny_run, store["uri"])["entries"]
    steps, every = TINY_TRAIN["steps"], TINY_TRAIN["checkpoint_every"]
    assert row["checkpoints"] == len(entries) == 2 * (steps // every)  # raw + EMA at every checkpoint step
    assert row["bytes"] == sum(e["bytes"] for e in entries)
    assert row["last_step"] == steps and row["train_steps"] == steps and row["complete"] is True
    assert (row["factory"], row["sampler"], row["sampler_steps"], row["dataset"]) == \
        ("lcsc_ops.models.unet:digits_unet", "ddim", TINY_TRAIN["sampler_steps"], "digits")
    assert row["kind"] == "training" and row["status"] == "FINISHED" and row["experiment"] == "tests"
    opt = next(r for r in found["optimize"] if r["run_id"] == optimized["parent_run_id"])
    reg = optimized["registered_model"]
    assert opt["source_run"] == tiny_run and opt["status"] == "FINISHED"
    assert opt["registered_model"] == f"{reg['name']}/{reg['version']}"
    partial = next(r for r in found["training"] if r["run_id"] == partial_run[0])
    assert partial["complete"] is False and partial["checkpoints"] == 1 and partial["sampler_steps"] == 3


def test_runs_filters_by_experiment_and_prints_tables(store, tiny_run, optimized, partial_run):
    only = json.loads(_runs(store, "--experiment", "listing-partial", "--json").stdout)
    assert [r["run_id"] for r in only["training"]] == [partial_run[0]] and only["optimize"] == []
    table = _runs(store, "--experiment", "tests").stdout
    assert "training runs" in table and "optimize runs" in table
    assert tiny_run in table and optimized["parent_run_id"] in table and partial_run[0] not in table
    assert f"{optimized['registered_model']['name']}/{optimized['registered_model']['version']}" in table
    result = runner.invoke(app, ["runs", "--experiment", "no-such-experiment", "--tracking-uri", store["uri"]])
    assert result.exit_code == 1 and result.output.strip() == "error: unknown experiment 'no-such-experiment'"


def test_checkpoints_lists_the_manifest(store, tiny_run):
    result = runner.invoke(app, ["checkpoints", tiny_run, "--json", "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    entries = read_manifest(tiny_run, store["uri"])["entries"]
    assert listed["complete"] is True
    assert [(e["step"], e["kind"], e["bytes"], e["sha256"]) for e in listed["checkpoints"]] == \
        sorted(((e["step"], e["kind"], e["bytes"], e["sha256"]) for e in entries),
               key=lambda t: (t[0], ("raw", "ema").index(t[1])))
    table = runner.invoke(app, ["checkpoints", tiny_run, "--tracking-uri", store["uri"]])
    assert table.exit_code == 0, table.output
    for e in entries:
        assert e["sha256"][:12] in table.stdout and f"{e['bytes']:,}" in table.stdout
    assert f"{len(entries)} checkpoints" in table.stdout


def test_checkpoints_of_a_run_still_training_come_from_its_fragments(store, partial_run):
    run_id, entry = partial_run
    result = runner.invoke(app, ["checkpoints", run_id, "--json", "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed["complete"] is False and listed["checkpoints"] == [entry]
    table = runner.invoke(app, ["checkpoints", run_id, "--tracking-uri", store["uri"]])
    assert "partial" in table.stdout and entry["sha256"][:12] in table.stdout


def test_checkpoints_bad_input_is_one_line(store, optimized):
    for run_id, needle in (("0123456789abcdef0123456789abcdef", "unknown run id"), ("../x", "not an MLflow run id"),
                           (optimized["parent_run_id"], "has no checkpoints")):
        result = runner.invoke(app, ["checkpoints", run_id, "--tracking-uri", store["uri"]])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
            result.output
