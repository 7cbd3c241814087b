"""The README's own-loop example runs as pasted: the code block is taken from the README verbatim."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]


def _own_loop_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own training loop"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_the_examples_file():
    assert _own_loop_block().strip() == (ROOT / "examples" / "own_loop.py").read_text().strip()


def test_the_readme_own_loop_example_runs_and_logs_a_run_optimize_accepts(tmp_path):
    script = tmp_path / "own_loop.py"
    script.write_text(_own_loop_block())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_EXPERIMENT_ID"}  # a fresh user's shell
    env.update(MLFLOW_TRACKING_URI=uri, LCSC_OPS_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = out.stdout.strip().splitlines()[-1]
    client = mlflow.tracking.MlflowClient(uri)
    manifest = json.loads(Path(client.download_artifacts(run_id, "checkpoints/manifest.json", str(tmp_path))).read_text())
    assert manifest["complete"] is True
    assert sorted({e["step"] for e in manifest["entries"]}) == [50, 100, 150, 200]
