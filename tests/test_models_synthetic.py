"""lcsc_ops.models.synthetic: a model of a given size that a run's spec can name."""
from __future__ import annotations

import pytest
import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.models.synthetic import linear_stack, stack_shape
from lcsc_ops.spec import ModelSpec


@pytest.mark.parametrize("params", [10 ** 5, 10 ** 6, 10 ** 9])
def test_stack_shape_holds_about_the_asked_parameters(params):
    layers, width = stack_shape(params)
    total = layers * (width * width + width)
    assert total <= params and total >= 0.97 * params


def test_built_model_has_the_size_and_dtype():
    model = linear_stack(100_000, dtype="bfloat16")
    n = sum(p.numel() for p in model.parameters())
    assert 0.97 * 100_000 <= n <= 100_000
    assert all(p.dtype is torch.bfloat16 and not p.is_meta and not p.any() for p in model.parameters())


def test_meta_device_allocates_nothing():
    with torch.device("meta"):
        model = linear_stack(10 ** 9)
    assert all(p.is_meta for p in model.parameters())


def test_a_run_spec_may_name_it_and_bad_sizes_are_one_line():
    spec = ModelSpec.from_dict({"factory": "lcsc_ops.models.synthetic:linear_stack", "kwargs": {"params": 5000},
                                "dataset": None, "image_shape": None}, origin="run x")
    assert isinstance(spec.build(), torch.nn.Sequential)  # the package's own factory: trusted
    with pytest.raises(LcscError, match="params must be an integer"):
        linear_stack(10)
    with pytest.raises(LcscError, match="dtype must be one of"):
        linear_stack(1000, dtype="int8")
