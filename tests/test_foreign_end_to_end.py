"""Issue 23 item 6: runs that Lightning, transformers, an MLflow 3 loop and autolog really logged (tests/foreign_runs.py)
optimize from the command line with only the model spec options, and the registered version is the merge of the
source files with the reported coefficients. The source files are read here independently of the readers
(``torch.load``, ``safetensors``, ``torch.export.load`` on files these tests wrote themselves)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from safetensors.torch import load_file
from typer.testing import CliRunner

from lcsc_ops.checkpoints import sha256_file
from lcsc_ops.cli import app
from lcsc_ops.store.sources import SourceOptions, fetch_window, list_checkpoints
from lcsc_ops.spec import ModelSpec
from tests.foreign_runs import FACTORY, FACTORY_KWARGS

runner = CliRunner()
STEPS = [2, 4, 6, 8]
SEARCH = ["--sampler-steps", "2", "--n-trials", "2", "--search-samples", "32", "--final-samples", "32",
          "--final-seeds", "2", "--selection-seeds", "1", "--top-k", "1", "--ema-grid", "2", "--batch-size", "32",
          "--device", "cpu"]


def _optimize(store, run_id, name, *extra):
    return runner.invoke(app, ["optimize", run_id, "--factory", FACTORY, "--factory-kwargs", FACTORY_KWARGS, *SEARCH,
                               "--model-name", name, "--storage", store["storage"], "--tracking-uri", store["uri"],
                               "--json", *extra])


def _download(location: str, path: str, dst: Path) -> Path:
    """A source file fetched for the test's own reading (not through the readers)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    dst.mkdir(parents=True, exist_ok=True)
    return Path(get_artifact_repository(location).download_artifacts(path, str(dst)))


def _unprefixed(state: dict) -> dict[str, torch.Tensor]:
    assert all(k.startswith("net.") for k in state)
    return {k[len("net."):]: v for k, v in state.items()}


def _check_registered(store, run_id, layout, result, sources: dict[int, tuple[str, Path, dict]]):
    """The registered weights equal sum_i c_i * theta_i over the source files, with the reported c_i; the lineage
    names each source path and its sha256."""
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["window_steps"] == STEPS and report["source"]["layout"] == layout
    reg = report["registered_model"]
    tags = mlflow.MlflowClient(store["uri"]).get_model_version(reg["name"], reg["version"]).tags
    assert tags["lcsc.source_run"] == run_id and tags["lcsc.source_layout"] == layout
    coeffs, names = json.loads(tags["lcsc.coefficients"]), json.loads(tags["lcsc.checkpoints"])
    steps = [int(re.fullmatch(r"step0*(\d+)-raw\.safetensors", n).group(1)) for n in names]
    assert abs(sum(coeffs) - 1) < 1e-9 and set(steps) <= set(STEPS)
    assert json.loads(tags["lcsc.source_artifacts"]) == [[sources[s][0], sha256_file(sources[s][1])] for s in steps]
    first = sources[steps[0]][2]
    expected = {k: sum(c * sources[s][2][k].double() for c, s in zip(coeffs, steps)).float() for k in first}
    mlflow.set_tracking_uri(store["uri"])
    got = mlflow.pytorch.load_model(f"models:/{reg['name']}/{reg['version']}").state_dict()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    return report


def _logged_models(store, run_id):
    client = mlflow.MlflowClient(store["uri"])
    steps = {o.model_id: o.step for o in client.get_run(run_id).outputs.model_outputs}
    exp = client.get_run(run_id).info.experiment_id
    return client, [(m, steps[m.model_id]) for m in client.search_logged_models(
        [exp], filter_string=f"source_run_id='{run_id}'")]


@pytest.fixture
def downloads(monkeypatch):
    """Every (artifact location, path) the local artifact repository hands out during a test."""
    seen: list[tuple[str, str]] = []
    real = LocalArtifactRepository.download_artifacts

    def record(self, artifact_path, dst_path=None):
        seen.append((self.artifact_dir, artifact_path))
        return real(self, artifact_path, dst_path)

    monkeypatch.setattr(LocalArtifactRepository, "download_artifacts", record)
    return seen


def test_lightning_run_registers_the_merge_and_downloads_only_the_ckpt_files(store, lightning_run, tmp_path):
    client = mlflow.MlflowClient(store["uri"])
    location = client.get_run(lightning_run).info.artifact_uri
    sources = {}
    for step in STEPS:
        path = f"epoch=0-step={step}/epoch=0-step={step}.ckpt"
        local = _download(location, path, tmp_path / str(step))
        sources[step] = (path, local, _unprefixed(torch.load(local, weights_only=True)["state_dict"]))
    result = _optimize(store, lightning_run, "foreign-lightning")
    _check_registered(store, lightning_run, "lightning", result, sources)
    said = re.search(r"downloading (\d+) checkpoint file\(s\), ([\d,]+) bytes", result.stderr)
    assert said and int(said.group(1)) == len(STEPS), result.stderr
    assert int(said.group(2).replace(",", "")) == sum(p.stat().st_size for _, p, _ in sources.values())


def test_transformers_run_registers_the_merge_downloading_model_safetensors_only(store, transformers_run, tmp_path, downloads):
    client, models = _logged_models(store, transformers_run)
    sources = {}
    for m, _ in models:
        step = int(m.name.removeprefix("checkpoint-"))
        local = _download(m.artifact_location, f"artifacts/{m.name}/model.safetensors", tmp_path / m.name)
        sources[step] = (f"{m.model_id}/artifacts/{m.name}/model.safetensors", local, _unprefixed(load_file(local)))
    downloads.clear()
    result = _optimize(store, transformers_run, "foreign-transformers")
    _check_registered(store, transformers_run, "transformers", result, sources)
    # of the source run's models: model.safetensors, nothing else (never optimizer.pt, training_args.bin, ...)
    sourced = [str(Path(d) / p) for d, p in downloads
               if any(Path(d, p).resolve().is_relative_to(Path(m.artifact_location.removeprefix("file://")).resolve())
                      for m, _ in models)]
    assert [Path(p).name for p in sourced] == ["model.safetensors"] * len(STEPS), sourced


def test_mlflow3_pt2_run_registers_the_merge_of_its_logged_models(store, mlflow3_pt2_run, tmp_path):
    _, models = _logged_models(store, mlflow3_pt2_run)
    sources = {}
    for m, step in models:
        local = _download(m.artifact_location, "data/model.pt2", tmp_path / m.name)
        state = torch.export.load(local).state_dict  # trusted here: this test session wrote it
        sources[step] = (f"{m.model_id}/data/model.pt2", local, _unprefixed(dict(state)))
    result = _optimize(store, mlflow3_pt2_run, "foreign-mlflow3")
    _check_registered(store, mlflow3_pt2_run, "mlflow-models", result, sources)


def test_mlflow3_pickle_run_is_refused_in_one_line_unless_pickle_is_allowed(store, mlflow3_pickle_run, tmp_path):
    result = _optimize(store, mlflow3_pickle_run, "foreign-pickle")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: refusing to unpickle") and "--allow-pickle" in errors[0]
    assert result.output.rstrip().endswith(errors[0])
    spec = ModelSpec(FACTORY, json.loads(FACTORY_KWARGS))
    window = fetch_window(mlflow3_pickle_run, tracking_uri=store["uri"], cache_dir=tmp_path / "cache",
                          options=SourceOptions(spec=spec, allow_pickle=True))
    assert window.layout == "mlflow-models" and list(window.steps) == STEPS
    _, models = _logged_models(store, mlflow3_pickle_run)
    by_step = {e.step: e for e in window.entries}
    for m, step in models:
        local = _download(m.artifact_location, "data/model.pth", tmp_path / m.name)
        module = torch.load(local, weights_only=False)  # trusted here: this test session wrote it
        assert by_step[step].source == f"{m.model_id}/data/model.pth"
        assert by_step[step].source_sha256 == sha256_file(local)
        ours = by_step[step].load()
        for k, v in _unprefixed(module.state_dict()).items():
            assert torch.equal(ours[k], v), k


def test_autolog_run_registers_the_merge_and_lists_its_steps(store, autolog_run, tmp_path):
    client = mlflow.MlflowClient(store["uri"])
    location = client.get_run(autolog_run).info.artifact_uri
    sources = {}
    for epoch, step in enumerate(STEPS):
        path = f"checkpoints/epoch_{epoch}/checkpoint.pth"
        local = _download(location, path, tmp_path / str(epoch))
        loaded = torch.load(local, weights_only=True)
        assert loaded["global_step"] == step
        sources[step] = (path, local, _unprefixed(loaded["state_dict"]))
    listing = list_checkpoints(autolog_run, store["uri"])
    assert listing.layout == "autolog"  # not the final "model" LoggedModel autolog also logs
    assert [(e.step, e.path) for e in listing.entries] == [(s, sources[s][0]) for s in STEPS]
    result = _optimize(store, autolog_run, "foreign-autolog")
    _check_registered(store, autolog_run, "autolog", result, sources)


@pytest.mark.parametrize("fixture, experiment, layout", [
    ("lightning_run", "foreign-lightning", "lightning"), ("transformers_run", "foreign-transformers", "transformers"),
    ("mlflow3_pt2_run", "foreign-mlflow3-pt2", "mlflow-models"), ("autolog_run", "foreign-autolog", "autolog"),
])
def test_runs_and_checkpoints_name_the_layout(store, request, fixture, experiment, layout):
    run_id = request.getfixturevalue(fixture)
    listed = runner.invoke(app, ["checkpoints", run_id, "--json", "--tracking-uri", store["uri"]])
    assert listed.exit_code == 0, listed.output
    doc = json.loads(listed.stdout)
    assert doc["layout"] == layout and [e["step"] for e in doc["checkpoints"]] == STEPS
    runs = runner.invoke(app, ["runs", "--json", "--experiment", experiment, "--tracking-uri", store["uri"]])
    assert runs.exit_code == 0, runs.output
    row = next(r for r in json.loads(runs.stdout)["training"] if r["run_id"] == run_id)
    assert (row["layout"], row["checkpoints"], row["last_step"]) == (layout, len(STEPS), STEPS[-1])


def test_lightning_ema_run_gives_raw_and_ema_at_every_step(store, lightning_ema_run, tmp_path):
    """EMAWeightAveraging: the average is the .ckpt's state_dict, the live weights its current_model_state."""
    spec = ModelSpec(FACTORY, json.loads(FACTORY_KWARGS))
    window = fetch_window(lightning_ema_run, tracking_uri=store["uri"], cache_dir=tmp_path / "cache",
                          options=SourceOptions(spec=spec))
    assert window.layout == "lightning" and list(window.steps) == STEPS
    assert sorted((e.kind, e.step) for e in window.entries) == sorted((k, s) for k in ("raw", "ema") for s in STEPS)
    location = mlflow.MlflowClient(store["uri"]).get_run(lightning_ema_run).info.artifact_uri
    for e in window.entries:
        path = f"epoch=0-step={e.step}/epoch=0-step={e.step}.ckpt"
        ckpt = torch.load(_download(location, path, tmp_path / str(e.step)), weights_only=True)
        want = _unprefixed(ckpt["current_model_state" if e.kind == "raw" else "state_dict"])
        got = e.load()
        assert e.source == path and set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want), (e.kind, e.step)
    raw, ema = (next(e.load() for e in window.entries if e.kind == k and e.step == 8) for k in ("raw", "ema"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # an average, not a copy
    assert window.training_ema is not None and window.training_ema.step == 8
