"""Reference image data sets, looked up by name, as float32 tensors in [-1, 1].

The only built-in set is scikit-learn's bundled 8x8 digits (no download), the test bed
of the design notes. Real-image sets for natural-image models (CIFAR-10, ImageNet-64)
are registered in :data:`DATASETS` by whoever has them on disk; every loader returns
all images as one (N, C, H, W) float32 tensor in [-1, 1].
"""
from __future__ import annotations

from typing import Callable

import torch

from lcsc_ops.errors import LcscError


def _digits_arrays():
    # Imported lazily: only the digits need scikit-learn, and it is slow to import.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def _to_unit_range(images) -> torch.Tensor:
    # Pixel values are integers 0..16; map them linearly onto [-1, 1] like image models expect.
    x = torch.as_tensor(images, dtype=torch.float32)
    return (x / 8.0 - 1.0).unsqueeze(1)


def load_digits_images() -> torch.Tensor:
    """All 1,797 scikit-learn digits as float32 (1797, 1, 8, 8) in [-1, 1]."""
    images, _ = _digits_arrays()
    return _to_unit_range(images)


DATASETS: dict[str, Callable[[], torch.Tensor]] = {"digits": load_digits_images}


def load_dataset(name: str) -> torch.Tensor:
    """Load the reference images of the data set registered as ``name`` (see :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise LcscError(f"unknown data set {name!r} (known: {', '.join(sorted(DATASETS))})") from None
    return loader()


def digits_split(seed: int = 0, test_fraction: float = 0.25
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified, deterministic train/test split of the digits with their labels.

    Returns ``(x_train, y_train, x_test, y_test)``: images as float32 (N, 1, 8, 8) in
    [-1, 1] and labels as int64 (N,). The same ``seed`` always gives the same split; the
    feature classifiers are trained on the train part of ``seed=0`` and their held-out
    accuracy is measured on its test part.
    """
    from sklearn.model_selection import train_test_split

    images, labels = _digits_arrays()
    idx_train, idx_test = train_test_split(
        range(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels)
    x, y = _to_unit_range(images), torch.as_tensor(labels, dtype=torch.int64)
    tr, te = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return x[tr], y[tr], x[te], y[te]
