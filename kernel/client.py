"""A small client of a running kernel's admin API, for the command-line tools.

Standard library only (the CLI must not need httpx): one call, JSON in and out, and a
clear :class:`ServerUnreachable` instead of a traceback when nothing answers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from kernel.errors import XcoreError

__all__ = ["ServerUnreachable", "admin_call"]


class ServerUnreachable(XcoreError):
    """No xcore server answered at the given address."""


def admin_call(
    base_url: str,
    token: str,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """``method`` on ``<base_url>/admin<path>``; returns (status, decoded JSON body)."""
    base = base_url.rstrip("/")
    req = urllib.request.Request(base + "/admin" + path, data=body, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"detail": raw.decode("utf-8", "replace")}
    except urllib.error.URLError as exc:
        raise ServerUnreachable(f"no xcore server answers at {base} ({exc.reason})") from None
    except (ConnectionError, TimeoutError) as exc:
        raise ServerUnreachable(f"no xcore server answers at {base} ({exc})") from None
