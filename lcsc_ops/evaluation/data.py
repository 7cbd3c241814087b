"""Reference image data sets, looked up by name or import path, as float32 tensors in [-1, 1].

The only built-in set is scikit-learn's bundled 8x8 digits (no download), the test bed
of the design notes. Real-image sets for natural-image models (CIFAR-10, ImageNet-64)
are either registered in :data:`DATASETS` by whoever has them on disk, or named in the
model spec by import path, like factories: ``dataset="my_pkg.data:load_images"``. Every
loader returns all images as one (N, C, H, W) float tensor in [-1, 1]. A loader may carry
``__lcsc_version__`` (bump it when its images change): the reference-statistics cache key
holds it, with a hash of the loader module's source.
"""
from __future__ import annotations

from typing import Callable

import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.spec import brief_repr, import_object, is_import_path, source_sha256


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


def load_digits_labels() -> torch.Tensor:
    """The classes (0..9) of :func:`load_digits_images`, int64 (1797,)."""
    _, labels = _digits_arrays()
    return torch.as_tensor(labels, dtype=torch.int64)


DATASETS: dict[str, Callable[[], torch.Tensor]] = {"digits": load_digits_images}
# Class labels of registered data sets, in the order of their images (conditional training).
DATASET_LABELS: dict[str, Callable[[], torch.Tensor]] = {"digits": load_digits_labels}


_PATH_FORM = ("an import path 'module:callable' (e.g. 'my_pkg.data:load_images') returning a float tensor (N, C, H, W) "
              "in [-1, 1]")


def _accepted() -> str:
    return f"(a data set is a registered name: {', '.join(sorted(DATASETS))}; or {_PATH_FORM})"


def resolve_dataset(name: str, what: str = "dataset") -> Callable[[], torch.Tensor]:
    """The loader of ``name``: a registered name (:data:`DATASETS`) or an import path
    ``"module:callable"`` (imported, not called). LcscError (one line naming ``what``, the
    option or field, and the accepted forms) otherwise."""
    if not isinstance(name, str) or not name:
        raise LcscError(f"{what}: not a data set name {brief_repr(name)} {_accepted()}")
    if name in DATASETS:
        return DATASETS[name]
    if not is_import_path(name):
        raise LcscError(f"{what}: unknown data set {name!r} (known: {', '.join(sorted(DATASETS))}); or {_PATH_FORM}")
    try:
        loader = import_object(name)
    except LcscError as exc:
        raise LcscError(f"{what}: {exc} {_accepted()}") from None
    if not callable(loader):
        raise LcscError(f"{what}: {name!r} is not callable (got {type(loader).__name__}) {_accepted()}")
    return loader


def dataset_identity(name: str) -> dict[str, str]:
    """What, besides ``name``, decides a data set's images (a reference-statistics cache key part):
    the loader's ``__lcsc_version__`` if it has one, and for an import path the SHA-256 of the
    loader module's source. Empty for the built-in digits, so their cache files stay valid."""
    loader = resolve_dataset(name)
    ident = {}
    if getattr(loader, "__lcsc_version__", None) is not None:
        ident["dataset_version"] = str(loader.__lcsc_version__)
    if is_import_path(name):
        ident["dataset_source"] = source_sha256(loader)
    return ident


def check_images(images: object, name: str, what: str = "dataset") -> torch.Tensor:
    """``images`` as float32 if it is a float tensor (N >= 2, C, H, W), finite, in [-1, 1]."""
    if not (isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise LcscError(f"{what}: loader {name!r} must return a float tensor (N, C, H, W), got {got}"
                        + (f" {images.dtype}" if isinstance(images, torch.Tensor) else ""))
    if len(images) < 2 or not torch.isfinite(images).all():
        raise LcscError(f"{what}: loader {name!r} must return at least 2 finite images, got {len(images)}"
                        + ("" if torch.isfinite(images).all() else " with non-finite values"))
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
        raise LcscError(f"{what}: loader {name!r} returned values in [{lo:.3g}, {hi:.3g}], expected [-1, 1]")
    return images.float()


def load_dataset(name: str, what: str = "dataset") -> torch.Tensor:
    """Load the reference images of ``name``: a data set registered in :data:`DATASETS` or an
    import path ``"module:callable"`` (whose result is checked: a float (N, C, H, W) tensor in [-1, 1])."""
    loader = resolve_dataset(name, what)
    images = loader()
    return images if name in DATASETS else check_images(images, name, what)


def load_labels(name: str, what: str = "dataset") -> torch.Tensor:
    """The class labels (int64, 0..K-1) of data set ``name``, one per image; LcscError for a data set
    without labels (a class-conditional model trains only on a labelled one)."""
    if name not in DATASET_LABELS:
        raise LcscError(f"{what}: data set {name!r} has no class labels (labelled: "
                        f"{', '.join(sorted(DATASET_LABELS))})")
    return DATASET_LABELS[name]()


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
