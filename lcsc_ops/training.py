"""The digits training pipeline (DDPM or consistency model) under ``accelerate``, logging checkpoints to MLflow.

Runs the same in one process (``lcsc-ops train``) and in many
(``accelerate launch pipelines/train.py``). Every process trains; only the main process
talks to MLflow: it opens the run, records the config and the model spec, logs the loss
and, through :class:`~lcsc_ops.checkpoints.CheckpointLogger`, the raw and EMA
checkpoints every ``checkpoint_every`` steps. The model kind only changes the sampler
recorded in the spec (whose ``training_loss`` the loop calls): DDIM for diffusion, the
consistency sampler (iCT, or distillation from a finished diffusion run) for CMs.
``--conditional`` trains on the data set's class labels, each dropped to the null label with
probability ``label_dropout``, so one network learns the conditional and the unconditional
prediction that classifier-free guidance combines (Ho & Salimans 2022).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.interrupts import deferred, interrupted
from lcsc_ops.options import option, parse_json_object
from lcsc_ops.pipeline.progress import PlainProgress, SilentProgress, stderr_writer
from lcsc_ops.spec import Conditioning, ModelSpec

CKPT, MLFLOW, KIND, COND = "Checkpoints", "MLflow", "Model kind", "Conditioning"
DEFAULT_LABEL_DROPOUT, DEFAULT_GUIDANCE = 0.1, 2.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; logged whole as the run's params and ``lcsc/train_config.json``."""

    dataset: str = option("digits", "Data set name (registry in lcsc_ops.evaluation.data).")
    steps: int = option(4000, "Optimizer steps.")
    batch_size: int = option(128, "Batch size per process.")
    lr: float = option(2e-3, "Adam learning rate.")
    warmup_steps: int = option(100, "Linear learning-rate warm-up steps.")
    channels: int = option(32, "U-Net base width.")
    sampler_steps: int | None = option(None, "Sampling steps recorded in the model spec (default: 10 DDIM steps; "
                                             "1 for consistency models).")
    checkpoint_every: int = option(50, "Log raw + EMA checkpoints every N steps.", panel=CKPT)
    checkpoint_start: int = option(0, "First step at which checkpoints are logged.", panel=CKPT)
    ema_decay: float = option(0.999, "Training EMA decay.", panel=CKPT)
    ema_warmup: bool = option(True, "Warm the EMA up like diffusers' EMAModel: decay min(d, (1+n)/(10+n)) at "
                                    "update n.", panel=CKPT)
    log_every: int = option(50, "Log the loss every N steps.")
    seed: int = option(0, "Random seed.")
    experiment: str = option("lcsc", "MLflow experiment.", panel=MLFLOW)
    run_name: str | None = option(None, "MLflow run name.", panel=MLFLOW)
    model_name: str | None = option(None, "Registered model name optimize will use by default (default: "
                                          "digits-ddpm; digits-cm for consistency models).", panel=MLFLOW)
    quiet: bool = option(False, "No progress bar or lines on stderr: only the run id (stdout) and errors. "
                                "Not part of the run's params.")
    tracking_uri: str | None = option(None, cli=False)
    cpu: bool | None = option(None, cli=False)  # None: CPU when no GPU is visible
    factory: str = option("lcsc_ops.models.unet:digits_unet", "Model factory 'module:callable'.")
    factory_kwargs: dict[str, Any] = option(help="Extra factory kwargs as JSON.", default_factory=dict,
                                            parse=parse_json_object)
    model_kind: str = option("diffusion", "diffusion (DDPM, DDIM sampling) or consistency (iCT, or CD with "
                                          "--teacher-run).", panel=KIND)
    teacher_run: str | None = option(None, "Distil a consistency model from this diffusion run's training EMA.",
                                     panel=KIND)
    cm_settings: dict[str, Any] = option(help="Consistency sampler settings as JSON (sigma_max, s0, s1, p_mean, ...).",
                                         default_factory=dict, panel=KIND,
                                         parse=lambda t: parse_json_object(t, "cm settings"))
    conditional: bool = option(False, "Train a class-conditional model on the data set's labels (the factory gets "
                                      "num_classes=K and is called as model(x_t, t, y)), with label dropout for "
                                      "classifier-free guidance.", panel=COND)
    label_dropout: float | None = option(None, f"With --conditional: share of labels dropped to the null label "
                                               f"(default {DEFAULT_LABEL_DROPOUT}).", panel=COND)
    guidance: float | None = option(None, f"With --conditional: guidance scale recorded in the model spec (default "
                                          f"{DEFAULT_GUIDANCE}; 0: unconditional, 1: conditional).", panel=COND)

    def __post_init__(self) -> None:
        # Resolve the per-kind defaults here, so the logged config holds the values used.
        if self.model_kind not in MODEL_KINDS:
            raise LcscError(f"unknown model kind {self.model_kind!r} (known: {', '.join(sorted(MODEL_KINDS))})")
        kind = MODEL_KINDS[self.model_kind]
        if self.sampler_steps is None:
            object.__setattr__(self, "sampler_steps", kind["sampler_steps"])
        if self.model_name is None:
            object.__setattr__(self, "model_name", kind["model_name"])
        if self.conditional:
            for name, default in (("label_dropout", DEFAULT_LABEL_DROPOUT), ("guidance", DEFAULT_GUIDANCE)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)

    def spec(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> ModelSpec:
        """The model spec; a conditional model's (``num_classes`` K) takes labels 0..K, K the null label."""
        kwargs = {"in_channels": image_shape[0], "channels": self.channels, **self.factory_kwargs}
        conditioning = None
        if self.conditional:
            kwargs = {**kwargs, "num_classes": num_classes}
            conditioning = Conditioning(num_classes=num_classes, null_label=num_classes, guidance=self.guidance)
        return ModelSpec(factory=self.factory, kwargs=kwargs, sampler=MODEL_KINDS[self.model_kind]["sampler"](self),
                         dataset=self.dataset, image_shape=image_shape, conditioning=conditioning)


def _ddim_settings(cfg: TrainConfig) -> dict[str, Any]:
    return {"name": "ddim", "steps": cfg.sampler_steps, "timesteps": 1000}


def _consistency_settings(cfg: TrainConfig) -> dict[str, Any]:
    from lcsc_ops.models.consistency import ConsistencySampler

    if "teacher" in cfg.cm_settings:
        raise LcscError("cm settings: give the distillation teacher as teacher-run")
    settings = {k: v for k, v in cfg.cm_settings.items() if k != "name"}
    try:  # every setting, defaults included, goes into the spec: old runs keep their recipe
        return ConsistencySampler(**{**settings, "steps": cfg.sampler_steps}).settings()
    except TypeError as exc:
        raise LcscError(f"cm settings: {exc}") from None


# What each model kind records in the spec, and its defaults. The training objective is the
# sampler's ``training_loss``, so the loop itself does not depend on the kind.
MODEL_KINDS: dict[str, dict[str, Any]] = {
    "diffusion": {"sampler": _ddim_settings, "sampler_steps": 10, "model_name": "digits-ddpm"},
    "consistency": {"sampler": _consistency_settings, "sampler_steps": 1, "model_name": "digits-cm"},
}


def _validate(cfg: TrainConfig) -> None:
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "sampler_steps", "channels"):
        if getattr(cfg, name) < 1:
            raise LcscError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise LcscError(f"lr must be > 0, got {cfg.lr}")
    if cfg.model_kind != "consistency" and (cfg.teacher_run or cfg.cm_settings):
        raise LcscError("teacher-run and cm-settings apply to consistency models only (--model-kind consistency)")
    if not cfg.conditional and (cfg.label_dropout is not None or cfg.guidance is not None):
        raise LcscError("label-dropout and guidance apply to conditional models (--conditional)")
    if cfg.conditional:
        if cfg.teacher_run:
            raise LcscError("--conditional with --teacher-run: distilling a conditional model is not supported")
        if not 0 <= cfg.label_dropout < 1:
            raise LcscError(f"label-dropout must be in [0, 1), got {cfg.label_dropout}")


def train(cfg: TrainConfig, progress: Any = None) -> str | None:
    """Train, logging to MLflow from the main process; returns the run id there (None elsewhere).

    The main process shows ``progress`` (a :class:`~lcsc_ops.pipeline.progress.Progress`; default:
    plain lines on stderr, none with ``cfg.quiet``): step/N, loss, steps/s, checkpoints logged."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from lcsc_ops.evaluation.data import load_dataset, load_labels
    from lcsc_ops.models.diffusion import make_sampler

    _validate(cfg)
    cpu = (not torch.cuda.is_available()) if cfg.cpu is None else cfg.cpu
    accelerator = Accelerator(cpu=cpu)
    set_seed(cfg.seed)
    images = load_dataset(cfg.dataset)
    labels = load_labels(cfg.dataset, "--conditional") if cfg.conditional else None
    spec = cfg.spec(tuple(images.shape[1:]), None if labels is None else int(labels.max()) + 1)
    model = spec.build()
    teacher = _load_teacher(cfg, spec, accelerator) if cfg.teacher_run else None
    sampler = make_sampler(spec.sampler, **({"teacher": teacher} if teacher is not None else {}))
    tensors = (images,) if labels is None else (images, labels)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    run, logger = None, None
    if accelerator.is_main_process:
        run, logger = _open_run(cfg, spec, accelerator)
    progress = _progress(cfg, progress) if accelerator.is_main_process else SilentProgress()
    status, at = "FAILED", [0]
    try:
        _loop(cfg, accelerator, model, optimizer, scheduler, loader, sampler, logger, run, progress, spec.conditioning,
              at)
        status = "FINISHED"
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM (lcsc_ops.interrupts): the run ends KILLED, partial
        status = "KILLED"
        raise interrupted(exc, _stopped(cfg, at[0], _end(logger, run, status), run)) from None
    finally:
        if status != "KILLED":
            _end(logger, run, status)
    accelerator.wait_for_everyone()
    return run.run_id if run is not None else None


def _end(logger: Any, run: Any, status: str) -> int:
    """Wait for the uploads, end the run with ``status``; returns how many checkpoints it holds."""
    if logger is not None:
        logger.close(complete=status == "FINISHED")  # a run that failed or was stopped stays partial
    if run is not None:
        run.end(status)
    return len(logger.entries) if logger is not None else 0


def _stopped(cfg: TrainConfig, step: int, logged: int, run: Any) -> str:
    if run is None:
        return f"at step {step} of {cfg.steps}"
    return (f"at step {step} of {cfg.steps}: run {run.run_id} KILLED with {logged} checkpoints (a partial run "
            "optimize can use); the same command trains again, in a new run")


def _progress(cfg: TrainConfig, progress: Any) -> Any:
    if cfg.quiet:
        return SilentProgress()
    return progress if progress is not None else PlainProgress(stderr_writer())


def _load_teacher(cfg: TrainConfig, spec: ModelSpec, accelerator: Any):
    """The distillation teacher: the training EMA of the finished diffusion run ``cfg.teacher_run``.

    The teacher run's spec is untrusted input: its factory must be trusted (built in,
    ``LCSC_OPS_TRUST_FACTORY``, or the module of the user's own ``--factory``), checked
    before anything is downloaded."""
    from lcsc_ops.models.consistency import DiffusionTeacher
    from lcsc_ops.models.diffusion import make_sampler
    from lcsc_ops.spec import Trust, split_import_path
    from lcsc_ops.store.fetch import fetch_window

    trust = Trust(factory=(split_import_path(spec.factory)[0],), options=False)
    with accelerator.main_process_first():  # one download into the shared cache, then cache hits
        window = fetch_window(cfg.teacher_run, window=1, tracking_uri=cfg.tracking_uri, trust=trust)
    tspec = window.spec
    if window.training_ema is None:
        raise LcscError(f"teacher run {cfg.teacher_run} has no EMA checkpoint")
    if tspec.sampler.get("name") != "ddim":
        raise LcscError(f"teacher run {cfg.teacher_run} is not a diffusion (ddim) run: "
                        f"sampler {tspec.sampler.get('name')!r}")
    if (tspec.dataset, tspec.image_shape) != (spec.dataset, spec.image_shape):
        raise LcscError(f"teacher run {cfg.teacher_run} was trained on {tspec.dataset} {tspec.image_shape}, "
                        f"not {spec.dataset} {spec.image_shape}")
    net = tspec.build()
    net.load_state_dict(window.training_ema.load())
    return DiffusionTeacher(net.to(accelerator.device), make_sampler(tspec.sampler).alpha_bar)


def _open_run(cfg: TrainConfig, spec: ModelSpec, accelerator: Any):
    from lcsc_ops.store.logger import CheckpointLogger
    from lcsc_ops.store.training_run import TrainingRun

    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("tracking_uri", "quiet")}
    tags = {"lcsc.kind": "training", "lcsc.model_name": cfg.model_name, "lcsc.model_kind": cfg.model_kind,
            **({"lcsc.teacher_run": cfg.teacher_run} if cfg.teacher_run else {})}
    run = TrainingRun.start(experiment=cfg.experiment, run_name=cfg.run_name,
                            config={**config, "num_processes": accelerator.num_processes}, tags=tags,
                            tracking_uri=cfg.tracking_uri)
    logger = CheckpointLogger(spec, every=cfg.checkpoint_every, ema_decay=cfg.ema_decay, ema_warmup=cfg.ema_warmup,
                              accelerator=accelerator, run_id=run.run_id, start_step=cfg.checkpoint_start,
                              tracking_uri=cfg.tracking_uri)
    return run, logger


def _dropped_labels(labels: torch.Tensor, conditioning: Conditioning, dropout: float) -> Any:
    """The batch's labels, each replaced by the null label with probability ``dropout``: the one
    network learns the conditional and the unconditional prediction (the CFG recipe)."""
    from lcsc_ops.models.sampling import Guidance

    drop = torch.rand(labels.shape, device=labels.device) < dropout
    return Guidance(torch.where(drop, torch.full_like(labels, conditioning.null_label), labels),
                    keyword=conditioning.label_keyword)


def _loop(cfg, accelerator, model, optimizer, scheduler, loader, sampler, logger, run, progress,
          conditioning=None, at=None) -> None:
    """The training loop; ``at[0]`` follows the step (what an interrupted run says it reached)."""
    at = at if at is not None else [0]
    step, t0, loss_sum, loss_n = 0, time.perf_counter(), torch.zeros((), device=accelerator.device), 0
    progress.stage("train", cfg.steps, unit="steps", every=10 * cfg.log_every)
    model.train()
    while step < cfg.steps:
        for batch in loader:
            x0, extra = batch[0], {}
            if conditioning is not None:
                extra["guidance"] = _dropped_labels(batch[1], conditioning, cfg.label_dropout)
            loss = sampler.training_loss(model, x0, step=step, total_steps=cfg.steps, **extra)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            at[0] = step
            loss_sum += loss.detach()
            loss_n += 1
            if logger is not None:
                logger.step(model, step)
            status = None
            if step % cfg.log_every == 0 or step == cfg.steps:
                # A collective: every process takes part, the main one logs the mean.
                mean_loss = accelerator.reduce(loss_sum / loss_n, reduction="mean").item()
                loss_sum.zero_()
                loss_n = 0
                if run is not None:
                    rate = step / (time.perf_counter() - t0)
                    # Not cut by a signal mid-transaction: the store's write lock would stay held while the
                    # run ends, and the clean-up's own writes wait on it ("database is locked" with SQLite).
                    with deferred():
                        run.log_metrics({"loss": mean_loss, "steps_per_second": rate}, step=step)
                    logged = len(logger.entries) if logger is not None else 0
                    status = f"loss {mean_loss:.4f}, {logged} checkpoints logged"
            progress.advance(status=status)
            if step >= cfg.steps:
                break
