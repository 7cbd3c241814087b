"""No guessing in the API: a spec for a model that is not an image model, checked when the logger
starts; a model name on the logger; metric names that follow the evaluator; data sets by import
path (trusted like factories, part of the reference-statistics key); the score cache and a second
metric for custom evaluators; the seeds in results.json and what ± means in the table."""
from __future__ import annotations

import importlib
import json
import re
import statistics
import sys
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec, Trust
from lcsc_ops.store.reports import load_results
from tests.conftest import tiny_optimize_config
from tests.test_trust import _crafted_run, _one_line_error, _optimize, _spec_dict, cache  # noqa: F401

# The evaluators below are imported by path ("tests.test_api:energy") by the code under test: a
# second copy of this file (pytest imports it as "test_api"), so their calls are read from there.
ME = "tests.test_api"
CALLS: list[tuple[str, int, int]] = []
runner = CliRunner()


def tiny_mlp(width: int = 4) -> nn.Module:
    """A model that is not an image model: 3 numbers in, 3 out."""
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 3))


def energy(model, num_samples, seed):
    """A custom score (lower is better), with a small seed-dependent part so seeds differ."""
    CALLS.append(("energy", num_samples, seed))
    return float(sum(p.double().pow(2).sum() for p in model.parameters())) + 1e-3 * (seed % 7)


def roughness(model, num_samples, seed):
    """A second custom metric."""
    CALLS.append(("roughness", num_samples, seed))
    return float(sum(p.double().abs().sum() for p in model.parameters()))


PROBE: list[str] = []


def probe_net() -> nn.Module:
    """A factory that records where its weights were made."""
    net = nn.Linear(2, 2)
    PROBE.append(net.weight.device.type)
    return net


def needs_real_tensors() -> nn.Module:
    """A factory that reads tensor values (it fails on the meta device)."""
    net = nn.Linear(2, 2)
    PROBE.append(f"value {float(net.weight.detach().sum()):.0f}")
    return net


def tiny_images() -> torch.Tensor:
    """A data-set loader named by import path: 6 grey 4x4 images in [-1, 1]."""
    return torch.rand((6, 1, 4, 4), generator=torch.Generator().manual_seed(0)) * 2 - 1


def images_0_255() -> torch.Tensor:
    return torch.randint(0, 256, (6, 1, 4, 4), generator=torch.Generator().manual_seed(0)).float()


def images_3d() -> torch.Tensor:
    return torch.zeros(6, 4, 4)


def images_uint8() -> torch.Tensor:
    return torch.zeros(6, 1, 4, 4, dtype=torch.uint8)


class TinyFeatures(nn.Module):
    """A feature extractor for the reference-cache test: the first 4 pixels."""

    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.flatten(1)[:, :4].float() * self.scale


def _me():
    return importlib.import_module(ME)


def _calls(name: str) -> list[tuple[int, int]]:
    return [(n, s) for who, n, s in _me().CALLS if who == name]


def _assert_one_line(exc: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text


# -- 1. a spec without a data set or image shape; old specs still load -----------------------------

OLD_SPEC = {"version": 1, "factory": "lcsc_ops.models.unet:digits_unet", "kwargs": {"channels": 8},
            "sampler": {"name": "ddim", "steps": 10}, "dataset": "digits", "image_shape": [1, 8, 8]}


def test_a_spec_may_have_no_data_set_or_image_shape_and_old_specs_load_unchanged():
    spec = ModelSpec(factory=f"{ME}:tiny_mlp", dataset=None, image_shape=None)
    assert spec.to_dict()["dataset"] is None and spec.to_dict()["image_shape"] is None
    assert ModelSpec.from_json(spec.to_json()) == spec
    vector = ModelSpec(factory=f"{ME}:tiny_mlp", dataset=None, image_shape=(3,))
    assert ModelSpec.from_json(vector.to_json()).image_shape == (3,)
    # what to_dict wrote before (and a spec written before dataset/image_shape existed) loads as it was
    old = ModelSpec.from_dict(OLD_SPEC, origin="run old")
    assert (old.dataset, old.image_shape) == ("digits", (1, 8, 8)) and old.to_dict() == OLD_SPEC
    bare = ModelSpec.from_dict({"factory": "lcsc_ops.models.unet:digits_unet"})
    assert (bare.dataset, bare.image_shape) == ("digits", (1, 8, 8))


@pytest.mark.parametrize("field, value", [("dataset", 3), ("dataset", ""), ("dataset", "bad path:x y"),
                                          ("image_shape", [0, 8]), ("image_shape", "1,8,8")])
def test_a_bad_spec_field_read_from_a_run_is_named(field, value):
    with pytest.raises(LcscError) as exc:
        ModelSpec.from_dict({**OLD_SPEC, field: value}, origin="run x")
    _assert_one_line(exc, f"model spec: {field}")


def _run(store) -> tuple[MlflowClient, str]:
    client = MlflowClient(store["uri"])
    exp = client.get_experiment_by_name("api") or client.get_experiment(client.create_experiment("api"))
    return client, client.create_run(exp.experiment_id).info.run_id


MLP = ModelSpec(factory=f"{ME}:tiny_mlp", dataset=None, image_shape=None)


@pytest.mark.parametrize("spec, needles", [
    pytest.param(ModelSpec(factory=f"{ME}:tiny_mlp", kwargs={"widht": 4}, dataset=None, image_shape=None),
                 ["model spec: factory", "widht"], id="factory-kwargs"),
    pytest.param(ModelSpec(factory="no_such_pkg_api.nets:net", dataset=None, image_shape=None),
                 ["model spec: factory", "no_such_pkg_api"], id="factory-import"),
    pytest.param(ModelSpec(factory="torch.nn:ReLU", kwargs={}, dataset=None, image_shape=None,
                           sampler={"name": "ddmi"}), ["model spec: sampler", "ddmi", "known:"], id="sampler-name"),
    pytest.param(ModelSpec(factory="torch.nn:ReLU", dataset=None, image_shape=None,
                           sampler={"name": "ddim", "stpes": 4}), ["model spec: sampler", "stpes"],
                 id="sampler-setting"),
    pytest.param(ModelSpec(factory="torch.nn:ReLU", dataset="cifar"), ["model spec: dataset", "'cifar'",
                                                                      "module:callable"], id="dataset-name"),
    pytest.param(ModelSpec(factory="torch.nn:ReLU", dataset="no_such_pkg_api.data:load"),
                 ["model spec: dataset", "no_such_pkg_api", "registered name"], id="dataset-path"),
    pytest.param(ModelSpec(factory="torch.nn:ReLU", dataset="digits", image_shape=(3,)),
                 ["model spec: image_shape", "dataset=None"], id="dataset-without-image-shape"),
])
def test_the_logger_checks_the_spec_before_logging_anything(store, spec, needles):
    from lcsc_ops.store.logger import CheckpointLogger

    client, run_id = _run(store)
    with pytest.raises(LcscError) as exc:
        CheckpointLogger(spec, run_id=run_id, tracking_uri=store["uri"], model_name="never")
    _assert_one_line(exc, *needles)
    run = client.get_run(run_id)
    assert client.list_artifacts(run_id) == [] and not any(k.startswith("lcsc.") for k in run.data.tags)


def test_the_check_builds_on_the_meta_device_when_the_factory_allows():
    from lcsc_ops.evaluation.evaluators import check_spec

    _me().PROBE.clear()
    check_spec(ModelSpec(factory=f"{ME}:probe_net", dataset=None, image_shape=None))
    assert _me().PROBE == ["meta"]  # no weights allocated
    _me().PROBE.clear()
    check_spec(ModelSpec(factory=f"{ME}:needs_real_tensors", dataset=None, image_shape=None))
    assert len(_me().PROBE) == 1 and _me().PROBE[0].startswith("value")  # built for real after meta failed


def test_the_built_in_fid_refuses_a_spec_without_data_set_or_image_shape(tmp_path):
    from lcsc_ops.evaluation.evaluators import build_evaluators

    for spec, field in ((ModelSpec(factory=f"{ME}:tiny_mlp", dataset=None, image_shape=None), "dataset"),
                        (ModelSpec(factory=f"{ME}:tiny_mlp", dataset="digits", image_shape=None), "image_shape"),
                        (ModelSpec(factory=f"{ME}:tiny_mlp", dataset="digits", image_shape=(3,)), "(C, H, W)")):
        with pytest.raises(LcscError) as exc:
            build_evaluators(spec, evaluator=None, feature_extractor=None, inception_weights=None, batch_size=8,
                             device="cpu", cache_dir=tmp_path)
        _assert_one_line(exc, field, "--evaluator module:callable")
    assert not (tmp_path / "fid").exists()  # refused before any reference statistics


def test_the_check_runs_on_the_main_process_only(store):
    from lcsc_ops.store.logger import CheckpointLogger

    bad = ModelSpec(factory="no_such_pkg_api.nets:net")
    other = SimpleNamespace(is_main_process=False)
    logger = CheckpointLogger(bad, accelerator=other)  # another process: no check, nothing logged
    assert logger.run_id is None and logger.entries == []


# -- 1, 2, 3, 5, 6 end to end: a non-image model, logged under a name, scored by a custom evaluator ---

@pytest.fixture(scope="module")
def mlp_run(store) -> str:
    """Six steps of a tiny MLP (not an image model) logged with CheckpointLogger(model_name=...)."""
    from lcsc_ops.store.logger import CheckpointLogger

    client, run_id = _run(store)
    torch.manual_seed(0)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(32, 3)
    with CheckpointLogger(MLP, every=1, ema_decay=0.5, run_id=run_id, tracking_uri=store["uri"],
                          model_name="api-mlp") as ckpt:
        for step in range(1, 7):
            loss = (model(x) - x.flip(1)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(model, step)
    client.set_terminated(run_id)
    return run_id


def _mlp_config(store, run_id, **overrides):
    settings = dict(evaluator=f"{ME}:energy", trust_factory=("tests",), n_trials=3, search_samples=5,
                    final_samples=7, final_seeds=3, search_seeds=2, seed=3, register=False)
    return tiny_optimize_config(run_id, store, **{**settings, **overrides})


def _check_seed_split(results):
    """results.json: the choice made on the selection seeds' scores, Δ from the test seeds' scores only."""
    from lcsc_ops.pipeline.candidates import paired

    m, seeds = results["methods"], results["seeds"]
    assert seeds["selection"] and seeds["test"] and not set(seeds["selection"]) & set(seeds["test"])
    assert not set(seeds["search"]) & set(seeds["selection"] + seeds["test"])
    assert all(len(r["final"]) == len(seeds["test"]) and len(r["selection"]) == len(seeds["selection"])
               for r in m.values())
    base = {n: r for n, r in m.items() if r["kind"] == "baseline"}
    assert results["strongest_baseline"] == min(base, key=lambda n: statistics.fmean(base[n]["selection"]))
    assert results["winner"] == min(m, key=lambda n: statistics.fmean(m[n]["selection"]))
    diff, se = paired(m[results["best_lcsc"]]["final"], m[results["strongest_baseline"]]["final"])
    assert results["paired"]["diff_mean"] == pytest.approx(diff)
    assert results["paired"]["diff_se"] == pytest.approx(se, nan_ok=True)
    for r in m.values():
        assert r["final_mean"] == pytest.approx(statistics.fmean(r["final"]))


def test_a_non_image_model_is_optimized_with_a_custom_evaluator(store, mlp_run):
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.pipeline.report import render_markdown

    client = MlflowClient(store["uri"])
    assert client.get_run(mlp_run).data.tags["lcsc.model_name"] == "api-mlp"  # 2. the logger's model_name
    _me().CALLS.clear()
    report = run_optimize(_mlp_config(store, mlp_run), log=lambda m: None)
    # 6. the seeds used, and the evaluator was called with exactly those
    assert report["seeds"] == {"search": [0, 1], "selection": [10_003, 10_004], "test": [10_000, 10_001, 10_002]}
    assert {s for n, s in _calls("energy") if n == 5} == {0, 1}
    assert {s for n, s in _calls("energy") if n == 7} == {10_000, 10_001, 10_002, 10_003, 10_004}
    _check_seed_split(load_results(report["parent_run_id"], store["uri"]))
    # 3. metric names follow the evaluator: "score" for a custom one
    parent = client.get_run(report["parent_run_id"])
    assert report["metric"] == "score"
    assert {"search_score.last", "final_score.uniform"} <= set(parent.data.metrics)
    assert not any("fid" in k for k in parent.data.metrics)
    # 5. custom scores went through the score cache; no second metric, and the report says why
    assert report["score_cache"]["computed"] > 0
    assert report["second_metric"] is None and "--second-evaluator" in report["second_metric_note"]
    assert "No second metric: the custom evaluator has none" in render_markdown(report)
    # no image shape: the report has no samples.png and says so
    logged = {a.path for a in client.list_artifacts(report["parent_run_id"], "report")}
    assert logged == {"report/search_curve.png", "report/coefficients.png", "report/results.md"}
    with open(client.download_artifacts(report["parent_run_id"], "report/results.md")) as f:
        assert "No samples.png: the model spec has no image shape" in f.read()


def test_metric_name_and_a_second_custom_metric(store, mlp_run):
    from lcsc_ops.pipeline.optimize import run_optimize

    _me().CALLS.clear()
    cfg = _mlp_config(store, mlp_run, metric_name="energy", second_evaluator=f"{ME}:roughness", seed=4)
    report = run_optimize(cfg, log=lambda m: None)
    client = MlflowClient(store["uri"])
    parent = client.get_run(report["parent_run_id"])
    assert {"search_energy.last", "search_energy.uniform", "final_energy.uniform",
            f"final_energy.{report['winner']}"} <= set(parent.data.metrics)
    assert not any(k.startswith(("search_score", "final_score")) for k in parent.data.metrics)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert children and all("energy" in r.data.metrics for r in children)
    # the second metric: scored on the final seeds only, shown as the 2nd column
    assert report["second_metric"] == f"{ME}:roughness" and report["second_metric_note"] is None
    assert {s for _, s in _calls("roughness")} == {10_000, 10_001, 10_002}
    for row in report["methods"].values():
        assert row["second_metric_mean"] is not None and row["second_metric_mean"] > 0
    text = _table_text(report)
    assert f"2nd metric: {ME}:roughness" in text and "No second metric" not in text


def test_the_loggers_model_name_is_the_registered_name_and_tags_follow_the_metric(store):
    """2 and 3 through the registry: an image model logged with ``model_name`` and no --model-name."""
    from lcsc_ops.models.unet import digits_unet
    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.store.logger import CheckpointLogger

    client, run_id = _run(store)
    spec = ModelSpec(factory="lcsc_ops.models.unet:digits_unet", kwargs={"channels": 8},
                     sampler={"name": "ddim", "steps": 2}, dataset="digits", image_shape=(1, 8, 8))
    torch.manual_seed(0)
    model = digits_unet(channels=8)
    with CheckpointLogger(spec, every=1, run_id=run_id, tracking_uri=store["uri"], model_name="api-unet") as ckpt:
        for step in range(1, 4):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            ckpt.step(model, step)
    client.set_terminated(run_id)
    cfg = tiny_optimize_config(run_id, store, evaluator=f"{ME}:energy", metric_name="energy", window=3,
                               n_trials=2, top_k=1, search_samples=5, final_samples=7, seed=5)
    report = run_optimize(cfg, log=lambda m: None)
    reg = report["registered_model"]
    assert reg["name"] == "api-unet"
    tags = client.get_model_version(reg["name"], reg["version"]).tags
    assert {"lcsc.search_energy", "lcsc.final_energy", "lcsc.baseline_energys"} <= set(tags)
    assert not any(k.startswith(("lcsc.search_fid", "lcsc.final_fid", "lcsc.baseline_fid")) for k in tags)
    assert json.loads(tags["lcsc.baseline_energys"]).keys() == {n for n, r in report["methods"].items()
                                                                if r["kind"] == "baseline"}


def test_lineage_tags_keep_the_built_in_fid_names():
    from lcsc_ops.pipeline.config import OptimizeConfig
    from lcsc_ops.pipeline.optimize import lineage_tags

    report = {"methods": {"last": {"kind": "baseline", "final_mean": 2.0}, "lcsc_top1": {"kind": "lcsc",
                                                                                          "final_mean": 1.5}},
              "metric": "fid", "parent_run_id": "p", "window_steps": [1], "strongest_baseline": "last",
              "second_metric_worse": False, "study": "s"}
    winner = SimpleNamespace(name="lcsc_top1", coeffs=(1.0,), search_fid=1.25)
    entry = SimpleNamespace(file="f", sha256="0" * 64)
    tags = lineage_tags(OptimizeConfig(run_id="r"), report, winner, [entry])
    assert (tags["lcsc.search_fid"], tags["lcsc.final_fid"]) == ("1.25", "1.5")
    assert json.loads(tags["lcsc.baseline_fids"]) == {"last": 2.0}
    tags = lineage_tags(OptimizeConfig(run_id="r"), {**report, "metric": "score"}, winner, [entry])
    assert {"lcsc.search_score", "lcsc.final_score", "lcsc.baseline_scores"} <= set(tags)
    assert not any("fid" in k for k in tags)


# -- 3, 5: the options ------------------------------------------------------------------------------

def test_optimize_help_names_the_model_name_default():
    result = runner.invoke(app, ["optimize", "--help"], env={"COLUMNS": "120"})
    text = re.sub(r"[\s│]+", " ", result.output)
    assert "tag lcsc.model_name" in text and "CheckpointLogger(model_name=...)" in text
    assert "else lcsc-model" in text
    for flag in ("--metric-name", "--second-evaluator", "--evaluator-version"):
        assert flag in text


@pytest.mark.parametrize("args, needles", [
    (["--metric-name", "my.fid"], ["--metric-name", "'my.fid'"]),
    (["--metric-name", "9lives"], ["--metric-name"]),
    (["--evaluator-version", "2"], ["--evaluator-version", "--evaluator"]),
])
def test_bad_metric_options_are_one_line(store, tiny_run, args, needles):
    result = runner.invoke(app, ["optimize", tiny_run, "--tracking-uri", store["uri"], "--storage",
                                 store["storage"], *args])
    _one_line_error(result, *needles)


def test_metric_name_and_evaluator_version_key_the_study_only_when_given():
    from lcsc_ops.pipeline.config import OptimizeConfig

    plain = OptimizeConfig(run_id="r", evaluator=f"{ME}:energy").study_key()
    assert "metric_name" not in plain and "evaluator_version" not in plain  # earlier studies still resume
    named = OptimizeConfig(run_id="r", evaluator=f"{ME}:energy", metric_name="energy", evaluator_version="2")
    assert named.study_key()["metric_name"] == "energy" and named.study_key()["evaluator_version"] == "2"


# -- 5: the score cache for custom evaluators ---------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_window(tmp_path_factory):
    from safetensors.torch import save_file

    from lcsc_ops.checkpoints import sha256_file

    folder, entries = tmp_path_factory.mktemp("mlp-window"), []
    for i in range(2):
        torch.manual_seed(i)
        path = folder / f"ckpt{i}.safetensors"
        save_file(tiny_mlp().state_dict(), str(path))
        entries.append(SimpleNamespace(path=path, sha256=sha256_file(path)))
    return SimpleNamespace(entries=entries)


def test_custom_scores_are_cached_by_path_version_and_source(mlp_window, tmp_path, monkeypatch):
    from lcsc_ops.evaluation.evaluators import UserEvaluator
    from lcsc_ops.evaluation.score_cache import ScoreCache
    from lcsc_ops.pipeline.scoring import Scorer

    cache, mod = ScoreCache(tmp_path / "scores.sqlite"), _me()
    mod.CALLS.clear()

    def score(ev):
        return Scorer(mlp_window, tiny_mlp, "cpu", cache=cache, model_identity="mlp").per_seed([0.25, 0.75], ev, 8,
                                                                                                [0, 1])

    first = score(UserEvaluator(f"{ME}:energy"))
    assert len(_calls("energy")) == 2
    assert score(UserEvaluator(f"{ME}:energy")) == first and len(_calls("energy")) == 2  # reused, bit for bit
    assert score(UserEvaluator(f"{ME}:energy", version="2")) == first and len(_calls("energy")) == 4  # bumped
    monkeypatch.setattr(mod.energy, "__lcsc_version__", "3", raising=False)
    assert UserEvaluator(f"{ME}:energy").version == "3"
    score(UserEvaluator(f"{ME}:energy"))
    assert len(_calls("energy")) == 6  # __lcsc_version__ bumped
    score(UserEvaluator(f"{ME}:roughness"))
    assert len(_calls("roughness")) == 2  # another path, another key


def test_editing_a_custom_evaluators_module_changes_its_key(tmp_path, monkeypatch):
    from lcsc_ops.evaluation.evaluators import UserEvaluator

    (tmp_path / "api_user_eval.py").write_text("def score(model, n, seed):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = UserEvaluator("api_user_eval:score").identity
    (tmp_path / "api_user_eval.py").write_text("def score(model, n, seed):\n    return 2.0  # edited\n")
    after = UserEvaluator("api_user_eval:score").identity
    assert before["source"] and before["source"] != after["source"]
    sys.modules.pop("api_user_eval", None)


# -- 4: data sets by import path ----------------------------------------------------------------------

def test_a_data_set_named_by_import_path_loads_checked():
    from lcsc_ops.evaluation.data import load_dataset

    images = load_dataset(f"{ME}:tiny_images")
    assert images.shape == (6, 1, 4, 4) and images.dtype == torch.float32
    assert torch.equal(images, tiny_images())


@pytest.mark.parametrize("name, needles", [
    ("cifar", ["unknown data set 'cifar'", "known: digits", "module:callable"]),
    ("no_such_pkg_api.data:load", ["'no_such_pkg_api'", "registered name", "module:callable"]),
    (f"{ME}:nope", ["'nope'", "registered name"]),
    (f"{ME}:CALLS", ["not callable", "registered name"]),
    (f"{ME}:images_0_255", ["[-1, 1]", "255"]),
    (f"{ME}:images_3d", ["(N, C, H, W)", "(6, 4, 4)"]),
    (f"{ME}:images_uint8", ["float tensor", "uint8"]),
])
def test_a_bad_data_set_is_one_line_naming_the_field_and_the_forms(name, needles):
    from lcsc_ops.evaluation.data import load_dataset

    with pytest.raises(LcscError) as exc:
        load_dataset(name, "model spec: dataset")
    _assert_one_line(exc, "model spec: dataset", *needles)


def test_the_reference_cache_key_holds_the_data_set_identity(tmp_path, monkeypatch):
    from lcsc_ops.evaluation.data import dataset_identity
    from lcsc_ops.evaluation.fid import ReferenceCache

    cache, extractor, name = ReferenceCache(tmp_path), TinyFeatures(), f"{ME}:tiny_images"
    first, path, hit = cache.get(name, "tiny", extractor)
    assert not hit and first.metadata["dataset_source"] and "dataset_version" not in first.metadata
    assert cache.get(name, "tiny", extractor)[1:] == (path, True)
    monkeypatch.setattr(_me().tiny_images, "__lcsc_version__", "2", raising=False)
    bumped, bumped_path, hit = cache.get(name, "tiny", extractor)
    assert not hit and bumped_path != path and bumped.metadata["dataset_version"] == "2"
    assert path.is_file()  # the other version's file stays: switching back is a hit
    monkeypatch.delattr(_me().tiny_images, "__lcsc_version__")
    assert cache.get(name, "tiny", extractor)[1:] == (path, True)
    assert dataset_identity("digits") == {}  # the built-in digits' key is unchanged: earlier files stay valid


def test_a_data_set_loader_from_a_run_is_trusted_like_a_factory(monkeypatch):
    monkeypatch.delenv("LCSC_OPS_TRUST_FACTORY", raising=False)
    evil = ModelSpec.from_dict({**OLD_SPEC, "dataset": "evil_pkg_api.data:load"}, origin="run abc")
    with pytest.raises(LcscError) as exc:
        Trust().vouch(evil)
    _assert_one_line(exc, "run abc", "data set loader", "'evil_pkg_api.data:load'", "--trust-factory evil_pkg_api")
    assert "evil_pkg_api" not in sys.modules
    assert Trust().vouch(ModelSpec.from_dict(OLD_SPEC, origin="run abc")).origin is None  # built-in name: fine
    mine = ModelSpec.from_dict({**OLD_SPEC, "dataset": f"{ME}:tiny_images"}, origin="run abc")
    with pytest.raises(LcscError, match="data set loader"):
        Trust().vouch(mine)
    assert Trust(factory=("tests",)).vouch(mine).origin is None
    monkeypatch.setenv("LCSC_OPS_TRUST_FACTORY", "tests")
    assert Trust().vouch(mine).origin is None


def test_optimize_refuses_a_runs_untrusted_data_set_loader_before_any_download(store, tmp_path, cache):  # noqa: F811
    run_id = _crafted_run(store, tmp_path, spec={**_spec_dict(), "dataset": "evil_pkg_api.data:load"})
    line = _one_line_error(_optimize(store, run_id, "--trust-factory", "torch.nn"), "data set loader",
                           "evil_pkg_api")
    assert "Traceback" not in line and not cache.exists()


# -- 6: what ± means, and an empty second column explained -------------------------------------------

def _fake_report(**overrides):
    rows = {"last": {"kind": "baseline", "search_mean": 3.0, "final_mean": 3.1, "final_std": 0.2,
                     "final": [3.0, 3.2], "second_metric_mean": None, "note": "",
                     "checkpoints": [], "coefficients": []},
            "lcsc_top1": {"kind": "lcsc", "search_mean": 2.0, "final_mean": 2.1, "final_std": 0.1,
                          "final": [2.0, 2.2], "second_metric_mean": None, "note": "", "checkpoints": [],
                          "coefficients": []}}
    report = {"source_run_id": "r", "metric": "fid", "trials": 2, "strategy": "cmaes", "basis": "both",
              "methods": rows, "winner": "lcsc_top1", "strongest_baseline": "last", "best_lcsc": "lcsc_top1",
              "final_seeds": 2, "final_samples": 64, "search_seeds": 1, "search_samples": 32,
              "paired": {"diff_mean": -1.0, "diff_se": 0.0}, "winners_curse": {"search_gain": -1.0},
              "second_metric_worse": False, "nfe": {"default": 2, "used": 2}, "window_steps": [1, 2],
              "parent_run_id": "p", "seeds": {"search": [0], "final": [10_000, 10_001]},
              "second_metric": None,
              "second_metric_note": "no second metric: data set 'x' has one feature extractor (inception)"}
    return {**report, **overrides}


def _table_text(report) -> str:
    from rich.console import Console

    from lcsc_ops.pipeline.report import render_table

    console = Console(record=True, width=400)
    console.print(render_table(report))
    return re.sub(r"\s+", " ", console.export_text())


def test_the_table_says_what_plus_minus_is_and_why_there_is_no_second_metric():
    from lcsc_ops.pipeline.report import render_markdown

    text = _table_text(_fake_report())
    assert "± = standard deviation across the 2 seeds" in text and "seeds 10000–10001" in text
    assert "paired standard error" in text
    assert "No second metric: data set 'x' has one feature extractor" in text
    assert "No second metric: data set 'x'" in render_markdown(_fake_report())
    assert "seeds 10000–10001" in render_markdown(_fake_report())
    # an older results.json (no seeds, no reason recorded) still renders, and still says so
    old = {k: v for k, v in _fake_report().items() if k not in ("seeds", "second_metric", "second_metric_note")}
    assert "No second metric was scored" in _table_text(old)
    # with a second metric, its name heads the column and nothing is said about a missing one
    rows = {n: {**r, "second_metric_mean": 1.0} for n, r in _fake_report()["methods"].items()}
    named = _table_text(_fake_report(methods=rows, second_metric="fid (digits-mlp features)",
                                     second_metric_note=None))
    assert "2nd metric: fid (digits-mlp features)" in named and "No second metric" not in named
