"""Browser sessions of the admin page: an opaque cookie in front of a bearer token.

The guarantee: a browser never holds the admin token after logging in, and a request
another site makes the browser send cannot act. The mechanism: login exchanges the
token for a random session id kept in an ``HttpOnly; SameSite=Strict`` cookie (script
on the page cannot read it, other sites' requests do not carry it); the token stays in
this process's memory, beside a per-session CSRF token that every state-changing
request must echo in a header. Sessions expire (absolute lifetime from settings), are
bounded in number (the oldest dropped first) and vanish with the process: after a
restart the operator logs in again.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

__all__ = ["LoginThrottle", "Session", "SessionStore"]

#: The scope names the admin API uses; a session without ``admin:write`` (or ``*``, every
#: scope) is read-only.
WRITE_SCOPES = frozenset({"admin:write", "*"})


@dataclass
class Session:
    id: str
    token: str
    csrf: str
    scopes: list[str]
    expires_at: float
    created_at: float = field(default_factory=time.time)
    _ended: asyncio.Event | None = field(default=None, repr=False, compare=False)

    async def wait_ended(self) -> None:
        """Return when the session is dropped (logout, a newer login, a revoked token)
        or expires."""
        if self._ended is None:
            self._ended = asyncio.Event()
        if self.expires_at <= time.time():
            return
        try:
            await asyncio.wait_for(self._ended.wait(), timeout=self.expires_at - time.time())
        except TimeoutError:
            return

    def end(self) -> None:
        self.expires_at = min(self.expires_at, time.time())
        if self._ended is not None:
            self._ended.set()

    @property
    def can_write(self) -> bool:
        return not WRITE_SCOPES.isdisjoint(self.scopes)

    def csrf_matches(self, presented: str | None) -> bool:
        # compared as bytes: a header with non-ASCII characters is a wrong token, not an
        # error (compare_digest refuses non-ASCII str)
        return presented is not None and hmac.compare_digest(
            presented.encode("utf-8", "surrogateescape"), self.csrf.encode()
        )


class SessionStore:
    """Live sessions by id; lookups drop expired ones."""

    def __init__(self, *, ttl: float, max_sessions: int = 1000, max_per_token: int = 20) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        #: one token's logins beyond this end its own oldest sessions, not others': a
        #: holder of some read-only token cannot log every other operator out by
        #: logging in a thousand times
        self.max_per_token = max_per_token
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, token: str, scopes: list[str]) -> Session:
        self._expire()
        same = [sid for sid, s in self._sessions.items() if s.token == token]
        while len(same) >= self.max_per_token:
            self.drop(same.pop(0))
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)[1].end()
        session = Session(
            id=secrets.token_urlsafe(32),
            token=token,
            csrf=secrets.token_urlsafe(32),
            scopes=list(scopes),
            expires_at=time.time() + self.ttl,
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= time.time():
            del self._sessions[session_id]
            session.end()
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                session.end()

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = time.time()
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            self._sessions.pop(sid).end()


class LoginThrottle:
    """At most ``limit`` failed logins per client address in a sliding ``window``."""

    def __init__(self, *, limit: int, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try again (0 when it may now)."""
        failures = self._recent(client)
        if len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window - time.monotonic())

    def attempt(self, client: str) -> tuple[float, float]:
        """Start a login attempt: ``(wait, 0)`` when blocked, else ``(0, stamp)``.

        The attempt counts as a failure from now on (so concurrent attempts cannot all
        pass the check before any has failed) until :meth:`succeeded` withdraws it.
        """
        wait = self.blocked(client)
        if wait:
            return wait, 0.0
        return 0.0, self.failed(client)

    def failed(self, client: str) -> float:
        failures = self._recent(client)
        stamp = time.monotonic()
        failures.append(stamp)
        self._failures[client] = failures
        self._failures.move_to_end(client)
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)
        return stamp

    def succeeded(self, client: str, stamp: float | None = None) -> None:
        """Withdraw the attempt ``stamp`` (a login that did not fail).

        Earlier failures stay: a login with some valid token must not reset the count
        of guesses at another one.
        """
        failures = self._failures.get(client)
        if failures is None or stamp is None:
            return
        try:
            failures.remove(stamp)
        except ValueError:
            return
        if not failures:
            del self._failures[client]

    def _recent(self, client: str) -> deque[float]:
        failures = self._failures.get(client, deque())
        horizon = time.monotonic() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures
