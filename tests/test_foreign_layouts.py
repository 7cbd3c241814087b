"""Where Lightning, transformers and MLflow 3 really put checkpoints in a run (the installed versions, for
real on CPU): the facts the foreign readers (lcsc_ops/store/sources/) are built on. If an upgrade moves a
file, this fails first and says which."""
from __future__ import annotations

import json

import mlflow
import torch

from lcsc_ops.store.sources.pt2 import load_pt2_weights


def _files(client, run_id, path=None):
    out = {}
    for f in client.list_artifacts(run_id, path):
        if f.is_dir:
            out.update(_files(client, run_id, f.path))
        else:
            out[f.path] = f.file_size
    return out


def _models(client, run_id):
    exp = client.get_run(run_id).info.experiment_id
    return sorted(client.search_logged_models([exp], filter_string=f"source_run_id='{run_id}'"),
                  key=lambda m: m.creation_timestamp)


def _model_files(client, model_id, path=None):
    out = {}
    for f in client.list_logged_model_artifacts(model_id, path):
        out.update(_model_files(client, model_id, f.path) if f.is_dir else {f.path: f.file_size})
    return out


def test_lightning_mlflow_logger_uploads_stem_folders(store, lightning_run):
    files = _files(mlflow.MlflowClient(store["uri"]), lightning_run)
    for step in (2, 4, 6, 8):
        stem = f"epoch=0-step={step}"
        assert {f"{stem}/{stem}.ckpt", f"{stem}/metadata.yaml", f"{stem}/aliases.txt"} <= set(files)
    assert not [p for p in files if p.endswith(".ckpt") and "step=" not in p]


def test_autolog_writes_epoch_folders_with_metrics(store, autolog_run, tmp_path):
    client = mlflow.MlflowClient(store["uri"])
    files = _files(client, autolog_run)
    assert {f"checkpoints/epoch_{e}/checkpoint.pth" for e in range(4)} <= set(files)
    got = client.download_artifacts(autolog_run, "checkpoints/epoch_3/checkpoint_metrics.json", str(tmp_path))
    assert json.loads(open(got).read())["global_step"] == 8
    # autolog's default log_models=True: the final model as one LoggedModel, step 0
    assert [m.name for m in _models(client, autolog_run)] == ["model"]
    assert [o.step for o in client.get_run(autolog_run).outputs.model_outputs] == [0]


def test_transformers_logs_checkpoint_models_with_step_zero(store, transformers_run):
    client = mlflow.MlflowClient(store["uri"])
    models = _models(client, transformers_run)
    assert [m.name for m in models] == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert {o.step for o in client.get_run(transformers_run).outputs.model_outputs} == {0}
    files = _model_files(client, models[0].model_id)
    for name in ("model.safetensors", "trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin"):
        assert f"artifacts/checkpoint-2/{name}" in files, name
    assert not _files(client, transformers_run)  # nothing in the run's own artifacts


def test_mlflow3_log_model_records_steps_in_the_run_outputs(store, mlflow3_pt2_run, mlflow3_pickle_run, tmp_path):
    client = mlflow.MlflowClient(store["uri"])
    for run_id, weights in ((mlflow3_pt2_run, "data/model.pt2"), (mlflow3_pickle_run, "data/model.pth")):
        models = _models(client, run_id)
        steps = {o.model_id: o.step for o in client.get_run(run_id).outputs.model_outputs}
        assert [(m.name, steps[m.model_id]) for m in models] == [(f"checkpoint-{s}", s) for s in (2, 4, 6, 8)]
        assert weights in _model_files(client, models[0].model_id)
    # the pt2 weights read without torch.export.load equal what torch.export.load gives
    model = _models(client, mlflow3_pt2_run)[-1]
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    local = get_artifact_repository(model.artifact_location).download_artifacts("data/model.pt2", str(tmp_path))
    ours = load_pt2_weights(__import__("pathlib").Path(local), "model.pt2", allow_pickle=False)
    theirs = torch.export.load(local).state_dict
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert all(k.startswith("net.") for k in ours)


def test_logged_models_are_listed_over_every_page(store, mlflow3_pt2_run, monkeypatch):
    from lcsc_ops.store.sources import list_checkpoints, logged_models

    monkeypatch.setattr(logged_models, "PAGE", 1)  # one model a page: four pages
    listing = list_checkpoints(mlflow3_pt2_run, store["uri"])
    assert listing.layout == "mlflow-models" and [e.step for e in listing.entries] == [2, 4, 6, 8]
