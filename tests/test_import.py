"""`lcsc-ops import`: an existing folder of checkpoints becomes a run that optimize accepts."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.optimize import run_optimize
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.fetch import fetch_window, read_manifest
from lcsc_ops.importers.files import import_checkpoints
from tests.conftest import tiny_optimize_config

UNET = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": 8},
                 sampler={"name": "ddim", "steps": 2})
runner = CliRunner()


class NotAWeight:
    """Anything torch.load(weights_only=True) will not rebuild."""


def vector() -> nn.Module:
    net = nn.Module()
    net.w = nn.Parameter(torch.zeros(2))
    return net


def _walk(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """n state dicts of the tiny U-Net along a random walk."""
    torch.manual_seed(seed)
    state = UNET.build().state_dict()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        state = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
                 for k, v in state.items()}
        out.append(state)
    return out


def _runs(store, experiment: str) -> int:
    exp = mlflow.tracking.MlflowClient(store["uri"]).get_experiment_by_name(experiment)
    return 0 if exp is None else len(mlflow.tracking.MlflowClient(store["uri"]).search_runs([exp.experiment_id]))


def test_pt_state_dicts_with_steps_from_file_names(store, tmp_path):
    for i, sd in enumerate(_walk(3), start=1):
        # as a training script saves them: nested, DDP-prefixed, with non-tensor entries beside the weights
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": i, "note": "x"},
                   tmp_path / f"ckpt-step{10 * i}.pt")
    run_id = import_checkpoints(tmp_path, spec=UNET, step_pattern=r"step(\d+)", run_name="imported",
                                tracking_uri=store["uri"])
    run = mlflow.tracking.MlflowClient(store["uri"]).get_run(run_id)
    assert run.data.tags["lcsc.kind"] == "import" and run.info.status == "FINISHED"
    assert ModelSpec.from_json(run.data.tags["lcsc.spec"]) == UNET
    assert run.data.tags["lcsc.source_folder"] == str(tmp_path.resolve())
    manifest = read_manifest(run_id, store["uri"])
    assert [(e["step"], e["kind"], e["source"]) for e in manifest["entries"]] == [
        (10, "raw", "ckpt-step10.pt"), (20, "raw", "ckpt-step20.pt"), (30, "raw", "ckpt-step30.pt")]
    window = fetch_window(run_id, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (10, 20, 30) and window.training_ema is None
    loaded = window.entries[1].load()
    expected = _walk(3)[1]
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)

    cfg = tiny_optimize_config(run_id, store, evaluator="tests.evaluators:weight_energy", n_trials=2, register=False,
                               window=3)
    report = run_optimize(cfg, log=lambda m: None)
    assert report["trials"] == 2 and {"last", "uniform", "ema_star", "lcsc_top1"} <= set(report["methods"])


def test_safetensors_with_steps_in_metadata_and_an_ema_folder(store, tmp_path):
    raw_dir, ema_dir = tmp_path / "raw", tmp_path / "ema"
    raw_dir.mkdir(), ema_dir.mkdir()
    for i, (raw, ema) in enumerate(zip(_walk(3), _walk(3, seed=1)), start=1):
        save_file(raw, str(raw_dir / f"weights-{chr(96 + i)}.safetensors"), metadata={"step": str(50 * i)})
        save_file(ema, str(ema_dir / f"ema-{i}.safetensors"), metadata={"step": str(50 * i)})
    run_id = import_checkpoints(raw_dir, spec=UNET, ema_folder=ema_dir, tracking_uri=store["uri"])
    window = fetch_window(run_id, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert [e.label for e in window.entries] == ["raw@50", "raw@100", "raw@150", "ema@50", "ema@100", "ema@150"]
    assert window.training_ema.label == "ema@150" and window.spec == UNET
    with safe_open(str(window.entries[0].path), framework="pt") as f:
        meta = f.metadata()
    assert meta["lcsc.step"] == "50" and meta["lcsc.kind"] == "raw" and json.loads(meta["lcsc.spec"])["kwargs"] == {
        "channels": 8} and meta["lcsc.source_file"] == "weights-a.safetensors"

    cfg = tiny_optimize_config(run_id, store, window=3, evaluator="tests.evaluators:weight_energy", n_trials=2,
                               register=False)
    report = run_optimize(cfg, log=lambda m: None)
    assert report["trials"] == 2 and "training_ema" in report["methods"]


def test_bad_folders_are_refused_before_a_run_exists(store, tmp_path):
    (tmp_path / "empty").mkdir()
    sds = _walk(2)
    before = _runs(store, "bad-imports")

    def refuse(folder, match, **kwargs):
        with pytest.raises(LcscError, match=match):
            import_checkpoints(tmp_path / folder, spec=UNET, experiment="bad-imports", tracking_uri=store["uri"],
                               **kwargs)

    refuse("empty", "no checkpoints")
    (tmp_path / "nostep").mkdir()
    save_file(sds[0], str(tmp_path / "nostep" / "a.safetensors"))
    refuse("nostep", "no step for file a.safetensors")
    refuse("nostep", "no step for file a.safetensors.*does not match", step_pattern=r"step(\d+)")
    refuse("nostep", "exactly one group", step_pattern=r"step\d+")
    (tmp_path / "dup").mkdir()
    torch.save(sds[0], tmp_path / "dup" / "step7.pt")
    torch.save({"model": sds[1]}, tmp_path / "dup" / "step007.pth")
    refuse("dup", "duplicate step 7", step_pattern=r"step(\d+)")
    (tmp_path / "keys").mkdir()
    torch.save({**sds[0], "head.weight": torch.zeros(3)}, tmp_path / "keys" / "step1.pt")
    refuse("keys", "'head.weight' is not in the model", step_pattern=r"step(\d+)")
    (tmp_path / "keys" / "step1.pt").unlink()
    torch.save({k: v for k, v in sds[0].items() if k != "out.bias"}, tmp_path / "keys" / "step1.pt")
    refuse("keys", "'out.bias' is missing", step_pattern=r"step(\d+)")
    assert _runs(store, "bad-imports") == before


def _invoke(store, *args):
    return runner.invoke(app, ["import", *args, "--factory", f"{__name__}:vector", "--tracking-uri", store["uri"]])


def test_cli_refuses_full_unpickling_unless_allowed(store, tmp_path):
    torch.save({"w": torch.arange(2.0), "obj": NotAWeight()}, tmp_path / "step5.pt")
    result = _invoke(store, str(tmp_path), "--step-pattern", r"step(\d+)")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("error: refusing to unpickle step5.pt: it needs full unpickling")
    assert "NotAWeight" in lines[0] and "--allow-pickle" in lines[0]

    result = _invoke(store, str(tmp_path), "--step-pattern", r"step(\d+)", "--allow-pickle")
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    window = fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (5,) and torch.equal(window.entries[0].load()["w"], torch.arange(2.0))
