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
  merged into ``/openapi.json`` on every request, so Swagger follows plugins live;
- ``set_admin_authenticator(fn)``: checks the head of every ``/admin`` request before
  its body is read (the admin service installs it; see ``kernel/guard.py``);
- ``set_body_limit(path, n)``: a larger body limit for one route (plugin uploads).

:meth:`HttpSurface.attach` applies all of it to an app; ``Kernel.lifespan`` calls it.

The merged ``/openapi.json`` keeps the admin API's contract (``kernel/contract.py``);
every request passes the request guard first (``kernel/guard.py``); a request that fails
validation gets a JSON 422 whatever its input (``kernel/validation.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from kernel.contract import (  # re-exported: services import them from kernel.http too
    ErrorBody,
    admin_contract,
    error_responses,
    link,
    without_admin,
)
from kernel.docs import serve_docs_locally
from kernel.errors import ConcurrencyError, StoreError
from kernel.guard import RequestGuard
from kernel.prefixes import overlaps
from kernel.validation import install as install_validation_answer
from kernel.warm import warm_routes

if TYPE_CHECKING:
    from kernel.kernel import Kernel

__all__ = [
    "RESERVED_PREFIXES",
    "ErrorBody",
    "HttpSurface",
    "check_health",
    "create_app",
    "error_responses",
    "link",
]

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
#: Maps a presented bearer token to the scopes it holds ('*': all), or None if invalid.
TokenVerifier = Callable[[str], frozenset[str] | None]
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


async def _no_admin_authenticator(request: Request) -> None:
    _no_admin_guard()


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
        self.admin_authenticator: Callable[[Request], Awaitable[Any]] = _no_admin_authenticator
        self.body_limits: dict[tuple[str, str], int] = {}
        self.self_authenticating: list[str] = []
        #: ``(prefix, target)``: a path under ``prefix`` has the body limit of ``target``
        #: followed by the rest of the path (a bridge re-entering the app)
        self.body_limit_aliases: list[tuple[str, str]] = []
        #: Set by the admin service; used by /health and the plugin route dispatcher.
        self.token_verifier: TokenVerifier | None = None
        self._attached: set[int] = set()

    def add_admin_router(self, router: APIRouter) -> None:
        self.admin_routers.append(router)

    def add_router(self, router: APIRouter) -> None:
        self.routers.append(router)

    def set_admin_guard(self, guard: Callable[..., Any]) -> None:
        self.admin_guard = guard

    def add_self_authenticating_prefix(self, prefix: str) -> None:
        """Exempt ``prefix`` (under ``/admin``) from the bearer check on the request head.

        For a front route that authenticates its requests itself (the admin page's
        session cookie) and reaches the admin API only through requests that carry a
        token again. Its body limit still applies.
        """
        if not prefix.startswith("/admin/"):
            raise ValueError(f"{prefix!r} is not under /admin/")
        self.self_authenticating.append(prefix)

    def set_admin_authenticator(self, authenticate: Callable[[Request], Awaitable[Any]]) -> None:
        """Check the head of every ``/admin`` request before its body is read.

        ``authenticate(request)`` sees headers only (reading the body is an error) and
        raises ``HTTPException`` (401) to refuse; what it returns is ignored. Route
        dependencies (the admin guard) still run afterwards, for authorization.
        """
        self.admin_authenticator = authenticate

    def set_body_limit(
        self, path: str, limit: int, *, methods: tuple[str, ...] = ("POST",)
    ) -> None:
        """Accept bodies up to ``limit`` bytes on ``path`` (exact) instead of the default."""
        for method in methods:
            self.body_limits[(method.upper(), path)] = limit

    def alias_body_limits(self, prefix: str, target: str) -> None:
        """Give ``prefix + rest`` the body limit of ``target + rest``, for every rest.

        For a bridge that forwards its requests to other routes of the app in process
        (the admin page's ``/admin/ui/api`` to ``/admin``): the guard sees the bridge's
        path, so without this a larger limit set for the target (plugin uploads) would
        not apply through the bridge.
        """
        self.body_limit_aliases.append((prefix.rstrip("/"), target.rstrip("/")))

    def set_token_verifier(self, verifier: TokenVerifier) -> None:
        self.token_verifier = verifier

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
        if not install_validation_answer(app):
            log.info("the app answers validation errors itself; the kernel's 422 is not installed")
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
        serve_docs_locally(app)
        if self.fallback is not None:
            app.router.default = self.fallback
        if self.front_routes:
            app.router.routes[0:0] = self.front_routes
        app.openapi_schema = None
        base_openapi = app.openapi
        sources = self.openapi_sources

        def merged_openapi() -> dict[str, Any]:
            schema = dict(base_openapi())
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
            admin_contract(paths, components)
            if components:
                schema["components"] = components
            return schema

        app.openapi = merged_openapi  # type: ignore[method-assign]
        self._guard(app, kernel)
        # (not at the first admin request, on the event loop: kernel/warm.py)
        warm_routes(app.router, where="the kernel app")

    def _guard(self, app: FastAPI, kernel: Kernel) -> None:
        """Wrap the whole app (outside its middleware) in the request guard."""
        limits = kernel.settings.http
        default = limits.max_body_bytes
        body_limits = self.body_limits
        aliases = self.body_limit_aliases

        def body_limit(method: str, path: str) -> int:
            for prefix, target in aliases:
                if path.startswith(prefix + "/"):
                    path = target + path[len(prefix) :]
                    break
            return body_limits.get((method, path), default) if body_limits else default

        public_openapi = None
        if limits.private_docs:

            def public_openapi() -> dict[str, Any]:
                return without_admin(app.openapi())

        if app.middleware_stack is None:
            app.middleware_stack = app.build_middleware_stack()
        app.middleware_stack = RequestGuard(
            app.middleware_stack,
            authenticate=lambda: self.admin_authenticator,
            body_limit=body_limit,
            body_timeout=limits.body_timeout,
            min_body_rate=limits.min_body_rate,
            operations=_recent(lambda: app.openapi().get("paths", {})),
            public_openapi=public_openapi,
            docs_paths=_docs_paths(app) if limits.private_docs else (),
            self_authenticating=self.self_authenticating,
        )


def _recent(build: Callable[[], dict[str, Any]], ttl: float = 1.0) -> Callable[[], dict[str, Any]]:
    """``build()`` computed at most once per ``ttl`` seconds (OPTIONS floods stay cheap)."""
    cached: list[Any] = [-ttl, {}]

    def get() -> dict[str, Any]:
        now = time.monotonic()
        if now - cached[0] >= ttl:
            cached[1] = build()
            cached[0] = now
        return dict(cached[1])

    return get


def _docs_paths(app: FastAPI) -> tuple[str, ...]:
    paths = [app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url]
    return tuple(p for p in paths if p)


def _bearer_scopes(kernel: Kernel, request: Request) -> frozenset[str] | None:
    """The scopes of the request's bearer token, if it presents a valid one."""
    verifier = kernel.http.token_verifier
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if verifier is None or scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return verifier(token.strip())
    except Exception:
        log.exception("the token verifier raised")
        return None


async def check_health(kernel: Kernel) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Run every component's check; (healthy, {component: {"ok": ..., details}})."""
    components: dict[str, dict[str, Any]] = {}
    store: dict[str, Any] = {"ok": True}
    try:
        store["last_position"] = await kernel.store.last_position()
    except Exception as exc:
        store.update(ok=False, error=f"the log cannot be read: {type(exc).__name__}: {exc}")
    probe = getattr(kernel.store, "health", None)  # the store's own writability signal
    if callable(probe):
        try:
            ok, details = probe()
            store.update({k: v for k, v in details.items() if k != "ok"})
            store["ok"] = store["ok"] and bool(ok)
        except Exception as exc:
            store.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    components["store"] = store
    for name, check in list(kernel.http.health_checks.items()):
        try:
            ok, details = await check()
        except Exception as exc:
            log.exception("health check %r raised", name)
            ok, details = False, {"error": f"the check raised {type(exc).__name__}: {exc}"}
        if name in components:  # a service's check adds to a built-in component
            merged = components[name]
            merged.update({k: v for k, v in details.items() if k != "ok"})
            merged["ok"] = merged["ok"] and bool(ok)
        else:
            components[name] = {"ok": bool(ok), **details}
    healthy = kernel.started and all(c["ok"] for c in components.values())
    return healthy, components


def _kernel_router(kernel: Kernel) -> APIRouter:
    router = APIRouter(tags=["kernel"])

    @router.get(
        "/health",
        summary="Health of every component (details with an admin:read token)",
        responses={503: {"description": "a component is failing; named in 'failing'"}},
    )
    async def health(request: Request) -> JSONResponse:
        healthy, components = await check_health(kernel)
        failing = sorted(name for name, c in components.items() if not c["ok"])
        if not kernel.started:
            failing.insert(0, "kernel")
        # serving, with a part missing (a plugin that failed to load): 200, said so
        degraded = sorted(name for name, c in components.items() if c.get("degraded"))
        status = "failing" if not healthy else "degraded" if degraded else "ok"
        body: dict[str, Any] = {"status": status, "failing": failing, "degraded": degraded}
        scopes = _bearer_scopes(kernel, request)
        if scopes is not None and ("*" in scopes or "admin:read" in scopes):
            body.update(
                node=kernel.node,
                boot=kernel.boot,
                version=kernel.version,
                components=components,
            )
        else:
            # No host paths, host names, errors or tracebacks without a token.
            body["components"] = {name: {"ok": c["ok"]} for name, c in components.items()}
        return JSONResponse(
            body, status_code=200 if healthy else 503, headers={"Cache-Control": "no-store"}
        )

    @router.get("/health/live", summary="The process answers (liveness probe)")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/health/ready",
        summary="The kernel is started and its event log works (readiness probe)",
        responses={503: {"description": "not ready; the failing component is named"}},
    )
    async def ready() -> JSONResponse:
        _, components = await check_health(kernel)
        store_ok = components["store"]["ok"]
        ok = kernel.started and store_ok
        failing = [] if ok else (["kernel"] if not kernel.started else ["store"])
        return JSONResponse(
            {"status": "ok" if ok else "failing", "failing": failing},
            status_code=200 if ok else 503,
            headers={"Cache-Control": "no-store"},
        )

    return router


def create_app(kernel: Kernel, *, title: str = "xcore") -> FastAPI:
    """A FastAPI app whose lifespan runs ``kernel`` (what ``xcore serve`` serves)."""
    return FastAPI(title=title, version=kernel.version, lifespan=kernel.lifespan)
