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
their routes are declared at their public paths. Unknown paths get a JSON 404.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.router.stats import PluginStats, RouteStats

__all__ = ["Dispatcher", "Mount", "Table"]

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


@dataclass(eq=False, slots=True)
class Mount:
    """One plugin generation served under ``prefix``."""

    plugin: str
    generation: int
    prefix: str
    #: The plugin's public paths (sorted).
    paths: list[str]
    app: ASGIApp
    stats: PluginStats
    #: The app's starlette router (for ``request.url_for``), if it has one.
    router: Any = None
    #: The plugin's OpenAPI ``paths``/``components``, already namespaced (or None).
    openapi: dict[str, Any] | None = field(default=None, repr=False)


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
    """The ASGI app behind every plugin route."""

    def __init__(self, stats: RouteStats) -> None:
        self.stats = stats
        #: The routing table; replaced (never mutated) by :meth:`swap`.
        self.table = Table()

    def swap(self, table: Table) -> None:
        """Serve ``table`` from now on (requests in flight keep the one they started with)."""
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        table = self.table
        path: str = scope["path"]
        root_path: str = scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        # Table.match, inlined: this runs on every plugin request.
        by_prefix = table.by_prefix
        size = len(path)
        mount = None
        for length in table.lengths:
            if size == length:
                mount = by_prefix.get(path)
            elif size > length and path[length] == "/":
                mount = by_prefix.get(path[:length])
            else:
                continue
            if mount is not None:
                break
        if mount is None:
            await self._not_found(scope, send)
            return
        # The kernel app's router put itself here; the plugin app must resolve its own
        # route names (request.url_for), so it gets its router instead.
        if mount.router is not None:
            scope["router"] = mount.router
        else:
            scope.pop("router", None)
        if scope["type"] != "http":
            await mount.app(scope, receive, send)
            return

        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = perf_counter()
        try:
            await mount.app(scope, receive, send_and_watch)
        except Exception:
            # Counted as an error, then re-raised: the server logs it with its traceback.
            mount.stats.observe(500, perf_counter() - start)
            raise
        mount.stats.observe(status, perf_counter() - start)

    async def _not_found(self, scope: Scope, send: Send) -> None:
        self.stats.unmatched += 1
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        await send(_NOT_FOUND_START)
        await send(_NOT_FOUND)
