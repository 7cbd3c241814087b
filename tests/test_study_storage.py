"""Where a study lives by default (an Optuna journal file beside the MLflow store), and the start
trial that puts the centre into an empty study."""
from __future__ import annotations

import optuna
import pytest

from lcsc_ops.errors import LcscError
from lcsc_ops.math.encoding import AffineEncoding
from lcsc_ops.search.trials import add_start_trial, run_trials
from lcsc_ops.search.storage import default_storage, make_storage
from lcsc_ops.search.strategies import make_strategy
from lcsc_ops.search.study import SearchStudy
from optuna.testing.pytest_storages import StorageTestCase

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_default_storage_is_a_journal_file_beside_the_mlflow_store(tmp_path):
    assert default_storage(f"sqlite:///{tmp_path / 'mlflow.db'}") == str(tmp_path / "optuna.journal")
    assert default_storage(str(tmp_path / "mlruns")) == str(tmp_path / "optuna.journal")
    assert isinstance(make_storage(str(tmp_path / "optuna.journal")), optuna.storages.JournalStorage)
    assert isinstance(make_storage(f"sqlite:///{tmp_path / 'o.db'}"), optuna.storages.RDBStorage)


def test_a_store_with_the_old_sqlite_default_keeps_it(tmp_path):
    """Studies started before the journal default stay resumable."""
    (tmp_path / "optuna.db").touch()
    assert default_storage(f"sqlite:///{tmp_path / 'mlflow.db'}") == f"sqlite:///{tmp_path / 'optuna.db'}"
    (tmp_path / "optuna.journal").touch()  # once a journal exists, it wins
    assert default_storage(f"sqlite:///{tmp_path / 'mlflow.db'}") == str(tmp_path / "optuna.journal")


def test_a_journal_study_resumes_when_opened_again(tmp_path):
    enc = AffineEncoding(centre=(0.25, 0.25, 0.25, 0.25), radius=0.3)
    path = str(tmp_path / "optuna.journal")
    first = SearchStudy.open("s", path)
    first.use_strategy("cmaes", 0)
    assert first.run(enc, lambda c: sum(x * x for x in c), 4) == 4
    again = SearchStudy.open("s", path)
    again.use_strategy("cmaes", 0)
    assert again.run(enc, lambda c: sum(x * x for x in c), 6) == 2
    assert [t.number for t in again.records()] == list(range(6))


@pytest.mark.parametrize("bad, why", [(".", "is a folder"), ("no/such/dir/optuna.journal", "does not exist")])
def test_a_bad_journal_path_is_a_one_line_error(tmp_path, monkeypatch, bad, why):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LcscError, match=why) as err:
        SearchStudy.open("s", bad)
    assert "\n" not in str(err.value)


def test_the_start_trial_is_the_centre_and_cmaes_samples_around_it_from_the_first_trial():
    enc = AffineEncoding(centre=(0.1, 0.2, 0.3, 0.4), radius=0.3)
    study = optuna.create_study(sampler=make_strategy("cmaes", 0))
    assert add_start_trial(study, enc, 1.5, "training_ema")
    assert not add_start_trial(study, enc, 1.5, "training_ema")  # only into an empty study
    start = study.trials[0]
    assert start.value == 1.5 and start.user_attrs["lcsc.start"] == "training_ema"
    assert start.user_attrs["coefficients"] == list(enc.centre)
    # the budget counts searched trials only, and the first one is already CMA-ES's (not a uniform draw)
    assert run_trials(study, enc, lambda c: sum(x * x for x in c), 3) == 3
    assert len(study.trials) == 4
    assert all("cma:generation" in t.system_attrs for t in study.trials[1:])


def test_without_a_start_trial_cmaes_draws_its_first_trial_from_the_independent_sampler():
    """Why the start trial exists: Optuna's CMA-ES knows no search space before a trial completes."""
    enc = AffineEncoding(centre=(0.1, 0.2, 0.3, 0.4), radius=0.3)
    study = optuna.create_study(sampler=make_strategy("cmaes", 0))
    run_trials(study, enc, lambda c: sum(x * x for x in c), 2)
    assert "cma:generation" not in study.trials[0].system_attrs
    assert "cma:generation" in study.trials[1].system_attrs


def test_plain_optuna_reads_the_default_journal(tmp_path):
    from optuna.storages.journal import JournalFileBackend

    enc = AffineEncoding(centre=tuple([1 / 16] * 16), radius=0.3)
    path = str(tmp_path / "optuna.journal")
    study = SearchStudy.open("s", path)
    study.use_strategy("cmaes", 0)
    study.run(enc, lambda c: sum(x * x for x in c), 4)
    plain = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(JournalFileBackend(path)))
    assert [t.params for t in plain.trials] == [r.params for r in study.records()]
    assert [t.value for t in plain.trials] == [r.value for r in study.records()]


class TestDefaultStorageContract(StorageTestCase):
    """Optuna's own storage contract suite, against the storage ``--storage PATH`` (and the default) opens."""

    @pytest.fixture
    def storage(self, tmp_path):
        return make_storage(str(tmp_path / "optuna.journal"))


class TestSqliteStorageContract(StorageTestCase):
    """The same suite against the WAL-mode sqlite storage ``--storage sqlite:///…`` opens."""

    @pytest.fixture
    def storage(self, tmp_path):
        return make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")


def test_run_trials_counts_the_trials_that_ran_when_a_study_is_stopped_early():
    enc = AffineEncoding(centre=(0.25, 0.25, 0.25, 0.25), radius=0.3)
    study = optuna.create_study(sampler=make_strategy("random", 0))

    assert run_trials(study, enc, lambda c: 1.0, 10, should_stop=lambda t: t.number == 2) == 3
