"""A registered version that generates: pyfunc predict, `mlflow models serve`, and lcsc_ops.load."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

import lcsc_ops
from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.evaluators import build_evaluators
from lcsc_ops.models.diffusion import make_sampler
from lcsc_ops.models.unet import DigitsUNet
from lcsc_ops.pipeline.optimize import run_optimize
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.registry import promote, serving_requirements
from tests.conftest import TINY_TRAIN, tiny_optimize_config

NAME = "tiny-serving"
NFE = 1  # not the training run's sampler steps: the registered spec must carry --nfe


@pytest.fixture(scope="module")
def registered(store, tiny_run):
    """One tiny optimization with --nfe 1, registered as NAME and promoted to champion."""
    cfg = tiny_optimize_config(tiny_run, store, model_name=NAME, seed=13, n_trials=3, nfe=NFE, register=True)
    report = run_optimize(cfg, log=lambda m: None)
    version = report["registered_model"]["version"]
    promote(NAME, version, "champion", tracking_uri=store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    return cfg, f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def pyfunc_model(registered):
    return mlflow.pyfunc.load_model(registered[1])


def test_registered_spec_and_signature(registered, pyfunc_model):
    meta = pyfunc_model.metadata
    spec = ModelSpec.from_dict(meta.metadata["lcsc_spec"])
    assert spec.sampler["steps"] == NFE != TINY_TRAIN["sampler_steps"]
    assert meta.flavors["python_function"]["loader_module"] == "lcsc_ops.store.pyfunc"
    assert "pytorch" in meta.flavors
    assert [c.name for c in meta.signature.inputs.inputs] == ["num_samples", "seed"]
    assert meta.signature.outputs.inputs[0].shape == (-1, *spec.image_shape)
    assert any(r.startswith("lcsc-ops==") for r in _requirements(registered[1]))
    example = meta.load_input_example(mlflow.artifacts.download_artifacts(registered[1]))
    out = pyfunc_model.predict(example)
    assert out.shape == (example["num_samples"], *spec.image_shape)


def _requirements(uri: str) -> list[str]:
    return Path(mlflow.artifacts.download_artifacts(f"{uri}/requirements.txt")).read_text().split()


def test_serving_requirements_add_lcsc_ops_for_a_users_own_class():
    requirements = serving_requirements(torch.nn.Linear(2, 2))
    assert requirements[:2] == [f"torch=={torch.__version__.split('+')[0]}", "safetensors"]
    assert requirements[2:] == [f"lcsc-ops=={metadata.version('lcsc-ops')}"]
    assert serving_requirements(DigitsUNet(channels=8)).count(f"lcsc-ops=={metadata.version('lcsc-ops')}") == 1


def test_predict_returns_deterministic_samples_in_range(pyfunc_model):
    a = pyfunc_model.predict({"num_samples": 16, "seed": 0})
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (16, 1, 8, 8)
    assert np.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert np.array_equal(a, pyfunc_model.predict({"num_samples": 16, "seed": 0}))
    assert not np.array_equal(a, pyfunc_model.predict({"num_samples": 16, "seed": 1}))
    # rows are requests, concatenated in order; an omitted seed is seed 0
    rows = pyfunc_model.predict([{"num_samples": 3, "seed": 1}, {"num_samples": 2, "seed": 0}])
    assert np.array_equal(rows[:3], pyfunc_model.predict({"num_samples": 3, "seed": 1}))
    assert np.array_equal(rows[3:], a[:2])
    assert np.array_equal(pyfunc_model.predict({"num_samples": 2}), a[:2])


def test_predict_equals_what_the_fid_evaluator_samples(store, registered, pyfunc_model):
    cfg, uri = registered
    model = mlflow.pytorch.load_model(uri)
    spec = ModelSpec.from_dict(pyfunc_model.metadata.metadata["lcsc_spec"])
    evaluator = build_evaluators(spec, evaluator=None, feature_extractor=None, inception_weights=None,
                                 batch_size=cfg.batch_size, device="cpu", cache_dir=store["cache"]).main
    for seed in (0, 7):
        want = evaluator.sample(model, 16, seed)
        assert torch.equal(torch.from_numpy(pyfunc_model.predict({"num_samples": 16, "seed": seed})), want)
    # and the sampler is the registered one: the training run's 2-step DDIM samples differently
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    other = make_sampler({**spec.sampler, "steps": TINY_TRAIN["sampler_steps"]}).sample(model, noise)
    assert not torch.equal(other, evaluator.sample(model, 16, 0))


@pytest.mark.parametrize("bad, message", [
    ({"num_samples": 0}, "num_samples must be at least 1"),
    ({"num_samples": 2, "seed": -1}, "seed must be in"),
    ({"num_samples": 20_000, "seed": 0}, "max_samples=10000"),
])
def test_predict_refuses_bad_requests(pyfunc_model, bad, message):
    with pytest.raises(MlflowException, match=message) as info:
        pyfunc_model.predict(bad)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_load_time_settings_override_the_logged_model_config(registered, pyfunc_model, monkeypatch):
    small = mlflow.pyfunc.load_model(registered[1], model_config={"max_samples": 5, "batch_size": 3})
    assert small.predict({"num_samples": 5, "seed": 0}).shape == (5, 1, 8, 8)
    with pytest.raises(MlflowException, match="max_samples=5"):
        small.predict({"num_samples": 6, "seed": 0})
    # what `mlflow models serve` reads at load time
    monkeypatch.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"max_samples": 2}))
    with pytest.raises(MlflowException, match="max_samples=2"):
        mlflow.pyfunc.load_model(registered[1]).predict({"num_samples": 3, "seed": 0})


def test_load_helper_returns_the_users_class_and_the_same_samples(store, registered, pyfunc_model):
    _, uri = registered
    gen = lcsc_ops.load(uri, tracking_uri=store["uri"])
    assert type(gen.model) is DigitsUNet
    torch_model = mlflow.pytorch.load_model(uri)
    assert all(torch.equal(v, torch_model.state_dict()[k]) for k, v in gen.model.state_dict().items())
    images = gen.sample(16, seed=0)
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.float32
    assert np.array_equal(images.numpy(), pyfunc_model.predict({"num_samples": 16, "seed": 0}))
    with pytest.raises(LcscError, match="num_samples must be at least 1"):
        gen.sample(0)
    with pytest.raises(LcscError, match="cannot load model 'models:/no-such-model@champion'"):
        lcsc_ops.load("models:/no-such-model@champion", tracking_uri=store["uri"])


def test_lcsc_ops_imports_without_mlflow():
    code = "import sys, lcsc_ops; assert callable(lcsc_ops.load); assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI, bash, uvicorn and its worker); SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(5)
                return
            proc.poll()  # reap the leader so the group can empty
            time.sleep(0.1)


@pytest.fixture
def server(store, registered, tmp_path):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on a free loopback port."""
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=store["uri"],
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", registered[1],
                                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=store["root"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"mlflow models serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no answer on {url}/ping: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        yield url
    finally:
        _stop(proc)


def test_served_model_answers_on_loopback(server, registered, pyfunc_model):
    want = pyfunc_model.predict({"num_samples": 4, "seed": 0})
    status, body = _post(f"{server}/invocations", {"inputs": {"num_samples": 4, "seed": 0}})
    assert status == 200
    assert np.array_equal(np.asarray(body["predictions"], dtype=np.float32), want)
    # the logged serving example and the dataframe_records form the signature calls for
    example = json.loads(Path(mlflow.artifacts.download_artifacts(f"{registered[1]}/serving_input_example.json"))
                         .read_text())
    status, body = _post(f"{server}/invocations", example)
    assert status == 200 and np.asarray(body["predictions"]).shape == (4, 1, 8, 8)
    status, body = _post(f"{server}/invocations", {"dataframe_records": [{"num_samples": 3, "seed": 5}]})
    assert status == 200 and np.asarray(body["predictions"]).shape == (3, 1, 8, 8)
    status, body = _post(f"{server}/invocations", {"inputs": {"num_samples": 0}})
    assert status == 400 and "num_samples must be at least 1" in body["message"]
