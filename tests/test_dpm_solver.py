"""DPM-Solver++ 2M ("dpmpp-2m"): settings, parity with diffusers' DPMSolverMultistepScheduler,
the same probability-flow ODE as DDIM, and a smaller error than DDIM at few steps.

The reference model is exact: for data ~ N(MU, SD^2) (each value independently) the
optimal noise prediction is known in closed form, and so is the probability-flow ODE's
solution from any starting noise. A fixed random convolution can be added to it
(``wiggle``) to make the model non-linear for the parity checks.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.models.diffusion import SAMPLERS, DDIMSampler, cosine_alpha_bar, make_sampler
from lcsc_ops.models.dpm_solver import DPMSolverSampler, spaced_timesteps

T = 1000
AB = cosine_alpha_bar(T)  # float64, the schedule both samplers use
MU, SD = 0.1, 0.3
SHAPE = (16, 1, 8, 8)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is fastest, and far faster on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GaussianEps(nn.Module):
    """The exact epsilon of N(MU, SD^2) data, plus ``wiggle * sqrt(alpha_bar) * tanh(conv(x))``.

    The perturbation is scaled by ``sqrt(alpha_bar)`` so the implied data prediction
    ``(x - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)`` stays bounded at the noisiest timestep.
    Accepts ``t`` as a per-sample (N,) tensor (ours, DDIM's) or a 0-dim one (diffusers').
    """

    def __init__(self, wiggle: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.register_buffer("ab", AB.clone())
        self.conv = nn.Conv2d(1, 1, 3, padding=1).double()
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen, dtype=torch.float64))
            self.conv.bias.copy_(torch.randn(1, generator=gen, dtype=torch.float64))
        self.wiggle = wiggle
        self.calls: list[list[int]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).long()
        self.calls.append(t.flatten().tolist())
        a = self.ab.double()[t]
        a = a.view(-1, *([1] * (x.dim() - 1))) if a.dim() else a
        xd = x.double()
        eps = (1 - a).sqrt() * (xd - a.sqrt() * MU) / (a * SD ** 2 + 1 - a)
        if self.wiggle:
            eps = eps + self.wiggle * a.sqrt() * torch.tanh(self.conv(x.to(self.conv.weight.dtype))).double()
        return eps.to(x.dtype)


def exact_ode_solution(noise: torch.Tensor) -> torch.Tensor:
    """Where the probability-flow ODE from ``noise`` (x at t = T - 1) ends, for the Gaussian data.

    In ``x_sigma = x_t / sqrt(alpha_bar)``, ``sigma^2 = (1 - alpha_bar) / alpha_bar``, the ODE is
    ``dx/dsigma = sigma (x - MU) / (SD^2 + sigma^2)``, so ``x - MU`` scales as ``sqrt(SD^2 + sigma^2)``.
    """
    a = float(AB[-1])
    sigma2 = (1 - a) / a
    return MU + (noise.double() / math.sqrt(a) - MU) * SD / math.sqrt(SD ** 2 + sigma2)


def make_noise(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ddim_timesteps(steps: int) -> list[int]:
    """The timesteps DDIMSampler feeds its model, recorded."""
    model = GaussianEps()
    DDIMSampler(steps=steps, clip=False).sample(model, make_noise()[:1])
    return [call[0] for call in model.calls]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


# -- settings ------------------------------------------------------------------------------

def test_registered_with_every_setting_recorded():
    sampler = make_sampler({"name": "dpmpp-2m"})
    assert SAMPLERS["dpmpp-2m"] is DPMSolverSampler and isinstance(sampler, DPMSolverSampler)
    assert sampler.settings() == {"name": "dpmpp-2m", "steps": 10, "timesteps": 1000, "spacing": "ddim",
                                  "clip": True}
    again = make_sampler({"name": "dpmpp-2m", "steps": 7, "spacing": "linspace", "clip": False})
    assert make_sampler(again.settings()).settings() == again.settings()
    assert again.nfe == 7
    model = GaussianEps()
    again.sample(model, make_noise())
    assert len(model.calls) == 7  # one network evaluation per step


@pytest.mark.parametrize("settings, message", [
    ({"order": 3}, "unknown setting 'order'"),
    ({"lower_order_final": False}, "unknown setting"),
    ({"spacing": "trailing"}, "unknown timestep spacing 'trailing'"),
    ({"steps": 0}, r"steps must be in 1\.\.1000"),
    ({"steps": 20, "timesteps": 10}, r"steps must be in 1\.\.10"),
    ({"steps": "10"}, "steps must be an integer"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"clip": "false"}, "clip must be true or false"),
    ({"steps": 1000, "spacing": "linspace"}, "repeats timesteps"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(LcscError, match=message):
        make_sampler({"name": "dpmpp-2m", **settings})


def test_training_loss_is_ddims():
    model = GaussianEps(wiggle=1.0).float()
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    for timesteps in (1000, 200):
        ours = DPMSolverSampler(steps=5, timesteps=timesteps).training_loss(model, x0, torch.Generator().manual_seed(3))
        ddim = DDIMSampler(steps=5, timesteps=timesteps).training_loss(model, x0, torch.Generator().manual_seed(3))
        assert ours.item() == ddim.item()
    other = DDIMSampler(steps=5, timesteps=1000).training_loss(model, x0, torch.Generator().manual_seed(3))
    assert ours.item() != other.item()  # the timesteps setting reaches the loss
    assert torch.equal(DPMSolverSampler(timesteps=200).alpha_bar, DDIMSampler(timesteps=200).alpha_bar)


# -- timesteps -----------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 5, 9, 10, 15, 1000])
def test_ddim_spacing_evaluates_ddims_timesteps(steps):
    model = GaussianEps()
    DPMSolverSampler(steps=steps, spacing="ddim", clip=False).sample(model, make_noise()[:1])
    assert [call[0] for call in model.calls] == ddim_timesteps(steps)


def test_linspace_spacing_is_diffusers_default():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T)
    assert sched.config.timestep_spacing == "linspace"
    for steps in [*range(1, 101), 250, 333, 999]:
        sched.set_timesteps(steps)
        assert spaced_timesteps("linspace", steps, T) == sched.timesteps.tolist(), steps


# -- parity with diffusers -----------------------------------------------------------------

def test_cosine_schedule_is_diffusers_squaredcos_cap_v2():
    """Our cosine alpha_bar is diffusers' ``beta_schedule="squaredcos_cap_v2"`` (up to its float32)."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    assert torch.allclose(theirs.alphas_cumprod.double(), AB, rtol=3e-5, atol=0)
    linear = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T)  # diffusers' default: "linear"
    assert not torch.allclose(linear.alphas_cumprod.double(), AB, rtol=1e-2, atol=0)


def diffusers_samples(noise: torch.Tensor, model: nn.Module, sampler: DPMSolverSampler, *,
                      float64_schedule: bool, lower_order_final: bool = True) -> torch.Tensor:
    """diffusers' DPM-Solver++ 2M on our cosine alpha_bar (as ``trained_betas``) and timesteps."""
    diffusers = pytest.importorskip("diffusers")
    betas = 1 - AB / torch.cat([AB.new_ones(1), AB[:-1]])
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=betas.tolist(), algorithm_type="dpmsolver++", solver_order=2,
        solver_type="midpoint", prediction_type="epsilon", lower_order_final=lower_order_final,
        final_sigmas_type="zero", thresholding=sampler.clip, sample_max_value=1.0, timestep_spacing="linspace")
    assert torch.allclose(sched.alphas_cumprod.double(), AB, rtol=3e-5, atol=0)  # the same schedule, in float32
    if sampler.spacing == "linspace":
        sched.set_timesteps(sampler.steps)
    else:
        sched.set_timesteps(timesteps=ddim_timesteps(sampler.steps))
    if float64_schedule:  # diffusers keeps its sigmas in float32: give it ours, exactly
        sigmas = ((1 - AB) / AB).sqrt()[sched.timesteps]
        sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    x = noise
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [5, 9, 15])
@pytest.mark.parametrize("spacing", ["linspace", "ddim"])
@pytest.mark.parametrize("clip", [False, True])
def test_matches_diffusers_dpmsolver_plus_plus_2m(steps, spacing, clip):
    model, noise = GaussianEps(wiggle=0.5), make_noise()
    sampler = DPMSolverSampler(steps=steps, spacing=spacing, clip=clip)
    ours = sampler.sample(model, noise)
    for lower_order_final in (True, False):  # the last step (to sigma = 0) is first order either way
        theirs = diffusers_samples(noise, model, sampler, float64_schedule=True, lower_order_final=lower_order_final)
        assert (ours - theirs).abs().max().item() < 1e-5
    ddim = DDIMSampler(steps=steps, clip=clip).sample(model, noise)
    assert (ours - ddim).abs().max().item() > 0.05  # a different solver: the tolerance above discriminates
    if clip:  # thresholding=True with sample_max_value=1.0 is a clamp to [-1, 1]
        assert ours.abs().max().item() <= 1
        assert (sampler.sample(model, noise * 3) - DPMSolverSampler(steps=steps, spacing=spacing, clip=False)
                .sample(model, noise * 3)).abs().max().item() > 0.01


@pytest.mark.parametrize("steps", [5, 9, 15])
@pytest.mark.parametrize("spacing", ["ddim", "linspace"])
def test_matches_stock_float32_diffusers_within_its_rounding(steps, spacing):
    """With diffusers' own float32 sigmas: at t = T - 1, sqrt(alpha_bar) = 4.9e-5 and diffusers'
    float32 sigma_t (1 - 1.2e-9) rounds to 1, an error of ~6e-8 that the data prediction divides
    by 4.9e-5; ours keeps the schedule in float64. So the bound here is float32's, not ours."""
    model, noise = GaussianEps(wiggle=0.5).float(), make_noise(torch.float32)
    sampler = DPMSolverSampler(steps=steps, spacing=spacing)
    ours = sampler.sample(model, noise)
    theirs = diffusers_samples(noise, model, sampler, float64_schedule=False)
    assert (ours - theirs).abs().max().item() < 5e-3
    assert (ours - DDIMSampler(steps=steps).sample(model, noise)).abs().max().item() > 0.05


# -- the ODE it solves ---------------------------------------------------------------------

def test_converges_to_ddim_and_to_the_exact_solution_with_many_steps():
    """Both are solvers of one probability-flow ODE: on the same timesteps they meet as steps grow."""
    model, noise = GaussianEps(wiggle=0.5), make_noise()
    gap = {}
    for steps in (20, 500):
        ours = DPMSolverSampler(steps=steps, spacing="ddim", clip=False).sample(model, noise)
        gap[steps] = rms(ours, DDIMSampler(steps=steps, clip=False).sample(model, noise))
    assert gap[500] < 2e-3 and gap[500] < gap[20] / 20, gap
    exact, gaussian = exact_ode_solution(noise), GaussianEps()
    assert rms(DPMSolverSampler(steps=1000, spacing="ddim", clip=False).sample(gaussian, noise), exact) < 1e-4
    assert rms(DDIMSampler(steps=1000, clip=False).sample(gaussian, noise), exact) < 2e-3


@pytest.mark.parametrize("spacing, steps, ratio", [("ddim", 5, 0.6), ("linspace", 5, 0.85), ("linspace", 9, 0.7),
                                                   ("linspace", 15, 0.5)])
def test_closer_to_the_exact_solution_than_ddim_at_few_steps(spacing, steps, ratio):
    model, noise = GaussianEps(), make_noise()
    exact = exact_ode_solution(noise)
    ours = rms(DPMSolverSampler(steps=steps, spacing=spacing, clip=False).sample(model, noise), exact)
    ddim = rms(DDIMSampler(steps=steps, clip=False).sample(model, noise), exact)
    assert ours < ratio * ddim, (ours, ddim)


def test_ddim_spacing_unclipped_is_less_accurate_than_ddim_at_9_steps():
    """The caveat of the default spacing: on DDIM's timesteps the second-order step into t = 0
    (lambda 5.05) extrapolates far; unclipped, at 9 steps 2M ends further from the ODE's solution
    than DDIM (the "linspace" spacing does not: see the test above)."""
    model, noise = GaussianEps(), make_noise()
    exact = exact_ode_solution(noise)
    ours = rms(DPMSolverSampler(steps=9, spacing="ddim", clip=False).sample(model, noise), exact)
    assert ours > rms(DDIMSampler(steps=9, clip=False).sample(model, noise), exact)
