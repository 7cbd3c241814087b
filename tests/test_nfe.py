"""`optimize --nfe N`: the search samples with N steps; baselines are also scored at the spec's NFE."""
from __future__ import annotations

import pytest
from rich.console import Console

from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.optimize import run_optimize
from lcsc_ops.pipeline.report import render_table
from tests.conftest import TINY_TRAIN, tiny_optimize_config


def test_reduced_nfe_reports_base_at_default_nfe(store, tiny_run):
    report = run_optimize(tiny_optimize_config(tiny_run, store, nfe=1, n_trials=2, register=False),
                          log=lambda m: None)
    assert report["nfe"] == {"default": TINY_TRAIN["sampler_steps"], "used": 1}
    rows = report["methods"]
    for name in ("last", "uniform", "ema_star", "training_ema"):
        assert rows[name]["final_default_nfe_mean"] is not None
        assert rows[name]["final_default_nfe_mean"] != rows[name]["final_mean"]  # 2 steps vs 1 step
    assert rows["lcsc_top1"]["final_default_nfe_mean"] is None
    console = Console(width=200, record=True)
    console.print(render_table(report))
    text = console.export_text()
    assert "@ NFE 1" in text and "@ NFE 2" in text


def test_nfe_with_custom_evaluator_is_refused(store, tiny_run):
    with pytest.raises(LcscError, match="--nfe"):
        run_optimize(tiny_optimize_config(tiny_run, store, nfe=1, evaluator="tests.evaluators:weight_energy"),
                     log=lambda m: None)
