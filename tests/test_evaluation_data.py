"""Reference data sets: the bundled digits and the classifiers' split."""
from __future__ import annotations

import pytest
import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.data import DATASETS, digits_split, load_dataset


def test_digits_shape_dtype_and_range():
    x = load_dataset("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # 0..16 mapped linearly: every pixel sits on the grid -1 + k/8.
    assert torch.equal((x + 1) * 8, ((x + 1) * 8).round())
    assert "digits" in DATASETS


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(LcscError, match=r"unknown data set 'cifar' \(known: digits\)"):
        load_dataset("cifar")


def test_split_is_stratified_deterministic_and_disjoint():
    x_tr, y_tr, x_te, y_te = digits_split(seed=0)
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == 450
    assert x_tr.shape[1:] == (1, 8, 8) and y_tr.dtype == torch.int64
    # Stratified: each class's share in the test part is within one image of 25%.
    counts_all = torch.bincount(torch.cat([y_tr, y_te]), minlength=10)
    assert (torch.bincount(y_te, minlength=10) - counts_all * 0.25).abs().max() <= 1
    again = digits_split(seed=0)
    assert torch.equal(again[2], x_te) and torch.equal(again[3], y_te)
    assert not torch.equal(digits_split(seed=1)[3], y_te)
    # No test image appears in the train part (rows compared as flattened pixel vectors).
    all_x = load_dataset("digits").flatten(1)
    assert torch.equal(torch.cat([x_tr, x_te]).flatten(1).sort(0).values, all_x.sort(0).values)
