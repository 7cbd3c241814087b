"""Two CPU processes under `accelerate launch --multi_gpu` log exactly one set of checkpoints."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow

from lcsc_ops.store.fetch import read_manifest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_logs_one_set_of_checkpoints(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(REPO / "pipelines" / "train.py"), "--steps", "20", "--checkpoint-every", "10", "--channels", "8",
           "--batch-size", "16", "--sampler-steps", "2", "--experiment", "ddp", "--tracking-uri", uri]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_ids = [line for line in proc.stdout.split() if len(line) == 32]
    assert len(run_ids) == 1, proc.stdout  # only the main process prints a run id

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == run_ids
    assert runs[0].data.params["num_processes"] == "2"
    manifest = read_manifest(run_ids[0], uri)
    assert sorted((e["step"], e["kind"]) for e in manifest["entries"]) == [
        (10, "ema"), (10, "raw"), (20, "ema"), (20, "raw")]
    files = sorted(a.path for a in client.list_artifacts(run_ids[0], "checkpoints"))
    assert files == ["checkpoints/manifest.d", "checkpoints/manifest.json", "checkpoints/step00000010-ema.safetensors",
                     "checkpoints/step00000010-raw.safetensors", "checkpoints/step00000020-ema.safetensors",
                     "checkpoints/step00000020-raw.safetensors"]
