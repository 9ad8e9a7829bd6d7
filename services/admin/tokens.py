"""Scoped API tokens: issued and revoked as events, verified from a projection.

A token reads ``xct_<id>_<secret>``: the id finds its record in one dict probe, the
secret is 256 random bits, and only the SHA-256 of the whole string is recorded (in
``TokenCreated``), compared in constant time. Scopes: ``admin:read`` (every admin
``GET``), ``admin:write`` (every admin command), and any scope a plugin's manifest
asks for (``orders:read``). The admin token of the settings (or the generated one)
holds ``*``: every scope. A token can only grant scopes it holds itself, so a token
never mints a stronger one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from kernel.events import Recorded
from kernel.projections import Projection, handles
from services.admin.events import TokenCreated, TokenRevoked

__all__ = [
    "ADMIN_READ",
    "ADMIN_WRITE",
    "ALL",
    "AdminTokens",
    "TokenRecord",
    "new_token",
    "required_scope",
]

ADMIN_READ = "admin:read"
ADMIN_WRITE = "admin:write"
ALL = "*"
PREFIX = "xct_"
_TOKEN_RE = re.compile(r"^xct_([0-9a-f]{16})_[A-Za-z0-9_-]{20,100}$")


def required_scope(method: str) -> str:
    """The admin scope an HTTP method needs: reads need admin:read, the rest admin:write."""
    return ADMIN_READ if method.upper() in ("GET", "HEAD", "OPTIONS") else ADMIN_WRITE


def new_token() -> tuple[str, str, str]:
    """A fresh (token_id, token, sha256 hex digest)."""
    token_id = secrets.token_hex(8)
    token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    return token_id, token, hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class TokenRecord:
    token_id: str
    name: str
    scopes: frozenset[str]
    expires_at: float | None
    digest: bytes
    created_by: str
    created_at: float
    revoked_at: float | None = None
    revoked_by: str | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self, now: float) -> dict[str, Any]:
        return {
            "id": self.token_id,
            "name": self.name,
            "scopes": sorted(self.scopes),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "revoked_by": self.revoked_by,
            "active": self.active(now),
        }


class AdminTokens(Projection):
    """Every token ever issued, by id (revoked ones kept for the audit)."""

    name = "admin.tokens"
    schema = 1

    def reset(self) -> None:
        self.tokens: dict[str, TokenRecord] = {}

    @handles(TokenCreated)
    def _created(self, r: Recorded) -> None:
        d = r.data
        self.tokens[d["token_id"]] = TokenRecord(
            token_id=d["token_id"],
            name=d["name"],
            scopes=frozenset(d["scopes"]),
            expires_at=d.get("expires_at"),
            digest=bytes.fromhex(d["digest"]),
            created_by=d.get("created_by", "?"),
            created_at=r.timestamp,
        )

    @handles(TokenRevoked)
    def _revoked(self, r: Recorded) -> None:
        record = self.tokens.get(r.data["token_id"])
        if record is not None and record.revoked_at is None:
            record.revoked_at = r.timestamp
            record.revoked_by = r.data.get("revoked_by")

    def verify(self, token: str) -> TokenRecord | None:
        """The active record of ``token``, or None (unknown, wrong, revoked, expired)."""
        match = _TOKEN_RE.match(token)
        if match is None:
            return None
        record = self.tokens.get(match.group(1))
        if record is None:
            return None
        if not hmac.compare_digest(hashlib.sha256(token.encode()).digest(), record.digest):
            return None
        return record if record.active(time.time()) else None
