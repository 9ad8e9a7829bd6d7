"""A plugin router's routes at their public paths, without FastAPI building each one again.

Guarantee: for a router of plain ``APIRoute`` objects, :func:`include_prefixed` gives the
plugin's app the routes ``app.include_router(router, prefix=root)`` would give it — same
paths, methods, names, operation ids, parameters, body and response fields (and so the
same OpenAPI document and the same answers), the app as dependency-overrides provider,
the router's lifespan and event handlers merged — for a small part of the CPU. Any other
router is included by FastAPI itself, unchanged.

Why: FastAPI includes a router lazily and, on first use (the mounter's path listing, a
request, the OpenAPI document), builds every route once more for the include prefix —
its dependant and the pydantic adapters of its parameters, body and response, as much
CPU as the plugin's import (~0.5 s for 300 routes). That CPU is spent in a worker thread,
but it holds the interpreter in slices the event loop waits behind: every other plugin's
requests slow down while it runs (issue 8; ``bench/reload.py``).

Mechanism: only the path depends on the prefix. Each route is copied (``copy.copy``:
nothing is rebuilt) and given the prefixed path (regex, format, converters), the unique
id computed from it as FastAPI computes it, its named fields renamed — copies that share
the validator of the original (a field's adapter is built from its type and metadata,
never its name) — the app as its dependency-overrides provider, and a request handler
built from the copy. The prefix has no path parameters, so the dependant (which
parameters come from the path) is the original's. The router itself is then included
with no routes, so FastAPI merges its lifespan, ``on_startup`` and ``on_shutdown`` as
it always does.

Taken by FastAPI's own include (the whole router): a sub-router, a websocket or
Starlette route, a mount, a route class of the plugin's own, a body embedded in a
generated ``Body_...`` model (named after the unique id), low-priority routes, a prefix
with parameters, a FastAPI without the pieces used here.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute, request_response
from starlette.routing import Match, compile_path
from starlette.types import Scope

from kernel.pacing import pace

__all__ = ["PrefixedRoute", "include_prefixed", "prefixable"]

log = logging.getLogger("xcore.router")

try:  # FastAPI's route body limit (recent versions; older ones have none to apply)
    from fastapi._body_limit import wrap_app_with_body_limit as _body_limit
except ImportError:  # pragma: no cover - older FastAPI
    _body_limit = None  # type: ignore[assignment]


def prefixable(router: APIRouter, root: str) -> str | None:
    """Why ``router`` must be included by FastAPI itself, or None when it can be copied."""
    if "{" in root:
        return "its prefix has path parameters"
    if getattr(router, "_low_priority_routes", None):
        return "it has low-priority routes"
    if getattr(router, "form_limits", None):
        return "it sets form limits (applied by FastAPI's include)"
    for route in router.routes:
        if type(route) is not APIRoute:
            return f"{type(route).__name__} {getattr(route, 'path', '')!r} is not a plain APIRoute"
        if getattr(route, "_embed_body_fields", False):
            return f"{route.path!r} embeds its body in a generated model"
        body = route.body_field
        if body is not None and body.name == "Body_" + route.unique_id:
            return f"{route.path!r} has a generated body model"
    return None


def include_prefixed(app: FastAPI, router: APIRouter, root: str) -> bool:
    """Give ``app`` the routes of ``router`` under ``root``; True when copied (see above)."""
    why = prefixable(router, root)
    if why is not None:
        log.debug("router included by FastAPI (%s)", why)
        app.include_router(router, prefix=root)
        return False
    copies = []
    for route in router.routes:
        copies.append(_prefixed(cast(APIRoute, route), root, app, router))
        pace()  # a build thread leaves the event loop its share (kernel/pacing.py)
    carrier = copy.copy(router)  # same lifespan, handlers and defaults; no routes
    carrier.routes = []
    app.include_router(carrier, prefix=root)
    app.router.routes[0:0] = copies
    mark = getattr(app.router, "_mark_routes_changed", None)
    if callable(mark):
        mark()
    return True


class PrefixedRoute(APIRoute):
    """A copy of a plugin's route at its public path (see the module docstring).

    A matched request's ``scope["route"]`` is the plugin's own route, as with FastAPI's
    include (what a bare app's code sees; the copy stays an implementation detail).
    """

    original: APIRoute

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match != Match.NONE:
            child_scope["route"] = self.original
        return match, child_scope


def _renamed(field: Any, name: str) -> Any:
    if field is None or field.name == name:
        return field
    twin = copy.copy(field)  # shares the built TypeAdapter: no __post_init__ runs
    twin.name = name
    return twin


def _prefixed(route: APIRoute, root: str, app: FastAPI, router: APIRouter) -> PrefixedRoute:
    """``route`` as FastAPI's include context for ``app.include_router(router, prefix=root)``
    would build it (``_EffectiveRouteContext.from_api_route``), from what does not change."""
    twin = copy.copy(route)
    twin.__class__ = PrefixedRoute
    assert isinstance(twin, PrefixedRoute)
    twin.original = route
    if root:
        twin.path = root + route.path
        twin.path_regex, twin.path_format, twin.param_convertors = compile_path(twin.path)
    twin.dependency_overrides_provider = app.router.dependency_overrides_provider
    twin.deprecated = route.deprecated or app.router.deprecated
    twin.callbacks = [*app.router.callbacks, *(route.callbacks or [])]
    if route.max_body_size is None:
        twin.max_body_size = router.max_body_size
    generate: Any = route.generate_unique_id_function
    generate = getattr(generate, "value", generate)  # a DefaultPlaceholder holds it
    twin.unique_id = route.operation_id or generate(twin)
    uid = twin.unique_id
    twin.response_field = _renamed(route.response_field, "Response_" + uid)
    twin.response_fields = {
        code: _renamed(field, f"Response_{code}_{uid}")
        for code, field in (route.response_fields or {}).items()
    }
    stream_item = getattr(route, "stream_item_field", None)
    if stream_item is not None:
        twin.stream_item_field = _renamed(stream_item, "StreamItem_" + uid)
    handler = request_response(twin.get_route_handler())
    twin.app = handler if _body_limit is None else _body_limit(handler, twin.max_body_size)
    return twin
