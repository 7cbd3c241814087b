"""pip requirements of a registered model: what unpickling it needs."""
from __future__ import annotations

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
