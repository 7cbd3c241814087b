"""pip requirements of a registered model: what unpickling it needs."""
from __future__ import annotations

import os
from importlib import metadata

import pytest
import torch

from lcsc_ops.models.unet import digits_unet
from lcsc_ops.store.registry import model_requirements


def test_requirements_name_the_package_that_defines_the_model_class():
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    assert model_requirements(torch.nn.Linear(2, 2)) == [torch_pin, "safetensors"]
    assert model_requirements(digits_unet(channels=8)) == [torch_pin, "safetensors",
                                                           f"lcsc-ops=={metadata.version('lcsc-ops')}"]


def test_a_diffusers_model_requires_diffusers():
    diffusers = pytest.importorskip("diffusers")
    net = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                block_out_channels=(32, 32), norm_num_groups=8,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"))
    assert f"diffusers=={diffusers.__version__}" in model_requirements(net)


def test_distribution_of_a_model_class_without_reading_every_installed_one(monkeypatch):
    """The distribution named like the model's top-level module is found directly; only a module no
    distribution is named after makes lcsc-ops read every installed distribution's records."""
    from importlib import metadata

    from lcsc_ops.store.registry import distributions_providing

    full = metadata.packages_distributions()
    calls = []
    monkeypatch.setattr(metadata, "packages_distributions", lambda: calls.append(1) or full)
    assert distributions_providing("lcsc_ops") == ["lcsc-ops"] and distributions_providing("torch") == ["torch"]
    assert calls == []
    assert distributions_providing("yaml") == list(dict.fromkeys(full["yaml"])) and calls == [1]
    assert distributions_providing("no_such_module_here") == []


def test_a_store_on_this_disk_gets_the_model_saved_in_place(tmp_path, monkeypatch):
    """Into a file store the model's files are saved where the store keeps them (written once, no
    temporary copy); the pickle carries no zip CRC-32s, and the version loads back."""
    import zipfile

    import lcsc_ops
    from lcsc_ops.store import pyfunc

    saved_in = []
    save = pyfunc.save_model
    monkeypatch.setattr(pyfunc, "save_model", lambda path, *a, **k: saved_in.append(path) or save(path, *a, **k))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = torch.nn.Linear(64, 64)
    version = _register(tmp_path, uri, model, "in-place")
    assert len(saved_in) == 1 and saved_in[0].startswith(str(tmp_path / "a") + "/")
    pickle = os.path.join(saved_in[0], "data", "model.pth")
    with zipfile.ZipFile(pickle) as archive:
        assert archive.testzip() is not None  # no CRC-32s written
    loaded = lcsc_ops.load(f"models:/in-place/{version}", tracking_uri=uri).model
    assert torch.equal(loaded.weight, model.weight)


def test_torch_load_does_not_check_zip_crcs(tmp_path):
    """Why a registered pickle has no CRC-32s: torch.load loads an archive whose data no longer
    matches its CRC all the same. If this fails, torch checks them now: write them again."""
    import zipfile

    path = tmp_path / "m.pth"
    torch.save(torch.zeros(256), path)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path).abs().sum() > 0


@pytest.mark.parametrize("room, staged", [(None, True), (1000, False)])
def test_a_remote_store_gets_the_model_staged_in_shared_memory_when_it_fits(tmp_path, monkeypatch, room, staged):
    """For a store elsewhere the model is saved into a temporary folder and uploaded: in /dev/shm
    while it takes at most half of the free space there (one disk write, in the store), else on
    disk; the folder is gone after. The registered version loads back either way."""
    import lcsc_ops
    from lcsc_ops.store import pyfunc, registry

    if not os.access(registry.SHM_DIR, os.W_OK):
        pytest.skip("no writable /dev/shm here")
    monkeypatch.setattr(registry, "_local_dir", lambda uri: None)  # as for an mlflow-artifacts: store
    saved_in = []
    save = pyfunc.save_model
    monkeypatch.setattr(pyfunc, "save_model", lambda path, *a, **k: saved_in.append(path) or save(path, *a, **k))
    if room is not None:
        real = os.statvfs
        monkeypatch.setattr(registry.os, "statvfs", lambda p: os.statvfs_result(
            (4096, 4096, 1000, 0, room // 4096, 0, 0, 0, 0, 255)) if p == registry.SHM_DIR else real(p))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = torch.nn.Linear(64, 64)
    version = _register(tmp_path, uri, model, "staged")
    assert saved_in and saved_in[0].startswith(registry.SHM_DIR + "/") == staged
    assert not os.path.exists(saved_in[0])
    loaded = lcsc_ops.load(f"models:/staged/{version}", tracking_uri=uri).model
    assert torch.equal(loaded.weight, model.weight)


def test_a_failed_save_leaves_no_files_and_no_version(tmp_path, monkeypatch):
    """A save that fails half-way removes what it wrote into the store, marks the LoggedModel
    FAILED and registers nothing."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException

    from lcsc_ops.store import pyfunc
    from lcsc_ops.store.tracking import client as tracking_client

    def half_then_fail(path, *a, **k):
        os.makedirs(os.path.join(path, "data"))
        open(os.path.join(path, "data", "model.pth"), "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(pyfunc, "save_model", half_then_fail)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(OSError, match="disk full"):
        _register(tmp_path, uri, torch.nn.Linear(4, 4), "failed")
    client = tracking_client(uri)
    models = client.search_logged_models(experiment_ids=[client.get_experiment_by_name("failed").experiment_id])
    assert [m.status for m in models] == [LoggedModelStatus.FAILED]
    assert not any(p.is_file() for p in (tmp_path / "a").rglob("*"))
    with pytest.raises(MlflowException):
        client.get_registered_model("failed")


def test_load_finds_a_version_of_another_store_than_the_process_default(tmp_path, monkeypatch):
    """lcsc_ops.load(models:/..., tracking_uri=X) reads X's registry even when the process's
    tracking URI (MLflow's default registry) is another store."""
    import mlflow

    import lcsc_ops
    from lcsc_ops.store import registry
    from lcsc_ops.store.tracking import client as tracking_client

    # The process's tracking and registry URIs (module globals and environment) come back at teardown:
    # registering and set_*_uri below change them, and later tests in this process use them.
    tracking_utils = mlflow.tracking._tracking_service.utils
    registry_utils = mlflow.tracking._model_registry.utils
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        old = os.environ.get(var)
        monkeypatch.setenv(var, old or "")  # records the old value (or its absence) for teardown
        if old is None:
            monkeypatch.delenv(var)
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    client = tracking_client(uri)
    model = torch.nn.Linear(4, 4)
    version = _register(tmp_path, uri, model, "elsewhere")
    client.set_registered_model_alias("elsewhere", "champion", version)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'other.db'}")
    for name in (f"models:/elsewhere/{version}", "models:/elsewhere@champion"):
        assert torch.equal(lcsc_ops.load(name, tracking_uri=uri).model.weight, model.weight)


def _register(tmp_path, uri: str, model, name: str) -> str:
    """``model`` registered as ``name`` from a new run of a new experiment in the store at ``uri``."""
    from lcsc_ops.store import registry
    from lcsc_ops.store.tracking import client as tracking_client

    client = tracking_client(uri)
    run_id = client.create_run(client.create_experiment(name, artifact_location=(tmp_path / "a").as_uri())).info.run_id
    return registry.register_model(model, name=name, spec={"factory": "torch.nn:Linear"}, tags={},
                                   run_id=run_id, tracking_uri=uri)
