"""The trust boundary: a run's manifest and model spec are untrusted input.

Whoever can write to the MLflow store writes a run's artifacts. A manifest entry must not
place a file outside the checkpoint cache, and a spec must not make optimize (or a
distillation) call a factory from a module the user does not trust.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from lcsc_ops.checkpoints import (MANIFEST_FORMAT, checkpoint_filename, sha256_file, validate_manifest,
                                  validate_run_id, write_checkpoint)
from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, Trust, check_factory_trusted
from lcsc_ops.store.fetch import fetch_window

runner = CliRunner()
LINEAR = ModelSpec(factory="torch.nn:Linear", kwargs={"in_features": 2, "out_features": 2},
                   sampler={"name": "ddim", "steps": 2})
SHA = "0" * 64


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _spec_dict(factory: str = "torch.nn:Linear", **kwargs) -> dict:
    return {**LINEAR.to_dict(), "factory": factory, **({"kwargs": kwargs} if kwargs else {})}


def _entry(step: int = 10, kind: str = "raw", **overrides) -> dict:
    return {"step": step, "kind": kind, "file": checkpoint_filename(step, kind), "sha256": SHA, "bytes": 0,
            **overrides}


def _bad(**overrides) -> dict:
    """Step 10's raw entry with some fields replaced."""
    return {**_entry(), **overrides}


def _manifest(*entries: dict, spec: dict | None = None) -> dict:
    return {"format": MANIFEST_FORMAT, "spec": spec or _spec_dict(), "entries": list(entries or [_entry()])}


def _crafted_run(store, tmp_path: Path, *, spec: dict | None = None, entries: list[dict] | None = None) -> str:
    """A run written by hand, as anyone with write access to the store could: real raw + EMA
    checkpoints at step 10 (a 2x2 Linear), the given spec, and the given manifest entries
    (default: the true ones)."""
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("crafted") or client.get_experiment(client.create_experiment("crafted"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    folder = tmp_path / f"upload-{run_id}"
    folder.mkdir()
    true_entries = []
    for kind in ("raw", "ema"):
        path = folder / checkpoint_filename(10, kind)
        write_checkpoint(path, torch.nn.Linear(2, 2).state_dict(), step=10, kind=kind, spec=LINEAR)
        client.log_artifact(run_id, str(path), "checkpoints")
        true_entries.append(_entry(10, kind, sha256=sha256_file(path), bytes=path.stat().st_size))
    spec = spec or _spec_dict()
    client.log_text(run_id, json.dumps(spec), "lcsc/spec.json")
    manifest = {"format": MANIFEST_FORMAT, "spec": spec, "entries": true_entries if entries is None else entries}
    client.log_text(run_id, json.dumps(manifest), "checkpoints/manifest.json")
    client.set_terminated(run_id)
    return run_id


def _optimize(store, run_id: str, *extra: str):
    return runner.invoke(app, ["optimize", run_id, "--window", "1", "--n-trials", "1", "--search-samples", "8",
                               "--final-samples", "8", "--final-seeds", "1", "--top-k", "1", "--ema-grid", "2",
                               "--no-register", "--device", "cpu", "--batch-size", "8", "--storage",
                               store["storage"], "--tracking-uri", store["uri"], *extra])


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh checkpoint cache for the CLI (LCSC_OPS_CACHE), inside ``tmp_path``."""
    path = tmp_path / "cache"
    monkeypatch.setenv("LCSC_OPS_CACHE", str(path))
    monkeypatch.delenv("LCSC_OPS_TRUST_FACTORY", raising=False)
    return path


# -- the manifest ---------------------------------------------------------------------------------

def test_a_true_manifest_passes():
    entries = [_entry(10, "raw"), _entry(10, "ema"), _entry(123456789, "raw")]  # 9 digits: still the logger's name
    assert validate_manifest(_manifest(*entries), "abc123") == entries


@pytest.mark.parametrize("entry, culprit", [
    (_bad(file="../escaped.safetensors"), "'../escaped.safetensors'"),
    (_bad(file="/tmp/lcsc-absolute.safetensors"), "'/tmp/lcsc-absolute.safetensors'"),
    (_bad(file="sub/step00000010-raw.safetensors"), "'sub/step00000010-raw.safetensors'"),
    (_bad(file="step00000010-raw.safetensors/.."), "'step00000010-raw.safetensors/..'"),
    (_bad(file="step00000011-raw.safetensors"), "'step00000011-raw.safetensors'"),  # not step 10's name
    (_bad(file=None), "None"),
    (_bad(step=True), "step must be a non-negative integer, got True"),
    (_bad(step=-1), "got -1"),
    (_bad(step="10"), "got '10'"),
    (_bad(step=10.0), "got 10.0"),
    (_bad(kind="weird"), "kind must be one of raw, ema, got 'weird'"),
    (_bad(kind=["raw"]), "got ['raw']"),
    (_bad(sha256="A" * 64), "sha256 must be 64 lowercase hex digits"),
    (_bad(sha256="0" * 63), "sha256"),
    (_bad(sha256=7), "got 7"),
    (_bad(bytes=-1), "bytes must be a non-negative integer, got -1"),
    (_bad(bytes=False), "got False"),
    ({k: v for k, v in _entry().items() if k != "sha256"}, "lacks 'sha256'"),
    ("step00000010-raw.safetensors", "must be a JSON object"),
])
def test_bad_manifest_entries_are_refused_with_one_line(entry, culprit):
    with pytest.raises(LcscError) as err:
        validate_manifest(_manifest(_entry(20, "ema"), entry), "abc123")
    message = str(err.value)
    assert "\n" not in message and "run abc123" in message and "entry 1" in message and culprit in message, message


@pytest.mark.parametrize("manifest, culprit", [
    ([], "manifest must be a JSON object"),
    ({**_manifest(), "entries": {"0": _entry()}}, "entries must be a list"),
    ({**_manifest(), "format": "other/1"}, "no checkpoints listed"),
    ({k: v for k, v in _manifest().items() if k != "spec"}, "manifest spec"),
    (_manifest(spec={**_spec_dict(), "factory": 5}), "factory must be an import path"),
    (_manifest(spec={**_spec_dict(), "factory": "../evil:x"}), "factory must be an import path"),
    (_manifest(spec={**_spec_dict(), "kwargs": [1]}), "kwargs must be a JSON object"),
    (_manifest(spec={**_spec_dict(), "sampler": "ddim"}), "sampler must be a JSON object"),
    (_manifest(spec={**_spec_dict(), "image_shape": [1, "8", 8]}), "image_shape must be positive integers"),
])
def test_bad_manifests_are_refused_with_one_line(manifest, culprit):
    with pytest.raises(LcscError) as err:
        validate_manifest(manifest, "abc123")
    assert "\n" not in str(err.value) and "run abc123" in str(err.value) and culprit in str(err.value), str(err.value)


@pytest.mark.parametrize("run_id", ["..", "../x", "a/b", "/abs", "", ".hidden", "a\nb", 7])
def test_run_ids_that_could_leave_the_cache_are_refused(run_id):
    with pytest.raises(LcscError, match="not an MLflow run id"):
        validate_run_id(run_id)
    with pytest.raises(LcscError, match="not an MLflow run id"):
        validate_manifest(_manifest(), run_id)


def test_mlflow_run_ids_pass():
    assert validate_run_id("0123456789abcdef0123456789abcdef") == "0123456789abcdef0123456789abcdef"
    assert validate_run_id("run_1-a") == "run_1-a"


def test_fetch_window_refuses_a_run_id_outside_the_cache(store, tmp_path):
    with pytest.raises(LcscError, match="not an MLflow run id"):
        fetch_window("../../escaped", window=1, tracking_uri=store["uri"], cache_dir=tmp_path / "cache")
    assert not _files(tmp_path)


@pytest.mark.parametrize("where", ["parent", "absolute-new", "absolute-existing"])
def test_manifest_paths_outside_the_cache_are_refused_and_nothing_is_written(store, tmp_path, cache, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "existing.safetensors"
    write_checkpoint(secret, torch.nn.Linear(2, 2).state_dict(), step=10, kind="raw", spec=LINEAR)
    target = {"parent": "../escaped.safetensors", "absolute-new": str(outside / "new.safetensors"),
              "absolute-existing": str(secret)}[where]
    # sha and size match the existing file: the old code read it without any download
    bad = _entry(10, "raw", file=target, sha256=sha256_file(secret), bytes=secret.stat().st_size)
    run_id = _crafted_run(store, tmp_path, entries=[bad])
    before = {p: p.read_bytes() for p in _files(tmp_path)}

    _one_line_error(_optimize(store, run_id), f"run {run_id}", "manifest entry 0", repr(target)[:60])
    with pytest.raises(LcscError, match="manifest entry 0"):
        fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=cache)

    assert {p: p.read_bytes() for p in _files(tmp_path)} == before  # nothing written, nothing changed
    assert not (outside / "new.safetensors").exists() and not (cache / "checkpoints" / "escaped.safetensors").exists()
    assert not (cache / "checkpoints" / run_id).exists()


@pytest.mark.parametrize("bad, culprit", [
    ({"step": True}, "got True"),
    ({"step": "10"}, "got '10'"),
    ({"kind": "best"}, "got 'best'"),
    ({"sha256": "ABC"}, "got 'ABC'"),
    ({"bytes": "12"}, "got '12'"),
])
def test_cli_refuses_bad_entry_types_with_one_line(store, tmp_path, cache, bad, culprit):
    run_id = _crafted_run(store, tmp_path, entries=[_bad(**bad)])
    _one_line_error(_optimize(store, run_id), f"run {run_id}", "manifest entry 0", culprit)
    assert not cache.exists() or not _files(cache)


def test_a_crafted_run_with_a_true_manifest_is_fetched(store, tmp_path, cache):
    run_id = _crafted_run(store, tmp_path)
    window = fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=cache)
    assert [e.label for e in window.entries] == ["raw@10", "ema@10"]
    assert all(e.path.resolve().is_relative_to((cache / "checkpoints" / run_id).resolve()) for e in window.entries)


def test_a_cache_file_linked_outside_the_cache_is_refused(store, tmp_path, cache):
    run_id = _crafted_run(store, tmp_path)
    folder = cache / "checkpoints" / run_id
    folder.mkdir(parents=True)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"not yours")
    (folder / checkpoint_filename(10, "raw")).symlink_to(outside)
    with pytest.raises(LcscError, match="outside the cache"):
        fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=cache)
    assert outside.read_bytes() == b"not yours"


# -- the model factory ----------------------------------------------------------------------------

def test_specs_from_runs_build_only_trusted_factories():
    untrusted = ModelSpec.from_dict(_spec_dict("torch.nn:Identity"), origin="run abc")
    assert untrusted == ModelSpec.from_dict(_spec_dict("torch.nn:Identity"))  # origin is not part of the value
    for spec in (untrusted, untrusted.with_sampler(steps=1)):  # a copy stays untrusted
        with pytest.raises(LcscError, match=r"run abc names model factory 'torch.nn:Identity' from an untrusted "
                                            r"module 'torch.nn'; pass --trust-factory torch.nn"):
            spec.build()
    assert isinstance(untrusted.build(Trust(factory=("torch",))), torch.nn.Identity)
    assert isinstance(untrusted.build(Trust(remote_code=True)), torch.nn.Identity)
    assert isinstance(Trust(factory=("torch.nn",)).vouch(untrusted).build(), torch.nn.Identity)
    assert isinstance(ModelSpec.from_dict(_spec_dict("torch.nn:Identity")).build(), torch.nn.Identity)  # the user's
    with pytest.raises(LcscError, match="untrusted"):
        untrusted.build(Trust(factory=("tor",)))  # a prefix is a whole module name, not a string prefix


def test_built_in_trust(monkeypatch):
    monkeypatch.delenv("LCSC_OPS_TRUST_FACTORY", raising=False)
    check_factory_trusted("lcsc_ops.models.unet:digits_unet")
    check_factory_trusted("lcsc_ops.models.diffusers_unet:unet2d_from_config")
    pytest.importorskip("diffusers")
    check_factory_trusted("diffusers:UNet2DModel")
    for factory in ("diffusers:DiffusionPipeline.from_pretrained", "diffusers:DiffusionPipeline",
                    "lcsc_ops.store.registry:promote", "os:system", "os.system", "subprocess:run"):
        with pytest.raises(LcscError) as err:
            check_factory_trusted(factory, origin="run abc")
        assert "\n" not in str(err.value) and f"'{factory}'" in str(err.value) and "--trust-factory" in str(err.value)


def test_the_environment_lists_trusted_modules(monkeypatch):
    monkeypatch.setenv("LCSC_OPS_TRUST_FACTORY", "my_pkg.nets, torch")
    spec = ModelSpec.from_dict(_spec_dict("torch.nn:Identity"), origin="run abc")
    assert isinstance(spec.build(), torch.nn.Identity)
    monkeypatch.setenv("LCSC_OPS_TRUST_FACTORY", "not a module")
    with pytest.raises(LcscError, match="LCSC_OPS_TRUST_FACTORY"):
        spec.build()


def test_an_untrusted_module_is_not_even_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "lcsc_trust_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                  "def net():\n    raise AssertionError('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = ModelSpec.from_dict(_spec_dict("lcsc_trust_probe:net"), origin="run abc")
    with pytest.raises(LcscError, match="untrusted module 'lcsc_trust_probe'"):
        spec.build()
    assert not marker.exists() and "lcsc_trust_probe" not in sys.modules


def test_cli_refuses_an_untrusted_factory_and_runs_nothing(store, tmp_path, cache):
    marker = tmp_path / "pwned"
    run_id = _crafted_run(store, tmp_path, spec=_spec_dict("os:system", command=f"touch {shlex.quote(str(marker))}"))
    line = _one_line_error(_optimize(store, run_id), f"run {run_id}", "'os:system'", "untrusted module 'os'",
                           "--trust-factory os", "--trust-remote-code")
    assert line.startswith(f"error: run {run_id} names model factory 'os:system'")
    assert not marker.exists()
    assert not (cache / "checkpoints" / run_id).exists()  # refused before any checkpoint was downloaded
    _one_line_error(_optimize(store, run_id, "--trust-factory", "subprocess,osmosis"), "untrusted module 'os'")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["--trust-factory", "--trust-remote-code", "env"])
def test_cli_trusts_a_factory_when_told(store, tmp_path, cache, monkeypatch, how):
    marker = tmp_path / "ran"
    run_id = _crafted_run(store, tmp_path, spec=_spec_dict("os:system", command=f"touch {shlex.quote(str(marker))}"))
    extra = {"--trust-factory": ["--trust-factory", "os"], "--trust-remote-code": ["--trust-remote-code"],
             "env": []}[how]
    if how == "env":
        monkeypatch.setenv("LCSC_OPS_TRUST_FACTORY", "os")
    result = _optimize(store, run_id, *extra)
    # past the check: the factory ran (and returned no nn.Module, which fails for its own reason)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "factory 'os:system' returned int, not an nn.Module" in result.output.splitlines()[-1]
    assert marker.exists()


def test_cli_refuses_a_bad_trust_factory_value(store, tiny_run):
    _one_line_error(runner.invoke(app, ["optimize", tiny_run, "--trust-factory", "os,../x",
                                        "--tracking-uri", store["uri"]]), "--trust-factory", "'../x'")


def test_a_distillation_teacher_from_an_untrusted_factory_is_refused(store, tmp_path, cache):
    marker = tmp_path / "teacher-ran"
    run_id = _crafted_run(store, tmp_path, spec=_spec_dict("os:system", command=f"touch {shlex.quote(str(marker))}"))
    result = runner.invoke(app, ["train", "--model-kind", "consistency", "--teacher-run", run_id, "--steps", "1",
                                 "--channels", "8", "--batch-size", "8", "--experiment", "trust-teacher",
                                 "--tracking-uri", store["uri"]])
    _one_line_error(result, f"run {run_id}", "'os:system'", "LCSC_OPS_TRUST_FACTORY=os")
    assert not marker.exists()
