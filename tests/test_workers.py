"""Several workers on one study, and a worker killed with kill -9: real processes, the journal storage."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from lcsc_ops.search.storage import make_storage
from lcsc_ops.search.trials import is_start
from lcsc_ops.search.workers import StudyLock, fail_stale_trials, once
from tests.conftest import tiny_optimize_config


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(storage))


def _searched(study):
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and not is_start(t)]


def test_a_lock_is_held_by_one_worker_and_taken_over_when_stale(tmp_path):
    storage = make_storage(str(tmp_path / "j.journal"))
    a, b = StudyLock(storage, "s:lock:x", grace=0.5), StudyLock(storage, "s:lock:x", grace=0.5)
    assert a.try_acquire() and not b.try_acquire()
    time.sleep(0.7)  # a stops beating (a dead holder)
    assert not b.try_acquire()  # the stale marker is broken now...
    assert b.try_acquire()  # ...and taken
    b.release()


def test_once_computes_in_one_worker_only(tmp_path):
    storage = make_storage(str(tmp_path / "j.journal"))
    optuna.create_study(study_name="s", storage=storage)
    calls = []
    assert once(storage, "s", "thing", lambda: calls.append(1) or {"v": 1}) == {"v": 1}
    assert once(storage, "s", "thing", lambda: calls.append(1) or {"v": 2}) == {"v": 1}
    assert calls == [1]


def test_a_trial_without_heartbeat_is_failed_after_the_grace_period(tmp_path):
    storage = make_storage(str(tmp_path / "j.journal"))
    study = optuna.create_study(study_name="s", storage=storage)
    study.ask()  # RUNNING, never beats: its worker is gone
    assert fail_stale_trials(study, storage, grace=60) == []
    assert fail_stale_trials(study, storage, grace=0.0) == [0]
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


def test_two_workers_share_one_study_exactly(store, tiny_run):
    """--workers 2: exactly --n-trials trials, one parent run, one registered version, baselines once."""
    from lcsc_ops.pipeline.optimize import run_optimize

    logs = []
    cfg = tiny_optimize_config(tiny_run, store, workers=2, n_trials=6, model_name="tiny-workers", seed=11)
    report = run_optimize(cfg, log=logs.append)
    study = _study(store["storage"], report["study"])
    assert len(_searched(study)) == 6 and report["trials"] == 6
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    client = mlflow.tracking.MlflowClient(store["uri"])
    parents = client.search_runs([client.get_run(report["parent_run_id"]).info.experiment_id],
                                 filter_string=f"tags.`optuna.study` = '{report['study']}' and tags.`lcsc.kind` = 'optimize'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'tiny-workers'")) == 1
    children = client.search_runs([parents[0].info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{report['parent_run_id']}'")
    assert sorted(int(r.data.tags["lcsc.trial"]) for r in children) == sorted(
        t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def _optimize_cmd(store, run_id, *extra):
    return [sys.executable, "-m", "lcsc_ops.cli", "optimize", run_id, "--tracking-uri", store["uri"],
            "--storage", store["storage"], "--window", "4", "--search-samples", "64", "--final-samples", "64",
            "--final-seeds", "2", "--top-k", "2", "--ema-grid", "3", "--batch-size", "64", "--device", "cpu",
            "--model-name", "tiny-killed", "--seed", "23", *extra]


def test_kill_9_mid_search_then_rerun_loses_and_repeats_nothing(store, tiny_run):
    env = {**os.environ, "LCSC_OPS_GRACE_S": "3", "LCSC_OPS_HEARTBEAT_S": "1"}
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "12")
    # Trials of ~0.3 s, so the poll below (every 0.1 s) sees one RUNNING: at 64 samples an idle machine ran
    # a trial in ~40 ms and the whole search could end between two polls ("the search did not get going").
    cmd[cmd.index("--search-samples") + 1] = "512"
    old = set(optuna.get_all_study_names(make_storage(store["storage"])))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        new = [n for n in optuna.get_all_study_names(make_storage(store["storage"]))  # names only: a lock
               if n not in old and ":lock:" not in n]  # study deleted meanwhile does not break the listing
        study = _study(store["storage"], new[0]) if new else None
        if study is not None and len(_searched(study)) >= 3 and any(
                t.state == optuna.trial.TrialState.RUNNING for t in study.trials):
            name = new[0]
            break
        time.sleep(0.1)
    assert name is not None, "the search did not get going"
    before = {t.number: t.params for t in _searched(_study(store["storage"], name))}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    study = _study(store["storage"], name)
    after = {t.number: t.params for t in _searched(study)}
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]  # running_left = 0
    assert all(after.get(n) == p for n, p in before.items())  # trials_lost = 0
    assert len(after) == 12  # trials_repeated = 0: exactly the budget, each trial once
    client = mlflow.tracking.MlflowClient(store["uri"])
    assert len(client.search_model_versions("name = 'tiny-killed'")) == 1


def test_the_watchdog_cleans_up_after_a_killed_worker_that_nobody_reruns(store, tiny_run):
    """kill -9 and no rerun: after the grace period no trial is RUNNING and the parent run is not RUNNING."""
    env = {**os.environ, "LCSC_OPS_GRACE_S": "2", "LCSC_OPS_HEARTBEAT_S": "1", "LCSC_OPS_WATCHDOG": "1"}
    storage = str(store["root"] / "watchdog.journal")
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "40")
    cmd[cmd.index("--storage") + 1] = storage
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study, deadline = None, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        names = [n for n in optuna.get_all_study_names(make_storage(storage)) if ":lock:" not in n]
        study = _study(storage, names[0]) if names else None
        if study is not None and _searched(study) and any(
                t.state == optuna.trial.TrialState.RUNNING for t in study.trials):
            break
        time.sleep(0.1)
    assert study is not None and proc.poll() is None, "the search did not get going"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parent = study.user_attrs["lcsc.setup"]["parent_run_id"]
    client = mlflow.tracking.MlflowClient(store["uri"])
    deadline = time.time() + 120
    while time.time() < deadline and client.get_run(parent).info.status == "RUNNING":
        time.sleep(0.5)
    assert client.get_run(parent).info.status == "KILLED"
    study = _study(storage, study.study_name)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


BUDGET_WORKER = '''
import sys, time
import optuna
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.search.storage import make_storage
from lcsc_ops.search.trials import run_trials

storage = make_storage(sys.argv[1])
study = optuna.load_study(study_name="budget", storage=storage)
seconds, waits = float(sys.argv[2]), []


def score(coeffs):
    time.sleep(seconds)
    return sum(c * c for c in coeffs)


print("ready", flush=True)
sys.stdin.readline()  # both start together: imports take seconds on a busy machine
ran = run_trials(study, AffineEncoding(centre=(0.5, 0.5)), score, 6, storage=storage, on_wait=waits.append)
print(ran, len(waits), flush=True)
'''


def test_a_worker_that_finds_the_budget_claimed_waits_instead_of_failing_surplus_trials(tmp_path):
    """Two real processes on one study, one trial of one of them 4x slower than the other's: the
    fast worker finds the last places claimed by the slow one's running trial and waits (it is told
    how many run) instead of asking and FAILing surplus trials; at most one surplus trial each."""
    from lcsc_ops.search.trials import SURPLUS_ATTR

    journal = str(tmp_path / "budget.journal")
    optuna.create_study(study_name="budget", storage=make_storage(journal))
    script = tmp_path / "budget_worker.py"
    script.write_text(BUDGET_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), journal, s], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for s in ("0.3", "1.2")]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    study = _study(journal, "budget")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert not [s for s in states if s == optuna.trial.TrialState.RUNNING]
    fails = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert all(t.user_attrs.get(SURPLUS_ATTR) for t in fails)
    per_worker = [sum(t.user_attrs.get("lcsc.worker") == w for t in fails)
                  for w in {t.user_attrs.get("lcsc.worker") for t in fails}]
    assert max(per_worker, default=0) <= 1, per_worker
    assert sum(int(o[0]) for o in outs) == 6  # every trial finished counts once
    assert int(outs[0][1]) >= 1  # the fast worker waited for the slow one's last trial


def test_stop_below_ends_every_workers_search(store, tiny_run):
    """--workers 2 with a stop_below every trial meets: the first finished trial ends both workers'
    searches (before, worker 1 never heard of it and ran the rest of the budget)."""
    from lcsc_ops.pipeline.optimize import run_optimize

    cfg = tiny_optimize_config(tiny_run, store, workers=2, n_trials=12, model_name="tiny-stop-below", seed=17)
    report = run_optimize(cfg, log=lambda msg: None, stop_below=1e9)
    study = _study(store["storage"], report["study"])
    assert 1 <= len(_searched(study)) <= 2, len(_searched(study))  # at most the one each worker had in flight
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
