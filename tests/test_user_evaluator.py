"""A user's own score replaces FID: `--evaluator module:callable(model, num_samples, seed) -> float`."""
from __future__ import annotations

import mlflow
import pytest

from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.optimize import run_optimize
from tests.conftest import tiny_optimize_config
from tests.evaluators import CALLS


def test_user_evaluator_scores_every_trial(store, tiny_run):
    CALLS.clear()
    cfg = tiny_optimize_config(tiny_run, store, evaluator="tests.evaluators:weight_energy", n_trials=4,
                               register=False, search_samples=11, final_samples=13)
    report = run_optimize(cfg, log=lambda m: None)
    assert report["metric"] == "score"
    assert (11, 0) in CALLS and (13, 10_000) in CALLS  # search seed 0; final seeds start at 10,000
    # a deterministic score: every final seed gives the same value, and no second metric exists
    for row in report["methods"].values():
        assert len(set(row["final"])) == 1 and row["second_metric_mean"] is None
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_run(report["parent_run_id"]).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{report['parent_run_id']}'")
    # 4 searched trials and the start trial (the centre, scored before the search)
    assert len(children) == 4 + 1 and all("score" in r.data.metrics for r in children)


def test_bad_evaluator_path(store, tiny_run):
    with pytest.raises(LcscError, match="no_such_module"):
        run_optimize(tiny_optimize_config(tiny_run, store, evaluator="no_such_module:f"), log=lambda m: None)
