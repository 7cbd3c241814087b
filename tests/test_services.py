"""With real services: PostgreSQL (Optuna's study, and MLflow's backend store) and an ``mlflow server``
that proxies artifacts; the CLI runs as subprocesses, several workers at once, one killed with -9.

Skipped, with the reason, where PostgreSQL's binaries or psycopg (v3) are missing.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from safetensors.torch import save_file

from lcsc_ops.search.storage import make_storage
from lcsc_ops.search.trials import NONFINITE_ATTR, SURPLUS_ATTR, is_start
from lcsc_ops.search.workers import fail_stale_trials
from tests.conftest import TINY_TRAIN
from tests.services import Postgres, Unavailable, mlflow_server, postgres_server

EXPERIMENT = "services"
# The tiny search of tests/conftest.py's tiny_optimize_config, as CLI options.
TINY_OPTIMIZE = {"window": 4, "search-samples": 64, "final-samples": 64, "final-seeds": 2, "top-k": 2, "ema-grid": 3,
                 "batch-size": 64, "device": "cpu"}
PASSWORD, WRONG_PASSWORD = "Zq81-pw-secret", "Wr0ng-pw-77x"
UNET = {"factory": "lcsc_ops.models.unet:digits_unet", "kwargs": {"channels": 8}}


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def pg(tmp_path_factory) -> Iterator[Postgres]:
    try:
        with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
            yield server
    except Unavailable as exc:
        pytest.skip(f"no PostgreSQL here: {exc}")


@pytest.fixture(scope="session")
def services(pg, tmp_path_factory) -> Iterator[dict]:
    """An ``mlflow server`` whose backend store is a PostgreSQL database and which proxies
    artifacts to ``<root>/artifacts``; subprocesses run in ``root`` with their own checkpoint cache."""
    root = tmp_path_factory.mktemp("services")
    with mlflow_server(root, pg.new_database("mlflow")) as url:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update(LCSC_OPS_CACHE=str(root / "cache"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
        yield {"pg": pg, "url": url, "root": root, "artifacts": root / "artifacts", "env": env}


@pytest.fixture(scope="session")
def trained(services) -> str:
    """``lcsc-ops train`` (tests/conftest.py's tiny settings) against the server: the run id."""
    settings = {**TINY_TRAIN, "experiment": EXPERIMENT, "model_name": "svc-ddpm"}
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    result = cli(services, "train", *flags, "--tracking-uri", services["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------- helpers

def cli(services: dict, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lcsc_ops.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env or services["env"], cwd=services["root"])


def optimize_args(services: dict, run_id: str, storage: str, **options: object) -> list[str]:
    settings = {**TINY_OPTIMIZE, **{k.replace("_", "-"): v for k, v in options.items()}}
    flags = [x for k, v in settings.items() for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]
    return ["optimize", run_id, "--tracking-uri", services["url"], "--storage", storage, *flags]


class Worker:
    """``lcsc-ops <args>`` as a subprocess, its output spooled to files (no pipe can fill up)."""

    def __init__(self, services: dict, args: list[str], env: dict | None = None) -> None:
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "lcsc_ops.cli", *args], stdout=self.out,
                                     stderr=self.err, text=True, env=env or services["env"], cwd=services["root"])

    def wait(self, timeout: float = 400) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"lcsc-ops still running after {timeout:.0f} s: {self.output()[1][-3000:]}") from None
        return (code, *self.output())

    def output(self) -> tuple[str, str]:
        self.out.seek(0), self.err.seek(0)
        return self.out.read(), self.err.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        self.out.close(), self.err.close()


@contextlib.contextmanager
def workers(services: dict, *commands: list[str], env: dict | None = None) -> Iterator[list[Worker]]:
    """Start every command at once; whatever is still running at the end is killed."""
    started: list[Worker] = []
    try:
        for args in commands:
            started.append(Worker(services, args, env))
        yield started
    finally:
        for w in started:
            w.stop()


def poll(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def trial_rows(pg: Postgres, database: str) -> list[tuple[int, str, bool]]:
    """(number, state, is the start trial) of the search study's trials, read with SQL (no Optuna
    storage is opened, so the test creates no table in the workers' empty database)."""
    if "trials" not in pg.tables(database):
        return []
    return pg.query("SELECT t.number, t.state::text, EXISTS (SELECT 1 FROM trial_user_attributes a "
                    "WHERE a.trial_id = t.trial_id AND a.key = 'lcsc.start') "
                    "FROM trials t JOIN studies s ON s.study_id = t.study_id "
                    "WHERE s.study_name NOT LIKE '%:lock:%' ORDER BY t.number", database)


def searched(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == TrialState.COMPLETE and not is_start(t)]


def parent_runs(client: MlflowClient, study_name: str) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`optuna.study` = '{study_name}' and tags.`lcsc.kind` = 'optimize'"))


def child_trials(client: MlflowClient, parent) -> list[int]:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000)
    return [int(r.data.tags["lcsc.trial"]) for r in runs]


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[None]:
    """This process's MLflow tracking URI, restored afterwards (other tests pass theirs explicitly)."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


# ---------------------------------------------------------------------------------------------------- PostgreSQL alone

def _race(url: str, make: Callable[[str], object], n: int = 4) -> list[str]:
    """``make(url)`` in ``n`` threads released at the same instant; the errors, one line each."""
    barrier, errors = threading.Barrier(n), []

    def go() -> None:
        barrier.wait()
        try:
            make(url)
        except Exception as exc:  # noqa: BLE001 - the test counts them
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    threads = [threading.Thread(target=go) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_a_stopped_mlflow_server_leaves_no_process_port_or_dev_shm_folder(tmp_path):
    """The server makes a job-queue folder in /dev/shm and leaves it when stopped; the fixture removes it."""
    shm = Path("/dev/shm")
    before = set(shm.iterdir()) if shm.is_dir() else set()
    with mlflow_server(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", workers=1) as url:
        assert MlflowClient(url).search_experiments()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)
    assert (set(shm.iterdir()) if shm.is_dir() else set()) <= before


def test_workers_creating_the_tables_of_an_empty_database_at_once_all_succeed(pg):
    # The collision is real here: Optuna's own RDBStorage, four at once on an empty database.
    raw = [e for i in range(3) for e in _race(pg.new_database(f"race_raw_{i}"), optuna.storages.RDBStorage)]
    assert any("pg_type_typname_nsp_index" in e for e in raw), raw
    for i in range(3):
        url = pg.new_database(f"race_ours_{i}")
        assert _race(url, make_storage) == []
        assert {"studies", "trials", "version_info"} <= set(pg.tables(f"race_ours_{i}"))
        study = optuna.create_study(study_name="s", storage=make_storage(url))
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        assert len(study.trials) == 2


def test_on_postgres_a_live_trial_older_than_the_grace_period_is_kept_and_dead_ones_failed(pg):
    url = pg.new_database("optuna_heartbeat")
    mine = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    theirs = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=mine)
    other = optuna.load_study(study_name="s", storage=theirs)  # another worker, on its own connection
    started, release = threading.Event(), threading.Event()

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)  # as the search's objective does first
        started.set()
        release.wait(60)
        return 1.0

    live = threading.Thread(target=study.optimize, args=(objective,), kwargs={"n_trials": 1})
    live.start()
    try:
        assert started.wait(60)
        t0 = other.trials[0].datetime_start.timestamp()
        poll(lambda: time.time() - t0 > 3.5, 10, "the live trial to outlive the grace period", 0.1)
        assert fail_stale_trials(other, theirs, grace=2) == []  # Optuna's heartbeat says it is alive
    finally:
        release.set()
        live.join()
    assert [t.state for t in other.trials] == [TrialState.COMPLETE]

    # Two dead workers: one killed after its trial's first beat, one inside study.ask (which creates
    # the trial and runs the sampler before Optuna's heartbeat starts): Optuna never fails the latter.
    dead, never = study.ask(), study.ask()
    mine.record_heartbeat(dead._trial_id)
    born = time.time()
    assert fail_stale_trials(other, theirs, grace=2) == []  # not yet: both are younger than the grace period
    poll(lambda: time.time() - born > 3.5, 10, "the dead trials to outlive the grace period", 0.1)
    assert sorted(fail_stale_trials(other, theirs, grace=2)) == [dead.number, never.number]
    assert [t.state for t in other.trials[1:]] == [TrialState.FAIL, TrialState.FAIL]


# ---------------------------------------------------------------------------------------------------- the CLI on the services

def test_two_workers_on_an_empty_postgres_database_share_one_study(services, trained):
    pg, client = services["pg"], MlflowClient(services["url"])
    url = pg.new_database("optuna_two")
    assert pg.tables("optuna_two") == []  # the two workers create Optuna's tables, at once
    root = services["root"]
    cmds = [optimize_args(services, trained, url, n_trials=6, seed=101, model_name="svc-two",
                          report=root / f"two-{i}.json") for i in range(2)]
    with workers(services, *cmds) as ws:
        results = [w.wait() for w in ws]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    reports = [json.loads((root / f"two-{i}.json").read_text()) for i in range(2)]
    name, parent = reports[0]["study"], reports[0]["parent_run_id"]
    assert {r["study"] for r in reports} == {name} and {r["parent_run_id"] for r in reports} == {parent}

    study = optuna.load_study(study_name=name, storage=url)
    done = searched(study)
    assert len(done) == 6 and all(r["trials"] == 6 for r in reports)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    assert len({tuple(t.user_attrs["coefficients"]) for t in done}) == 6  # no point scored twice
    assert [p.info.run_id for p in parent_runs(client, name)] == [parent]
    assert client.get_run(parent).info.status == "FINISHED"
    # The baselines are scored and logged once, by the worker that holds the setup lock.
    assert len(client.get_metric_history(parent, "search_fid.last")) == 1
    versions = client.search_model_versions("name = 'svc-two'")
    assert len(versions) == 1 and {r["registered_model"]["version"] for r in reports} == {versions[0].version}
    children = child_trials(client, client.get_run(parent))
    assert sorted(children) == sorted(t.number for t in study.trials if t.state == TrialState.COMPLETE)


def test_kill_9_of_one_of_two_workers_on_postgres_loses_and_repeats_no_trial(services, trained):
    pg, client, root = services["pg"], MlflowClient(services["url"]), services["root"]
    url = pg.new_database("optuna_kill")
    env = {**services["env"], "LCSC_OPS_GRACE_S": "3", "LCSC_OPS_HEARTBEAT_S": "1"}
    n = 10
    # Trials of 4x the samples on 2 seeds, so that both workers are inside one most of the time.
    cmds = [optimize_args(services, trained, url, n_trials=n, seed=202, search_samples=256, search_seeds=2,
                          model_name="svc-kill", report=root / f"kill-{i}.json") for i in range(2)]
    with workers(services, *cmds, env=env) as (victim, survivor):
        def both_in_a_trial():
            assert victim.proc.poll() is None and survivor.proc.poll() is None, "a worker ended before the kill"
            rows = trial_rows(pg, "optuna_kill")
            running = [num for num, state, start in rows if state == "RUNNING"]
            done = [num for num, state, start in rows if state == "COMPLETE" and not start]
            return (running, done) if len(running) == 2 and len(done) >= 2 else None

        running_at_kill, done_at_kill = poll(both_in_a_trial, 300, "both workers inside a trial, mid-search")
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        code, out, err = survivor.wait()
    assert code == 0, err[-3000:]
    report = json.loads((root / "kill-1.json").read_text())
    study = optuna.load_study(study_name=report["study"], storage=url)
    states = {t.number: t for t in study.trials}
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]  # nothing left RUNNING
    done = searched(study)
    assert len(done) == n and report["trials"] == n  # exactly the budget
    assert set(done_at_kill) <= {t.number for t in done}  # nothing lost
    assert len({tuple(t.user_attrs["coefficients"]) for t in done}) == n  # nothing repeated
    # The killed worker's trial, and only it, was failed for its stopped heartbeat (not surplus, not NaN).
    stale = [t.number for t in study.trials if t.state == TrialState.FAIL
             and SURPLUS_ATTR not in t.user_attrs and NONFINITE_ATTR not in t.user_attrs]
    assert len(stale) == 1 and stale[0] in running_at_kill, (stale, running_at_kill)
    assert states[next(x for x in running_at_kill if x != stale[0])].state == TrialState.COMPLETE
    parents = parent_runs(client, report["study"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = child_trials(client, parents[0])
    assert len(children) == len(set(children)) and set(children) <= {
        t.number for t in study.trials if t.state == TrialState.COMPLETE}
    assert len(client.search_model_versions("name = 'svc-kill'")) == 1


def _walk(n: int) -> list[dict[str, torch.Tensor]]:
    from lcsc_ops.models.unet import digits_unet

    gen = torch.Generator().manual_seed(0)
    state, out = digits_unet(**UNET["kwargs"]).state_dict(), []
    for _ in range(n):
        state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in state.items()}
        out.append(state)
    return out


def test_every_verb_against_a_proxied_mlflow_server_on_postgres(services, trained, tmp_path):
    """train (the session's run), optimize (journal file storage), promote, import: through the server,
    artifacts proxied into its --artifacts-destination, MLflow's tables in PostgreSQL."""
    from lcsc_ops.store.fetch import fetch_window

    url, client, root = services["url"], MlflowClient(services["url"]), services["root"]
    assert "runs" in services["pg"].tables("mlflow")
    assert client.get_run(trained).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list(services["artifacts"].rglob("*.safetensors"))  # the checkpoints went through the server

    journal = tmp_path / "optuna.journal"
    result = cli(services, *optimize_args(services, trained, str(journal), n_trials=3, seed=303,
                                          model_name="svc-verbs", report=tmp_path / "verbs.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "verbs.json").read_text())
    assert report["trials"] == 3 and journal.is_file()
    version = report["registered_model"]["version"]

    result = cli(services, "promote", "svc-verbs", str(version), "--alias", "champion", "--tracking-uri", url)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"svc-verbs@champion -> version {version}" in result.stdout
    champion = client.get_model_version_by_alias("svc-verbs", "champion")
    assert champion.version == str(version) and champion.run_id == report["parent_run_id"]
    with tracking_uri(url):
        model = mlflow.pytorch.load_model("models:/svc-verbs@champion")  # downloaded through the proxy
    expected = _walk(1)[0]
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in expected.items()}

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    states = _walk(3)
    for i, state in enumerate(states, start=1):
        save_file(state, str(folder / f"ckpt-step{10 * i}.safetensors"))
    result = cli(services, "import", str(folder), "--factory", UNET["factory"], "--factory-kwargs",
                 json.dumps(UNET["kwargs"]), "--sampler-steps", "2", "--step-pattern", r"step(\d+)",
                 "--experiment", "services-import", "--tracking-uri", url)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = result.stdout.strip().splitlines()[-1]
    run = client.get_run(imported)
    assert run.data.tags["lcsc.kind"] == "import" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    with tracking_uri(url):
        window = fetch_window(imported, window=3, tracking_uri=url, cache_dir=tmp_path / "cache")
    assert window.steps == (10, 20, 30)
    for entry, state in zip(window.entries, states):
        loaded = entry.load()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not (root / "mlruns").exists() and not (root / "mlflow.db").exists()  # nothing stored client-side


@pytest.fixture(scope="module")
def password_run(services, trained, tmp_path_factory) -> dict:
    """``lcsc-ops optimize --json`` with ``--storage postgresql+psycopg://lcscpw:<password>@...``."""
    pg, tmp = services["pg"], tmp_path_factory.mktemp("password")
    pg.create_user("lcscpw", PASSWORD)
    pg.new_database("optuna_pw", owner="lcscpw")
    good = pg.dsn("optuna_pw", user="lcscpw", password=PASSWORD)
    args = optimize_args(services, trained, good, n_trials=2, seed=404, model_name="svc-pw", report=tmp / "pw.json")
    result = cli(services, *args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"result": result, "report": json.loads((tmp / "pw.json").read_text()), "tmp": tmp}


def test_a_password_in_the_storage_url_stays_out_of_params_tags_and_log_lines(services, password_run):
    client = MlflowClient(services["url"])
    assert PASSWORD not in password_run["result"].stderr
    parent = client.get_run(password_run["report"]["parent_run_id"])
    assert "lcscpw:***@" in parent.data.params["storage"] and "lcscpw:***@" in parent.data.tags["optuna.storage"]
    for key, value in [*parent.data.params.items(), *parent.data.tags.items()]:
        assert PASSWORD not in value, key
    exp = [parent.info.experiment_id]
    assert not client.search_runs(exp, filter_string=f"params.storage LIKE '%{PASSWORD}%'")
    assert not client.search_runs(exp, filter_string=f"tags.`optuna.storage` LIKE '%{PASSWORD}%'")


def test_a_password_in_the_storage_url_stays_out_of_the_json_output_and_results(services, password_run):
    """``--json`` prints the report, which is also results.json of the parent run."""
    assert PASSWORD not in password_run["result"].stdout
    parent_id = password_run["report"]["parent_run_id"]
    results = Path(mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="results.json",
                                                       dst_path=str(password_run["tmp"]), tracking_uri=services["url"]))
    assert PASSWORD not in results.read_text()


def test_a_wrong_password_is_one_error_line_that_shows_no_password(services, trained, password_run):
    pg, client = services["pg"], MlflowClient(services["url"])
    exp = [client.get_experiment_by_name(EXPERIMENT).experiment_id]
    before = len(client.search_runs(exp, filter_string="tags.`lcsc.kind` = 'optimize'"))
    bad = pg.dsn("optuna_pw", user="lcscpw", password=WRONG_PASSWORD)
    result = cli(services, *optimize_args(services, trained, bad, n_trials=2, seed=405, model_name="svc-pw"))
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert "password authentication failed" in errors[0] and "lcscpw:***@127.0.0.1" in errors[0], errors[0]
    assert WRONG_PASSWORD not in output and PASSWORD not in output
    assert len(client.search_runs(exp, filter_string="tags.`lcsc.kind` = 'optimize'")) == before  # nothing half-made
