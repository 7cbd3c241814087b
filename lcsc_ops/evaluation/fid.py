"""FID in three steps, as EDM2's ``calculate_metrics.py``: statistics, cache, distance.

1. :func:`compute_reference_stats` runs the real images through a feature extractor once
   and keeps torchmetrics' real-side sums (:class:`ReferenceStats`).
2. :class:`ReferenceCache` stores them on disk, keyed by data set (its name and, for a
   loader named by import path, its version and source hash), extractor name, extractor
   fingerprint and sample count, so every later search reuses them.
3. :class:`FIDScorer` loads them into a torchmetrics ``FrechetInceptionDistance`` once
   and, per candidate, samples from a fixed noise, extracts features of the fake side
   only and returns the Fréchet distance.

A scorer is called as ``scorer(model, num_samples, seed) -> float`` (lower is better);
that is also the contract of a user's own evaluator, loaded with :func:`load_evaluator`.
A class-conditional model is sampled with the balanced labels of the seed
(:func:`~lcsc_ops.evaluation.conditional.make_labels`) and classifier-free guidance, and
scored against the whole reference set.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.conditional import make_labels
from lcsc_ops.evaluation.data import dataset_identity, load_dataset
from lcsc_ops.evaluation.features import extractor_fingerprint
from lcsc_ops.models.sampling import Guidance, guidance_for
from lcsc_ops.spec import Conditioning, import_object

# Which reference images a ``num_samples`` subset takes: a fixed permutation, never the seed
# of the fake side, so the real statistics stay the same across runs and searches.
_SUBSET_SEED = 0


class _Float32Features(nn.Module):
    """The extractor, with 16-bit features (bf16 autocast, ``--search-precision bf16``) cast to float32.

    torchmetrics accumulates features in float64 but casts the Fréchet distance back to the
    features' dtype: from bf16 features every score would come back rounded to 8 bits.
    float32 and float64 features pass through untouched, so statistics are unchanged.
    """

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor, self.num_features = extractor, extractor.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.extractor(x)
        return features.float() if features.dtype.itemsize < 4 else features


def _make_metric(extractor: nn.Module, device: str | torch.device) -> FrechetInceptionDistance:
    # reset_real_features=False: reset() then clears only the fake side (checked in the
    # torchmetrics 1.9 source: it deep-copies the real states around Metric.reset()).
    if not isinstance(getattr(extractor, "num_features", None), int):
        raise LcscError(f"feature extractor {type(extractor).__name__} lacks an int 'num_features' attribute")
    metric = FrechetInceptionDistance(feature=_Float32Features(extractor), reset_real_features=False)
    return metric.to(device)


@dataclass(eq=False)
class ReferenceStats:
    """Real-side FID statistics: torchmetrics' ``real_features_*`` states, on the CPU.

    ``features_sum`` is the (D,) float64 sum of features, ``features_cov_sum`` the (D, D)
    float64 sum of their outer products, ``num_samples`` the image count. ``metadata``
    (strings) travels inside the saved file: the cache records its key there.
    """

    features_sum: torch.Tensor
    features_cov_sum: torch.Tensor
    num_samples: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_features(self) -> int:
        return int(self.features_sum.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        return self.features_sum / self.num_samples

    @property
    def cov(self) -> torch.Tensor:
        """Unbiased covariance, exactly as torchmetrics computes it from the sums."""
        mu = self.mean.unsqueeze(0)
        return (self.features_cov_sum - self.num_samples * mu.t().mm(mu)) / (self.num_samples - 1)

    @classmethod
    def from_metric(cls, metric: FrechetInceptionDistance, metadata: dict[str, str] | None = None) -> "ReferenceStats":
        """Copy the real-side states out of a torchmetrics FID metric."""
        return cls(features_sum=metric.real_features_sum.detach().double().cpu().clone(),
                   features_cov_sum=metric.real_features_cov_sum.detach().double().cpu().clone(),
                   num_samples=int(metric.real_features_num_samples), metadata=dict(metadata or {}))

    def load_into(self, metric: FrechetInceptionDistance) -> None:
        """Set the real-side states of ``metric`` (on its device) to these statistics."""
        if metric.real_features_sum.shape != self.features_sum.shape:
            raise LcscError(f"reference statistics have {self.num_features} features, "
                            f"the feature extractor gives {metric.real_features_sum.shape[0]}")
        device = metric.real_features_sum.device
        metric.real_features_sum = self.features_sum.to(device, torch.float64).clone()
        metric.real_features_cov_sum = self.features_cov_sum.to(device, torch.float64).clone()
        metric.real_features_num_samples = torch.tensor(self.num_samples, dtype=torch.long, device=device)

    def save(self, path: str | Path) -> None:
        """Write to ``path`` (safetensors) through a temporary file and an atomic rename."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features_sum": self.features_sum.contiguous(),
                   "features_cov_sum": self.features_cov_sum.contiguous(),
                   "num_samples": torch.tensor(self.num_samples, dtype=torch.int64)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=dict(self.metadata))
            os.replace(tmp, path)  # a crash leaves the old file or none, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return cls(features_sum=f.get_tensor("features_sum"),
                       features_cov_sum=f.get_tensor("features_cov_sum"),
                       num_samples=int(f.get_tensor("num_samples")), metadata=dict(metadata))


def compute_reference_stats(images: torch.Tensor, extractor: nn.Module, *, batch_size: int = 500,
                            device: str | torch.device = "cpu") -> ReferenceStats:
    """Real-side FID statistics of ``images`` ((N, C, H, W) in [-1, 1]) under ``extractor``.

    Runs torchmetrics' own ``update(real=True)`` batch by batch, so the sums are exactly
    the states a ``FrechetInceptionDistance`` would hold. The extractor (a submodule of
    the metric) is moved to ``device``.
    """
    if len(images) < 2:
        raise LcscError(f"FID reference statistics need at least 2 images, got {len(images)}")
    metric = _make_metric(extractor, device)
    with torch.no_grad():
        for batch in images.split(batch_size):
            metric.update(batch.to(device), real=True)
    return ReferenceStats.from_metric(metric)


class ReferenceCache:
    """Reference statistics on disk under ``root``, computed on a miss and reused after.

    The key is (data set and its identity, extractor name, extractor fingerprint, sample
    count); it names the file and is also written into the file's metadata, which is checked
    on a hit. The identity (:func:`~lcsc_ops.evaluation.data.dataset_identity`) is empty for
    the built-in digits; a data-set loader's ``__lcsc_version__`` or source change is a new key.
    """

    def __init__(self, root: str | Path, *, batch_size: int = 500, device: str | torch.device = "cpu") -> None:
        self.root, self.batch_size, self.device = Path(root), batch_size, device

    def path_for(self, dataset: str, extractor_name: str, fingerprint: str, num_samples: int | None,
                 identity: dict[str, str] | None = None) -> Path:
        safe = lambda s: re.sub(r"[^A-Za-z0-9._-]+", "_", s)  # noqa: E731
        count = "all" if num_samples is None else str(int(num_samples))
        if identity:  # a data set with a version or a loader's source: one file per identity
            dataset += "@" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return self.root / f"{safe(dataset)}__{safe(extractor_name)}__{fingerprint}__{count}.safetensors"

    def get(self, dataset: str, extractor_name: str, extractor: nn.Module, *,
            num_samples: int | None = None) -> tuple[ReferenceStats, Path, bool]:
        """Return ``(stats, cache file, hit)`` for ``dataset`` under ``extractor``.

        ``num_samples=None`` uses the whole data set; a number takes a fixed random subset
        of that size (the same subset every time).
        """
        fingerprint = extractor_fingerprint(extractor_name, extractor)
        identity = dataset_identity(dataset)
        path = self.path_for(dataset, extractor_name, fingerprint, num_samples, identity)
        key = {"dataset": dataset, "extractor": extractor_name, "fingerprint": fingerprint,
               "num_samples": "all" if num_samples is None else str(int(num_samples)), **identity}
        if path.is_file():
            try:
                stats = ReferenceStats.load(path)
            except Exception:  # unreadable (e.g. truncated by hand): recompute and overwrite
                stats = None
            if stats is not None and all(stats.metadata.get(k) == v for k, v in key.items()):
                return stats, path, True
        images = load_dataset(dataset)
        if num_samples is not None:
            if not 2 <= num_samples <= len(images):
                raise LcscError(f"reference sample count must be in 2..{len(images)} for {dataset!r}, got {num_samples}")
            gen = torch.Generator().manual_seed(_SUBSET_SEED)
            images = images[torch.randperm(len(images), generator=gen)[:num_samples]]
        stats = compute_reference_stats(images, extractor, batch_size=self.batch_size, device=self.device)
        stats.metadata = key
        stats.save(path)
        return stats, path, False


def make_noise(num_samples: int, image_shape: tuple[int, ...] | list[int], seed: int) -> torch.Tensor:
    """The fixed starting noise for ``seed``: float32 (num_samples, *image_shape), on the CPU.

    Drawn from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the same
    noise on every machine and device; scoring every candidate from the same noise
    (common random numbers) makes their FIDs comparable (LCSC paper, Sec. 4).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((int(num_samples), *image_shape), generator=gen, dtype=torch.float32)


def sample_batch(sampler: Any, model: nn.Module, noise: torch.Tensor, guidance: Guidance | None = None) -> torch.Tensor:
    """``sampler.sample(model, noise)``, with ``guidance`` (the same rows' labels) for a conditional model."""
    return sampler.sample(model, noise) if guidance is None else sampler.sample(model, noise, guidance)


def sample_in_batches(sampler: Any, model: nn.Module, noise: torch.Tensor, guidance: Guidance | None, *,
                      batch_size: int, device: str | torch.device) -> torch.Tensor:
    """Images from ``noise`` (on the CPU), ``batch_size`` rows at a time on ``device``."""
    return torch.cat([sample_batch(sampler, model, noise[a:a + batch_size].to(device),
                                   None if guidance is None else guidance[a:a + batch_size])
                      for a in range(0, len(noise), batch_size)])


class FIDScorer:
    """FID of a model's samples against cached reference statistics.

    ``sampler.sample(model, noise) -> images in [-1, 1]`` turns noise into images. The
    real side is loaded into a torchmetrics ``FrechetInceptionDistance`` once; each call
    resets and refills only the fake side. The extractor is moved to ``device``; the
    model must already be there. With ``conditioning`` (a conditional model's), every seed's
    samples get its balanced labels, guided at ``guidance_scale`` (default: the spec's).
    """

    def __init__(self, sampler: Any, extractor: nn.Module, reference: ReferenceStats, *,
                 image_shape: tuple[int, ...] | list[int], batch_size: int = 500,
                 device: str | torch.device = "cpu", conditioning: Conditioning | None = None) -> None:
        if reference.num_samples < 2:
            raise LcscError("reference statistics hold fewer than 2 images")
        self.sampler, self.image_shape = sampler, tuple(int(s) for s in image_shape)
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.metric = _make_metric(extractor, self.device)
        reference.load_into(self.metric)
        self.conditioning = conditioning
        self.guidance_scale = None if conditioning is None else conditioning.guidance

    def guidance(self, num_samples: int, seed: int, scale: float | None = None) -> Guidance | None:
        """The labels and guidance of the fixed noise of ``seed`` (None for an unconditional model)."""
        if self.conditioning is None:
            return None
        labels = make_labels(num_samples, self.conditioning.num_classes, seed)
        return guidance_for(self.conditioning, labels, self.guidance_scale if scale is None else scale)

    def _update(self, images: torch.Tensor) -> bool:
        if not torch.isfinite(images).all():
            return False
        with torch.no_grad():
            self.metric.update(images.to(self.device), real=False)
        return True

    def _compute(self) -> float:
        value = float(self.metric.compute())
        return math.inf if math.isnan(value) else value

    def score_images(self, images: torch.Tensor) -> float:
        """FID of ``images`` ((N, C, H, W) in [-1, 1], N >= 2) against the reference.

        Non-finite images score ``inf`` (never NaN), so a search ranks them last.
        """
        if len(images) < 2:
            raise LcscError(f"FID needs at least 2 generated images, got {len(images)}")
        self.metric.reset()  # fake side only (reset_real_features=False)
        for batch in images.split(self.batch_size):
            if not self._update(batch):
                return math.inf
        return self._compute()

    def sample(self, model: nn.Module, num_samples: int, seed: int) -> torch.Tensor:
        """Images sampled from the fixed noise of ``seed``, batch by batch under inference mode.

        The model runs in eval mode (its previous mode is restored). Sampling once and
        scoring the same images under several extractors (:meth:`score_images`) is how a
        second, independent metric costs no extra sampling.
        """
        if num_samples < 2:
            raise LcscError(f"FID needs at least 2 generated images, got {num_samples}")
        noise = make_noise(num_samples, self.image_shape, seed)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                return sample_in_batches(self.sampler, model, noise, self.guidance(num_samples, seed),
                                         batch_size=self.batch_size, device=self.device)
        finally:
            model.train(was_training)

    def __call__(self, model: nn.Module, num_samples: int, seed: int) -> float:
        """Sample ``num_samples`` images from the fixed noise of ``seed`` and return their FID.

        Same model and seed give the same float; non-finite samples score ``inf``.
        """
        return self.score_images(self.sample(model, num_samples, seed))


def load_evaluator(path: str) -> Callable[[nn.Module, int, int], float]:
    """Resolve a user's evaluator ``"module:callable"``, called as ``(model, num_samples, seed) -> float``."""
    obj = import_object(path)
    if not callable(obj):
        raise LcscError(f"evaluator {path!r} is not callable (got {type(obj).__name__})")
    return obj
