"""Every bad input: one ``error:`` line naming the culprit, exit 1, early, and nothing written.

One test (or one parametrised case) per row of the bad-input table of
``../shared/RELIABILITY_CASES.md`` (the ``rNN`` in each case id is the row):

    rows 1-3    optimize: a run id that is no run, a run without checkpoints
    rows 4-11   optimize: option values (window, n-trials, radius, basis, strategy, precision)
    rows 12-14  optimize: a damaged stored checkpoint; a tampered cached one (not an error)
    rows 15-20  import: keys, shapes, dtypes, garbage, NaN/inf
    row  21     optimize: a run whose checkpoints hold NaN
    rows 22-23  an unreachable tracking server (also for import and train)
    rows 24-25  optimize --storage: PostgreSQL that cannot connect, a missing folder
    rows 26-28  optimize --evaluator
    rows 29-31  import --factory / --factory-kwargs
    rows 32-36  promote: model, version, alias
    rows 37-42  import: malicious pickles, links leaving the folder, names with '..' (not an error)
    rows 43-45  optimize: a manifest entry outside the cache, a spec naming os:system
    rows 46-49  kill -9 faults, not inputs: see tests/test_faults.py

Each error case asserts, through the real CLI (``CliRunner().invoke(app, ...)``): exit status
1, exactly one non-empty line starting with ``error: `` that names the culprit, no traceback,
and the store unchanged (no new or changed MLflow run, experiment, registered model, version
or alias, no new Optuna study, no file written or touched in the store's folder or beside the
inputs). Cases marked "before any download" also leave the checkpoint cache empty. No case
trains beyond the session's ``tiny_run`` or scores a single model.
"""
from __future__ import annotations

import os
import pickle
import shlex
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import pytest
import torch
from mlflow.entities import ViewType
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from lcsc_ops.checkpoints import checkpoint_filename, sha256_file, write_checkpoint
from lcsc_ops.cli import app
from lcsc_ops.store.fetch import fetch_window, read_manifest
from tests.test_trust import LINEAR, _crafted_run, _entry, _one_line_error, _optimize, _spec_dict, cache  # noqa: F401

runner = CliRunner()
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
TRUST_LINEAR = ("--trust-factory", "torch.nn")  # crafted runs build torch.nn:Linear


def pair() -> nn.Module:
    """The import cases' model: two tensors, ``w`` (2,) and ``b`` (3,)."""
    net = nn.Module()
    net.w = nn.Parameter(torch.zeros(2))
    net.b = nn.Parameter(torch.zeros(3))
    return net


PAIR = f"{__name__}:pair"
GOOD = {"w": torch.zeros(2), "b": torch.zeros(3)}


class Payload:
    """A pickle that runs a shell command when unpickled (touches ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# -- what "nothing written" means ----------------------------------------------------------------

def _files(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file under ``roots`` (but not under ``skip``) with its size and mtime."""
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not any(p.is_relative_to(s) for s in skip) and not p.name.startswith("mlflow.db"):
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _state(store, *roots: Path) -> dict:
    """The store as a user would list it: experiments, runs (status, params, tags, metrics), registered
    models with their versions, tags and aliases, and every file beside it (the Optuna journal, the
    artifacts; the checkpoint cache excepted) and under ``roots``."""
    client = mlflow.tracking.MlflowClient(store["uri"])
    exps = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL, max_results=50000)
    models = {}
    for m in client.search_registered_models():
        versions = client.search_model_versions(f"name = '{m.name}'")
        models[m.name] = (dict(m.aliases), sorted((v.version, v.run_id, sorted(v.tags.items())) for v in versions))
    return {"experiments": sorted((e.experiment_id, e.name, e.lifecycle_stage) for e in exps),
            "runs": sorted((r.info.run_id, r.info.status, r.info.end_time, sorted(r.data.params.items()),
                            sorted(r.data.tags.items()), sorted(r.data.metrics.items())) for r in runs),
            "models": models,
            "files": _files(store["root"], *roots, skip=(Path(store["cache"]),))}


class Unchanged:
    """``with Unchanged(store, tmp_path):`` asserts the block left the store and ``roots`` as they were."""

    def __init__(self, store, *roots: Path) -> None:
        self.store, self.roots = store, roots

    def __enter__(self) -> "Unchanged":
        self.before = _state(self.store, *self.roots)
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            after = _state(self.store, *self.roots)
            for key in self.before:
                assert after[key] == self.before[key], f"the store's {key} changed"


def _nothing_in(cache: Path) -> None:
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()], "the cache was written"


def _artifact(store, run_id: str, name: str) -> Path:
    """The stored file of artifact ``checkpoints/<name>`` of a run (the test store is a local folder)."""
    uri = mlflow.tracking.MlflowClient(store["uri"]).get_run(run_id).info.artifact_uri
    parsed = urlparse(uri)
    root = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)
    return (root if root.is_absolute() else Path(store["root"]) / root) / "checkpoints" / name


# -- optimize: the run id (rows 1-3) -------------------------------------------------------------

@pytest.mark.parametrize("run_id, needles", [
    pytest.param("0123456789abcdef0123456789abcdef", ["unknown run id", "0123456789abcdef0123456789abcdef"],
                 id="r01-unknown-run-id"),
    pytest.param("../../etc", ["'../../etc'"], id="r02-path-as-run-id"),
    pytest.param("", ["''"], id="r02-empty-run-id"),
])
def test_optimize_a_run_id_that_is_not_a_run(store, cache, run_id, needles):
    with Unchanged(store):
        _one_line_error(_optimize(store, run_id), *needles)
    _nothing_in(cache)


def test_r03_optimize_a_plain_mlflow_run_without_checkpoints(store, cache):
    client = mlflow.tracking.MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("plain") or client.get_experiment(client.create_experiment("plain"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    with Unchanged(store):
        _one_line_error(_optimize(store, run_id), f"run {run_id}", "no checkpoints")
    _nothing_in(cache)


# -- optimize: option values, refused before any download (rows 4-11, 25) ---------------------------

@pytest.mark.parametrize("args, needles", [
    pytest.param(["--window", "50"], ["--window 50", "6 checkpoint steps"], id="r04-window-beyond-the-run"),
    pytest.param(["--window", "7", "--end-step", "35"], ["--window 7", "3 checkpoint steps", "step 35"],
                 id="r04-window-beyond-end-step"),
    pytest.param(["--window", "0"], ["--window must be >= 1, got 0"], id="r05-window-0"),
    pytest.param(["--n-trials", "-1"], ["--n-trials must be >= 1, got -1"], id="r06-n-trials-negative"),
    pytest.param(["--radius", "-1"], ["--radius", "got -1"], id="r07-radius-negative"),
    pytest.param(["--basis", "nonsense"], ["basis", "'nonsense'"], id="r08-basis"),
    pytest.param(["--strategy", "nonsense"], ["'nonsense'"], id="r09-strategy"),
    pytest.param(["--radius", "nan"], ["--radius", "got nan"], id="r10-radius-nan"),
    pytest.param(["--radius", "inf"], ["--radius", "got inf"], id="r10-radius-inf"),
    pytest.param(["--search-precision", "fp8"], ["'fp8'"], id="r11-search-precision"),
    pytest.param(["--storage", "{tmp}/no-such-folder/optuna.journal"], ["no-such-folder", "does not exist"],
                 id="r25-storage-in-a-missing-folder"),
])
def test_optimize_option_values_are_refused_before_any_download(store, tiny_run, cache, tmp_path, args, needles):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with Unchanged(store, tmp_path):
        _one_line_error(_optimize(store, tiny_run, *args), *needles)
    _nothing_in(cache)


def test_r04_a_window_the_run_has_is_accepted(store, tiny_run, tmp_path):
    """The other side of row 4: asking for exactly the steps the run has is fine."""
    window = fetch_window(tiny_run, window=6, tracking_uri=store["uri"], cache_dir=tmp_path / "cache")
    assert window.steps == (10, 20, 30, 40, 50, 60)


# -- optimize: storage and evaluator, refused before any scoring (rows 24, 26-28) -----------------

def test_r24_a_postgresql_storage_that_cannot_connect(store, tiny_run, cache, tmp_path):
    storage = "postgresql://lcsc:hunter2@127.0.0.1:9/optuna"
    with Unchanged(store, tmp_path):
        line = _one_line_error(_optimize(store, tiny_run, "--storage", storage,
                                         "--evaluator", "tests.evaluators:weight_energy"),
                               "postgresql://lcsc:***@127.0.0.1:9/optuna")
    assert "hunter2" not in line


@pytest.mark.parametrize("evaluator, needles", [
    pytest.param("nosuch.mod:fn", ["'nosuch.mod'"], id="r26-evaluator-module-missing"),
    pytest.param("os:nosuchfn", ["'os'", "'nosuchfn'"], id="r27-evaluator-function-missing"),
    pytest.param("os.path", ["'os.path'", "callable"], id="r28-evaluator-not-callable"),
])
def test_optimize_a_bad_evaluator(store, tiny_run, cache, evaluator, needles):
    with Unchanged(store):  # no study (the journal is untouched), no parent run
        _one_line_error(_optimize(store, tiny_run, "--evaluator", evaluator), *needles)


# -- optimize: the tracking server (rows 22, 23, and the same for import and train) -----------------

@pytest.fixture
def http_env(monkeypatch):
    """The reachability check sets MLflow's HTTP retry and timeout variables for the process (and the
    command the process's tracking URI); keep them from leaking into later tests."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    uri = mlflow.get_tracking_uri()  # and the process's tracking URI, which the command sets
    yield
    mlflow.set_tracking_uri(uri)


def _folder(tmp_path: Path, files: dict[str, object], name: str = "ckpts") -> Path:
    """A folder of checkpoint files: a dict of tensors becomes safetensors (or a torch file for .pt/.pth),
    bytes are written as they are."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    for file, content in files.items():
        path = folder / file
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif path.suffix == ".safetensors":
            save_file(content, str(path))
        else:
            torch.save(content, path)
    return folder


def _import(store, folder: Path, *args: str, uri: str | None = None):
    return runner.invoke(app, ["import", str(folder), "--factory", PAIR, "--step-pattern", r"step(\d+)",
                               "--experiment", "bad-input-imports", *args, "--tracking-uri", uri or store["uri"]])


@pytest.mark.parametrize("command", ["r22-optimize", "r23-promote", "import", "train"])
def test_an_unreachable_tracking_server_is_named_within_seconds(store, cache, tmp_path, http_env, command):
    folder = _folder(tmp_path, {"step1.safetensors": GOOD})
    args = {"r22-optimize": ["optimize", "0123456789abcdef0123456789abcdef"],
            "r23-promote": ["promote", "some-model", "1"],
            "import": ["import", str(folder), "--factory", PAIR, "--step-pattern", r"step(\d+)"],
            "train": ["train", "--steps", "1", "--channels", "8", "--batch-size", "8", "--experiment", "x"]}[command]
    with Unchanged(store, tmp_path):
        start = time.monotonic()
        result = runner.invoke(app, [*args, "--tracking-uri", UNREACHABLE])
        took = time.monotonic() - start
        _one_line_error(result, f"MLflow tracking server {UNREACHABLE} is unreachable")
    assert took < 30, f"{took:.1f} s"
    _nothing_in(cache)


def test_a_server_whose_certificate_is_not_verified_here_is_not_called_unreachable(monkeypatch):
    """A server that answers TLS is reachable: trusting its certificate is MLflow's setting
    (MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH), not the reachability check's."""
    import ssl
    import urllib.error

    from lcsc_ops.errors import LcscError
    from lcsc_ops.store import server

    def refuse(exc):
        def urlopen(url, timeout):
            raise exc
        monkeypatch.setattr(server.urllib.request, "urlopen", urlopen)

    refuse(urllib.error.URLError(ssl.SSLCertVerificationError(1, "self-signed certificate")))
    server.check_reachable("https://mlflow.internal:5000")
    refuse(ssl.SSLError(1, "wrong version number"))  # https spoken to a plain http server: it is there
    server.check_reachable("https://mlflow.internal:5000")
    refuse(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    with pytest.raises(LcscError, match="https://mlflow.internal:5000 is unreachable"):
        server.check_reachable("https://mlflow.internal:5000")


def test_an_unreachable_tracking_server_is_the_only_line_of_a_diffusers_import(store, tmp_path, http_env):
    """The same for a folder of diffusers model folders, whose import also notes how it sets up the scheduler:
    that note waits until the import can go ahead."""
    pytest.importorskip("diffusers")
    from tests.test_import_diffusers import tiny_unet

    for step in (10, 20):
        tiny_unet(seed=step).save_pretrained(tmp_path / "models" / f"unet-step{step}")
    with Unchanged(store, tmp_path):
        _one_line_error(runner.invoke(app, ["import", str(tmp_path / "models"), "--step-pattern", r"step(\d+)",
                                            "--tracking-uri", UNREACHABLE]),
                        f"MLflow tracking server {UNREACHABLE} is unreachable")


# -- optimize: what the store holds (rows 12-14, 21, 43-45) -----------------------------------------

@pytest.mark.parametrize("damage", ["r12-two-bytes-flipped", "r13-truncated"])
def test_a_damaged_stored_checkpoint(store, cache, tmp_path, damage):
    run_id = _crafted_run(store, tmp_path)
    name = checkpoint_filename(10, "raw")
    stored = _artifact(store, run_id, name)
    data = bytearray(stored.read_bytes())
    if damage == "r12-two-bytes-flipped":
        data[-1] ^= 0xFF
        data[-5] ^= 0xFF
    else:
        del data[len(data) // 2:]
    stored.write_bytes(bytes(data))
    with Unchanged(store, tmp_path):
        line = _one_line_error(_optimize(store, run_id, *TRUST_LINEAR), f"run {run_id}", name,
                               "fails its sha256 check", "expected ", "got ")
    entry = next(e for e in read_manifest(run_id, store["uri"])["entries"] if e["file"] == name)
    assert entry["sha256"][:12] in line and sha256_file(stored)[:12] in line
    assert not (cache / "checkpoints" / run_id / name).exists()  # the bad download was not kept


def test_r14_a_tampered_cached_checkpoint_is_verified_and_downloaded_again(store, tmp_path):
    """Not an error: the cache is re-verified on every use, and a tampered file is replaced."""
    run_id = _crafted_run(store, tmp_path)
    first = fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=tmp_path / "cache")
    cached = first.entries[0].path
    good = cached.read_bytes()
    cached.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    again = fetch_window(run_id, window=1, tracking_uri=store["uri"], cache_dir=tmp_path / "cache")
    assert again.entries[0].path == cached and cached.read_bytes() == good
    assert sha256_file(cached) == first.entries[0].sha256


def test_r21_a_run_whose_checkpoints_hold_nan(store, cache, tmp_path):
    """Every checkpoint of the window holds NaN: one line naming a file and its tensor, before any scoring."""
    state = {"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}
    local = tmp_path / "nan"
    local.mkdir()
    entries = []
    for kind in ("raw", "ema"):
        path = local / checkpoint_filename(10, kind)
        write_checkpoint(path, state, step=10, kind=kind, spec=LINEAR)
        entries.append(_entry(10, kind, sha256=sha256_file(path), bytes=path.stat().st_size))
    run_id = _crafted_run(store, tmp_path, entries=entries)
    for kind in ("raw", "ema"):
        _artifact(store, run_id, checkpoint_filename(10, kind)).write_bytes(
            (local / checkpoint_filename(10, kind)).read_bytes())
    with Unchanged(store, local):  # the verified downloads may land in the cache: they are whole files
        _one_line_error(_optimize(store, run_id, *TRUST_LINEAR), f"run {run_id}", "NaN or inf", "'weight'")


@pytest.mark.parametrize("where", ["r43-absolute-path", "r44-parent-path"])
def test_a_manifest_entry_that_points_outside_the_cache(store, cache, tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = {"r43-absolute-path": str(outside / "abs.safetensors"), "r44-parent-path": "../escaped.safetensors"}[where]
    run_id = _crafted_run(store, tmp_path, entries=[_entry(10, "raw", file=target)])
    with Unchanged(store, tmp_path):
        _one_line_error(_optimize(store, run_id, *TRUST_LINEAR), f"run {run_id}", "manifest entry 0", repr(target))
    _nothing_in(cache)


def test_r45_a_manifest_spec_naming_os_system(store, cache, tmp_path):
    marker = tmp_path / "pwned"
    run_id = _crafted_run(store, tmp_path, spec=_spec_dict("os:system", command=f"touch {shlex.quote(str(marker))}"))
    with Unchanged(store, tmp_path):
        _one_line_error(_optimize(store, run_id), f"run {run_id}", "'os:system'", "untrusted module 'os'")
    assert not marker.exists()
    _nothing_in(cache)


# -- import: the files (rows 15-20, 37-42) --------------------------------------------------------

@pytest.mark.parametrize("files, needles", [
    pytest.param({"step1.safetensors": {"w2": torch.zeros(2), "b": torch.zeros(3)}},
                 ["step1.safetensors", "key 'w2' is not in the model"], id="r15-renamed-key"),
    pytest.param({"step1.safetensors": {"w": torch.zeros(2)}},
                 ["step1.safetensors", "key 'b' is missing", "--partial"], id="r16-missing-key"),
    pytest.param({"step1.safetensors": {"w": torch.zeros(3), "b": torch.zeros(3)}},
                 ["step1.safetensors", "'w' has shape (3,), the model's is (2,)"], id="r17-shape"),
    pytest.param({"step1.safetensors": GOOD, "step2.safetensors": {"w": torch.zeros(2, dtype=torch.float64),
                                                                   "b": torch.zeros(3)}},
                 ["step2.safetensors", "'w' is torch.float64", "torch.float32"], id="r18-dtype"),
    pytest.param({"step1.safetensors": b"\xff" * 8 + b"{not json" + b"\x00" * 16},
                 ["cannot read step1.safetensors"], id="r19-garbage-safetensors-header"),
    pytest.param({"step1.pt": b"not a torch file at all"}, ["cannot read step1.pt"], id="r19-garbage-torch-file"),
    pytest.param({"step1.safetensors": GOOD, "step2.safetensors": {"w": torch.tensor([0.0, float("nan")]),
                                                                   "b": torch.zeros(3)}},
                 ["step2.safetensors", "tensor 'w' holds NaN or inf"], id="r20-nan"),
    pytest.param({"step1.pt": {"w": torch.zeros(2), "b": torch.tensor([0.0, float("-inf"), 1.0])}},
                 ["step1.pt", "tensor 'b' holds NaN or inf"], id="r20-inf"),
])
def test_import_a_bad_checkpoint_file(store, tmp_path, files, needles):
    folder = _folder(tmp_path, files)
    with Unchanged(store, tmp_path):
        _one_line_error(_import(store, folder), *needles)


@pytest.mark.parametrize("fmt", ["r37-zip-pt", "r38-legacy-pt", "r39-raw-pickle-pth"])
def test_import_a_malicious_pickle_is_refused_and_not_run(store, tmp_path, fmt):
    marker = tmp_path / "pwned"
    obj = {"w": torch.zeros(2), "b": torch.zeros(3), "x": Payload(marker)}
    folder = tmp_path / "ckpts"
    folder.mkdir()
    name = "step1.pth" if fmt == "r39-raw-pickle-pth" else "step1.pt"
    if fmt == "r37-zip-pt":
        torch.save(obj, folder / name)
    elif fmt == "r38-legacy-pt":
        torch.save(obj, folder / name, _use_new_zipfile_serialization=False)
    else:
        (folder / name).write_bytes(pickle.dumps(obj))
    with Unchanged(store, tmp_path):
        _one_line_error(_import(store, folder), f"refusing to unpickle {name}", "system", "--allow-pickle")
    assert not marker.exists()


@pytest.mark.parametrize("target", ["r40-system-file", "r41-checkpoint-outside"])
def test_import_a_link_that_leaves_the_folder(store, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file(GOOD, str(outside / "step2.safetensors"))
    folder = _folder(tmp_path, {"step1.safetensors": GOOD})
    name = "step2.pt" if target == "r40-system-file" else "step2.safetensors"
    (folder / name).symlink_to("/etc/passwd" if target == "r40-system-file" else outside / "step2.safetensors")
    with Unchanged(store, tmp_path):
        _one_line_error(_import(store, folder), name, "outside", str(folder))


def test_r41_a_diffusers_model_folder_linked_from_outside(store, tmp_path):
    """Row 41 for diffusers folders: a model folder that is a link to one elsewhere is refused too."""
    pytest.importorskip("diffusers")
    from tests.test_import_diffusers import tiny_unet

    folder, outside = tmp_path / "models", tmp_path / "outside"
    tiny_unet().save_pretrained(folder / "unet-step10")
    tiny_unet(seed=1).save_pretrained(outside / "unet-step20")
    (folder / "unet-step20").symlink_to(outside / "unet-step20", target_is_directory=True)
    with Unchanged(store, tmp_path):
        _one_line_error(runner.invoke(app, ["import", str(folder), "--step-pattern", r"step(\d+)", "--tracking-uri",
                                            store["uri"]]),
                        "unet-step20/diffusion_pytorch_model.safetensors", "outside", str(folder))


def test_r41_a_link_inside_the_folder_is_followed(store, tmp_path):
    """The other side of row 41: a link to a file of the same folder is an ordinary checkpoint."""
    folder = _folder(tmp_path, {"step1.safetensors": GOOD})
    (folder / "step2.safetensors").symlink_to("step1.safetensors")
    result = _import(store, folder)
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    assert [e["step"] for e in read_manifest(run_id, store["uri"])["entries"]] == [1, 2]


def test_r42_file_names_with_dots_become_the_logger_names(store, tmp_path):
    """Not an error: a file's name is recorded as its source; the artifact's name is rebuilt from its step."""
    folder = _folder(tmp_path, {"..step5.safetensors": GOOD, "a..b-step6..pt": GOOD})
    before = _files(tmp_path)
    result = _import(store, folder)
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip().splitlines()[-1]
    entries = read_manifest(run_id, store["uri"])["entries"]
    assert [(e["file"], e["source"]) for e in entries] == [
        (checkpoint_filename(5, "raw"), "..step5.safetensors"), (checkpoint_filename(6, "raw"), "a..b-step6..pt")]
    assert _files(tmp_path) == before  # nothing written beside the folder
    for e in entries:
        assert _artifact(store, run_id, e["file"]).is_file()


# -- import: the model spec (rows 29-31) ----------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    pytest.param(["--factory", "nosuch.mod:build"], ["'nosuch.mod'"], id="r29-factory-module-missing"),
    pytest.param(["--factory", "os:nosuchfn"], ["'os'", "'nosuchfn'"], id="r30-factory-function-missing"),
    pytest.param(["--factory", "lcsc_ops.models.unet:digits_unet", "--factory-kwargs", '{"channels": "x"}'],
                 ["'lcsc_ops.models.unet:digits_unet'", '{"channels": "x"}'], id="r31-factory-kwargs-wrong-type"),
    pytest.param(["--factory-kwargs", '{"channels": '], ["factory kwargs", "not valid JSON"],
                 id="r31-factory-kwargs-not-json"),
])
def test_import_a_bad_model_spec(store, tmp_path, args, needles):
    folder = _folder(tmp_path, {"step1.safetensors": GOOD})
    with Unchanged(store, tmp_path):
        _one_line_error(_import(store, folder, *args), *needles)


# -- promote (rows 32-36) -------------------------------------------------------------------------

@pytest.fixture
def model_version(store, tiny_run) -> str:
    """Registered model ``bad-input-model`` with one version (no alias)."""
    client = mlflow.tracking.MlflowClient(store["uri"])
    if not client.search_registered_models("name = 'bad-input-model'"):
        client.create_registered_model("bad-input-model")
        client.create_model_version("bad-input-model", f"runs:/{tiny_run}/checkpoints", run_id=tiny_run)
    return "bad-input-model"


@pytest.mark.parametrize("args, needles", [
    pytest.param(["no-such-model", "1"], ["unknown registered model 'no-such-model'"], id="r32-unknown-model"),
    pytest.param(["bad-input-model", "42"], ["'bad-input-model'", "no version '42'"], id="r33-unknown-version"),
    pytest.param(["bad-input-model", "0"], ["version must be a positive integer", "got '0'"], id="r34-version-0"),
    pytest.param(["bad-input-model", "abc"], ["version must be a positive integer", "got 'abc'"],
                 id="r35-version-abc"),
    pytest.param(["bad-input-model", "٣"], ["version must be a positive integer", "got '٣'"],
                 id="r35-version-arabic-digit"),
    pytest.param(["bad-input-model", "1", "--alias", "my champ"], ["alias 'my champ'"], id="r36-alias-with-space"),
    pytest.param(["bad-input-model", "1", "--alias", ""], ["alias ''"], id="r36-alias-empty"),
])
def test_promote_bad_input(store, model_version, args, needles):
    with Unchanged(store):
        _one_line_error(runner.invoke(app, ["promote", *args, "--tracking-uri", store["uri"]]), *needles)


def test_promote_good_input_moves_the_alias(store, model_version):
    """The other side of rows 32-36: the same model, version and a plain alias work."""
    result = runner.invoke(app, ["promote", model_version, "1", "--alias", "bad-input-ok", "--tracking-uri",
                                 store["uri"]])
    assert result.exit_code == 0, result.output
    client = mlflow.tracking.MlflowClient(store["uri"])
    assert str(client.get_model_version_by_alias(model_version, "bad-input-ok").version) == "1"
