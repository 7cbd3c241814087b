"""MkDocs hooks: pages generated from the code at build time, so they cannot drift from it.

- ``reference/cli.md``: every ``lcsc-ops`` command with every argument and option, its type, default
  and help, read from the Typer app (whose ``train``/``optimize``/``report`` options are built from the
  config dataclasses);
- ``reference/api.md``: the public Python names (``lcsc_ops.__all__``), rendered by mkdocstrings from
  the modules that define them;
- ``benchmarks/RESULTS.md`` and its plots, taken as they are from ``benchmarks/`` (the figures live
  there only).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
# Names also documented on the API page: what the guides call from Python besides lcsc_ops.__all__.
API_EXTRA = ["lcsc_ops.pipeline.config.OptimizeConfig", "lcsc_ops.pipeline.optimize.run_optimize",
             "lcsc_ops.training.TrainConfig", "lcsc_ops.training.train"]


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[a-z]{3})\. ", text, maxsplit=1)[0].rstrip(".")


def _default(param) -> str:
    if param.required:
        return "required"
    if param.is_flag:
        if param.secondary_opts:
            return f"`{(param.opts if param.default else param.secondary_opts)[0]}`"
        return "on" if param.default else "off"
    return "" if param.default is None else f"`{param.default}`"


def _option_rows(params, ctx) -> list[str]:
    rows = ["| option | type | default | what |", "|---|---|---|---|"]
    for p in params:
        flags = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
        what = p.help or ""
        if p.envvar:
            what += f" (environment: `{p.envvar}`)"
        kind = "flag" if p.is_flag else _cell(p.display_type(ctx).strip("<>"))
        rows.append(f"| {flags} | {kind} | {_cell(_default(p))} | {_cell(what)} |")
    return rows


def _command_section(name: str, command) -> list[str]:
    from typer._click.core import Context

    ctx = Context(command, info_name=name)
    args = [p for p in command.params if p.param_type_name == "argument"]
    options = [p for p in command.params if p.param_type_name == "option" and not p.hidden]
    usage = " ".join(["lcsc-ops", name, *(f"<{p.name.upper()}>" for p in args), "[OPTIONS]"])
    lines = [f"## `lcsc-ops {name}`", "", _cell(command.help or ""), "", "```text", usage, "```", ""]
    if args:
        lines += ["| argument | type | what |", "|---|---|---|"]
        lines += [f"| `{p.name.upper()}` | {_cell(p.display_type(ctx).strip('<>'))} | {_cell(p.help or '')} |"
                  for p in args]
        lines.append("")
    panels: dict[str, list] = {}
    for p in options:
        panels.setdefault(p.rich_help_panel or "Options", []).append(p)
    for panel, params in sorted(panels.items(), key=lambda kv: kv[0] != "Options"):
        lines += [f"### {panel}" if panel != "Options" else "**Options**", "", *_option_rows(params, ctx), ""]
    return lines


def cli_reference() -> str:
    """The CLI reference page in Markdown, read from ``lcsc_ops.cli.app``."""
    import typer

    from lcsc_ops.cli import app

    group = typer.main.get_command(app)
    lines = ["# CLI reference", "",
             "Generated from the Typer app (`lcsc_ops/cli.py`) when the site is built: the options of `train`, "
             "`optimize` and `report` and their defaults come from `TrainConfig`, `OptimizeConfig` and "
             "`ReportConfig`, so this page cannot drift from the code. `lcsc-ops COMMAND --help` prints the same.",
             "", _cell(group.help or ""), ""]
    lines += [f"- [`{name}`](#lcsc-ops-{name}): {_cell(_first_sentence(cmd.help or ''))}"
              for name, cmd in group.commands.items()]
    lines.append("")
    for name, command in group.commands.items():
        lines += _command_section(name, command)
    return "\n".join(lines) + "\n"


def api_reference() -> str:
    """The API page: one mkdocstrings block per public name, found where it is defined."""
    import lcsc_ops

    lines = ["# Python API", "",
             "The public names of `lcsc_ops` (its `__all__`), and the configs and entry points the guides call, "
             "rendered from their docstrings when the site is built.", ""]
    for name in lcsc_ops.__all__:
        obj = getattr(lcsc_ops, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # __version__
        lines += [f"## `lcsc_ops.{name}`", "", f"::: {obj.__module__}.{obj.__qualname__}", ""]
    lines += ["## Configs and entry points", ""]
    for path in API_EXTRA:
        lines += [f"### `{path}`", "", f"::: {path}", "    options:", "      show_root_heading: false", ""]
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """Add the generated pages and the benchmark results (with their plots) to the site."""
    files.append(File.generated(config, "reference/cli.md", content=cli_reference()))
    files.append(File.generated(config, "reference/api.md", content=api_reference()))
    bench = ROOT / "benchmarks"
    files.append(File.generated(config, "benchmarks/RESULTS.md", abs_src_path=str(bench / "RESULTS.md")))
    for png in sorted((bench / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{png.name}", abs_src_path=str(png)))
    return files
