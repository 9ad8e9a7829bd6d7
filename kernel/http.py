"""The HTTP shell: what the kernel adds to a FastAPI app, and what services plug into it.

Services contribute through :class:`HttpSurface` (``kernel.http``) while they start:

- ``add_admin_router(router)``: routes served under ``/admin``, each guarded by the
  admin guard (the admin service installs it; with none installed every admin route
  answers 503 — fail closed, never open);
- ``add_router(router)``: public routes of a service (``/metrics``, ``/events``...);
- ``set_fallback(app)``: the ASGI app that receives requests no route matched (the
  router service's plugin dispatcher);
- ``add_front_route(route)``: a Starlette route tried before every other route of the
  app (the router service's plugin prefixes, which never overlap a reserved path), so
  plugin requests skip the app's route scan and its trailing-slash retry;
- ``add_openapi_source(fn)``: a callable returning OpenAPI ``paths``/``components``
  merged into ``/openapi.json`` on every request, so Swagger follows plugins live.

:meth:`HttpSurface.attach` applies all of it to an app; ``Kernel.lifespan`` calls it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from kernel.errors import ConcurrencyError, StoreError
from kernel.prefixes import overlaps

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = ["RESERVED_PREFIXES", "HttpSurface", "create_app"]

log = logging.getLogger("xcore.http")

#: Paths owned by the kernel and its services; no plugin may claim them.
RESERVED_PREFIXES: tuple[str, ...] = (
    "/admin",
    "/health",
    "/metrics",
    "/events",
    "/docs",
    "/redoc",
    "/openapi.json",
)

OpenAPISource = Callable[[], dict[str, Any]]
#: A health check returns (healthy, details); it must be quick and must not raise.
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def _no_admin_guard() -> None:
    raise HTTPException(status_code=503, detail="the admin service is not running")


async def _store_errors_as_503() -> AsyncIterator[None]:
    """An admin request the event log cannot serve (disk full, log closed) answers 503
    with the reason, not a bare 500."""
    try:
        yield
    except StoreError as exc:
        if isinstance(exc, ConcurrencyError):
            raise
        raise HTTPException(status_code=503, detail=f"the event log is unavailable: {exc}") from exc


class HttpSurface:
    """Collects the routes and apps services contribute to the HTTP shell."""

    def __init__(self) -> None:
        self.admin_routers: list[APIRouter] = []
        self.routers: list[APIRouter] = []
        self.admin_guard: Callable[..., Any] = _no_admin_guard
        self.fallback: ASGIApp | None = None
        self.front_routes: list[BaseRoute] = []
        self.openapi_sources: list[OpenAPISource] = []
        self.reserved: list[str] = list(RESERVED_PREFIXES)
        self.health_checks: dict[str, HealthCheck] = {}
        self._attached: set[int] = set()

    def add_admin_router(self, router: APIRouter) -> None:
        self.admin_routers.append(router)

    def add_router(self, router: APIRouter) -> None:
        self.routers.append(router)

    def set_admin_guard(self, guard: Callable[..., Any]) -> None:
        self.admin_guard = guard

    def set_fallback(self, app: ASGIApp) -> None:
        self.fallback = app

    def add_front_route(self, route: BaseRoute) -> None:
        """Try ``route`` before the app's own routes (it must not match reserved paths)."""
        self.front_routes.append(route)

    def add_openapi_source(self, source: OpenAPISource) -> None:
        self.openapi_sources.append(source)

    def reserve_app_routes(self, app: FastAPI) -> None:
        """Reserve the paths an embedding app serves itself, so no plugin shadows them.

        Each route reserves its static part (``/items/{id}`` reserves ``/items``).
        """
        for route in app.routes:
            path = getattr(route, "path", None)
            if not isinstance(path, str):
                continue
            static = path.split("{", 1)[0].rstrip("/")
            if static and static not in self.reserved:
                self.reserved.append(static)

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        """Add a named check to ``/health`` (a failing one turns the answer into 503)."""
        self.health_checks[name] = check

    def is_reserved(self, path: str) -> str | None:
        """The reserved prefix ``path`` falls under or covers, if any."""
        path = path.rstrip("/")
        if not path:  # the root covers every reserved path
            return self.reserved[0] if self.reserved else None
        return next((p for p in self.reserved if overlaps(path, p)), None)

    def attach(self, app: FastAPI, kernel: Kernel) -> None:
        """Add the kernel's routes, the services' routes and the fallback to ``app``."""
        if id(app) in self._attached:
            return
        self._attached.add(id(app))
        app.state.kernel = kernel
        app.include_router(_kernel_router(kernel))
        for router in self.routers:
            app.include_router(router)
        guard = self.admin_guard
        for router in self.admin_routers:
            app.include_router(
                router,
                prefix="/admin",
                dependencies=[Depends(guard), Depends(_store_errors_as_503)],
            )
        if self.fallback is not None:
            app.router.default = self.fallback
        if self.front_routes:
            app.router.routes[0:0] = self.front_routes
        app.openapi_schema = None
        base_openapi = app.openapi
        sources = self.openapi_sources

        def merged_openapi() -> dict[str, Any]:
            base = base_openapi()
            if not sources:
                return base
            schema = dict(base)
            paths = dict(schema.get("paths", {}))
            components = {k: dict(v) for k, v in schema.get("components", {}).items()}
            for source in sources:
                try:
                    part = source()
                except Exception:
                    log.exception("an OpenAPI source failed; its paths are left out")
                    continue
                paths.update(part.get("paths", {}))
                for kind, items in part.get("components", {}).items():
                    components.setdefault(kind, {}).update(items)
            schema["paths"] = paths
            if components:
                schema["components"] = components
            return schema

        app.openapi = merged_openapi  # type: ignore[method-assign]


def _kernel_router(kernel: Kernel) -> APIRouter:
    router = APIRouter(tags=["kernel"])

    @router.get("/health", summary="Health of the kernel and its services")
    async def health() -> JSONResponse:
        checks: dict[str, Any] = {}
        healthy = kernel.started
        try:
            last = await kernel.store.last_position()
            checks["log"] = {"ok": True, "last_position": last, "location": kernel.store.location}
        except Exception as exc:
            healthy = False
            checks["log"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        for name, check in kernel.http.health_checks.items():
            try:
                ok, details = await check()
            except Exception as exc:
                log.exception("health check %r raised", name)
                ok, details = False, {"error": f"{type(exc).__name__}: {exc}"}
            healthy = healthy and ok
            checks[name] = {"ok": ok, **details}
        body = {
            "status": "ok" if healthy else "failing",
            "node": kernel.node,
            "boot": kernel.boot,
            "version": kernel.version,
            "checks": checks,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @router.get("/health/live", summary="The process answers (liveness probe)")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    return router


def create_app(kernel: Kernel, *, title: str = "xcore") -> FastAPI:
    """A FastAPI app whose lifespan runs ``kernel`` (what ``xcore serve`` serves)."""
    return FastAPI(title=title, version=kernel.version, lifespan=kernel.lifespan)
