"""Events of the admin service: its public contract.

Stream: ``admin-tokens``. An audit of who could do what is a replay of these:

- ``TokenCreated``: an API token was issued with ``scopes``, until ``expires_at``
  (None: no expiry). Only the SHA-256 of the token is recorded, never the token.
- ``TokenRevoked``: the token stops working from this event on.
"""

from __future__ import annotations

from kernel.events import Event

__all__ = ["STREAM", "TokenCreated", "TokenRevoked"]

STREAM = "admin-tokens"


class TokenCreated(Event):
    token_id: str
    name: str
    scopes: list[str]
    #: Unix time after which the token is refused (None: never).
    expires_at: float | None
    #: SHA-256 (hex) of the whole token string.
    digest: str
    #: Who issued it: ``admin`` (the admin token) or ``token:<id>``.
    created_by: str


class TokenRevoked(Event):
    token_id: str
    revoked_by: str
    reason: str = ""
