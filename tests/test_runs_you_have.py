"""Issue 23's acceptance: a run that plain MLflow wrote in Lightning's ``MLFlowLogger(log_model="all")``
layout, with no lcsc manifest, optimizes and registers from the command line with only --factory and
--factory-kwargs; the registered weights are the merge of the source files; only the .ckpt files
are downloaded, and the log says how many bytes; a rerun resumes the same study from the cache."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from lcsc_ops.checkpoints import sha256_file
from lcsc_ops.cli import app
from lcsc_ops.models.unet import digits_unet

runner = CliRunner()
FACTORY, KWARGS = "lcsc_ops.models.unet:digits_unet", '{"channels": 16}'
STEPS = (50, 100, 150, 200)
SEARCH = ["--n-trials", "3", "--search-samples", "48", "--final-samples", "48", "--final-seeds", "2",
          "--top-k", "1", "--ema-grid", "2", "--batch-size", "48", "--device", "cpu"]


def _state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in digits_unet(channels=16).state_dict().items()}


def write_lightning_run(uri: str, folder: Path, steps=STEPS, experiment: str = "lightning-like") -> tuple[str, dict]:
    """A run laid out as Lightning's MLFlowLogger(log_model="all") leaves it, written with plain mlflow:
    ``epoch=0-step=<n>/epoch=0-step=<n>.ckpt`` (state_dict under ``net.``, global_step, epoch and an
    optimizer state that must never be merged) with metadata.yaml and aliases.txt beside it."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    files = {}
    with mlflow.start_run() as run:
        for i, step in enumerate(steps):
            stem = f"epoch=0-step={step}"
            sub = folder / stem
            sub.mkdir(parents=True)
            state = _state(i)
            path = sub / f"{stem}.ckpt"
            torch.save({"state_dict": {"net." + k: v for k, v in state.items()}, "global_step": step, "epoch": 0,
                        "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4096)}}}]}, path)
            (sub / "metadata.yaml").write_text(f"original_filename: {stem}.ckpt\n")
            (sub / "aliases.txt").write_text('["latest"]' if step == steps[-1] else "[]")
            mlflow.log_artifacts(str(sub), stem)
            files[step] = (f"{stem}/{stem}.ckpt", path, state)
    return run.info.run_id, files


@pytest.fixture(scope="module")
def lightning_like(store, tmp_path_factory):
    return write_lightning_run(store["uri"], tmp_path_factory.mktemp("lightning-like"))


def _optimize(store, run_id, *extra):
    return runner.invoke(app, ["optimize", run_id, "--factory", FACTORY, "--factory-kwargs", KWARGS, *SEARCH,
                               "--storage", store["storage"], "--tracking-uri", store["uri"], "--json", *extra])


@pytest.fixture(scope="module")
def optimized(store, lightning_like):
    result = _optimize(store, lightning_like[0], "--model-name", "from-lightning")
    assert result.exit_code == 0, result.output
    return result


def test_a_lightning_run_optimizes_and_registers_the_merge_of_its_files(store, lightning_like, optimized):
    run_id, files = lightning_like
    result = optimized
    report = json.loads(result.stdout)
    assert report["window_steps"] == list(STEPS) and report["source"]["layout"] == "lightning"
    # only the .ckpt files were downloaded (whole: a .ckpt cannot be partly downloaded), and the log says so
    said = re.search(r"downloading (\d+) checkpoint file\(s\), ([\d,]+) bytes", result.stderr)
    assert said, result.stderr
    assert int(said.group(1)) == len(STEPS)
    assert int(said.group(2).replace(",", "")) == sum(p.stat().st_size for _, p, _ in files.values())
    reg = report["registered_model"]
    mv = mlflow.tracking.MlflowClient(store["uri"]).get_model_version(reg["name"], reg["version"])
    tags = mv.tags
    assert tags["lcsc.source_run"] == run_id and tags["lcsc.source_layout"] == "lightning"
    coeffs, names = json.loads(tags["lcsc.coefficients"]), json.loads(tags["lcsc.checkpoints"])
    steps = [int(re.match(r"step(\d+)-raw", n).group(1)) for n in names]
    assert json.loads(tags["lcsc.source_artifacts"]) == [[files[s][0], sha256_file(files[s][1])] for s in steps]
    expected = {k: sum(c * files[s][2][k].double() for c, s in zip(coeffs, steps)).float() for k in files[STEPS[0]][2]}
    mlflow.set_tracking_uri(store["uri"])
    got = mlflow.pytorch.load_model(f"models:/{reg['name']}/{reg['version']}").state_dict()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)

    again = _optimize(store, run_id, "--model-name", "from-lightning")  # resumes the same study, from the cache
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["study"] == report["study"] and second["parent_run_id"] == report["parent_run_id"]
    assert second["registered_model"]["version"] == reg["version"] and "downloading" not in again.stderr


def test_report_reads_the_source_run_again_as_the_optimization_did(store, lightning_like, optimized, tmp_path):
    report = json.loads(optimized.stdout)
    result = runner.invoke(app, ["report", report["parent_run_id"], "--out", str(tmp_path / "report"), "--samples", "2",
                                 "--device", "cpu", "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "results.md").is_file()


def test_checkpoints_and_runs_show_the_lightning_layout(store, lightning_like):
    run_id, files = lightning_like
    result = runner.invoke(app, ["checkpoints", run_id, "--json", "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed["layout"] == "lightning"
    assert [(e["step"], e["kind"], e["path"], e["bytes"]) for e in listed["checkpoints"]] == \
        [(s, "raw", files[s][0], files[s][1].stat().st_size) for s in STEPS]
    runs = runner.invoke(app, ["runs", "--json", "--experiment", "lightning-like", "--tracking-uri", store["uri"]])
    assert runs.exit_code == 0, runs.output
    row = next(r for r in json.loads(runs.stdout)["training"] if r["run_id"] == run_id)
    assert (row["layout"], row["checkpoints"], row["last_step"]) == ("lightning", len(STEPS), STEPS[-1])


def test_a_run_with_one_overwritten_file_is_one_error_line(store, tmp_path):
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("lightning-like-last")
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"net." + k: v for k, v in _state(0).items()}, "global_step": 9, "epoch": 0}, path)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(path), "last")
    result = _optimize(store, run.info.run_id)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "holds no window of checkpoints" in lines[0] and "save_top_k=-1" in lines[0]


def test_spec_options_are_refused_for_a_run_that_records_its_own(store, tiny_run):
    result = _optimize(store, tiny_run)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "records its own model spec" in lines[0], result.output


def test_a_run_of_the_users_own_loop_is_listed_as_a_training_run(store):
    """CheckpointLogger in the user's own loop tags the run lcsc.kind=training, so `runs` lists it."""
    from lcsc_ops.spec import spec_from_options
    from lcsc_ops.store.logger import CheckpointLogger

    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_experiment("own-loop-listed")
    net = digits_unet(channels=8)
    with mlflow.start_run() as run:
        with CheckpointLogger(spec_from_options(FACTORY, {"channels": 8}), every=1) as ckpt:
            for step in (1, 2):
                ckpt.step(net, step)
    assert mlflow.tracking.MlflowClient(store["uri"]).get_run(run.info.run_id).data.tags["lcsc.kind"] == "training"
    runs = runner.invoke(app, ["runs", "--json", "--experiment", "own-loop-listed", "--tracking-uri", store["uri"]])
    assert runs.exit_code == 0, runs.output
    row = next(r for r in json.loads(runs.stdout)["training"] if r["run_id"] == run.info.run_id)
    assert (row["kind"], row["layout"], row["checkpoints"], row["last_step"]) == ("training", "lcsc", 4, 2)


def _lightning_folder(folder: Path, steps=(10, 20, 30), **extra) -> dict[int, tuple[dict, dict]]:
    """A Lightning ModelCheckpoint folder under WeightAveraging: the average in state_dict, the live
    weights in current_model_state, keys under net.; last.ckpt a copy of the newest."""
    folder.mkdir()
    states = {}
    for i, step in enumerate(steps):
        raw, ema = _state(10 + i), _state(20 + i)
        ckpt = {"state_dict": {"net." + k: v for k, v in ema.items()},
                "current_model_state": {"net." + k: v for k, v in raw.items()},
                "averaging_state": {"n_averaged": torch.tensor(step)}, "global_step": step, "epoch": 0,
                "optimizer_states": [{"state": {}}], **extra}
        torch.save(ckpt, folder / f"epoch=0-step={step}.ckpt")
        states[step] = (raw, ema)
    torch.save(ckpt, folder / "last.ckpt")
    return states


def test_import_of_a_lightning_checkpoint_folder_takes_raw_and_ema_from_each_ckpt(store, tmp_path):
    from lcsc_ops.store.sources import fetch_window

    states = _lightning_folder(tmp_path / "ckpts")
    result = runner.invoke(app, ["import", str(tmp_path / "ckpts"), "--factory", FACTORY, "--factory-kwargs", KWARGS,
                                 "--experiment", "import-lightning", "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    window = fetch_window(run_id, tracking_uri=store["uri"], cache_dir=tmp_path / "cache")
    assert window.steps == (10, 20, 30) and window.training_ema.step == 30
    assert [(e.kind, e.step) for e in window.entries] == [("raw", 10), ("raw", 20), ("raw", 30),
                                                          ("ema", 10), ("ema", 20), ("ema", 30)]
    for e in window.entries:
        want = states[e.step][0 if e.kind == "raw" else 1]
        got = e.load()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), e.label


def test_import_refuses_a_ckpt_that_needs_unpickling_unless_allowed(store, tmp_path):
    import argparse

    _lightning_folder(tmp_path / "pickled", steps=(1, 2), hyper_parameters=argparse.Namespace(lr=0.1))
    args = ["import", str(tmp_path / "pickled"), "--factory", FACTORY, "--factory-kwargs", KWARGS,
            "--experiment", "import-lightning", "--tracking-uri", store["uri"]]
    refused = runner.invoke(app, args)
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 1 and len(lines) == 1, refused.output
    assert "argparse.Namespace" in lines[0] and "--allow-pickle" in lines[0]
    allowed = runner.invoke(app, [*args, "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.output
