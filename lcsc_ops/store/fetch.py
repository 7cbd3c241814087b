"""Reading a run's checkpoints back from MLflow, kept under its old names for callers outside the
package (tests, benchmarks): the home of each piece is now elsewhere.

- :func:`fetch_window`: the registry of checkpoint sources (:mod:`lcsc_ops.store.sources`), which
  picks the reader of the run's layout;
- :func:`read_manifest`: our own layout's reader (:mod:`lcsc_ops.store.sources.lcsc`);
- :func:`resolve_tracking_uri`, :func:`get_run_or_fail`: :mod:`lcsc_ops.store.tracking`.
"""
from __future__ import annotations

from lcsc_ops.store.sources import fetch_window
from lcsc_ops.store.sources.lcsc import read_manifest
from lcsc_ops.store.tracking import get_run_or_fail, resolve_tracking_uri

__all__ = ["fetch_window", "get_run_or_fail", "read_manifest", "resolve_tracking_uri"]
