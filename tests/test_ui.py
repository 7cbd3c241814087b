"""The MLflow UI in a real browser: after a tiny train + optimize + promote, headless Chromium
shows the optimize parent run with its trial runs nested under it, and the registered model with
its alias on the registered version.

Skipped where Debian's ``chromium`` is absent (``make test-ui`` installs it). The browser is
driven over the DevTools protocol on a pipe (fds 3 and 4, ``--remote-debugging-pipe``): no driver
package, and every wait polls the rendered page for a condition. With ``LCSC_UI_SCREENSHOTS=DIR``
(relative to the repository) the runs table and the model page are saved as
``DIR/mlflow-ui-runs.png`` and ``DIR/mlflow-ui-model.png``.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.conftest import tiny_optimize_config
from tests.services import _stop_group, mlflow_server

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                               "(`make test-ui` runs apt-get install -y chromium)"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="bash (which hands chromium its pipe) is missing"),
]

MODEL = "ui-ddpm"  # a name no other test registers
N_TRIALS = 5
WIDTH, HEIGHT = 1600, 1000
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", f"--window-size={WIDTH},{HEIGHT}",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-quic", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


class Browser:
    """One headless Chromium tab, driven with DevTools protocol messages (JSON + NUL) on a pipe."""

    def __init__(self, work: Path) -> None:
        self.work = work
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()
        to_r, from_w = _above_9(to_r), _above_9(from_w)  # so that neither is already fd 3 or 4
        # Chromium reads commands from fd 3 and writes replies to fd 4; bash puts the pipe ends there.
        script = f'exec "$0" "$@" 3<&{to_r} 4>&{from_w} {to_r}<&- {from_w}>&-'
        profile = tempfile.mkdtemp(prefix="profile-", dir=work)
        with open(work / "chromium.log", "wb") as log:
            self.proc = subprocess.Popen(["bash", "-c", script, CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                          "about:blank"], pass_fds=(to_r, from_w), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(to_r)
        os.close(from_w)
        self._buffer, self._id, self.session = b"", 0, None
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self._to, self._from):
            try:
                os.close(fd)
            except OSError:
                pass
        _stop_group(self.proc)

    def call(self, method: str, timeout: float = 60.0, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self._to, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next_message(deadline, method)
            if reply.get("id") == self._id:  # anything else is an event or an earlier reply
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _next_message(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method}; see {self.work / 'chromium.log'}")
            chunk = os.read(self._from, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited; see {self.work / 'chromium.log'}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, timeout: float = 90.0):
        """Poll ``expression`` in the page until it is truthy; fail naming ``what`` and saving a screenshot."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                shot = self.screenshot(self.work / "timeout.png")
                text = self.evaluate("document.body ? document.body.innerText : ''") or ""
                raise AssertionError(f"the UI never showed {what} in {timeout:.0f} s (screenshot {shot}); "
                                     f"page text: {text[-1500:]!r}")
            time.sleep(0.25)
        return value

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


def js(value) -> str:
    return json.dumps(value)


def save_screenshot(browser: Browser, name: str) -> None:
    folder = os.environ.get("LCSC_UI_SCREENSHOTS")
    if folder:
        browser.screenshot(REPO / folder / name)


def close_assistant(browser: Browser) -> None:
    """Close MLflow's assistant side panel (if this MLflow has one) so the table gets the width."""
    browser.evaluate("document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()")


@pytest.fixture(scope="module")
def optimized(store, tiny_run) -> dict:
    """A finished tiny optimize whose registered version holds alias ``champion``. Its own seed and
    study file keep its study apart from the other tests' (their filters on ``optuna.study`` or on
    the studies of the session's journal must not see it)."""
    import mlflow

    from lcsc_ops.pipeline.optimize import run_optimize
    from lcsc_ops.store.registry import promote

    cfg = tiny_optimize_config(tiny_run, store, model_name=MODEL, n_trials=N_TRIALS, seed=613,
                               storage=str(store["root"] / "optuna-ui.journal"))
    report = run_optimize(cfg, log=lambda m: None)
    version = report["registered_model"]["version"]
    promote(MODEL, version, "champion", tracking_uri=store["uri"])
    client = mlflow.tracking.MlflowClient(store["uri"])
    parent = client.get_run(report["parent_run_id"])
    return {"parent": parent.info.run_id, "experiment": parent.info.experiment_id, "version": version,
            "parent_name": parent.info.run_name, "source_name": client.get_run(tiny_run).info.run_name}


@pytest.fixture(scope="module")
def ui(store, optimized, tmp_path_factory) -> str:
    """``mlflow server`` (the UI) on 127.0.0.1 and a free port, on the store; stopped at the end."""
    with mlflow_server(tmp_path_factory.mktemp("ui-server"), store["uri"], workers=1) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser = Browser(tmp_path_factory.mktemp("chromium"))
    try:
        yield browser
    finally:
        browser.close()


def test_runs_table_nests_the_trial_runs_under_the_optimize_run(ui, optimized, browser):
    parent, experiment = optimized["parent"], optimized["experiment"]
    assert optimized["parent_name"] == f"optimize-{optimized['source_name']}"
    search = urllib.parse.quote(f"tags.mlflow.parentRunId = '{parent}'")  # this study's trials only
    browser.goto(f"{ui}/#/experiments/{experiment}/runs?searchFilter={search}")
    link = f"document.querySelector('a[href$=\"/runs/{parent}\"]')"
    shown = browser.wait_for(f"{link}?.innerText", f"the optimize run {parent}")
    assert shown.strip() == optimized["parent_name"]
    close_assistant(browser)
    trials = [f"trial-{i:04d}" for i in range(N_TRIALS + 1)]  # the start trial (the centre) + N_TRIALS
    text = browser.evaluate("document.body.innerText")
    assert not [t for t in trials if t in text], "trial runs shown before their parent run was expanded"
    # the expander in the parent's Run Name cell (only a run with children has one)
    expander = f"{link}.closest('.ag-cell').querySelector('button[data-component-id*=\"runnamecellrenderer\"]')"
    assert browser.evaluate(f"!!{expander}"), "the optimize run has no expander: no nested runs"
    browser.evaluate(f"{expander}.click()")
    browser.wait_for(f"{js(trials)}.every(t => document.body.innerText.includes(t))", f"the trial runs {trials}")
    assert f"trial-{N_TRIALS + 1:04d}" not in browser.evaluate("document.body.innerText")
    save_screenshot(browser, "mlflow-ui-runs.png")


def test_model_page_shows_the_alias_on_the_registered_version(ui, optimized, browser):
    version = optimized["version"]
    browser.goto(f"{ui}/#/models/{MODEL}")
    row = (f"[...document.querySelectorAll('a')].find(a => a.innerText.trim() === {js(f'Version {version}')})"
           "?.closest('tr, [role=row]')")
    text = browser.wait_for(f"{row}?.innerText", f"version {version} of {MODEL}")
    assert "champion" in text, f"alias champion not on version {version}: {text!r}"
    assert MODEL in browser.evaluate("document.body.innerText")
    others = browser.evaluate(f"[...document.querySelectorAll('tr, [role=row]')].filter(r => r !== {row})"
                              ".map(r => r.innerText).filter(t => t.includes('champion'))")
    assert not others, f"alias champion shown on other rows too: {others}"
    close_assistant(browser)
    save_screenshot(browser, "mlflow-ui-model.png")
