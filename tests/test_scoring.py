"""The Scorer's merger choice (lcsc_ops.pipeline.scoring): stacked or streaming from free memory."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lcsc_ops.math.merge import StackedMerger
from lcsc_ops.math.streaming import StreamingMerger, stack_nbytes
from lcsc_ops.pipeline import scoring
from lcsc_ops.pipeline.scoring import Scorer, auto_stack_limit, free_memory

K = 4


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture
def window(tmp_path) -> SimpleNamespace:
    gen, entries = torch.Generator().manual_seed(1), []
    state = make_model().state_dict()
    for i in range(K):
        for t in state.values():
            t.add_(0.05 * torch.randn(t.shape, generator=gen))
        path = tmp_path / f"ckpt{i}.safetensors"
        save_file({k: v.clone() for k, v in state.items()}, str(path))
        entries.append(SimpleNamespace(path=path))
    return SimpleNamespace(entries=entries)


def test_free_memory_reads_the_host():
    free = free_memory("cpu")
    assert free is not None and 0 < free
    assert auto_stack_limit("cpu") == int(scoring.AUTO_STACK_FRACTION * free)


@pytest.mark.parametrize("free_factor, mode", [(4.0, "stacked"), (1.0, "streaming")])
def test_without_a_limit_half_the_free_memory_decides(window, monkeypatch, free_factor, mode):
    need = stack_nbytes(window.entries, torch.float32)
    monkeypatch.setattr(scoring, "free_memory", lambda device: int(free_factor * need))
    scorer = Scorer(window, make_model, "cpu")
    assert scorer.mode == mode
    assert isinstance(scorer.merger, StackedMerger if mode == "stacked" else StreamingMerger)
    assert scorer.choice.startswith(f"merge: {mode}") and "half the free memory" in scorer.choice


def test_bf16_search_stacks_what_fp32_would_stream(window, monkeypatch):
    need = stack_nbytes(window.entries, torch.float32)
    monkeypatch.setattr(scoring, "free_memory", lambda device: int(1.5 * need))  # limit 0.75x: bf16's 0.5x fits
    assert Scorer(window, make_model, "cpu").mode == "streaming"
    scorer = Scorer(window, make_model, "cpu", precision="bf16")
    assert scorer.mode == "stacked" and scorer.merger.dtype is torch.bfloat16
    assert "stacked bfloat16" in scorer.choice


def test_a_given_limit_wins_over_free_memory(window, monkeypatch):
    monkeypatch.setattr(scoring, "free_memory", lambda device: 1 << 50)
    scorer = Scorer(window, make_model, "cpu", max_stack_memory=1e-9)
    assert scorer.mode == "streaming" and "--max-stack-memory" in scorer.choice


def test_unknown_free_memory_stacks(window, monkeypatch):
    monkeypatch.setattr(scoring, "free_memory", lambda device: None)
    scorer = Scorer(window, make_model, "cpu")
    assert scorer.mode == "stacked" and "no limit" in scorer.choice
