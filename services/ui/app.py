"""The ASGI app mounted at ``/admin/ui``: the page, its assets, login, and the API bridge.

Paths (below ``/admin/ui``):

- ``/``: the page (one HTML file; the script and styles are files beside it, so the
  Content-Security-Policy allows no inline code at all);
- ``/static/<file>``: the assets shipped in this package (nothing else is served);
- ``POST /login`` (JSON ``{"token": ...}``), ``POST /logout``, ``GET /session``;
- ``/api/<path>``: the admin API at ``/admin/<path>``, called on the session's behalf.

The bridge re-enters the host app with the session's bearer token in place of the
cookie, so every admin route keeps its own guard, scopes, limits and errors: the page
can do nothing the token could not. A state-changing call must carry the session's
CSRF token in ``X-CSRF-Token`` and come from the same origin; a read-only session's
state-changing calls are refused here before they reach the API (which would refuse
them too). Streams (Server-Sent Events) pass through unbuffered.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from services.ui.sessions import LoginThrottle, Session, SessionStore

__all__ = ["COOKIE", "UiApp"]

log = logging.getLogger("xcore.ui")

#: The session cookie's name.
COOKIE = "xcore_ui_session"
#: Where the page lives in the host app.
MOUNT = "/admin/ui"
#: Methods that change nothing (no CSRF token needed).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The largest login body accepted (a token is far smaller).
MAX_LOGIN_BODY = 8192

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _load_assets() -> dict[str, tuple[bytes, str]]:
    """Every file of ``static/``, read once: the only files the page serves."""
    assets: dict[str, tuple[bytes, str]] = {}
    root = resources.files("services.ui") / "static"
    for entry in root.iterdir():
        name = entry.name
        suffix = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and suffix in _TYPES:
            assets[name] = (entry.read_bytes(), _TYPES[suffix])
    return assets


class UiApp:
    """The page's ASGI app; ``scope['app']`` is the host app it bridges to."""

    def __init__(
        self,
        sessions: SessionStore,
        throttle: LoginThrottle,
        *,
        max_rows: int,
        refresh_ms: int,
    ) -> None:
        self.sessions = sessions
        self.throttle = throttle
        self.max_rows = max_rows
        self.refresh_ms = refresh_ms
        self.assets = _load_assets()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        path = _route_path(scope)
        method = scope["method"]
        if path in ("", "/"):
            response = self._page() if method in ("GET", "HEAD") else _error(405, "use GET")
        elif path.startswith("/static/"):
            response = self._asset(path[len("/static/") :], method)
        elif path == "/login":
            response = (
                await self._login(scope, receive) if method == "POST" else _error(405, "use POST")
            )
        elif path == "/logout":
            response = self._logout(scope) if method == "POST" else _error(405, "use POST")
        elif path == "/session":
            response = await self._session(scope) if method == "GET" else _error(405, "use GET")
        elif path == "/api" or path.startswith("/api/"):
            await self._bridge(scope, receive, send, path[len("/api") :])
            return
        else:
            response = _error(404, f"no page at {MOUNT}{path}")
        await response(scope, receive, send)

    # -- the page -------------------------------------------------------------------------

    def _page(self) -> Response:
        body, media = self.assets["index.html"]
        return _secure(Response(body, media_type=media, headers={"cache-control": "no-store"}))

    def _asset(self, name: str, method: str) -> Response:
        if method not in ("GET", "HEAD"):
            return _error(405, "use GET")
        found = self.assets.get(name)
        if found is None:
            return _error(404, f"no asset {name!r}")
        body, media = found
        return _secure(Response(body, media_type=media, headers={"cache-control": "no-cache"}))

    # -- sessions -------------------------------------------------------------------------

    async def _login(self, scope: Scope, receive: Receive) -> Response:
        request = Request(scope, receive)
        refusal = _cross_site(request)
        if refusal:
            return _error(403, refusal)
        if (
            request.headers.get("content-type", "").split(";")[0].strip().lower()
            != "application/json"
        ):
            return _error(415, 'send the token as JSON: {"token": "..."}')
        client = request.client.host if request.client else "?"
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return _error(413, f"a login body is at most {MAX_LOGIN_BODY} bytes")
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(422, "the login body is not JSON")
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not token.strip():
            return _error(422, "field 'token': a non-empty string is required")
        token = token.strip()
        # counted as a failure until it succeeds, with no await between the check and
        # the count: concurrent guesses cannot all pass the check before one has failed
        wait, attempt = self.throttle.attempt(client)
        if wait:
            return _error(
                429,
                f"too many failed logins from {client}; try again in {wait:.0f} s",
                headers={"retry-after": str(int(wait) + 1)},
            )
        status, answer = await _call(scope, "GET", "/admin/whoami", token)
        if status == 401:
            log.info("admin page: a login from %s was refused (wrong token)", client)
            return _error(401, "this token was refused")
        self.throttle.succeeded(client, attempt)
        if status == 403:
            # a valid token that may not read the admin API: not an outage
            return _error(403, "this token cannot use the admin page: it lacks 'admin:read'")
        if status != 200:
            detail = answer.get("detail") if isinstance(answer, dict) else None
            return _error(503, f"cannot check the token now: {detail or f'HTTP {status}'}")
        scopes = answer.get("scopes", []) if isinstance(answer, dict) else []
        # a login replaces the session the browser had (none outlives its cookie)
        self.sessions.drop(request.cookies.get(COOKIE))
        session = self.sessions.create(token, [str(s) for s in scopes])
        log.info(
            "admin page: logged in from %s (%s)",
            client,
            "read and write" if session.can_write else "read only",
        )
        response = JSONResponse(self._describe(session), headers={"cache-control": "no-store"})
        response.set_cookie(
            COOKIE,
            session.id,
            max_age=int(self.sessions.ttl),
            path=scope.get("app_root_path", "") + MOUNT,
            secure=scope.get("scheme") == "https",
            httponly=True,
            samesite="strict",
        )
        return _secure(response)

    def _logout(self, scope: Scope) -> Response:
        request = Request(scope)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is not None:
            refusal = _cross_site(request) or _csrf(request, session)
            if refusal:
                return _error(403, refusal)
            self.sessions.drop(session.id)
        response = JSONResponse({"logged_in": False}, headers={"cache-control": "no-store"})
        response.delete_cookie(
            COOKIE, path=scope.get("app_root_path", "") + MOUNT, httponly=True, samesite="strict"
        )
        return _secure(response)

    async def _session(self, scope: Scope) -> Response:
        session = self.sessions.get(Request(scope).cookies.get(COOKIE))
        if (
            session is not None
            and (await _call(scope, "GET", "/admin/whoami", session.token))[0] == 401
        ):
            # the token was revoked (or expired) since the login: so is the session
            self.sessions.drop(session.id)
            session = None
        body = self._describe(session) if session else {"logged_in": False}
        return _secure(JSONResponse(body, headers={"cache-control": "no-store"}))

    def _describe(self, session: Session) -> dict[str, Any]:
        return {
            "logged_in": True,
            "csrf": session.csrf,
            "scopes": session.scopes,
            "can_write": session.can_write,
            "expires_at": session.expires_at,
            "max_rows": self.max_rows,
            "refresh_ms": self.refresh_ms,
        }

    # -- the bridge to the admin API ------------------------------------------------------

    async def _bridge(self, scope: Scope, receive: Receive, send: Send, rest: str) -> None:
        request = Request(scope)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            await _error(401, "not logged in (or the session expired): log in again")(
                scope, receive, send
            )
            return
        if scope["method"] not in SAFE_METHODS:
            refusal = _cross_site(request) or _csrf(request, session)
            if refusal is None and not session.can_write:
                refusal = "this session's token is read-only (it lacks admin:write)"
            if refusal:
                await _error(403, refusal)(scope, receive, send)
                return
        if rest == MOUNT[len("/admin") :] or rest.startswith(MOUNT[len("/admin") :] + "/"):
            # the page itself is not part of the admin API (and has no bearer login)
            await _error(404, f"no admin API route at /admin{rest}")(scope, receive, send)
            return
        root = scope.get("app_root_path", "")
        target = root + "/admin" + rest
        forwarded = dict(scope)
        forwarded.update(
            path=target,
            raw_path=target.encode(),
            root_path=root,
            headers=_with_bearer(scope["headers"], session.token),
        )
        forwarded.pop("path_params", None)
        forwarded.pop("endpoint", None)
        sessions = self.sessions

        async def watched(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] == 401
                and (await _call(scope, "GET", "/admin/whoami", session.token))[0] == 401
            ):
                # the API no longer accepts the session's token (revoked or expired):
                # the session ends with it, and the browser is told to forget it
                sessions.drop(session.id)
                headers = list(message.get("headers", []))
                headers.append((b"set-cookie", _expired_cookie(scope).encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        # A stream (SSE) the session opened ends with the session: once the request's
        # body is read, the app is told the client left when the session is dropped or
        # expires (Starlette's streaming responses listen for that under ASGI 2.3).
        forwarded["asgi"] = {**scope.get("asgi", {}), "spec_version": "2.3"}
        body_done = False

        async def until_session_ends() -> Message:
            nonlocal body_done
            if not body_done:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_done = True
                return message
            answer: Message = {"type": "http.disconnect"}
            async with anyio.create_task_group() as group:

                async def client() -> None:
                    nonlocal answer
                    answer = await receive()
                    group.cancel_scope.cancel()

                async def ended() -> None:
                    await session.wait_ended()
                    group.cancel_scope.cancel()

                group.start_soon(client)
                group.start_soon(ended)
            return answer

        await scope["app"](forwarded, until_session_ends, watched)


def _expired_cookie(scope: Scope) -> str:
    response = Response()
    response.delete_cookie(
        COOKIE, path=scope.get("app_root_path", "") + MOUNT, httponly=True, samesite="strict"
    )
    return response.headers["set-cookie"]


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _with_bearer(headers: list[tuple[bytes, bytes]], token: str) -> list[tuple[bytes, bytes]]:
    dropped = {b"authorization", b"cookie", b"x-csrf-token"}
    kept = [(k, v) for k, v in headers if k.lower() not in dropped]
    kept.append((b"authorization", b"Bearer " + token.encode()))
    return kept


def _cross_site(request: Request) -> str | None:
    """Why a state-changing request is refused as cross-site, or None."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"cross-site request refused (Sec-Fetch-Site: {site})"
    origin = request.headers.get("origin")
    if origin is not None:
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != expected:
            return f"cross-origin request refused (Origin {origin!r}, expected {expected!r})"
    return None


def _csrf(request: Request, session: Session) -> str | None:
    if not session.csrf_matches(request.headers.get("x-csrf-token")):
        return "missing or wrong X-CSRF-Token header (reload the page)"
    return None


def _secure(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    response.headers["cache-control"] = "no-store"
    return _secure(response)


async def _call(scope: Scope, method: str, path: str, token: str) -> tuple[int, Any]:
    """Call the host app in process with ``token``; returns the status and the JSON body."""
    root = scope.get("app_root_path", "")
    host_header = next((v for k, v in scope["headers"] if k == b"host"), b"localhost")
    inner: dict[str, Any] = {
        "type": "http",
        "asgi": scope.get("asgi", {"version": "3.0"}),
        "http_version": scope.get("http_version", "1.1"),
        "method": method,
        "scheme": scope.get("scheme", "http"),
        "path": root + path,
        "raw_path": (root + path).encode(),
        "query_string": b"",
        "root_path": root,
        "headers": [(b"host", host_header), (b"authorization", b"Bearer " + token.encode())],
        "client": scope.get("client"),
        "server": scope.get("server"),
    }
    if "state" in scope:
        inner["state"] = dict(scope["state"])
    status = 500
    chunks: list[bytes] = []
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await scope["app"](inner, receive, send)
    body = b"".join(chunks)
    try:
        return status, orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return status, None
