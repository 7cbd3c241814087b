"""What users see while commands run: plain progress lines on a pipe (during the search, not after
it), rich bars on a terminal, nothing with --quiet, and --json output left alone."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GATE, GATE_AT = "LCSC_TEST_GATE", "LCSC_TEST_GATE_AT"
_calls = 0


def gated_score(model, num_samples: int, seed: int) -> float:
    """A user evaluator (``module:callable``) for the subprocess below: a cheap deterministic score;
    its call number ``$LCSC_TEST_GATE_AT`` (inside the search) waits until the file ``$LCSC_TEST_GATE``
    exists, so the test knows the search is still running while it reads; after 120 s it fails the
    optimization (the test saw no progress line during the search)."""
    global _calls
    _calls += 1
    if _calls == int(os.environ.get(GATE_AT, "0")):
        gate, deadline = Path(os.environ[GATE]), time.monotonic() + 120
        while not gate.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("no search progress line was read while the search ran")
            time.sleep(0.02)
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_five_items_or_thirty_seconds_whichever_first():
    from lcsc_ops.pipeline.progress import PlainProgress

    lines, clock = [], FakeClock()
    progress = PlainProgress(lines.append, clock=clock)
    progress.stage("search", 12, unit="trials", per="min")
    assert lines == ["search: 0/12 trials"]
    for _ in range(4):
        clock.now += 1
        progress.advance(status="best 1.000")
    assert len(lines) == 1  # 4 trials in 4 s: nothing yet
    clock.now += 1
    progress.advance(status="best 0.900")
    assert lines[-1] == "search: 5/12 trials | best 0.900 | 60.0 trials/min | ETA 0:07"
    clock.now += 31  # one more trial, 31 s later: a line, though only 1 trial since the last
    progress.advance()
    assert len(lines) == 3 and lines[-1].startswith("search: 6/12 trials | best 0.900")
    progress.advance(done=11)
    assert len(lines) == 4 and lines[-1].startswith("search: 11/12")  # 5 more (counted with done=)
    progress.advance()
    assert lines[-1].startswith("search: 12/12 trials") and "done in 0:36" in lines[-1] and "ETA" not in lines[-1]
    progress.note("a note")
    assert lines[-1] == "a note" and len(lines) == 6


def test_rich_bars_show_the_stage_count_status_rate_and_notes():
    from rich.console import Console

    from lcsc_ops.pipeline.progress import RichProgress

    out, clock = io.StringIO(), FakeClock()
    with RichProgress(Console(file=out, force_terminal=True, width=150), clock=clock) as progress:
        progress.stage("baselines", 6, unit="scored")
        progress.note("window: steps 30..60")
        clock.now += 2
        progress.advance(n=3, status="uniform 42.789")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "window: steps 30..60" in text
    final = text.splitlines()[-1]
    assert "baselines" in final and "3/6" in final and "uniform 42.789" in final and "1.5 scored/s" in final


def test_make_progress_picks_bars_for_a_terminal_plain_lines_otherwise_and_nothing_when_quiet(monkeypatch):
    from lcsc_ops.pipeline.progress import PlainProgress, RichProgress, SilentProgress, make_progress

    for var in ("FORCE_TERMINAL", "TTY_INTERACTIVE", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_progress(stream=Tty()), RichProgress)
    assert isinstance(make_progress(stream=Tty(), plain=True), PlainProgress)  # several workers
    pipe = io.StringIO()
    progress = make_progress(stream=pipe)
    assert isinstance(progress, PlainProgress)
    progress.stage("train", 10, unit="steps")
    assert pipe.getvalue() == "train: 0/10 steps\n"
    quiet, tty = make_progress(quiet=True, stream=Tty()), Tty()
    assert isinstance(quiet, SilentProgress)
    quiet.stage("train", 10)
    quiet.advance(10, status="x")
    quiet.note("y")
    assert tty.getvalue() == ""


def _read_stdout(proc, into: list) -> None:
    for line in proc.stdout:
        into.append(line)


def test_search_progress_lines_arrive_on_a_pipe_while_the_search_runs(store, tiny_run, tmp_path):
    """Acceptance: with stderr a pipe, a line reporting trial k < N arrives while the search is
    still running (a trial further on waits for the test to have read it), before the table."""
    from lcsc_ops.math.profiles import ema_decay_grid

    n_trials, baselines = 12, 2 + len(ema_decay_grid(4, 3)) + 1  # last, uniform, the EMA* grid, training EMA
    gate = tmp_path / "gate"
    env = {**os.environ, "PYTHONPATH": str(REPO), GATE: str(gate), GATE_AT: str(baselines + 9)}
    cmd = [sys.executable, "-m", "lcsc_ops.cli", "optimize", tiny_run, "--tracking-uri", store["uri"],
           "--storage", store["storage"], "--window", "4", "--ema-grid", "3", "--n-trials", str(n_trials),
           "--search-samples", "32", "--final-samples", "32", "--final-seeds", "2", "--top-k", "1", "--seed", "41",
           "--batch-size", "64", "--device", "cpu", "--no-register", "--evaluator", "tests.test_progress:gated_score"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=store["root"])
    stdout: list[str] = []
    reader = threading.Thread(target=_read_stdout, args=(proc, stdout), daemon=True)
    reader.start()
    seen, lines = [], []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            m = re.match(rf"search: (\d+)/{n_trials} trials", line)
            if m and 0 < int(m.group(1)) < n_trials and not seen:
                # the search is held at trial 9 until the gate exists: this line came during the search
                seen.append((int(m.group(1)), gate.exists(), proc.poll(), len(stdout)))
                gate.touch()
        assert proc.wait(timeout=300) == 0, "\n".join(lines)
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    assert seen, "\n".join(lines)
    k, gate_was_open, exit_code, stdout_lines = seen[0]
    assert k < 9 and not gate_was_open and exit_code is None and stdout_lines == 0
    first_final = next(i for i, line in enumerate(lines) if line.startswith("final evaluation:"))
    assert next(i for i, line in enumerate(lines) if line.startswith(f"search: {k}/")) < first_final
    assert any(line.startswith(f"search: {n_trials}/{n_trials} trials") for line in lines)
    assert "LCSC on run" in "".join(stdout)


def test_training_progress_lines_and_quiet(store):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from lcsc_ops.cli import app

    args = ["train", "--steps", "20", "--batch-size", "16", "--channels", "8", "--checkpoint-every", "10",
            "--sampler-steps", "2", "--log-every", "1", "--warmup-steps", "2", "--experiment", "progress",
            "--model-name", "tiny-progress", "--tracking-uri", store["uri"]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("train:")]
    assert lines[0] == "train: 0/20 steps"
    assert any(re.fullmatch(r"train: 10/20 steps \| loss \d+\.\d{4}, [02] checkpoints logged \| [\d.]+ steps/s "
                            r"\| ETA \d+:\d\d", line) for line in lines), lines
    assert re.fullmatch(r"train: 20/20 steps \| loss \d+\.\d{4}, [24] checkpoints logged \| .* \| done in .*",
                        lines[-1]), lines
    run_id = result.stdout.strip().splitlines()[-1]
    assert "quiet" not in MlflowClient(store["uri"]).get_run(run_id).data.params  # not a setting of the run
    quiet = CliRunner().invoke(app, [*args[:2], "10", *args[3:], "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "train:" not in quiet.stderr and re.fullmatch(r"[0-9a-f]{32}", quiet.stdout.strip().splitlines()[-1])


def test_optimize_quiet_json_prints_only_the_json(store, tiny_run):
    from typer.testing import CliRunner

    from lcsc_ops.cli import app

    result = CliRunner().invoke(app, ["optimize", tiny_run, "--window", "2", "--n-trials", "2", "--search-samples",
                                      "32", "--final-samples", "32", "--final-seeds", "2", "--top-k", "1",
                                      "--no-register", "--json", "--quiet", "--seed", "42", "--storage",
                                      store["storage"], "--batch-size", "64", "--tracking-uri", store["uri"]])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert json.loads(result.stdout)["trials"] == 2
