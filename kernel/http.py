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

The admin API keeps one contract, whichever service adds a route: the OpenAPI document
declares the bearer scheme on every ``/admin`` operation, and the refusals every admin
route can give (401, 413, 503; 422 where parameters are validated) with the
:class:`ErrorBody` model. A route declares its own refusals with
``responses=error_responses(404, 409, 504)``; the test suite walks the document and runs
schemathesis over a live server, so an undeclared status is a failing test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.utils import (
    validation_error_definition,
    validation_error_response_definition,
)
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from kernel.docs import serve_docs_locally
from kernel.errors import ConcurrencyError, StoreError
from kernel.guard import RequestGuard, is_admin_path
from kernel.prefixes import overlaps

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


class ErrorBody(BaseModel):
    """The body of every refusal: ``detail`` says what was refused and why.

    When an outcome event refused the request (a failed reload, a refused task run),
    ``outcome`` names its type and the event's fields come along.
    """

    model_config = ConfigDict(extra="allow", title="Error")

    detail: str = Field(description="what was refused and why, naming the culprit")
    outcome: str | None = Field(
        default=None, description="the type of the outcome event that refused the request"
    )


#: What each refusal means, for the OpenAPI document.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed",
    401: "No admin token, or a wrong one (authentication happens before the body is read)",
    403: "The token lacks the scope this route needs (admin:read or admin:write)",
    404: "No such resource",
    408: "The client stopped sending its body",
    409: "The resource is not in a state that allows this (or an outcome event refused it)",
    413: "The request body exceeds the route's limit",
    422: "The request is invalid, or its outcome event is a failure",
    503: "The admin service or the event log is unavailable",
    504: "No outcome event came in time",
}

#: Refusals any admin route can give, added to every admin operation.
ADMIN_ERRORS = (401, 403, 413, 503)
SECURITY_SCHEME = "adminToken"


def link(path: str, method: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link from a response to ``method path`` (its full path, with /admin).

    ``parameters`` map the target's parameters to runtime expressions such as
    ``"$response.body#/0/name"``: clients and schemathesis' stateful phase follow them.
    """
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method.lower()}", "parameters": parameters}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: these refusals, documented with ErrorBody."""
    return {
        code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS.get(code, "Refused")}
        for code in codes
    }


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
            _admin_contract(paths, components)
            if components:
                schema["components"] = components
            return schema

        app.openapi = merged_openapi  # type: ignore[method-assign]
        self._guard(app, kernel)

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
                return _without_admin(app.openapi())

        if app.middleware_stack is None:
            app.middleware_stack = app.build_middleware_stack()
        app.middleware_stack = RequestGuard(
            app.middleware_stack,
            authenticate=lambda: self.admin_authenticator,
            body_limit=body_limit,
            body_timeout=limits.body_timeout,
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


def _admin_contract(paths: dict[str, Any], components: dict[str, dict[str, Any]]) -> None:
    """Declare the bearer scheme and the standard refusals on every /admin operation."""
    schemas = components.setdefault("schemas", {})
    schemas.setdefault("Error", ErrorBody.model_json_schema())
    schemas.setdefault("ValidationError", validation_error_definition)
    schemas.setdefault("HTTPValidationError", validation_error_response_definition)
    components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the admin token: 'Authorization: Bearer <token>'",
    }
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in paths.items():
        if not is_admin_path(path):
            continue
        for method, op in item.items():
            if method not in _METHODS or not isinstance(op, dict):
                continue
            op["security"] = [{SECURITY_SCHEME: []}]
            responses = op.setdefault("responses", {})
            for code in ADMIN_ERRORS:
                responses.setdefault(str(code), _error_response(code, error))
            validated = op.get("parameters") or op.get("requestBody")
            if "422" in responses or validated:
                refused = _error_response(422, error)
                refused["content"]["application/json"]["schema"] = {
                    "anyOf": [error, {"$ref": "#/components/schemas/HTTPValidationError"}]
                }
                responses["422"] = refused
            for code, response in responses.items():  # declared refusals: the shared model
                if code[:1] in "45" and code != "422":
                    content = response.setdefault("content", {})
                    content["application/json"] = {"schema": error}
    for name in [n for n in schemas if n == "ErrorBody"]:
        del schemas[name]  # routes that declared ErrorBody now point at "Error"


_METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def _error_response(code: int, error: dict[str, str]) -> dict[str, Any]:
    return {
        "description": ERROR_DESCRIPTIONS.get(code, "Refused"),
        "content": {"application/json": {"schema": dict(error)}},
    }


def _without_admin(schema: dict[str, Any]) -> dict[str, Any]:
    """The document without its /admin paths and the schemas only they use."""
    paths = {p: item for p, item in schema.get("paths", {}).items() if not is_admin_path(p)}
    components = dict(schema.get("components", {}))
    schemas = components.get("schemas", {})
    used: set[str] = set()
    todo: list[Any] = [paths]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in used and name in schemas:
                    used.add(name)
                    todo.append(schemas[name])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    components["schemas"] = {k: v for k, v in schemas.items() if k in used}
    components.pop("securitySchemes", None)
    return {**schema, "paths": paths, "components": components}


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
