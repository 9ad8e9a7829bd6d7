"""The admin bearer token: where it comes from, how it is kept, how it is checked.

- ``XCORE_ADMIN_TOKEN`` (or ``admin_token`` in ``xcore.yaml``) sets it;
- otherwise a token is generated at first start, printed once on stderr, and only its
  SHA-256 is stored (``<data_dir>/admin-token.sha256``, mode 0600). Delete that file to
  have a new one generated at the next start.

Tokens are 256-bit random strings, so a plain SHA-256 is as strong as a slow hash here;
the check hashes what was presented and compares digests in constant time. The token
never reaches a log line.

The check runs twice per admin request, on purpose: on the request's head, before its
body is read (``TokenGuard.authenticate``, installed with
``HttpSurface.set_admin_authenticator``), and as the routes' dependency. Wrong tokens
are logged through a :class:`RefusalLog`: a count per interval, not a line each.

Scopes: the admin token holds every scope; API tokens (``tokens.py``) hold theirs.
A read (``GET``) of an admin route needs ``admin:read``, anything else ``admin:write``;
a valid token without the scope gets 403 naming it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from fastapi import HTTPException, Request

from kernel.errors import SettingsError
from services.admin.refusals import RefusalLog
from services.admin.tokens import ALL, TokenRecord, required_scope

__all__ = ["TokenGuard", "load_or_create_token_hash"]

log = logging.getLogger("xcore.admin")

HASH_FILE = "admin-token.sha256"


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_or_create_token_hash(data_dir: Path, configured: str | None) -> bytes:
    """The digest of the admin token, generating and announcing one if none exists."""
    if configured is not None:  # validated (length) and redacted by Settings
        return digest(configured)
    path = data_dir / HASH_FILE
    if path.exists():
        stored = path.read_text().strip()
        try:
            value = bytes.fromhex(stored)
        except ValueError:
            value = b""
        if len(value) != 32:
            raise SettingsError(
                f"{path} does not hold a SHA-256 digest; delete it to generate a new admin token"
            )
        return value
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(digest(token).hex() + "\n")
    # Printed once, straight to the terminal: never through the logging pipeline.
    sys.stderr.write(
        "\n"
        "  xcore: a new admin token was generated (shown only this once):\n"
        f"      {token}\n"
        f"  Use it as 'Authorization: Bearer <token>'. Only its hash is kept in {path}.\n\n"
    )
    sys.stderr.flush()
    log.info("generated a new admin token; its hash is in %s", path)
    return digest(token)


class TokenGuard:
    """A FastAPI dependency admitting only requests bearing a token with the needed scope."""

    def __init__(
        self,
        token_hash: bytes,
        lookup: Callable[[str], TokenRecord | None] | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self._hash = token_hash
        self._lookup = lookup
        self.refusals = refusals if refusals is not None else RefusalLog(log)

    def scopes(self, token: str) -> frozenset[str] | None:
        """The scopes ``token`` holds, or None when it is not a valid token."""
        if hmac.compare_digest(digest(token), self._hash):
            return frozenset({ALL})
        if self._lookup is not None:
            record = self._lookup(token)
            if record is not None:
                return record.scopes
        return None

    async def authenticate(self, request: Request) -> frozenset[str]:
        """The scopes of ``request``'s token (from its headers only), or HTTPException 401."""
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise HTTPException(
                status_code=401,
                detail="this admin route needs 'Authorization: Bearer <admin token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scopes = self.scopes(presented.strip())
        if scopes is None:
            self.refusals.refused(
                request.method,
                request.url.path,
                request.client.host if request.client else "?",
                "wrong token",
            )
            raise HTTPException(
                status_code=401,
                detail="the token is wrong, revoked or expired",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return scopes

    async def __call__(self, request: Request) -> str:
        scopes = await self.authenticate(request)
        needed = required_scope(request.method)
        if ALL not in scopes and needed not in scopes:
            raise HTTPException(
                status_code=403,
                detail=f"this token lacks the scope {needed!r}",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'
                },
            )
        presented = request.headers.get("authorization", "").partition(" ")[2].strip()
        record = None if ALL in scopes or self._lookup is None else self._lookup(presented)
        principal = "admin" if record is None else f"token:{record.token_id}"
        request.state.admin_principal = principal
        request.state.admin_scopes = scopes
        return principal
