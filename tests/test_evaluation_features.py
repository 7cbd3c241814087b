"""Feature extractors: the shipped digits classifiers, the registry and the Inception path."""
from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.data import digits_split, load_dataset
from lcsc_ops.evaluation.features import (FEATURE_EXTRACTORS, DigitsCNN, DigitsMLP, build_extractor,
                                          default_extractor_for, extractor_fingerprint, second_extractor_for)


@pytest.fixture(scope="module")
def extractors():
    return {name: build_extractor(name) for name in ("digits-cnn", "digits-mlp")}


@pytest.mark.parametrize("name, cls", [("digits-cnn", DigitsCNN), ("digits-mlp", DigitsMLP)])
def test_shipped_classifier_held_out_accuracy(extractors, name, cls):
    model = extractors[name]
    assert isinstance(model, cls) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    _, _, x_test, y_test = digits_split(seed=0)
    with torch.no_grad():
        acc = (model.classify(x_test).argmax(1) == y_test).double().mean().item()
    assert acc >= 0.97, f"{name}: {acc:.4f}"
    # The manifest written next to the weights records this same accuracy.
    manifest = json.loads(resources.files("lcsc_ops").joinpath("assets", "digits_extractors.json").read_text())
    assert manifest[name.replace("-", "_")]["test_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_features_are_64d_and_independent(extractors):
    x = load_dataset("digits")[:256]
    with torch.no_grad():
        f_cnn, f_mlp = extractors["digits-cnn"](x), extractors["digits-mlp"](x)
    assert f_cnn.shape == f_mlp.shape == (256, 64)
    assert extractors["digits-cnn"].num_features == extractors["digits-mlp"].num_features == 64
    assert not torch.allclose(f_cnn, f_mlp, atol=1e-3)
    # Different seeds and architectures: the two trained networks share no weights or shapes.
    assert extractors["digits-cnn"].state_dict().keys() != extractors["digits-mlp"].state_dict().keys()


def test_registry_and_unknown_name():
    assert set(FEATURE_EXTRACTORS) >= {"digits-cnn", "digits-mlp", "inception"}
    with pytest.raises(LcscError, match=r"unknown feature extractor 'resnet'"):
        build_extractor("resnet")


def test_fingerprint_is_stable_and_tracks_weights(extractors):
    cnn = extractors["digits-cnn"]
    fp = extractor_fingerprint("digits-cnn", cnn)
    assert len(fp) == 16 and fp == extractor_fingerprint("digits-cnn", build_extractor("digits-cnn"))
    assert fp != extractor_fingerprint("digits-mlp", extractors["digits-mlp"])
    changed = build_extractor("digits-cnn")
    with torch.no_grad():
        changed.head.bias[0] += 1e-3
    assert extractor_fingerprint("digits-cnn", changed) != fp


def test_inception_without_torch_fidelity_says_what_to_install(tmp_path):
    with pytest.raises(LcscError, match="torch-fidelity") as info:
        build_extractor("inception")
    assert "--inception-weights" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(LcscError, match="torch-fidelity"):
        build_extractor("inception", inception_weights=str(tmp_path / "weights.pth"))


def test_default_and_second_extractor_per_dataset():
    assert (default_extractor_for("digits"), second_extractor_for("digits")) == ("digits-cnn", "digits-mlp")
    assert default_extractor_for("cifar10") == second_extractor_for("cifar10") == "inception"
    for name in (default_extractor_for("digits"), second_extractor_for("digits"), default_extractor_for("x")):
        assert name in FEATURE_EXTRACTORS
