"""Credentials never leave the process: URLs are shown with their password masked."""
from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def mask_credentials(text: str) -> str:
    """``postgresql://user:pw@host/db`` → ``postgresql://user:***@host/db``, anywhere in ``text``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
