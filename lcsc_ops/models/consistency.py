"""Consistency models: improved consistency training (iCT), distillation, 1- and multi-step sampling.

A consistency model maps any point ``x_sigma = x_0 + sigma * z`` of a probability-flow ODE
trajectory straight to its origin, ``f(x_sigma, sigma) ~ x_0`` (Song et al. 2023,
"Consistency Models"). It is parameterised, as there (Eq. 7) and in EDM, by

    f(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
    c_out  = sigma_data * (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = 1000 * 0.25 * ln(sigma)

so that ``f(x, sigma_min) = x`` exactly (the boundary condition). ``F`` is any network
called as ``model(x, t)``, like the DDPM denoisers; ``c_noise`` is scaled by 1000 so a
timestep embedding built for DDPM's integer timesteps sees a comparable spread of values.

Training follows iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency
Models"): the target is the same network, gradient stopped, at the neighbouring noise
level; pseudo-Huber distance; lognormal noise levels over a Karras discretisation whose
size ``N(k)`` doubles during training. Consistency distillation (CD) replaces the target's
input by one probability-flow ODE step of a frozen diffusion teacher (:class:`DiffusionTeacher`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.models.sampling import Guidance, denoiser_output, noise_generator


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (N,) tensor of per-sample scalars against an (N, C, H, W) batch."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """``n`` noise levels from ``sigma_min`` up to ``sigma_max``, ascending, float64 (EDM Eq. 5; iCT Eq. 3)."""
    if n < 2:
        raise LcscError(f"a Karras discretisation needs at least 2 levels, got {n}")
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i * (hi - lo)) ** rho


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """The iCT discretisation curriculum (iCT Sec. 3.4): ``N(k) = min(s0 * 2^floor(k / K'), s1) + 1``.

    ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` for ``K = total_steps``, so N doubles from
    ``s0 + 1`` levels to ``s1 + 1`` in equal stages over training.
    """
    stage = max(1, math.floor(total_steps / (math.log2(max(1, s1 // s0)) + 1)))
    return min(s0 * 2 ** (max(0, step) // stage), s1) + 1


def lognormal_level_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """Probability of training on the pair ``(sigma_i, sigma_{i+1})``, i = 0..N-2 (iCT Eq. 10).

    ``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))``:
    the mass a lognormal puts between neighbouring levels.
    """
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    probs = (cdf[1:] - cdf[:-1]).clamp_min(0)
    return probs / probs.sum()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance ``sqrt(||a - b||^2 + c^2) - c`` (iCT Eq. 8)."""
    sq = (a - b).flatten(1).pow(2).sum(1)
    return (sq + c * c).sqrt() - c


class DiffusionTeacher:
    """A frozen epsilon-prediction DDPM as a probability-flow ODE in sigma, for distillation.

    ``alpha_bar`` is the teacher's cumulative schedule (t = 0..T-1, e.g. a
    :class:`~lcsc_ops.models.diffusion.DDIMSampler`'s ``alpha_bar``). The variance-exploding
    state is ``x_sigma = x_t / sqrt(alpha_bar)`` with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``;
    a sigma between the schedule's levels maps to a fractional timestep (linear in ln sigma),
    which the teacher's timestep embedding accepts. The model must already be on the data's
    device; it is put in eval mode and its parameters frozen.
    """

    def __init__(self, model: nn.Module, alpha_bar: torch.Tensor, *, clip: bool = True) -> None:
        self.model = model.eval().requires_grad_(False)
        ab = alpha_bar.double()
        self.log_sigmas = ((1 - ab) / ab).sqrt().log()  # increasing in t
        self.clip = clip

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional DDPM timestep whose noise level is ``sigma`` (clamped to the schedule's range)."""
        table = self.log_sigmas.to(sigma.device)
        ls = sigma.double().log().clamp(table[0], table[-1])
        hi = torch.searchsorted(table, ls).clamp(1, len(table) - 1)
        lo_v, hi_v = table[hi - 1], table[hi]
        return ((hi - 1) + (ls - lo_v) / (hi_v - lo_v)).float()

    @torch.no_grad()
    def eps(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The teacher's noise estimate at ``x_sigma`` (per-sample ``sigma``, shape (N,))."""
        s = _per_sample(sigma, x)
        x_t = x / (1 + s * s).sqrt()  # x_t = sqrt(alpha_bar) x_sigma
        eps = denoiser_output(self.model, x_t, self.timestep(sigma))
        if self.clip:  # as the DDIM sampler does: clip the implied x_0 to the data range
            x0 = (x - s * eps).clamp(-1, 1)
            eps = (x - x0) / s
        return eps

    @torch.no_grad()
    def ode_step(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """One Euler step of ``dx/dsigma = eps(x, sigma)`` from ``sigma`` to ``sigma_next`` (= one DDIM step)."""
        return x + _per_sample(sigma_next - sigma, x) * self.eps(x, sigma)


class ConsistencySampler:
    """Consistency-model sampling (1 step or multistep) and its training objective.

    Settings (all recorded in the model spec's ``sampler`` dict): ``steps`` (1: one network
    evaluation from ``sigma_max``; n > 1: multistep consistency sampling, Song et al. 2023
    Alg. 1, at the ``n`` largest of ``n + 1`` Karras levels (``rho``) from ``sigma_max`` down
    to ``sigma_min``), ``sigma_min``, ``sigma_max``, ``sigma_data``, ``rho``; for training:
    ``s0``, ``s1`` (the curriculum), ``p_mean``, ``p_std`` (the lognormal), ``huber_c`` (None:
    ``0.00054 * sqrt(d)`` for d values per sample, iCT). ``teacher`` (not a setting: a
    :class:`DiffusionTeacher`) turns training into consistency distillation.
    """

    def __init__(self, steps: int = 1, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 rho: float = 7.0, s0: int = 10, s1: int = 1280, p_mean: float = -1.1, p_std: float = 2.0,
                 huber_c: float | None = None, *, teacher: DiffusionTeacher | None = None) -> None:
        if int(steps) < 1:
            raise LcscError(f"consistency sampling steps must be >= 1, got {steps}")
        if not 0 < sigma_min < sigma_max:
            raise LcscError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if sigma_data <= 0 or rho <= 0 or p_std <= 0:
            raise LcscError("sigma_data, rho and p_std must be > 0")
        if not 1 <= int(s0) <= int(s1):
            raise LcscError(f"need 1 <= s0 <= s1, got {s0}, {s1}")
        self.steps, self.sigma_min, self.sigma_max = int(steps), float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho, self.s0, self.s1 = float(sigma_data), float(rho), int(s0), int(s1)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.huber_c = None if huber_c is None else float(huber_c)
        self.teacher = teacher

    def settings(self) -> dict[str, Any]:
        """The full settings, as written into a model spec (so later default changes don't alter old runs)."""
        return {"name": "consistency", "steps": self.steps, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "rho": self.rho, "s0": self.s0, "s1": self.s1,
                "p_mean": self.p_mean, "p_std": self.p_std, "huber_c": self.huber_c}

    @property
    def nfe(self) -> int:
        return self.steps

    # -- the consistency function -------------------------------------------------------
    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in)`` at ``sigma`` (Song et al. 2023, Eq. 7 and App. C; EDM Table 1)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = self.sigma_data * (sigma - self.sigma_min) / (sd2 + sigma ** 2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in

    @staticmethod
    def c_noise(sigma: torch.Tensor) -> torch.Tensor:
        """The network's (float) timestep: EDM's ``0.25 ln sigma``, times 1000 (DDPM's timestep scale)."""
        return 250.0 * sigma.log()

    def denoise(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float,
                guidance: Guidance | None = None) -> torch.Tensor:
        """``f(x, sigma)``: the consistency model's estimate of x_0 (per-sample or scalar ``sigma``).

        With ``guidance``, ``F`` is the guided combination of the conditional and unconditional
        outputs; ``f`` is affine in ``F``, so this is guiding ``f`` itself."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (_per_sample(c, x) for c in self.scalings(sigma))
        return c_skip * x + c_out * denoiser_output(model, c_in * x, self.c_noise(sigma), guidance)

    # -- sampling -----------------------------------------------------------------------
    def sample_sigmas(self) -> list[float]:
        """The ``steps`` noise levels sampling evaluates, descending from ``sigma_max``."""
        if self.steps == 1:
            return [self.sigma_max]
        levels = karras_sigmas(self.steps + 1, self.sigma_min, self.sigma_max, self.rho)
        return levels.flip(0)[:-1].tolist()

    @torch.inference_mode()
    def sample(self, model: nn.Module, noise: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
        """Images in [-1, 1] from standard-normal ``noise``; a deterministic function of ``noise``
        (and of ``guidance``'s labels and scale, for a conditional model).

        ``x = sigma_max * noise; x0 = f(x, sigma_max)``, then for each further level sigma:
        ``x = x0 + sqrt(sigma^2 - sigma_min^2) * z; x0 = f(x, sigma)`` (Song et al. 2023, Alg. 1),
        with ``z`` drawn from a generator seeded by ``noise`` itself.
        """
        sigmas = self.sample_sigmas()
        x0 = self.denoise(model, noise * sigmas[0], sigmas[0], guidance)
        if len(sigmas) > 1:
            gen = noise_generator(noise)
            for sigma in sigmas[1:]:
                z = torch.randn(noise.shape, generator=gen, dtype=torch.float32).to(noise.device, noise.dtype)
                x0 = self.denoise(model, x0 + math.sqrt(sigma ** 2 - self.sigma_min ** 2) * z, sigma, guidance)
        return x0.clamp(-1, 1)

    # -- training -----------------------------------------------------------------------
    def training_loss(self, model: nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None, *,
                      step: int = 0, total_steps: int = 1, guidance: Guidance | None = None) -> torch.Tensor:
        """The iCT loss (or CD loss with a teacher) at training step ``step`` of ``total_steps``.

        Draw a pair of neighbouring levels ``sigma_i < sigma_{i+1}`` of the ``N(step)``-level
        Karras discretisation (lognormal), ``x_{i+1} = x_0 + sigma_{i+1} z``; the target is
        ``stopgrad f(x_i, sigma_i)`` with ``x_i = x_0 + sigma_i z`` (CT) or one teacher ODE step
        from ``x_{i+1}`` (CD). Loss: ``mean(pseudo_huber(f(x_{i+1}, sigma_{i+1}), target) /
        (sigma_{i+1} - sigma_i))`` (iCT Eq. 9 with its weighting lambda). ``guidance`` gives a
        conditional model its labels (both the prediction and the target see them); distillation
        of a conditional model is not supported.
        """
        if guidance is not None and self.teacher is not None:
            raise LcscError("consistency distillation of a class-conditional model is not supported")
        n = x0.shape[0]
        levels = ict_num_levels(step, total_steps, self.s0, self.s1)
        sigmas = karras_sigmas(levels, self.sigma_min, self.sigma_max, self.rho)
        probs = lognormal_level_probs(sigmas, self.p_mean, self.p_std)
        gen_device = generator.device if generator is not None else x0.device
        idx = torch.multinomial(probs.to(gen_device), n, replacement=True, generator=generator).to(x0.device)
        z = torch.randn(x0.shape, device=gen_device, generator=generator).to(x0.device, x0.dtype)
        sigmas = sigmas.to(x0.device)
        s_lo, s_hi = sigmas[idx].to(x0.dtype), sigmas[idx + 1].to(x0.dtype)
        x_hi = x0 + _per_sample(s_hi, x0) * z
        with torch.no_grad():
            if self.teacher is not None:
                x_lo = self.teacher.ode_step(x_hi, s_hi, s_lo)
            else:
                x_lo = x0 + _per_sample(s_lo, x0) * z
            target = self.denoise(model, x_lo, s_lo, guidance)
        pred = self.denoise(model, x_hi, s_hi, guidance)
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())
        return (pseudo_huber(pred, target, c) / (s_hi - s_lo)).mean()
