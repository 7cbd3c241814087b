"""Early stopping of hopeless trials (--prune): rung scores, the pruner, the strategies, the logging."""
from __future__ import annotations

import functools
import math

import mlflow
import optuna
import pytest
import torch
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.evaluation.data import load_dataset
from lcsc_ops.evaluation.features import build_extractor
from lcsc_ops.evaluation.fid import FIDScorer, compute_reference_stats, make_noise
from lcsc_ops.evaluation.rungs import fid_rungs, rung_counts
from lcsc_ops.pipeline.optimize import run_optimize
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.models.diffusion import DDIMSampler
from lcsc_ops.models.unet import DigitsUNet
from lcsc_ops.search import study as study_mod
from lcsc_ops.search.trials import RungPruner, Rungs, run_trials
from lcsc_ops.search.strategies import make_strategy
from tests.conftest import tiny_optimize_config

optuna.logging.set_verbosity(optuna.logging.WARNING)
SHAPE = (1, 8, 8)
COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


# --- rung scores ---------------------------------------------------------------------------

class CountingSampler(DDIMSampler):
    drawn = 0

    def sample(self, model, noise):
        CountingSampler.drawn += len(noise)
        return super().sample(model, noise)


@pytest.fixture(scope="module")
def scorer():
    extractor = build_extractor("digits-cnn")
    reference = compute_reference_stats(load_dataset("digits"), extractor)
    return FIDScorer(CountingSampler(steps=2), extractor, reference, image_shape=SHAPE, batch_size=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DigitsUNet(channels=8)


def test_rung_counts():
    assert rung_counts(1000, (0.25, 0.5)) == [250, 500, 1000]
    assert rung_counts(1000, (0.5, 0.25, 0.5)) == [250, 500, 1000]
    assert rung_counts(5, (0.1,)) == [2, 5]  # at least 2 samples (FID needs a covariance)
    with pytest.raises(LcscError):
        rung_counts(1000, (1.0,))


@pytest.mark.parametrize("seeds", [[0], [0, 1]])
def test_rungs_score_prefixes_of_the_same_noise_and_the_last_is_the_full_score(scorer, model, seeds):
    counts = [32, 64, 128]  # multiples of the batch size: the metric sees the unpruned batches
    rungs = list(fid_rungs(scorer, model, counts, seeds))
    for n, value in zip(counts, rungs):
        prefix = [scorer.score_images(scorer.sample(model, 128, s)[:n]) for s in seeds]  # first n of the fixed noise
        assert value == sum(prefix) / len(seeds)
    assert rungs[-1] == sum(scorer(model, 128, s) for s in seeds) / len(seeds)  # bit for bit
    assert rungs[0] > rungs[-1]  # FID is biased by the sample count: rungs compare only at equal counts


def test_rungs_off_the_batch_grid_differ_at_most_in_the_last_bit(scorer, model):
    rungs = list(fid_rungs(scorer, model, [50, 100, 128], [0, 1]))
    full = (scorer(model, 128, 0) + scorer(model, 128, 1)) / 2
    assert rungs[-1] == pytest.approx(full, rel=1e-6)


def test_stopping_after_a_rung_draws_only_its_samples(scorer, model):
    model.train()
    CountingSampler.drawn = 0
    values = fid_rungs(scorer, model, [40, 80, 128], [0, 1])
    first = next(values)
    assert CountingSampler.drawn == 2 * 40 and math.isfinite(first)
    values.close()
    assert model.training  # its mode is restored
    assert int(scorer.metric.fake_features_num_samples) == 0  # the fake side is left reset
    CountingSampler.drawn = 0
    list(fid_rungs(scorer, model, [40, 80, 128], [0, 1]))
    assert CountingSampler.drawn == 2 * 128  # all rungs together cost one full score
    assert torch.equal(make_noise(128, SHAPE, 0)[:40], make_noise(40, SHAPE, 0))


# --- the pruner and the strategies ---------------------------------------------------------

def _study(pruner, sampler=None):
    return optuna.create_study(direction="minimize", pruner=pruner, sampler=sampler)


def _complete(study, rungs: dict[int, float]):
    study.add_trial(optuna.trial.create_trial(state=COMPLETE, value=rungs[max(rungs)], intermediate_values=rungs))


def test_rung_pruner_compares_only_at_equal_counts_after_warm_up():
    study = _study(RungPruner(percentile=50, n_startup_trials=3))
    for v in (10.0, 11.0):
        _complete(study, {100: v, 400: v - 5})
    trial = study.ask()
    trial.report(50.0, 100)
    assert not trial.should_prune()  # 2 complete trials < warm-up of 3
    _complete(study, {100: 12.0, 400: 7.0})
    assert trial.should_prune()  # 50 > median 11 of the scores at 100 samples
    ok = study.ask()
    ok.report(10.5, 100)
    assert not ok.should_prune()
    cross = study.ask()
    cross.report(5.5, 100)
    assert not cross.should_prune()
    cross.report(8.0, 400)
    # 8 > the median 6 of the scores at 400 samples. Optuna's PercentilePruner would compare its
    # best score at ANY count (5.5, from 100 samples, biased) and keep it.
    assert cross.should_prune()
    frozen = next(t for t in study.trials if t.number == cross.number)
    assert not optuna.pruners.PercentilePruner(50.0, n_startup_trials=3).prune(study, frozen)
    bad = study.ask()
    bad.report(math.inf, 100)
    assert bad.should_prune()  # non-finite samples: hopeless at once


def _synthetic(dim: int = 4):
    """A rung objective on an AffineEncoding: quadratic in the coefficients plus a bias that
    shrinks with the sample count (as FID's does)."""
    encoding = AffineEncoding(centre=tuple([1.0 / dim] * dim), radius=0.3)
    steps = [25, 50, 100]

    def value(coeffs, n):
        return sum((c - 0.25) ** 2 for c in coeffs) * 100 + 100.0 / n

    calls = []

    def scores(coeffs):
        for n in steps:
            calls.append(n)
            yield value(coeffs, n)

    return encoding, Rungs(steps, scores), (lambda c: value(c, steps[-1])), calls


def test_pruned_trials_count_towards_the_budget_and_cost_less():
    encoding, rungs, full, calls = _synthetic()
    study = _study(RungPruner(n_startup_trials=3), make_strategy("random", 0))
    assert run_trials(study, encoding, full, 30, rungs=rungs) == 30
    states = [t.state for t in study.trials]
    assert len(states) == 30 and states.count(PRUNED) > 0 and set(states) == {COMPLETE, PRUNED}
    assert len(calls) < 3 * 30  # pruned trials stopped before their last rung
    for t in study.trials:
        if t.state == COMPLETE:
            assert t.value == full(t.user_attrs["coefficients"]) == t.intermediate_values[100]
        else:
            assert max(t.intermediate_values) < 100  # never pruned at the full count
    assert run_trials(study, encoding, full, 30, rungs=rungs) == 0  # resumed: the budget is spent


def test_without_rungs_nothing_is_reported():
    encoding, _, full, _ = _synthetic()
    study = _study(RungPruner(n_startup_trials=1), make_strategy("random", 0))
    run_trials(study, encoding, full, 8)
    assert all(t.state == COMPLETE and not t.intermediate_values for t in study.trials)


def test_cmaes_learns_from_complete_trials_only():
    """Each CMA-ES generation closes after popsize COMPLETE trials; pruned ones are extra (with
    consider_pruned_trials=True a generation would close counting them, on truncated scores)."""
    encoding, rungs, full, _ = _synthetic()
    sampler = make_strategy("cmaes", 0)
    study = _study(RungPruner(n_startup_trials=3), sampler)
    run_trials(study, encoding, full, 60, rungs=rungs)
    by_gen: dict[int, list] = {}
    for t in study.trials:
        if "cma:generation" in t.system_attrs:
            by_gen.setdefault(t.system_attrs["cma:generation"], []).append(t.state)
    closed = [g for g in by_gen if g + 1 in by_gen]
    popsize = 4 + math.floor(3 * math.log(len(encoding.names)))
    assert closed and all(by_gen[g].count(COMPLETE) == popsize for g in closed)
    assert any(PRUNED in by_gen[g] for g in closed)


def test_evolution_draws_parents_from_complete_trials_only():
    encoding, rungs, full, _ = _synthetic()
    sampler = make_strategy("evolution", 0)
    study = _study(RungPruner(n_startup_trials=3), sampler)
    run_trials(study, encoding, full, 40, rungs=rungs)
    names = sorted(encoding.names)
    parents = sampler._parents(study, 40, names)
    best = sorted((t for t in study.trials if t.state == COMPLETE), key=lambda t: t.value)[:len(parents)]
    assert [list(p) for p in parents] == [[t.params[n] for n in names] for t in best]
    assert any(t.state == PRUNED for t in study.trials)


# --- the whole job, tracked ----------------------------------------------------------------

def _config(tiny_run, store, storage_name, **over):
    settings = dict(strategy="random", n_trials=14, search_samples=128, batch_size=32, register=False,
                    storage=f"sqlite:///{store['root'] / storage_name}")
    settings.update(over)
    return tiny_optimize_config(tiny_run, store, **settings)


@pytest.fixture(scope="module")
def both_ways(store, tiny_run):
    """The same random search (same seed: every trial has the same coefficients either way),
    with and without --prune, each in a study of its own."""
    plain = run_optimize(_config(tiny_run, store, "optuna-plain.db"), log=lambda m: None)
    mp = pytest.MonkeyPatch()
    mp.setattr(study_mod, "RungPruner", functools.partial(RungPruner, n_startup_trials=3))
    try:
        pruned = run_optimize(_config(tiny_run, store, "optuna-pruned.db", prune=True), log=lambda m: None)
    finally:
        mp.undo()
    return plain, pruned


def _trials(store, report, name):
    """The searched trials (the start trial, the centre scored before the search, left out)."""
    study = optuna.load_study(study_name=report["study"], storage=f"sqlite:///{store['root'] / name}")
    assert sum("lcsc.start" in t.user_attrs for t in study.trials) == 1
    return {t.number: t for t in study.trials if "lcsc.start" not in t.user_attrs}


def _children(store, report):
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_run(report["parent_run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{report['parent_run_id']}'")
    return client, {int(r.data.tags["lcsc.trial"]): r for r in runs if "lcsc.start" not in r.data.tags}


def test_prune_really_prunes_and_complete_trials_keep_their_unpruned_value(store, both_ways):
    plain, pruned = both_ways
    a, b = _trials(store, plain, "optuna-plain.db"), _trials(store, pruned, "optuna-pruned.db")
    assert len(a) == len(b) == 14 and pruned["pruned_trials"] >= 1
    assert pruned["pruned_trials"] == sum(t.state == PRUNED for t in b.values())
    for n, t in b.items():
        assert t.params == a[n].params  # the random sampler draws the same points either way
        if t.state == COMPLETE:
            assert t.value == a[n].value  # last rung == the unpruned score, exactly
            assert sorted(t.intermediate_values) == [32, 64, 128]
        else:
            assert max(t.intermediate_values) < 128
    assert pruned["trials"] == 14 - pruned["pruned_trials"]


def test_pruned_trials_get_their_child_run(store, both_ways):
    _, pruned = both_ways
    trials = _trials(store, pruned, "optuna-pruned.db")
    client, children = _children(store, pruned)
    assert set(children) == set(trials)
    for n, t in trials.items():
        run = children[n]
        history = client.get_metric_history(run.info.run_id, "fid_by_samples")
        assert {m.step: m.value for m in history} == pytest.approx(dict(t.intermediate_values))
        if t.state == PRUNED:
            assert run.info.status == "KILLED" and run.data.tags["lcsc.pruned"] == "true"
            assert run.data.tags["lcsc.pruned_at_samples"] == str(max(t.intermediate_values))
            assert "fid" not in run.data.metrics  # a score from fewer samples is no search FID
        else:
            assert run.info.status == "FINISHED" and "lcsc.pruned" not in run.data.tags
            assert run.data.metrics["fid"] == pytest.approx(t.value)


def test_without_prune_nothing_changes(store, both_ways):
    plain, _ = both_ways
    trials = _trials(store, plain, "optuna-plain.db")
    assert all(t.state == COMPLETE and not t.intermediate_values for t in trials.values())
    assert "pruned_trials" not in plain and plain["trials"] == 14
    client, children = _children(store, plain)
    for run in children.values():
        assert "fid_by_samples" not in run.data.metrics and "lcsc.pruned" not in run.data.tags
        assert run.info.status == "FINISHED"


def test_prune_option_errors(store, tiny_run):
    runner = CliRunner()
    for extra, needle in ((["--prune", "--evaluator", "tests.evaluators:weight_energy"], "built-in FID"),
                          (["--prune", "--prune-rungs", "0.5,1"], "--prune-rungs"),
                          (["--prune-rungs", "a,b"], "--prune-rungs")):
        result = runner.invoke(app, ["optimize", tiny_run, *extra, "--tracking-uri", store["uri"]])
        assert result.exit_code == 1 and result.output.startswith("error: ") and needle in result.output, result.output
