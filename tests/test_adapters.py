"""Partial and adapter checkpoints: a frozen base costs nothing, LoRA windows merge only the adapters."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.optimize import run_optimize
from lcsc_ops.math.merge import StackedMerger, load_checkpoint_state, merge_state_dicts
from lcsc_ops.math.profiles import one_hot, uniform
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.fetch import fetch_window
from lcsc_ops.importers.files import import_checkpoints
from tests.conftest import tiny_optimize_config

K = 4
BASE_KEYS = ("0.base.weight", "0.base.bias", "1.base.weight", "1.base.bias")
ADAPTER_KEYS = ("0.lora_a", "0.lora_b", "1.lora_a", "1.lora_b")


class LoraLinear(nn.Module):
    """A frozen Linear plus a rank-r update ``B @ A``."""

    def __init__(self, dim: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(dim, dim)
        self.lora_a = nn.Parameter(torch.zeros(rank, dim))
        self.lora_b = nn.Parameter(torch.zeros(dim, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


def lora_net(dim: int = 6) -> nn.Module:
    """The user's factory: the fixed base (here: seeded, as if loaded from disk), adapters at zero."""
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return nn.Sequential(LoraLinear(dim), LoraLinear(dim))


def _windows() -> tuple[list[dict], list[dict]]:
    """K full checkpoints (base identical in all, adapters on a random walk) and the adapter-only ones."""
    gen = torch.Generator().manual_seed(0)
    state = {k: v.clone() for k, v in lora_net().state_dict().items()}
    full = []
    for _ in range(K):
        for key in ADAPTER_KEYS:
            state[key] += 0.1 * torch.randn(state[key].shape, generator=gen)
        full.append({k: v.clone() for k, v in state.items()})
    return full, [{k: sd[k] for k in ADAPTER_KEYS} for sd in full]


def test_frozen_base_is_left_out_of_both_merges():
    full, _ = _windows()
    merger = StackedMerger(full)
    assert set(merger.varying_keys) == set(ADAPTER_KEYS) and merger.num_constant == len(BASE_KEYS)
    assert merger.num_parameters == sum(full[0][k].numel() for k in ADAPTER_KEYS)
    stats: dict = {}
    coeffs = [0.4, -0.2, 0.3, 0.5]
    merged = merge_state_dicts(full, coeffs, stats=stats)
    assert stats["num_constant"] == len(BASE_KEYS) and set(stats["varying_keys"]) == set(ADAPTER_KEYS)
    for key in BASE_KEYS:
        assert torch.equal(merged[key], full[-1][key])
    exact = sum(torch.tensor(c, dtype=torch.float64) * sd["0.lora_a"].double() for c, sd in zip(coeffs, full))
    assert torch.allclose(merged["0.lora_a"], exact.float(), atol=1e-7)
    # Coefficients that do not sum to 1 scale every tensor, as before: nothing is skipped.
    stats = {}
    doubled = merge_state_dicts(full, [0.5] * K, stats=stats)
    assert stats["num_constant"] == 0 and torch.allclose(doubled["0.base.weight"], 2 * full[0]["0.base.weight"])


def test_constant_detection_keeps_late_varying_tensors_bit_exact():
    full, _ = _windows()
    full[-1]["0.base.bias"] = full[-1]["0.base.bias"] + 1.0  # differs only in the last checkpoint
    stats: dict = {}
    merged = merge_state_dicts(full, uniform(K), stats=stats)
    assert "0.base.bias" in stats["varying_keys"] and stats["num_constant"] == len(BASE_KEYS) - 1
    total = None
    for sd, c in zip(full, uniform(K)):  # the plain float64 running sum, as merge_state_dicts documents
        term = sd["0.base.bias"].double()
        total = term * c if total is None else total.add_(term, alpha=c)
    assert torch.equal(merged["0.base.bias"], total.float())
    assert torch.equal(merge_state_dicts(full, one_hot(K, 1))["0.lora_b"], full[1]["0.lora_b"])


def test_adapter_only_window_binds_over_the_factory_base():
    full, adapters = _windows()
    merger = StackedMerger(adapters)
    assert set(merger.varying_keys) == set(ADAPTER_KEYS) and merger.num_constant == 0
    model = merger.bind(lora_net())
    base = lora_net().state_dict()
    coeffs = [0.1, 0.2, 0.3, 0.4]
    merger.merge(coeffs)
    reference = load_checkpoint_state(lora_net(), merge_state_dicts(full, coeffs))
    got, want = model.state_dict(), reference.state_dict()
    for key in BASE_KEYS:
        assert torch.equal(got[key], base[key]) and torch.equal(want[key], base[key])
    for key in ADAPTER_KEYS:
        assert torch.allclose(got[key], want[key], atol=1e-6)
    x = torch.randn(3, 6)
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_checkpoint_keys_must_be_the_models():
    _, adapters = _windows()
    extra = [{**sd, "2.weight": torch.zeros(1)} for sd in adapters]
    with pytest.raises(ValueError, match="2.weight"):
        StackedMerger(extra).bind(lora_net())
    model = lora_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="2.weight"):
        load_checkpoint_state(model, extra[0])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing half-loaded


def test_adapter_only_import_optimizes_and_registers_only_the_adapters(store, tmp_path):
    _, adapters = _windows()
    for i, sd in enumerate(adapters):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"adapter-{i}.safetensors"),
                  metadata={"step": str(100 * (i + 1))})
    spec = ModelSpec(factory=f"{__name__}:lora_net")
    with pytest.raises(LcscError, match="missing.*--partial"):
        import_checkpoints(tmp_path, spec=spec, tracking_uri=store["uri"])
    run_id = import_checkpoints(tmp_path, spec=spec, partial=True, model_name="tiny-lora", tracking_uri=store["uri"])
    window = fetch_window(run_id, window=K, tracking_uri=store["uri"], cache_dir=store["cache"])
    assert window.steps == (100, 200, 300, 400) and set(window.entries[0].load()) == set(ADAPTER_KEYS)

    cfg = tiny_optimize_config(run_id, store, evaluator="tests.evaluators:weight_energy", n_trials=2,
                               trust_factory=(__name__,))  # the run names this module's factory
    report = run_optimize(cfg, log=lambda m: None)
    name, version = report["registered_model"]["name"], report["registered_model"]["version"]
    assert name == "tiny-lora"
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pytorch.load_model(f"models:/{name}/{version}")
    tags = mlflow.tracking.MlflowClient(store["uri"]).get_model_version(name, version).tags
    by_file = {e.file: e for e in window.entries}
    files, coeffs = json.loads(tags["lcsc.checkpoints"]), json.loads(tags["lcsc.coefficients"])
    expected = merge_state_dicts([by_file[f].load() for f in files], coeffs)
    got, base = model.state_dict(), lora_net().state_dict()
    for key in BASE_KEYS:
        assert torch.equal(got[key], base[key])
    for key in ADAPTER_KEYS:
        assert torch.equal(got[key], expected[key])
