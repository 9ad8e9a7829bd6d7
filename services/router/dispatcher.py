"""The dispatcher: one ASGI app that hands each request to the plugin owning its prefix.

It is the kernel app's fallback (``kernel.http.set_fallback``): it receives every
request no kernel or admin route matched. Its routing table is an immutable
:class:`Table` replaced in a single assignment on the event loop; a request reads the
table once, so it finishes on the generation that received it even if a reload swaps
the table while it runs.

Matching is longest prefix first, on path segment boundaries: ``/app/hello`` serves
``/app/hello`` and ``/app/hello/x`` but not ``/app/hellox``. The table keeps the
distinct prefix lengths, so a lookup costs one dict probe per distinct length.

Plugin apps receive the request's scope unchanged (full path, same ``root_path``):
their routes are declared at their public paths.

Plugin requests are dispatched by a Starlette route (:class:`PluginRoute`) that the
kernel tries before every other route. The :class:`Dispatcher` itself is the kernel
app's fallback and only answers what no route matched (the front route included) with
a JSON 404: the host router calls it right after its route scan with no await in
between, so the table cannot have changed since the front route missed.

Around each plugin request :func:`serve` also (1) checks the caller against the
plugin's access policy (``services/router/access.py``) before any plugin code runs,
(2) gives the request an id — the client's ``X-Request-ID`` when it is a sane token,
else a new one — echoed in the response and carried by every log line the plugin
writes while serving it (``kernel.logging.request_id_var``), and (3) counts it by
route template, method and status class with its latency (``stats.py``), and (4)
counts it in flight on its mount (:class:`InFlight`: a withdrawn generation is taken
apart once its last request ends, ``dismantle.py``) and, for HTTP until its response
starts, in ``kernel.pacing.serving`` (build threads wait for it; a streamed body does
not hold them).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import URLPath
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel import pacing
from kernel.logging import plugin_var, request_id_var
from services.router.stats import PluginStats, RouteStats

if TYPE_CHECKING:
    from kernel.access import Policy
    from services.router.access import Authenticator
    from services.router.openapi import LazyFragment

__all__ = ["Dispatcher", "InFlight", "Mount", "PluginRoute", "Table", "serve"]

log = logging.getLogger("xcore.router")

_NOT_FOUND_BODY = b'{"detail":"Not Found"}'
_NOT_FOUND_START: Message = {
    "type": "http.response.start",
    "status": 404,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(_NOT_FOUND_BODY)).encode()),
    ],
}
_NOT_FOUND: Message = {"type": "http.response.body", "body": _NOT_FOUND_BODY}
#: Scope key through which the front route hands the matched mount to ``handle``.
_SCOPE_KEY = "xcore.plugin_mount"
#: Scope key holding the request id (plugins may read ``request.scope["xcore.request_id"]``).
REQUEST_ID_KEY = "xcore.request_id"
#: Scope key holding the authenticated caller (a ``services.router.access.Principal``).
PRINCIPAL_KEY = "xcore.principal"
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:@/+=-]{1,128}$")


class InFlight:
    """The requests one mount is serving, and what runs once the last one has ended
    after the mount was withdrawn (``services/router/dismantle.py``). Loop thread only."""

    __slots__ = ("_on_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._on_idle: Callable[[], None] | None = None

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._on_idle is not None:
            callback, self._on_idle = self._on_idle, None
            try:
                callback()
            except Exception:  # never the failure of the request that ended last
                log.exception("the work waiting for a withdrawn mount's last request failed")

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` now if no request is in flight, else when the last one ends."""
        if self.count == 0:
            callback()
        else:
            self._on_idle = callback


@dataclass(eq=False, slots=True)
class Mount:
    """One plugin generation served under ``prefix``."""

    plugin: str
    generation: int
    prefix: str
    #: The plugin's public paths (sorted).
    paths: list[str]
    #: The plugin's own ASGI app (a FastAPI app the mounter built, or a sandbox proxy).
    app: ASGIApp
    stats: PluginStats
    #: Where the front route enters: the app's router for a FastAPI app the mounter
    #: built (the host app already ran the same middleware), else the app itself.
    entry: ASGIApp
    #: The app's starlette router (for ``request.url_for``), if it has one.
    router: Any = None
    #: The plugin's OpenAPI ``paths``/``components``, namespaced, built on first use
    #: (None: the app documents nothing).
    openapi: LazyFragment | None = field(default=None, repr=False)
    #: What its routes require (None: every route is public).
    policy: Policy | None = None
    #: Its requests being served (shared by the copies ``dataclasses.replace`` makes).
    in_flight: InFlight = field(default_factory=lambda: InFlight())
    #: ``app`` was built by the mounter (mounts.py) and is taken apart once withdrawn
    #: (dismantle.py); False for an app served as it is (a sandbox proxy).
    owned: bool = False


class Table:
    """An immutable prefix table; build a new one to change anything."""

    __slots__ = ("by_plugin", "by_prefix", "lengths")

    def __init__(self, mounts: Iterable[Mount] = ()) -> None:
        by_plugin: dict[str, Mount] = {}
        by_prefix: dict[str, Mount] = {}
        for mount in mounts:
            if mount.plugin in by_plugin:
                raise ValueError(f"plugin {mount.plugin!r} is mounted twice")
            if mount.prefix in by_prefix:
                raise ValueError(f"prefix {mount.prefix!r} is mounted twice")
            by_plugin[mount.plugin] = mount
            by_prefix[mount.prefix] = mount
        self.by_plugin: Mapping[str, Mount] = by_plugin
        self.by_prefix: Mapping[str, Mount] = by_prefix
        #: Distinct prefix lengths, longest first (longest-prefix match).
        self.lengths: tuple[int, ...] = tuple(sorted({len(p) for p in by_prefix}, reverse=True))

    def match(self, path: str) -> Mount | None:
        """The mount with the longest prefix ``path`` falls under, if any."""
        by_prefix = self.by_prefix
        size = len(path)
        for length in self.lengths:
            if size == length:
                mount = by_prefix.get(path)
            elif size > length and path[length] == "/":
                mount = by_prefix.get(path[:length])
            else:
                continue
            if mount is not None:
                return mount
        return None

    def replace(self, plugin: str, mount: Mount | None) -> Table:
        """A new table where ``plugin`` is served by ``mount`` (or not at all)."""
        kept = [m for m in self.by_plugin.values() if m.plugin != plugin]
        if mount is not None:
            kept.append(mount)
        return Table(kept)


class Dispatcher:
    """Owner of the routing table, and the kernel app's fallback (a JSON 404).

    :meth:`front_route` gives the Starlette route that dispatches plugin requests; it
    sits before the app's own routes, so a plugin request does not first scan them
    (twice, with the trailing-slash retry).
    """

    def __init__(
        self, stats: RouteStats, *, observe: bool = True, auth: Authenticator | None = None
    ) -> None:
        self.stats = stats
        #: The routing table; replaced (never mutated) by :meth:`swap`.
        self.table = Table()
        #: Request ids and per-route counting (off only to measure their cost).
        self.observe = observe
        #: Checks callers of routes whose plugin requires scopes.
        self.auth = auth

    def swap(self, table: Table) -> None:
        """Serve ``table`` from now on (requests in flight keep the one they started with)."""
        self.table = table

    def front_route(self) -> PluginRoute:
        return PluginRoute(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request no route matched: JSON 404 (a websocket is closed)."""
        self.stats.unmatched += 1
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        await send(_NOT_FOUND_START)
        await send(_NOT_FOUND)


class PluginRoute(BaseRoute):
    """The dispatcher as the app's first route: it matches every mounted plugin prefix.

    It enters a plugin's own FastAPI app at its router (``Mount.entry``): the host app
    already ran the same default middleware (errors, exception handlers, the request's
    exit stack) around it.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] not in ("http", "websocket"):
            return Match.NONE, {}
        mount = self.dispatcher.table.match(_route_path(scope))
        if mount is None:
            return Match.NONE, {}
        return Match.FULL, {_SCOPE_KEY: mount}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        mount: Mount = scope[_SCOPE_KEY]
        dispatcher = self.dispatcher
        await serve(
            mount,
            mount.entry,
            scope,
            receive,
            send,
            observe=dispatcher.observe,
            auth=dispatcher.auth,
        )

    def url_path_for(self, name: str, /, **path_params: Any) -> URLPath:
        """Resolve a plugin route's name, so ``request.url_for`` works from any route."""
        for mount in self.dispatcher.table.by_plugin.values():
            if mount.router is not None:
                try:
                    path: URLPath = mount.router.url_path_for(name, **path_params)
                except NoMatchFound:
                    continue
                return path
        raise NoMatchFound(name, path_params)


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


async def serve(
    mount: Mount,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    observe: bool = True,
    auth: Authenticator | None = None,
) -> None:
    """Run ``app`` for a request under ``mount``: access check, request id, counting."""
    flight = mount.in_flight
    flight.count += 1
    if scope["type"] != "http":  # (a websocket would hold build threads for its life)
        try:
            await _serve(mount, app, scope, receive, send, observe=observe, auth=auth)
        finally:
            flight.leave()
        return
    # Build threads wait while it is handled (kernel/pacing.py), up to its response's
    # start: the body of a stream (server-sent events, for hours) mostly waits, and
    # would make every unit of every build wait ``build_yield_ms`` for nothing.
    handled = True
    pacing.serving += 1

    async def send_started(message: Message) -> None:
        nonlocal handled
        if handled and message["type"] == "http.response.start":
            handled = False
            pacing.serving -= 1
            pacing.request_ended()
        await send(message)

    try:
        await _serve(mount, app, scope, receive, send_started, observe=observe, auth=auth)
    finally:
        if handled:
            pacing.serving -= 1
            pacing.request_ended()
        flight.leave()


async def _serve(
    mount: Mount,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    observe: bool,
    auth: Authenticator | None,
) -> None:
    # The host app's router put itself here; the plugin's routes must resolve their own
    # route names (request.url_for), so they get the plugin's router instead.
    if mount.router is not None:
        scope["router"] = mount.router
    else:
        scope.pop("router", None)
    if mount.policy is not None and not await _admitted(mount.policy, auth, scope, send):
        if scope["type"] == "http":
            mount.stats.observe(401, 0.0, scope["method"], "denied")
        return
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    if not observe:
        await app(scope, receive, send)
        return

    request_id = _request_id(scope)
    scope[REQUEST_ID_KEY] = request_id
    echoed = (b"x-request-id", request_id.encode())
    status = 500

    async def send_and_watch(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", ()))
            if not any(name.lower() == b"x-request-id" for name, _ in headers):
                headers.append(echoed)  # (a plugin that sets its own keeps it)
            message["headers"] = headers
        await send(message)

    rid_token = request_id_var.set(request_id)
    plugin_token = plugin_var.set(mount.plugin)
    method = scope["method"]
    start = perf_counter()
    try:
        await app(scope, receive, send_and_watch)
    except HTTPException as exc:
        # A plugin router's own 404/405: the host app's exception middleware answers it.
        mount.stats.observe(exc.status_code, perf_counter() - start, method, _route(scope))
        raise
    except Exception:
        # Counted as an error, then re-raised: the server logs it with its traceback.
        mount.stats.observe(500, perf_counter() - start, method, _route(scope))
        raise
    finally:
        request_id_var.reset(rid_token)
        plugin_var.reset(plugin_token)
    mount.stats.observe(status, perf_counter() - start, method, _route(scope))


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID_RE.match(value):
                return bytes(value).decode()
            break  # not a sane token (too long, odd bytes): replaced, never echoed
    return uuid.uuid4().hex


async def _admitted(policy: Policy, auth: Authenticator | None, scope: Scope, send: Send) -> bool:
    """Check the caller; answer 401/403 (or close the websocket) and return False if refused."""
    from services.router.access import AuthError, check_scopes

    method = scope.get("method", "GET")
    needed = policy.required(method, _route_path(scope))
    if not needed:
        return True
    header = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            header = value.decode("latin-1")
            break
    try:
        if auth is None:
            raise AuthError(503, "", "plugin route authentication is not configured")
        principal = auth.authenticate(header)
        check_scopes(principal, needed)
    except AuthError as refused:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": refused.description})
            return False
        body = (
            b'{"detail":'
            + _json_str(refused.description)
            + b',"error":'
            + _json_str(refused.error or "unauthorized")
            + b"}"
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if refused.status in (401, 403):
            headers.append((b"www-authenticate", refused.challenge().encode()))
        await send({"type": "http.response.start", "status": refused.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return False
    scope[PRINCIPAL_KEY] = principal
    return True


def _json_str(text: str) -> bytes:
    return orjson.dumps(text)
