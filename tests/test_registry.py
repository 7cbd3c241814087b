"""pip requirements of a registered model: what unpickling it needs."""
from __future__ import annotations

from importlib import metadata

import pytest
import torch

from lcsc_ops.models.unet import digits_unet
from lcsc_ops.tracking.registry import model_requirements


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


def test_child_runs_wait_for_the_next_objective_then_are_all_written(store):
    """A finished trial's child run is written while the next trial scores (not while Optuna
    asks for it), and flush() writes whatever is still pending."""
    import mlflow
    import optuna

    from lcsc_ops.tracking.registry import TrialRunLogger

    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.create_experiment("gate")
    parent = client.create_run(exp).info.run_id
    logger = TrialRunLogger(parent, tracking_uri=store["uri"])
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("z00", -1, 1) ** 2, n_trials=2)

    def children() -> int:
        return len(client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'"))

    logger(study, study.trials[0])
    done = logger._pending[-1]
    assert not done.done() and children() == 0  # held: the worker waits for the next objective
    logger.objective_started()
    done.result(timeout=60)
    assert children() == 1
    logger(study, study.trials[1])
    logger.close()  # flush lets the last one go
    assert children() == 2
