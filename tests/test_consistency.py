"""Consistency models: the parameterisation, sampling, iCT / distillation, and the pipeline end to end."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.models.consistency import (ConsistencySampler, DiffusionTeacher, ict_num_levels, karras_sigmas,
                                         lognormal_level_probs)
from lcsc_ops.models.diffusion import cosine_alpha_bar, make_sampler
from lcsc_ops.models.unet import DigitsUNet
from lcsc_ops.spec import ModelSpec
from lcsc_ops.training import TrainConfig
from tests.conftest import TINY_TRAIN, tiny_optimize_config

TINY_CM = {**TINY_TRAIN, "model_kind": "consistency", "model_name": "tiny-cm", "sampler_steps": None}


class CountingNet(nn.Module):
    """Wraps a network and counts its forward calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    return DigitsUNet(channels=8).eval()


def test_boundary_condition_is_exact(net):
    sampler = ConsistencySampler()
    x = torch.randn(5, 1, 8, 8) * 3
    c_skip, c_out, _ = sampler.scalings(torch.tensor(sampler.sigma_min))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    with torch.no_grad():
        assert torch.equal(sampler.denoise(net, x, sampler.sigma_min), x)
        assert torch.equal(sampler.denoise(net, x, torch.full((5,), sampler.sigma_min)), x)
        # away from sigma_min the network does contribute
        assert not torch.allclose(sampler.denoise(net, x, 1.0), x)


@pytest.mark.parametrize("steps", [1, 3])
def test_sampling_is_deterministic_in_range(net, steps):
    sampler = ConsistencySampler(steps=steps)
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = sampler.sample(net, noise), sampler.sample(net, noise.clone())
    assert a.shape == noise.shape and torch.isfinite(a).all()
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    other = sampler.sample(net, torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, other)


def test_multistep_differs_from_one_step_and_sigmas_descend(net):
    noise = torch.randn(8, 1, 8, 8)
    assert not torch.equal(ConsistencySampler(steps=1).sample(net, noise), ConsistencySampler(steps=2).sample(net, noise))
    sigmas = ConsistencySampler(steps=4).sample_sigmas()
    assert sigmas[0] == 80.0 and len(sigmas) == 4
    assert all(a > b > 0.002 for a, b in zip(sigmas, sigmas[1:]))


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_spec_steps_set_the_number_of_network_calls(net, steps):
    spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": 8},
                     sampler=ConsistencySampler().settings())
    sampler = make_sampler(spec.with_sampler(steps=steps).sampler)  # what optimize --nfe does
    counting = CountingNet(net)
    sampler.sample(counting, torch.randn(4, 1, 8, 8))
    assert counting.calls == steps == sampler.nfe


def test_unknown_setting_is_refused():
    with pytest.raises(LcscError, match="consistency"):
        make_sampler({"name": "consistency", "sigma_maxx": 10})
    with pytest.raises(LcscError, match="cm settings"):
        TrainConfig(model_kind="consistency", cm_settings={"bogus": 1}).spec((1, 8, 8))


def test_every_sampler_refuses_unknown_settings_and_takes_those_the_project_writes(net):
    from lcsc_ops.models.diffusion import SAMPLERS
    from lcsc_ops.training import MODEL_KINDS

    known = {"ddim": "steps, timesteps, clip", "consistency": "steps, sigma_min, sigma_max",
             "diffusers": "steps, scheduler, scheduler_config", "dpmpp-2m": "steps, timesteps, spacing, clip"}
    assert set(known) == set(SAMPLERS)  # a new sampler: add it here
    for name, listed in known.items():  # refused before the sampler is made (diffusers need not be installed)
        with pytest.raises(LcscError, match=rf"unknown setting 'schedule' for sampler '{name}' \(known: {listed}"):
            make_sampler({"name": name, "schedule": "linear"})
    with pytest.raises(LcscError, match="unknown setting 'teacher'"):  # a run-time object, never a setting
        make_sampler({"name": "consistency", "teacher": "run-id"})
    # Every sampler spec the project writes (training's kinds, ModelSpec's default, `lcsc-ops import`'s
    # ddim spec), also with --nfe's steps override, and distillation's run-time teacher.
    written = [TrainConfig(model_kind=kind).spec((1, 8, 8)).sampler for kind in MODEL_KINDS]
    written += [ModelSpec(factory="lcsc_ops.models.unet:digits_unet").sampler, {"name": "ddim", "steps": 2}]
    for settings in written:
        assert make_sampler(settings).nfe == settings["steps"]
        assert make_sampler({**settings, "steps": 1}).nfe == 1
    teacher = DiffusionTeacher(net, cosine_alpha_bar(1000))
    assert make_sampler(ConsistencySampler().settings(), teacher=teacher).teacher is teacher


def test_curriculum_and_level_sampling():
    assert ict_num_levels(0, 800) == 11 and ict_num_levels(799, 800) == 1281
    assert [ict_num_levels(k, 800) for k in (99, 100, 200)] == [11, 21, 41]
    assert ict_num_levels(0, 1) == 11  # a one-step run does not divide by zero
    sigmas = karras_sigmas(11, 0.002, 80.0)
    assert sigmas[0].item() == pytest.approx(0.002) and sigmas[-1].item() == pytest.approx(80.0)
    probs = lognormal_level_probs(sigmas)
    assert probs.shape == (10,) and probs.sum().item() == pytest.approx(1.0) and (probs >= 0).all()


@pytest.fixture
def one_thread():
    # 100 steps of a tiny net gain nothing from a second thread, and on a busy 2-core box
    # two threads contending with other processes run ~10x slower (measured: 5 s vs 48 s).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_ct_loss_decreases_on_the_digits(one_thread):
    from lcsc_ops.evaluation.data import load_digits_images

    torch.manual_seed(0)
    images = load_digits_images()
    model, sampler = DigitsUNet(channels=8), ConsistencySampler()
    total = 10_000  # a long nominal run: the discretisation (and so the loss's scale) stays fixed here

    def held_loss() -> float:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(sampler.training_loss(model, images[i:i + 256], gen, step=0, total_steps=total).item()
                       for i in range(0, 1024, 256)) / 4

    before = held_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(100):
        batch = images[torch.randint(0, len(images), (32,), generator=gen)]
        loss = sampler.training_loss(model, batch, gen, step=step, total_steps=total)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.85 * before  # measured over 5 seeds: 0.74-0.77


def test_teacher_ode_step_is_exact_for_a_point_mass():
    # Data = the all-zero image: the true noise estimate is x_sigma / sigma and the
    # probability-flow ODE is x_sigma' = x_sigma * sigma' / sigma. A fake DDPM network that
    # returns the true eps in DDPM coordinates (x_t, fractional t) checks both conversions.
    alpha_bar = cosine_alpha_bar(1000)
    log_sigmas = ((1 - alpha_bar) / alpha_bar).sqrt().log()

    class PointMassEps(nn.Module):
        def forward(self, x_t, t):
            lo = t.floor().long().clamp(0, 998)
            ls = torch.lerp(log_sigmas[lo], log_sigmas[lo + 1], (t - lo).double())
            ab = 1 / (1 + (2 * ls).exp())
            return x_t / (1 - ab).sqrt().float().view(-1, 1, 1, 1)

    teacher = DiffusionTeacher(PointMassEps(), alpha_bar, clip=False)
    sigma = torch.tensor([0.05, 0.7, 5.0, 60.0])
    sigma_next = sigma * 0.8
    assert teacher.timestep(log_sigmas[[10, 500, 900]].exp().float()).tolist() == pytest.approx([10, 500, 900], abs=1e-3)
    x = torch.randn(4, 1, 8, 8) * sigma.view(-1, 1, 1, 1)
    got = teacher.ode_step(x, sigma, sigma_next)
    assert torch.allclose(got, x * (sigma_next / sigma).view(-1, 1, 1, 1), rtol=1e-4, atol=1e-5)


def test_diffusion_defaults_are_unchanged():
    cfg = TrainConfig()
    assert (cfg.sampler_steps, cfg.model_name) == (10, "digits-ddpm")
    assert cfg.spec((1, 8, 8)).sampler == {"name": "ddim", "steps": 10, "timesteps": 1000}
    cm = TrainConfig(model_kind="consistency", cm_settings={"sigma_max": 40.0})
    assert (cm.sampler_steps, cm.model_name) == (1, "digits-cm")
    assert cm.spec((1, 8, 8)).sampler == {**ConsistencySampler(sigma_max=40.0).settings(), "steps": 1}
    with pytest.raises(LcscError, match="model kind"):
        TrainConfig(model_kind="gan")


def test_teacher_requires_a_consistency_model():
    from lcsc_ops.training import train

    with pytest.raises(LcscError, match="consistency models only"):
        train(TrainConfig(teacher_run="0123abcd"))


# -- the pipeline end to end -------------------------------------------------------------
@pytest.fixture(scope="module")
def cm_run(store) -> str:
    from lcsc_ops.training import train

    return train(TrainConfig(tracking_uri=store["uri"], **TINY_CM))


def test_consistency_run_is_optimized_registered_and_loaded(store, cm_run):
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.math.merge import merge_state_dicts
    from lcsc_ops.store.fetch import fetch_window
    from lcsc_ops.checkpoints import sha256_file
    from lcsc_ops.store.registry import promote

    report = run_optimize(tiny_optimize_config(cm_run, store, model_name="tiny-cm"), log=lambda m: None)
    name, version = report["registered_model"]["name"], report["registered_model"]["version"]
    assert name == "tiny-cm"
    promote(name, version, "champion", tracking_uri=store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"models:/{name}@champion")
    assert type(model) is DigitsUNet
    spec = mlflow.models.get_model_info(f"models:/{name}@champion").metadata["lcsc_spec"]
    assert spec["sampler"]["name"] == "consistency" and spec["sampler"]["steps"] == 1
    tags = mlflow.tracking.MlflowClient(store["uri"]).get_model_version(name, version).tags
    assert tags["lcsc.source_run"] == cm_run
    coeffs, files = json.loads(tags["lcsc.coefficients"]), json.loads(tags["lcsc.checkpoints"])
    window = fetch_window(cm_run, window=None, tracking_uri=store["uri"], cache_dir=store["cache"])
    by_file = {e.file: e for e in window.entries}
    assert [sha256_file(by_file[f].path) for f in files] == json.loads(tags["lcsc.checkpoint_sha256"])
    expected = merge_state_dicts([by_file[f].load() for f in files], coeffs)
    got = model.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the loaded model samples in one step with the registered spec
    images = make_sampler(spec["sampler"]).sample(model, torch.randn(4, 1, 8, 8))
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_distillation_trains_from_the_diffusion_run(store, tiny_run):
    from lcsc_ops.training import train

    settings = {**TINY_CM, "steps": 10, "checkpoint_every": 5, "log_every": 5, "model_name": "tiny-cd"}
    run_id = train(TrainConfig(tracking_uri=store["uri"], teacher_run=tiny_run, **settings))
    run = mlflow.tracking.MlflowClient(store["uri"]).get_run(run_id)
    assert run.data.tags["lcsc.teacher_run"] == tiny_run and run.data.tags["lcsc.model_kind"] == "consistency"
    assert torch.isfinite(torch.tensor(run.data.metrics["loss"]))
    from lcsc_ops.store.fetch import fetch_window

    window = fetch_window(run_id, window=2, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (5, 10) and window.spec.sampler["name"] == "consistency"


def test_teacher_must_be_a_diffusion_run(store, cm_run):
    from lcsc_ops.training import train

    with pytest.raises(LcscError, match="not a diffusion"):
        train(TrainConfig(tracking_uri=store["uri"], teacher_run=cm_run, **{**TINY_CM, "steps": 2}))
