"""The contract every checkpoint source keeps (STYLE habit 6): one test class, run for every reader of
:mod:`lcsc_ops.store.sources` on the same cases: it lists the steps, fetches verified windows (and
reuses, re-verified, what it cached), refuses a tampered file and a path that leaves its folder, and
an empty run is one error line.

A reader joins by adding a :class:`SourceCase` to ``CASES``: how to write a run in its layout whose
checkpoint at step ``s`` holds :func:`expected_state` ``(s)``, how to read it (options), how to
tamper with a file in the store and how to make a name leave its folder.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from lcsc_ops.checkpoints import SHA256, checkpoint_filename, sha256_file, write_checkpoint
from lcsc_ops.errors import LcscError
from lcsc_ops.models.unet import digits_unet
from lcsc_ops.spec import Trust, spec_from_options
from lcsc_ops.store.sources import RunContext, SourceOptions, detect_layout, fetch_window, list_checkpoints
from tests import foreign_runs as foreign

FACTORY, KWARGS = "lcsc_ops.models.unet:digits_unet", {"channels": 8}
STEPS = [2, 4, 6]
SPEC = spec_from_options(FACTORY, KWARGS)


def expected_state(step: int) -> dict[str, torch.Tensor]:
    """The weights every case's run holds at ``step``."""
    torch.manual_seed(1000 + step)
    return {k: v.clone() for k, v in digits_unet(**KWARGS).state_dict().items()}


def artifact_file(uri: str, run_id: str, path: str) -> Path:
    """Where the store keeps a run's artifact on this machine (a local artifact root); ``<model id>/<path>``:
    a file of one of the run's LoggedModels."""
    client = MlflowClient(uri)
    head, _, inner = path.partition("/")
    models = {o.model_id for o in client.get_run(run_id).outputs.model_outputs}
    if head in models:
        return Path(unquote(urlparse(client.get_logged_model(head).artifact_location).path)) / inner
    root = urlparse(client.get_run(run_id).info.artifact_uri)
    return Path(unquote(root.path)) / path


def grow(uri: str, run_id: str, path: str) -> None:
    """Tamper with an artifact in the store: bytes appended (its size and hash change)."""
    with open(artifact_file(uri, run_id, path), "ab") as f:
        f.write(b"\0tampered")


def escape_listing(monkeypatch: pytest.MonkeyPatch, run_id: str) -> None:
    """The store lists the run's files under names that leave its folder (``../../…``)."""
    real = RunContext.ls

    def ls(self, path=""):
        infos = real(self, path)
        return [type(i)("../../" + i.path, i.is_dir, i.file_size) if not i.is_dir else i for i in infos]

    monkeypatch.setattr(RunContext, "ls", ls)


@dataclass(frozen=True)
class SourceCase:
    layout: str
    make: Callable[[str, Path], tuple[str, dict[int, str]]]  # (uri, tmp) -> run id, {step: artifact path}
    options: SourceOptions
    traverse: Callable[[pytest.MonkeyPatch, str, str], None]  # (monkeypatch, uri, run id)


# ---- our manifest ----------------------------------------------------------------------------

def make_lcsc(uri: str, tmp: Path) -> tuple[str, dict[int, str]]:
    from lcsc_ops.store.logger import CheckpointUploader

    up = CheckpointUploader.create_run(SPEC, experiment="sources-contract", run_name="lcsc",
                                       tags={"lcsc.kind": "import"}, tracking_uri=uri)
    paths = {}
    for step in STEPS:
        folder = tmp / f"lcsc-{step}"
        folder.mkdir()
        path = folder / checkpoint_filename(step, "raw")
        write_checkpoint(path, expected_state(step), step=step, kind="raw", spec=SPEC)
        up.add_step(folder, [{"step": step, "kind": "raw", "file": path.name, "sha256": sha256_file(path),
                              "bytes": path.stat().st_size}])
        paths[step] = f"checkpoints/{path.name}"
    up.end("FINISHED")
    return up.run_id, paths


def traverse_manifest(monkeypatch: pytest.MonkeyPatch, uri: str, run_id: str) -> None:
    """The run's manifest names a file outside the checkpoint folder."""
    manifest = artifact_file(uri, run_id, "checkpoints/manifest.json")
    doc = json.loads(manifest.read_text())
    doc["entries"][-1]["file"] = "../../../escaped.safetensors"
    manifest.write_text(json.dumps(doc))


# ---- Lightning ---------------------------------------------------------------------------------

def make_lightning(uri: str, tmp: Path) -> tuple[str, dict[int, str]]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sources-contract")
    exp_id = exp.experiment_id if exp else client.create_experiment("sources-contract")
    run_id = client.create_run(exp_id, run_name="lightning").info.run_id
    paths = {}
    for step in STEPS:
        stem = f"epoch=0-step={step}"
        (tmp / stem).mkdir()
        path = tmp / stem / f"{stem}.ckpt"
        torch.save({"state_dict": {"net." + k: v for k, v in expected_state(step).items()}, "global_step": step,
                    "epoch": 0, "optimizer_states": [{"state": {}}]}, path)
        client.log_artifact(run_id, str(path), stem)
        paths[step] = f"{stem}/{stem}.ckpt"
    client.set_terminated(run_id)
    return run_id, paths


def escape_model_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store lists a LoggedModel's files under names that leave its folder (``../../…``)."""
    real = MlflowClient.list_logged_model_artifacts

    def ls(self, model_id, path=None):
        return [type(i)("../../" + i.path, i.is_dir, i.file_size) if not i.is_dir else i
                for i in real(self, model_id, path)]

    monkeypatch.setattr(MlflowClient, "list_logged_model_artifacts", ls)


def _foreign(writer: Callable, **kwargs) -> Callable[[str, Path], tuple[str, dict[int, str]]]:
    """A writer of tests/foreign_runs.py (the layout written with plain mlflow) on this suite's steps and states."""
    return lambda uri, tmp: writer(uri, tmp, STEPS, expected_state, **kwargs)


CASES = {
    "lcsc": SourceCase("lcsc", make_lcsc, SourceOptions(), traverse_manifest),
    "lightning": SourceCase("lightning", make_lightning, SourceOptions(spec=SPEC),
                            lambda mp, uri, run_id: escape_listing(mp, run_id)),
    "autolog": SourceCase("autolog", _foreign(foreign.write_autolog_layout), SourceOptions(spec=SPEC),
                          lambda mp, uri, run_id: escape_listing(mp, run_id)),
    "transformers": SourceCase("transformers", _foreign(foreign.write_transformers_layout), SourceOptions(spec=SPEC),
                               lambda mp, uri, run_id: escape_model_listing(mp)),
    "transformers-mlflow2": SourceCase("transformers", _foreign(foreign.write_transformers_layout, mlflow2=True),
                                       SourceOptions(spec=SPEC), lambda mp, uri, run_id: escape_listing(mp, run_id)),
    "mlflow-models-pt2": SourceCase("mlflow-models", _foreign(foreign.write_mlflow3_layout), SourceOptions(spec=SPEC),
                                    lambda mp, uri, run_id: escape_model_listing(mp)),
    "mlflow-models-pickle": SourceCase("mlflow-models", _foreign(foreign.write_mlflow3_layout,
                                                                 serialization_format="pickle"),
                                       SourceOptions(spec=SPEC, allow_pickle=True),
                                       lambda mp, uri, run_id: escape_model_listing(mp)),
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> SourceCase:
    return CASES[request.param]


@pytest.fixture
def made(case, store, tmp_path):
    return case.make(store["uri"], tmp_path)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


class TestSourceContract:
    def test_detects_the_layout_and_lists_every_step(self, case, made, store):
        run_id, paths = made
        listing = list_checkpoints(run_id, store["uri"], case.options)
        assert listing.layout == case.layout == detect_layout(RunContext(run_id, store["uri"]))
        assert sorted(e.step for e in listing.entries if e.kind == "raw") == STEPS
        assert {e.step: e.path for e in listing.entries if e.kind == "raw"} == paths
        assert all(e.bytes is None or e.bytes > 0 for e in listing.entries)

    def test_fetches_a_verified_window_and_reverifies_its_cache(self, case, made, store, tmp_path, monkeypatch):
        run_id, paths = made
        cache = tmp_path / "cache"
        window = fetch_window(run_id, window=2, tracking_uri=store["uri"], cache_dir=cache, trust=Trust(),
                              options=case.options)
        assert window.layout == case.layout and window.steps == tuple(STEPS[-2:])
        raw = [e for e in window.entries if e.kind == "raw"]
        assert [e.step for e in raw] == STEPS[-2:]
        for e in raw:
            assert e.path.resolve().is_relative_to(cache.resolve())
            assert sha256_file(e.path) == e.sha256 and e.path.stat().st_size == e.bytes
            assert e.source == paths[e.step] and SHA256.fullmatch(e.source_sha256)
            assert e.source_sha256 == sha256_file(artifact_file(store["uri"], run_id, e.source))
            got, want = e.load(), expected_state(e.step)
            assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        downloads = []  # of checkpoint files (a reader may read a few bytes of metadata for the steps)
        real, weights = RunContext.download, set(paths.values())
        monkeypatch.setattr(RunContext, "download",
                            lambda self, p, d: (p in weights and downloads.append(p)) or real(self, p, d))
        again = fetch_window(run_id, window=2, tracking_uri=store["uri"], cache_dir=cache, trust=Trust(),
                             options=case.options)
        assert [e.sha256 for e in again.entries] == [e.sha256 for e in window.entries] and downloads == []
        raw[-1].path.write_bytes(raw[-1].path.read_bytes()[:-8] + b"\0" * 8)  # the cached copy corrupted
        third = fetch_window(run_id, window=2, tracking_uri=store["uri"], cache_dir=cache, trust=Trust(),
                             options=case.options)
        assert downloads == [paths[STEPS[-1]]] and sha256_file(third.entries[-1].path) == raw[-1].sha256

    def test_refuses_a_tampered_file(self, case, made, store, tmp_path):
        """A file changed in the store after it was logged (ours: its recorded sha256) or after it was
        first fetched (every reader: the sha256 the cache recorded), its cached copy gone."""
        run_id, paths = made
        cache = tmp_path / "cache"
        first = fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=cache, trust=Trust(),
                             options=case.options)
        first.entries[-1].path.unlink()
        grow(store["uri"], run_id, paths[STEPS[-1]])
        with pytest.raises(LcscError) as exc:
            fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=cache, trust=Trust(),
                         options=case.options)
        assert run_id in _one_line(exc) and "sha256" in str(exc.value)
        assert not first.entries[-1].path.exists()  # nothing of it kept

    def test_refuses_a_name_that_leaves_its_folder(self, case, made, store, tmp_path, monkeypatch):
        run_id, _ = made
        case.traverse(monkeypatch, store["uri"], run_id)
        with pytest.raises(LcscError) as exc:
            fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=tmp_path / "cache", trust=Trust(),
                         options=case.options)
        assert run_id in _one_line(exc)
        assert not list(tmp_path.rglob("escaped*"))

    def test_an_empty_run_is_one_error_line(self, case, store, tmp_path):
        mlflow.set_tracking_uri(store["uri"])
        mlflow.set_experiment("sources-contract")
        with mlflow.start_run() as run:
            mlflow.log_param("lr", 0.1)
        forced = SourceOptions(spec=case.options.spec, layout=case.layout)
        for options in (case.options, forced):
            with pytest.raises(LcscError) as exc:
                fetch_window(run.info.run_id, tracking_uri=store["uri"], cache_dir=tmp_path, options=options)
            assert run.info.run_id in _one_line(exc) and "checkpoints" in str(exc.value)
