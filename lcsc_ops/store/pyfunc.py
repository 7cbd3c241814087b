"""A registered merge that generates: the ``python_function`` flavor of an lcsc-ops model.

A version is saved by ``mlflow.pytorch.save_model`` (pickled, so ``mlflow.pytorch.load_model``
still returns the user's own ``nn.Module`` class) and its ``python_function`` flavor is then
pointed at this module, so ``mlflow.pyfunc.load_model(uri).predict({"num_samples": 16,
"seed": 0})`` and ``mlflow models serve`` return samples: a float32 numpy array
(N, C, H, W) in [-1, 1], drawn from :func:`lcsc_ops.evaluation.fid.make_noise` with the
spec's sampler (``lcsc_spec`` in the model's metadata), exactly as the FID evaluator draws
them for that seed. A class-conditional model takes an optional ``label`` per row (omitted:
the seed's balanced labels, as the FID evaluator's) and an optional ``guidance`` param (the
classifier-free guidance scale; default: the spec's).

:func:`save_model` writes a version's files; :func:`lcsc_ops.store.registry.log_model` links
them to their run as ``mlflow.models.Model.log`` would (it also works as that flavor module).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec

# What one request looks like (the logged input example, validated by the tests).
INPUT_EXAMPLE = {"num_samples": 4, "seed": 0}
# Load-time settings, overridable with ``mlflow.pyfunc.load_model(uri, model_config={...})``
# or, for ``mlflow models serve``, ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cuda"}'``.
MODEL_CONFIG = {"device": "cpu", "batch_size": 64, "max_samples": 10_000}


class Generator:
    """A model with its spec's sampler: ``sample(num_samples, seed)`` -> images in [-1, 1].

    ``model`` is the user's ``nn.Module`` (moved to ``device``, in eval mode); ``spec`` the
    :class:`ModelSpec` it was registered with; ``sampler`` the spec's sampler. ``predict`` is
    the ``python_function`` interface (also used by ``mlflow models serve``); ``max_samples``
    caps the images of one ``predict`` call.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, *, device: str = "cpu", batch_size: int = 64,
                 max_samples: int = MODEL_CONFIG["max_samples"], name: str = "this model") -> None:
        from lcsc_ops.models.diffusion import make_sampler

        if int(batch_size) < 1:
            raise LcscError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.spec, self.sampler = model.to(device).eval(), spec, make_sampler(spec.sampler)
        self.device, self.batch_size, self.max_samples = torch.device(device), int(batch_size), int(max_samples)
        self.name = name

    def check_samplable(self) -> None:
        """LcscError (one line, what to use instead) for a model no built-in sampler can sample: one
        registered without a sample shape (``image_shape=None``, e.g. scored by a custom evaluator)."""
        if self.spec.image_shape is None:
            raise LcscError(f"{self.name} has no sample shape (its spec's image_shape is null: a model scored by a "
                            "custom evaluator), so no built-in sampler can sample it; load the network with "
                            "mlflow.pytorch.load_model(uri) (or lcsc_ops.load(uri).model) and sample it with your "
                            "own sampler")

    def sample(self, num_samples: int, seed: int = 0, *, label: int | None = None,
               guidance: float | None = None) -> torch.Tensor:
        """``num_samples`` images (float32, (N, C, H, W), on the CPU) from the fixed noise of ``seed``:
        the images the FID evaluator samples for that seed (same noise, same sampler). A conditional
        model samples class ``label`` (None: the seed's balanced labels, as the evaluator) at guidance
        scale ``guidance`` (None: the spec's)."""
        from lcsc_ops.evaluation.fid import make_noise, sample_batch

        self.check_samplable()
        num_samples, seed = _count(num_samples, "num_samples"), _seed(seed)
        noise = make_noise(num_samples, self.spec.image_shape, seed)
        cond = self._guidance(num_samples, seed, label, guidance)
        with torch.inference_mode():
            return torch.cat([sample_batch(self.sampler, self.model, noise[a:a + self.batch_size].to(self.device),
                                           None if cond is None else cond[a:a + self.batch_size]).float().cpu()
                              for a in range(0, num_samples, self.batch_size)])

    def _guidance(self, num_samples: int, seed: int, label: Any, scale: Any) -> Any:
        from lcsc_ops.evaluation.conditional import make_labels
        from lcsc_ops.models.sampling import guidance_for

        cond = self.spec.conditioning
        if cond is None:
            if label is not None or scale is not None:
                raise LcscError("this model is unconditional: it takes no label or guidance")
            return None
        if label is None:
            labels = make_labels(num_samples, cond.num_classes, seed)
        else:
            label = _integer(label, "label")
            if not 0 <= label < cond.num_classes:
                raise LcscError(f"label must be in 0..{cond.num_classes - 1}, got {label}")
            labels = torch.full((num_samples,), label, dtype=torch.long)
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
                    or not (math.isfinite(scale) and scale >= 0):
                raise LcscError(f"guidance must be a finite number >= 0, got {scale!r}")
            if scale != 1 and cond.null_label is None:
                raise LcscError("guidance other than 1 needs the model's null label, which its spec lacks")
        return guidance_for(cond, labels, None if scale is None else float(scale))

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Samples for each request row ``{"num_samples": N, "seed": S}`` (seed 0 when omitted),
        concatenated in row order. Bad input raises an MLflow INVALID_PARAMETER_VALUE error
        (HTTP 400 from ``mlflow models serve``)."""
        from mlflow.exceptions import MlflowException

        try:
            self.check_samplable()
            conditional = self.spec.conditioning is not None
            rows = _records(model_input, conditional)
            requests = [(_count(r.get("num_samples"), "num_samples"), _seed(r.get("seed")), _label(r.get("label")))
                        for r in rows]
            total = sum(n for n, _, _ in requests)
            if total > self.max_samples:
                raise LcscError(f"{total} samples requested, more than max_samples={self.max_samples} "
                                "(model_config) allows in one request")
            guidance = (params or {}).get("guidance") if conditional else None
            return torch.cat([self.sample(n, s, label=y, guidance=guidance) for n, s, y in requests]).numpy()
        except LcscError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None


def _records(model_input: Any, conditional: bool = False) -> list[dict[str, Any]]:
    """The request rows of a DataFrame, a dict (one row, or columns of lists) or a list of dicts
    (``label`` is a field only for a conditional model)."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict("records")
    elif isinstance(model_input, Mapping):
        columns = {k: np.atleast_1d(np.asarray(v, dtype=object)).tolist() for k, v in model_input.items()}
        if len({len(v) for v in columns.values()}) > 1:
            raise LcscError("num_samples and seed must have the same number of rows")
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    elif isinstance(model_input, (list, tuple)) and all(isinstance(r, Mapping) for r in model_input):
        rows = [dict(r) for r in model_input]
    else:
        raise LcscError(f"expected {{'num_samples': N, 'seed': S}} (a dict, records or a DataFrame), "
                        f"got {type(model_input).__name__}")
    if not rows:
        raise LcscError("empty request: expected {'num_samples': N, 'seed': S}")
    fields = {"num_samples", "seed"} | ({"label"} if conditional else set())
    for row in rows:
        unknown = set(row) - fields
        if unknown:
            raise LcscError(f"unknown request field(s) {sorted(unknown)}: expected num_samples and seed"
                            + (" (and label)" if conditional else ""))
    return rows


def _label(value: Any) -> int | None:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return None  # omitted: the seed's balanced labels
    return _integer(value, "label")


def _integer(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise LcscError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        raise LcscError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _count(value: Any, what: str) -> int:
    n = _integer(value, what)
    if n < 1:
        raise LcscError(f"{what} must be at least 1, got {n}")
    return n


def _seed(value: Any) -> int:
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return 0  # an omitted seed (a missing optional column arrives as NaN / None)
    seed = _integer(value, "seed")
    if not 0 <= seed < 2 ** 63:
        raise LcscError(f"seed must be in 0..2**63-1, got {seed}")
    return seed


def signature(spec: Mapping[str, Any]):
    """Input: one row of ``num_samples`` (long) and optional ``seed`` (long); output: float32
    images (-1, C, H, W) of the spec's image shape. A conditional model's also takes an optional
    ``label`` (long) and a ``guidance`` param (double, default: the spec's scale)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    shape = tuple(int(d) for d in (spec.get("image_shape", (1, 8, 8)) or ()))  # None: a model without a sample shape
    inputs = [ColSpec("long", "num_samples"), ColSpec("long", "seed", required=False)]
    outputs = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape))])
    cond = spec.get("conditioning")
    if not cond:
        return ModelSignature(inputs=Schema(inputs), outputs=outputs)
    return ModelSignature(inputs=Schema([*inputs, ColSpec("long", "label", required=False)]), outputs=outputs,
                          params=ParamSchema([ParamSpec("guidance", "double", float(cond.get("guidance", 1.0)))]))


def save_model(path: str, mlflow_model: Any = None, *, pytorch_model: torch.nn.Module, spec: Mapping[str, Any],
               pip_requirements: list[str], **kwargs: Any) -> None:
    """Save ``pytorch_model`` at ``path`` with the ``pytorch`` flavor (pickled) and a
    ``python_function`` flavor loaded by this module, with a signature and an input example.

    Also a flavor module for ``Model.log`` (``kwargs``, such as ``serialization_format``, are its
    own). The pickle is written without zip CRC-32s: ``torch.load`` never checks them (it loads a
    corrupted archive all the same, tests/test_registry.py) and computing them doubled the time of a
    registration (benchmarks/RESULTS.md, "Model size")."""
    import mlflow.pytorch
    import torch.utils.serialization
    from mlflow import pyfunc
    from mlflow.models import Model

    mlflow_model = mlflow_model if mlflow_model is not None else Model()
    with torch.utils.serialization.config.patch({"save.compute_crc32": False}):
        mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, serialization_format="pickle",
                                  pip_requirements=pip_requirements, signature=signature(spec),
                                  input_example=dict(INPUT_EXAMPLE))
    torch_conf = mlflow_model.flavors[pyfunc.FLAVOR_NAME]
    # No ``data`` key: _load_pyfunc gets the model directory, whose MLmodel holds the spec.
    pyfunc.add_to_model(mlflow_model, loader_module=__name__, conda_env=torch_conf.get(pyfunc.ENV, {}).get("conda"),
                        python_env=torch_conf.get(pyfunc.ENV, {}).get("virtualenv"), model_config=dict(MODEL_CONFIG))
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> Generator:
    """The ``python_function`` loader: the model directory ``path`` as a :class:`Generator`."""
    return load_local(path, **{k: v for k, v in (model_config or {}).items() if k in MODEL_CONFIG})


def load_local(path: str, *, device: str = "cpu", batch_size: int = 64,
               max_samples: int = MODEL_CONFIG["max_samples"], name: str | None = None) -> Generator:
    """The lcsc-ops model saved in directory ``path`` (its ``pytorch`` flavor and spec); ``name``
    (its URI) is what messages call it."""
    import mlflow.pytorch
    from mlflow.models import Model

    meta = Model.load(os.path.join(path, "MLmodel"))
    data = (meta.metadata or {}).get("lcsc_spec")
    if data is None:
        raise LcscError(f"model at {path} has no lcsc_spec in its metadata: not registered by lcsc-ops")
    spec = ModelSpec.from_dict(data, origin=f"model {path}")  # read only for its sampler and shape, never built
    return Generator(mlflow.pytorch.load_model(path), spec, device=device, batch_size=batch_size,
                     max_samples=max_samples, name=f"model {name or path}")


def load(model_uri: str, *, device: str = "cpu", batch_size: int = 64, tracking_uri: str | None = None) -> Generator:
    """The registered (or logged) lcsc-ops model at ``model_uri`` (``models:/<name>@champion``,
    ``models:/<name>/<version>``, ``runs:/...``, a local directory) as a :class:`Generator`:
    ``.model`` is the user's ``nn.Module``, ``.sample(num_samples, seed)`` its samples."""
    import mlflow
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from lcsc_ops.store.server import check_reachable

    check_reachable(tracking_uri or mlflow.get_tracking_uri())
    try:
        uri = _in_store(model_uri, tracking_uri) if tracking_uri else model_uri
        path = download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except MlflowException as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise LcscError(f"cannot load model {model_uri!r}: {first}") from None
    return load_local(path, device=device, batch_size=batch_size, name=repr(model_uri))


def _in_store(model_uri: str, tracking_uri: str) -> str:
    """``models:/...`` resolved to its artifact location in ``tracking_uri``'s registry and store.
    MLflow resolves such a URI against the process's registry URI, whatever ``tracking_uri`` it
    is given, so a model of another store than the process's was not found (the size sweep)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for _ in range(3):  # a version's source may itself be a LoggedModel's models:/<model id>
        if not model_uri.startswith("models:"):
            break
        base, inner = ModelsArtifactRepository.split_models_uri(model_uri)
        found = get_model_name_and_version(client, base)
        location = (client.get_logged_model(found[0]).artifact_location if len(found) == 1
                    else client.get_model_version_download_uri(*found))
        model_uri = f"{location.rstrip('/')}/{inner}" if inner else location
    return model_uri
