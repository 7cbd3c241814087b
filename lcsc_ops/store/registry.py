"""The MLflow model registry: register a merge with its lineage, find it again, move aliases."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.quiet import verbose

def model_requirements(model: torch.nn.Module) -> list[str]:
    """pip requirements to unpickle ``model``: torch, safetensors, and the installed distribution
    that defines the model's class (``lcsc-ops`` for the built-in U-Net, ``diffusers`` for a
    ``UNet2DModel``, the user's own package for a user's factory), pinned to its version here."""
    from importlib import metadata

    requirements = [f"torch=={torch.__version__.split('+')[0]}", "safetensors"]
    top = type(model).__module__.split(".")[0]
    for dist in distributions_providing(top):
        if dist.lower() not in ("torch", "safetensors"):
            requirements.append(f"{dist}=={metadata.version(dist)}")
    return requirements


def distributions_providing(top: str) -> list[str]:
    """The installed distributions providing top-level module ``top``. The distribution named like
    the module (``torch``, ``lcsc_ops`` -> ``lcsc-ops``) is asked first; only when none is does
    ``packages_distributions()`` read every installed distribution's records (seconds per call)."""
    from importlib import metadata

    for name in dict.fromkeys((top, top.replace("_", "-"))):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if top in (dist.read_text("top_level.txt") or "").split():
            return [dist.metadata["Name"]]
        # The RECORD's lines, not ``dist.files``: that stats every listed file (torch lists ~15,000: a second).
        record = dist.read_text("RECORD") or dist.read_text("SOURCES.txt") or ""
        files = [line.split(",")[0] for line in record.splitlines()]
        if any(f.startswith((f"{top}/", f"{top}.py")) or f"__editable__.{name}" in f for f in files):
            return [dist.metadata["Name"]]
    return list(dict.fromkeys(metadata.packages_distributions().get(top, [])))


def serving_requirements(model: torch.nn.Module) -> list[str]:
    """:func:`model_requirements` plus ``lcsc-ops`` itself, whose module loads the model's
    ``python_function`` flavor (already there when the model class is lcsc-ops's own)."""
    from importlib import metadata

    requirements = model_requirements(model)
    if not any(r.split("==")[0].lower().replace("_", "-") == "lcsc-ops" for r in requirements):
        requirements.append(f"lcsc-ops=={metadata.version('lcsc-ops')}")
    return requirements


def register_model(model: torch.nn.Module, *, name: str, spec: Mapping[str, Any], tags: Mapping[str, str],
                   run_id: str, tracking_uri: str | None = None) -> str:
    """Log ``model`` as an MLflow model of ``run_id`` and register it as a new version of
    ``name`` carrying ``tags``; returns the version number.

    Pickled (``serialization_format="pickle"``) so ``mlflow.pytorch.load_model`` returns the
    user's own ``nn.Module`` class; the spec travels in the model's metadata. Its
    ``python_function`` flavor (:mod:`lcsc_ops.store.pyfunc`) samples it with the spec's sampler,
    so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` generate images.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    with _no_requirements_check():
        model_id = log_model(client, run_id, model.cpu().eval(), spec, serving_requirements(model))
    # The version is created with its lineage tags in one call: a crash cannot leave an untagged version.
    with _quiet_registration():
        version = mlflow.register_model(f"models:/{model_id}", name, tags=dict(tags)).version
    return str(version)


def log_model(client: Any, run_id: str, model: torch.nn.Module, spec: Mapping[str, Any],
              requirements: Sequence[str]) -> str:
    """``Model.log``'s steps with MLflow's public API: a PENDING LoggedModel of ``run_id`` (the
    run's params and the usual source tags), the files of :func:`lcsc_ops.store.pyfunc.save_model`,
    the model as the run's output, its step-0 metrics, READY (FAILED on an error); returns its id.

    One difference: a store on this machine's disk gets the files saved in place, where
    ``Model.log`` saves into a temporary folder and copies it: the model's bytes are written once,
    not twice (the size sweep, benchmarks/RESULTS.md). Other stores get the staged copy, uploaded."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model
    from mlflow.tracking.context.registry import resolve_tags

    from lcsc_ops.store import pyfunc

    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                        tags=resolve_tags(), params={k: str(v) for k, v in run.data.params.items()})
    meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                 metadata={"lcsc_spec": dict(spec)}, model_id=logged.model_id)
    local = _local_dir(logged.artifact_location)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        step0 = [Metric(m.key, m.value, m.timestamp, m.step, run_id=run_id, model_id=logged.model_id)
                 for key in run.data.metrics for m in client.get_metric_history(run_id, key)
                 if m.step == 0 and m.model_id is None]
        if step0:
            client.log_batch(run_id, metrics=step0)
        save = dict(mlflow_model=meta, pytorch_model=model, spec=dict(spec), pip_requirements=list(requirements))
        if local is not None:
            pyfunc.save_model(local, **save)
        else:
            with _staging_folder(sum(t.numel() * t.element_size() for t in model.state_dict().values())) as tmp:
                pyfunc.save_model(os.path.join(tmp, "model"), **save)
                client.log_model_artifacts(logged.model_id, os.path.join(tmp, "model"))
    except BaseException:
        if local is not None:
            import shutil

            shutil.rmtree(local, ignore_errors=True)  # a fresh folder of this LoggedModel only
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def _local_dir(artifact_uri: str) -> str | None:
    """The folder of a ``file:`` (or plain path) artifact location, None for any other store."""
    from urllib.parse import urlparse

    from mlflow.utils.file_utils import local_file_uri_to_path

    scheme = urlparse(artifact_uri).scheme
    return local_file_uri_to_path(artifact_uri) if scheme in ("file", "") else None


SHM_DIR = "/dev/shm"


@contextlib.contextmanager
def _no_requirements_check() -> Iterator[None]:
    """Without MLflow's check of the requirements against this environment: ours are the versions
    installed here (:func:`model_requirements`), and the check maps every installed file to its
    distribution first, 2-3 s per process (benchmarks/RESULTS.md, "Model size")."""
    from mlflow.utils import environment

    check = getattr(environment, "warn_dependency_requirement_mismatches", None)
    if check is None:
        yield
        return
    environment.warn_dependency_requirement_mismatches = lambda requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


@contextlib.contextmanager
def _staging_folder(nbytes: int) -> Iterator[str]:
    """A temporary folder for a model uploaded to a remote store: in shared memory when the model
    takes at most half of what is free there (its bytes then reach a disk once, in the store), else
    the usual temporary folder."""
    import tempfile

    try:
        fs = os.statvfs(SHM_DIR)
        room = fs.f_bavail * fs.f_frsize if os.access(SHM_DIR, os.W_OK) else 0
    except OSError:
        room = 0
    with tempfile.TemporaryDirectory(dir=SHM_DIR if 2 * nbytes <= room else None) as tmp:
        yield tmp


@contextlib.contextmanager
def _quiet_registration() -> Iterator[None]:
    """Without MLflow's "Successfully registered model" and "Created version" lines (printed, not
    logged): the caller says it once. Kept with ``--verbose`` (:mod:`lcsc_ops.quiet`)."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM

    was = MLFLOW_LOGGING_STREAM.enabled
    MLFLOW_LOGGING_STREAM.enabled = was and verbose()
    try:
        yield
    finally:
        MLFLOW_LOGGING_STREAM.enabled = was


def find_version(name: str, run_id: str, match: Mapping[str, str], *, tracking_uri: str | None = None) -> str | None:
    """The oldest version of ``name`` logged by ``run_id`` whose tags include ``match``, if any."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        versions = MlflowClient(tracking_uri=tracking_uri).search_model_versions(
            f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    for mv in sorted(versions, key=lambda v: int(v.version)):
        if all(mv.tags.get(k) == v for k, v in match.items()):
            return str(mv.version)
    return None


def promote(name: str, version: str, alias: str, *, tracking_uri: str | None = None) -> None:
    """Point ``alias`` of registered model ``name`` at ``version`` (LcscError for unknown name/version)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lcsc_ops.store.fetch import resolve_tracking_uri

    text = str(version)
    if not (text.isascii() and text.isdigit() and int(text) >= 1):  # checked before the store is asked
        raise LcscError(f"model version must be a positive integer like 3, got {text!r}")
    version = str(int(text))

    def first_line(exc: BaseException) -> str:
        return (str(exc).strip() or type(exc).__name__).splitlines()[0]

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    for read, missing in ((lambda: client.get_registered_model(name), f"unknown registered model {name!r}"),
                          (lambda: client.get_model_version(name, version),
                           f"registered model {name!r} has no version {version!r}")):
        try:
            read()
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise LcscError(missing) from None
            raise LcscError(f"cannot read {name!r} version {version} from the registry: {first_line(exc)}") from None
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise LcscError(f"cannot set alias {alias!r}: {first_line(exc)}") from None


def to_json_tag(value: Any) -> str:
    """Compact JSON for a model-version tag value; refuses to truncate lineage silently.

    MLflow allows 100,000 characters in a model-version tag value: a window of ~1,000
    checkpoints' hashes. Beyond that, registration fails with a clear message instead of
    registering a version whose lineage cannot be recomputed.
    """
    text = json.dumps(value, separators=(",", ":"))
    if len(text) > 100_000:
        raise LcscError(f"lineage tag of {len(text)} characters exceeds MLflow's 100,000; use a smaller --window")
    return text
