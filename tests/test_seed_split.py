"""The final figures are measured on seeds the choice never saw (issue 25, item 6): the strongest
baseline and the winner are chosen on the selection seeds, every reported figure comes from the
test seeds, and the seed sets are disjoint and non-empty."""
from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest

from lcsc_ops.errors import LcscError
from lcsc_ops.pipeline.candidates import Candidate, paired
from lcsc_ops.pipeline.config import OptimizeConfig
from lcsc_ops.pipeline.report import build_report, render_markdown, render_table, seeds_used

WINDOW = SimpleNamespace(steps=[10, 20], entries=[SimpleNamespace(label="raw@10"), SimpleNamespace(label="raw@20")])


def _cand(name: str, kind: str, selection: list[float], final: list[float]) -> Candidate:
    return Candidate(name, (0, 1), (0.5, 0.5), kind, search_fid=3.0, final=final, selection=selection)


def _report(base: list[Candidate], cands: list[Candidate], **cfg) -> dict:
    config = OptimizeConfig(run_id="a" * 32, final_seeds=3, selection_seeds=2, **cfg)
    return build_report(config, WINDOW, base, cands, base[0], metric="fid", search_seconds=1.0, trials=4,
                        study="s", storage="optuna.journal", parent_run_id="b" * 32)


def test_choice_is_made_on_the_selection_seeds_and_every_figure_on_the_test_seeds():
    # The test seeds would choose otherwise: `a` is the strongest baseline there and lcsc_2 the best merge.
    a = _cand("a", "baseline", selection=[10.0, 10.0], final=[5.0, 5.0, 5.0])
    b = _cand("b", "baseline", selection=[8.0, 8.0], final=[9.0, 9.5, 10.0])
    one = _cand("lcsc_1", "lcsc", selection=[7.0, 7.0], final=[8.5, 8.0, 7.5])
    two = _cand("lcsc_2", "lcsc", selection=[9.0, 9.0], final=[1.0, 1.0, 1.0])
    report = _report([a, b], [one, two])
    assert (report["strongest_baseline"], report["best_lcsc"], report["winner"]) == ("b", "lcsc_1", "lcsc_1")
    d = [x - y for x, y in zip(one.final, b.final)]  # [-0.5, -1.5, -2.5]
    assert report["paired"]["diff_mean"] == pytest.approx(-1.5)
    assert report["paired"]["diff_se"] == pytest.approx(statistics.stdev(d) / math.sqrt(3))
    assert report["winners_curse"]["final_gain"] == pytest.approx(-1.5)
    rows = report["methods"]
    assert rows["b"]["final_mean"] == pytest.approx(9.5) and rows["b"]["selection_mean"] == pytest.approx(8.0)
    assert rows["lcsc_1"]["final"] == [8.5, 8.0, 7.5] and rows["lcsc_1"]["selection"] == [7.0, 7.0]
    assert report["seeds"] == {"search": [0], "selection": [10_003, 10_004], "test": [10_000, 10_001, 10_002]}
    md = render_markdown(report)
    assert "| **lcsc_1** ★ | lcsc | 3.000 | 8.000 ± 0.500 | -1.500 ± 0.577 |" in md
    assert "chosen by their means on the selection seeds 10003–10004" in md
    assert "seeds 10000–10002" in md and "search fid: seed 0" in md
    caption = render_table(report).caption
    assert "selection seeds 10003–10004" in caption and "seeds 10000–10002" in caption
    assert "lcsc_1 − b = -1.500 ± 0.577" in caption


def test_a_baseline_wins_when_the_selection_seeds_say_so():
    a = _cand("a", "baseline", selection=[4.0, 4.0], final=[6.0, 6.0, 6.0])
    one = _cand("lcsc_1", "lcsc", selection=[5.0, 5.0], final=[1.0, 2.0, 3.0])
    nan = _cand("lcsc_2", "lcsc", selection=[math.nan, 1.0], final=[0.0, 0.0, 0.0])  # non-finite: ranks last
    report = _report([a], [one, nan])
    assert (report["strongest_baseline"], report["best_lcsc"], report["winner"]) == ("a", "lcsc_1", "a")
    assert report["paired"]["diff_mean"] == pytest.approx(-4.0)  # still reported, on the test seeds


@pytest.mark.parametrize("search, final, selection", [(1, 1, 1), (2, 5, 2), (3, 10, 4), (10_000, 1, 7)])
def test_the_seed_sets_are_disjoint_and_not_empty(search, final, selection):
    cfg = OptimizeConfig(run_id="a" * 32, search_seeds=search, final_seeds=final, selection_seeds=selection)
    cfg.validate()
    seeds = seeds_used(cfg)
    assert set(seeds) == {"search", "selection", "test"}
    assert [len(seeds[k]) for k in ("search", "test", "selection")] == [search, final, selection]
    together = [*seeds["search"], *seeds["selection"], *seeds["test"]]
    assert len(set(together)) == len(together)


@pytest.mark.parametrize("over, message", [
    (dict(selection_seeds=0), "--selection-seeds must be >= 1, got 0"),
    (dict(final_seeds=0), "--final-seeds must be >= 1, got 0"),
    (dict(search_seeds=10_001), "--search-seeds must be at most 10000"),
])
def test_a_config_without_disjoint_seed_sets_is_one_error_line(over, message):
    with pytest.raises(LcscError) as err:
        OptimizeConfig(run_id="a" * 32, **over).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_paired_is_over_the_same_seeds():
    assert paired([3.0, 5.0], [1.0, 2.0]) == (pytest.approx(2.5), pytest.approx(0.5))
