"""Building a plugin generation's mount: its own small FastAPI app, paths and OpenAPI.

A trusted plugin hands over a ``fastapi.APIRouter``; the mounter wraps it in a FastAPI
app of its own (no docs routes, no lifespan: the loader runs the plugin's hooks) with
the router included under the mount point's ``root`` (see ``prefixes.py``), so every
route sits at its public path. A plugin whose runtime already carries an ASGI app
(a sandbox proxy) is mounted as it is, with the paths its ``PluginLoaded`` announced.

Every refusal raises :class:`MountRefused` naming what the plugin collides with.
"""

from __future__ import annotations

import contextlib
import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute

from kernel import pacing
from kernel.prefixes import PrefixError, mount_point, normalize_prefix, overlaps, under
from kernel.runtime import PluginRuntime
from services.router.dispatcher import Mount, Table
from services.router.openapi import LazyFragment, plugin_fragment
from services.router.prefixed import include_prefixed
from services.router.stats import PluginStats

__all__ = [
    "LIFESPAN_TIMEOUT",
    "MountRefused",
    "RunningLifespan",
    "build_mount",
    "check_conflicts",
    "forget_app_endpoints",
    "forget_endpoints",
    "route_paths",
    "start_lifespan",
    "with_state",
]

#: How long a plugin router's lifespan may take to start or to stop, in seconds.
LIFESPAN_TIMEOUT = 10.0

log = logging.getLogger("xcore.router")

#: ``conflicts_with`` of a refusal caused by the plugin alone (bad prefix, bad router).
SELF = ""
#: ``conflicts_with`` of a refusal caused by a path the kernel reserves.
KERNEL = "kernel"


class MountRefused(Exception):
    """The generation cannot be mounted; becomes a ``RouteConflict`` event."""

    def __init__(
        self, conflicts_with: str, reason: str, prefix: str = "", paths: list[str] | None = None
    ) -> None:
        super().__init__(reason)
        self.conflicts_with = conflicts_with
        self.reason = reason
        self.prefix = prefix
        self.paths = paths or []


def route_paths(routes: list[BaseRoute]) -> list[str]:
    """The distinct paths of ``routes`` (routers included in routers are followed)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before route contexts: included routes are copies
        found = {getattr(route, "path", None) for route in routes}
    else:
        found = {context.path for context in iter_route_contexts(routes)}
    return sorted(p for p in found if p)


@pacing.leaving
def build_mount(
    runtime: PluginRuntime,
    stats: PluginStats,
    announced_paths: list[str],
    dependency_overrides: dict[Any, Any] | None = None,
) -> Mount | None:
    """The mount of ``runtime``, or None for a plugin without routes.

    Pure construction (no I/O, nothing shared is touched): the router service runs it
    in a worker thread (a pooled one: pacing's hook is taken off it at the end).
    """
    label = f"plugin {runtime.name!r} generation {runtime.generation}"
    if runtime.asgi_app is not None:
        try:
            prefix = normalize_prefix(runtime.prefix or "")
        except PrefixError as exc:
            raise MountRefused(SELF, f"{label}: {exc}", runtime.prefix or "") from None
        app = runtime.asgi_app
        return Mount(
            plugin=runtime.name,
            generation=runtime.generation,
            prefix=prefix,
            # PluginLoaded announces routes as "GET /path": the mount keeps the paths
            paths=sorted({p.rsplit(" ", 1)[-1] for p in announced_paths}),
            app=app,
            stats=stats,
            entry=app,
            router=getattr(app, "router", None),
            openapi=_fragment(runtime, getattr(app, "openapi", None)),
        )
    router = runtime.router
    if router is None:
        return None
    if not isinstance(router, APIRouter):
        raise MountRefused(
            SELF,
            f"{label}: 'router' must be a fastapi.APIRouter, not {type(router).__name__}",
            runtime.prefix or "",
        )
    try:
        point = mount_point(runtime.prefix, router.prefix)
    except PrefixError as exc:
        raise MountRefused(SELF, f"{label}: {exc}", runtime.prefix or "") from None
    app = FastAPI(
        title=runtime.name,
        version=runtime.version,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    if dependency_overrides is not None:
        app.dependency_overrides = dependency_overrides
    try:
        include_prefixed(app, router, point.root)
    except Exception as exc:
        raise MountRefused(
            SELF,
            f"{label}: its router cannot be included: {type(exc).__name__}: {exc}",
            point.prefix,
        ) from exc
    # (iter_route_contexts in route_paths also builds FastAPI's lazily built route
    # state of a router it included itself: the first request does not, on the loop)
    paths = route_paths(app.routes)
    outside = [p for p in paths if not under(p, point.prefix)]
    if outside:
        raise MountRefused(
            SELF,
            f"{label}: path(s) {', '.join(outside)} lie outside its prefix {point.prefix}",
            point.prefix,
            outside,
        )
    return Mount(
        plugin=runtime.name,
        generation=runtime.generation,
        prefix=point.prefix,
        paths=paths,
        app=app,
        stats=stats,
        entry=app.router,
        router=app.router,
        openapi=_fragment(runtime, app.openapi),
        owned=True,
    )


def _fragment(
    runtime: PluginRuntime, openapi: Callable[[], dict[str, Any]] | None
) -> LazyFragment | None:
    """The generation's OpenAPI fragment, built when first needed (``openapi.py``)."""
    if openapi is None:
        return None
    name, generation = runtime.name, runtime.generation

    def build() -> dict[str, Any] | None:
        try:
            return plugin_fragment(openapi(), name)
        except Exception:
            log.exception(
                "OpenAPI schema of plugin %r generation %d failed; its paths are left out "
                "of /openapi.json (its routes are served)",
                name,
                generation,
            )
            return None

    return LazyFragment(build)


def check_conflicts(
    mount: Mount,
    table: Table,
    is_reserved: Callable[[str], str | None],
    service_paths: Sequence[str] = (),
) -> None:
    """Refuse ``mount`` if it claims a reserved path, a path a service serves (routers
    given to ``kernel.http.add_router``), or overlaps another plugin's prefix."""
    label = f"plugin {mount.plugin!r} generation {mount.generation}"
    taken = sorted(p for p in service_paths if under(p, mount.prefix))
    if taken:
        raise MountRefused(
            KERNEL,
            f"{label}: prefix {mount.prefix} covers {', '.join(taken)}, served by a kernel service",
            mount.prefix,
            taken,
        )
    for path in (mount.prefix, *mount.paths):
        reserved = is_reserved(path)
        if reserved is not None:
            raise MountRefused(
                KERNEL,
                f"{label}: {path} falls under {reserved}, which the kernel reserves",
                mount.prefix,
                [path],
            )
    for other in table.by_plugin.values():
        if other.plugin == mount.plugin or not overlaps(mount.prefix, other.prefix):
            continue
        clashing = sorted(
            {p for p in mount.paths if under(p, other.prefix)}
            | {p for p in other.paths if under(p, mount.prefix)}
        )
        raise MountRefused(
            other.plugin,
            f"{label}: prefix {mount.prefix} overlaps {other.prefix}, mounted by plugin "
            f"{other.plugin!r} generation {other.generation}",
            mount.prefix,
            clashing or [mount.prefix],
        )


# -- the router's own lifespan ---------------------------------------------------------


@dataclass
class RunningLifespan:
    """A plugin app's lifespan, started; :meth:`stop` runs its shutdown half."""

    stack: contextlib.AsyncExitStack
    state: Mapping[str, Any]

    async def stop(self) -> None:
        await self.stack.aclose()


async def start_lifespan(app: Any) -> RunningLifespan:
    """Enter the lifespan of a plugin's FastAPI app: the router's ``lifespan=``,
    ``on_startup`` and ``on_shutdown`` (FastAPI merges them into the app's router when the
    router is included), as a bare app would run them at start."""
    stack = contextlib.AsyncExitStack()
    state = await stack.enter_async_context(app.router.lifespan_context(app))
    return RunningLifespan(stack, dict(state) if isinstance(state, Mapping) else {})


def with_state(mount: Mount, state: Mapping[str, Any]) -> Mount:
    """``mount`` whose requests see the lifespan's state (``request.state.<key>``)."""
    if not state:
        return mount
    inner = mount.entry
    frozen = dict(state)

    async def entry(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["state"] = {**frozen, **scope.get("state", {})}
        await inner(scope, receive, send)

    return replace(mount, entry=entry)


def forget_endpoints(mount: Mount) -> None:
    """:func:`forget_app_endpoints` of ``mount``'s app."""
    forget_app_endpoints(mount.app)


def forget_app_endpoints(app: Any) -> None:
    """Drop FastAPI's per-endpoint caches that would keep an unloaded generation alive.

    FastAPI caches facts about endpoint and dependency callables in module-level tables
    (keyed by ``id()`` or holding the callable itself); an unloaded generation's
    functions stay referenced there, and with them its modules. The id-keyed table is
    pruned of this generation's endpoints; the small LRU caches are cleared (they refill
    on the next request).
    """
    try:
        from fastapi import routing as fastapi_routing
        from fastapi.dependencies import models as fastapi_models
    except ImportError:
        return
    cache = getattr(fastapi_routing, "_endpoint_context_cache", None)
    if isinstance(cache, dict):
        for route in getattr(app, "routes", []):
            endpoint = getattr(route, "endpoint", None)
            if endpoint is not None:
                cache.pop(id(endpoint), None)
    for name in (
        "_is_gen_callable_cached",
        "_is_async_gen_callable_cached",
        "_is_coroutine_callable_cached",
    ):
        clear = getattr(getattr(fastapi_models, name, None), "cache_clear", None)
        if callable(clear):
            clear()
    # typing caches parametrized aliases (``Annotated[Item, ...]`` built by FastAPI) by
    # their arguments, the plugin's classes included
    for cleanup in getattr(typing, "_cleanups", ()):
        with contextlib.suppress(Exception):
            cleanup()
