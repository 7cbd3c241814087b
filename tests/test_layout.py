"""The house rules, checked: imports point down the layers, mlflow and optuna stay at their edges,
and no function outside the CLI grows past 60 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lcsc_ops"

# Lower layers never import higher ones; packages on one layer never import each other.
LAYERS = {
    "errors": 0, "redact": 0, "records": 0, "processes": 0, "runformat": 0, "interrupts": 0, "quiet": 0,
    "options": 0.5, "spec": 0.5,
    "math": 1,
    "models": 2, "checkpoints": 2, "weightfiles": 2, "layouts": 2,
    "evaluation": 3,
    "search": 4, "store": 4,
    "importers": 5,
    "pipeline": 6,
    "training": 7,
    "cli": 8, "__init__": 8,
}
EDGES = {"mlflow": "store", "optuna": "search"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        yield rel, ast.parse(path.read_text(), str(path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _top(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("rel, tree", list(_modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_imports_point_down_and_libraries_stay_at_their_edges(rel, tree):
    here = _top(rel)
    for name in _imports(tree):
        root = name.split(".")[0]
        if root in EDGES:
            assert here == EDGES[root], f"{rel} imports {name}: only lcsc_ops/{EDGES[root]}/ may"
        if root == "lcsc_ops" and "." in name:
            there = name.split(".")[1]
            if there == here or there not in LAYERS:
                continue
            assert LAYERS[there] < LAYERS[here], f"{rel} imports {name}: not a lower layer"


def test_no_function_outside_the_cli_is_longer_than_60_lines():
    long = []
    for rel, tree in _modules():
        if rel.name == "cli.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
