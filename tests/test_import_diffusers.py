"""`lcsc-ops import` of diffusers UNet2DModel folders, sampled with a diffusers scheduler."""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

diffusers = pytest.importorskip("diffusers")
from diffusers.training_utils import EMAModel  # noqa: E402

from lcsc_ops.cli import app  # noqa: E402
from lcsc_ops.errors import LcscError  # noqa: E402
from lcsc_ops.pipeline.optimize import run_optimize  # noqa: E402
from lcsc_ops.math.merge import merge_state_dicts  # noqa: E402
from lcsc_ops.models.diffusers_unet import FACTORY, DiffusersSampler, unet_config  # noqa: E402
from lcsc_ops.models.diffusion import make_sampler  # noqa: E402
from lcsc_ops.spec import ModelSpec  # noqa: E402
from lcsc_ops.store.fetch import fetch_window
from lcsc_ops.store.fetch import read_manifest  # noqa: E402
from lcsc_ops.importers.diffusers import import_diffusers  # noqa: E402
from tests.conftest import tiny_optimize_config  # noqa: E402

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=8)
STEPS = (100, 200, 300)
runner = CliRunner()


def tiny_unet(seed: int = 0, **overrides) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**{**TINY, **overrides})


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def training_output(tmp_path_factory):
    """An output_dir as train_unconditional.py --use_ema --checkpointing_steps 100 leaves it."""
    out = tmp_path_factory.mktemp("ddpm-out")
    model, gen = tiny_unet(), torch.Generator().manual_seed(1)
    ema = EMAModel(model.parameters(), model_cls=diffusers.UNet2DModel, model_config=model.config)
    for step in STEPS:
        _perturb(model, gen)
        ema.step(model.parameters())
        ckpt = out / f"checkpoint-{step}"
        model.save_pretrained(ckpt / "unet")
        ema.save_pretrained(ckpt / "unet_ema")  # its config.json adds decay, optimization_step, ...
        (ckpt / "optimizer.bin").write_bytes(b"not weights")
    model.save_pretrained(out / "unet")  # the final pipeline save: no step, skipped
    diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(out / "scheduler")
    return out


def _runs(store, experiment: str) -> int:
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name(experiment)
    return 0 if exp is None else len(client.search_runs([exp.experiment_id]))


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_sampler_uses_the_scheduler_steps_and_returns_images_in_range():
    model, calls = tiny_unet(), []
    model.register_forward_hook(lambda mod, args, out: calls.append(int(args[1])))
    spec = ModelSpec(factory=FACTORY, kwargs={"config": unet_config(model.config)},
                     sampler=DiffusersSampler(steps=4).settings())
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps in (4, 2):  # optimize --nfe N replaces the spec's steps
        sampler = make_sampler(spec.with_sampler(steps=steps).sampler)
        calls.clear()
        a, b = sampler.sample(model, noise), sampler.sample(model, noise)
        assert sampler.nfe == steps == len(calls) // 2 and calls[:steps] == sampler.scheduler.timesteps.tolist()
        assert torch.equal(a, b) and a.shape == noise.shape and a.abs().max() <= 1 and not torch.equal(a, noise)
    euler = DiffusersSampler(steps=3, scheduler="EulerDiscreteScheduler")
    assert euler.scheduler.init_noise_sigma > 1 and euler.sample(model, noise).abs().max() <= 1
    with pytest.raises(LcscError, match="not a diffusers scheduler"):
        DiffusersSampler(scheduler="UNet2DModel")


def test_checkpoint_folders_with_ema_import_optimize_and_register(store, training_output):
    run_id = import_diffusers(training_output, steps=4, model_name="tiny-diffusers", tracking_uri=store["uri"])
    run = mlflow.tracking.MlflowClient(store["uri"]).get_run(run_id)
    assert run.data.tags["lcsc.source_format"] == "diffusers" and run.info.status == "FINISHED"
    spec = ModelSpec.from_json(run.data.tags["lcsc.spec"])
    assert spec.factory == FACTORY and spec.image_shape == (1, 8, 8) and spec.dataset == "digits"
    assert spec.kwargs["config"] == unet_config(tiny_unet().config)
    assert spec.sampler["name"] == "diffusers" and spec.sampler["steps"] == 4
    assert spec.sampler["scheduler"] == "DDIMScheduler"
    assert spec.sampler["scheduler_config"]["beta_schedule"] == "squaredcos_cap_v2"  # from scheduler/
    manifest = read_manifest(run_id, store["uri"])
    assert [(e["kind"], e["step"], e["source"]) for e in manifest["entries"]] == [
        (kind, step, f"checkpoint-{step}/{sub}/diffusion_pytorch_model.safetensors")
        for kind, sub in (("raw", "unet"), ("ema", "unet_ema")) for step in STEPS]
    window = fetch_window(run_id, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == STEPS and window.training_ema.label == "ema@300"
    for entry in window.entries:
        sub = "unet" if entry.kind == "raw" else "unet_ema"
        source = load_file(str(training_output / f"checkpoint-{entry.step}" / sub /
                               "diffusion_pytorch_model.safetensors"))
        loaded = entry.load()
        assert loaded.keys() == source.keys() and all(torch.equal(loaded[k], source[k]) for k in source)

    # The built-in FID on the digits, searched at 2 steps (--nfe 2) for a spec that samples at 4.
    cfg = tiny_optimize_config(run_id, store, window=3, n_trials=3, nfe=2, model_name="tiny-diffusers")
    report = run_optimize(cfg, log=lambda m: None)
    assert report["trials"] == 3 and {"last", "uniform", "ema_star", "training_ema", "lcsc_top1"} <= set(
        report["methods"])
    assert report["nfe"] == {"default": 4, "used": 2}
    assert all(0 < v < float("inf") for row in report["methods"].values() for v in row["final"])

    name, version = report["registered_model"]["name"], report["registered_model"]["version"]
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    assert type(model) is diffusers.UNet2DModel
    tags = mlflow.tracking.MlflowClient(store["uri"]).get_model_version(name, version).tags
    by_file = {e.file: e for e in window.entries}
    expected = merge_state_dicts([by_file[f].load() for f in json.loads(tags["lcsc.checkpoints"])],
                                 json.loads(tags["lcsc.coefficients"]))
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_cli_imports_a_folder_of_model_folders(store, tmp_path):
    raw_dir, ema_dir = tmp_path / "raw", tmp_path / "ema"
    model, gen = tiny_unet(), torch.Generator().manual_seed(2)
    for step in (10, 20, 30):
        _perturb(model, gen)
        # older diffusers wrote .bin weights (a plain state dict: loads with weights_only=True)
        model.save_pretrained(raw_dir / f"unet-step{step}", safe_serialization=step != 20)
        tiny_unet(seed=step).save_pretrained(ema_dir / f"ema-step{step}")
    diffusers.DDPMScheduler(num_train_timesteps=500).save_pretrained(raw_dir)  # raw/scheduler_config.json
    args = ["import", str(raw_dir), "--ema-folder", str(ema_dir), "--sampler-steps", "3",
            "--scheduler", "EulerDiscreteScheduler", "--tracking-uri", store["uri"]]
    assert "pass --step-pattern" in _one_line_error(runner.invoke(app, args))
    result = runner.invoke(app, [*args, "--step-pattern", r"step(\d+)"])
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    window = fetch_window(run_id, window=3, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert [e.label for e in window.entries] == ["raw@10", "raw@20", "raw@30", "ema@10", "ema@20", "ema@30"]
    last, ema = window.entries[2].load(), window.entries[-1].load()
    assert all(torch.equal(last[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in tiny_unet(seed=30).state_dict().items())
    sampler = make_sampler(window.spec.sampler)
    assert window.spec.sampler["scheduler"] == "EulerDiscreteScheduler" and sampler.nfe == 3
    assert sampler.scheduler.config.num_train_timesteps == 500  # from the folder's scheduler_config.json
    cfg = tiny_optimize_config(run_id, store, window=3, evaluator="tests.evaluators:weight_energy", n_trials=2,
                               register=False)
    assert run_optimize(cfg, log=lambda m: None)["trials"] == 2


def test_bad_diffusers_folders_are_refused_with_one_line(store, tmp_path, training_output):
    before = _runs(store, "bad-diffusers")
    mixed = tmp_path / "mixed"
    tiny_unet().save_pretrained(mixed / "unet-step1")
    tiny_unet(block_out_channels=(8, 8)).save_pretrained(mixed / "unet-step2")
    line = _one_line_error(runner.invoke(app, ["import", str(mixed), "--step-pattern", r"step(\d+)",
                                               "--experiment", "bad-diffusers", "--tracking-uri", store["uri"]]))
    assert "unet-step2/config.json differs from unet-step1/config.json in 'block_out_channels'" in line
    assert "must share one UNet2DModel config" in line

    def refuse(folder, match, **kwargs):
        with pytest.raises(LcscError, match=match):
            import_diffusers(folder, experiment="bad-diffusers", tracking_uri=store["uri"], **kwargs)

    refuse(mixed / "unet-step1", "is a single UNet2DModel folder")
    refuse(training_output, "--kind applies to a folder of model folders", kind="ema")
    refuse(training_output, "does not match the step pattern", step_pattern=r"step(\d+)")
    other = tmp_path / "other"
    tiny_unet().save_pretrained(other / "m-step1")
    config = json.loads((other / "m-step1" / "config.json").read_text())
    (other / "m-step1" / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    refuse(other, "holds a UNet2DConditionModel; only UNet2DModel", step_pattern=r"step(\d+)")
    line = _one_line_error(runner.invoke(app, ["import", str(training_output), "--factory", "x:y",
                                               "--tracking-uri", store["uri"]]))
    assert "config.json gives the model: drop --factory" in line
    assert _runs(store, "bad-diffusers") == before


def test_without_diffusers_a_diffusers_folder_says_how_to_install(store, training_output, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    line = _one_line_error(runner.invoke(app, ["import", str(training_output), "--tracking-uri", store["uri"]]))
    assert "install lcsc-ops[diffusers]" in line
    # and nothing else in the package imports diffusers on its own
    code = ("import sys, lcsc_ops, lcsc_ops.cli, lcsc_ops.pipeline.optimize, lcsc_ops.models.diffusion, "
            "lcsc_ops.importers.diffusers; assert 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
