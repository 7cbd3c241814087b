"""Tiny training -> optimize -> register -> promote -> load by alias, and resuming the study."""
from __future__ import annotations

import json

import mlflow
import optuna
import pytest
import torch

from lcsc_ops.pipeline.optimize import run_optimize
from lcsc_ops.math.merge import merge_state_dicts
from lcsc_ops.models.unet import DigitsUNet
from lcsc_ops.store.fetch import fetch_window
from lcsc_ops.checkpoints import sha256_file
from lcsc_ops.store.registry import promote
from lcsc_ops.search.storage import make_storage
from tests.conftest import tiny_optimize_config

BASELINES = {"last", "uniform", "ema_star", "training_ema"}


@pytest.fixture(scope="module")
def optimized(store, tiny_run):
    cfg = tiny_optimize_config(tiny_run, store, model_name="tiny-ddpm")
    return cfg, run_optimize(cfg, log=lambda m: None)


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def test_report_has_baselines_and_lcsc(optimized):
    cfg, report = optimized
    assert BASELINES <= set(report["methods"])
    assert {"lcsc_top1", "lcsc_top2", "lcsc_avg"} <= set(report["methods"])
    for row in report["methods"].values():
        assert len(row["final"]) == cfg.final_seeds and row["final_mean"] > 0
        assert sum(row["coefficients"]) == 1.0
    assert report["strongest_baseline"] in BASELINES
    assert report["winner"] in report["methods"]
    # the winner is the best final mean of all methods
    assert report["methods"][report["winner"]]["final_mean"] == min(r["final_mean"] for r in report["methods"].values())


def test_one_child_run_per_trial_with_coefficients(store, optimized):
    cfg, report = optimized
    client = mlflow.tracking.MlflowClient(store["uri"])
    children = _children(client, report["parent_run_id"])
    # n_trials searched, plus the start trial: the centre, scored before the search, not re-evaluated
    assert len(children) == cfg.n_trials + 1
    start = [r for r in children if "lcsc.start" in r.data.tags]
    assert len(start) == 1 and start[0].data.tags["lcsc.start"] == report["centre"]
    assert start[0].data.tags["lcsc.trial"] == "0"
    assert start[0].data.metrics["fid"] == report["methods"][report["centre"]]["search_mean"]
    basis_size = 2 * cfg.window
    for run in children:
        coeffs = [float(run.data.params[f"c{i:02d}"]) for i in range(basis_size)]
        assert sum(coeffs) == 1.0
        assert run.data.metrics["fid"] > 0
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"search_fid.last", "final_fid.uniform"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "plots" not in artifacts  # one set of plots: the report's
    report_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/search_curve.png", "report/coefficients.png", "report/results.md"} <= report_files


def test_registered_promoted_model_is_the_recomputed_merge(store, tiny_run, optimized):
    _, report = optimized
    name, version = report["registered_model"]["name"], report["registered_model"]["version"]
    promote(name, version, "champion", tracking_uri=store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert type(model) is DigitsUNet  # the user's own class, not a GraphModule
    mv = mlflow.tracking.MlflowClient(store["uri"]).get_model_version(name, version)
    tags = mv.tags
    assert tags["lcsc.source_run"] == tiny_run and tags["lcsc.winner"] == report["winner"]
    coeffs = json.loads(tags["lcsc.coefficients"])
    files = json.loads(tags["lcsc.checkpoints"])
    hashes = json.loads(tags["lcsc.checkpoint_sha256"])
    assert sum(coeffs) == 1.0 and len(coeffs) == len(files) == len(hashes)
    window = fetch_window(tiny_run, window=6, tracking_uri=store["uri"], cache_dir=store["cache"])
    by_file = {e.file: e for e in window.entries}
    assert [sha256_file(by_file[f].path) for f in files] == hashes
    expected = merge_state_dicts([by_file[f].load() for f in files], coeffs)
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_resume_runs_only_missing_trials_under_the_same_parent(store, tiny_run, optimized):
    cfg, report = optimized
    more = run_optimize(tiny_optimize_config(tiny_run, store, n_trials=7, register=False), log=lambda m: None)
    assert more["parent_run_id"] == report["parent_run_id"]
    study = optuna.load_study(study_name=report["study"], storage=make_storage(store["storage"]))
    assert len([t for t in study.trials if t.value is not None and "lcsc.start" not in t.user_attrs]) == 7
    assert len([t for t in study.trials if "lcsc.start" in t.user_attrs]) == 1  # added once, not on resume
    client = mlflow.tracking.MlflowClient(store["uri"])
    assert len(_children(client, report["parent_run_id"])) == 7 + 1


def test_search_is_centred_on_the_strongest_baseline(store, optimized):
    _, report = optimized
    study = optuna.load_study(study_name=report["study"], storage=make_storage(store["storage"]))
    setup = study.user_attrs["lcsc.setup"]
    centre = {"name": setup["centre"], "coefficients": setup["coefficients"]}
    baselines = {n: r for n, r in report["methods"].items() if r["kind"] == "baseline"}
    assert centre["name"] == min(baselines, key=lambda n: baselines[n]["search_mean"]) == report["centre"]
    # the stored centre, over the basis (raw then EMA), is that baseline's own coefficients
    labels = [f"raw@{s}" for s in report["window_steps"]] + [f"ema@{s}" for s in report["window_steps"]]
    own = dict(zip(baselines[centre["name"]]["checkpoints"], baselines[centre["name"]]["coefficients"]))
    assert centre["coefficients"] == [own.get(label, 0.0) for label in labels]
    assert sum(centre["coefficients"]) == 1.0


def test_running_a_finished_optimization_again_registers_nothing_new(store, tiny_run):
    cfg = tiny_optimize_config(tiny_run, store, model_name="tiny-again", seed=7, n_trials=3)
    first = run_optimize(cfg, log=lambda m: None)
    again = run_optimize(cfg, log=lambda m: None)
    assert again["parent_run_id"] == first["parent_run_id"]
    assert again["registered_model"]["version"] == first["registered_model"]["version"] == "1"
    assert again["registered_model"].get("existing") is True
    client = mlflow.tracking.MlflowClient(store["uri"])
    assert client.get_run(again["parent_run_id"]).info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'tiny-again'")) == 1
