"""Fail fast on an unreachable MLflow tracking server: seconds, one line, the right culprit."""
from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from urllib.parse import urlparse

from lcsc_ops.errors import LcscError
from lcsc_ops.redact import mask_credentials

CONNECT_TIMEOUT_S = 5.0


def check_reachable(tracking_uri: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """For an ``http(s)://`` tracking URI, one request to the server's ``/health`` with a short
    timeout; an unreachable server is an LcscError naming it (file and database stores pass)."""
    if not tracking_uri or urlparse(tracking_uri).scheme not in ("http", "https"):
        return
    # MLflow's own client retries for minutes by default; a CLI call should not.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered: reachable (auth or routing is MLflow's to report)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, ssl.SSLError) or isinstance(reason, ssl.SSLError):
            return  # it answered TLS; trusting its certificate is MLflow's setting (MLFLOW_TRACKING_INSECURE_TLS)
        raise LcscError(f"MLflow tracking server {mask_credentials(tracking_uri)} is unreachable ({reason})") from None
