"""The router mounter service: plugin generations in, ``RoutesMounted`` / ``RouteConflict`` out.

It reacts to the loader's events (only those recorded by this node: the runtime objects
live in this process):

- ``PluginLoaded{name, generation}``: look the generation up in ``kernel.plugins``,
  build its mount (``mounts.py``), refuse it if it overlaps another plugin's prefix or a
  reserved path, else swap the dispatcher's table in one assignment (replacing the
  plugin's previous generation, whose requests in flight finish where they started)
  and answer ``RoutesMounted``; a plugin without routes is answered ``RoutesMounted``
  with an empty prefix (and no longer serves routes of an older generation).
- ``PluginUnloaded{name, generation}``: drop the generation if it is the one serving,
  and answer ``RoutesUnmounted`` either way.

Each answer is appended with ``cause=<the loader's event>``, so its correlation id is
the one the loader awaits. The service starts before the loader (``order`` 40) so it is
listening when the first plugins load.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from kernel import Recorded, Subscription
from kernel.access import Policy
from services.loader.events import PluginLoaded, PluginUnloaded
from services.router.access import Authenticator, RouterSettings, security_schemes
from services.router.admin import admin_router
from services.router.dispatcher import Dispatcher, Mount, Table
from services.router.events import RouteConflict, RoutesMounted, RoutesUnmounted, stream_of
from services.router.mounts import SELF, MountRefused, build_mount, check_conflicts, route_paths
from services.router.openapi import merge_fragments
from services.router.projection import MountedRoutes
from services.router.stats import RouteStats

if TYPE_CHECKING:
    from kernel import Kernel

__all__ = ["RouterService"]

log = logging.getLogger("xcore.router")


class RouterService:
    """Mounts plugin routers behind one dispatcher; see the module docstring."""

    name = "router"
    order = 40

    def __init__(self) -> None:
        #: Per-plugin request numbers (read by the monitoring service).
        self.stats = RouteStats()
        #: The ASGI app installed as the kernel app's fallback.
        self.dispatcher = Dispatcher(self.stats)
        self._kernel: Kernel | None = None
        self._subscription: Subscription | None = None
        #: Prefix of every generation mounted and not yet unloaded, by (plugin, generation).
        self._prefixes: dict[tuple[str, int], str] = {}

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            raise RuntimeError("the router service is not started")
        return self._kernel

    @property
    def state(self) -> MountedRoutes:
        """The router state projection."""
        return self.kernel.projection(MountedRoutes)

    async def start(self, kernel: Kernel, stack: AsyncExitStack) -> None:
        self._kernel = kernel
        settings = kernel.settings.section("router", RouterSettings)
        self.dispatcher.observe = settings.observe
        self.dispatcher.auth = Authenticator(settings.auth.jwt, lambda: kernel.http.token_verifier)
        await kernel.add_projection(MountedRoutes())
        kernel.http.set_fallback(self.dispatcher)
        kernel.http.add_front_route(self.dispatcher.front_route())
        kernel.http.add_openapi_source(self.openapi)
        kernel.http.add_admin_router(admin_router(lambda: self.state, self.stats))
        self._subscription = await kernel.subscribe(
            self._on_event, types=[PluginLoaded, PluginUnloaded], start="now"
        )
        stack.push_async_callback(self._stop)

    async def _stop(self) -> None:
        if self._subscription is not None:
            await self.kernel.unsubscribe(self._subscription)
            self._subscription = None
        self.dispatcher.swap(Table())
        self._prefixes.clear()

    # -- reacting to the loader --------------------------------------------------------

    async def _on_event(self, record: Recorded) -> None:
        if record.meta.node != self.kernel.node:
            return  # another node's plugin: its runtime is not in this process
        if record.type == PluginLoaded.type_name:
            await self._mount(record)
        elif record.type == PluginUnloaded.type_name:
            await self._unmount(record)

    async def _mount(self, record: Recorded) -> None:
        kernel = self.kernel
        name: str = record.data["name"]
        generation: int = record.data["generation"]
        try:
            mount = self._prepare(name, generation, record.data)
        except MountRefused as refused:
            log.warning("routes of plugin %r generation %d refused: %s", name, generation, refused)
            await kernel.append(
                RouteConflict(
                    plugin=name,
                    generation=generation,
                    prefix=refused.prefix,
                    conflicts_with=refused.conflicts_with,
                    paths=refused.paths,
                    reason=refused.reason,
                ),
                stream=stream_of(name),
                actor="router",
                cause=record,
            )
            return
        table = self.dispatcher.table
        # ``_prepare`` hands back the serving mount itself for a redelivered event.
        # The built app stays on the Mount: ``runtime.asgi_app`` is left as the loader
        # published it (set there, it means "a sandbox proxy: mount as is").
        if mount is not table.by_plugin.get(name):
            self.dispatcher.swap(table.replace(name, mount))
        if mount is not None:
            self._prefixes[(name, generation)] = mount.prefix
        await kernel.append(
            RoutesMounted(
                plugin=name,
                generation=generation,
                prefix="" if mount is None else mount.prefix,
                paths=[] if mount is None else mount.paths,
            ),
            stream=stream_of(name),
            actor="router",
            cause=record,
        )

    def _prepare(self, name: str, generation: int, data: dict[str, Any]) -> Mount | None:
        """The mount to serve for this ``PluginLoaded`` (None: no routes); raises MountRefused."""
        label = f"plugin {name!r} generation {generation}"
        current = self.dispatcher.table.by_plugin.get(name)
        if current is not None and current.generation == generation:
            return current  # the same event delivered again: answer again, change nothing
        if current is not None and current.generation > generation:
            raise MountRefused(
                name,
                f"{label} is older than generation {current.generation}, which is serving",
                current.prefix,
            )
        runtime = self.kernel.plugins.find(name, generation)
        if runtime is None:
            raise MountRefused(
                SELF,
                f"{label} has no runtime in this process (kernel.plugins)",
                data.get("prefix") or "",
            )
        try:
            mount = build_mount(runtime, self.stats.plugin(name), list(data.get("routes") or []))
        except MountRefused:
            raise
        except Exception as exc:
            log.exception("building the mount of %s failed", label)
            raise MountRefused(
                SELF,
                f"{label}: its app could not be built: {type(exc).__name__}: {exc}",
                runtime.prefix or "",
            ) from exc
        if mount is not None:
            if not runtime.auth.empty:
                mount.policy = Policy.compile(runtime.auth, mount.prefix)
            http = self.kernel.http
            service_paths = [p for r in http.routers for p in route_paths(r.routes)]
            check_conflicts(mount, self.dispatcher.table, http.is_reserved, service_paths)
        return mount

    async def _unmount(self, record: Recorded) -> None:
        name: str = record.data["name"]
        generation: int = record.data["generation"]
        table = self.dispatcher.table
        current = table.by_plugin.get(name)
        if current is not None and current.generation == generation:
            self.dispatcher.swap(table.replace(name, None))
        prefix = self._prefixes.pop((name, generation), "")
        await self.kernel.append(
            RoutesUnmounted(plugin=name, generation=generation, prefix=prefix),
            stream=stream_of(name),
            actor="router",
            cause=record,
        )

    # -- OpenAPI -----------------------------------------------------------------------

    def openapi(self) -> dict[str, Any]:
        """The ``paths``/``components`` of the plugins served right now."""
        mounts = self.dispatcher.table.by_plugin.values()
        merged = merge_fragments(m.openapi for m in mounts if m.openapi is not None)
        guarded = [m for m in mounts if m.policy is not None and m.openapi is not None]
        if not guarded or self.dispatcher.auth is None:
            return merged
        schemes = security_schemes(self.dispatcher.auth)
        paths = merged.setdefault("paths", {})
        for mount in guarded:
            assert mount.policy is not None and mount.openapi is not None
            for path in mount.openapi.get("paths", {}):
                item = paths.get(path)
                if not isinstance(item, dict):
                    continue
                item = paths[path] = dict(item)
                for method, op in list(item.items()):
                    if not isinstance(op, dict):
                        continue
                    needed = mount.policy.required(method.upper(), path)
                    if needed:
                        item[method] = {
                            **op,
                            "security": [{name: list(needed)} for name in schemes],
                        }
        merged.setdefault("components", {}).setdefault("securitySchemes", {}).update(schemes)
        return merged
