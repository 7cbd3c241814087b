"""Import an existing folder of checkpoints as an MLflow run that ``lcsc-ops optimize`` accepts.

Each file (``.safetensors``, a ``.pt``/``.pth`` state dict, or a Lightning ``.ckpt``) is
rewritten as safetensors with step, kind and spec in its metadata and logged exactly as
:class:`~lcsc_ops.store.logger.CheckpointLogger` logs a training run's checkpoints
(``lcsc/spec.json``, ``checkpoints/step…-{raw,ema}.safetensors``, the manifest entry added
only after its file is logged), so :func:`~lcsc_ops.store.sources.fetch_window`
reads an imported run like any other.

Every file is read and checked against the model the spec builds (keys, shapes, one
layout for all) and every step is resolved BEFORE the run is created: a bad folder
leaves no half-imported run behind. Torch files are read through :mod:`lcsc_ops.weightfiles`,
as the readers of other tools' runs read them: ``torch.load(weights_only=True)`` first (a
file that needs full unpickling, arbitrary code on load, is refused unless ``allow_pickle``),
raw and EMA states found inside, key prefixes detected against the model. Folders of
diffusers ``UNet2DModel`` checkpoints are planned by :mod:`lcsc_ops.importers.diffusers` and
logged by the same code.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lcsc_ops.errors import LcscError
from lcsc_ops.runformat import manifest_entry
from lcsc_ops.weightfiles import all_finite, find_key_prefix, first_line, load_torch_file, strip_wrappers, weight_states
from lcsc_ops.interrupts import interrupted
from lcsc_ops.layouts import check_model_size, spec_layout, state_bytes
from lcsc_ops.spec import ModelSpec
from lcsc_ops.checkpoints import KINDS, checkpoint_filename, sha256_file, write_checkpoint

SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")  # .ckpt: Lightning's ModelCheckpoint
STEP_KEYS = ("lcsc.step", "step", "global_step")  # metadata (or top-level .pt entries) holding the step
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}

Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class PlannedFile:
    """One checked file to import, with the kind and step it is logged as."""

    path: Path
    kind: str
    step: int
    source: str = ""  # as recorded in the manifest; default: the file name
    prefix: str = ""  # the keys' prefix in the file (a LightningModule's attribute, e.g. "net.")

    @property
    def label(self) -> str:
        return self.source or self.path.name


def find_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files directly inside ``folder`` (LcscError if there are none, or if one is a
    link to a file outside ``folder``); Lightning's ``last.ckpt`` is left out beside stepped ones."""
    if not folder.is_dir():
        raise LcscError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if any(p.suffix == ".ckpt" and not _is_last(p) for p in files):  # last.ckpt: a copy of the newest
        files = [p for p in files if not _is_last(p)]
    if not files:
        raise LcscError(f"no checkpoints ({', '.join('*' + s for s in SUFFIXES)}) in {folder}")
    for p in files:
        check_inside(p, [folder], p.name)
    return files


def _is_last(path: Path) -> bool:
    """Lightning's ``last.ckpt`` (``last-v1.ckpt``, ...): saved in place, a copy of the newest checkpoint."""
    return path.suffix == ".ckpt" and (path.stem == "last" or path.stem.startswith("last-v"))


def check_inside(path: Path, folders: list[Path], label: str) -> Path:
    """``path`` if, links followed, it lies inside one of ``folders``: an import uploads what it reads,
    so a link must not carry a file from elsewhere on the machine into the store unnoticed."""
    target = path.resolve()
    if not any(target.is_relative_to(Path(f).resolve()) for f in folders):
        raise LcscError(f"{label} in {folders[0]} is a link to {target}, outside the folder: refusing to import "
                        f"it (copy the file into the folder if you mean it)")
    return path


def _pick(states: dict[str, dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The state of ``kind`` among a file's raw/EMA states; a file holding only one gives it for either."""
    if kind in states:
        return states[kind]
    if len(states) == 1:
        return next(iter(states.values()))
    raise LcscError(f"{name} holds no {kind} weights (found: {', '.join(states)})")


def _unprefixed(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else state


def read_checkpoint(path: Path, *, kind: str, allow_pickle: bool = False, layout_only: bool = False,
                    key_prefix: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    """``(state, metadata)`` of one file, with wrapper prefixes stripped, and ``key_prefix`` (e.g. a
    LightningModule's ``net.``): only the keys under it, without it.

    With ``layout_only`` the state maps keys to ``(shape, dtype)`` and no weights are read
    from safetensors (and none from zip-format torch files, which are memory-mapped).
    Metadata is the safetensors header's, or the top-level step entries of a torch dict, and
    ``lcsc.kinds``: the kinds of weights a torch file holds (``raw,ema`` for a Lightning
    ``.ckpt`` saved under ``WeightAveraging``; see :func:`lcsc_ops.weightfiles.weight_states`).
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if layout_only:
                    slices = {k: f.get_slice(k) for k in f.keys()}
                    state = {k: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype()))
                             for k, s in slices.items()}
                    return _unprefixed(strip_wrappers(state), key_prefix), meta
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise LcscError(f"cannot read {path.name}: {first_line(exc)}") from None
        return _unprefixed(strip_wrappers(load_file(str(path))), key_prefix), meta
    obj = load_torch_file(path, allow_pickle)
    meta = {}
    if isinstance(obj, Mapping):
        meta = {k: str(obj[k]) for k in STEP_KEYS if isinstance(obj.get(k), int) and not isinstance(obj[k], bool)}
    states = weight_states(obj, path.name)
    meta["lcsc.kinds"] = ",".join(states)
    state = _unprefixed(_pick(states, kind, path.name), key_prefix)
    if not state:
        raise LcscError(f"{path.name} holds no tensors" + (f" under {key_prefix!r}" if key_prefix else ""))
    if layout_only:
        state = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    return state, meta


def step_of(path: Path, metadata: Mapping[str, str], pattern: re.Pattern | None) -> int:
    """The training step of a file: its metadata first, else the user's filename pattern."""
    for key in STEP_KEYS:
        if key in metadata:
            try:
                return int(metadata[key])
            except ValueError:
                raise LcscError(f"{path.name}: metadata {key}={metadata[key]!r} is not an integer step") from None
    if pattern is None:
        raise LcscError(f"no step for file {path.name}: its metadata has none ({'/'.join(STEP_KEYS)}); "
                        f"pass --step-pattern, e.g. 'step(\\d+)'")
    found = pattern.search(path.name)
    if found is None:
        raise LcscError(f"no step for file {path.name}: it does not match --step-pattern {pattern.pattern!r}")
    try:
        return int(found.group(1))
    except ValueError:
        raise LcscError(f"no step for file {path.name}: --step-pattern matched {found.group(1)!r}, "
                        f"not an integer") from None


def check_layout(name: str, layout: Layout, model: Mapping[str, tuple[int, ...]], first: tuple[str, Layout] | None,
                 *, partial: bool) -> None:
    """LcscError unless the file's keys fit the model (all of them, or a subset when ``partial``),
    with the model's shapes, and the same keys and dtypes as the first file."""
    unexpected = sorted(set(layout) - set(model))
    if unexpected:
        raise LcscError(f"{name}: key {unexpected[0]!r} is not in the model built from the spec "
                        f"({len(unexpected)} unexpected keys)")
    missing = sorted(set(model) - set(layout))
    if missing and not partial:
        raise LcscError(f"{name}: the model's key {missing[0]!r} is missing ({len(missing)} missing keys; "
                        f"pass --partial if the checkpoints hold only part of the model, e.g. adapters)")
    for key, (shape, _) in layout.items():
        if tuple(shape) != tuple(model[key]):
            raise LcscError(f"{name}: {key!r} has shape {tuple(shape)}, the model's is {tuple(model[key])}")
    if first is not None:
        first_name, first_layout = first
        diff = sorted(set(layout) ^ set(first_layout))
        if diff:
            raise LcscError(f"{name} and {first_name} hold different keys, e.g. {diff[0]!r}")
        for key, (_, dtype) in layout.items():
            if dtype != first_layout[key][1]:
                raise LcscError(f"{name}: {key!r} is {dtype}, in {first_name} it is {first_layout[key][1]}")


def compile_step_pattern(step_pattern: str | None) -> re.Pattern | None:
    """The user's ``--step-pattern`` compiled (LcscError unless it is a regex with exactly one group)."""
    if step_pattern is None:
        return None
    try:
        pattern = re.compile(step_pattern)
    except re.error as exc:
        raise LcscError(f"--step-pattern {step_pattern!r} is not a regular expression: {exc}") from None
    if pattern.groups != 1:
        raise LcscError(f"--step-pattern {step_pattern!r} needs exactly one group around the step, "
                        f"e.g. 'step(\\d+)'")
    return pattern


def plan_import(folders: list[tuple[Path, str]], *, spec: ModelSpec, step_pattern: str | None, allow_pickle: bool,
                partial: bool, key_prefix: str | None = None) -> list[PlannedFile]:
    """Read every file's layout and step and check them all; the files to import, by kind then step.
    A torch file of a raw folder that holds an EMA too (a Lightning ``.ckpt`` under ``WeightAveraging``)
    gives both, unless an EMA folder is given."""
    pattern = compile_step_pattern(step_pattern)
    files = [(path, kind, *read_checkpoint(path, kind=kind, allow_pickle=allow_pickle, layout_only=True))
             for folder, kind in folders for path in find_checkpoints(folder)]
    own_ema = len(folders) == 1 and folders[0][1] == "raw"
    files += [(path, "ema", *read_checkpoint(path, kind="ema", allow_pickle=allow_pickle, layout_only=True))
              for path, _, _, meta in list(files) if own_ema and meta.get("lcsc.kinds") == "raw,ema"]
    keys = set(model_shapes(spec, [], partial=partial))
    files = [(path, kind, *_strip_prefix(path.name, layout, keys, key_prefix, partial), meta)
             for path, kind, layout, meta in files]
    model = model_shapes(spec, [(path, layout) for path, _, layout, _, _ in files], partial=partial)
    planned: list[PlannedFile] = []
    seen: dict[tuple[str, int], Path] = {}
    first: tuple[str, Layout] | None = None
    for path, kind, layout, prefix, meta in files:
        check_layout(path.name, layout, model, first, partial=partial)
        first = first or (path.name, layout)
        step = step_of(path, meta, pattern)
        if (kind, step) in seen:
            raise LcscError(f"duplicate step {step} ({kind}): {seen[kind, step].name} and {path.name}")
        seen[kind, step] = path
        planned.append(PlannedFile(path, kind, step, prefix=prefix))
    for p in planned:
        check_finite(p, allow_pickle)
    return sorted(planned, key=lambda p: (KINDS.index(p.kind), p.step))


def _strip_prefix(name: str, layout: Layout, keys: set[str], given: str | None, partial: bool
                  ) -> tuple[Layout, str]:
    """A file's layout under the model's keys and the prefix taken off (``given``, else "" when its
    keys are the model's already, else the one prefix that maps them: a LightningModule's ``net.``)."""
    if given is None and set(layout) <= keys:
        return layout, ""
    prefix = given if given is not None and partial else find_key_prefix(layout, keys, given, name)
    return {k[len(prefix):]: v for k, v in layout.items() if k.startswith(prefix)}, prefix


def model_shapes(spec: ModelSpec, files: Sequence[tuple[Path, Layout]], *, partial: bool
                 ) -> dict[str, tuple[int, ...]]:
    """The shapes of the spec's model, built on the meta device and refused (one line, both sizes)
    when its state, at the files' dtypes, is far larger than the largest file; with ``partial``
    only the tensors the files hold count (the rest is the factory's own base). A factory that
    cannot build on the meta device is built for real."""
    built = spec_layout(spec)
    if built is None:
        return {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    model, counts = built
    if files:
        stored = {k: d.itemsize for k, (_, d) in files[0][1].items() if isinstance(d, torch.dtype)}
        only = set(files[0][1]) if partial else None
        check_model_size(state_bytes(model, counts, only=only), state_bytes(model, counts, stored, only),
                         max(path.stat().st_size for path, _ in files), f"model spec {spec.factory!r}")
    return {k: shape for k, (shape, _) in model.items()}


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """The user's factory called with the user's kwargs; a failure is one line naming both."""
    try:
        return spec.build()
    except LcscError:
        raise
    except Exception as exc:
        raise LcscError(f"factory {spec.factory!r} with kwargs {json.dumps(spec.kwargs)} failed: "
                        f"{type(exc).__name__}: {first_line(exc)}") from None


def check_finite(p: PlannedFile, allow_pickle: bool) -> None:
    """Refuse a checkpoint holding NaN or inf: a merge multiplies it into every candidate."""
    state, _ = read_checkpoint(p.path, kind=p.kind, allow_pickle=allow_pickle, key_prefix=p.prefix)
    for key, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not all_finite(t):
            raise LcscError(f"{p.label}: tensor {key!r} holds NaN or inf")


def import_checkpoints(folder: str | Path, *, spec: ModelSpec, step_pattern: str | None = None, kind: str = "raw",
                       ema_folder: str | Path | None = None, partial: bool = False, allow_pickle: bool = False,
                       experiment: str = "lcsc-import", run_name: str | None = None, model_name: str | None = None,
                       tracking_uri: str | None = None, log: Callable[[str], None] = lambda msg: None,
                       key_prefix: str | None = None) -> str:
    """Turn a folder of checkpoints (and optionally a folder of EMA ones) into an MLflow run; return its id.

    Files are ``.safetensors``, ``.pt``/``.pth`` state dicts or Lightning ``.ckpt`` files (also
    nested under ``state_dict``/``model``/``ema``, with ``module.`` prefixes stripped, a key prefix
    such as a LightningModule's ``net.`` found against the model or given as ``key_prefix``,
    an EMA inside the file imported too); each file's
    step comes from its metadata (``lcsc.step``/``step``) or else from ``step_pattern``,
    a regex with one group matched against the file name. Files in ``folder`` are logged
    as ``kind``, those in ``ema_folder`` as ``ema``. ``partial`` accepts checkpoints that
    hold only some of the model's keys (adapters): the rest then comes from ``spec``'s
    factory. Everything is checked before the run is created; errors are LcscError.
    """
    if kind not in KINDS:
        raise LcscError(f"unknown checkpoint kind {kind!r} (use {' or '.join(KINDS)})")
    folders = [(Path(folder), kind)] + ([(Path(ema_folder), "ema")] if ema_folder is not None else [])
    planned = plan_import(folders, spec=spec, step_pattern=step_pattern, allow_pickle=allow_pickle, partial=partial,
                          key_prefix=key_prefix)
    return write_import_run(planned, spec=spec, folder=folder, ema_folder=ema_folder, allow_pickle=allow_pickle,
                            experiment=experiment, run_name=run_name, model_name=model_name,
                            tracking_uri=tracking_uri, log=log)


def write_import_run(planned: list[PlannedFile], *, spec: ModelSpec, folder: str | Path,
                     ema_folder: str | Path | None = None, allow_pickle: bool = False, experiment: str = "lcsc-import",
                     run_name: str | None = None, model_name: str | None = None, tracking_uri: str | None = None,
                     tags: Mapping[str, str] | None = None, log: Callable[[str], None] = lambda msg: None) -> str:
    """Create the run for checked ``planned`` files and log them as a training run logs its checkpoints."""
    from lcsc_ops.store.logger import CheckpointUploader

    tags = {"lcsc.kind": "import", "lcsc.source_folder": str(Path(folder).resolve()), **(tags or {})}
    if ema_folder is not None:
        tags["lcsc.ema_folder"] = str(Path(ema_folder).resolve())
    if model_name:
        tags["lcsc.model_name"] = model_name
    uploader = CheckpointUploader.create_run(spec, experiment=experiment, run_name=run_name, tags=tags,
                                             tracking_uri=tracking_uri)
    try:
        with tempfile.TemporaryDirectory(prefix="lcsc-import-") as tmp:
            for p in planned:
                state, _ = read_checkpoint(p.path, kind=p.kind, allow_pickle=allow_pickle, key_prefix=p.prefix)
                folder = Path(tmp) / f"{p.kind}{p.step}"
                folder.mkdir()
                local = folder / checkpoint_filename(p.step, p.kind)
                write_checkpoint(local, state, step=p.step, kind=p.kind, spec=spec, extra={"lcsc.source_file": p.label})
                del state
                uploader.add_step(folder, [manifest_entry(p.step, p.kind, sha256_file(local), local.stat().st_size,
                                                          {"source": p.label})])
                shutil.rmtree(folder)
                log(f"{p.kind}@{p.step} <- {p.label}")
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM (lcsc_ops.interrupts)
        uploader.end("KILLED")
        raise interrupted(exc, f"after {len(uploader.entries)} of {len(planned)} checkpoints: run "
                               f"{uploader.run_id} KILLED (partial); the same command imports again, in a new "
                               "run") from None
    except BaseException:
        uploader.end("FAILED")
        raise
    uploader.end("FINISHED")
    return uploader.run_id
