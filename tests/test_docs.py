"""The documentation runs: every code block of the site (docs/*.md) and of the README that is meant to
run, runs, and the site builds with ``mkdocs build --strict`` (no broken link, no page left out).

A block is code to run when its fence says ``python`` or ``bash``; ``text`` marks output shown to
the reader. A block that cannot run here says why in a comment right above it,
``<!-- not run: why -->`` (a GPU, a server that runs until stopped, minutes of training): the test
reports it as skipped with that reason. The block marked ``<!-- runs first ... -->`` (a small
train → optimize → promote in Getting started) makes the store every other block runs against;
``<run-id>``, ``<optimize-run-id>``, ``<model-name>``, ``<name>`` and ``<version>`` in a block are
that store's.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
RUN = {"python", "bash"}
FENCE = re.compile(r"(?:^<!--\s*(?P<note>[^\n]*?)\s*-->\n)?^(?P<indent>[ ]*)```(?P<info>[^\n`]*)\n(?P<code>.*?)"
                   r"^(?P=indent)```[ ]*$", re.S | re.M)
SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)
PLACEHOLDER = re.compile(r"<[a-z][a-z-]*>")
OWN_LOOP = (ROOT / "examples" / "own_loop.py").read_text()


def _blocks():
    """(page, n, language, code, note) for every fenced block, snippets included as mkdocs does."""
    for page in PAGES:
        for n, m in enumerate(FENCE.finditer(page.read_text()), 1):
            indent = len(m["indent"])
            code = "".join(line[indent:] for line in m["code"].splitlines(keepends=True))
            code = SNIPPET.sub(lambda s: (ROOT / s["path"]).read_text().rstrip("\n"), code)
            yield page.relative_to(ROOT).as_posix(), n, m["info"].split()[0] if m["info"].strip() else "", code, \
                m["note"] or ""


BLOCKS = list(_blocks())
# The same code on two pages (the own-loop example is in the README and in docs/own-loop.md) runs once.
FIRST_OF = {}
for _page, _n, _language, _code, _note in BLOCKS:
    FIRST_OF.setdefault((_language, _code.strip()), (_page, _n))


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "LCSC_OPS_CACHE"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", LCSC_OPS_CACHE=str(root / "cache"),
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    return env


def _run(language: str, code: str, root: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-o", "pipefail", "-c", code]
    return subprocess.run(cmd, cwd=root, env=_env(root), capture_output=True, text=True, timeout=600)


def test_every_block_says_what_it_is():
    """A fence without a language would be neither run nor explicitly skipped."""
    unnamed = [f"{page} block {n}" for page, n, language, _, _ in BLOCKS if not language]
    assert not unnamed, f"name the language (python, bash, or text for output): {unnamed}"
    unknown = [f"{page} block {n}: {language}" for page, n, language, _, note in BLOCKS
               if language not in RUN | {"text"} and not note.startswith("not run")]
    assert not unknown, unknown


@pytest.fixture(scope="module")
def docs_store(tmp_path_factory) -> dict:
    """Runs the block marked ``runs first``; the names its store holds replace the placeholders."""
    first = [b for b in BLOCKS if b[4].startswith("runs first")]
    assert len(first) == 1, "exactly one block is marked <!-- runs first ... -->"
    root = tmp_path_factory.mktemp("docs-store")
    out = _run(first[0][2], first[0][3], root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((root / "result.json").read_text())
    model = result["registered_model"]
    names = {"<run-id>": result["source_run_id"], "<optimize-run-id>": result["parent_run_id"],
             "<model-name>": model["name"], "<name>": model["name"], "<version>": str(model["version"])}
    return {"root": root, "names": names, "first": first[0][:2], "stdout": out.stdout}


@pytest.mark.parametrize("page, n, language, code, note",
                         [b for b in BLOCKS if b[2] in RUN or b[4].startswith("not run")],
                         ids=[f"{b[0]}-{b[1]}" for b in BLOCKS if b[2] in RUN or b[4].startswith("not run")])
def test_block_runs(page, n, language, code, note, docs_store):
    if note.startswith("not run"):
        pytest.skip(f"{page} block {n}: {note}")
    if (page, n) == docs_store["first"]:
        assert "LCSC on run" in docs_store["stdout"]  # it ran in the fixture; the table was printed
        return
    first = FIRST_OF[(language, code.strip())]
    if first != (page, n):
        pytest.skip(f"{page} block {n}: the same code as {first[0]} block {first[1]}, which runs")
    for name, value in docs_store["names"].items():
        code = code.replace(name, value)
    left = PLACEHOLDER.findall(code) if language == "bash" else []
    assert not left, f"{page} block {n}: no value for {left}; mark it <!-- not run: why --> or use a known one"
    out = _run(language, code, docs_store["root"])
    assert out.returncode == 0, f"{page} block {n}:\n{code}\n--- stdout\n{out.stdout[-2000:]}\n--- stderr\n" \
                                f"{out.stderr[-3000:]}"
    if code.strip() == OWN_LOOP.strip():
        _check_own_loop_run(out.stdout.strip().splitlines()[-1], docs_store["root"])


def _check_own_loop_run(run_id: str, root: Path) -> None:
    """The own-loop example logged a complete run with raw + EMA checkpoints every 50 steps."""
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    path = client.download_artifacts(run_id, "checkpoints/manifest.json", str(root))
    manifest = json.loads(Path(path).read_text())
    assert manifest["complete"] is True
    assert sorted({e["step"] for e in manifest["entries"]}) == [50, 100, 150, 200]


def test_the_readme_own_loop_example_is_the_examples_file():
    readme = [code for page, _, language, code, _ in BLOCKS if page == "README.md" and language == "python"]
    assert any(code.strip() == OWN_LOOP.strip() for code in readme)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    return out


def test_the_site_builds_strict_with_every_page(site):
    pages = sorted(p.parent.relative_to(site).as_posix() for p in site.rglob("index.html"))
    assert len(pages) >= 10, pages
    for page in sorted((ROOT / "docs").glob("*.md")):
        expected = "." if page.stem == "index" else page.stem
        assert expected in pages, f"{page.name} was not built"


def test_the_cli_reference_lists_every_command_and_option(site):
    import typer

    from lcsc_ops.cli import app

    html = (site / "reference" / "cli" / "index.html").read_text()
    group = typer.main.get_command(app)
    assert len(group.commands) >= 7
    for name, command in group.commands.items():
        assert f"lcsc-ops {name}" in html, name
        for param in command.params:
            for flag in param.opts + param.secondary_opts:
                if flag.startswith("-"):
                    assert flag in html, f"{name} {flag}"


def test_the_api_reference_documents_every_public_name(site):
    import lcsc_ops

    html = (site / "reference" / "api" / "index.html").read_text()
    for name in lcsc_ops.__all__:
        if name != "__version__":
            assert f"lcsc_ops.{name}" in html, name
    assert "sample(" in html  # rendered from the docstrings, not just named


def test_the_readmes_headline_figures_are_in_the_benchmark_results():
    """The README quotes one result; its figures must be the ones benchmarks/RESULTS.md holds, so a rerun
    of the benchmark that changes them fails here until the README says the new ones."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A result"):].split("\n## ")[0]
    figures = re.findall(r"[−-]?\d+\.\d+ ± \d+\.\d+", section)
    assert len(figures) >= 3, section
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    for figure in figures:
        assert figure.replace("−", "-") in results, figure
