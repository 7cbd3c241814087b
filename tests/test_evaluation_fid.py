"""FID: reference statistics, their cache, the scorer and the evaluator contract."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.data import load_dataset
from lcsc_ops.evaluation.features import build_extractor
from lcsc_ops.evaluation.fid import (FIDScorer, ReferenceCache, ReferenceStats, compute_reference_stats,
                                     load_evaluator, make_noise)
from lcsc_ops.models.diffusion import DDIMSampler
from lcsc_ops.models.unet import DigitsUNet

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def images():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("digits-cnn")


@pytest.fixture(scope="module")
def reference(images, extractor):
    return compute_reference_stats(images, extractor, batch_size=500)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DigitsUNet(channels=8)


@pytest.fixture
def scorer(extractor, reference):
    return FIDScorer(DDIMSampler(steps=2), extractor, reference, image_shape=SHAPE, batch_size=32)


def test_reference_stats_equal_torchmetrics_states(images, extractor, reference):
    metric = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    metric.update(images, real=True)  # one batch, against our batches of 500
    assert reference.features_sum.dtype == reference.features_cov_sum.dtype == torch.float64
    assert reference.num_samples == 1797 == int(metric.real_features_num_samples)
    assert torch.allclose(reference.features_sum, metric.real_features_sum, rtol=1e-12, atol=1e-9)
    assert torch.allclose(reference.features_cov_sum, metric.real_features_cov_sum, rtol=1e-12, atol=1e-9)
    assert reference.features_sum.abs().sum() > 0


def test_save_load_roundtrip_is_exact(tmp_path, reference):
    path = tmp_path / "sub" / "ref.safetensors"
    ReferenceStats(reference.features_sum, reference.features_cov_sum, reference.num_samples,
                   metadata={"dataset": "digits"}).save(path)
    loaded = ReferenceStats.load(path)
    assert torch.equal(loaded.features_sum, reference.features_sum)
    assert torch.equal(loaded.features_cov_sum, reference.features_cov_sum)
    assert loaded.num_samples == reference.num_samples and loaded.metadata == {"dataset": "digits"}
    assert [p.name for p in path.parent.iterdir()] == ["ref.safetensors"]  # no temp file left behind


def test_cache_misses_then_hits_with_identical_stats(tmp_path, extractor, reference):
    cache = ReferenceCache(tmp_path)
    first, path, hit = cache.get("digits", "digits-cnn", extractor)
    assert not hit and path.is_file() and path.parent == tmp_path
    assert torch.equal(first.features_cov_sum, reference.features_cov_sum)
    second, path2, hit2 = cache.get("digits", "digits-cnn", extractor)
    assert hit2 and path2 == path
    assert torch.equal(second.features_sum, first.features_sum)
    assert torch.equal(second.features_cov_sum, first.features_cov_sum)
    assert second.num_samples == first.num_samples == 1797
    # A subset is another key and another file, and is the same subset every time.
    sub, sub_path, sub_hit = cache.get("digits", "digits-cnn", extractor, num_samples=500)
    assert not sub_hit and sub_path != path and sub.num_samples == 500
    sub_again = ReferenceCache(tmp_path / "other").get("digits", "digits-cnn", extractor, num_samples=500)[0]
    assert torch.equal(sub_again.features_sum, sub.features_sum)
    with pytest.raises(LcscError, match="unknown data set"):
        cache.get("nope", "digits-cnn", extractor)


def test_real_images_score_low_and_noise_high(scorer, images):
    gen = torch.Generator().manual_seed(0)
    real = images[torch.randperm(len(images), generator=gen)[:1000]]
    fid_real = scorer.score_images(real)
    fid_noise = scorer.score_images(torch.rand(1000, *SHAPE, generator=gen) * 2 - 1)
    assert 0 <= fid_real < 2.0
    assert fid_noise > 10 * fid_real


def test_scorer_equals_torchmetrics_from_scratch(scorer, extractor, images, tiny_model):
    value = scorer(tiny_model, 64, seed=3)
    fakes = torch.cat([DDIMSampler(steps=2).sample(tiny_model, b) for b in make_noise(64, SHAPE, 3).split(32)])
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(images, real=True)
    metric.update(fakes.clone(), real=False)
    assert value == pytest.approx(float(metric.compute()), rel=1e-6)
    # score_images on the same fakes agrees too: the real side survived the resets.
    assert scorer.score_images(fakes.clone()) == pytest.approx(value, rel=1e-6)


def test_same_seed_same_float_other_seed_other_value(scorer, tiny_model):
    a, b = scorer(tiny_model, 64, seed=0), scorer(tiny_model, 64, seed=0)
    assert isinstance(a, float) and a == b and math.isfinite(a)
    assert scorer(tiny_model, 64, seed=1) != a
    assert tiny_model.training  # the model's mode is restored after sampling


def test_non_finite_samples_score_inf(scorer):
    images = torch.zeros(8, *SHAPE)
    images[3, 0, 0, 0] = float("nan")
    assert scorer.score_images(images) == math.inf


def test_make_noise_is_fixed_per_seed():
    a = make_noise(16, SHAPE, seed=7)
    assert a.shape == (16, *SHAPE) and a.dtype == torch.float32
    assert torch.equal(a, make_noise(16, SHAPE, seed=7))
    assert not torch.equal(a, make_noise(16, SHAPE, seed=8))
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(a, make_noise(16, SHAPE, seed=7))


def test_reference_with_wrong_feature_count_is_refused(reference):
    mlp = build_extractor("digits-mlp")
    small = ReferenceStats(reference.features_sum[:10], reference.features_cov_sum[:10, :10], 1797)
    with pytest.raises(LcscError, match="10 features"):
        FIDScorer(DDIMSampler(steps=2), mlp, small, image_shape=SHAPE)


def test_load_evaluator():
    assert load_evaluator("lcsc_ops.evaluation.fid:make_noise") is make_noise
    with pytest.raises(LcscError, match="not callable"):
        load_evaluator("math:pi")
    with pytest.raises(LcscError):
        load_evaluator("no_such_module_xyz:f")
