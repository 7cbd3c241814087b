"""The ``lcsc-ops`` command line: train, optimize, report, promote, import, runs, checkpoints.
Thin: parse, configure, call. Progress goes to stderr (bars on a terminal, plain lines otherwise,
nothing with ``--quiet``); results go to stdout."""
from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import click
import typer

from lcsc_ops import interrupts
from lcsc_ops.errors import LcscError
from lcsc_ops.options import parse_image_shape, parse_json_object
from lcsc_ops.quiet import configure as configure_libraries
from lcsc_ops.pipeline.config import OptimizeConfig
from lcsc_ops.pipeline.report import ReportConfig
from lcsc_ops.training import TrainConfig

# Progress bars on every artifact download would drown the one-line output a CLI owes its user.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class Commands(typer.core.TyperGroup):
    """The one place an LcscError becomes a one-line message (``LCSC_OPS_DEBUG=1``: the traceback),
    and SIGINT/SIGTERM one line saying what was ended, with exit status 130/143. MLflow's and
    Optuna's own lines stay out unless ``--verbose`` (:mod:`lcsc_ops.quiet`)."""

    def invoke(self, ctx: click.Context) -> Any:
        configure_libraries()  # before any command imports mlflow or optuna; --verbose: _verbose()
        with interrupts.handled():
            try:
                return super().invoke(ctx)
            except LcscError as exc:
                if os.environ.get("LCSC_OPS_DEBUG"):
                    raise
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt as exc:
                if os.environ.get("LCSC_OPS_DEBUG"):
                    raise
                done = getattr(exc, "done", "") or "and stopped; run the same command again"
                typer.echo(f"interrupted ({getattr(exc, 'name', 'SIGINT')}) {done}", err=True)
                gc.freeze()  # everything is ended: no final collection at exit (seconds, with mlflow and torch loaded)
                raise typer.Exit(getattr(exc, "exit_code", 130)) from None


app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Linear Combination of Saved Checkpoints, on MLflow + Optuna + accelerate.")

TrackingUri = Annotated[Optional[str], typer.Option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking URI (default: MLflow's own, sqlite:///mlflow.db with artifacts in ./mlruns).")]


def options_of(cls: type, **overrides: Any) -> list[inspect.Parameter]:
    """Typer parameters for the fields of config dataclass ``cls``: default, type, help and panel
    come from the field (:func:`lcsc_ops.options.option`); a field with a parser takes text."""
    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        md = f.metadata
        if not md.get("cli", True) or f.name in overrides:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = hints[f.name]
        if md.get("parse"):
            kind, default = Optional[str], None if default in (None, {}) else _as_text(default)
        flags = [md["flag"]] if md.get("flag") else []
        info = typer.Argument(help=md["help"]) if default is None and f.default is dataclasses.MISSING and \
            f.default_factory is dataclasses.MISSING else typer.Option(*flags, help=md["help"],
                                                                      rich_help_panel=md.get("panel"))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty
                                        if isinstance(info, typer.models.ArgumentInfo) else default,
                                        annotation=Annotated[kind, info]))
    return params


def _as_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else json.dumps(value)


def config_from(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """``cls(**values)`` with text parsed by each field's parser (errors name the option)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        value, parse = values.get(f.name, dataclasses.MISSING), f.metadata.get("parse")
        if value is dataclasses.MISSING or (parse and value is None):
            continue
        if parse and isinstance(value, str):
            try:
                value = parse(value)
            except LcscError as exc:
                raise LcscError(f"--{f.name.replace('_', '-')}: {exc}") from None
        kwargs[f.name] = value
    return cls(**kwargs, **fixed)


def config_command(name: str, cls: type, extra: list[inspect.Parameter], help: str) -> Callable:
    """Register command ``name`` whose options are ``cls``'s fields plus ``extra``; decorates the body."""
    def register(body: Callable) -> Callable:
        def command(**kwargs: Any) -> Any:
            return body(**kwargs)
        params = options_of(cls) + extra
        params.sort(key=lambda p: p.default is not inspect.Parameter.empty)  # arguments first
        command.__signature__ = inspect.Signature(params)
        command.__doc__ = help
        app.command(name)(command)
        return body
    return register


def _extra(name: str, kind: Any, default: Any, *flags: str, **info: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, typer.Option(*flags, **info)])


TRACKING = _extra("tracking_uri", Optional[str], None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                  help="MLflow tracking URI (default: MLflow's own, sqlite:///mlflow.db with artifacts in ./mlruns).")
VERBOSE = _extra("verbose", bool, False, "--verbose",
                 help="Also show MLflow's and Optuna's own log lines and warnings (LCSC_OPS_DEBUG=1 too).")


def _verbose(values: dict[str, Any]) -> None:
    """``--verbose``: the libraries' own lines back in (this process and the ones it starts)."""
    if values.pop("verbose", False):
        configure_libraries(verbose_flag=True)


@config_command("train", TrainConfig, [TRACKING, VERBOSE], "Train a digits DDPM or consistency model, logging raw + EMA checkpoints to MLflow. "
                            "Prints the run id (last line). Multi-process: accelerate launch pipelines/train.py "
                            "takes the same options.")
def train(**values: Any) -> None:
    from lcsc_ops.pipeline.progress import make_progress
    from lcsc_ops.training import train as run_training

    _verbose(values)
    cfg = config_from(TrainConfig, values)
    with make_progress(quiet=cfg.quiet) as progress:
        run_id = run_training(cfg, progress=progress)
    if run_id is not None:
        typer.echo(run_id)


@config_command("optimize", OptimizeConfig, [
    TRACKING, VERBOSE,
    _extra("as_json", bool, False, "--json", help="Print the results as JSON instead of a table."),
    _extra("report", Optional[Path], None, help="Also write the results JSON to this file."),
], "Search merge coefficients for a training run's checkpoints and register the winning merge.")
def optimize(*, as_json: bool = False, report: Optional[Path] = None, **values: Any) -> None:
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.pipeline.progress import make_progress
    from lcsc_ops.pipeline.report import render_table

    from lcsc_ops.pipeline.distributed import launched_rank, launched_world_size, run_distributed

    _verbose(values)
    cfg = config_from(OptimizeConfig, values)
    launched = launched_world_size() > 1  # under accelerate launch / torchrun: every FID sharded over them
    # Several workers write to stderr from several processes: plain lines, each with its [worker i].
    with make_progress(quiet=cfg.quiet or (launched and launched_rank() != 0), plain=cfg.workers > 1) as progress:
        if launched:
            result = run_distributed(cfg, log=progress.note, progress=progress, watchdog=True)
        else:
            result = run_optimize(cfg, log=progress.note, progress=progress, watchdog=True)
    if result is None:
        return  # another process of the launch: rank 0 prints the results
    if report is not None:
        report.write_text(json.dumps(result, indent=2))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console

        Console(width=160).print(render_table(result))


@config_command("report", ReportConfig, [TRACKING, VERBOSE],
                "Write an optimization's report (search curve, coefficients, samples from the same noise, the results "
                "table in Markdown) and log it under report/ of its parent run; the table becomes the registered "
                "version's description. optimize does this at its end too.")
def report(**values: Any) -> None:
    from lcsc_ops.pipeline.progress import stderr_writer
    from lcsc_ops.pipeline.report import run_report

    _verbose(values)
    result = run_report(config_from(ReportConfig, values), log=stderr_writer())
    typer.echo(result["artifact_uri"])


AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def runs(
    experiment: Annotated[Optional[str], typer.Option(help="Only this MLflow experiment (default: all).")] = None,
    as_json: AsJson = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """List runs holding checkpoints (ours and other tools', with their layout, size, model spec) and optimize runs
    (source, status, registered version)."""
    from lcsc_ops.store.fetch import resolve_tracking_uri
    from lcsc_ops.store.listing import list_runs

    found = list_runs(experiment, resolve_tracking_uri(tracking_uri))
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    train = Table(title="training runs", title_justify="left")
    for col in ("run id", "name", "experiment", "kind", "layout", "status", "checkpoints", "size", "last step",
                "factory", "sampler", "data"):
        train.add_column(col, justify="right" if col in ("checkpoints", "size", "last step") else "left",
                         no_wrap=col == "run id", min_width=32 if col == "run id" else None)
    for r in found["training"]:
        sampler = f"{r['sampler']} × {r['sampler_steps']}" if r["sampler_steps"] else str(r["sampler"] or "—")
        count = f"{r['checkpoints']}" + ("" if r["complete"] else " (partial)")
        train.add_row(r["run_id"], r["name"] or "", r["experiment"] or "", r["kind"], r["layout"], r["status"], count,
                      _size(r["bytes"]), str(r["last_step"] if r["last_step"] is not None else "—"),
                      r["factory"] or "—", sampler, r["dataset"] or "—")
    opt = Table(title="optimize runs", title_justify="left")
    for col in ("run id", "name", "experiment", "source run", "status", "registered"):
        opt.add_column(col, no_wrap=col in ("run id", "source run"), min_width=32 if "run" in col else None)
    for r in found["optimize"]:
        opt.add_row(r["run_id"], r["name"] or "", r["experiment"] or "", r["source_run"] or "—", r["status"],
                    r["registered_model"] or "—")
    console = Console()
    console = console if console.is_terminal else Console(width=220)  # piped: no run id or factory cut short
    console.print(train)
    console.print(opt)


@app.command()
def checkpoints(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a training (or imported) run.")],
    as_json: AsJson = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """List a run's checkpoints and its layout (lcsc, lightning, ...): step, kind, bytes, sha256, where in the run."""
    from lcsc_ops.store.fetch import resolve_tracking_uri
    from lcsc_ops.store.listing import checkpoint_entries

    entries, complete, layout = checkpoint_entries(run_id, resolve_tracking_uri(tracking_uri))
    if as_json:
        typer.echo(json.dumps({"run_id": run_id, "layout": layout, "complete": complete, "checkpoints": entries},
                              indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"checkpoints of run {run_id} (layout: {layout})"
                  + ("" if complete else " (partial: no complete manifest yet: still training, or stopped)"),
                  highlight=False)
    table = Table()
    for col in ("step", "kind", "bytes", "sha256", "in the run"):
        table.add_column(col, justify="right" if col in ("step", "bytes") else "left")
    for e in entries:
        table.add_row(str(e["step"]), e["kind"], f"{e['bytes']:,}" if e["bytes"] is not None else "—",
                      e["sha256"][:12] + "…" if e["sha256"] else "— (hashed when fetched)", e.get("path", e["file"]))
    table.caption = f"{len(entries)} checkpoints, {_size(sum(e['bytes'] or 0 for e in entries))}"
    console.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Model version to promote.")],
    alias: Annotated[str, typer.Option(help="Alias to move onto the version.")] = "champion",
    tracking_uri: TrackingUri = None,
) -> None:
    """Move an alias (e.g. champion) onto a registered model version."""
    from lcsc_ops.store.registry import promote as do_promote

    do_promote(name, version, alias, tracking_uri=tracking_uri)
    typer.echo(f"{name}@{alias} -> version {version} (load with mlflow.pytorch.load_model('models:/{name}@{alias}'))")


@app.command("import")
def import_(
    folder: Annotated[Path, typer.Argument(help="Folder of .safetensors / .pt / .pth / Lightning .ckpt checkpoints, "
                                                "or of diffusers UNet2DModel folders (checkpoint-<step>/unet/, or one "
                                                "per step).")],
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
    conditioning: Annotated[Optional[str], typer.Option(help="Class-conditional model: JSON of num_classes, "
                                                             "null_label, guidance, label_keyword (diffusers folders "
                                                             "with num_class_embeds: fields over the inferred ones).",
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
    key_prefix: Annotated[Optional[str], typer.Option(help="The prefix of the weights' keys in the files, e.g. 'net.' "
                                                           "(default: the one prefix that maps them onto the "
                                                           "factory's model).", rich_help_panel="Checkpoints")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment.", rich_help_panel="MLflow")] = "lcsc-import",
    run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.", rich_help_panel="MLflow")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Registered model name optimize will use by default.",
                                                      rich_help_panel="MLflow")] = None,
    tracking_uri: TrackingUri = None,
    verbose: Annotated[bool, typer.Option(help="Also show MLflow's own log lines and warnings.")] = False,
) -> None:
    """Turn a folder of saved checkpoints into an MLflow run that optimize accepts. Prints the run id (last line)."""
    _verbose({"verbose": verbose})
    from lcsc_ops.spec import spec_from_options
    from lcsc_ops.importers.diffusers import find_diffusers_layout, import_diffusers
    from lcsc_ops.importers.files import import_checkpoints

    log = functools.partial(typer.echo, err=True)
    cond = parse_json_object(conditioning, "--conditioning")
    common = dict(step_pattern=step_pattern, kind=kind, ema_folder=ema_folder, allow_pickle=allow_pickle,
                  experiment=experiment, run_name=run_name, model_name=model_name, tracking_uri=tracking_uri, log=log)
    if find_diffusers_layout(folder) is not None:
        given = [flag for flag, value in (("--factory", factory), ("--factory-kwargs", factory_kwargs),
                                          ("--partial", partial), ("--key-prefix", key_prefix)) if value]
        if given:
            raise LcscError(f"{folder} holds diffusers model folders, whose config.json gives the model: "
                            f"drop {', '.join(given)}")
        run_id = import_diffusers(folder, steps=sampler_steps, scheduler=scheduler or "DDIMScheduler",
                                  dataset=dataset, image_shape=parse_image_shape(image_shape) if image_shape else None,
                                  conditioning=cond or None, **common)
    else:
        if factory is None:
            raise LcscError("--factory is required (the 'module:callable' that rebuilds the network), "
                            "except for a folder of diffusers UNet2DModel folders")
        if scheduler is not None:
            raise LcscError("--scheduler applies to diffusers folders only (use --sampler-steps for DDIM)")
        spec = spec_from_options(factory, parse_json_object(factory_kwargs), sampler_steps=sampler_steps,
                                 dataset=dataset, image_shape=parse_image_shape(image_shape) if image_shape else None,
                                 conditioning=cond)
        run_id = import_checkpoints(folder, spec=spec, partial=partial, key_prefix=key_prefix, **common)
    typer.echo(run_id)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
