"""Import a folder of diffusers ``UNet2DModel`` checkpoints as an MLflow run that ``optimize`` accepts.

Two layouts, each made of ``save_pretrained`` folders (``config.json`` +
``diffusion_pytorch_model.safetensors``, or ``.bin`` from older diffusers):

(a) training checkpoints as diffusers' example scripts (``train_unconditional.py``) save them
    through accelerate: ``checkpoint-<step>/unet/`` and, with ``--use_ema``,
    ``checkpoint-<step>/unet_ema/`` (``EMAModel.save_pretrained``), imported as raw and EMA
    checkpoints; the step comes from the folder name (``checkpoint-(\\d+)``, or the user's
    pattern). Model folders beside them (the final ``unet/``) are skipped.
(b) a folder of ``UNet2DModel`` folders whose names carry the step (the user's pattern),
    of one kind, plus optionally a second such folder of EMA ones.

A folder is recognised by ``config.json``'s ``_class_name``. All checkpoints must share one
config (bookkeeping such as the EMA's ``optimization_step`` aside); the model spec is built
from it, with the sampler ``"diffusers"`` configured from the folder's
``scheduler/scheduler_config.json`` or ``scheduler_config.json`` when there is one. A
class-conditional ``UNet2DModel`` (``num_class_embeds``) gets a conditioning in its spec
(:func:`diffusers_conditioning`) and samples with ``class_labels``. Every file is checked, as
in :mod:`lcsc_ops.importers.files`, before the run exists.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from lcsc_ops.errors import LcscError
from lcsc_ops.models.diffusers_unet import (DEFAULT_SCHEDULER, FACTORY, MODEL_CLASS, DiffusersSampler,
                                            require_diffusers, resolve_scheduler_config, unet_config)
from lcsc_ops.spec import Conditioning, ModelSpec
from lcsc_ops.checkpoints import KINDS
from lcsc_ops.importers.files import (PlannedFile, check_finite, check_inside, check_layout, compile_step_pattern,
                                     model_shapes, read_checkpoint, write_import_run)

CHECKPOINT_STEP_PATTERN = r"checkpoint-(\d+)"
CHECKPOINT_SUBFOLDERS = (("unet", "raw"), ("unet_ema", "ema"))
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULER_FILES = ("scheduler/scheduler_config.json", "scheduler_config.json")


@dataclass(frozen=True)
class ModelFolder:
    """One ``save_pretrained`` folder: where it is, the name that carries its step, its kind."""

    path: Path
    label: str  # relative to the imported folder, e.g. "checkpoint-500/unet"
    step_name: str
    kind: str


@dataclass(frozen=True)
class DiffusersLayout:
    layout: str  # "checkpoints" (layout a) or "models" (layout b)
    models: tuple[ModelFolder, ...]
    skipped: tuple[str, ...] = ()


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LcscError(f"cannot read {label}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LcscError(f"{label} holds a {type(data).__name__}, not a JSON object")
    return data


def _class_name(folder: Path) -> str | None:
    """``_class_name`` of ``folder/config.json`` when it is a diffusers config; None otherwise (never raises)."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def find_diffusers_layout(folder: str | Path) -> DiffusersLayout | None:
    """The diffusers layout of ``folder``, or None when it holds no diffusers model folders.

    A ``save_pretrained`` folder itself (one model, no steps) is refused with an LcscError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    checkpoints = [ModelFolder(d / sub, f"{d.name}/{sub}", d.name, kind) for d in subdirs
                   for sub, kind in CHECKPOINT_SUBFOLDERS if _class_name(d / sub) is not None]
    models = [ModelFolder(d, d.name, d.name, "raw") for d in subdirs if _class_name(d) is not None]
    if checkpoints:
        return DiffusersLayout("checkpoints", tuple(checkpoints), tuple(m.label for m in models))
    if models:
        return DiffusersLayout("models", tuple(models))
    if _class_name(folder) is not None and any((folder / name).is_file() for name in WEIGHTS_FILES):
        raise LcscError(f"{folder} is a single {_class_name(folder)} folder: import the folder that holds one "
                        f"such folder per checkpoint step")
    return None


def _weights_file(model: ModelFolder) -> Path:
    for name in WEIGHTS_FILES:
        if (model.path / name).is_file():
            return model.path / name
    if any(model.path.glob("*.index.json")):
        raise LcscError(f"{model.label}: sharded weights are not supported; save with a larger max_shard_size")
    raise LcscError(f"{model.label} has no {' or '.join(WEIGHTS_FILES)}")


def _step(model: ModelFolder, pattern: re.Pattern) -> int:
    found = pattern.search(model.step_name)
    if found is None:
        raise LcscError(f"no step for {model.label}: {model.step_name!r} does not match the step pattern "
                        f"{pattern.pattern!r}")
    try:
        return int(found.group(1))
    except ValueError:
        raise LcscError(f"no step for {model.label}: the step pattern matched {found.group(1)!r}, "
                        f"not an integer") from None


def _model_folders(folder: Path, *, step_pattern: str | None, kind: str, ema_folder: str | Path | None,
                   log: Callable[[str], None]) -> tuple[list[ModelFolder], re.Pattern]:
    layout = find_diffusers_layout(folder)
    if layout is None:
        raise LcscError(f"no diffusers {MODEL_CLASS} folders in {folder} (checkpoint-<step>/unet/config.json, "
                        f"or one folder with a config.json per step)")
    pattern = compile_step_pattern(step_pattern)
    if layout.layout == "checkpoints":
        if kind != "raw":
            raise LcscError("--kind applies to a folder of model folders: in checkpoint-<step>/ folders, "
                            "unet/ is raw and unet_ema/ is ema")
        if ema_folder is not None:
            raise LcscError("--ema-folder applies to a folder of model folders: checkpoint-<step>/unet_ema/ "
                            "already holds the EMA")
        for label in layout.skipped:
            log(f"skipped {label}/: a model folder beside the checkpoint-<step>/ folders")
        return list(layout.models), pattern or re.compile(CHECKPOINT_STEP_PATTERN)
    models = [dataclasses.replace(m, kind=kind) for m in layout.models]
    if ema_folder is not None:
        ema = find_diffusers_layout(ema_folder)
        if ema is None or ema.layout != "models":
            raise LcscError(f"--ema-folder {ema_folder} is not a folder of {MODEL_CLASS} folders")
        models += [dataclasses.replace(m, kind="ema") for m in ema.models]
    if pattern is None:
        raise LcscError(f"no step for {models[0].label}: pass --step-pattern, a regex with one group matched "
                        f"against the model folder names, e.g. 'step(\\d+)'")
    return models, pattern


def plan_diffusers_import(folder: str | Path, *, step_pattern: str | None = None, kind: str = "raw",
                          ema_folder: str | Path | None = None, log: Callable[[str], None] = lambda msg: None
                          ) -> tuple[dict[str, Any], list[PlannedFile]]:
    """The one ``UNet2DModel`` config all checkpoints share, and their weight files by kind then step."""
    require_diffusers(f"importing diffusers {MODEL_CLASS} folders")
    if kind not in KINDS:
        raise LcscError(f"unknown checkpoint kind {kind!r} (use {' or '.join(KINDS)})")
    models, pattern = _model_folders(Path(folder), step_pattern=step_pattern, kind=kind, ema_folder=ema_folder,
                                     log=log)
    first: tuple[str, dict[str, Any]] | None = None
    planned: list[PlannedFile] = []
    seen: dict[tuple[str, int], str] = {}
    roots = [Path(folder)] + ([Path(ema_folder)] if ema_folder is not None else [])
    for model in models:
        raw = _read_json(model.path / "config.json", f"{model.label}/config.json")
        if raw.get("_class_name") != MODEL_CLASS:
            raise LcscError(f"{model.label} holds a {raw.get('_class_name')}; only {MODEL_CLASS} folders "
                            f"can be imported")
        config = unet_config(raw)
        if first is None:
            first = (model.label, config)
        elif config != first[1]:
            key = next(k for k in config if config[k] != first[1][k])
            raise LcscError(f"{model.label}/config.json differs from {first[0]}/config.json in {key!r} "
                            f"({config[key]!r} vs {first[1][key]!r}): all checkpoints must share one "
                            f"{MODEL_CLASS} config")
        weights = _weights_file(model)
        check_inside(weights, roots, f"{model.label}/{weights.name}")
        step = _step(model, pattern)
        if (model.kind, step) in seen:
            raise LcscError(f"duplicate step {step} ({model.kind}): {seen[model.kind, step]} and {model.label}")
        seen[model.kind, step] = model.label
        planned.append(PlannedFile(weights, model.kind, step, source=f"{model.label}/{weights.name}"))
    assert first is not None  # _model_folders never returns an empty list
    return first[1], sorted(planned, key=lambda p: (KINDS.index(p.kind), p.step))


def diffusers_conditioning(config: Mapping[str, Any], given: Mapping[str, Any] | None = None) -> Conditioning | None:
    """The conditioning of a ``UNet2DModel`` config: with ``num_class_embeds`` (labels through an
    ``nn.Embedding``, ``class_embed_type`` null), ``num_classes`` = its embeddings, called with
    ``class_labels=``, guidance 1 (no embedding is known to be a null label). ``given`` (import
    ``--conditioning``) overrides fields, e.g. ``{"num_classes": 10, "null_label": 10, "guidance": 2}``
    for a model trained with labels dropped to embedding 10; None for an unconditional model."""
    embeds = config.get("num_class_embeds")
    inferred = ({"num_classes": embeds, "label_keyword": "class_labels"}
                if embeds and config.get("class_embed_type") is None else {})
    merged = {**inferred, **(given or {})}
    return Conditioning.from_dict(merged) if merged else None


def diffusers_spec(folder: str | Path, config: dict[str, Any], *, steps: int = 10, scheduler: str = DEFAULT_SCHEDULER,
                   dataset: str = "digits", image_shape: tuple[int, ...] | None = None,
                   conditioning: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] = lambda msg: None) -> ModelSpec:
    """The model spec of a ``UNet2DModel`` config: its factory, a diffusers sampler, the image shape it makes.

    The scheduler is configured from the folder's ``scheduler_config.json`` when there is
    one, else from the class defaults (with the UNet's ``num_train_timesteps`` if it has one).
    ``image_shape`` defaults to ``(in_channels, sample_size, sample_size)``; ``conditioning``
    overrides fields of :func:`diffusers_conditioning`'s.
    """
    folder = Path(folder)
    found = next((folder / name for name in SCHEDULER_FILES if (folder / name).is_file()), None)
    if found is not None:
        source = _read_json(found, str(found.relative_to(folder)))
        log(f"scheduler: {scheduler} configured from {found.relative_to(folder)}")
    else:
        source = {"num_train_timesteps": config["num_train_timesteps"]} if config.get("num_train_timesteps") else {}
        log(f"scheduler: {scheduler} with its default config (no {' or '.join(SCHEDULER_FILES)} in {folder})")
    sampler = DiffusersSampler(steps=steps, scheduler=scheduler,
                               scheduler_config=resolve_scheduler_config(scheduler, source))
    if image_shape is None:
        size = config.get("sample_size")
        if size is None:
            raise LcscError(f"the {MODEL_CLASS} config has no sample_size: pass --image-shape C,H,W")
        image_shape = (config["in_channels"], *([size, size] if isinstance(size, int) else size))
    cond = diffusers_conditioning(config, conditioning)
    if cond is not None:
        log(f"class-conditional: {cond.num_classes} classes (class_labels), null label {cond.null_label}, "
            f"guidance {cond.guidance:g}")
    return ModelSpec(factory=FACTORY, kwargs={"config": config}, sampler=sampler.settings(), dataset=dataset,
                     image_shape=image_shape, conditioning=cond)


def import_diffusers(folder: str | Path, *, steps: int = 10, scheduler: str = DEFAULT_SCHEDULER,
                     dataset: str = "digits", image_shape: tuple[int, ...] | None = None,
                     step_pattern: str | None = None, kind: str = "raw", ema_folder: str | Path | None = None,
                     allow_pickle: bool = False, experiment: str = "lcsc-import", run_name: str | None = None,
                     model_name: str | None = None, tracking_uri: str | None = None,
                     conditioning: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] = lambda msg: None) -> str:
    """Turn a folder of diffusers ``UNet2DModel`` checkpoints (layout a or b above) into an MLflow run; its id.

    ``steps`` and ``scheduler`` (a diffusers scheduler class, DDIM by default) make the
    spec's sampler; ``kind``/``ema_folder`` as in :func:`~lcsc_ops.importers.files.import_checkpoints`
    (layout b only). ``.bin`` weights are loaded with ``weights_only=True`` unless ``allow_pickle``.
    ``conditioning`` overrides fields of the inferred conditioning (:func:`diffusers_conditioning`).
    Everything is checked before the run is created; errors are LcscError.
    """
    from lcsc_ops.store.fetch import resolve_tracking_uri

    notes: list[str] = []  # what was skipped and how the scheduler is set up: said once everything passed
    config, planned = plan_diffusers_import(folder, step_pattern=step_pattern, kind=kind, ema_folder=ema_folder,
                                            log=notes.append)
    spec = diffusers_spec(folder, config, steps=steps, scheduler=scheduler, dataset=dataset,
                          image_shape=image_shape, conditioning=conditioning, log=notes.append)
    layouts = [read_checkpoint(p.path, kind=p.kind, allow_pickle=allow_pickle, layout_only=True)[0] for p in planned]
    model = model_shapes(spec, [(p.path, layout) for p, layout in zip(planned, layouts)], partial=False)
    first = None
    for p, layout in zip(planned, layouts):
        check_layout(p.label, layout, model, first, partial=False)
        first = first or (p.label, layout)
    for p in planned:
        check_finite(p, allow_pickle)
    resolve_tracking_uri(tracking_uri)  # an unreachable server is the one line a bad input gets, too
    for note in notes:
        log(note)
    return write_import_run(planned, spec=spec, folder=folder, ema_folder=ema_folder, allow_pickle=allow_pickle,
                            experiment=experiment, run_name=run_name, model_name=model_name,
                            tracking_uri=tracking_uri, tags={"lcsc.source_format": "diffusers"}, log=log)
