"""diffusers ``UNet2DModel`` checkpoints: the model rebuilt from its config, sampled with a diffusers scheduler.

``diffusers`` is an optional extra (``pip install 'lcsc-ops[diffusers]'``): this module imports
it only when a model is built or a sampler is made, so the rest of the package imports
without it. A model spec names :func:`unet2d_from_config` as its factory with the whole
``UNet2DModel`` config (defaults filled in) as ``kwargs["config"]``, and the sampler
``"diffusers"`` (:class:`DiffusersSampler`) with the scheduler's class and its whole config,
so a run keeps sampling the same way when diffusers' defaults change.
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Mapping

import torch
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.models.sampling import Guidance, denoiser_output, noise_generator

MODEL_CLASS = "UNet2DModel"
FACTORY = "lcsc_ops.models.diffusers_unet:unet2d_from_config"
DEFAULT_SCHEDULER = "DDIMScheduler"
INSTALL_HINT = "install lcsc-ops[diffusers] (pip install 'lcsc-ops[diffusers]')"


def require_diffusers(what: str) -> Any:
    """The ``diffusers`` module, or a one-line LcscError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise LcscError(f"{what} needs diffusers: {INSTALL_HINT}") from None
    return diffusers


def _init_defaults(cls: type) -> dict[str, Any]:
    """The constructor's named arguments and their defaults (``None`` where there is none)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in params
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _full_config(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    # Only the constructor's arguments: a config.json also holds bookkeeping (``_class_name``,
    # ``_diffusers_version``; EMAModel.save_pretrained adds ``decay``, ``optimization_step``, ...)
    # that differs between checkpoints of one model. JSON round trip: tuples -> lists, as on disk.
    defaults = _init_defaults(cls)
    return json.loads(json.dumps({**defaults, **{k: v for k, v in config.items() if k in defaults}}))


def unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``UNet2DModel`` constructor arguments a ``config.json`` describes, defaults filled in.

    Two checkpoint folders hold the same architecture exactly when these are equal.
    """
    diffusers = require_diffusers(f"a diffusers {MODEL_CLASS} folder")
    return _full_config(diffusers.UNet2DModel, config)


def unet2d_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The model-spec factory: ``UNet2DModel.from_config(config)`` (random weights, like any factory)."""
    diffusers = require_diffusers(f"a {MODEL_CLASS} model spec")
    return diffusers.UNet2DModel.from_config(dict(config))


def _scheduler_class(name: str) -> type:
    diffusers = require_diffusers("the diffusers sampler")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise LcscError(f"{name!r} is not a diffusers scheduler class (e.g. {DEFAULT_SCHEDULER}, "
                        f"DPMSolverMultistepScheduler, EulerDiscreteScheduler)")
    return cls


def resolve_scheduler_config(name: str = DEFAULT_SCHEDULER, config: Mapping[str, Any] | None = None
                             ) -> dict[str, Any]:
    """The whole config of scheduler class ``name``: ``config`` over the class defaults.

    ``config`` is a ``scheduler_config.json`` as diffusers writes it, of any scheduler
    class (a DDPMScheduler's, as training scripts save it, configures a DDIMScheduler: the
    noise schedule is what they share); keys that ``name`` does not take are dropped.
    """
    return _full_config(_scheduler_class(name), config or {})


class DiffusersSampler:
    """Sampling with a diffusers scheduler (DDIM by default), ``model(x, t).sample`` as the prediction.

    Settings (the model spec's ``sampler`` dict): ``steps`` (``set_timesteps``; ``--nfe``
    overrides it), ``scheduler`` (a diffusers scheduler class name) and ``scheduler_config``
    (None: the class defaults). The loop is diffusers' DDIM pipeline's (eta 0); a stochastic
    scheduler draws from :func:`~lcsc_ops.models.sampling.noise_generator`, so samples stay a
    deterministic function of the starting noise.
    """

    def __init__(self, steps: int = 10, scheduler: str = DEFAULT_SCHEDULER,
                 scheduler_config: Mapping[str, Any] | None = None) -> None:
        if int(steps) < 1:
            raise LcscError(f"diffusers sampler steps must be >= 1, got {steps}")
        cls = _scheduler_class(scheduler)
        self.steps, self.name = int(steps), scheduler
        self.config = _full_config(cls, scheduler_config or {})
        self.scheduler = cls.from_config(self.config)
        self._takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        try:
            self.scheduler.set_timesteps(self.steps)
        except ValueError as exc:  # e.g. more steps than the training schedule has
            raise LcscError(f"{scheduler} with {self.steps} steps: {exc}") from None
        self._nfe = len(self.scheduler.timesteps)

    def settings(self) -> dict[str, Any]:
        """The full settings, as written into a model spec."""
        return {"name": "diffusers", "steps": self.steps, "scheduler": self.name, "scheduler_config": self.config}

    @property
    def nfe(self) -> int:
        """Network evaluations per sample (``steps`` for DDIM; more for second-order schedulers)."""
        return self._nfe

    @torch.inference_mode()
    def sample(self, model: nn.Module, noise: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
        """Images in [-1, 1] from standard-normal ``noise`` (the scheduler's x_T before scaling); for a
        class-conditional model (``num_class_embeds``), ``guidance`` passes ``class_labels`` and guides
        the prediction."""
        sched = self.scheduler
        sched.set_timesteps(self.steps, device=noise.device)  # also resets multistep solvers' history
        extra = {"generator": noise_generator(noise)} if self._takes_generator else {}
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            pred = denoiser_output(model, sched.scale_model_input(x, t), t, guidance)
            x = sched.step(pred, t, x, **extra).prev_sample
        return x.clamp(-1, 1)
