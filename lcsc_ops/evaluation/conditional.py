"""Class-conditional evaluation: the labels every candidate is sampled with, and how often a
classifier recognises each class in the samples.

FID of a conditional model is taken on class-balanced samples against the whole reference
set (the samples' class mix is the data's, near enough). It cannot see a merge that trades
one class for another at an equal FID; the per-class accuracy of a classifier on the
samples (the share of samples of class k it labels k) can; the final evaluation samples each
candidate once more for it (the score cache keeps FIDs, not images).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from lcsc_ops.errors import LcscError


def make_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """The class labels of the fixed noise of ``seed``: int64 (num_samples,), balanced.

    Each block of ``num_classes`` consecutive samples holds every class once, in an order drawn
    from a generator seeded by ``seed`` (hashed: not the noise's stream), so any prefix (a pruning
    rung) is balanced to within one sample per class, and every candidate scored on a seed sees
    the same labels with the same noise (common random numbers).
    """
    digest = hashlib.sha256(f"lcsc-labels:{int(seed)}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    blocks = -(-int(num_samples) // int(num_classes))
    return torch.rand((blocks, int(num_classes)), generator=gen).argsort(dim=1).flatten()[:int(num_samples)]


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                   batch_size: int = 500) -> list[float]:
    """Per class k, the share of ``images`` of label k that ``classifier.classify`` labels k (NaN
    for a class with no images). The classifier must be on the images' device."""
    with torch.no_grad():
        preds = torch.cat([classifier.classify(b).argmax(dim=1).cpu() for b in images.split(batch_size)])
    labels = labels.cpu()
    out = []
    for k in range(num_classes):
        mask = labels == k
        total = int(mask.sum())
        out.append(int((preds[mask] == k).sum()) / total if total else math.nan)
    return out


def check_classifier(classifier: nn.Module, num_classes: int, image_shape: tuple[int, ...], device: Any) -> None:
    """LcscError unless ``classifier.classify`` gives ``num_classes`` logits for images of ``image_shape``."""
    with torch.no_grad():
        logits = classifier.classify(torch.zeros((1, *image_shape), device=device))
    if logits.shape[-1] != num_classes:
        raise LcscError(f"the classifier has {logits.shape[-1]} classes, the model {num_classes}")


class ClassAccuracy:
    """``(model, num_samples, seed) -> per-class accuracy``: the images an FID scorer samples for
    ``seed`` (same noise, labels, sampler and guidance scale), labelled by ``classifier``."""

    def __init__(self, scorer: Any, classifier: nn.Module, num_classes: int) -> None:
        self.scorer, self.classifier, self.num_classes = scorer, classifier, int(num_classes)

    def __call__(self, model: nn.Module, num_samples: int, seed: int) -> list[float]:
        images = self.scorer.sample(model, num_samples, seed)
        labels = self.scorer.guidance(num_samples, seed).labels
        return class_accuracy(self.classifier, images.to(self.scorer.device), labels, self.num_classes,
                              batch_size=self.scorer.batch_size)
