"""Runs of the autolog, transformers and MLflow 3 layouts that hold no window of checkpoints, or cannot say
their steps: one ``error:`` line from ``optimize``, naming the run and how to log a window."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.models.unet import digits_unet
from tests import foreign_runs as foreign

runner = CliRunner()


def _state(step: int) -> dict:
    torch.manual_seed(step)
    return digits_unet(channels=foreign.CHANNELS).state_dict()


def _one_error(store, run_id: str) -> str:
    result = runner.invoke(app, ["optimize", run_id, "--factory", foreign.FACTORY, "--factory-kwargs",
                                 foreign.FACTORY_KWARGS, "--tracking-uri", store["uri"], "--storage", store["storage"]])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert run_id in lines[0]
    return lines[0]


def test_autolog_best_only_is_no_window(store, tmp_path):
    client, _, run_id = foreign._run(store["uri"], "autolog-best-only")
    path = tmp_path / "latest_checkpoint.pth"
    torch.save({"state_dict": foreign._prefixed(_state(0)), "global_step": 8, "epoch": 3}, path)
    (tmp_path / "latest_checkpoint_metrics.json").write_text(json.dumps({"epoch": 3, "global_step": 8}))
    client.log_artifacts(run_id, str(tmp_path), "checkpoints")
    line = _one_error(store, run_id)
    assert "(autolog) holds no window of checkpoints" in line and "checkpoint_save_best_only=False" in line


@pytest.mark.parametrize("writer, how", [
    (foreign.write_transformers_layout, "save_steps"),
    (lambda uri, tmp, steps, state_of: foreign.write_mlflow3_layout(uri, tmp, steps, state_of, "pickle"),
     "log_model(model"),
])
def test_one_logged_checkpoint_is_no_window(store, tmp_path, writer, how):
    run_id, _ = writer(store["uri"], tmp_path, [2], _state)
    line = _one_error(store, run_id)
    assert "holds no window of checkpoints" in line and how in line


def test_logged_models_without_steps_are_one_line(store, tmp_path):
    client, exp_id, run_id = foreign._run(store["uri"], "no-steps")
    for i in range(2):
        folder = tmp_path / str(i)
        (folder / "data").mkdir(parents=True)
        torch.save(_state(i), folder / "data" / "model.pth")
        foreign._logged_model(client, exp_id, run_id, "model", folder, 0)
    line = _one_error(store, run_id)
    assert "carry step(s) 0 more than once" in line and "step=step" in line


def test_a_sharded_transformers_checkpoint_is_one_line(store, tmp_path):
    client, exp_id, run_id = foreign._run(store["uri"], "sharded")
    for step in (2, 4):
        ckpt = tmp_path / str(step) / "artifacts" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
        foreign._logged_model(client, exp_id, run_id, f"checkpoint-{step}", tmp_path / str(step), 0)
    line = _one_error(store, run_id)
    assert "is sharded" in line
