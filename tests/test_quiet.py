"""Quiet by default (issue 25 item 5): against a real ``mlflow server``, ``train`` and ``optimize`` print our
lines only; MLflow's run links, registration lines and warnings and Optuna's lines come back with ``--verbose``."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.services import mlflow_server

NOISE = ("View run", "View experiment", "Successfully registered", "Created version", "WARNING", "pickle",
         "failed with parameters", "Trial ", "Traceback")
OURS = ("MLFLOW_LOGGING_LEVEL", "_LCSC_OPS_MLFLOW_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "LCSC_OPS_VERBOSE",
        "LCSC_OPS_DEBUG")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("quiet-server")
    with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}", workers=1) as url:
        yield url


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in OURS}  # what a user's shell has
    return subprocess.run([sys.executable, "-m", "lcsc_ops.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def _train(server: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("train", "--tracking-uri", server, "--steps", "20", "--batch-size", "32", "--channels", "8",
                "--checkpoint-every", "5", "--sampler-steps", "2", "--log-every", "10", "--warmup-steps", "5",
                "--experiment", "quiet", *extra, cwd=tmp_path)


def test_train_quiet_prints_the_run_id_only_and_verbose_brings_mlflows_links_back(server, tmp_path):
    quiet = _train(server, tmp_path, "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert re.fullmatch(r"[0-9a-f]{32}\n", quiet.stdout) and quiet.stderr == "", (quiet.stdout, quiet.stderr)
    loud = _train(server, tmp_path, "--quiet", "--verbose")
    assert loud.returncode == 0, loud.stderr
    assert "View run" in loud.stdout  # the switch works: MLflow's own line, printed when a run ends on a server


def test_optimize_against_a_server_says_each_thing_once_in_our_own_lines(server, tmp_path):
    run = _train(server, tmp_path, "--quiet").stdout.strip()
    out = _cli("optimize", run, "--tracking-uri", server, "--storage", str(tmp_path / "optuna.journal"), "--window",
               "4", "--search-samples", "64", "--final-samples", "64", "--final-seeds", "2", "--top-k", "2",
               "--ema-grid", "3", "--batch-size", "64", "--device", "cpu", "--n-trials", "3", "--model-name",
               "quiet-model", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in NOISE:
        assert noise not in out.stdout + out.stderr, (noise, out.stdout[-2000:], out.stderr[-3000:])
    assert len(re.findall(r"registered quiet-model version 1\b", out.stderr)) == 1, out.stderr
