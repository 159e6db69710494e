"""Credentials out of everything the project writes or logs: one helper, used at every boundary.

`postgresql://user:secret@db/mlflow` → `postgresql://user:***@db/mlflow`; a token-only userinfo
(`https://ghp_xxx@host`) becomes `https://***@host`; query parameters that name a secret
(`?password=`, `token=`, `key=`, `secret=`, `sig=`, ...) get `***`. Applied to run.json, the
run-links Prefect artifact, the MLflow parent run's params, the copied config and the log lines
that print a tracking URI.
"""

from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*)(?::(?P<pw>[^@\s/]*))?@")
_QUERY = re.compile(r"(?i)([?&;](?:[\w.\-]*?(?:password|passwd|pwd|token|secret|key|sig|signature|credential)s?)=)"
                    r"[^&;#\s]*")
MASK = "***"


def _userinfo(m: re.Match) -> str:
    user, pw = m["user"], m["pw"]
    if pw is not None:
        return f"{m['scheme']}{user}:{MASK}@"
    # a lone userinfo on http(s) is usually a token; on ssh/git it is a user name
    if user and m["scheme"].lower().startswith(("http", "ws")):
        return f"{m['scheme']}{MASK}@"
    return m.group(0)


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it masked."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    return _QUERY.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(_userinfo, text))


def redact_obj(obj: Any) -> Any:
    """redact() on every string of a JSON-like structure (dicts, lists, tuples)."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj
