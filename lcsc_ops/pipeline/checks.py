"""Checks on a fetched window before anything is scored."""
from __future__ import annotations

import dataclasses
from typing import Callable

from safetensors import safe_open

from lcsc_ops.checkpoints import CheckpointEntry, CheckpointWindow
from lcsc_ops.errors import LcscError
from lcsc_ops.layouts import check_checkpoints
from lcsc_ops.weightfiles import all_finite


def first_nonfinite(entry: CheckpointEntry) -> str | None:
    """The name of the first floating tensor of ``entry`` holding NaN or inf, if any."""
    with safe_open(str(entry.path), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not all_finite(t):
                return key
    return None


def drop_nonfinite(window: CheckpointWindow, log: Callable[[str], None]) -> CheckpointWindow:
    """The window without checkpoints holding NaN or inf, each named with its tensor.

    A merge multiplies every checkpoint by its coefficient, and 0 × NaN is NaN: one such
    file would spoil every candidate, so it is left out rather than scored."""
    bad = {e.file: key for e in window.entries if (key := first_nonfinite(e)) is not None}
    if not bad:
        return window
    keep = tuple(e for e in window.entries if e.file not in bad)
    if not keep:
        raise LcscError(f"every checkpoint in the window of run {window.run_id} holds NaN or inf "
                        f"(e.g. {next(iter(bad))}, tensor {next(iter(bad.values()))!r})")
    for file, key in bad.items():
        log(f"checkpoint {file} of run {window.run_id} holds NaN/inf in tensor {key!r}: left out")
    ema = window.training_ema if window.training_ema in keep else None
    return dataclasses.replace(window, entries=keep, training_ema=ema,
                               steps=tuple(sorted({e.step for e in keep})))


def check_window(window: CheckpointWindow, log: Callable[[str], None]) -> None:
    """Every checkpoint of the window (the training EMA too) against the spec, before anything is
    built for real: the model's size against the checkpoints' bytes, then each file's tensor
    names, shapes and dtypes from its header; the first mismatch is one LcscError naming the
    file and the tensor."""
    entries = {e.file: e for e in (*window.entries, *([window.training_ema] if window.training_ema else []))}
    files = [(e.file, e.path, e.bytes) for e in entries.values()]
    if not check_checkpoints(window.spec, files, f"run {window.run_id}'s model spec",
                             f"run {window.run_id}: checkpoint "):
        log(f"run {window.run_id}'s model factory {window.spec.factory!r} does not build on the meta device: "
            "its size is not checked, only its checkpoints' layouts against each other")


def checked_window(window: CheckpointWindow, log: Callable[[str], None]) -> CheckpointWindow:
    """:func:`check_window`, then :func:`drop_nonfinite`: the window as it may be scored."""
    check_window(window, log)
    return drop_nonfinite(window, log)
