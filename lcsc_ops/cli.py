"""The ``lcsc-ops`` command line: train, optimize, promote, import. Thin: parse, configure, call."""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from lcsc_ops.errors import LcscError

# Progress bars on every artifact download would drown the one-line output a CLI owes its user.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Linear Combination of Saved Checkpoints, on MLflow + Optuna + accelerate.")

TrackingUri = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI (default: MLflow's own, sqlite:///mlflow.db with artifacts in ./mlruns).")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def user_errors(fn: Callable) -> Callable:
    """Turn LcscError (and MLflow/Optuna store errors) into one line on stderr and exit 1.

    Set ``LCSC_OPS_DEBUG=1`` to get the traceback instead.
    """
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LcscError as exc:
            if os.environ.get("LCSC_OPS_DEBUG"):
                raise
            _fail(str(exc))
        except Exception as exc:
            if os.environ.get("LCSC_OPS_DEBUG") or not type(exc).__module__.startswith(("mlflow", "optuna", "sqlalchemy")):
                raise
            _fail(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
    return wrapper


@app.command()
@user_errors
def train(
    dataset: Annotated[str, typer.Option(help="Data set name (registry in lcsc_ops.evaluation.data).")] = "digits",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 4000,
    batch_size: Annotated[int, typer.Option(help="Batch size per process.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    channels: Annotated[int, typer.Option(help="U-Net base width.")] = 32,
    sampler_steps: Annotated[Optional[int], typer.Option(
        help="Sampling steps recorded in the model spec (default: 10 DDIM steps; 1 for consistency models).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Log raw + EMA checkpoints every N steps.",
                                                  rich_help_panel="Checkpoints")] = 50,
    checkpoint_start: Annotated[int, typer.Option(help="First step at which checkpoints are logged.",
                                                  rich_help_panel="Checkpoints")] = 0,
    ema_decay: Annotated[float, typer.Option(help="Training EMA decay.", rich_help_panel="Checkpoints")] = 0.999,
    ema_warmup: Annotated[bool, typer.Option(help="Warm the EMA up like diffusers' EMAModel: decay min(d, (1+n)/(10+n)) "
                                             "at update n.", rich_help_panel="Checkpoints")] = True,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.", rich_help_panel="MLflow")] = "lcsc",
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.", rich_help_panel="MLflow")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        help="Registered model name optimize will use by default (default: digits-ddpm; digits-cm for "
             "consistency models).", rich_help_panel="MLflow")] = None,
    factory: Annotated[str, typer.Option(help="Model factory 'module:callable'.")] = "lcsc_ops.models.unet:digits_unet",
    factory_kwargs: Annotated[Optional[str], typer.Option(help="Extra factory kwargs as JSON.")] = None,
    model_kind: Annotated[str, typer.Option(help="diffusion (DDPM, DDIM sampling) or consistency (iCT, or CD with "
                                                 "--teacher-run).", rich_help_panel="Model kind")] = "diffusion",
    teacher_run: Annotated[Optional[str], typer.Option(help="Distil a consistency model from this diffusion run's "
                                                            "training EMA.", rich_help_panel="Model kind")] = None,
    cm_settings: Annotated[Optional[str], typer.Option(help="Consistency sampler settings as JSON (sigma_max, s0, s1, "
                                                            "p_mean, ...).", rich_help_panel="Model kind")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Train a digits DDPM or consistency model, logging raw + EMA checkpoints to MLflow. Prints the run id (last line).

    Multi-process: ``accelerate launch pipelines/train.py --steps ...`` takes the same options.
    """
    from lcsc_ops.training import TrainConfig, parse_json_object, train as run_training

    cfg = TrainConfig(dataset=dataset, steps=steps, batch_size=batch_size, lr=lr, channels=channels,
                      sampler_steps=sampler_steps, checkpoint_every=checkpoint_every,
                      checkpoint_start=checkpoint_start, ema_decay=ema_decay, ema_warmup=ema_warmup, seed=seed, experiment=experiment,
                      run_name=run_name, model_name=model_name, tracking_uri=tracking_uri, factory=factory,
                      factory_kwargs=parse_json_object(factory_kwargs), model_kind=model_kind,
                      teacher_run=teacher_run, cm_settings=parse_json_object(cm_settings, "cm settings"))
    run_id = run_training(cfg)
    if run_id is not None:
        typer.echo(run_id)


@app.command()
@user_errors
def optimize(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of the training run.")],
    window: Annotated[int, typer.Option(help="Use the last N checkpoint steps.", rich_help_panel="Basis")] = 16,
    end_step: Annotated[Optional[int], typer.Option(help="Window ends at or before this step (default: the last).",
                                                    rich_help_panel="Basis")] = None,
    basis: Annotated[str, typer.Option(help="Merge raw checkpoints, EMA snapshots, or both.",
                                       rich_help_panel="Basis")] = "both",
    strategy: Annotated[str, typer.Option(help="Search strategy: cmaes, cmaes-sep, cmaes-margin, evolution, random.",
                                          rich_help_panel="Search")] = "cmaes",
    n_trials: Annotated[int, typer.Option(help="Total trials in the study (a resumed study runs the rest).",
                                          rich_help_panel="Search")] = 100,
    radius: Annotated[float, typer.Option(help="Half-width of the search box around the strongest baseline.",
                                          rich_help_panel="Search")] = 0.3,
    blocks: Annotated[Optional[int], typer.Option(help="Group coefficients into B blocks per kind.",
                                                  rich_help_panel="Search")] = None,
    seed: Annotated[int, typer.Option(help="Search strategy seed.", rich_help_panel="Search")] = 0,
    prune: Annotated[bool, typer.Option(help="Stop hopeless trials early: score each trial at growing sample counts "
                                             "and prune one worse than the median of complete trials at the same "
                                             "count (off by default, see README).", rich_help_panel="Search")] = False,
    prune_rungs: Annotated[str, typer.Option(help="With --prune: the earlier sample counts, as fractions of "
                                                  "--search-samples.", rich_help_panel="Search")] = "0.25,0.5",
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage: a journal file path or a database "
                                                        "URL (default: optuna.journal beside the MLflow store).", rich_help_panel="Search")] = None,
    search_samples: Annotated[int, typer.Option(help="Samples per search evaluation.",
                                                rich_help_panel="Evaluation")] = 1000,
    search_seeds: Annotated[int, typer.Option(help="Fixed noise seeds averaged per search evaluation.",
                                              rich_help_panel="Evaluation")] = 1,
    final_samples: Annotated[int, typer.Option(help="Samples per final evaluation.",
                                               rich_help_panel="Evaluation")] = 2000,
    final_seeds: Annotated[int, typer.Option(help="Fresh paired seeds for the final evaluation.",
                                             rich_help_panel="Evaluation")] = 5,
    top_k: Annotated[int, typer.Option(help="Best trials re-evaluated (plus their average).",
                                       rich_help_panel="Evaluation")] = 3,
    nfe: Annotated[Optional[int], typer.Option(help="Sample with N function evaluations instead of the spec's.",
                                               rich_help_panel="Evaluation")] = None,
    evaluator: Annotated[Optional[str], typer.Option(help="Own score 'module:callable(model, num_samples, seed)"
                                                          " -> float', lower is better.",
                                                     rich_help_panel="Evaluation")] = None,
    feature_extractor: Annotated[Optional[str], typer.Option(help="FID feature extractor (default by data set).",
                                                             rich_help_panel="Evaluation")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="Local Inception weights for machines "
                                                                   "without network.",
                                                              rich_help_panel="Evaluation")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 …")] = "auto",
    search_precision: Annotated[str, typer.Option(
        help="Search evaluations in fp32, tf32 (TF32 matmuls and convolutions on CUDA) or bf16 (a bf16 merge "
             "stack, half the memory, and bf16 autocast for sampling and features). The final evaluation and the "
             "registered model are always full precision.", rich_help_panel="Evaluation")] = "fp32",
    batch_size: Annotated[int, typer.Option(help="Sampling batch size.")] = 500,
    score_cache: Annotated[bool, typer.Option(
        help="Reuse scores computed before for the same files, coefficients, model, evaluator, samples and seed "
             "(kept in scores.sqlite beside the checkpoint cache): baselines are scored once per run, not per "
             "optimization.", rich_help_panel="Evaluation")] = True,
    max_stack_memory: Annotated[Optional[float], typer.Option(
        help="GiB the stacked window may take on the device; above it, merges stream from the checkpoint files "
             "(about two model copies).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name (default: the training run's).",
                                                      rich_help_panel="MLflow")] = None,
    register: Annotated[bool, typer.Option(help="Register the winning merge.", rich_help_panel="MLflow")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON instead of a table.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the results JSON to this file.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Search merge coefficients for a training run's checkpoints and register the winning merge."""
    from lcsc_ops.job import run_optimize
    from lcsc_ops.optimize import OptimizeConfig
    from lcsc_ops.report import render_table

    if inception_weights is not None and not inception_weights.is_file():
        raise LcscError(f"inception weights not found: {inception_weights}")
    cfg = OptimizeConfig(run_id=run_id, window=window, end_step=end_step, basis=basis, strategy=strategy, n_trials=n_trials,
                         radius=radius, blocks=blocks, search_samples=search_samples, search_seeds=search_seeds,
                         final_samples=final_samples, final_seeds=final_seeds, top_k=top_k, nfe=nfe, seed=seed,
                         model_name=model_name, evaluator=evaluator, feature_extractor=feature_extractor,
                         inception_weights=str(inception_weights) if inception_weights else None, device=device,
                         batch_size=batch_size, max_stack_memory=max_stack_memory, storage=storage,
                         tracking_uri=tracking_uri, register=register, prune=prune,
                         prune_rungs=_fractions(prune_rungs, "--prune-rungs"), search_precision=search_precision,
                         score_cache=score_cache)
    log = (lambda msg: typer.echo(msg, err=True))
    result = run_optimize(cfg, log=log)
    if report is not None:
        report.write_text(json.dumps(result, indent=2))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console

        Console(width=160).print(render_table(result))


@app.command()
@user_errors
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Model version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to move onto the version.")] = "champion",
    tracking_uri: TrackingUri = None,
) -> None:
    """Move an alias (e.g. champion) onto a registered model version."""
    from lcsc_ops.tracking.registry import promote as do_promote

    do_promote(name, version, alias, tracking_uri=tracking_uri)
    typer.echo(f"{name}@{alias} -> version {version} (load with mlflow.pytorch.load_model('models:/{name}@{alias}'))")


def _fractions(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise LcscError(f"{option} must be comma-separated fractions like 0.25,0.5, got {text!r}") from None


def _image_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise LcscError(f"--image-shape must be positive integers like 1,8,8, got {text!r}")
    return shape


@app.command("import")
@user_errors
def import_(
    folder: Annotated[Path, typer.Argument(help="Folder of .safetensors / .pt / .pth checkpoints, or of diffusers "
                                                "UNet2DModel folders (checkpoint-<step>/unet/, or one per step).")],
    factory: Annotated[Optional[str], typer.Option(help="Model factory 'module:callable' that rebuilds the network "
                                                        "(required, except for diffusers folders: their config.json "
                                                        "gives the model).", rich_help_panel="Model spec")] = None,
    factory_kwargs: Annotated[Optional[str], typer.Option(help="Factory kwargs as JSON.",
                                                          rich_help_panel="Model spec")] = None,
    sampler_steps: Annotated[int, typer.Option(help="Sampling steps recorded in the model spec (DDIM, or the "
                                                    "diffusers scheduler's).", rich_help_panel="Model spec")] = 10,
    dataset: Annotated[str, typer.Option(help="Reference data set for FID.", rich_help_panel="Model spec")] = "digits",
    image_shape: Annotated[Optional[str], typer.Option(help="C,H,W of one sample (default 1,8,8; for diffusers "
                                                            "folders: in_channels and sample_size of config.json).",
                                                       rich_help_panel="Model spec")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Diffusers folders: the diffusers scheduler class that "
                                                          "samples (default DDIMScheduler), configured from the "
                                                          "folder's scheduler_config.json if it has one.",
                                                     rich_help_panel="Model spec")] = None,
    step_pattern: Annotated[Optional[str], typer.Option(help="Regex with one group that finds the step in a file "
                                                             "name, e.g. 'step(\\d+)' (when metadata has none), or "
                                                             "in a diffusers model folder's name (default for "
                                                             "checkpoint-<step>/ folders: 'checkpoint-(\\d+)').",
                                                        rich_help_panel="Checkpoints")] = None,
    kind: Annotated[str, typer.Option(help="Kind of the folder's checkpoints: raw or ema.",
                                      rich_help_panel="Checkpoints")] = "raw",
    ema_folder: Annotated[Optional[Path], typer.Option(help="A second folder of EMA checkpoints (or of diffusers "
                                                            "model folders).",
                                                       rich_help_panel="Checkpoints")] = None,
    partial: Annotated[bool, typer.Option(help="Checkpoints hold only part of the model (e.g. LoRA adapters); "
                                               "the factory supplies the rest.",
                                          rich_help_panel="Checkpoints")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Fully unpickle .pt files that need it (runs code from the "
                                                    "file: only for files you trust).",
                                               rich_help_panel="Checkpoints")] = False,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.", rich_help_panel="MLflow")] = "lcsc-import",
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.", rich_help_panel="MLflow")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name optimize will use by default.",
                                                      rich_help_panel="MLflow")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Turn a folder of saved checkpoints into an MLflow run that optimize accepts. Prints the run id (last line)."""
    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.tracking.diffusers_import import find_diffusers_layout, import_diffusers
    from lcsc_ops.tracking.importer import import_checkpoints
    from lcsc_ops.training import parse_json_object

    log = functools.partial(typer.echo, err=True)
    common = dict(step_pattern=step_pattern, kind=kind, ema_folder=ema_folder, allow_pickle=allow_pickle,
                  experiment=experiment, run_name=run_name, model_name=model_name, tracking_uri=tracking_uri, log=log)
    if find_diffusers_layout(folder) is not None:
        given = [flag for flag, value in (("--factory", factory), ("--factory-kwargs", factory_kwargs),
                                          ("--partial", partial)) if value]
        if given:
            raise LcscError(f"{folder} holds diffusers model folders, whose config.json gives the model: "
                            f"drop {', '.join(given)}")
        run_id = import_diffusers(folder, steps=sampler_steps, scheduler=scheduler or "DDIMScheduler",
                                  dataset=dataset, image_shape=_image_shape(image_shape) if image_shape else None,
                                  **common)
    else:
        if factory is None:
            raise LcscError("--factory is required (the 'module:callable' that rebuilds the network), "
                            "except for a folder of diffusers UNet2DModel folders")
        if scheduler is not None:
            raise LcscError("--scheduler applies to diffusers folders only (use --sampler-steps for DDIM)")
        spec = ModelSpec(factory=factory, kwargs=parse_json_object(factory_kwargs),
                         sampler={"name": "ddim", "steps": sampler_steps}, dataset=dataset,
                         image_shape=_image_shape(image_shape or "1,8,8"))
        run_id = import_checkpoints(folder, spec=spec, partial=partial, **common)
    typer.echo(run_id)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
