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
  and answer ``RoutesUnmounted`` either way; once its last request has ended its app is
  taken apart so refcounting frees it (``dismantle.py``).

Each answer is appended with ``cause=<the loader's event>``, so its correlation id is
the one the loader awaits. The service starts before the loader (``order`` 40) so it is
listening when the first plugins load.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from kernel import Recorded, Subscription
from kernel.access import Policy
from services.loader.events import PluginLoaded, PluginUnloaded
from services.router.access import Authenticator, RouterSettings, security_schemes
from services.router.admin import admin_router
from services.router.dismantle import Dismantler
from services.router.dispatcher import Dispatcher, Mount, Table
from services.router.events import RouteConflict, RoutesMounted, RoutesUnmounted, stream_of
from services.router.mounts import (
    LIFESPAN_TIMEOUT,
    SELF,
    MountRefused,
    RunningLifespan,
    build_mount,
    check_conflicts,
    forget_endpoints,
    route_paths,
    start_lifespan,
    with_state,
)
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
        #: Router lifespans running, by (plugin, generation).
        self._lifespans: dict[tuple[str, int], RunningLifespan] = {}
        self._overrides: dict[str, dict[Any, Any]] = {}
        #: Every generation mounted and not yet unloaded (its caches are dropped then).
        self._mounts: dict[tuple[str, int], Mount] = {}
        #: Takes unmounted generations apart so refcounting frees them (dismantle.py).
        self.dismantler = Dismantler()

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
        self.dismantler.close()
        self._prefixes.clear()
        self._mounts.clear()
        for name, generation in list(self._lifespans):
            await self._stop_lifespan(name, generation)

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
            mount = await self._prepare(name, generation, record.data)
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
            self._mounts[(name, generation)] = mount
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

    async def _prepare(self, name: str, generation: int, data: dict[str, Any]) -> Mount | None:
        """The mount to serve for this ``PluginLoaded`` (None: no routes); raises MountRefused.

        The app is built in a worker thread (a plugin with hundreds of routes takes a
        second to build with its OpenAPI schema: never on the event loop), then the
        router's own lifespan (``lifespan=``, ``on_startup``) runs: a failure there
        refuses the mount.
        """
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
        kept = self._mounts.get((name, generation))
        if kept is not None:
            # a rolled-back reload offers the generation that served before: its mount
            # was never withdrawn (its app intact, its lifespan running): serve it again,
            # at once, rather than build it and start its lifespan a second time
            http = self.kernel.http
            service_paths = [p for r in http.routers for p in route_paths(r.routes)]
            check_conflicts(kept, self.dispatcher.table, http.is_reserved, service_paths)
            return kept
        runtime = self.kernel.plugins.find(name, generation)
        if runtime is None:
            raise MountRefused(
                SELF,
                f"{label} has no runtime in this process (kernel.plugins)",
                data.get("prefix") or "",
            )
        stats = self.stats.plugin(name)
        overrides = self.dependency_overrides(name)
        try:
            mount = await asyncio.to_thread(
                build_mount, runtime, stats, list(data.get("routes") or []), overrides
            )
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
            mount = await self._start_lifespan(mount, runtime.asgi_app is None)
        return mount

    async def _start_lifespan(self, mount: Mount, own_app: bool) -> Mount:
        """Run the plugin router's lifespan (start); it ends when the generation unloads."""
        if not own_app:
            return mount  # an app served as it is (a sandbox proxy) runs its own
        label = f"plugin {mount.plugin!r} generation {mount.generation}"
        try:
            # asyncio.timeout, not wait_for: wait_for can swallow a cancellation (3.11)
            async with asyncio.timeout(LIFESPAN_TIMEOUT):
                running = await start_lifespan(mount.app)
        except TimeoutError:
            raise MountRefused(
                SELF,
                f"{label}: router.py: the router's lifespan/on_startup did not finish within "
                f"{LIFESPAN_TIMEOUT:g}s",
                mount.prefix,
            ) from None
        except Exception as exc:
            log.exception("the router lifespan of %s failed", label)
            raise MountRefused(
                SELF,
                f"{label}: router.py: the router's lifespan/on_startup raised "
                f"{type(exc).__name__}: {exc}",
                mount.prefix,
            ) from exc
        self._lifespans[(mount.plugin, mount.generation)] = running
        return with_state(mount, running.state)

    async def _stop_lifespan(self, name: str, generation: int) -> None:
        running = self._lifespans.pop((name, generation), None)
        if running is None:
            return
        try:
            async with asyncio.timeout(LIFESPAN_TIMEOUT):
                await running.stop()
        except Exception:
            log.exception(
                "the router lifespan (shutdown) of plugin %r generation %d failed",
                name,
                generation,
            )

    def dependency_overrides(self, plugin: str) -> dict[Any, Any]:
        """The ``dependency_overrides`` of ``plugin``'s app, kept across its generations.

        ``request.app`` in a plugin route is the host app, whose overrides do not reach
        plugin routes; tests and embedding apps override a plugin's dependencies here::

            kernel.services["router"].dependency_overrides("greeter")[get_db] = fake_db
        """
        return self._overrides.setdefault(plugin, {})

    async def _unmount(self, record: Recorded) -> None:
        name: str = record.data["name"]
        generation: int = record.data["generation"]
        table = self.dispatcher.table
        current = table.by_plugin.get(name)
        if current is not None and current.generation == generation:
            self.dispatcher.swap(table.replace(name, None))
        prefix = self._prefixes.pop((name, generation), "")
        await self._stop_lifespan(name, generation)
        gone = self._mounts.pop((name, generation), None)
        if gone is not None:
            forget_endpoints(gone)
            # freed by refcounting once its last request ends, not by a full collection
            self.dismantler.retire(gone)
        await self.kernel.append(
            RoutesUnmounted(plugin=name, generation=generation, prefix=prefix),
            stream=stream_of(name),
            actor="router",
            cause=record,
        )

    # -- OpenAPI -----------------------------------------------------------------------

    def openapi(self) -> dict[str, Any]:
        """The ``paths``/``components`` of the plugins served right now."""
        fragments = [
            (m, m.openapi.get()) for m in self.dispatcher.table.by_plugin.values() if m.openapi
        ]
        documented = [(m, f) for m, f in fragments if f is not None]
        merged = merge_fragments(f for _, f in documented)
        guarded = [(m, f) for m, f in documented if m.policy is not None]
        if not guarded or self.dispatcher.auth is None:
            return merged
        schemes = security_schemes(self.dispatcher.auth)
        paths = merged.setdefault("paths", {})
        for mount, fragment in guarded:
            assert mount.policy is not None
            for path in fragment.get("paths", {}):
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
