"""Feature extractors for FID, looked up by name in :data:`FEATURE_EXTRACTORS`.

Every extractor is an ``nn.Module`` taking images in [-1, 1] shaped (N, C, H, W) and
returning (N, D) float features, with an int ``num_features`` = D: what torchmetrics'
``FrechetInceptionDistance(feature=<module>)`` needs to run offline.

Two digits classifiers of different architecture and seed ship with the package (weights
in ``lcsc_ops/assets``, from :mod:`lcsc_ops.evaluation.train_extractors`): FID in the first's
64-d penultimate layer scores the digits test bed; the second checks that a search winner
is not specific to the features it was scored with. Natural images use the standard
InceptionV3 (torch-fidelity's port, through torchmetrics).
"""
from __future__ import annotations

import hashlib
import os
from importlib import resources
from typing import Any, Callable

import torch
from torch import nn

from lcsc_ops.errors import LcscError

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


class DigitsCNN(nn.Module):
    """Conv classifier for 8x8 digits; ``forward`` returns its 64-d penultimate features.

    8x8x32 -> 8x8x64 -> pool -> 4x4x128 -> pool -> 512 -> 64 (features) -> 10 (logits);
    held-out accuracy of the shipped weights: ``lcsc_ops/assets/digits_extractors.json``.
    """

    num_features: int = 64

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * 2 * 2, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10); used to train the network and to test its accuracy."""
        return self.head(self.body(x))


class DigitsMLP(nn.Module):
    """Fully connected classifier for 8x8 digits; ``forward`` returns its 64-d penultimate features.

    64 -> 256 -> 128 -> 64 (features) -> 10 (logits), GELU, dropout while training. No
    convolution, so its features share no inductive bias with :class:`DigitsCNN`.
    """

    num_features: int = 64

    def __init__(self, in_pixels: int = 64, num_classes: int = 10, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_pixels, 256), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(128, self.num_features), nn.GELU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.body(x))


class InceptionFeatures(nn.Module):
    """The standard FID InceptionV3 pool features (2048-d) for images in [-1, 1].

    Wraps torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the TF graph),
    which wants uint8 RGB: images are quantised to 0..255 and grey images repeated to
    three channels; resizing to 299x299 happens inside the network.
    """

    num_features: int = 2048

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x)


def _asset_bytes(filename: str) -> bytes:
    return resources.files("lcsc_ops").joinpath("assets", filename).read_bytes()


def _load_digits(cls: type[nn.Module], filename: str) -> nn.Module:
    from safetensors.torch import load as load_safetensors

    model = cls()
    try:
        state = load_safetensors(_asset_bytes(filename))
    except FileNotFoundError:
        raise LcscError(f"feature extractor weights missing from the package: lcsc_ops/assets/{filename} "
                        "(regenerate with: python -m lcsc_ops.evaluation.train_extractors)") from None
    model.load_state_dict(state)
    return model


def _build_digits_cnn(**_: Any) -> nn.Module:
    return _load_digits(DigitsCNN, "digits_cnn.safetensors")


def _build_digits_mlp(**_: Any) -> nn.Module:
    return _load_digits(DigitsMLP, "digits_mlp.safetensors")


def _build_inception(*, inception_weights: str | None = None, **_: Any) -> nn.Module:
    # Imported here: torch-fidelity is optional and only natural-image models need it.
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise LcscError("the 'inception' feature extractor needs torch-fidelity (pip install torch-fidelity); "
                        f"on machines without network also pass --inception-weights PATH to {INCEPTION_WEIGHTS_FILE}")
    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise LcscError(f"inception weights not found: {inception_weights}")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=inception_weights)
    except (OSError, RuntimeError) as exc:  # no network for the download, or a bad weights file
        raise LcscError(f"cannot load the InceptionV3 weights ({exc}); "
                        f"pass --inception-weights PATH to a local {INCEPTION_WEIGHTS_FILE}") from None
    return InceptionFeatures(net)


# Factories take keyword options and ignore the ones they do not use.
FEATURE_EXTRACTORS: dict[str, Callable[..., nn.Module]] = {
    "digits-cnn": _build_digits_cnn,
    "digits-mlp": _build_digits_mlp,
    "inception": _build_inception,
}

# dataset -> (default extractor, second independent extractor); anything else uses Inception.
_EXTRACTORS_FOR_DATASET: dict[str, tuple[str, str]] = {"digits": ("digits-cnn", "digits-mlp")}
# dataset -> an extractor whose ``classify`` labels the data set's classes (class-conditional accuracy).
_CLASSIFIER_FOR_DATASET: dict[str, str] = {"digits": "digits-cnn"}


def build_extractor(name: str, *, device: str | torch.device = "cpu",
                    inception_weights: str | None = None) -> nn.Module:
    """Build the feature extractor registered as ``name``, in eval mode with gradients off.

    The digits extractors load their shipped weights from the package; ``"inception"``
    needs torch-fidelity and either network access or ``inception_weights`` (a local
    copy of the torch-fidelity InceptionV3 weights).
    """
    try:
        factory = FEATURE_EXTRACTORS[name]
    except KeyError:
        raise LcscError(f"unknown feature extractor {name!r} "
                        f"(known: {', '.join(sorted(FEATURE_EXTRACTORS))})") from None
    module = factory(inception_weights=inception_weights)
    module.eval().requires_grad_(False)
    return module.to(device)


def extractor_fingerprint(name: str, module: nn.Module) -> str:
    """A short stable hash of an extractor's identity and weights, used as a cache key.

    Hashes the name, the class and every state-dict tensor (name, dtype, shape, bytes),
    so retrained or swapped weights never reuse reference statistics of the old ones;
    the file's metadata is not part of it. 16 hex digits of SHA-256.
    """
    h = hashlib.sha256(f"{name}\0{type(module).__qualname__}\0".encode())
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def default_extractor_for(dataset: str) -> str:
    """The extractor that scores the search for ``dataset`` (``"digits"`` -> ``"digits-cnn"``)."""
    return _EXTRACTORS_FOR_DATASET.get(dataset, ("inception", "inception"))[0]


def classifier_for(dataset: str | None) -> str | None:
    """The extractor whose ``classify`` labels ``dataset``'s classes (``"digits"`` -> ``"digits-cnn"``);
    None where there is none (Inception's classes are ImageNet's, not the data set's)."""
    return _CLASSIFIER_FOR_DATASET.get(dataset) if dataset is not None else None


def second_extractor_for(dataset: str) -> str:
    """An independent extractor to check winners on (``"digits"`` -> ``"digits-mlp"``).

    Natural images have only Inception here, so the check is then not independent.
    """
    return _EXTRACTORS_FOR_DATASET.get(dataset, ("inception", "inception"))[1]
