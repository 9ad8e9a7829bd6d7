"""The request guard: every HTTP request is bounded before it costs anything.

Guarantees, for every route of the app (the kernel's, the services', the plugins'):

- an ``/admin`` request is authenticated on its head alone: a refused one is answered
  (401, or 503 when no admin service runs) before one byte of its body is read, so an
  unauthenticated 300 MB upload costs its headers, not a spooled file;
- a body larger than the route's limit is refused with 413: at once when
  ``Content-Length`` says so, otherwise the moment the bytes read pass the limit (a
  chunked upload cannot lie its way past it); the app then sees the client as gone;
- a client that stops sending its body is answered 408 after ``body_timeout``, and so is
  one that drips it (a byte just inside each timeout): after its first ``body_timeout``
  seconds of waiting a body must average ``min_body_rate`` bytes per second (the wait
  allowed grows by one second for every ``min_body_rate`` bytes received; only the
  time spent waiting for the client counts, not the app's own pace of reading);
- ``OPTIONS`` on a path of the app answers 204 with ``Allow`` listing every method of
  that path, and an admin route's 405 lists them all too (Starlette lists only the
  first matching route's);
  the methods come from the OpenAPI document, so plugin paths are covered live. A path
  that declares its own OPTIONS operation answers it itself;
- ``HEAD`` works wherever ``GET`` does, as ``Allow`` says: the request reaches the app as
  a ``GET`` (same authentication, same scope: ``admin:read``) and only the head of the
  answer is sent (its ``Content-Length`` is the GET's). A path that declares its own
  HEAD operation answers it itself.

Mechanism: one ASGI wrapper around the whole app (outside its middleware), so no route,
dependency or form parser runs before these checks. The body is counted in the
``receive`` it hands the app; once the guard has answered, whatever the app tries to
send is dropped and the exception it raises on the cut body is logged at debug level.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import anyio
import orjson
from fastapi import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ADMIN_PREFIX", "RequestGuard", "is_admin_path"]

log = logging.getLogger("xcore.http")

ADMIN_PREFIX = "/admin"

#: Checks the head of an ``/admin`` request; raises HTTPException to refuse it.
Authenticator = Callable[[Request], Awaitable[Any]]
BodyLimit = Callable[[str, str], int]


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


class _Refused(Exception):
    """Raised into the app by ``receive`` once the guard has answered for it."""


class RequestGuard:
    """ASGI wrapper applying the guarantees above to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[], Authenticator],
        body_limit: BodyLimit,
        body_timeout: float,
        min_body_rate: int = 0,
        operations: Callable[[], dict[str, Any]],
        public_openapi: Callable[[], dict[str, Any]] | None = None,
        docs_paths: Iterable[str] = (),
        self_authenticating: Iterable[str] = (),
    ) -> None:
        self.app = app
        self._authenticate = authenticate
        self._body_limit = body_limit
        self._body_timeout = body_timeout
        self._min_body_rate = min_body_rate
        self._operations = operations
        self._public_openapi = public_openapi
        self._docs_paths = frozenset(docs_paths)
        #: ``/admin`` sub-prefixes that authenticate their own requests (a session
        #: cookie), so their head is not checked for a bearer token here
        self._self_authenticating = tuple(p.rstrip("/") for p in self_authenticating)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        admin = path.startswith(ADMIN_PREFIX) and is_admin_path(path)
        if (admin and not self._authenticates_itself(path)) or path in self._docs_paths:
            try:
                await self._authenticate()(Request(scope))
            except HTTPException as exc:
                await _answer(send, exc.status_code, str(exc.detail), exc.headers)
                return
            except Exception:  # a broken authenticator fails closed, loudly
                log.exception("the admin authenticator failed on %s %s", *_where(scope))
                await _answer(send, 503, "the admin authenticator failed; see the server log")
                return
        elif (
            self._public_openapi is not None
            and path == "/openapi.json"
            and not await self._authenticated(scope)
        ):
            await _answer_json(send, 200, self._public_openapi())
            return
        method: str = scope["method"]
        if method == "OPTIONS":
            allowed = self._allowed(scope)
            if allowed and not self._declares(path, "options"):
                await _answer(send, 204, None, {"allow": ", ".join(allowed)})
                return
        elif (
            method == "HEAD" and "GET" in self._allowed(scope) and not self._declares(path, "head")
        ):
            # Allow lists HEAD wherever GET is served: it is answered as that GET with
            # the body left out (FastAPI's routes do not answer HEAD themselves)
            head = _Head(receive, send)
            try:
                await self(dict(scope, method="GET"), head.receive, head.send)
            except (OSError, ClientDisconnect) as exc:
                if not head.stopped:
                    raise
                log.debug("a streamed answer to HEAD %s stopped after its head: %r", path, exc)
            return
        declared, chunked = _body_headers(scope)
        if admin:  # the admin API's contract: a 405 lists every method of the path
            send = self._allow_fixer(scope, send)
        if not chunked and not declared:
            await self.app(scope, receive, send)  # no body: nothing to bound
            return
        if declared == -1:
            await _answer(send, 400, "the Content-Length header is not a number")
            return
        limit = self._body_limit(method, path)
        if declared is not None and declared > limit:
            await _answer(send, 413, _too_large(limit), {"connection": "close"})
            return
        await self._bounded(scope, receive, send, limit)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        state = {"read": 0, "done": False, "started": False, "answered": False}
        waited = [0.0]  # seconds spent waiting for body data

        async def guarded_send(message: Message) -> None:
            if state["answered"]:
                return  # the guard answered already: the app's reply goes nowhere
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        async def refuse(status: int, detail: str) -> None:
            if not state["started"]:
                state["started"] = True
                await _answer(send, status, detail, {"connection": "close"})
            state["answered"] = True

        async def guarded_receive() -> Message:
            if state["answered"]:
                raise _Refused()
            if state["done"]:
                return await receive()  # after the body: disconnect notices, unbounded
            message: Message | None = None
            wait = self._body_timeout
            if self._min_body_rate:  # the time spent waiting for the client, not the app
                budget = self._body_timeout + state["read"] / self._min_body_rate
                wait = min(wait, budget - waited[0])
            if wait > 0:
                begun = time.monotonic()
                with anyio.move_on_after(wait):
                    message = await receive()
                waited[0] += time.monotonic() - begun
            if message is None:
                if wait < self._body_timeout:
                    await refuse(
                        408,
                        f"the request body came slower than {self._min_body_rate} bytes per "
                        f"second ({state['read']} bytes in {waited[0]:.0f} seconds)",
                    )
                else:
                    await refuse(408, f"no request body data for {self._body_timeout:g} seconds")
                raise _Refused()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    await refuse(413, _too_large(limit))
                    raise _Refused()
                if not message.get("more_body", False):
                    state["done"] = True
            return message

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception as exc:
            if not state["answered"]:
                raise
            log.debug("the app stopped on a refused body (%s %s): %r", *_where(scope), exc)

    def _authenticates_itself(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self._self_authenticating)

    async def _authenticated(self, scope: Scope) -> bool:
        if not any(key == b"authorization" for key, _ in scope["headers"]):
            return False  # an anonymous reader: not a refusal worth a log line
        try:
            await self._authenticate()(Request(scope))
        except HTTPException:
            return False
        return True

    def _declares(self, path: str, method: str) -> bool:
        """Whether the path declares its own ``method`` operation (it answers it itself)."""
        paths = self._operations()
        return any(method in item for t, item in paths.items() if _template(t).fullmatch(path))

    def _allow_fixer(self, scope: Scope, send: Send) -> Send:
        """A ``send`` that makes a 405's ``Allow`` list every method of the path."""

        async def fixed(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                allowed = self._allowed(scope)
                if allowed:
                    headers = [(k, v) for k, v in message.get("headers", []) if k != b"allow"]
                    headers.append((b"allow", ", ".join(allowed).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        return fixed

    def _allowed(self, scope: Scope) -> list[str]:
        """Every method the app serves at this path (from its OpenAPI ``paths``)."""
        path: str = scope["path"]
        methods: set[str] = set()
        try:
            paths = self._operations()
        except Exception:
            log.exception("the OpenAPI document failed; Allow cannot be computed")
            return []
        # The path's own operations: of the templates that match it, those with the
        # fewest parameters (``/a/reload`` is ``/a/reload``, not ``/a/{name}``).
        matching = [t for t in paths if _template(t).fullmatch(path)]
        fewest = min((t.count("{") for t in matching), default=0)
        for template in matching:
            if template.count("{") == fewest:
                methods |= {m.upper() for m in paths[template] if m in _METHODS}
        if not methods:
            return []
        methods |= {"OPTIONS"}
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)


_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


@functools.lru_cache(maxsize=1024)
def _template(template: str) -> re.Pattern[str]:
    """``/a/{name}`` as a regular expression (a parameter is one path segment)."""
    parts = re.split(r"(\{[^}]*\})", template)
    return re.compile(
        "".join("[^/]+" if p.startswith("{") and p.endswith("}") else re.escape(p) for p in parts)
    )


class _Head:
    """The ``receive`` and ``send`` of a HEAD answered as a GET: only the head is sent.

    The answer ends with its head (an empty body follows it at once), so a keep-alive
    client can send its next request even when the GET streams without end (a server-
    sent events route). The app then sees its client as gone: ``receive`` says
    ``http.disconnect``, and a streamed body's next piece raises ``OSError`` in ``send``,
    as a closed connection does, so the stream stops.
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.ended = False
        #: the app kept streaming after the head and was stopped
        self.stopped = False
        self._streaming = False

    async def receive(self) -> Message:
        if self.ended:
            return {"type": "http.disconnect"}
        return await self._receive()

    async def send(self, message: Message) -> None:
        if self.ended:
            if message["type"] == "http.response.body" and self._streaming:
                self.stopped = True
                raise OSError("HEAD: the client takes the head only")
            self._streaming = bool(message.get("more_body", False))
            return
        await self._send(message)
        if message["type"] == "http.response.start":
            self.ended = True
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    """The declared body length (None when absent, -1 when not a number), and chunked."""
    declared: int | None = None
    chunked = False
    for key, value in scope["headers"]:
        if key == b"content-length":
            declared = int(value) if value.isdigit() else -1
        elif key == b"transfer-encoding":
            chunked = True
    return declared, chunked


def _too_large(limit: int) -> str:
    return f"the request body exceeds the limit of {limit} bytes"


def _where(scope: Scope) -> tuple[str, str]:
    return scope.get("method", "?"), scope.get("path", "?")


async def _answer(
    send: Send, status: int, detail: str | None, headers: Mapping[str, str] | None = None
) -> None:
    await _answer_json(send, status, None if detail is None else {"detail": detail}, headers)


async def _answer_json(
    send: Send, status: int, content: Any, headers: Mapping[str, str] | None = None
) -> None:
    detail = content
    body = b"" if content is None else orjson.dumps(content)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if detail is not None:
        raw += [(b"content-type", b"application/json")]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
