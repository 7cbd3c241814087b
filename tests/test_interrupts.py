"""SIGINT and SIGTERM: real signals (``os.kill``) to a real ``lcsc-ops`` process started with default handlers.

Each case asserts the exit status (130 / 143) within 10 s of the signal, at most 3 lines of
output (``--quiet``: only the line that says what was ended), no traceback and no Optuna
parameter dump, the runs ended KILLED, no trial left RUNNING and no study lock left; for
``optimize``, the same command then finishes the study. Stages the test cannot time from the
outside (fetch, baselines, final evaluation, registration) send the signal from inside the
process, at a patched point, through the same ``os.kill``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from lcsc_ops.interrupts import Interrupted, deferred, handled
from lcsc_ops.search.storage import make_storage
from tests.test_workers import _optimize_cmd, _searched, _study

FAST = {"LCSC_OPS_GRACE_S": "3", "LCSC_OPS_HEARTBEAT_S": "1"}
RUNNING = optuna.trial.TrialState.RUNNING

WRAPPER = '''\
import os, signal, sys

{patch}

sys.argv = ["lcsc-ops", *sys.argv[1:]]
from lcsc_ops.cli import main

main()
'''

# The process signals itself (SIGNAL) at the patched point: once, when the stage begins.
AT_STAGE = '''
import lcsc_ops.pipeline.optimize as optimize

_sent = []


def send(fn):
    def wrapped(*args, **kwargs):
        if not _sent:
            _sent.append(True)
            os.kill(os.getpid(), signal.{signal})
        return fn(*args, **kwargs)
    return wrapped


{target} = send({target})
'''
STAGES = {  # stage -> (patched function, the words the one line says)
    "fetch": ("optimize.checked_window", "while fetching the checkpoints"),  # the window is downloaded, not checked
    "baselines": ("optimize.score_baselines", "while scoring the baselines"),
    "final": ("optimize.final_evaluation", "during the final evaluation"),
    "registration": ("optimize.register_model", "during the final evaluation"),
}


def _default_handlers() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_DFL)


def _start(args: list[str], tmp_path: Path, patch: str = "") -> subprocess.Popen:
    script = tmp_path / "lcsc_ops_cli.py"
    script.write_text(WRAPPER.format(patch=patch))
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **FAST}, preexec_fn=_default_handlers)


def _names(storage: str) -> set[str]:
    return {n for n in optuna.get_all_study_names(make_storage(storage)) if ":lock:" not in n}


def _wait_for_trials(storage: str, old: set[str], proc: subprocess.Popen, searched: int = 2) -> str:
    """The new study's name, once it holds ``searched`` trials and one is running."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        new = _names(storage) - old
        study = _study(storage, next(iter(new))) if new else None
        if study is not None and len(_searched(study)) >= searched and any(t.state == RUNNING for t in study.trials):
            return study.study_name
        time.sleep(0.1)
    raise AssertionError(f"the search did not get going: {proc.poll()} {proc.stdout.read()[-2000:]}")


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, float, str]:
    """Send ``sig``; the exit status, the seconds until the process ended, and its whole output."""
    t0 = time.monotonic()
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, time.monotonic() - t0, out


def _assert_one_clean_line(out: str, sig: int, words: str) -> None:
    lines = out.strip().splitlines()
    assert len(lines) <= 3, out
    assert f"interrupted ({signal.Signals(sig).name}) {words}" in lines[-1], out
    assert "Traceback" not in out and "failed with parameters" not in out and "KeyboardInterrupt" not in out, out


def _assert_stopped_cleanly(store, name: str) -> str:
    """No trial RUNNING, no lock left, the parent run KILLED; returns its id."""
    study = _study(store["storage"], name)
    assert not [t.number for t in study.trials if t.state == RUNNING]
    assert not [n for n in optuna.get_all_study_names(make_storage(store["storage"])) if n.startswith(f"{name}:lock:")]
    parent = study.user_attrs["lcsc.setup"]["parent_run_id"]
    assert mlflow.tracking.MlflowClient(store["uri"]).get_run(parent).info.status == "KILLED"
    return parent


def _assert_rerun_finishes(store, cmd: list[str], name: str, n_trials: int, parent: str) -> None:
    rerun = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=600, env={**os.environ, **FAST})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = _study(store["storage"], name)
    assert len(_searched(study)) == n_trials and not [t for t in study.trials if t.state == RUNNING]
    assert mlflow.tracking.MlflowClient(store["uri"]).get_run(parent).info.status == "FINISHED"


# -- the module itself -------------------------------------------------------------------------------

def test_sigterm_becomes_interrupted_with_exit_status_143_and_deferred_blocks_finish_first():
    with handled():
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode
    assert caught.value.exit_code == 143 and caught.value.name == "SIGTERM"


def test_a_signal_inside_deferred_is_raised_when_the_block_ends(tmp_path):
    code = ("import os, signal, time\n"
            "from lcsc_ops.interrupts import Interrupted, deferred, handled\n"
            "done = []\n"
            "try:\n"
            "    with handled():\n"
            "        with deferred():\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "            time.sleep(0.3)\n"
            "            done.append(1)\n"
            "        time.sleep(5)\n"
            "except Interrupted as exc:\n"
            "    print(done, exc.exit_code)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=_default_handlers)
    assert out.stdout.split() == ["[1]", "130"], out.stderr


# -- optimize, mid-search ------------------------------------------------------------------------------

def test_sigint_mid_search_fails_the_trial_in_flight_kills_the_run_and_the_same_command_resumes(store, tiny_run,
                                                                                                   tmp_path):
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "12", "--model-name", "stop-sigint", "--seed", "71",
                        "--search-samples", "1024")
    old = _names(store["storage"])
    proc = _start(cmd[3:] + ["--quiet"], tmp_path)
    name = _wait_for_trials(store["storage"], old, proc)
    rc, seconds, out = _stop(proc, signal.SIGINT)
    assert rc == 130 and seconds < 10, (rc, seconds, out)
    _assert_one_clean_line(out, signal.SIGINT, "during the search: trial ")
    assert "ended FAILED (not counted)" in out and "the same command resumes" in out
    parent = _assert_stopped_cleanly(store, name)
    failed = [t for t in _study(store["storage"], name).trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.user_attrs.get("lcsc.interrupted") for t in failed] == [True]  # the trial in flight, nothing else
    _assert_rerun_finishes(store, cmd, name, 12, parent)


def test_sigterm_to_two_workers_mid_search_stops_both_and_the_same_command_resumes(store, tiny_run, tmp_path):
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "12", "--model-name", "stop-workers", "--seed", "73",
                        "--search-samples", "256", "--workers", "2")
    old = _names(store["storage"])
    proc = _start(cmd[3:] + ["--quiet"], tmp_path)
    name = _wait_for_trials(store["storage"], old, proc)
    rc, seconds, out = _stop(proc, signal.SIGTERM)
    assert rc == 143 and seconds < 10, (rc, seconds, out)
    _assert_one_clean_line(out, signal.SIGTERM, "during the search")
    parent = _assert_stopped_cleanly(store, name)
    _assert_rerun_finishes(store, cmd, name, 12, parent)


def test_a_second_ctrl_c_exits_at_once(store, tiny_run, tmp_path):
    """The clean-up after the first SIGINT is slowed down (the parent run's end takes 60 s): the
    second SIGINT ends the process at once, 130."""
    slow = ("from lcsc_ops.store.runs import OptimizeRun\n_end = OptimizeRun.end\n"
            "def end(self, status='FINISHED'):\n    import time\n    time.sleep(60 if status == 'KILLED' else 0)\n"
            "    return _end(self, status)\nOptimizeRun.end = end\n")
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "12", "--model-name", "stop-twice", "--seed", "79",
                        "--search-samples", "256")
    old = _names(store["storage"])
    proc = _start(cmd[3:] + ["--quiet"], tmp_path, slow)
    _wait_for_trials(store["storage"], old, proc)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(2)
    assert proc.poll() is None  # still cleaning up
    rc, seconds, out = _stop(proc, signal.SIGINT)
    assert rc == 130 and seconds < 3, (rc, seconds, out)
    assert "Traceback" not in out, out


# -- optimize, every other stage --------------------------------------------------------------------------

@pytest.mark.parametrize("stage, sig, seed", [("fetch", signal.SIGINT, 83), ("baselines", signal.SIGTERM, 89),
                                              ("final", signal.SIGINT, 97), ("registration", signal.SIGTERM, 101)])
def test_a_signal_in_each_stage_is_one_line_and_the_same_command_finishes(store, tiny_run, tmp_path, stage, sig,
                                                                          seed):
    target, words = STAGES[stage]
    model = f"stop-{stage}"
    cmd = _optimize_cmd(store, tiny_run, "--n-trials", "3", "--model-name", model, "--seed", str(seed))
    old = _names(store["storage"])
    proc = _start(cmd[3:] + ["--quiet"], tmp_path,
                  AT_STAGE.format(signal=signal.Signals(sig).name, target=target))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, out
    _assert_one_clean_line(out, sig, words)
    client = mlflow.tracking.MlflowClient(store["uri"])
    versions = client.search_model_versions(f"name = '{model}'") if stage == "registration" else []
    assert len(versions) == (1 if stage == "registration" else 0)  # registration is never cut in half
    new = _names(store["storage"]) - old
    if stage in ("fetch", "baselines"):
        assert not new or "lcsc.setup" not in _study(store["storage"], new.pop()).user_attrs
        rerun = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        return
    [name] = new
    parent = _assert_stopped_cleanly(store, name)
    _assert_rerun_finishes(store, cmd, name, 3, parent)
    assert len(client.search_model_versions(f"name = '{model}'")) == 1


# -- train and import ----------------------------------------------------------------------------------------

def test_sigterm_during_training_ends_the_run_killed_with_its_checkpoints(store, tmp_path):
    args = ["train", "--tracking-uri", store["uri"], "--steps", "100000", "--batch-size", "32", "--channels", "8",
            "--checkpoint-every", "5", "--sampler-steps", "2", "--log-every", "10", "--experiment", "stop-train",
            "--quiet"]
    proc = _start(args, tmp_path)
    client = mlflow.tracking.MlflowClient(store["uri"])
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("stop-train")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and runs[0].data.metrics.get("loss") is not None:
            break
        time.sleep(0.2)
    rc, seconds, out = _stop(proc, signal.SIGTERM)
    assert rc == 143 and seconds < 10, (rc, seconds, out)
    _assert_one_clean_line(out, signal.SIGTERM, "at step ")
    [run] = client.search_runs([client.get_experiment_by_name("stop-train").experiment_id])
    assert run.info.status == "KILLED"
    assert f"run {run.info.run_id} KILLED with " in out


def test_sigint_during_import_ends_the_run_killed(store, tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in range(1, 7):
        save_file({"weight": torch.full((2, 3), float(step)), "bias": torch.zeros(2)}, str(folder / f"s{step}.safetensors"))
    patch = AT_STAGE.replace("import lcsc_ops.pipeline.optimize as optimize\n",
                             "import lcsc_ops.importers.files as files\n_n = []\n").format(
        signal="SIGINT", target="files.write_checkpoint")
    patch = patch.replace("        if not _sent:", "        _n.append(1)\n        if len(_n) == 3 and not _sent:")
    proc = _start(["import", str(folder), "--factory", "torch.nn:Linear", "--factory-kwargs",
                   '{"in_features": 3, "out_features": 2}', "--step-pattern", r"s(\d+)", "--experiment", "stop-import",
                   "--tracking-uri", store["uri"]], tmp_path, patch)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    _assert_one_clean_line(out, signal.SIGINT, "after ")
    client = mlflow.tracking.MlflowClient(store["uri"])
    [run] = client.search_runs([client.get_experiment_by_name("stop-import").experiment_id])
    assert run.info.status == "KILLED" and f"of 6 checkpoints: run {run.info.run_id} KILLED" in out
