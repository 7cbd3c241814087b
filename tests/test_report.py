"""``lcsc-ops report`` and the report optimize writes at its end: three PNGs and the Markdown table
under report/ of the parent run, the table as the registered version's description, samples
from merges rebuilt exactly from the checkpoints."""
from __future__ import annotations

import json
import re

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from lcsc_ops.cli import app
from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.report import REPORT_FILES, check_results, render_markdown, sample_rows
from tests.conftest import tiny_optimize_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def optimized(store, tiny_run):
    from lcsc_ops.pipeline.optimize import run_optimize

    cfg = tiny_optimize_config(tiny_run, store, model_name="tiny-report", seed=51, n_trials=4)
    return cfg, run_optimize(cfg, log=lambda m: None)


def _table_methods(markdown: str) -> list[str]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    return [re.sub(r"[*★ ]", "", row.split("|")[1]) for row in rows]


def test_optimize_logs_the_report_and_describes_the_version(store, optimized):
    _, results = optimized
    client = MlflowClient(store["uri"])
    logged = {a.path for a in client.list_artifacts(results["parent_run_id"], "report")}
    assert logged == {f"report/{name}" for name in REPORT_FILES}
    reg = results["registered_model"]
    description = client.get_model_version(reg["name"], reg["version"]).description
    assert description == render_markdown(results)
    assert sorted(_table_methods(description)) == sorted(results["methods"])


def test_report_command_writes_the_pngs_and_markdown_and_sets_the_description(store, optimized, tmp_path):
    _, results = optimized
    client = MlflowClient(store["uri"])
    reg = results["registered_model"]
    client.update_model_version(reg["name"], reg["version"], description="placeholder")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", results["parent_run_id"], "--out", str(out), "--device", "cpu",
                                      "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    for name in REPORT_FILES:
        if name.endswith(".png"):
            data = (out / name).read_bytes()
            assert data.startswith(PNG) and len(data) > 5000, name
    markdown = (out / "results.md").read_text()
    assert sorted(_table_methods(markdown)) == sorted(results["methods"])  # every method has its row
    assert "standard deviation across the 2 final seeds" in markdown
    assert "standard error" in markdown and f"Δ vs {results['strongest_baseline']}" in markdown
    strongest_row = next(r for r in markdown.splitlines() if r.startswith(f"| {results['strongest_baseline']}")
                         or r.startswith(f"| **{results['strongest_baseline']}**"))
    assert "(reference)" in strongest_row
    assert client.get_model_version(reg["name"], reg["version"]).description == markdown
    assert result.stdout.strip().endswith("/report")


def test_samples_come_from_the_recomputed_merges_and_the_same_noise(store, tiny_run, optimized):
    from lcsc_ops.evaluation.fid import make_noise
    from lcsc_ops.math.merge import merge_state_dicts
    from lcsc_ops.models.diffusion import make_sampler
    from lcsc_ops.pipeline.report import SAMPLE_SEED
    from lcsc_ops.store.fetch import fetch_window

    cfg, results = optimized
    window = fetch_window(tiny_run, window=cfg.window, tracking_uri=store["uri"], cache_dir=store["cache"])
    rows = sample_rows(results, window, window.spec, device="cpu", samples=4)
    assert [name.split("\n")[0] for name, _ in rows] == ["last checkpoint", results["strongest_baseline"],
                                                          results["best_lcsc"]]
    by_label = {e.label: e for e in window.entries}
    noise = make_noise(4, window.spec.image_shape, SAMPLE_SEED)
    last = max((e for e in window.entries if e.kind == "raw"), key=lambda e: e.step)
    expected = [(["raw@" + str(last.step)], [1.0])] + [
        (results["methods"][n]["checkpoints"], results["methods"][n]["coefficients"])
        for n in (results["strongest_baseline"], results["best_lcsc"])]
    for (_, images), (labels, coeffs) in zip(rows, expected):
        model = window.spec.build()
        model.load_state_dict(merge_state_dicts([by_label[label].load() for label in labels], coeffs))
        with torch.inference_mode():
            want = make_sampler(window.spec.sampler).sample(model.eval(), noise)
        assert torch.equal(images, want)


def test_search_curve_reads_every_trial_from_the_child_runs(store, optimized):
    from lcsc_ops.store.reports import trial_scores

    cfg, results = optimized
    scores = trial_scores(results["parent_run_id"], "fid", store["uri"])
    assert [n for n, _ in scores] == list(range(cfg.n_trials + 1))  # the start trial 0 and every searched one
    assert scores[0][1] == results["methods"][results["centre"]]["search_mean"]


def _one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0]


def test_report_refuses_bad_input_with_one_line_and_writes_nothing(store, tiny_run, optimized, tmp_path):
    runner = CliRunner()
    uri = ["--tracking-uri", store["uri"]]
    _one_line_error(runner.invoke(app, ["report", tiny_run, *uri]), tiny_run, "not an optimize run")
    _one_line_error(runner.invoke(app, ["report", "0123456789abcdef0123456789abcdef", *uri]), "unknown run id")
    _one_line_error(runner.invoke(app, ["report", "../etc", *uri]), "not an MLflow run id")
    afile = tmp_path / "a-file"
    afile.write_text("keep")
    _, results = optimized
    _one_line_error(runner.invoke(app, ["report", results["parent_run_id"], "--out", str(afile), *uri]), "--out")
    assert afile.read_text() == "keep"
    out = tmp_path / "never"
    _one_line_error(runner.invoke(app, ["report", results["parent_run_id"], "--samples", "0", "--out", str(out),
                                        *uri]), "--samples")
    assert not out.exists()


def test_results_json_is_checked_before_use(optimized):
    _, results = optimized
    check_results(results, "r")
    broken = [{k: v for k, v in results.items() if k != "methods"},
              {**results, "window_steps": []},
              {**results, "best_lcsc": "nope"},
              {**results, "methods": {**results["methods"], "x": {**results["methods"]["last"], "coefficients": [1]}}}]
    for bad in broken:
        with pytest.raises(LcscError, match="results.json"):
            check_results(json.loads(json.dumps(bad)), "r")


def test_search_curve_draws_each_baseline_in_its_own_colour_with_a_legend(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lcsc_ops.pipeline.plots import plot_search_curve

    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figure to look at it
    baselines = {"last": 3.0, "uniform": 3.0, "ema_star": 2.9, "training_ema": 2.8}
    plot_search_curve([(0, 2.8), (1, 3.5), (2, 2.6), (3, 2.7)], baselines, tmp_path / "c.png", metric="fid")
    ax = plt.gcf().axes[0]
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
    assert set(lines) == {*baselines, "best so far"}
    colours = [matplotlib.colors.to_hex(lines[n].get_color()) for n in [*baselines, "best so far"]]
    assert len(set(colours)) == len(colours)  # equal scores (last, uniform) still tell apart
    assert list(lines["best so far"].get_ydata()) == [2.8, 2.8, 2.6, 2.6]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {f"{n} ({v:.4g})" for n, v in baselines.items()} <= set(legend)
    fig = plt.gcf()
    monkeypatch.undo()
    plt.close(fig)


def test_report_of_an_optimize_run_without_results_is_refused(store, tiny_run):
    client = MlflowClient(store["uri"])
    exp = client.get_run(tiny_run).info.experiment_id
    run = client.create_run(exp, tags={"lcsc.kind": "optimize"}).info.run_id
    _one_line_error(CliRunner().invoke(app, ["report", run, "--tracking-uri", store["uri"]]), run, "no results.json")
