"""A registered model no built-in sampler can sample (issue 25, item 4): a user's MLP logged with
``dataset=None, image_shape=None`` and optimized with ``--evaluator``. Loading it works (the
network is the user's); sampling it says in one line why not and what to use instead."""
from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

import lcsc_ops
from lcsc_ops.errors import LcscError
from tests.test_api import _mlp_config, mlp_run  # noqa: F401 - the fixture

NAME = "api-mlp-serving"
NEEDLES = ("no sample shape", "no built-in sampler", "mlflow.pytorch.load_model", "your own sampler")


@pytest.fixture(scope="module")
def mlp_version(store, mlp_run):  # noqa: F811
    from lcsc_ops.pipeline.optimize import run_optimize

    report = run_optimize(_mlp_config(store, mlp_run, register=True, model_name=NAME, seed=9), log=lambda m: None)
    mlflow.set_tracking_uri(store["uri"])
    return f"models:/{NAME}/{report['registered_model']['version']}"


def _one_line(text: str) -> None:
    assert "\n" not in text.strip(), text
    for needle in NEEDLES:
        assert needle in text, text


def test_load_gives_the_network_and_sample_says_what_to_use_instead(store, mlp_version):
    gen = lcsc_ops.load(mlp_version, tracking_uri=store["uri"])
    x = torch.randn(5, 3)
    assert gen.model(x).shape == (5, 3)  # the user's MLP, usable as it is
    with pytest.raises(LcscError) as exc:
        gen.sample(2, seed=0)
    _one_line(str(exc.value))
    assert repr(mlp_version) in str(exc.value)
    # what the message points at works: the pytorch flavor is the same network
    net = mlflow.pytorch.load_model(mlp_version)
    assert torch.equal(net(x), gen.model(x))


def test_pyfunc_predict_says_what_to_use_instead(store, mlp_version):
    model = mlflow.pyfunc.load_model(mlp_version)
    with pytest.raises(MlflowException) as exc:
        model.predict({"num_samples": 2, "seed": 0})
    assert exc.value.error_code == "INVALID_PARAMETER_VALUE"
    _one_line(exc.value.message)
