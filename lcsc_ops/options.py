"""Config fields that describe their own command-line option: a default is written once.

A frozen config dataclass declares each field with :func:`option` (help text, help panel,
and a parser when the command line gives text for a structured value); the CLI builds its
options from those fields (:func:`lcsc_ops.cli.options_of`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from lcsc_ops.errors import LcscError


def option(default: Any = dataclasses.MISSING, help: str = "", *, panel: str | None = None,
           parse: Callable[[str], Any] | None = None, cli: bool = True, flag: str | None = None,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its CLI description in ``metadata``."""
    metadata = {"help": help, "panel": panel, "parse": parse, "cli": cli, "flag": flag}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise LcscError(f"expected comma-separated fractions like 0.25,0.5, got {text!r}") from None


def parse_image_shape(text: str) -> tuple[int, ...]:
    """``--image-shape``: C,H,W of one sample, positive integers like ``1,8,8``."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise LcscError(f"--image-shape must be positive integers like 1,8,8, got {text!r}")
    return shape


def parse_json_object(text: str | None, what: str = "factory kwargs") -> dict[str, Any]:
    """A JSON object given on the command line (``--factory-kwargs``, ``--cm-settings``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LcscError(f"{what} are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise LcscError(f"{what} must be a JSON object")
    return value


def check_positive(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value >= 1:
            raise LcscError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
