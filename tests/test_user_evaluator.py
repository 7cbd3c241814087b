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
    # the score cache off: every score is computed here, whatever ran before in this session
    cfg = tiny_optimize_config(tiny_run, store, evaluator="tests.evaluators:weight_energy", n_trials=4,
                               register=False, search_samples=11, final_samples=13, score_cache=False)
    report = run_optimize(cfg, log=lambda m: None)
    assert report["metric"] == "score" and "score_cache" not in report
    assert (11, 0) in CALLS and (13, 10_000) in CALLS  # search seed 0; final seeds start at 10,000
    # a deterministic score: every final seed gives the same value, and no second metric exists
    for row in report["methods"].values():
        assert len(set(row["final"])) == 1 and row["second_metric_mean"] is None
    assert report["second_metric"] is None and "--second-evaluator" in report["second_metric_note"]
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_run(report["parent_run_id"]).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{report['parent_run_id']}'")
    # 4 searched trials and the start trial (the centre, scored before the search)
    assert len(children) == 4 + 1 and all("score" in r.data.metrics for r in children)


def test_bad_evaluator_path(store, tiny_run):
    with pytest.raises(LcscError, match="no_such_module"):
        run_optimize(tiny_optimize_config(tiny_run, store, evaluator="no_such_module:f"), log=lambda m: None)


def test_a_rerun_reuses_the_custom_scores_until_the_version_is_bumped(store, tiny_run):
    """The score cache covers custom evaluators: keyed by the import path, the version
    (``--evaluator-version`` or ``__lcsc_version__``) and the module's source."""
    common = dict(evaluator="tests.evaluators:weight_energy", n_trials=2, top_k=1, register=False,
                  search_samples=17, final_samples=19)
    first = run_optimize(tiny_optimize_config(tiny_run, store, seed=21, **common), log=lambda m: None)
    CALLS.clear()
    again = run_optimize(tiny_optimize_config(tiny_run, store, seed=22, **common), log=lambda m: None)
    assert again["score_cache"]["reused"] > 0
    baseline_scores = {n: r["final"] for n, r in first["methods"].items() if r["kind"] == "baseline"}
    assert {n: again["methods"][n]["final"] for n in baseline_scores} == baseline_scores
    # every reused score is an evaluation not run: the evaluator ran only for the computed ones
    assert len(CALLS) == again["score_cache"]["computed"]
    CALLS.clear()
    bumped = run_optimize(tiny_optimize_config(tiny_run, store, seed=22, evaluator_version="2", **common),
                          log=lambda m: None)
    # a new key: what `again` reused is computed again (only repeats within the run, e.g. a candidate
    # that is a baseline, are reused)
    assert len(CALLS) == bumped["score_cache"]["computed"] > again["score_cache"]["computed"]
    assert bumped["score_cache"]["reused"] < again["score_cache"]["reused"]
    assert {n: bumped["methods"][n]["final"] for n in baseline_scores} == baseline_scores  # the same scores


def test_bad_second_evaluator_path(store, tiny_run):
    with pytest.raises(LcscError, match="no_such_module_2"):
        run_optimize(tiny_optimize_config(tiny_run, store, evaluator="tests.evaluators:weight_energy",
                                          second_evaluator="no_such_module_2:f"), log=lambda m: None)
