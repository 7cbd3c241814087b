"""Shared fixtures: an isolated MLflow store per session and one tiny trained run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Session fixtures of runs that Lightning, transformers and MLflow 3 logged (built once, on first use).
pytest_plugins = ["tests.foreign_runs"]

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# In-process CLI calls would leave a watchdog per call waiting for pytest to exit; tests that
# kill a real optimize process turn it back on (LCSC_OPS_WATCHDOG=1 in its environment).
os.environ["LCSC_OPS_WATCHDOG"] = "0"

TINY_TRAIN = dict(steps=60, batch_size=32, channels=8, checkpoint_every=10, sampler_steps=2, log_every=10,
                  warmup_steps=5, experiment="tests", model_name="tiny-ddpm")


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> dict:
    """A fresh sqlite MLflow store + artifact root + Optuna journal file (the default kind) + checkpoint
    cache, for the whole session."""
    root = tmp_path_factory.mktemp("store")
    old = os.getcwd()
    os.chdir(root)  # MLflow's default artifact root (./mlruns) is relative to the working directory
    os.environ["LCSC_OPS_CACHE"] = str(root / "cache")
    info = {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "storage": str(root / "optuna.journal"),
            "cache": root / "cache"}
    yield info
    os.chdir(old)


@pytest.fixture(scope="session")
def tiny_run(store) -> str:
    """Run id of a 60-step training of a tiny U-Net, checkpoints (raw + EMA) every 10 steps."""
    from lcsc_ops.training import TrainConfig, train

    return train(TrainConfig(tracking_uri=store["uri"], **TINY_TRAIN))


def tiny_optimize_config(run_id: str, store: dict, **overrides):
    from lcsc_ops.pipeline.config import OptimizeConfig

    settings = dict(run_id=run_id, window=4, basis="both", n_trials=5, search_samples=64, final_samples=64,
                    final_seeds=2, top_k=2, ema_grid=3, batch_size=64, device="cpu", tracking_uri=store["uri"],
                    storage=store["storage"])
    settings.update(overrides)
    return OptimizeConfig(**settings)


@pytest.fixture
def root(store) -> Path:
    return store["root"]
