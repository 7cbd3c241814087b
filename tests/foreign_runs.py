"""Runs that other tools logged, made for real on CPU: Lightning's ``MLFlowLogger(log_model="all")``,
transformers' ``MLflowCallback`` (``HF_MLFLOW_LOG_ARTIFACTS=1``), an MLflow 3 loop calling
``mlflow.pytorch.log_model(..., step=)`` (pt2 and pickle) and ``mlflow.pytorch.autolog(checkpoint=True)``.

Each trains the tiny digits U-Net (``lcsc_ops.models.unet:digits_unet``, channels 8) for a few steps,
saving a checkpoint every 2 steps (4 or more per run), into the session's sqlite store. Every builder
runs once per session (``pytest_plugins`` in conftest.py registers these fixtures) and takes seconds.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import mlflow
import pytest
import torch
from torch import nn

from lcsc_ops.evaluation.data import load_digits_images
from lcsc_ops.models.diffusion import DDIMSampler
from lcsc_ops.models.unet import digits_unet

CHANNELS = 8
FACTORY = "lcsc_ops.models.unet:digits_unet"
FACTORY_KWARGS = '{"channels": 8}'
STEPS, EVERY, BATCH = 8, 2, 16  # checkpoints at steps 2, 4, 6, 8


def _loss(net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
    return DDIMSampler(steps=2).training_loss(net, x0)


def _images() -> torch.Tensor:
    return load_digits_images()[: STEPS * BATCH]


@contextlib.contextmanager
def _no_requirements_inference():
    """MLflow infers a logged model's pip requirements by loading it in a subprocess (3-8 s a model on
    2 loaded cores); the tests skip that: it writes requirements.txt only, no file the readers use."""
    import mlflow.models

    real = mlflow.models.infer_pip_requirements
    mlflow.models.infer_pip_requirements = lambda model_uri, flavor, fallback=None, **_: list(fallback or [])
    try:
        yield
    finally:
        mlflow.models.infer_pip_requirements = real


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for one build and put the old values back."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- Lightning --------------------------------------------------------------------------------

def _lightning_module():
    import lightning as L

    class Denoiser(L.LightningModule):
        """The U-Net as ``self.net``: the checkpoint's state_dict keys start with ``net.``."""

        def __init__(self, channels: int = CHANNELS) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = digits_unet(channels=channels)

        def training_step(self, batch, batch_idx):
            loss = _loss(self.net, batch)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    return Denoiser()


def _trainer(tmp: Path, **kwargs):
    import lightning as L

    return L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp), **kwargs)


def make_lightning_run(uri: str, tmp: Path, ema: bool = False) -> str:
    """``MLFlowLogger(log_model="all")`` + ``ModelCheckpoint(every_n_train_steps=2, save_top_k=-1)``; with
    ``ema``, Lightning's ``EMAWeightAveraging`` too (the average in ``state_dict``, the live weights in
    ``current_model_state``)."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    name = "foreign-lightning-ema" if ema else "foreign-lightning"
    logger = MLFlowLogger(experiment_name=name, tracking_uri=uri, log_model="all")
    callbacks = [ModelCheckpoint(dirpath=str(tmp / "ckpt"), every_n_train_steps=EVERY, save_top_k=-1)]
    if ema:
        callbacks.append(EMAWeightAveraging(decay=0.5))
    loader = torch.utils.data.DataLoader(_images(), batch_size=BATCH)
    _trainer(tmp, logger=logger, callbacks=callbacks).fit(_lightning_module(), loader)
    return logger.run_id


def make_autolog_run(uri: str, tmp: Path) -> str:
    """``mlflow.pytorch.autolog(checkpoint=True, checkpoint_save_best_only=False)`` around a Lightning
    fit of 4 epochs of 2 steps: ``checkpoints/epoch_<n>/checkpoint.pth`` each epoch, and (autolog's default
    ``log_models=True``) the final model as a LoggedModel of the run."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("foreign-autolog")
    mlflow.pytorch.autolog(checkpoint=True, checkpoint_save_best_only=False)
    try:
        images = _images()
        loader = torch.utils.data.DataLoader(images, batch_size=len(images) // EVERY)  # 2 steps an epoch
        with _no_requirements_inference(), mlflow.start_run() as run:
            _trainer(tmp, max_epochs=STEPS // EVERY, logger=False, enable_checkpointing=False).fit(
                _lightning_module(), loader)
    finally:
        mlflow.pytorch.autolog(disable=True)
    return run.info.run_id


# ---- MLflow 3 loop --------------------------------------------------------------------------------

class _Fixed(nn.Module):
    """The U-Net behind a one-input forward (the timestep fixed), as ``torch.export`` needs a tensor per
    input; its keys start with ``net.``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, torch.full((x.shape[0],), 10, dtype=torch.long))


def make_mlflow3_run(uri: str, serialization_format: str) -> str:
    """A plain loop logging ``log_model(model, name=f"checkpoint-{step}", step=step)`` every 2 steps."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(f"foreign-mlflow3-{serialization_format}")
    torch.manual_seed(0)
    model = _Fixed(digits_unet(channels=CHANNELS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = _images()
    example = images[:2].numpy()
    with mlflow.start_run() as run:
        for step in range(1, STEPS + 1):
            loss = _loss(model.net, images[(step - 1) * BATCH: step * BATCH])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mlflow.log_metric("loss", loss.item(), step=step)
            if step % EVERY == 0:
                mlflow.pytorch.log_model(model, name=f"checkpoint-{step}", step=step, pip_requirements=[],
                                         serialization_format=serialization_format,
                                         input_example=example if serialization_format == "pt2" else None)
    return run.info.run_id


# ---- transformers ----------------------------------------------------------------------------------

def _hf_classes():
    from transformers import PretrainedConfig, PreTrainedModel

    class DenoiserConfig(PretrainedConfig):
        model_type = "lcsc-digits-denoiser"

        def __init__(self, channels: int = CHANNELS, **kwargs) -> None:
            self.channels = channels
            super().__init__(**kwargs)

    class DenoiserModel(PreTrainedModel):
        """A ``PreTrainedModel`` holding the U-Net as ``self.net``; forward returns the DDPM loss."""

        config_class = DenoiserConfig

        def __init__(self, config: DenoiserConfig) -> None:
            super().__init__(config)
            torch.manual_seed(0)
            self.net = digits_unet(channels=config.channels)

        def forward(self, pixel_values: torch.Tensor, **_):
            return {"loss": _loss(self.net, pixel_values)}

    return DenoiserConfig, DenoiserModel


class _Pixels(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.images[i]}


def make_transformers_run(uri: str, tmp: Path) -> str:
    """``Trainer`` with ``report_to=["mlflow"]``, ``save_steps=2`` and ``HF_MLFLOW_LOG_ARTIFACTS=1``."""
    from transformers import Trainer, TrainingArguments

    config_cls, model_cls = _hf_classes()
    args = TrainingArguments(output_dir=str(tmp / "out"), max_steps=STEPS, save_steps=EVERY, logging_steps=EVERY,
                             per_device_train_batch_size=BATCH, report_to=["mlflow"], use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=0, learning_rate=1e-3)
    mlflow.set_tracking_uri(uri)
    with _env(HF_MLFLOW_LOG_ARTIFACTS="1", MLFLOW_EXPERIMENT_NAME="foreign-transformers",
              MLFLOW_TRACKING_URI=uri), _no_requirements_inference():
        trainer = Trainer(model=model_cls(config_cls()), args=args, train_dataset=_Pixels(_images()))
        trainer.train()
        run_id = mlflow.last_active_run().info.run_id
    return run_id


# ---- the same layouts written with plain mlflow, for the contract suite (tests/test_sources.py) ----------
# Each writes a run whose checkpoint at step s holds state_of(s) (keys under "net."), fast enough to make per test.

StateOf = Callable[[int], dict]


def _run(uri: str, name: str) -> tuple[Any, str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sources-contract")
    exp_id = exp.experiment_id if exp else client.create_experiment("sources-contract")
    return client, exp_id, client.create_run(exp_id, run_name=name).info.run_id


def _prefixed(state: dict) -> dict:
    return {"net." + k: v for k, v in state.items()}


def write_autolog_layout(uri: str, tmp: Path, steps: list[int], state_of: StateOf) -> tuple[str, dict[int, str]]:
    """``checkpoints/epoch_<i>/checkpoint.pth`` (Lightning's dict) + ``checkpoint_metrics.json``, as autolog."""
    client, _, run_id = _run(uri, "autolog")
    paths = {}
    for epoch, step in enumerate(steps):
        folder = tmp / f"epoch_{epoch}"
        folder.mkdir()
        torch.save({"state_dict": _prefixed(state_of(step)), "global_step": step, "epoch": epoch,
                    "optimizer_states": [{"state": {}}]}, folder / "checkpoint.pth")
        (folder / "checkpoint_metrics.json").write_text(json.dumps({"loss": 0.5, "epoch": epoch, "global_step": step}))
        client.log_artifacts(run_id, str(folder), f"checkpoints/epoch_{epoch}")
        paths[step] = f"checkpoints/epoch_{epoch}/checkpoint.pth"
    client.set_tag(run_id, "mlflow.latest_checkpoint_artifact", paths[steps[-1]])
    client.set_terminated(run_id)
    return run_id, paths


def _logged_model(client, exp_id: str, run_id: str, name: str, folder: Path, step: int) -> str:
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id)
    client.log_model_artifacts(model.model_id, str(folder))
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    return model.model_id


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def write_transformers_layout(uri: str, tmp: Path, steps: list[int], state_of: StateOf,
                              mlflow2: bool = False) -> tuple[str, dict[int, str]]:
    """LoggedModels ``checkpoint-<s>`` (step 0, as MLflowCallback leaves them) holding the checkpoint folder under
    ``artifacts/checkpoint-<s>/``, its ``training_args.bin`` a pickle that would run a command if loaded; with
    ``mlflow2``, the same folders in the run's own artifacts under ``checkpoint-<s>/`` (MLflow 2's place)."""
    import pickle

    from safetensors.torch import save_file

    client, exp_id, run_id = _run(uri, "transformers")
    paths = {}
    for step in steps:
        folder = tmp / f"hf-{step}"
        ckpt = folder / "artifacts" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        save_file(_prefixed(state_of(step)), ckpt / "model.safetensors", metadata={"format": "pt"})
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        (ckpt / "training_args.bin").write_bytes(pickle.dumps(_Evil()))
        torch.save({"state": {}}, ckpt / "optimizer.pt")
        if mlflow2:
            (folder / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n")
            client.log_artifacts(run_id, str(folder), f"checkpoint-{step}")
            paths[step] = f"checkpoint-{step}/artifacts/checkpoint-{step}/model.safetensors"
            continue
        model_id = _logged_model(client, exp_id, run_id, f"checkpoint-{step}", folder, 0)
        paths[step] = f"{model_id}/artifacts/checkpoint-{step}/model.safetensors"
    client.set_terminated(run_id)
    return run_id, paths


_PT2: dict[tuple[int, str], bytes] = {}  # (step, state digest) -> archive bytes: torch.export takes seconds


def _pt2_bytes(step: int, state: dict, tmp: Path) -> bytes:
    digest = str(sum(float(v.double().sum()) for v in state.values()))
    if (step, digest) not in _PT2:
        net = digits_unet(channels=CHANNELS)
        net.load_state_dict(state)
        path = tmp / f"export-{step}.pt2"
        torch.export.save(torch.export.export(_Fixed(net), (torch.zeros(2, 1, 8, 8),)), path)
        _PT2[step, digest] = path.read_bytes()
    return _PT2[step, digest]


def write_mlflow3_layout(uri: str, tmp: Path, steps: list[int], state_of: StateOf,
                         serialization_format: str = "pt2") -> tuple[str, dict[int, str]]:
    """LoggedModels ``checkpoint-<s>`` with step s in the run's outputs, holding ``data/model.pt2`` (a
    ``torch.export`` archive) or ``data/model.pth`` (the pickled module), as ``mlflow.pytorch.log_model``."""
    client, exp_id, run_id = _run(uri, f"mlflow3-{serialization_format}")
    paths = {}
    for step in steps:
        folder = tmp / f"m3-{step}"
        (folder / "data").mkdir(parents=True)
        if serialization_format == "pt2":
            (folder / "data" / "model.pt2").write_bytes(_pt2_bytes(step, state_of(step), tmp))
        else:
            net = digits_unet(channels=CHANNELS)
            net.load_state_dict(state_of(step))
            torch.save(_Fixed(net), folder / "data" / "model.pth")
        name = "model.pt2" if serialization_format == "pt2" else "model.pth"
        model_id = _logged_model(client, exp_id, run_id, f"checkpoint-{step}", folder, step)
        paths[step] = f"{model_id}/data/{name}"
    client.set_terminated(run_id)
    return run_id, paths


# ---- session fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def lightning_run(store, tmp_path_factory) -> str:
    return make_lightning_run(store["uri"], tmp_path_factory.mktemp("lightning"))


@pytest.fixture(scope="session")
def lightning_ema_run(store, tmp_path_factory) -> str:
    return make_lightning_run(store["uri"], tmp_path_factory.mktemp("lightning-ema"), ema=True)


@pytest.fixture(scope="session")
def autolog_run(store, tmp_path_factory) -> str:
    return make_autolog_run(store["uri"], tmp_path_factory.mktemp("autolog"))


@pytest.fixture(scope="session")
def mlflow3_pt2_run(store) -> str:
    return make_mlflow3_run(store["uri"], "pt2")


@pytest.fixture(scope="session")
def mlflow3_pickle_run(store) -> str:
    return make_mlflow3_run(store["uri"], "pickle")


@pytest.fixture(scope="session")
def transformers_run(store, tmp_path_factory) -> str:
    return make_transformers_run(store["uri"], tmp_path_factory.mktemp("transformers"))
