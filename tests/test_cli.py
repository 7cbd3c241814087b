"""The command line: one-line errors for bad input, the table and --json output."""
from __future__ import annotations

import json

import mlflow
from typer.testing import CliRunner

from lcsc_ops.cli import app

runner = CliRunner()


def _invoke(store, *args):
    return runner.invoke(app, [*args, "--tracking-uri", store["uri"]])


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def test_unknown_run_id(store):
    _assert_one_line_error(_invoke(store, "optimize", "0123456789abcdef0123456789abcdef"),
                           "unknown run id", "0123456789abcdef0123456789abcdef")


def test_run_without_checkpoints(store):
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("empty") or client.get_experiment(client.create_experiment("empty"))
    run = client.create_run(exp.experiment_id)
    _assert_one_line_error(_invoke(store, "optimize", run.info.run_id), run.info.run_id, "no checkpoints")


def test_promote_unknown_model_and_version(store, tiny_run):
    _assert_one_line_error(_invoke(store, "promote", "no-such-model", "1"), "no-such-model")
    client = mlflow.tracking.MlflowClient(store["uri"])
    if not client.search_registered_models("name = 'cli-model'"):
        client.create_registered_model("cli-model")
    _assert_one_line_error(_invoke(store, "promote", "cli-model", "42"), "cli-model", "42")


def test_bad_option_values(store, tiny_run):
    _assert_one_line_error(_invoke(store, "optimize", tiny_run, "--basis", "weird"), "basis")
    _assert_one_line_error(_invoke(store, "optimize", tiny_run, "--strategy", "nope"), "nope")


def test_optimize_json_output(store, tiny_run):
    result = _invoke(store, "optimize", tiny_run, "--window", "2", "--n-trials", "2", "--search-samples", "32",
                     "--final-samples", "32", "--final-seeds", "2", "--top-k", "1", "--no-register", "--json",
                     "--storage", store["storage"], "--batch-size", "64")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["trials"] == 2 and "registered_model" not in report
    assert {"last", "uniform", "ema_star", "training_ema", "lcsc_top1"} <= set(report["methods"])
