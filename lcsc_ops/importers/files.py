"""Import an existing folder of checkpoints as an MLflow run that ``lcsc-ops optimize`` accepts.

Each file (``.safetensors``, or a ``.pt``/``.pth`` state dict) is rewritten as safetensors
with step, kind and spec in its metadata and logged exactly as
:class:`~lcsc_ops.checkpoints.CheckpointLogger` logs a training run's checkpoints
(``lcsc/spec.json``, ``checkpoints/step…-{raw,ema}.safetensors``, the manifest entry added
only after its file is logged), so :func:`~lcsc_ops.checkpoints.fetch_window`
reads an imported run like any other.

Every file is read and checked against the model the spec builds (keys, shapes, one
layout for all) and every step is resolved BEFORE the run is created: a bad folder
leaves no half-imported run behind. Torch files are opened with
``torch.load(weights_only=True)``; a file that needs full unpickling (arbitrary code on
load) is refused unless ``allow_pickle``. Folders of diffusers ``UNet2DModel`` checkpoints
are planned by :mod:`lcsc_ops.importers.diffusers` and logged by the same code.
"""
from __future__ import annotations

import json
import pickle
import pickletools
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lcsc_ops.errors import LcscError
from lcsc_ops.interrupts import interrupted
from lcsc_ops.layouts import check_model_size, spec_layout, state_bytes
from lcsc_ops.spec import ModelSpec
from lcsc_ops.checkpoints import CHECKPOINT_DIR, KINDS, MANIFEST_FORMAT, MANIFEST_NAME, SPEC_ARTIFACT, checkpoint_filename, sha256_file, write_checkpoint

SUFFIXES = (".safetensors", ".pt", ".pth")
STEP_KEYS = ("lcsc.step", "step", "global_step")  # metadata (or top-level .pt entries) holding the step
# Where a training script's checkpoint dict keeps the weights, by the kind being imported.
NESTED_KEYS = {"raw": ("state_dict", "model", "ema"), "ema": ("ema", "state_dict", "model")}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_PLAIN_MODULES = ("torch", "collections", "builtins", "copyreg", "_codecs")  # what a pickled state dict needs
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

    @property
    def label(self) -> str:
        return self.source or self.path.name


def find_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint files directly inside ``folder`` (LcscError if there are none, or if one is a
    link to a file outside ``folder``)."""
    if not folder.is_dir():
        raise LcscError(f"not a folder: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise LcscError(f"no checkpoints ({', '.join('*' + s for s in SUFFIXES)}) in {folder}")
    for p in files:
        check_inside(p, [folder], p.name)
    return files


def check_inside(path: Path, folders: list[Path], label: str) -> Path:
    """``path`` if, links followed, it lies inside one of ``folders``: an import uploads what it reads,
    so a link must not carry a file from elsewhere on the machine into the store unnoticed."""
    target = path.resolve()
    if not any(target.is_relative_to(Path(f).resolve()) for f in folders):
        raise LcscError(f"{label} in {folders[0]} is a link to {target}, outside the folder: refusing to import "
                        f"it (copy the file into the folder if you mean it)")
    return path


def _load_quietly(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` without its warnings (e.g. on the pickle protocol of a plain pickle file): the
    verdict on the file is the one line the user gets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", **kwargs)


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    mmap = zipfile.is_zipfile(path)  # torch.save's zip format maps lazily: reading a layout reads no weights
    try:
        return _load_quietly(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise _refusal(path, exc, zipped=mmap) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LcscError(f"cannot read {path.name}: {_first_line(exc)}") from None
    try:
        return _load_quietly(path, weights_only=False)
    except Exception as exc:  # whatever a foreign pickle raises, the user gets one line
        raise LcscError(f"cannot read {path.name}: {type(exc).__name__}: {_first_line(exc)}") from None


def _refusal(path: Path, exc: pickle.UnpicklingError, zipped: bool) -> LcscError:
    """Why a file that ``weights_only`` refused is not loaded: what it would import, or that it is
    no pickle at all (then --allow-pickle would not help)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    named = found.group(1) if found else None
    scanned = None if zipped else _pickled_global(path)  # a plain pickle: torch names no global, or a torch one
    if scanned is None and named is None and not zipped:
        return LcscError(f"cannot read {path.name}: neither a torch checkpoint nor a pickle")
    if scanned and (named is None or scanned.split(".")[0] not in _PLAIN_MODULES):
        named = scanned
    what = f" (it references {named})" if named else ""
    return LcscError(f"refusing to unpickle {path.name}: it needs full unpickling{what}; "
                     f"pass --allow-pickle if you trust it")


def _pickled_global(path: Path) -> str | None:
    """What a plain pickle file would import on loading (its first global outside torch and the
    standard containers, else its first global; ``""`` for none), read without running anything;
    None when the file is not a pickle at all."""
    found: list[str] = []
    strings: list[str | None] = []  # the strings pushed so far (memo fetches included), newest last
    memo: dict[int, str | None] = {}
    top: str | None = None  # the value just pushed, when it is a string
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                name, pushed = op.name, None
                if "UNICODE" in name:
                    pushed = arg
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed = memo.get(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = top
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = top
                elif name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if "UNICODE" in name or name.endswith("GET"):
                    strings.append(pushed)
                if name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME"):
                    top = pushed
                if found and found[-1].split(".")[0] not in _PLAIN_MODULES:
                    return found[-1]
    except Exception:  # pickletools raises ValueError and friends on bytes that are no pickle
        return None
    return found[0] if found else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _state_from(obj: Any, kind: str, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded torch object: a state dict, one nested under a usual key, or a module's."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise LcscError(f"{name} holds a {type(obj).__name__}, not a state dict")
    for key in NESTED_KEYS[kind]:
        inner = obj.get(key)
        if isinstance(inner, torch.nn.Module):
            inner = inner.state_dict()
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    # Non-tensor entries beside the weights (epoch counters, configs) are not weights.
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def read_checkpoint(path: Path, *, kind: str, allow_pickle: bool = False, layout_only: bool = False
                    ) -> tuple[dict[str, Any], dict[str, str]]:
    """``(state, metadata)`` of one file, with wrapper prefixes stripped.

    With ``layout_only`` the state maps keys to ``(shape, dtype)`` and no weights are read
    from safetensors (and none from zip-format torch files, which are memory-mapped).
    Metadata is the safetensors header's, or the top-level step entries of a torch dict.
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if layout_only:
                    slices = {k: f.get_slice(k) for k in f.keys()}
                    state = {k: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype()))
                             for k, s in slices.items()}
                    return _strip_wrappers(state), meta
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise LcscError(f"cannot read {path.name}: {_first_line(exc)}") from None
        return _strip_wrappers(load_file(str(path))), meta
    obj = _torch_load(path, allow_pickle)
    meta = {}
    if isinstance(obj, Mapping):
        meta = {k: str(obj[k]) for k in STEP_KEYS if isinstance(obj.get(k), int) and not isinstance(obj[k], bool)}
    state = _strip_wrappers(_state_from(obj, kind, path.name))
    if not state:
        raise LcscError(f"{path.name} holds no tensors")
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
                partial: bool) -> list[PlannedFile]:
    """Read every file's layout and step and check them all; the files to import, by kind then step."""
    pattern = compile_step_pattern(step_pattern)
    files = [(path, kind, *read_checkpoint(path, kind=kind, allow_pickle=allow_pickle, layout_only=True))
             for folder, kind in folders for path in find_checkpoints(folder)]
    model = model_shapes(spec, [(path, layout) for path, _, layout, _ in files], partial=partial)
    planned: list[PlannedFile] = []
    seen: dict[tuple[str, int], Path] = {}
    first: tuple[str, Layout] | None = None
    for path, kind, layout, meta in files:
        check_layout(path.name, layout, model, first, partial=partial)
        first = first or (path.name, layout)
        step = step_of(path, meta, pattern)
        if (kind, step) in seen:
            raise LcscError(f"duplicate step {step} ({kind}): {seen[kind, step].name} and {path.name}")
        seen[kind, step] = path
        planned.append(PlannedFile(path, kind, step))
    for p in planned:
        check_finite(p, allow_pickle)
    return sorted(planned, key=lambda p: (KINDS.index(p.kind), p.step))


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
                        f"{type(exc).__name__}: {_first_line(exc)}") from None


def check_finite(p: PlannedFile, allow_pickle: bool) -> None:
    """Refuse a checkpoint holding NaN or inf: a merge multiplies it into every candidate."""
    state, _ = read_checkpoint(p.path, kind=p.kind, allow_pickle=allow_pickle)
    for key, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LcscError(f"{p.label}: tensor {key!r} holds NaN or inf")


def import_checkpoints(folder: str | Path, *, spec: ModelSpec, step_pattern: str | None = None, kind: str = "raw",
                       ema_folder: str | Path | None = None, partial: bool = False, allow_pickle: bool = False,
                       experiment: str = "lcsc-import", run_name: str | None = None, model_name: str | None = None,
                       tracking_uri: str | None = None, log: Callable[[str], None] = lambda msg: None) -> str:
    """Turn a folder of checkpoints (and optionally a folder of EMA ones) into an MLflow run; return its id.

    Files are ``.safetensors`` or ``.pt``/``.pth`` state dicts (also nested under
    ``state_dict``/``model``/``ema``, with ``module.`` prefixes stripped); each file's
    step comes from its metadata (``lcsc.step``/``step``) or else from ``step_pattern``,
    a regex with one group matched against the file name. Files in ``folder`` are logged
    as ``kind``, those in ``ema_folder`` as ``ema``. ``partial`` accepts checkpoints that
    hold only some of the model's keys (adapters): the rest then comes from ``spec``'s
    factory. Everything is checked before the run is created; errors are LcscError.
    """
    if kind not in KINDS:
        raise LcscError(f"unknown checkpoint kind {kind!r} (use {' or '.join(KINDS)})")
    folders = [(Path(folder), kind)] + ([(Path(ema_folder), "ema")] if ema_folder is not None else [])
    planned = plan_import(folders, spec=spec, step_pattern=step_pattern, allow_pickle=allow_pickle, partial=partial)
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
                state, _ = read_checkpoint(p.path, kind=p.kind, allow_pickle=allow_pickle)
                folder = Path(tmp) / f"{p.kind}{p.step}"
                folder.mkdir()
                local = folder / checkpoint_filename(p.step, p.kind)
                write_checkpoint(local, state, step=p.step, kind=p.kind, spec=spec, extra={"lcsc.source_file": p.label})
                del state
                uploader.add_step(folder, [{"step": p.step, "kind": p.kind, "file": local.name,
                                            "sha256": sha256_file(local), "bytes": local.stat().st_size,
                                            "source": p.label}])
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
