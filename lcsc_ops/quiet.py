"""Quiet by default: MLflow's and Optuna's own lines stay out of a command's output.

Our own lines say what happened once (a run, a registered version, a failed trial); MLflow's
"🏃 View run …" links, its registration lines and warnings, and Optuna's per-trial lines and
warnings come back with ``--verbose`` or ``LCSC_OPS_DEBUG``. The choice travels in the
environment, so the processes a command starts (workers, the checkpoint uploader) follow it.
"""
from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "LCSC_OPS_VERBOSE"
_OURS = "_LCSC_OPS_MLFLOW_LEVEL"  # MLFLOW_LOGGING_LEVEL is ours to set, not the user's


def verbose() -> bool:
    """Whether the libraries' own lines are wanted (``--verbose``, ``LCSC_OPS_DEBUG``)."""
    return bool(os.environ.get(VERBOSE_ENV) or os.environ.get("LCSC_OPS_DEBUG"))


def configure(verbose_flag: bool = False) -> None:
    """Quiet (or, with ``verbose_flag`` or the environment, verbose) libraries in this process and
    in the processes it starts. A ``MLFLOW_LOGGING_LEVEL`` the user set is kept."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    loud = verbose()
    if not os.environ.get("MLFLOW_LOGGING_LEVEL") or os.environ.get(_OURS):
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING" if loud else "ERROR"  # read when mlflow is imported
        os.environ[_OURS] = "1"
    # MLflow prints a run's and its experiment's links on stdout whenever a run ends on a server.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "false" if loud else "true"
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    if not loud:
        warnings.filterwarnings("ignore", module=r"(mlflow|optuna)(\.|$)")
