"""The router's admin routes (served under ``/admin`` behind the admin guard).

``GET /admin/routes``: one row per mounted plugin (prefix, plugin, generation, paths,
request and error counts, p50/p99 latency), the last refused mount of each plugin, and
how many requests matched no plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from pydantic import BaseModel

from services.router.projection import MountedRoutes
from services.router.stats import PluginStats, RouteStats

__all__ = ["RouteConflictRow", "RouteRow", "RoutesTable", "admin_router", "routes_table"]


class RouteRow(BaseModel):
    prefix: str
    plugin: str
    generation: int
    paths: list[str]
    requests: int
    errors: int
    by_class: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None


class RouteConflictRow(BaseModel):
    plugin: str
    generation: int
    prefix: str
    conflicts_with: str
    reason: str
    paths: list[str]


class RoutesTable(BaseModel):
    routes: list[RouteRow]
    conflicts: list[RouteConflictRow]
    unmatched_requests: int


def routes_table(state: MountedRoutes, stats: RouteStats) -> RoutesTable:
    """The table ``GET /admin/routes`` answers, from the projection and the live stats.

    Reading it creates no stats: a plugin this process has not served (mounted by
    another node) is reported with zero requests and no latency.
    """
    rows = []
    for mount in sorted(state.mounts.values(), key=lambda m: m.prefix):
        found = stats.find(mount.plugin)
        # a detached, empty PluginStats: zeros and None, nothing added to ``stats``
        numbers = (found or PluginStats(mount.plugin, stats.bounds)).as_dict()
        rows.append(
            RouteRow(
                prefix=mount.prefix,
                plugin=mount.plugin,
                generation=mount.generation,
                paths=mount.paths,
                requests=numbers["requests"],
                errors=numbers["errors"],
                by_class=numbers["by_class"],
                p50_ms=numbers["p50_ms"],
                p99_ms=numbers["p99_ms"],
            )
        )
    conflicts = [
        RouteConflictRow(
            plugin=c.plugin,
            generation=c.generation,
            prefix=c.prefix,
            conflicts_with=c.conflicts_with,
            reason=c.reason,
            paths=c.paths,
        )
        for _, c in sorted(state.conflicts.items())
    ]
    return RoutesTable(routes=rows, conflicts=conflicts, unmatched_requests=stats.unmatched)


def admin_router(state: Callable[[], MountedRoutes], stats: RouteStats) -> APIRouter:
    """The admin routes; ``state`` returns the running :class:`MountedRoutes`."""
    router = APIRouter(tags=["admin: routes"])

    @router.get("/routes", summary="Mounted plugin prefixes with request statistics")
    async def routes() -> RoutesTable:
        return routes_table(state(), stats)

    return router
