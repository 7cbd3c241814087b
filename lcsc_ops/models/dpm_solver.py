"""DPM-Solver++ 2M: a second-order multistep sampler for epsilon-prediction DDPMs.

The probability-flow ODE of a variance-preserving diffusion, written in the data
prediction ``D(x_t, t) = (x_t - sigma_t * eps(x_t, t)) / alpha_t`` and the half log-SNR
``lambda_t = log(alpha_t / sigma_t)`` (``alpha_t = sqrt(alpha_bar_t)``,
``sigma_t = sqrt(1 - alpha_bar_t)``), has the exact solution
``x_t = (sigma_t / sigma_s) x_s + sigma_t * int_{lambda_s}^{lambda_t} e^lambda D dlambda``.
DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Alg. 2) integrates it with ``D`` linear in
``lambda`` through the current and the previous evaluation:

    h = lambda_{i+1} - lambda_i,  r = (lambda_i - lambda_{i-1}) / h
    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (D_i + (D_i - D_{i-1}) / (2 r))

The first step has no previous evaluation and is first order (= one DDIM step). The last
step goes from the last evaluated timestep to ``sigma = 0``, where ``h`` is infinite: it is
first order too and returns ``D`` there, as diffusers' ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``final_sigmas_type="zero"``) does,
and as :class:`~lcsc_ops.models.diffusion.DDIMSampler` returns its last ``x_0`` estimate.
One network evaluation per step: ``nfe == steps``.

The schedule is the cosine ``alpha_bar`` of the DDIM sampler
(:func:`~lcsc_ops.models.diffusion.cosine_alpha_bar`), and training is DDIM's epsilon loss,
so a spec can switch between ``"ddim"`` and ``"dpmpp-2m"`` without retraining.
``tests/test_dpm_solver.py`` checks the samples against diffusers' scheduler.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.models.sampling import Guidance, denoiser_output

# "ddim" (the default): DDIMSampler's timesteps for the same steps, round(linspace(T - 1, 0,
# steps)), down to t = 0, so ddim and dpmpp-2m at equal --nfe evaluate the same timesteps.
# "linspace": diffusers' default timestep_spacing, round(linspace(0, T - 1, steps + 1))[::-1][:-1],
# from T - 1 down to about (T - 1) / steps. On DDIM's timesteps the second-order step into t = 0
# (lambda = 5.05 on the 1000-step cosine schedule) extrapolates D far in lambda: where clipping
# does not catch the overshoot (the unclipped Gaussian test in tests/test_dpm_solver.py) 2M is
# then less accurate than DDIM from 7 steps on, while "linspace" is more accurate at every count.
SPACINGS = ("ddim", "linspace")


def spaced_timesteps(spacing: str, steps: int, timesteps: int) -> list[int]:
    """The ``steps`` timesteps a sampler evaluates, descending, for a ``timesteps``-step DDPM."""
    if spacing == "ddim":  # exactly DDIMSampler.sample's expression
        return torch.linspace(timesteps - 1, 0, steps).round().long().tolist()
    if spacing == "linspace":  # numpy's linspace (i * step, last = stop), rounded half to even, as diffusers
        grid = [i * ((timesteps - 1) / steps) for i in range(steps)] + [timesteps - 1]
        return [int(round(v)) for v in grid[::-1][:-1]]
    raise LcscError(f"unknown timestep spacing {spacing!r} (known: {', '.join(SPACINGS)})")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LcscError(f"dpmpp-2m sampler: {message}")


class DPMSolverSampler:
    """Deterministic DPM-Solver++ 2M over ``steps`` timesteps of a ``timesteps``-step cosine DDPM.

    Settings (the model spec's ``sampler`` dict): ``steps`` (network evaluations;
    ``optimize --nfe`` overrides it), ``timesteps`` (the training schedule's length, as for
    DDIM), ``spacing`` (``"ddim"``: the timesteps DDIM evaluates for the same ``steps``;
    ``"linspace"``: diffusers' default spacing; see :data:`SPACINGS`) and ``clip`` (clamp every
    data prediction to [-1, 1], as DDIM's ``clip`` does; equal to diffusers'
    ``thresholding=True`` with ``sample_max_value=1.0``). With ``clip=False`` nothing is
    clamped, as in DDIM. Settings are checked here: a bad one is a one-line LcscError.
    """

    def __init__(self, steps: int = 10, timesteps: int = 1000, spacing: str = "ddim", clip: bool = True) -> None:
        from lcsc_ops.models.diffusion import DDIMSampler, cosine_alpha_bar  # deferred: diffusion registers us

        _require(isinstance(steps, int) and not isinstance(steps, bool), f"steps must be an integer, got {steps!r}")
        _require(isinstance(timesteps, int) and not isinstance(timesteps, bool),
                 f"timesteps must be an integer, got {timesteps!r}")
        _require(isinstance(clip, bool), f"clip must be true or false, got {clip!r}")
        _require(1 <= steps <= timesteps, f"steps must be in 1..{timesteps}, got {steps}")
        self.steps, self.timesteps, self.spacing, self.clip = steps, timesteps, spacing, clip
        self.ts = spaced_timesteps(self.spacing, self.steps, self.timesteps)
        _require(all(a > b for a, b in zip(self.ts, self.ts[1:])),
                 f"spacing {spacing!r} with {steps} of {timesteps} steps repeats timesteps; use fewer steps")
        self._ddim = DDIMSampler(steps=self.steps, timesteps=self.timesteps, clip=self.clip)
        self.alpha_bar = self._ddim.alpha_bar  # float32, as DDIM's (a distillation teacher reads it)
        self._ab64 = cosine_alpha_bar(self.timesteps)  # the solver's coefficients in float64

    def settings(self) -> dict[str, Any]:
        """The full settings, as written into a model spec (so later default changes don't alter old runs)."""
        return {"name": "dpmpp-2m", "steps": self.steps, "timesteps": self.timesteps, "spacing": self.spacing,
                "clip": self.clip}

    @property
    def nfe(self) -> int:
        return self.steps

    def training_loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None, *,
                      step: int = 0, total_steps: int = 1, guidance: Guidance | None = None) -> torch.Tensor:
        """DDIM's epsilon-prediction loss (:meth:`DDIMSampler.training_loss`), on the same schedule."""
        return self._ddim.training_loss(model, x0, generator, step=step, total_steps=total_steps, guidance=guidance)

    def _schedule(self) -> tuple[list[float], list[float], list[float]]:
        """``alpha``, ``sigma`` and ``lambda`` at each evaluated timestep (float64, as Python floats)."""
        ab = [float(self._ab64[t]) for t in self.ts]
        alpha, sigma = [math.sqrt(a) for a in ab], [math.sqrt(1 - a) for a in ab]
        return alpha, sigma, [math.log(a / s) for a, s in zip(alpha, sigma)]

    def _data_prediction(self, model: nn.Module, x: torch.Tensor, t: int, alpha: float, sigma: float,
                         guidance: Guidance | None) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        d = (x - sigma * denoiser_output(model, x, tt, guidance)) / alpha
        return d.clamp(-1, 1) if self.clip else d

    @torch.inference_mode()
    def sample(self, model: nn.Module, noise: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
        """Run DPM-Solver++ 2M from ``noise`` (x at timestep T - 1) to the data prediction at sigma = 0,
        the noise estimate guided by ``guidance`` for a conditional model (as DDIM's)."""
        alpha, sigma, lam = self._schedule()
        x, d_prev = noise, None
        for i, t in enumerate(self.ts):
            d = self._data_prediction(model, x, t, alpha[i], sigma[i], guidance)
            if i + 1 == len(self.ts):
                break  # the first-order step to sigma = 0 lands on d
            h = lam[i + 1] - lam[i]
            slope = d if d_prev is None else d + (d - d_prev) * (h / (2 * (lam[i] - lam[i - 1])))
            x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * slope
            d_prev = d
        return d
