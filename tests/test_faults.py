"""Nothing lost: a real ``kill -9`` of the ``lcsc-ops`` CLI at precise points, then the plain command again.

Each fault runs the CLI in a subprocess through a small wrapper script (written into
``tmp_path``) that wraps one product function so that the process SIGKILLs itself at that
point; the product itself has no test hooks. The wrapper writes a marker file just before
the kill, so a test knows the process died where it meant it to (return code -9 AND marker).
The kill mid-search at a random moment is ``tests/test_workers.py``'s; here the search is
killed while one trial is being scored, with three complete before it.

Points: (1) ``train`` and its uploader process during a checkpoint upload (files logged, fragment not); (2) ``optimize``
mid-trial; (3) in the final evaluation; (4) right after the model version is created; (5) while
a trial's MLflow child run is being written; (6) Ctrl-C in training. After each, the plain
command again: nothing lost, nothing twice, nothing left RUNNING or looking complete.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from lcsc_ops.search.storage import make_storage
from lcsc_ops.store.fetch import read_manifest
from lcsc_ops.store.logger import sweep_shared_memory
from tests.test_workers import _optimize_cmd, _searched, _study

# Dead workers' trials and locks are taken over after 3 s without a heartbeat.
FAST_TAKEOVER = {"LCSC_OPS_GRACE_S": "3", "LCSC_OPS_HEARTBEAT_S": "1"}
LINEAGE = ("lcsc.winner", "lcsc.checkpoint_sha256", "lcsc.coefficients", "lcsc.optimize_run")
TIMEOUT_S = 300

WRAPPER = '''\
import os, signal, sys
from pathlib import Path

MARK = Path(sys.argv[1])
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may have inherited SIGINT ignored


def die(note):
    MARK.write_text(note)
    os.kill(os.getpid(), signal.SIGKILL)


{patch}

sys.argv = ["lcsc-ops", *sys.argv[2:]]
from lcsc_ops.cli import main

main()
'''

# Patches of the checkpoint uploader process (lcsc_ops/store/upload_worker.py, a separate Python process):
# a sitecustomize on PYTHONPATH imports them there only; `die` kills the trainer and the uploader together.
UPLOADER_SITE = '''\
import sys
import time

if sys.argv and sys.argv[0].endswith("upload_worker.py"):
    import uploader_patch  # noqa: F401
'''
UPLOADER_PATCH = '''\
import os, signal
from pathlib import Path

MARK = Path(os.environ["LCSC_TEST_MARK"])


def die(note):
    MARK.write_text(note)
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


{patch}
'''

# In the uploader, at the first manifest fragment that lists step {n} or later: its checkpoint files are
# uploaded, the fragment is not. (A slow machine may batch several steps into one fragment; the note says which.)
DIE_BEFORE_FRAGMENT = '''
import json
from mlflow.tracking import MlflowClient

_log_artifact = MlflowClient.log_artifact


def log_artifact(self, run_id, local_path, artifact_path=None):
    if artifact_path == "checkpoints/manifest.d":
        steps = sorted({{e["step"] for e in json.loads(open(local_path).read())["entries"]}})
        if steps[-1] >= {n}:
            die(json.dumps(steps))
    return _log_artifact(self, run_id, local_path, artifact_path)


MlflowClient.log_artifact = log_artifact
'''

# While a trial is being scored (it is RUNNING, with a heartbeat), once three searched trials are complete.
DIE_MID_TRIAL = '''
import contextlib
from lcsc_ops.search import trials

_heartbeat = trials.TrialRunner._heartbeat


@contextlib.contextmanager
def heartbeat(self, number):
    with _heartbeat(self, number):
        if len(trials.searched(self.study)) >= {n}:
            die(f"trial {{number}} running")
        yield


trials.TrialRunner._heartbeat = heartbeat
'''

# In the final evaluation (after the search, before registration), once the first candidate is scored.
DIE_IN_FINAL_EVALUATION = '''
from lcsc_ops.pipeline import optimize, scoring

_final, _in_final = optimize.final_evaluation, []


def final_evaluation(job, cands):
    _in_final.append(True)
    return _final(job, cands)


def dying(method):
    def scored(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        if _in_final:
            die("first final candidate scored")
        return out
    return scored


optimize.final_evaluation = final_evaluation
scoring.Scorer.per_seed = dying(scoring.Scorer.per_seed)
scoring.Scorer.per_seed_pair = dying(scoring.Scorer.per_seed_pair)
'''

# Right after the model version is created: MLflow has it, nothing else is done.
DIE_AFTER_REGISTRATION = '''
from lcsc_ops.pipeline import optimize
from lcsc_ops.store import registry

_register = registry.register_model


def register_model(*args, **kwargs):
    version = _register(*args, **kwargs)
    die(f"version {version} registered")


registry.register_model = optimize.register_model = register_model
'''

# While trial 2's MLflow child run is being written: just created, or filled but not yet ended.
DIE_IN_CHILD_RUN = '''
from mlflow.tracking import MlflowClient

_create_run, _set_terminated = MlflowClient.create_run, MlflowClient.set_terminated


def create_run(self, *args, **kwargs):
    run = _create_run(self, *args, **kwargs)
    if {point!r} == "created" and run.info.run_name == "trial-0002":
        die("child run of trial 2 created")
    return run


def set_terminated(self, run_id, *args, **kwargs):
    if {point!r} == "filled" and self.get_run(run_id).info.run_name == "trial-0002":
        die("child run of trial 2 filled, not ended")
    return _set_terminated(self, run_id, *args, **kwargs)


MlflowClient.create_run, MlflowClient.set_terminated = create_run, set_terminated
'''


def _env() -> dict[str, str]:
    return {**os.environ, **FAST_TAKEOVER}


def _uploader_env(tmp_path: Path, patch: str, mark: Path) -> dict[str, str]:
    """The environment that applies ``patch`` in the checkpoint uploader process only."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(UPLOADER_SITE)
    (site / "uploader_patch.py").write_text(UPLOADER_PATCH.format(patch=patch))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**_env(), "PYTHONPATH": path, "LCSC_TEST_MARK": str(mark)}


def _kill_at(tmp_path: Path, patch: str, args: list[str], uploader: bool = False) -> str:
    """Run ``lcsc-ops ARGS`` with ``patch`` applied (in the checkpoint uploader with ``uploader``);
    assert it died of SIGKILL at the patched point. Returns the note left just before the kill."""
    script, mark = tmp_path / "die.py", tmp_path / "died-here.txt"
    script.write_text(WRAPPER.format(patch="" if uploader else patch))
    env = _uploader_env(tmp_path, patch, mark) if uploader else _env()
    proc = subprocess.run([sys.executable, str(script), str(mark), *args], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # run() kills the child if it outlives the timeout
    assert proc.returncode == -signal.SIGKILL, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert mark.is_file(), "SIGKILLed, but not at the patched point"
    return mark.read_text()


def _cli_args(cmd: list[str]) -> list[str]:
    """The arguments after ``python -m lcsc_ops.cli``."""
    return cmd[3:]


def _studies(store) -> set[str]:
    return set(optuna.get_all_study_names(make_storage(store["storage"])))


def _new_study(store, old: set[str]) -> str:
    new = [n for n in _studies(store) - old if ":lock:" not in n]
    assert len(new) == 1, new
    return new[0]


def _params(study) -> dict[int, dict]:
    return {t.number: t.params for t in _searched(study)}


def _run_json(cmd: list[str]) -> tuple[dict, str]:
    proc = subprocess.run(cmd + ["--json"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):]), proc.stderr


def _assert_nothing_lost(store, study_name: str, report: dict, model: str, n_trials: int,
                         before: dict[int, dict] | None = None, registered_tag: bool = True) -> None:
    """After a (re)run: the study holds exactly ``n_trials`` searched trials (those of ``before``
    unchanged), none RUNNING, no lock left; one registered version of ``model`` with its lineage;
    one FINISHED parent run, no run of the optimization RUNNING, one child run per complete trial."""
    study = _study(store["storage"], study_name)
    assert not [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    after = _params(study)
    assert len(after) == n_trials == report["trials"]  # none repeated: exactly the budget, each trial once
    assert {n: after.get(n) for n in before or {}} == (before or {})  # none lost: same numbers, same params
    assert not [n for n in _studies(store) if n.startswith(f"{study_name}:lock:")]  # every lock released

    client = mlflow.tracking.MlflowClient(store["uri"])
    versions = client.search_model_versions(f"name = '{model}'")
    assert len(versions) == 1, [(v.version, v.run_id) for v in versions]
    version = versions[0]
    assert not [k for k in LINEAGE if k not in version.tags], version.tags
    assert version.tags["lcsc.optimize_run"] == report["parent_run_id"] == version.run_id
    assert str(report["registered_model"]["version"]) == str(version.version)

    exp = client.get_run(report["parent_run_id"]).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`optuna.study` = '{study_name}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lcsc.kind") == "optimize"]
    assert [(p.info.run_id, p.info.status) for p in parents] == [(report["parent_run_id"], "FINISHED")]
    if registered_tag:  # the optimize run names its version
        assert parents[0].data.tags.get("lcsc.registered_model") == f"{model}/{version.version}"
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    children = sorted(int(r.data.tags["lcsc.trial"]) for r in runs if r.data.tags.get("lcsc.kind") == "trial")
    assert children == sorted(t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -- 1. training killed during a checkpoint upload ---------------------------------------------

def _train_args(store, experiment: str) -> list[str]:
    return ["train", "--tracking-uri", store["uri"], "--steps", "400", "--batch-size", "32", "--channels", "8",
            "--checkpoint-every", "5", "--sampler-steps", "2", "--log-every", "10", "--warmup-steps", "5",
            "--experiment", experiment, "--model-name", experiment, "--seed", "41"]


EVERY = 5  # the training below checkpoints every 5 steps


def _dead_owners_entries(before: set[str]) -> list[str]:
    """The loggers' entries in /dev/shm made since ``before`` whose owner lock is free or gone: a
    dead job's (other jobs on this machine may be alive and keep theirs)."""
    import fcntl
    import re

    dead = []
    for path in sorted(set(glob.glob("/dev/shm/lcsc-*")) - before):
        match = re.match(r"lcsc-(?:owner|spool|snapshots)-([0-9a-f]{16})", os.path.basename(path))
        if match is None:
            continue
        try:
            fd = os.open(f"/dev/shm/lcsc-owner-{match.group(1)}.lock", os.O_RDWR)
        except FileNotFoundError:
            dead.append(path)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            dead.append(path)
        except BlockingIOError:
            pass  # its owner lives
        finally:
            os.close(fd)
    return dead


def test_kill_9_during_a_checkpoint_upload_keeps_the_logged_checkpoints_and_a_partial_run(store, tmp_path):
    shm_before = set(glob.glob("/dev/shm/lcsc-*"))
    killed = json.loads(_kill_at(tmp_path, DIE_BEFORE_FRAGMENT.format(n=25), _train_args(store, "faults-train"),
                                 uploader=True))  # the steps whose files were uploaded, their fragment not
    steps = tuple(range(EVERY, killed[0], EVERY))  # the steps whose fragments were logged before the kill
    assert steps and killed[-1] >= 25, killed
    deadline, removed = time.monotonic() + 10, []  # the killed uploader may take a moment to be gone
    while True:  # what the next logger does: the killed pair's shared-memory files go, live jobs' stay
        removed += sweep_shared_memory()
        if not _dead_owners_entries(shm_before):
            break
        assert time.monotonic() < deadline, "the killed pair's shared-memory files were not swept"
        time.sleep(0.2)
    assert [p for p in removed if os.path.basename(p).startswith("lcsc-owner-")], "the killed pair's lock stayed"
    client = mlflow.tracking.MlflowClient(store["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("faults-train").experiment_id])
    run_id = run.info.run_id
    assert run.info.status != "FINISHED"
    listed = {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")}
    assert "manifest.json" not in listed  # not left looking complete
    assert {f"step{s:08d}-{k}.safetensors" for s in killed for k in ("raw", "ema")} <= listed  # the killed upload's

    fragments = sorted(Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints/manifest.d"))
    assert fragments and fragments[0] == f"step{EVERY:08d}-raw+ema.json" and len(fragments) <= len(steps)
    entries = []
    for name in fragments:
        entries += json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"checkpoints/manifest.d/{name}", dst_path=str(tmp_path / "frag"),
            tracking_uri=store["uri"])).read_text())["entries"]
    assert sorted((e["step"], e["kind"]) for e in entries) == [(s, k) for s in steps for k in ("ema", "raw")]
    for e in entries:  # every listed checkpoint is there, whole
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{e['file']}",
                                                    dst_path=str(tmp_path / "files"), tracking_uri=store["uri"])
        assert (Path(local).stat().st_size, _sha256(local)) == (e["bytes"], e["sha256"])

    manifest = read_manifest(run_id, store["uri"])  # read back from the fragments, marked partial
    assert manifest["complete"] is False and sorted(map(json.dumps, manifest["entries"])) == sorted(
        map(json.dumps, entries))

    # optimize works on the checkpoints logged so far, and says the run is partial
    cmd = _optimize_cmd(store, run_id, "--n-trials", "3", "--model-name", "faults-partial", "--seed", "41")
    old = _studies(store)
    report, log = _run_json(cmd)
    assert report["window_steps"] == list(steps)  # the killed steps (files without a fragment) are not used
    assert [line for line in log.splitlines() if "partial" in line.lower()], log[-3000:]
    _assert_nothing_lost(store, _new_study(store, old), report, "faults-partial", 3)
    assert "manifest.json" not in {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")}


# -- 2. optimize killed while a trial is being scored ---------------------------------------------

def test_kill_9_mid_trial_then_rerun_registers_one_tagged_version(store, tiny_run, tmp_path):
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "8", "--model-name", "faults-search", "--seed", "43")
    old = _studies(store)
    note = _kill_at(tmp_path, DIE_MID_TRIAL.format(n=3), _cli_args(cmd))
    name = _new_study(store, old)
    study = _study(store["storage"], name)
    running = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1 and note == f"trial {running[0]} running"
    before = _params(study)
    assert len(before) == 3
    report, _ = _run_json(cmd)
    _assert_nothing_lost(store, name, report, "faults-search", 8, before)
    assert _study(store["storage"], name).trials[running[0]].state == optuna.trial.TrialState.FAIL


# -- 3. killed during the final evaluation ----------------------------------------------------------

def test_kill_9_during_the_final_evaluation_then_rerun(store, tiny_run, tmp_path):
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "4", "--model-name", "faults-final", "--seed", "47")
    old = _studies(store)
    _kill_at(tmp_path, DIE_IN_FINAL_EVALUATION, _cli_args(cmd))
    client = mlflow.tracking.MlflowClient(store["uri"])
    with pytest.raises(mlflow.exceptions.MlflowException):  # killed before anything was registered
        client.get_registered_model("faults-final")
    name = _new_study(store, old)
    before = _params(_study(store["storage"], name))
    assert len(before) == 4  # the search was over
    report, _ = _run_json(cmd)
    _assert_nothing_lost(store, name, report, "faults-final", 4, before)


# -- 4. killed right after the model version is created ---------------------------------------------

@pytest.fixture(scope="module")
def killed_after_registration(store, tiny_run, tmp_path_factory) -> dict:
    """optimize SIGKILLed right after its model version was created, then rerun."""
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "4", "--model-name", "faults-registered", "--seed", "53")
    old = _studies(store)
    note = _kill_at(tmp_path_factory.mktemp("registered"), DIE_AFTER_REGISTRATION, _cli_args(cmd))
    client = mlflow.tracking.MlflowClient(store["uri"])
    killed = client.search_model_versions("name = 'faults-registered'")
    name = _new_study(store, old)
    before = _params(_study(store["storage"], name))
    report, log = _run_json(cmd)
    return {"note": note, "killed": killed, "name": name, "before": before, "report": report, "log": log}


def test_kill_9_right_after_registration_then_rerun_registers_nothing_more(store, killed_after_registration):
    k = killed_after_registration
    assert k["note"] == "version 1 registered" and len(k["killed"]) == 1
    assert not [key for key in LINEAGE if key not in k["killed"][0].tags]  # created with its lineage, in one call
    assert k["report"]["registered_model"].get("existing") is True, k["log"][-3000:]
    _assert_nothing_lost(store, k["name"], k["report"], "faults-registered", 4, k["before"], registered_tag=False)


def test_after_a_kill_right_after_registration_the_optimize_run_names_its_version(store, killed_after_registration):
    report = killed_after_registration["report"]
    client = mlflow.tracking.MlflowClient(store["uri"])
    tags = client.get_run(report["parent_run_id"]).data.tags
    assert tags.get("lcsc.registered_model") == f"faults-registered/{report['registered_model']['version']}"


# -- 5. killed while a trial's MLflow child run is being written -------------------------------------

@pytest.mark.parametrize("point, seed", [("created", 59), ("filled", 61)])
def test_kill_9_while_a_child_run_is_written_then_rerun_completes_it(store, tiny_run, tmp_path, point, seed):
    model = f"faults-child-{point}"
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "4", "--model-name", model, "--seed", str(seed))
    old = _studies(store)
    _kill_at(tmp_path, DIE_IN_CHILD_RUN.format(point=point), _cli_args(cmd))
    name = _new_study(store, old)
    client = mlflow.tracking.MlflowClient(store["uri"])
    [parent] = client.search_runs([client.get_run(tiny_run).info.experiment_id],
                                  filter_string=f"tags.`optuna.study` = '{name}' and tags.`lcsc.kind` = 'optimize'")
    halfway = client.search_runs([parent.info.experiment_id], filter_string="attributes.run_name = 'trial-0002'")
    assert [r.info.status for r in halfway if r.data.tags.get("optuna.study") in (name, None)] == ["RUNNING"]
    before = _params(_study(store["storage"], name))
    report, _ = _run_json(cmd)
    _assert_nothing_lost(store, name, report, model, 4, before)
    [child] = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`lcsc.trial` = '2'"))
    trial = _study(store["storage"], name).trials[2]
    assert child.data.metrics[report["metric"]] == trial.value  # the child run holds its trial's score


def test_a_child_run_left_running_is_completed_in_place(store, tiny_run):
    """The unit behind test 5: a trial's child run that a killed writer left RUNNING (empty, or
    filled) is completed by the next backfill, never duplicated, its metric logged once."""
    from lcsc_ops.records import TrialRecord
    from lcsc_ops.store.runs import PARENT_TAG, TrialRunLogger

    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_run(tiny_run).info.experiment_id
    parent = client.create_run(exp, run_name="faults-unit", tags={"lcsc.kind": "optimize"}).info.run_id
    trials = [TrialRecord(number=n, state="COMPLETE", value=1.0 + n, coefficients=(0.25, 0.75), params={"z00": 0.1 * n},
                          duration_s=0.5, rungs={}, start=None) for n in (1, 2, 3)]
    first = TrialRunLogger(parent, tracking_uri=store["uri"])
    first.backfill(trials[:1])
    for n, filled in ((2, False), (3, True)):  # what a kill mid-_log leaves: created, or filled but not ended
        run = client.create_run(exp, run_name=f"trial-{n:04d}", tags={PARENT_TAG: parent, "lcsc.trial": str(n),
                                                                      "lcsc.kind": "trial"}).info.run_id
        if filled:
            metrics, params, tags = first._contents(trials[n - 1])
            client.log_batch(run, metrics=metrics, params=params, tags=tags)
    first.close()
    again = TrialRunLogger(parent, tracking_uri=store["uri"])
    assert again.backfill(trials) == 2
    again.close()
    runs = client.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert sorted((r.data.tags["lcsc.trial"], r.info.status, r.data.metrics["fid"]) for r in runs) == [
        ("1", "FINISHED", 2.0), ("2", "FINISHED", 3.0), ("3", "FINISHED", 4.0)]
    assert [len(client.get_metric_history(r.info.run_id, "fid")) for r in runs] == [1, 1, 1]


# -- 6. training stopped by an exception or Ctrl-C: partial, not complete ------------------------------

def test_a_logger_block_that_raises_leaves_a_partial_run(store):
    import torch

    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.store.logger import CheckpointLogger

    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("faults-unit") or client.get_experiment(client.create_experiment("faults-unit"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    model = spec.build()
    with pytest.raises(KeyboardInterrupt):
        with CheckpointLogger(spec, every=1, run_id=run_id, tracking_uri=store["uri"]) as ckpt:
            for step in (1, 2):
                with torch.no_grad():
                    model.weight.add_(1.0)
                ckpt.step(model, step)
            raise KeyboardInterrupt  # Ctrl-C in the training loop
    manifest = read_manifest(run_id, store["uri"])  # the uploads were waited for; no end marker
    assert manifest["complete"] is False and [e["step"] for e in manifest["entries"]] == [1, 1, 2, 2]
    assert "manifest.json" not in {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")}


# In the uploader, at the Nth manifest fragment, a Ctrl-C (SIGINT) to the training process; the upload goes on.
CTRL_C_AT_FRAGMENT = '''
from mlflow.tracking import MlflowClient

_log_artifact, _fragments = MlflowClient.log_artifact, []


def log_artifact(self, run_id, local_path, artifact_path=None):
    if artifact_path == "checkpoints/manifest.d":
        _fragments.append(local_path)
        if len(_fragments) == {n}:
            MARK.write_text("interrupted")
            os.kill(os.getppid(), signal.SIGINT)
    return _log_artifact(self, run_id, local_path, artifact_path)


MlflowClient.log_artifact = log_artifact
'''


def test_ctrl_c_during_training_leaves_a_partial_run(store, tmp_path):
    script, mark = tmp_path / "interrupt.py", tmp_path / "died-here.txt"
    script.write_text(WRAPPER.format(patch=""))
    args = _train_args(store, "faults-ctrl-c")
    proc = subprocess.run([sys.executable, str(script), str(mark), *args], capture_output=True, text=True,
                          env=_uploader_env(tmp_path, CTRL_C_AT_FRAGMENT.format(n=3), mark), timeout=TIMEOUT_S)
    assert proc.returncode == 130 and mark.read_text() == "interrupted", proc.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(store["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("faults-ctrl-c").experiment_id])
    assert run.info.status == "KILLED"
    assert "Traceback" not in proc.stderr and f"run {run.info.run_id} KILLED" in proc.stderr.splitlines()[-1]
    manifest = read_manifest(run.info.run_id, store["uri"])
    assert len(manifest["entries"]) >= 6  # the interrupted upload and those before it
    assert manifest["complete"] is False  # a KILLED run is not marked complete


# -- the checkpoint uploader process ------------------------------------------------------------------

FAIL_SECOND_UPLOAD = '''
from mlflow.tracking import MlflowClient

_log_artifacts, _calls = MlflowClient.log_artifacts, []


def log_artifacts(self, run_id, local_dir, artifact_path=None):
    _calls.append(local_dir)
    if len(_calls) == 2:
        raise OSError("disk full (test)")
    return _log_artifacts(self, run_id, local_dir, artifact_path)


MlflowClient.log_artifacts = log_artifacts
'''


def test_a_failed_upload_is_one_error_in_the_training_process(store, tmp_path, monkeypatch):
    from lcsc_ops.errors import LcscError
    from lcsc_ops.spec import ModelSpec
    from lcsc_ops.store.logger import CheckpointLogger

    for key, value in _uploader_env(tmp_path, FAIL_SECOND_UPLOAD, tmp_path / "mark").items():
        monkeypatch.setenv(key, value)
    client = mlflow.tracking.MlflowClient(store["uri"])
    run_id = client.create_run(client.create_experiment("faults-upload-error")).info.run_id
    spec = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 3, "out_features": 2})
    logger = CheckpointLogger(spec, every=1, run_id=run_id, tracking_uri=store["uri"])
    logger.step(spec.build(), 1)
    logger.wait()  # step 1 up on its own: steps queued together would go up in one call
    logger.step(spec.build(), 2)
    with pytest.raises(LcscError, match=r"upload of step 2 failed: OSError: disk full \(test\)"):
        logger.close()
    manifest = read_manifest(run_id, store["uri"])
    assert manifest["complete"] is False and [e["step"] for e in manifest["entries"]] == [1, 1]


TRAINER = '''
import sys, time
import torch
from lcsc_ops.spec import ModelSpec
from lcsc_ops.store.logger import CheckpointLogger

spec = ModelSpec(factory="torch.nn:Linear", kwargs={{"in_features": 3, "out_features": 2}})
logger = CheckpointLogger(spec, every=1, run_id="{run_id}", tracking_uri="{uri}")
for step in range(1, 9):
    logger.step(spec.build(), step)
logger._wait_written()  # every step handed to the uploader, none waited for
print(logger._sender.proc.pid, flush=True)
time.sleep(600)
'''


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_the_uploader_finishes_what_it_was_handed_when_the_trainer_is_killed(store, tmp_path):
    client = mlflow.tracking.MlflowClient(store["uri"])
    run_id = client.create_run(client.create_experiment("faults-orphan")).info.run_id
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(run_id=run_id, uri=store["uri"]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        uploader = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while _alive(uploader) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(uploader), "the uploader outlived its trainer"
    manifest = read_manifest(run_id, store["uri"])  # every step handed over was uploaded, none half
    assert manifest["complete"] is False and [e["step"] for e in manifest["entries"]] == sorted([*range(1, 9)] * 2)
